//! `ShardReader`: fixed-size records of a list of files, partitioned across ranks the way
//! PyTorch's `DistributedSampler` strides them (without padding: every record exactly once per
//! epoch over all ranks), optionally shuffled by (seed, epoch), read in batches by a background
//! thread `prefetch` batches ahead into a ring of page-aligned, registered host buffers.
//!
//! Built on `peermem_loader::load` (one call per record, direct into the batch buffer when the
//! route allows). Owns: the record order, the ring, the prefetch thread. Must not: decide how
//! bytes move (the loader does).

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;

use peermem::sys::MappedSpan;
use peermem::{Backing, HostRegion, PeerMemory, Provider, Registration};
use peermem_loader::{load, KernelSource, LoadError, LoadOptions, Source};

use crate::errors::{load_err, peermem_err};
use crate::memory::registry;

/// SplitMix64: a small, well-mixed generator for a reproducible shuffle.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The global record indices rank `rank` of `world` reads in `epoch`.
fn rank_order(n: u64, shuffle: bool, seed: u64, epoch: u64, rank: u64, world: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..n).collect();
    if shuffle {
        let mut g = SplitMix(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..all.len()).rev() {
            let j = (g.next() % (i as u64 + 1)) as usize;
            all.swap(i, j);
        }
    }
    all.into_iter().skip(rank as usize).step_by(world as usize).collect()
}

/// A region of the ring with its registration.
struct Slot {
    region: Arc<HostRegion>,
    _reg: Registration,
}

type FreeList = Arc<Mutex<Vec<Slot>>>;

/// One batch buffer: back on the free list when the last holder (the batch, a DLPack tensor, a
/// memoryview) lets go.
pub struct RingBuf {
    slot: Option<Slot>,
    free: FreeList,
    len: u64,
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        if let (Some(s), Ok(mut f)) = (self.slot.take(), self.free.lock()) {
            f.push(s);
        }
    }
}

impl PeerMemory for RingBuf {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Host { numa: None }
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        self.slot.as_ref()?.region.cpu_mapping()?.sub(0, self.len).ok()
    }
}

/// One batch: `records` rows of `record_size` bytes, a `(rows, record_size)` uint8 array
/// through the buffer protocol and DLPack (zero copy). Its buffer returns to the reader's ring
/// when the batch and every view of it are gone.
#[pyclass(module = "peermem", frozen)]
pub struct Batch {
    pub buf: Arc<RingBuf>,
    /// `[rows, record_size]` and `[record_size, 1]`, pointed to by buffer-protocol views.
    pub shape: [isize; 2],
    pub strides: [isize; 2],
    indices: Vec<u64>,
}

#[pymethods]
impl Batch {
    /// The global record indices of the rows, in order.
    #[getter]
    fn indices(&self) -> Vec<u64> {
        self.indices.clone()
    }

    /// `(rows, record_size)`.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.shape[0] as usize, self.shape[1] as usize)
    }

    fn __len__(&self) -> usize {
        self.shape[0] as usize
    }

    /// A DLPack capsule: a `(rows, record_size)` uint8 tensor on the CPU.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = stream;
        let dims = [self.shape[0] as i64, self.shape[1] as i64];
        crate::sys::dlpack_nd(py, self.buf.clone(), self.buf.len, &dims, max_version, dl_device, copy)
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        crate::sys::DLPACK_CPU
    }

    fn __repr__(&self) -> String {
        format!("<peermem.Batch {} x {} bytes>", self.shape[0], self.shape[1])
    }
}

/// One file's share of the records.
#[derive(Clone)]
struct File {
    path: PathBuf,
    records: u64,
}

type Produced = Result<Batch, LoadError>;

/// Iterates batches of one epoch; a background thread keeps `prefetch` batches ready.
#[pyclass(module = "peermem", frozen)]
pub struct ShardIter {
    /// None once the epoch ended (or failed). Closing the channel stops the producer at its
    /// next batch; it owns what it fills, so nothing is released under a read.
    rx: Mutex<Option<Receiver<Produced>>>,
    _worker: JoinHandle<()>,
}

#[pymethods]
impl ShardIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Batch> {
        let Some(rx) = self.rx.lock().map_err(peermem_err)?.take() else {
            return Err(PyStopIteration::new_err(()));
        };
        let (next, rx) = py.detach(move || (rx.recv(), rx));
        match next {
            Ok(Ok(b)) => {
                *self.rx.lock().map_err(peermem_err)? = Some(rx);
                Ok(b)
            }
            Ok(Err(e)) => Err(load_err(e)),
            Err(_) => Err(PyStopIteration::new_err(())),
        }
    }
}

/// Batches of fixed-size records from a list of files, for data-parallel training: each rank
/// reads every `world_size`-th record of the (optionally shuffled) epoch order.
#[pyclass(module = "peermem")]
pub struct ShardReader {
    files: Vec<File>,
    record_size: u64,
    batch_size: u64,
    shuffle: bool,
    seed: u64,
    rank: u64,
    world_size: u64,
    prefetch: usize,
    /// The epoch the next `iter()` reads; `set_epoch` changes it.
    #[pyo3(get)]
    epoch: u64,
    free: FreeList,
}

