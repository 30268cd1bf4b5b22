//! `Loader`: a Python face of the asynchronous `peermem_loader::Loader`. `read` submits one
//! batch and waits for its ticket with the GIL released; `pread` submits and returns a `Future`
//! holding the ticket (`result(timeout)` is the ticket's `wait_timeout`); `read_batch` and
//! `pread_batch` submit many reads as one batch (all in flight together, `depth` requests deep).
//! Settings start from the `PEERMEM_*` variables (`Options::from_env`); arguments given win.
//!
//! Owns: argument checks a Python caller needs before any I/O (path kind, range, destination
//! size) and keeping each destination's buffer export alive until its load is reaped. Must not:
//! decide direct or bounce, stage bytes, or check strictness (the loader does all three, and a
//! strict loader refuses before any byte moves).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyFileNotFoundError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use peermem_loader::{Batch, LoadError, Options, Report as LoadReport, Source, Ticket, Verify};

use crate::args;
use crate::errors::{load_err, peermem_err};
use crate::memory::{registry, Target};

/// What one load (or one batch of reads) did.
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
    /// True when every destination was planned direct (the reading device wrote its pages);
    /// pieces O_DIRECT cannot take (unaligned edges, a tail shorter than 4096 bytes) still went
    /// through staging, as `bytes_staged` says.
    direct: bool,
    /// Bytes the reading device wrote straight into the destinations.
    bytes_direct: u64,
    /// Bytes that went through staging buffers.
    bytes_staged: u64,
    /// Every reason: the route's, the planner's, then every fallback the loader took.
    reasons: Vec<String>,
    /// The source of the first destination, as opened (path, O_DIRECT or buffered, device).
    source: String,
    /// How each source was read and why, once per source: `path: O_DIRECT|buffered: why`.
    io: Vec<String>,
    /// xxh3-64 of the first read's destination bytes after the load (`verify=True`).
    checksum: Option<u64>,
    /// xxh3-64 of the first read's source range, read a second time (`verify=True`).
    source_checksum: Option<u64>,
    /// Into CUDA memory: whether cuFile (GPUDirect Storage) read it and why, or why not
    /// (`"cufile: taken: ..."`, `"cufile: not taken: ..."`); `None` for other memory.
    cufile: Option<String>,
}

impl Report {
    /// The loader's report as Python sees it (the first destination's route and method).
    fn new(r: LoadReport) -> Report {
        let first = r.dests.first();
        Report {
            bytes: r.bytes,
            seconds: r.seconds,
            mb_per_s: r.mb_per_s(),
            route: r.route().to_string(),
            method: first.map_or_else(|| r.via().to_string(), |d| format!("{}: {}", d.via.name(), d.method)),
            direct: r.direct(),
            bytes_direct: r.bytes_direct(),
            bytes_staged: r.bytes_staged(),
            reasons: r.reasons(),
            source: first.map(|d| d.source.clone()).unwrap_or_default(),
            io: r.io.clone(),
            checksum: r.checksums.first().copied(),
            source_checksum: r.source_checksums.first().copied(),
            cufile: first.and_then(|d| {
                d.reasons.iter().find(|r| r.starts_with("cufile: taken") || r.starts_with("cufile: not taken")).cloned()
            }),
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

/// How a load failed, turned into a Python exception with the GIL attached.
enum JobError {
    Load(LoadError),
    Value(String),
    NotFound(String),
}

impl JobError {
    fn into_py(self) -> PyErr {
        match self {
            JobError::Load(e) => load_err(e),
            JobError::Value(s) => PyValueError::new_err(s),
            JobError::NotFound(s) => PyFileNotFoundError::new_err(s),
        }
    }
}

/// One read as Python asked for it; the destination is already resolved (with the GIL).
struct Req {
    path: PathBuf,
    target: Target,
    offset: u64,
    size: Option<u64>,
    out_offset: u64,
}

/// What a submitted batch holds until it is reaped: the destinations' registrations and buffer
/// exports (the loader keeps the regions themselves alive).
struct Held {
    _targets: Vec<Target>,
}

/// Refuses what cannot be read in bounded time (a FIFO would block the open, a character device
/// has no length) before the loader opens `path`.
fn openable(path: &Path) -> Result<(), JobError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(JobError::NotFound(format!("{}: {e}", path.display())))
        }
        Err(e) => Err(JobError::Load(LoadError::Io { path: path.to_path_buf(), source: e })),
        Ok(m) if !(m.is_file() || m.file_type().is_block_device()) => {
            Err(JobError::Value(format!("{}: not a regular file or block device", path.display())))
        }
        Ok(_) => Ok(()),
    }
}

