//! `Loader`: `read` runs `peermem_loader::load` with the GIL released; `pread` queues the same
//! call on a pool of worker threads the loader owns and returns a `Future`.
//!
//! Owns: argument checks a Python caller needs before any I/O (path kind, range, destination
//! size), the worker pool, futures. Must not: decide direct or bounce (the loader does).

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyFileNotFoundError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use peermem::mover::RouteHealth;
use peermem::{Entry, HostRegion, PeerMemory, RegistryError, VirtAddr};
use peermem_loader::{load, KernelSource, LoadError, LoadOptions, LoadReport, Method, Source, ALIGN};

use crate::errors::{load_err, not_direct, peermem_err};
use crate::memory::{registry, Dest};
use crate::sys::PyBufferRegion;

/// What one load did.
#[pyclass(module = "peermem", frozen, get_all)]
pub struct Report {
    /// Bytes moved.
    bytes: u64,
    /// Wall time of the copy (verification excluded).
    seconds: f64,
    mb_per_s: f64,
    /// The registry's route kind for (destination, the device reading the source).
    route: String,
    /// How the bytes moved, in words.
    method: String,
    /// True when the bytes went straight into the destination (no bounce buffer).
    direct: bool,
    /// Every reason: the route's, then the loader's.
    reasons: Vec<String>,
    /// The source as opened (path, O_DIRECT or buffered, PCI device).
    source: String,
    /// Checksum of the destination bytes after the load.
    checksum: u64,
    /// Checksum of the source range re-read through host memory (`verify=True`).
    source_checksum: Option<u64>,
}

impl From<LoadReport> for Report {
    fn from(r: LoadReport) -> Report {
        Report {
            bytes: r.bytes,
            seconds: r.seconds,
            mb_per_s: r.mb_per_s(),
            route: r.route.to_string(),
            direct: !matches!(r.method, Method::Bounce { .. }),
            method: r.method.to_string(),
            reasons: r.reasons,
            source: r.source,
            checksum: r.checksum,
            source_checksum: r.source_checksum,
        }
    }
}

#[pymethods]
impl Report {
    fn __repr__(&self) -> String {
        format!(
            "<peermem.Report {} bytes in {:.6} s ({:.1} MB/s), route {}, {}>",
            self.bytes,
            self.seconds,
            self.mb_per_s,
            self.route,
            if self.direct { "direct" } else { "bounce" }
        )
    }
}

/// A load as a worker runs it: everything owned, nothing borrowed from Python.
struct Job {
    path: PathBuf,
    dest: Dest,
    offset: u64,
    size: Option<u64>,
    out_offset: u64,
    opts: LoadOptions,
    strict: bool,
}

/// How a job failed, turned into a Python exception with the GIL attached.
enum JobError {
    Load(LoadError),
    Value(String),
    NotFound(String),
    NotDirect { method: String, reasons: Vec<String> },
    Other(PyErr),
}

impl JobError {
    fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            JobError::Load(e) => load_err(e),
            JobError::Value(s) => PyValueError::new_err(s),
            JobError::NotFound(s) => PyFileNotFoundError::new_err(s),
            JobError::NotDirect { method, reasons } => not_direct(py, &method, reasons),
            JobError::Other(e) => e,
        }
    }
}

