//! `ShardReader`: the Python face of `peermem_loader::ShardReader`. Records of a list of files
//! (fixed-size, or variable-size from an index) in batches, partitioned across ranks (every record exactly once per epoch over
//! all ranks, no padding), optionally shuffled by (seed, epoch), read `prefetch` batches ahead
//! into the Rust reader's ring of registered host buffers.
//!
//! Owns: argument checks, the Python iterator over the Rust reader, and `Batch` (a ring buffer
//! lent to Python through the buffer protocol and DLPack). Must not: order records, move bytes
//! or manage the ring (the Rust reader does all three).

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyStopIteration, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use peermem::mem::MappedSpan;
use peermem::{Backing, PeerMemory, Provider};
use peermem_loader::{partition, Layout, Options, RingBuffer, ShardBatch, ShardOptions};

use crate::errors::{load_err, peermem_err};
use crate::memory::registry;
use crate::sys::Lent;

/// The bytes of one batch in its ring buffer: the rows and the gaps between them. Holding it
/// holds the batch, so its buffer goes back to the ring only when the last view lets go.
pub struct BatchMem {
    batch: ShardBatch,
    len: u64,
}

impl PeerMemory for BatchMem {
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
        self.batch.buffer().region.cpu_mapping()?.sub(0, self.len).ok()
    }
}

/// One batch. Fixed-size records: `rows` records of `record_size` bytes, a `(rows,
/// record_size)` uint8 array through the buffer protocol and DLPack (zero copy; rows start
/// 4096-byte aligned, so they are `stride` bytes apart). Variable-size records (`flat`): a 1-D
/// uint8 array holding record `i` at `offsets[i]`, `lengths[i]` bytes long. Its buffer returns
/// to the reader's ring when the batch and every view of it are gone.
#[pyclass(module = "peermem", frozen)]
pub struct Batch {
    pub buf: Arc<BatchMem>,
    /// One dimension (variable-size records) or two.
    pub flat: bool,
    /// `[rows, record_size]` and `[stride, 1]`, pointed to by buffer-protocol views (2-D only).
    pub shape: [isize; 2],
    pub strides: [isize; 2],
}

impl Batch {
    /// `record`: the fixed record size, None for variable-size records.
    fn new(batch: ShardBatch, record: Option<u64>) -> Batch {
        let rows = batch.len();
        let stride = batch.stride();
        let len = match rows.checked_sub(1) {
            Some(last) => batch.record(last).0 + batch.record(last).1,
            None => 0,
        };
        let width = record.unwrap_or(len);
        Batch {
            buf: Arc::new(BatchMem { batch, len }),
            flat: record.is_none(),
            shape: [rows as isize, width as isize],
            strides: [stride as isize, 1],
        }
    }
}

impl Batch {
    /// What the buffer protocol lends: a writable `(rows, record_size)` array of unsigned bytes
    /// whose rows are `stride` bytes apart (contiguous only when the record is a multiple of
    /// 4096 bytes, so a consumer must take strides, as numpy and memoryview do), or the flat
    /// bytes of variable-size records. A gapped batch refuses a view without strides.
    fn lend(&self, flags: c_int) -> PyResult<Lent<'_>> {
        let flat = Lent { region: &*self.buf, nbytes: self.buf.len(), rows: None };
        if self.flat {
            return Ok(flat);
        }
        let packed = self.strides[0] == self.shape[1];
        let strided = flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES;
        let contiguous_asked = flags
            & (ffi::PyBUF_C_CONTIGUOUS | ffi::PyBUF_F_CONTIGUOUS | ffi::PyBUF_ANY_CONTIGUOUS)
            & !ffi::PyBUF_STRIDES
            != 0;
        if !packed && (!strided || contiguous_asked) {
            return Err(PyBufferError::new_err(format!(
                "the batch's rows are {} bytes apart for {}-byte records: only a strided view is possible",
                self.strides[0], self.shape[1]
            )));
        }
        Ok(Lent { rows: Some((&self.shape, &self.strides)), ..flat })
    }
}

crate::sys::buffer_protocol!(Batch);

#[pymethods]
impl Batch {
    /// The global record indices of the rows, in order.
    #[getter]
    fn indices(&self) -> Vec<u64> {
        self.buf.batch.indices.iter().map(|&i| i as u64).collect()
    }