/// Opens the distinct paths of `reqs` as one data set (the `io` mode judges them together).
fn open_all(engine: &peermem_loader::Loader, reqs: &[Req]) -> Result<Vec<Source>, JobError> {
    let mut paths: Vec<&Path> = Vec::new();
    for r in reqs {
        if !paths.contains(&r.path.as_path()) {
            openable(&r.path)?;
            paths.push(&r.path);
        }
    }
    engine.open_many(&paths).map_err(JobError::Load)
}

/// Checks every read's range and room, opens the files (one handle per distinct path) and
/// submits them as one batch. No GIL needed.
fn submit(engine: &peermem_loader::Loader, reqs: Vec<Req>) -> Result<(Ticket, Held), JobError> {
    let mut batch = Batch::new();
    let files = open_all(engine, &reqs)?;
    for r in &reqs {
        let Some(fh) = files.iter().find(|f| f.path() == Some(r.path.as_path())).cloned() else {
            return Err(JobError::Value(format!("{}: not opened", r.path.display())));
        };
        let len = fh.len();
        if r.offset > len {
            return Err(JobError::Value(format!(
                "offset {} is past the end of {} ({len} bytes)",
                r.offset,
                r.path.display()
            )));
        }
        let size = r.size.unwrap_or(len - r.offset);
        r.offset.checked_add(size).filter(|&e| e <= len && size > 0).ok_or_else(|| {
            JobError::Value(format!(
                "range {}+{size} is empty or runs past the end of {} ({len} bytes)",
                r.offset,
                r.path.display()
            ))
        })?;
        let room = r.target.nbytes;
        if r.out_offset.checked_add(size).is_none_or(|e| e > room) {
            return Err(JobError::Value(format!(
                "{size} bytes at out_offset {} do not fit the {room}-byte destination",
                r.out_offset
            )));
        }
        let dest = r.target.dest(engine).map_err(JobError::Load)?;
        batch.read(&fh, r.offset, size, dest, r.target.at + r.out_offset);
    }
    let ticket = engine.submit(batch).map_err(JobError::Load)?;
    Ok((ticket, Held { _targets: reqs.into_iter().map(|r| r.target).collect() }))
}

/// A ticket not yet reaped and what its batch holds.
struct Pending {
    ticket: Ticket,
    held: Held,
}

/// Where a future's batch stands.
enum State {
    Pending(Pending),
    /// The outcome is known; the first thread holding the GIL turns it into the cached result.
    Reaped(Result<LoadReport, LoadError>, Held),
    /// The cached result holds the outcome (or the submit failed).
    Settled,
}

/// A pending `Loader.pread`: `result()` waits for the report (or raises the load's error).
#[pyclass(module = "peermem", frozen)]
pub struct Future {
    /// Locked with the GIL released (a waiter holds it across its wait), or with `try_lock`.
    state: Mutex<State>,
    /// The result once settled; locked only briefly, with the GIL held.
    outcome: Mutex<Option<PyResult<Py<Report>>>>,
}

impl Future {
    fn cached(&self, py: Python<'_>) -> PyResult<Option<PyResult<Py<Report>>>> {
        let o = self.outcome.lock().map_err(peermem_err)?;
        Ok(o.as_ref().map(|r| r.as_ref().map(|r| r.clone_ref(py)).map_err(|e| e.clone_ref(py))))
    }