impl Job {
    /// Runs the load (no GIL needed).
    fn run(self) -> Result<LoadReport, JobError> {
        // A FIFO would block the open, a character device has no length: refuse both up front.
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(JobError::NotFound(format!("{}: {e}", self.path.display())))
            }
            Err(e) => return Err(JobError::Load(LoadError::Io { path: self.path.clone(), source: e })),
            Ok(m) if !(m.is_file() || m.file_type().is_block_device()) => {
                return Err(JobError::Value(format!("{}: not a regular file or block device", self.path.display())))
            }
            Ok(_) => {}
        }
        let ks = KernelSource::open(&self.path).map_err(JobError::Load)?;
        let len = ks.len();
        if self.offset > len {
            return Err(JobError::Value(format!(
                "offset {} is past the end of {} ({len} bytes)",
                self.offset,
                self.path.display()
            )));
        }
        let size = self.size.unwrap_or(len - self.offset);
        let end = self.offset.checked_add(size).filter(|&e| e <= len && size > 0).ok_or_else(|| {
            JobError::Value(format!(
                "range {}+{size} is empty or runs past the end of {} ({len} bytes)",
                self.offset,
                self.path.display()
            ))
        })?;
        let room = self.dest.nbytes();
        if self.out_offset.checked_add(size).is_none_or(|e| e > room) {
            return Err(JobError::Value(format!(
                "{size} bytes at out_offset {} do not fit the {room}-byte destination",
                self.out_offset
            )));
        }
        let reg = registry().map_err(JobError::Other)?;
        let mut source = Source::Kernel(ks);
        let range = self.offset..end;
        let load_at = |entry: &Entry, dest_offset: u64, src: &mut Source<'_>| {
            let opts = LoadOptions { dest_offset, ..self.opts.clone() };
            load(src, range.clone(), entry, reg, &opts).map_err(JobError::Load)
        };
        let report = match &self.dest {
            Dest::Registered { entry, .. } => load_at(entry, self.out_offset, &mut source)?,
            Dest::Foreign(region) => {
                let addr = region.addr() + self.out_offset;
                // Memory of a registered buffer (a numpy view of a HostBuffer): load into it.
                let covering = {
                    let snap = reg.snapshot();
                    snap.lookup_va(VirtAddr::new(addr))
                        .filter(|h| h.entry.is_live() && h.offset + size <= h.entry.len())
                        .map(|h| (h.entry.clone(), h.offset))
                };
                if let Some((entry, off)) = covering {
                    load_at(&entry, off, &mut source)?
                } else if !addr.is_multiple_of(ALIGN) {
                    let why = format!("the destination address {addr:#x} is not {ALIGN}-byte aligned");
                    staged(&mut source, range.clone(), region, self.out_offset, reg, &self.opts, why)?
                } else {
                    match reg.register(region.clone() as Arc<dyn PeerMemory>) {
                        Ok(g) => load_at(g.entry(), self.out_offset, &mut source)?,
                        // Another load is filling a buffer that overlaps this one.
                        Err(e @ RegistryError::Overlap { .. }) => {
                            staged(&mut source, range.clone(), region, self.out_offset, reg, &self.opts, e.to_string())?
                        }
                        Err(e) => return Err(JobError::Other(peermem_err(e))),
                    }
                }
            }
        };
        if self.strict {
            if let Method::Bounce { .. } = report.method {
                return Err(JobError::NotDirect { method: report.method.to_string(), reasons: report.reasons });
            }
        }
        Ok(report)
    }
}

/// Loads `range` into a fresh page-aligned host buffer, then copies it into `region` at
/// `offset`: for destinations that cannot be registered or read into directly. The report says
/// so (a bounce, with `why` among the reasons).
fn staged(
    source: &mut Source<'_>,
    range: std::ops::Range<u64>,
    region: &PyBufferRegion,
    offset: u64,
    reg: &peermem::Registry,
    opts: &LoadOptions,
    why: String,
) -> Result<LoadReport, JobError> {
    let n = range.end - range.start;
    let tmp: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(n).map_err(|e| JobError::Load(LoadError::Region(e)))?);
    let g = reg.register(tmp.clone()).map_err(|e| JobError::Load(LoadError::Registry(e)))?;
    let opts = LoadOptions { dest_offset: 0, ..opts.clone() };
    let mut report = load(source, range, &g, reg, &opts).map_err(JobError::Load)?;
    let start = std::time::Instant::now();
    tmp.copy_to(0, region, offset, n).map_err(|e| JobError::Load(LoadError::Access(e)))?;
    report.seconds += start.elapsed().as_secs_f64();
    report.reasons.push(format!("staged through a page-aligned host buffer ({}), then copied: {why}", report.method));
    report.method = Method::Bounce { why: format!("{why}: staged through a page-aligned host buffer, then copied") };
    Ok(report)
}

type Outcome = Result<LoadReport, JobError>;

/// The shared state of one pending load.
#[derive(Default)]
struct Slot {
    outcome: Mutex<Option<Outcome>>,
    ready: Condvar,
}

/// A pending `Loader.pread`: `result()` waits for the report (or raises the load's error).
#[pyclass(module = "peermem", frozen)]
pub struct Future {
    slot: Arc<Slot>,
    /// Taken by the first `result()` that sees the outcome; later calls see it again.
    taken: Mutex<Option<Result<Py<Report>, PyErr>>>,
}

#[pymethods]
impl Future {
    /// True when the load finished (successfully or not).
    fn done(&self) -> bool {
        self.taken.lock().is_ok_and(|t| t.is_some()) || self.slot.outcome.lock().is_ok_and(|o| o.is_some())
    }

