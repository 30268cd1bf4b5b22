//! A posted batch's native side: `_Ticket` (one batch: `done()`, `wait(timeout)`, `outcome()`)
//! and `_Watch` (the pending batches of one engine, waited on together with the GIL released:
//! what the Python `Transfer` futures' waiter thread calls), and the report as a dict.
//!
//! Every wait is bounded and backed off: a ticket's own wait is the engine's (`wait_timeout`, in
//! slices between which signals are checked); a watch looks at all its batches in one engine
//! progress round (`Ticket::try_wait_any`), then sleeps from `PAUSE_MIN` doubling to `PAUSE_MAX`
//! while nothing ends, and looks at once when a batch is added to an idle watch. A batch settled
//! by another thread (its future's `result()`) is discarded from the watch, so that the watching
//! thread never needs the GIL for it.
//!
//! Owns: where a batch stands (pending, or its outcome kept until asked), which batches a watch
//! waits on. Must not: settle the Python futures (the package's `_engine.py` does), or drop an
//! engine ticket with the GIL held (it takes the engine's lock, whose holder may need the GIL).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use peermem_engine::{RailReport, Report, Ticket as EngineTicket};

use crate::args;
use crate::errors::{engine_err, peermem_err};

/// The longest a wait holds on without checking for signals (Ctrl-C).
pub const SLICE: Duration = Duration::from_millis(50);
/// A watch's first pause between looks, and its longest.
const PAUSE_MIN: Duration = Duration::from_micros(20);
const PAUSE_MAX: Duration = Duration::from_micros(500);

/// One rail's report as a dict.
pub fn rail_dict<'py>(py: Python<'py>, r: &RailReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("nic", &r.nic)?;
    d.set_item("remote_nic", &r.remote_nic)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("slices", r.slices)?;
    d.set_item("state", &r.state)?;
    d.set_item("error", &r.error)?;
    Ok(d)
}

/// A batch's report as a dict (the Rust `Report`'s fields).
fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes", r.bytes)?;
    d.set_item("requests", r.requests)?;
    d.set_item("seconds", r.seconds)?;
    let rails = PyList::empty(py);
    for rail in &r.rails {
        rails.append(rail_dict(py, rail)?)?;
    }
    d.set_item("rails", rails)?;
    d.set_item("retries", r.retries)?;
    d.set_item("routes", &r.routes)?;
    d.set_item("notified", r.notified)?;
    Ok(d)
}

/// Where a posted batch stands.
enum State {
    Pending(EngineTicket),
    /// The engine's outcome (the error made without the GIL; raised when asked for).
    Done(Result<Report, PyErr>),
}

impl State {
    fn pending(&self) -> Option<&EngineTicket> {
        match self {
            State::Pending(t) => Some(t),
            State::Done(_) => None,
        }
    }

    /// Settles it with the engine's answer, if it has one; returns the engine ticket, done with
    /// (the engine forgets it when it goes), for the caller to drop once the state is unlocked:
    /// a locked state never waits for the engine's lock.
    #[must_use]
    fn settle(&mut self, answer: Option<Result<Report, peermem_engine::EngineError>>) -> Option<EngineTicket> {
        let out = answer?;
        match std::mem::replace(self, State::Done(out.map_err(engine_err))) {
            State::Pending(t) => Some(t),
            State::Done(_) => None,
        }
    }
}

/// A batch's state, shared by its `_Ticket` and the snapshots a watch takes of it. Locked with
/// the GIL released, for at most one short wait or one look.
struct Cell {
    state: Mutex<State>,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state unless another thread holds it (waiting on the batch: it settles it).
    fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Waits up to `limit` for the batch (GIL released by the caller); settles it when it ended.
    /// True once it has.
    fn wait_for(&self, limit: Duration) -> bool {
        let mut st = self.lock();
        let Some(t) = st.pending() else { return true };
        let answer = t.wait_timeout(limit).transpose();
        let spent = st.settle(answer);
        let ended = st.pending().is_none();
        drop(st);
        drop(spent);
        ended
    }

    /// True once the batch has ended; false too while another thread holds it.
    fn ended(&self) -> bool {
        self.try_lock().is_some_and(|s| s.pending().is_none())
    }

    /// One look at every batch of `cells` that no other thread holds, in one progress round per
    /// engine; true when one of them has ended (now or before).
    fn look_all(cells: &[Arc<Cell>]) -> bool {
        let mut pending = Vec::with_capacity(cells.len());
        let mut any = false;
        for st in cells.iter().filter_map(|c| c.try_lock()) {
            if st.pending().is_some() {
                pending.push(st);
            } else {
                any = true;
            }
        }
        let answers = {
            let tickets: Vec<&EngineTicket> = pending.iter().filter_map(|st| st.pending()).collect();
            EngineTicket::try_wait_any(&tickets)
        };
        let spent: Vec<EngineTicket> =
            pending.iter_mut().zip(answers).filter_map(|(st, answer)| st.settle(answer)).collect();
        drop(pending);
        !spent.is_empty() || any
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        let st = std::mem::replace(
            self.state.get_mut().unwrap_or_else(|p| p.into_inner()),
            State::Done(Err(peermem_err("dropped"))),
        );
        if let State::Pending(t) = st {
            // Possibly dropped with the GIL held: the ticket takes the engine's lock (see the
            // module).
            Python::attach(|py| py.detach(move || drop(t)));
        }
    }
}