#[pymethods]
impl ShardReader {
    /// `files`: paths; `record_size`: bytes per record (every file a whole number of records);
    /// `index`: variable-size records (not supported yet: `ValueError`).
    #[new]
    #[pyo3(signature = (files, record_size=None, index=None, batch_size=32, shuffle=false, seed=0, rank=0, world_size=1, prefetch=2, epoch=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        files: Vec<PathBuf>,
        record_size: Option<u64>,
        index: Option<Bound<'_, PyAny>>,
        batch_size: u64,
        shuffle: bool,
        seed: u64,
        rank: u64,
        world_size: u64,
        prefetch: usize,
        epoch: u64,
    ) -> PyResult<ShardReader> {
        if index.is_some() {
            return Err(PyValueError::new_err("index: variable-size records are not supported yet; give record_size"));
        }
        let record_size = record_size.ok_or_else(|| PyValueError::new_err("record_size is required"))?;
        if record_size == 0 || batch_size == 0 || world_size == 0 || rank >= world_size || prefetch == 0 {
            return Err(PyValueError::new_err(format!(
                "record_size {record_size}, batch_size {batch_size}: > 0; rank {rank} < world_size {world_size}; prefetch {prefetch} > 0"
            )));
        }
        if files.is_empty() {
            return Err(PyValueError::new_err("files: at least one"));
        }
        let files = files
            .into_iter()
            .map(|path| {
                let m = std::fs::metadata(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        pyo3::exceptions::PyFileNotFoundError::new_err(format!("{}: {e}", path.display()))
                    }
                    _ => peermem_err(format!("{}: {e}", path.display())),
                })?;
                if !m.is_file() {
                    return Err(PyValueError::new_err(format!("{}: not a regular file", path.display())));
                }
                if m.len() % record_size != 0 {
                    return Err(PyValueError::new_err(format!(
                        "{}: {} bytes is not a whole number of {record_size}-byte records",
                        path.display(),
                        m.len()
                    )));
                }
                Ok(File { records: m.len() / record_size, path })
            })
            .collect::<PyResult<Vec<_>>>()?;
        batch_size
            .checked_mul(record_size)
            .filter(|&b| b <= 1 << 40)
            .ok_or_else(|| PyValueError::new_err("batch_size * record_size is too large"))?;
        Ok(ShardReader {
            files,
            record_size,
            batch_size,
            shuffle,
            seed,
            rank,
            world_size,
            prefetch,
            epoch,
            free: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Records in all files.
    #[getter]
    fn num_records(&self) -> u64 {
        self.files.iter().map(|f| f.records).sum()
    }

    /// Sets the epoch the next iteration reads (changes the shuffle).
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Records this rank reads per epoch.
    fn __len__(&self) -> usize {
        let n = self.num_records();
        (n / self.world_size + u64::from(self.rank < n % self.world_size)) as usize
    }

    /// Starts reading the current epoch in the background; yields `Batch`es.
    fn __iter__(&self) -> PyResult<ShardIter> {
        let reg = registry()?;
        let order = rank_order(self.num_records(), self.shuffle, self.seed, self.epoch, self.rank, self.world_size);
        let (tx, rx) = sync_channel::<Produced>(self.prefetch);
        let (files, rs, bs, free) = (self.files.clone(), self.record_size, self.batch_size, self.free.clone());
        let worker = std::thread::Builder::new()
            .name("peermem-shards".into())
            .spawn(move || {
                let opts = LoadOptions { depth: 1, verify: false, ..LoadOptions::default() };
                for rows in order.chunks(bs as usize) {
                    let r = fill(&files, rs, bs, rows, &free, reg, &opts);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(peermem_err)?;
        Ok(ShardIter { rx: Mutex::new(Some(rx)), _worker: worker })
    }
}

/// Records of one batch read at once (requests in flight).
const READERS: usize = 32;

/// Reads the records `rows` (global indices) into a ring buffer.
fn fill(
    files: &[File],
    rs: u64,
    bs: u64,
    rows: &[u64],
    free: &FreeList,
    reg: &peermem::Registry,
    opts: &LoadOptions,
) -> Produced {
    let slot = match free.lock().ok().and_then(|mut f| f.pop()) {
        Some(s) => s,
        None => {
            let region = Arc::new(HostRegion::new(bs * rs)?);
            let g = reg.register(region.clone() as Arc<dyn PeerMemory>)?;
            Slot { region, _reg: g }
        }
    };
    let len = rows.len() as u64 * rs;
    let entry = slot._reg.entry().clone();
    let buf = Arc::new(RingBuf { slot: Some(slot), free: free.clone(), len });
    // Up to `READERS` records in flight, each reader taking every READERS-th row.
    let k = rows.len().min(READERS);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..k)
            .map(|w| {
                let entry = &entry;
                s.spawn(move || -> Result<(), LoadError> {
                    for (i, &g) in rows.iter().enumerate().skip(w).step_by(k) {
                        let (mut g, mut f) = (g, 0);
                        while g >= files[f].records {
                            g -= files[f].records;
                            f += 1;
                        }
                        let mut src = Source::Kernel(KernelSource::open(&files[f].path)?);
                        let o = LoadOptions { dest_offset: i as u64 * rs, ..opts.clone() };
                        load(&mut src, g * rs..(g + 1) * rs, entry, reg, &o)?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(LoadError::Copy { what: "shard read", offset: 0, why: "a reader panicked".into() })
            })
        })
    })?;
    let n = rows.len() as isize;
    Ok(Batch { buf, shape: [n, rs as isize], strides: [rs as isize, 1], indices: rows.to_vec() })
}