    /// The load's `Report`; raises its error. Waits at most `timeout` seconds (forever when
    /// None), then raises `TimeoutError`. The GIL is released while waiting.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<Report>> {
        if let Some(r) = self.taken.lock().map_err(peermem_err)?.as_ref() {
            return r.as_ref().map(|r| r.clone_ref(py)).map_err(|e| e.clone_ref(py));
        }
        let limit = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(format!("timeout {t}: must be >= 0 and finite")))
            }
            Some(t) => Some(Duration::from_secs_f64(t.min(1e9))),
            None => None,
        };
        let slot = self.slot.clone();
        let outcome = py.detach(move || -> Option<Outcome> {
            let mut g = slot.outcome.lock().unwrap_or_else(|e| e.into_inner());
            let deadline = limit.map(|l| std::time::Instant::now() + l);
            loop {
                if let Some(o) = g.take() {
                    return Some(o);
                }
                g = match deadline {
                    None => slot.ready.wait(g).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = std::time::Instant::now();
                        if now >= d {
                            return None;
                        }
                        slot.ready.wait_timeout(g, d - now).unwrap_or_else(|e| e.into_inner()).0
                    }
                };
            }
        });
        let Some(outcome) = outcome else {
            return Err(PyTimeoutError::new_err(format!(
                "the load did not finish within {} s",
                timeout.unwrap_or(0.0)
            )));
        };
        let r = match outcome {
            Ok(rep) => Py::new(py, Report::from(rep)),
            Err(e) => Err(e.into_py(py)),
        };
        let mut t = self.taken.lock().map_err(peermem_err)?;
        *t = Some(r.as_ref().map(|r| r.clone_ref(py)).map_err(|e| e.clone_ref(py)));
        r
    }

    fn __repr__(&self) -> String {
        format!("<peermem.Future {}>", if self.done() { "done" } else { "pending" })
    }
}

type Task = (Job, Arc<Slot>);

/// Worker threads that run queued loads. Dropping the pool closes the queue; the workers finish
/// the loads already queued (each job owns its destination, so no destination is released
/// mid-transfer) and exit. `join` also waits for them.
struct Pool {
    tx: Option<mpsc::Sender<Task>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(n: usize) -> std::io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..n)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new().name(format!("peermem-pread-{i}")).spawn(move || loop {
                    let task = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok((job, slot)) = task else { return };
                    let outcome = job.run();
                    *slot.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                    slot.ready.notify_all();
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { tx: Some(tx), workers })
    }
}

