//! Benchmark baselines for `python/bench`: the jobs the Python API runs, done entirely in Rust
//! with the GIL released, through the same `peermem_loader` calls the API makes. Hidden
//! (`_rust_*`); each returns the seconds of the timed part.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use pyo3::prelude::*;

use peermem_loader::{Batch, Dest, Layout, Options, RingBuffer, ShardOptions};

use crate::errors::load_err;
use crate::memory::{registry, Target};

/// Reads `(offset, size, out_offset)` of `path` into `out` as one batch of a Rust loader with
/// `chunk` and `depth`. The loader starts (and reads 4 KiB into `out`) before the clock; the
/// open, the submit and the wait are timed (what `Loader.read_batch` does per call).
#[pyfunction]
#[pyo3(name = "_rust_read_batch", signature = (path, out, reads, chunk=None, depth=None))]
pub fn rust_read_batch(
    py: Python<'_>,
    path: PathBuf,
    out: &Bound<'_, PyAny>,
    reads: Vec<(u64, u64, u64)>,
    chunk: Option<u64>,
    depth: Option<usize>,
) -> PyResult<f64> {
    let target = Target::from_py(out, "out")?;
    let d = Options::default();
    let opts = Options { chunk: chunk.unwrap_or(d.chunk), depth: depth.unwrap_or(d.depth), ..d };
    let reg = registry()?;
    py.detach(move || {
        let loader = peermem_loader::Loader::new(reg, opts)?;
        let dest = Dest::region(&target.owned.reg);
        // One small read first, as the Python side's loader has done before its clock: the
        // engine's first use of a destination registers its pages as fixed buffers.
        let warm = loader.open(&path)?;
        loader.read(&warm, 0, warm.len().min(4096), &dest, target.at)?;
        drop(warm);
        let start = Instant::now();
        let file = loader.open(&path)?;
        let mut b = Batch::new();
        for &(off, n, oo) in &reads {
            b.read(&file, off, n, &dest, target.at + oo);
        }
        loader.run(b)?;
        Ok(start.elapsed().as_secs_f64())
    })
    .map_err(load_err)
}

/// One epoch of a Rust `ShardReader` over `files` (host ring, `ring` = `prefetch + 2`, ranks as
/// the Python reader splits them), every batch dropped at once. The reader is built before the
/// clock.
#[pyfunction]
#[pyo3(name = "_rust_shards", signature = (files, record_size, batch_size=32, shuffle=false, seed=0, prefetch=2, depth=None))]
#[allow(clippy::too_many_arguments)]
pub fn rust_shards(
    py: Python<'_>,
    files: Vec<PathBuf>,
    record_size: u64,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    prefetch: usize,
    depth: Option<usize>,
) -> PyResult<f64> {
    let d = Options::default();
    let lopts = Options { depth: depth.unwrap_or(d.depth), ..d };
    let opts =
        ShardOptions { batch_size, prefetch, ring: prefetch + 2, shuffle, seed, uneven: true, ..Default::default() };
    let reg = registry()?;
    py.detach(move || {
        let loader = Arc::new(peermem_loader::Loader::new(reg, lopts)?);
        let handles = files.iter().map(|p| loader.open(p)).collect::<Result<Vec<_>, _>>()?;
        let mut r = peermem_loader::ShardReader::new(
            loader,
            handles,
            Layout::Fixed { record: record_size },
            opts,
            RingBuffer::host,
        )?;
        let start = Instant::now();
        while let Some(b) = r.next_batch() {
            drop(b?);
        }
        Ok(start.elapsed().as_secs_f64())
    })
    .map_err(load_err)
}