/// A posted batch (`_Engine.read` / `_Engine.write`); `peermem.Transfer` is its future.
#[pyclass(module = "peermem._native", name = "_Ticket", frozen)]
pub struct Ticket {
    cell: Arc<Cell>,
}

impl Ticket {
    pub fn new(ticket: EngineTicket) -> Ticket {
        Ticket { cell: Arc::new(Cell { state: Mutex::new(State::Pending(ticket)) }) }
    }
}

#[pymethods]
impl Ticket {
    /// True once the batch has ended, done or failed (makes progress without waiting).
    fn done(&self, py: Python<'_>) -> bool {
        py.detach(|| {
            // A thread waiting on the batch holds the state: it is not known to be over.
            let Some(mut st) = self.cell.try_lock() else { return false };
            let Some(t) = st.pending() else { return true };
            let answer = t.try_wait();
            let spent = st.settle(answer);
            drop(st);
            spent.is_some()
        })
    }

    /// Waits for the batch to end: `timeout` seconds at most, then `TimeoutError` (the batch
    /// goes on); None: as long as the engine's bound on a batch. The GIL is released.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let limit = args::opt_seconds(timeout, "timeout")?;
        if self.cell.ended() {
            // Settled already: no need to give up the GIL (and wait to take it back).
            return Ok(());
        }
        let deadline = limit.map(|l| Instant::now() + l);
        // At least one look at the batch, even with `timeout=0`.
        loop {
            let left = deadline.map_or(SLICE, |d| d.saturating_duration_since(Instant::now()));
            if py.detach(|| self.cell.wait_for(left.min(SLICE))) {
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let secs = limit.unwrap_or_default().as_secs_f64();
                return Err(PyTimeoutError::new_err(format!("the batch did not end within {secs} s")));
            }
            py.check_signals()?;
        }
    }

    /// The ended batch's report as a dict, or its error raised; `PeerMemError` while pending.
    fn outcome<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match &*self.cell.lock() {
            State::Pending(_) => Err(peermem_err("the batch has not ended")),
            State::Done(Ok(r)) => report_dict(py, r),
            State::Done(Err(e)) => Err(e.clone_ref(py)),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("<peermem._Ticket {}>", if self.done(py) { "done" } else { "pending" })
    }
}

/// What a watch holds: its tickets, and what ends a wait early.
#[derive(Default)]
struct Watched {
    tickets: Vec<Py<Ticket>>,
    /// A ticket came: look again at once.
    added: bool,
    /// `wake()`: the wait returns.
    woken: bool,
}

/// The pending batches of one engine, waited on together (`wait`) by one thread.
#[pyclass(module = "peermem._native", name = "_Watch", frozen)]
#[derive(Default)]
pub struct Watch {
    watched: Mutex<Watched>,
    changed: Condvar,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, Watched> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (GIL released) until a watched batch has ended, `wake()` is called or `limit`
    /// passes. A watch with no ticket sleeps until one is added.
    fn wait_ended(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut pause = PAUSE_MIN;
        loop {
            let cells: Vec<Arc<Cell>> = {
                let mut w = self.lock();
                if std::mem::take(&mut w.woken) {
                    return;
                }
                w.added = false;
                w.tickets.iter().map(|t| t.get().cell.clone()).collect()
            };
            if Cell::look_all(&cells) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let nap = if cells.is_empty() { deadline - now } else { pause.min(deadline - now) };
            let w = self.lock();
            let (w, _) =
                self.changed.wait_timeout_while(w, nap, |w| !w.added && !w.woken).unwrap_or_else(|p| p.into_inner());
            pause = if w.added { PAUSE_MIN } else { (pause * 2).min(PAUSE_MAX) };
        }
    }
}

#[pymethods]
impl Watch {
    #[new]
    fn new() -> Watch {
        Watch::default()
    }

    /// Watches `ticket` until it has ended (and `wait` returned it) or is discarded.
    fn add(&self, ticket: Py<Ticket>) {
        let mut w = self.lock();
        // A wait with tickets looks again within `PAUSE_MAX` anyway: only an idle one is woken.
        let idle = w.tickets.is_empty();
        w.tickets.push(ticket);
        w.added = true;
        if idle {
            self.changed.notify_all();
        }
    }

    /// Stops watching `ticket` (its batch was settled by another thread).
    fn discard(&self, ticket: &Bound<'_, Ticket>) {
        let gone: Vec<Py<Ticket>> = {
            let mut w = self.lock();
            let (gone, kept) = std::mem::take(&mut w.tickets).into_iter().partition(|t| t.as_ptr() == ticket.as_ptr());
            w.tickets = kept;
            gone
        };
        // Released with the watch unlocked.
        drop(gone);
    }

    /// Waits up to `timeout` seconds for watched batches to end; returns those that have (no
    /// longer watched), possibly none (the time passed, or `wake()`).
    fn wait(&self, py: Python<'_>, timeout: &Bound<'_, PyAny>) -> PyResult<Vec<Py<Ticket>>> {
        let limit = args::opt_seconds(Some(timeout), "timeout")?.unwrap_or_default();
        py.detach(|| self.wait_ended(limit));
        let mut w = self.lock();
        let (ended, pending) = std::mem::take(&mut w.tickets).into_iter().partition(|t| t.get().cell.ended());
        w.tickets = pending;
        Ok(ended)
    }

    /// Makes the current wait, or the next, return at once.
    fn wake(&self) {
        self.lock().woken = true;
        self.changed.notify_all();
    }

    fn __len__(&self) -> usize {
        self.lock().tickets.len()
    }
}