    /// With the GIL held: the result, settling a reaped outcome first (and letting go of what
    /// the batch held). None while the batch is pending, or while another thread holds the
    /// state (`try_lock`: a waiter holds it without the GIL, so this never blocks on it).
    fn collect(&self, py: Python<'_>) -> PyResult<Option<PyResult<Py<Report>>>> {
        if let Some(r) = self.cached(py)? {
            return Ok(Some(r));
        }
        let guard = match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let reaped = guard.and_then(|mut st| match std::mem::replace(&mut *st, State::Settled) {
            State::Reaped(out, held) => Some((out, held)),
            other => {
                *st = other;
                None
            }
        });
        let Some((out, held)) = reaped else { return Ok(None) };
        let r = out.map_err(load_err).and_then(|rep| Py::new(py, Report::new(rep)));
        drop(held);
        let mut o = self.outcome.lock().map_err(peermem_err)?;
        let r = o.get_or_insert(r);
        Ok(Some(r.as_ref().map(|r| r.clone_ref(py)).map_err(|e| e.clone_ref(py))))
    }

    /// Waits for the batch with the GIL released: at most `limit`, or the loader's own bound
    /// on a batch when None. True when the outcome is known.
    fn wait(&self, py: Python<'_>, limit: Option<Duration>) -> bool {
        py.detach(|| {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Pending { mut ticket, held } = match std::mem::replace(&mut *st, State::Settled) {
                State::Pending(p) => p,
                other => {
                    *st = other;
                    return true;
                }
            };
            let (next, known) = match limit {
                None => (State::Reaped(ticket.wait(), held), true),
                Some(l) => match ticket.wait_timeout(l) {
                    Some(out) => (State::Reaped(out, held), true),
                    None => (State::Pending(Pending { ticket, held }), false),
                },
            };
            *st = next;
            known
        })
    }
}

#[pymethods]
impl Future {
    /// True when the load finished (successfully or not).
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        if self.collect(py)?.is_some() {
            return Ok(true);
        }
        py.detach(|| {
            // Another thread waiting holds the state: not known to be done yet.
            if let Ok(mut st) = self.state.try_lock() {
                if let State::Pending(p) = &mut *st {
                    if let Some(out) = p.ticket.try_wait() {
                        if let State::Pending(p) = std::mem::replace(&mut *st, State::Settled) {
                            *st = State::Reaped(out, p.held);
                        }
                    }
                }
            }
        });
        Ok(self.collect(py)?.is_some())
    }

    /// The load's `Report`; raises its error. Waits at most `timeout` seconds, then raises
    /// `TimeoutError` (the load goes on); `None` waits as long as the loader's own bound on a
    /// batch (then `PeerMemError`). The GIL is released while waiting; a second thread asking
    /// at the same time waits for the first one's wait.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<Report>> {
        let limit = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(format!("timeout {t}: must be >= 0 and finite")))
            }
            Some(t) => Some(Duration::from_secs_f64(t.min(1e9))),
            None => None,
        };
        if let Some(r) = self.collect(py)? {
            return r;
        }
        if !self.wait(py, limit) {
            return Err(PyTimeoutError::new_err(format!(
                "the load did not finish within {} s",
                timeout.unwrap_or(0.0)
            )));
        }
        // Known: settled here, or by a thread that holds the state only briefly now.
        loop {
            if let Some(r) = self.collect(py)? {
                return r;
            }
            py.detach(|| drop(self.state.lock()));
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("<peermem.Future {}>", if self.done(py)? { "done" } else { "pending" }))
    }
}

/// Loads byte ranges of files and block devices into buffers, directly when the route allows
/// (O_DIRECT into the destination's pages), else through the loader's staging buffers.
#[pyclass(module = "peermem", frozen)]
pub struct Loader {
    opts: Options,
    /// Started on first use; `close` waits for its batches and stops it.
    engine: Mutex<Option<Arc<peermem_loader::Loader>>>,
}

