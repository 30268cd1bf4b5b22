//! RDMA backend (issue 6): peer regions as memory registrations. Not built yet; the crate exists
//! so the workspace layout is final.