    /// `(rows, record_size)`, or `(nbytes,)` for variable-size records.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
        if self.flat {
            pyo3::types::PyTuple::new(py, [self.buf.len as usize])
        } else {
            pyo3::types::PyTuple::new(py, [self.shape[0] as usize, self.shape[1] as usize])
        }
    }

    /// Where each record starts in the batch's bytes.
    #[getter]
    fn offsets(&self) -> Vec<u64> {
        (0..self.buf.batch.len()).map(|i| self.buf.batch.record(i).0).collect()
    }

    /// Each record's length in bytes.
    #[getter]
    fn lengths(&self) -> Vec<u64> {
        (0..self.buf.batch.len()).map(|i| self.buf.batch.record(i).1).collect()
    }

    /// Bytes from one row to the next in the buffer.
    #[getter]
    fn stride(&self) -> usize {
        self.strides[0] as usize
    }

    /// The epoch the batch belongs to.
    #[getter]
    fn epoch(&self) -> u64 {
        self.buf.batch.epoch
    }

    /// True when the loader planned the batch direct: the reading device wrote the ring buffer
    /// itself (as `Report.direct` says).
    #[getter]
    fn direct(&self) -> bool {
        self.buf.batch.report.direct()
    }

    fn __len__(&self) -> usize {
        self.shape[0] as usize
    }

    /// A DLPack capsule: a `(rows, record_size)` uint8 tensor on the CPU (row stride `stride`),
    /// or the 1-D bytes of variable-size records.
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
        if self.flat {
            let n = self.buf.len as i64;
            return crate::sys::dlpack_nd(py, self.buf.clone(), self.buf.len, &[n], None, max_version, dl_device, copy);
        }
        let dims = [self.shape[0] as i64, self.shape[1] as i64];
        let stride = (self.strides[0] != self.shape[1]).then_some(self.strides[0] as i64);
        crate::sys::dlpack_nd(py, self.buf.clone(), self.buf.len, &dims, stride, max_version, dl_device, copy)
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        crate::sys::DLPACK_CPU
    }

    fn __repr__(&self) -> String {
        if self.flat {
            return format!("<peermem.Batch {} records, {} bytes>", self.shape[0], self.buf.len);
        }
        format!("<peermem.Batch {} x {} bytes>", self.shape[0], self.shape[1])
    }
}

/// The Rust reader and which Python iteration owns it (a new `iter()` restarts the epoch; the
/// iterators before it end).
struct Shared {
    reader: peermem_loader::ShardReader,
    generation: u64,
}

/// Locks the shared reader. Called only with the GIL released: a holder waits for reads.
fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Iterates the batches of one epoch; the Rust reader keeps `prefetch` batches in flight.
#[pyclass(module = "peermem", frozen)]
pub struct ShardIter {
    /// None only while being dropped.
    shared: Option<Arc<Mutex<Shared>>>,
    generation: u64,
    /// The fixed record size; None for variable-size records.
    record: Option<u64>,
}

#[pymethods]
impl ShardIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Batch> {
        let Some(shared) = self.shared.as_ref() else {
            return Err(PyStopIteration::new_err(()));
        };
        let next = py.detach(|| {
            let mut s = lock(shared);
            if s.generation != self.generation {
                return None;
            }
            s.reader.next_batch()
        });
        match next {
            Some(Ok(b)) => Ok(Batch::new(b, self.record)),
            Some(Err(e)) => Err(load_err(e)),
            None => Err(PyStopIteration::new_err(())),
        }
    }
}

/// Batches of records from a list of files, for data-parallel training: each rank reads every
/// `world_size`-th record of the (optionally shuffled) epoch order.
#[pyclass(module = "peermem")]
pub struct ShardReader {
    /// None only while being dropped.
    shared: Option<Arc<Mutex<Shared>>>,
    /// The fixed record size; None for variable-size records.
    record: Option<u64>,
    records: u64,
    opts: ShardOptions,
    /// The epoch the next `iter()` reads; `set_epoch` changes it.
    #[pyo3(get)]
    epoch: u64,
}