impl Loader {
    fn engine(&self) -> PyResult<Arc<peermem_loader::Loader>> {
        let mut e = self.engine.lock().map_err(peermem_err)?;
        if let Some(l) = e.as_ref() {
            return Ok(l.clone());
        }
        let l = Arc::new(peermem_loader::Loader::new(registry()?, self.opts.clone()).map_err(load_err)?);
        *e = Some(l.clone());
        Ok(l)
    }

    /// One read; `offset`, `size` and `out_offset` as Python gave them (None: 0, to the end, 0),
    /// each checked by name.
    fn req(
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: Option<&Bound<'_, PyAny>>,
        size: Option<&Bound<'_, PyAny>>,
        out_offset: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Req> {
        let offset = args::int_or(offset, "offset", 0, u64::MAX, 0)?;
        let size = args::opt_int(size, "size", 1, u64::MAX)?;
        let out_offset = args::int_or(out_offset, "out_offset", 0, u64::MAX, 0)?;
        Ok(Req { path, target: Target::from_py(out, "out")?, offset, size, out_offset })
    }

    /// Reads given as `(path, out, offset, size, out_offset)` tuples (trailing items optional).
    fn reqs(reads: &Bound<'_, PyAny>) -> PyResult<Vec<Req>> {
        let mut v = Vec::new();
        for item in reads.try_iter()? {
            let item = item?;
            let t = item
                .cast::<pyo3::types::PyTuple>()
                .map_err(|_| PyValueError::new_err("reads: tuples of (path, out[, offset[, size[, out_offset]]])"))?;
            if !(2..=5).contains(&t.len()) {
                return Err(PyValueError::new_err(format!(
                    "reads: a tuple of {} items; (path, out[, offset[, size[, out_offset]]])",
                    t.len()
                )));
            }
            let get = |i: usize| t.get_item(i).ok();
            let path: PathBuf = t.get_item(0)?.extract()?;
            v.push(Loader::req(path, &t.get_item(1)?, get(2).as_ref(), get(3).as_ref(), get(4).as_ref())?);
        }
        if v.is_empty() {
            return Err(PyValueError::new_err("reads: at least one"));
        }
        Ok(v)
    }

    fn run(&self, py: Python<'_>, reqs: Vec<Req>) -> PyResult<Report> {
        let engine = self.engine()?;
        let r = py.detach(move || {
            let (ticket, held) = submit(&engine, reqs)?;
            let r = ticket.wait().map(Report::new).map_err(JobError::Load);
            drop(held);
            r
        });
        r.map_err(JobError::into_py)
    }

    fn start(&self, py: Python<'_>, reqs: Vec<Req>) -> PyResult<Future> {
        let engine = self.engine()?;
        Ok(match py.detach(move || submit(&engine, reqs)) {
            Ok((ticket, held)) => {
                Future { state: Mutex::new(State::Pending(Pending { ticket, held })), outcome: Mutex::new(None) }
            }
            Err(e) => Future { state: Mutex::new(State::Settled), outcome: Mutex::new(Some(Err(e.into_py()))) },
        })
    }
}

#[pymethods]
impl Loader {
    /// `strict`: raise `NotDirectError` instead of bouncing, before any byte moves. `verify`:
    /// hash the destination and re-read the source to compare. `chunk`: bytes per request (a
    /// multiple of 4096). `depth`: requests in flight. `workers`: accepted for compatibility
    /// (1 to 1024); the loader's one I/O engine keeps `depth` requests in flight for all loads.
    /// `gds`: read into CUDA memory through GPUDirect Storage (cuFile) where it can (default),
    /// or never. Every setting starts from its `PEERMEM_*` variable (`Options::from_env`); an
    /// argument given (not None) wins.
    #[new]
    #[pyo3(signature = (strict=None, verify=None, chunk=None, depth=None, workers=None, io=None, gds=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        strict: Option<&Bound<'_, PyAny>>,
        verify: Option<&Bound<'_, PyAny>>,
        chunk: Option<&Bound<'_, PyAny>>,
        depth: Option<&Bound<'_, PyAny>>,
        workers: Option<&Bound<'_, PyAny>>,
        io: Option<&Bound<'_, PyAny>>,
        gds: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Loader> {
        let gds = args::opt_flag(gds, "gds")?;
        let strict = args::opt_flag(strict, "strict")?;
        let verify = args::opt_flag(verify, "verify")?;
        let chunk = args::opt_int(chunk, "chunk", 4096, 1 << 30)?;
        if let Some(c) = chunk.filter(|c| c % 4096 != 0) {
            return Err(PyValueError::new_err(format!("chunk must be a multiple of 4096 (got {c})")));
        }
        let depth = args::opt_int(depth, "depth", 1, 1024)?;
        args::opt_int(workers, "workers", 1, 1024)?;
        let io = args::opt_io(io)?;
        let env = Options::from_env().map_err(load_err)?;
        let opts = Options {
            io: io.unwrap_or(env.io),
            strict: strict.unwrap_or(env.strict),
            verify: verify.map_or(env.verify, |v| if v { Verify::Reread } else { Verify::Off }),
            chunk: chunk.unwrap_or(env.chunk),
            depth: depth.map_or(env.depth, |d| d as usize),
            gds: gds.unwrap_or(env.gds),
            ..env
        };
        opts.check().map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Loader { opts, engine: Mutex::new(None) })
    }

