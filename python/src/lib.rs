//! The `peermem` Python module: a thin PyO3 layer over the Rust crates. It converts arguments,
//! errors and results; every decision (verdicts, routes, direct or bounce) stays in the crates.
//!
//! - [`topology`]: `Topology`, its devices, `why` (the verdict) and `route` (the registry).
//! - [`memory`]: `HostBuffer`, `VulkanBuffer`, and any writable Python buffer registered for the
//!   length of one load; the package's registry over the live system.
//! - [`loader`]: `Loader.read` (GIL released while bytes move), `Loader.pread` futures holding
//!   the asynchronous Rust loader's tickets, and batches of reads.
//! - [`shard`]: `ShardReader` over the Rust `ShardReader`: batches of fixed-size records,
//!   partitioned across ranks, shuffled per epoch, prefetched into a ring of host buffers.
//! - [`bench`]: the same jobs run entirely in Rust, the benchmark's baseline.
//! - [`sys`]: the only `unsafe`: raw pointers for the buffer protocol, DLPack capsules, and
//!   spans over memory a Python object lends.

use pyo3::prelude::*;

mod bench;
mod errors;
mod loader;
mod memory;
mod shard;
#[allow(unsafe_code)]
mod sys;
mod topology;

pub use errors::{NotDirectError, PeerMemError};

/// peermem: PCIe peer-to-peer memory from Python (topology, routes, zero-copy buffers, loader).
#[pymodule]
#[pyo3(name = "peermem")]
fn peermem_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PeerMemError", py.get_type::<PeerMemError>())?;
    m.add("NotDirectError", py.get_type::<NotDirectError>())?;
    m.add_class::<topology::Topology>()?;
    m.add_class::<topology::Device>()?;
    m.add_class::<topology::Why>()?;
    m.add_class::<topology::RouteInfo>()?;
    m.add_class::<memory::HostBuffer>()?;
    m.add_class::<memory::VulkanBuffer>()?;
    m.add_class::<loader::Loader>()?;
    m.add_class::<loader::Report>()?;
    m.add_class::<loader::Future>()?;
    m.add_class::<shard::ShardReader>()?;
    m.add_class::<shard::ShardIter>()?;
    m.add_class::<shard::Batch>()?;
    m.add_function(wrap_pyfunction!(memory::registered_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(memory::vulkan_available, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_read_batch, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_shards, m)?)?;
    Ok(())
}
