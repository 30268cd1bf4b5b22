//! NVMe backend (issue 5): CMB, kernel p2pmem, VFIO driver. Not built yet; the crate exists so the
//! workspace layout is final.
