//! `ShardReader`: the Python face of `peermem_loader::ShardReader`. Records of a list of files
//! (fixed-size, or variable-size from an index) in batches, partitioned across ranks as
//! `DistributedSampler` does (padded by wrapping, the tail dropped with `drop_last`, or neither
//! with `pad=False`) and across a rank's DataLoader workers by batch, optionally shuffled by
//! (seed, epoch), read `prefetch` batches ahead into the Rust reader's ring of registered host
//! buffers. The loader's settings start from the `PEERMEM_*` variables (`Options::from_env`).
//!
//! Owns: argument checks, the Python iterator over the Rust reader, and `Batch` (a ring buffer
//! lent to Python through the buffer protocol and DLPack). Must not: order records, move bytes
//! or manage the ring (the Rust reader does all three).

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyFileNotFoundError, PyStopIteration, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use peermem::mem::MappedSpan;
use peermem::{Backing, PeerMemory, Provider};
use peermem_loader::{worker_partition, Layout, LoadError, Options, RingBuffer, ShardBatch, ShardOptions};

use crate::args;
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
        // The batch's loads (host or GPU copies) completed before it was yielded: there is no
        // pending work on any stream to order against.
        let _ = stream;
        let (dims, stride) = if self.flat {
            (vec![self.buf.len as i64], None)
        } else {
            let stride = (self.strides[0] != self.shape[1]).then_some(self.strides[0] as i64);
            (vec![self.shape[0] as i64, self.shape[1] as i64], stride)
        };
        let (b, len) = (self.buf.clone(), self.buf.len);
        match self.buf.batch.buffer().cuda_region() {
            Some(c) => {
                let (ptr, ord) = (c.device_ptr().raw(), c.device_info().ordinal as i32);
                crate::sys::dlpack_cuda(py, b, ptr, ord, len, &dims, stride, max_version, dl_device, copy)
            }
            None => crate::sys::dlpack_nd(py, b, len, &dims, stride, max_version, dl_device, copy),
        }
    }

    /// `(1, 0)` for a host ring, `(2, N)` (kDLCUDA) for a ring on `cuda:N`.
    fn __dlpack_device__(&self) -> (i32, i32) {
        match self.buf.batch.buffer().cuda_region() {
            Some(c) => (crate::sys::DLPACK_CUDA, c.device_info().ordinal as i32),
            None => crate::sys::DLPACK_CPU,
        }
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

/// Drops a reader (or an iterator's hold on it) with the GIL released: the last holder of the
/// Rust reader waits for its batches in flight and joins its loader's thread, which must not
/// happen with the GIL held (garbage collection holds it).
fn release(shared: Option<Arc<Mutex<Shared>>>) {
    if let Some(shared) = shared {
        Python::attach(|py| py.detach(move || drop(shared)));
    }
}

/// Iterates the batches of one epoch; the Rust reader keeps `prefetch` batches in flight.
#[pyclass(module = "peermem", frozen)]
pub struct ShardIter {
    /// None only while being dropped.
    shared: Option<Arc<Mutex<Shared>>>,
    generation: u64,
    /// The fixed record size; None for variable-size records.
    record: Option<u64>,
    /// `(prefetch, ring)`, for the message of a full ring.
    ring: (usize, usize),
}

impl ShardIter {
    /// A full ring, in words that say what to change.
    fn ring_full(&self) -> PyErr {
        let (prefetch, ring) = self.ring;
        peermem_err(format!(
            "all {ring} batch buffers of the ring are held by batches still alive (a Batch, or a tensor or array \
             viewing one): drop one before asking for the next batch, or make the ring bigger: to keep N batches \
             alive at once (e.g. gradient accumulation over N steps) use ring >= prefetch + N (prefetch is {prefetch})"
        ))
    }
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
            Some(Err(LoadError::RingFull { .. })) => Err(self.ring_full()),
            Some(Err(e)) => Err(load_err(e)),
            None => Err(PyStopIteration::new_err(())),
        }
    }
}