impl Pool {
    /// Closes the queue and waits for the workers (never with the GIL held: a finishing job
    /// attaches to release its Python buffer).
    fn join(mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Loads byte ranges of files and block devices into buffers, directly when the route allows
/// (O_DIRECT into the destination's pages), else through host staging buffers.
#[pyclass(module = "peermem", frozen)]
pub struct Loader {
    strict: bool,
    opts: LoadOptions,
    workers: usize,
    pool: Mutex<Option<Pool>>,
}

impl Loader {
    #[allow(clippy::too_many_arguments)]
    fn job(
        &self,
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: u64,
        size: Option<u64>,
        out_offset: u64,
    ) -> PyResult<Job> {
        if size == Some(0) {
            return Err(PyValueError::new_err("size 0: nothing to load"));
        }
        Ok(Job {
            path,
            dest: Dest::from_py(out)?,
            offset,
            size,
            out_offset,
            opts: self.opts.clone(),
            strict: self.strict,
        })
    }
}

#[pymethods]
impl Loader {
    /// `strict`: raise `NotDirectError` when a load bounces. `verify`: re-read the source and
    /// compare checksums. `chunk`: bytes per request (a multiple of 4096). `depth`: requests in
    /// flight per load. `workers`: threads running `pread` loads (default 16).
    #[new]
    #[pyo3(signature = (strict=false, verify=false, chunk=None, depth=None, workers=None))]
    fn new(
        strict: bool,
        verify: bool,
        chunk: Option<u64>,
        depth: Option<usize>,
        workers: Option<usize>,
    ) -> PyResult<Loader> {
        let d = LoadOptions::default();
        if chunk.is_some_and(|c| c == 0 || c % 4096 != 0 || c > 1 << 30) {
            return Err(PyValueError::new_err(format!("chunk {chunk:?}: a multiple of 4096 up to 1 GiB")));
        }
        if depth.is_some_and(|x| x == 0 || x > 1024) {
            return Err(PyValueError::new_err(format!("depth {depth:?}: 1 to 1024")));
        }
        let workers = workers.unwrap_or(16);
        if workers == 0 || workers > 1024 {
            return Err(PyValueError::new_err(format!("workers {workers}: 1 to 1024")));
        }
        let opts = LoadOptions {
            chunk: chunk.unwrap_or(d.chunk),
            depth: depth.unwrap_or(d.depth),
            dest_offset: 0,
            verify,
            health: RouteHealth::new(),
        };
        Ok(Loader { strict, opts, workers, pool: Mutex::new(None) })
    }

    /// Loads `size` bytes (default: to the end) at `offset` of the file or block device `path`
    /// into `out` at `out_offset`. The GIL is released while bytes move.
    #[pyo3(signature = (path, out, offset=0, size=None, out_offset=0))]
    fn read(
        &self,
        py: Python<'_>,
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: u64,
        size: Option<u64>,
        out_offset: u64,
    ) -> PyResult<Report> {
        let job = self.job(path, out, offset, size, out_offset)?;
        match py.detach(move || job.run()) {
            Ok(r) => Ok(Report::from(r)),
            Err(e) => Err(e.into_py(py)),
        }
    }

    /// As `read`, queued on the loader's worker threads: returns a `Future` at once.
    #[pyo3(signature = (path, out, offset=0, size=None, out_offset=0))]
    fn pread(
        &self,
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: u64,
        size: Option<u64>,
        out_offset: u64,
    ) -> PyResult<Future> {
        let job = self.job(path, out, offset, size, out_offset)?;
        let slot = Arc::new(Slot::default());
        let mut pool = self.pool.lock().map_err(peermem_err)?;
        if pool.is_none() {
            *pool = Some(Pool::new(self.workers).map_err(peermem_err)?);
        }
        let tx = pool.as_ref().and_then(|p| p.tx.as_ref()).ok_or_else(|| peermem_err("the loader is closed"))?;
        tx.send((job, slot.clone())).map_err(|_| peermem_err("the loader's workers are gone"))?;
        Ok(Future { slot, taken: Mutex::new(None) })
    }

    /// Waits for queued loads to finish and stops the worker threads (also done when the loader
    /// is garbage-collected). Later `pread` calls start new workers.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let pool = self.pool.lock().map_err(peermem_err)?.take();
        py.detach(move || pool.map(Pool::join));
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

/// Benchmark baseline: the same records loaded entirely in Rust (`depth` threads, each calling
/// `peermem_loader::load` for every depth-th record), no Python per record. Returns seconds.
#[pyfunction]
#[pyo3(name = "_rust_job", signature = (path, out, records, depth, chunk=None, load_depth=None))]
pub fn rust_job(
    py: Python<'_>,
    path: PathBuf,
    out: &Bound<'_, PyAny>,
    records: Vec<(u64, u64, u64)>,
    depth: usize,
    chunk: Option<u64>,
    load_depth: Option<usize>,
) -> PyResult<f64> {
    let dest = Dest::from_py(out)?;
    let d = LoadOptions::default();
    let opts =
        LoadOptions { chunk: chunk.unwrap_or(d.chunk), depth: load_depth.unwrap_or(d.depth), verify: false, ..d };
    let depth = depth.clamp(1, 1024);
    let Dest::Registered { entry, .. } = dest else {
        return Err(PyValueError::new_err("out: a HostBuffer or a VulkanBuffer"));
    };
    let r = py.detach(move || -> Result<f64, JobError> {
        let reg = registry().map_err(JobError::Other)?;
        let start = std::time::Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..depth)
                .map(|w| {
                    let (records, entry, opts, path) = (&records, &entry, &opts, &path);
                    s.spawn(move || -> Result<(), LoadError> {
                        for &(off, size, out_off) in records.iter().skip(w).step_by(depth) {
                            let ks = KernelSource::open(path)?;
                            let o = LoadOptions { dest_offset: out_off, ..opts.clone() };
                            load(&mut Source::Kernel(ks), off..off + size, entry, reg, &o)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| JobError::Value("a benchmark thread panicked".into()))?.map_err(JobError::Load)?;
            }
            Ok(start.elapsed().as_secs_f64())
        })
    });
    r.map_err(|e| e.into_py(py))
}
