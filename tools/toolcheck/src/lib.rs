//! No code: the build script is the whole crate (see `build.rs`). Core depends on it so that cargo
//! runs that check before anything else; peermem-rdma turns it on with the `rdma` feature.