/// The arguments of a `ShardReader` as Python passed them (None: not given).
struct RawArgs<'a, 'py> {
    files: &'a Bound<'py, PyAny>,
    record_size: Option<&'a Bound<'py, PyAny>>,
    index: Option<&'a Bound<'py, PyAny>>,
    batch_size: Option<&'a Bound<'py, PyAny>>,
    seed: Option<&'a Bound<'py, PyAny>>,
    rank: Option<&'a Bound<'py, PyAny>>,
    world_size: Option<&'a Bound<'py, PyAny>>,
    worker: Option<&'a Bound<'py, PyAny>>,
    workers: Option<&'a Bound<'py, PyAny>>,
    prefetch: Option<&'a Bound<'py, PyAny>>,
    ring: Option<&'a Bound<'py, PyAny>>,
    depth: Option<&'a Bound<'py, PyAny>>,
    epoch: Option<&'a Bound<'py, PyAny>>,
}

/// Every argument of a `ShardReader`, checked one by one (each message names its argument).
struct Spec {
    files: Vec<PathBuf>,
    layout: Layout,
    opts: ShardOptions,
    depth: Option<usize>,
    epoch: u64,
}

/// The largest ring, depth and worker count a reader takes.
const MAX_COUNT: u64 = 1024;

impl Spec {
    fn parse(a: RawArgs<'_, '_>) -> PyResult<Spec> {
        let files = args::paths(a.files, "files")?;
        let record = args::opt_int(a.record_size, "record_size", 1, 1 << 40)?;
        let layout = match (record, a.index.filter(|i| !i.is_none())) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("record_size or index, not both")),
            (None, None) => return Err(PyValueError::new_err("record_size or index is required")),
            (Some(record), None) => Layout::Fixed { record },
            (None, Some(ix)) => Layout::Index(ix.extract().map_err(|e| {
                PyValueError::new_err(format!("index: a list of (file number, offset, length) tuples ({e})"))
            })?),
        };
        let batch_size = args::int_or(a.batch_size, "batch_size", 1, 1 << 24, 32)? as usize;
        let world_size = args::int_or(a.world_size, "world_size", 1, u32::MAX.into(), 1)?;
        let rank = args::below(a.rank, "rank", "world_size", world_size)? as usize;
        let workers = args::int_or(a.workers, "workers", 1, MAX_COUNT, 1)?;
        let worker = args::below(a.worker, "worker", "workers", workers)? as usize;
        let prefetch = args::int_or(a.prefetch, "prefetch", 1, MAX_COUNT, 2)? as usize;
        let ring = match args::opt_int(a.ring, "ring", 1, MAX_COUNT)? {
            Some(r) if (r as usize) < prefetch => {
                return Err(PyValueError::new_err(format!("ring must be >= prefetch (got {r}, prefetch {prefetch})")))
            }
            Some(r) => r as usize,
            None => prefetch + 2,
        };
        let opts = ShardOptions {
            batch_size,
            prefetch,
            ring,
            seed: args::int_or(a.seed, "seed", 0, u64::MAX, 0)?,
            rank,
            world_size: world_size as usize,
            worker,
            workers: workers as usize,
            ..ShardOptions::default()
        };
        let depth = args::opt_int(a.depth, "depth", 1, MAX_COUNT)?.map(|d| d as usize);
        Ok(Spec { files, layout, opts, depth, epoch: args::int_or(a.epoch, "epoch", 0, u64::MAX, 0)? })
    }

    /// Checks every file (exists, regular, not empty, whole records) and counts the records.
    fn count_records(&self) -> PyResult<u64> {
        let mut records = 0u64;
        for path in &self.files {
            let m = std::fs::metadata(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(format!("{}: {e}", path.display())),
                _ => peermem_err(format!("{}: {e}", path.display())),
            })?;
            if !m.is_file() {
                return Err(PyValueError::new_err(format!("{}: not a regular file", path.display())));
            }
            // Refused rather than skipped: an empty shard is most often a failed write upstream.
            if m.len() == 0 {
                return Err(PyValueError::new_err(format!(
                    "{}: an empty file (0 bytes) holds no records; remove it from files",
                    path.display()
                )));
            }
            if let Layout::Fixed { record } = self.layout {
                if m.len() % record != 0 {
                    return Err(PyValueError::new_err(format!(
                        "{}: {} bytes is not a whole number of {record}-byte records",
                        path.display(),
                        m.len()
                    )));
                }
                records += m.len() / record;
            }
        }
        Ok(match &self.layout {
            Layout::Fixed { .. } => records,
            Layout::Index(ix) => ix.len() as u64,
        })
    }

    /// The largest record: every ring buffer holds `batch_size` of them, each 4096-aligned.
    fn max_record(&self) -> u64 {
        match &self.layout {
            Layout::Fixed { record } => *record,
            Layout::Index(ix) => ix.iter().map(|r| r.2).max().unwrap_or(0),
        }
    }
}

