//! `peermem._native`, the extension module of the `peermem` Python package: a thin PyO3 layer
//! over the Rust crates. It converts arguments, errors and results; every decision (verdicts,
//! routes, direct or bounce) stays in the crates. The package's Python side (`python/peermem/`:
//! `__init__.py` re-exports this module, `torch.py` is the PyTorch dataset) holds no logic of
//! its own beyond what PyTorch needs and the engine's futures (`_engine.py`: `Engine` and its
//! `Transfer` futures over `_Engine` and `_Ticket`).
//!
//! - [`args`]: Python arguments checked one by one, each error naming its argument.
//! - [`bench`]: the same jobs run entirely in Rust, the benchmark's baseline.
//! - [`engine`]: `_Engine`, the transfer engine across hosts (`peermem.Engine` subclasses it).
//! - [`errors`]: the exceptions (`PeerMemError`, `NotDirectError`) and the error conversions.
//! - [`loader`]: `Loader.read` (GIL released while bytes move), `Loader.pread` futures, batches.
//! - [`memory`]: `HostBuffer`, `VulkanBuffer`, `CudaBuffer`, any writable Python buffer, CUDA
//!   tensors through DLPack; the package registry.
//! - [`shard`]: `ShardReader`: record batches, partitioned, shuffled, prefetched into host buffers.
//! - [`sys`]: the only `unsafe`: the buffer protocol, DLPack capsules, spans of lent memory.
//! - [`transfer`]: `_Ticket`, a posted batch, and `_Watch`, the batches one thread waits on.
//! - [`topology`]: `Topology`, its devices, `why` (the verdict) and `route` (the registry).

use pyo3::prelude::*;

mod args;
mod bench;
mod engine;
mod errors;
mod loader;
mod memory;
mod shard;
#[allow(unsafe_code)]
mod sys;
mod topology;
mod transfer;

pub use errors::{NotDirectError, PeerMemError};

/// peermem's native module (topology, routes, zero-copy buffers, loader, transfer engine);
/// `import peermem` re-exports it.
#[pymodule]
#[pyo3(name = "_native")]
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
    m.add_class::<memory::CudaBuffer>()?;
    m.add_class::<loader::Loader>()?;
    m.add_class::<loader::Report>()?;
    m.add_class::<loader::Future>()?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<transfer::Ticket>()?;
    m.add_class::<transfer::Watch>()?;
    m.add_class::<shard::ShardReader>()?;
    m.add_class::<shard::ShardIter>()?;
    m.add_class::<shard::Batch>()?;
    m.add_function(wrap_pyfunction!(memory::registered_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(memory::vulkan_available, m)?)?;
    m.add_function(wrap_pyfunction!(memory::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(memory::cufile_status, m)?)?;
    // Where the nvidia-cufile wheel keeps libcufile: a lookup, nothing imported or loaded. A
    // failed lookup only means no wheel directory is searched (`cufile_status` says what is).
    let _ = memory::add_cufile_wheels(py);
    m.add_function(wrap_pyfunction!(bench::rust_read_batch, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_shards, m)?)?;
    Ok(())
}