    /// Loads `size` bytes (default: to the end) at `offset` of the file or block device `path`
    /// into `out` at `out_offset`. The GIL is released while bytes move.
    #[pyo3(signature = (path, out, offset=None, size=None, out_offset=None), text_signature = "(self, path, out, offset=0, size=None, out_offset=0)")]
    fn read(
        &self,
        py: Python<'_>,
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: Option<&Bound<'_, PyAny>>,
        size: Option<&Bound<'_, PyAny>>,
        out_offset: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Report> {
        let req = Loader::req(path, out, offset, size, out_offset)?;
        self.run(py, vec![req])
    }

    /// As `read`, submitted to the loader's queue: returns a `Future` at once. File and range
    /// errors are raised by `result()`.
    #[pyo3(signature = (path, out, offset=None, size=None, out_offset=None), text_signature = "(self, path, out, offset=0, size=None, out_offset=0)")]
    fn pread(
        &self,
        py: Python<'_>,
        path: PathBuf,
        out: &Bound<'_, PyAny>,
        offset: Option<&Bound<'_, PyAny>>,
        size: Option<&Bound<'_, PyAny>>,
        out_offset: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Future> {
        let req = Loader::req(path, out, offset, size, out_offset)?;
        self.start(py, vec![req])
    }

    /// Many reads as one batch, all in flight together (`depth` requests deep): `reads` is an
    /// iterable of `(path, out, offset=0, size=None, out_offset=0)` tuples. One `Report` for the
    /// batch (route and method of the first destination; `direct` for all).
    fn read_batch(&self, py: Python<'_>, reads: &Bound<'_, PyAny>) -> PyResult<Report> {
        let reqs = Loader::reqs(reads)?;
        self.run(py, reqs)
    }

    /// As `read_batch`, returning a `Future` at once.
    fn pread_batch(&self, py: Python<'_>, reads: &Bound<'_, PyAny>) -> PyResult<Future> {
        let reqs = Loader::reqs(reads)?;
        self.start(py, reqs)
    }

    /// Waits for queued loads to finish (each bounded) and stops the loader's thread (also done
    /// when the loader is garbage-collected). A later load starts a new one.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let e = self.engine.lock().map_err(peermem_err)?.take();
        // The last holder joins the loader's thread; a finishing load may need the GIL to
        // release a buffer export, so never join with it held.
        py.detach(move || drop(e));
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

impl Drop for Loader {
    fn drop(&mut self) {
        let e = self.engine.get_mut().map(Option::take).unwrap_or_else(|p| p.into_inner().take());
        if e.is_some() {
            // Dropped by the garbage collector with the GIL held: join the loader's thread with
            // it released (see `close`).
            Python::attach(|py| py.detach(move || drop(e)));
        }
    }
}