/// Batches of records from a list of files, for data-parallel training: each rank reads its
/// share of the (optionally shuffled) epoch order, padded or dropped as `DistributedSampler`
/// does, and each DataLoader worker its share of the rank's batches.
#[pyclass(module = "peermem")]
pub struct ShardReader {
    /// None once closed (and while being dropped).
    shared: Option<Arc<Mutex<Shared>>>,
    /// The fixed record size; None for variable-size records.
    record: Option<u64>,
    records: u64,
    /// Records and batches this reader (rank, worker) reads per epoch.
    per_epoch: (usize, usize),
    /// `(prefetch, ring)`.
    ring: (usize, usize),
    /// The epoch the next `iter()` reads; `set_epoch` changes it.
    #[pyo3(get)]
    epoch: u64,
}

#[pymethods]
impl ShardReader {
    /// `files`: paths; `record_size`: bytes per record (every file a whole number of records);
    /// or `index`: variable-size records as `(file number, offset, length)`. How the ranks'
    /// shares are evened: padded by wrapping (`pad=True`, `DistributedSampler`'s default), the
    /// tail dropped (`drop_last=True`), or neither (`pad=False`: every record once, ranks may
    /// differ by one). `worker` of `workers`: this reader's share of the rank's batches.
    /// `prefetch`: batches in flight; `ring`: batch buffers (default `prefetch + 2`). `depth`:
    /// read requests in flight. The files are opened together (`Loader::open_many`), so the
    /// `io` mode judges the whole data set. The loader's settings start
    /// from the `PEERMEM_*` variables; `depth` wins over `PEERMEM_DEPTH`, `io` (`"auto"`,
    /// `"direct"`, `"buffered"`) over `PEERMEM_IO`.
    #[new]
    #[pyo3(
        signature = (files, record_size=None, index=None, batch_size=None, shuffle=false, seed=None, rank=None, world_size=None, prefetch=None, epoch=None, ring=None, depth=None, drop_last=false, pad=true, worker=None, workers=None, io=None, device=None),
        text_signature = "(files, record_size=None, index=None, batch_size=32, shuffle=False, seed=0, rank=0, world_size=1, prefetch=2, epoch=0, ring=None, depth=None, drop_last=False, pad=True, worker=0, workers=1, io=None, device=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        files: &Bound<'_, PyAny>,
        record_size: Option<&Bound<'_, PyAny>>,
        index: Option<&Bound<'_, PyAny>>,
        batch_size: Option<&Bound<'_, PyAny>>,
        shuffle: bool,
        seed: Option<&Bound<'_, PyAny>>,
        rank: Option<&Bound<'_, PyAny>>,
        world_size: Option<&Bound<'_, PyAny>>,
        prefetch: Option<&Bound<'_, PyAny>>,
        epoch: Option<&Bound<'_, PyAny>>,
        ring: Option<&Bound<'_, PyAny>>,
        depth: Option<&Bound<'_, PyAny>>,
        drop_last: bool,
        pad: bool,
        worker: Option<&Bound<'_, PyAny>>,
        workers: Option<&Bound<'_, PyAny>>,
        io: Option<&Bound<'_, PyAny>>,
        device: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<ShardReader> {
        let mut spec = Spec::parse(RawArgs {
            files,
            record_size,
            index,
            batch_size,
            seed,
            rank,
            world_size,
            worker,
            workers,
            prefetch,
            ring,
            depth,
            epoch,
        })?;
        spec.opts.shuffle = shuffle;
        spec.opts.drop_last = drop_last;
        // Dropping the tail leaves nothing to pad: `pad` only chooses for the kept records.
        spec.opts.uneven = !pad && !drop_last;
        let records = spec.count_records()?;
        (spec.opts.batch_size as u64)
            .checked_mul(spec.max_record().div_ceil(4096) * 4096)
            .filter(|&b| b <= 1 << 40)
            .ok_or_else(|| PyValueError::new_err("batch_size * record_size is too large (over 1 TiB per batch)"))?;
        let io = crate::args::opt_io(io)?;
        // `device="cuda:N"`: the ring lives in that GPU's memory.
        let cuda = match device.filter(|d| !d.is_none()) {
            Some(d) => Some(crate::memory::cuda_device(crate::memory::cuda_ordinal(d)?)?),
            None => None,
        };
        let env = Options::from_env().map_err(load_err)?;
        let lopts = Options { depth: spec.depth.unwrap_or(env.depth), io: io.unwrap_or(env.io), ..env };
        let reg = registry()?;
        let o = spec.opts.clone();
        let record = match spec.layout {
            Layout::Fixed { record } => Some(record),
            Layout::Index(_) => None,
        };
        let (files, layout) = (spec.files, spec.layout);
        let reader = py
            .detach(move || {
                let loader = Arc::new(peermem_loader::Loader::new(reg, lopts)?);
                let handles = loader.open_many(&files)?;
                match &cuda {
                    Some(dev) => {
                        peermem_loader::ShardReader::new(loader, handles, layout, o, |l, n| RingBuffer::cuda(l, dev, n))
                    }
                    None => peermem_loader::ShardReader::new(loader, handles, layout, o, RingBuffer::host),
                }
            })
            .map_err(load_err)?;
        // The share's length does not depend on the order: count it unshuffled.
        let unshuffled = ShardOptions { shuffle: false, ..spec.opts.clone() };
        let mine = worker_partition(records as usize, 0, &unshuffled).len();
        Ok(ShardReader {
            shared: Some(Arc::new(Mutex::new(Shared { reader, generation: 0 }))),
            record,
            records,
            per_epoch: (mine, mine.div_ceil(spec.opts.batch_size)),
            ring: (spec.opts.prefetch, spec.opts.ring),
            epoch: spec.epoch,
        })
    }

    /// Records in all files.
    #[getter]
    fn num_records(&self) -> u64 {
        self.records
    }

    /// Batches this reader yields per epoch (its rank's; with `workers`, its worker's share).
    /// Every rank has as many unless `pad=False`.
    #[getter]
    fn num_batches(&self) -> usize {
        self.per_epoch.1
    }

    /// Sets the epoch the next iteration reads (changes the shuffle).
    fn set_epoch(&mut self, epoch: &Bound<'_, PyAny>) -> PyResult<()> {
        self.epoch = args::int(epoch, "epoch", 0, u64::MAX)?;
        Ok(())
    }

    /// Records this reader (rank, worker) reads per epoch.
    fn __len__(&self) -> usize {
        self.per_epoch.0
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
        Ok(ShardIter { shared: Some(shared), generation, record: self.record, ring: self.ring })
    }

    /// Lets go of the reader: its ring and loader thread go once no iterator holds them (an
    /// iterator still alive reads on). A later `iter()` raises `PeerMemError`.
    fn close(&mut self) {
        release(self.shared.take());
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&mut self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        release(self.shared.take());
    }
}

impl Drop for ShardIter {
    fn drop(&mut self) {
        release(self.shared.take());
    }
}