#[pymethods]
impl ShardReader {
    /// `files`: paths; `record_size`: bytes per record (every file a whole number of records);
    /// or `index`: variable-size records as `(file number, offset, length)`. `prefetch`: batches in
    /// flight; `ring`: batch buffers (default `prefetch + 2`: the caller may hold two batches
    /// while the next ones load; holding more takes buffers from the read-ahead, and asking for
    /// a batch while holding all `ring` raises `PeerMemError` until one is dropped).
    /// `depth`: read requests in flight.
    #[new]
    #[pyo3(signature = (files, record_size=None, index=None, batch_size=32, shuffle=false, seed=0, rank=0, world_size=1, prefetch=2, epoch=0, ring=None, depth=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        files: Vec<PathBuf>,
        record_size: Option<u64>,
        index: Option<Bound<'_, PyAny>>,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        rank: usize,
        world_size: usize,
        prefetch: usize,
        epoch: u64,
        ring: Option<usize>,
        depth: Option<usize>,
    ) -> PyResult<ShardReader> {
        let index: Option<Vec<(usize, u64, u64)>> = match (record_size, index) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("record_size or index, not both")),
            (None, None) => return Err(PyValueError::new_err("record_size or index is required")),
            (_, Some(ix)) => Some(ix.extract().map_err(|e| {
                PyValueError::new_err(format!("index: a list of (file number, offset, length) tuples ({e})"))
            })?),
            (Some(_), None) => None,
        };
        let record = match &index {
            None => record_size.unwrap_or(0),
            Some(ix) => ix.iter().map(|r| r.2).max().unwrap_or(0),
        };
        let ring = ring.unwrap_or(prefetch.saturating_add(2));
        if record == 0 || batch_size == 0 || world_size == 0 || rank >= world_size || prefetch == 0 || ring < prefetch {
            return Err(PyValueError::new_err(format!(
                "record_size {record}, batch_size {batch_size}: > 0; rank {rank} < world_size {world_size}; 0 < prefetch {prefetch} <= ring {ring}"
            )));
        }
        if ring > 1024 || depth.is_some_and(|d| d == 0 || d > 1024) {
            return Err(PyValueError::new_err(format!("ring {ring}, depth {depth:?}: 1 to 1024")));
        }
        if files.is_empty() {
            return Err(PyValueError::new_err("files: at least one"));
        }
        let mut records = 0u64;
        for path in &files {
            let m = std::fs::metadata(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    pyo3::exceptions::PyFileNotFoundError::new_err(format!("{}: {e}", path.display()))
                }
                _ => peermem_err(format!("{}: {e}", path.display())),
            })?;
            if !m.is_file() {
                return Err(PyValueError::new_err(format!("{}: not a regular file", path.display())));
            }
            if index.is_none() && m.len() % record != 0 {
                return Err(PyValueError::new_err(format!(
                    "{}: {} bytes is not a whole number of {record}-byte records",
                    path.display(),
                    m.len()
                )));
            }
            records += m.len() / record;
        }
        if let Some(ix) = &index {
            records = ix.len() as u64;
        }
        (batch_size as u64)
            .checked_mul(record.div_ceil(4096) * 4096)
            .filter(|&b| b <= 1 << 40)
            .ok_or_else(|| PyValueError::new_err("batch_size * record_size is too large"))?;
        let opts = ShardOptions {
            batch_size,
            prefetch,
            ring,
            shuffle,
            seed,
            rank,
            world_size,
            drop_last: false,
            uneven: true,
        };
        let d = Options::default();
        let lopts = Options { depth: depth.unwrap_or(d.depth), ..d };
        let reg = registry()?;
        let o = opts.clone();
        let fixed = index.is_none();
        let layout = match index {
            None => Layout::Fixed { record },
            Some(ix) => Layout::Index(ix),
        };
        let reader = py
            .detach(move || {
                let loader = Arc::new(peermem_loader::Loader::new(reg, lopts)?);
                let handles = files.iter().map(|p| loader.open(p)).collect::<Result<Vec<_>, _>>()?;
                peermem_loader::ShardReader::new(loader, handles, layout, o, RingBuffer::host)
            })
            .map_err(load_err)?;
        Ok(ShardReader {
            shared: Some(Arc::new(Mutex::new(Shared { reader, generation: 0 }))),
            record: fixed.then_some(record),
            records,
            opts,
            epoch,
        })
    }

    /// Records in all files.
    #[getter]
    fn num_records(&self) -> u64 {
        self.records
    }

    /// Sets the epoch the next iteration reads (changes the shuffle).
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Records this rank reads per epoch.
    fn __len__(&self) -> usize {
        partition(self.records as usize, self.epoch, &self.opts).len()
    }

    /// Starts reading the current epoch (batches read ahead for an earlier iteration are waited
    /// for and dropped; that iterator ends); yields `Batch`es.
    fn __iter__(&self, py: Python<'_>) -> PyResult<ShardIter> {
        let epoch = self.epoch;
        let shared = self.shared.clone().ok_or_else(|| peermem_err("the reader is closed"))?;
        let generation = py
            .detach(|| {
                let mut s = lock(&shared);
                s.generation += 1;
                s.reader.set_epoch(epoch).map(|_| s.generation)
            })
            .map_err(load_err)?;
        Ok(ShardIter { shared: Some(shared), generation, record: self.record })
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        // The last holder of the Rust reader waits for its batches in flight and joins its
        // loader's thread: not with the GIL held (garbage collection holds it). An iterator
        // still alive keeps the reader and drops it the same way.
        if let Some(shared) = self.shared.take() {
            Python::attach(|py| py.detach(move || drop(shared)));
        }
    }
}

impl Drop for ShardIter {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            Python::attach(|py| py.detach(move || drop(shared)));
        }
    }
}
