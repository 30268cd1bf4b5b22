//! The two I/O engines behind a `Loader`: io_uring (reads straight into mapped memory, through
//! fixed buffers where registered) and a pool of `preadv` threads (when io_uring is unavailable
//! or not wanted). Both take tagged reads and hand back tagged completions with bounded waits.
//!
//! Owns: keeping every buffer a read targets alive until its completion is handed back (the
//! ring holds them; a pool thread holds its read's), and the fixed-buffer set while registered. Must not: plan or split reads (the engine does).

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use peermem::{PeerMemory, Side};

use crate::error::LoadError;
use crate::source::KernelSource;
use crate::sys::Ring;

/// One read: `len` bytes of `file` at `off` into `mem` at `mem_off`.
#[derive(Clone)]
pub(crate) struct IoReq {
    pub file: Arc<KernelSource>,
    pub off: u64,
    pub mem: Arc<dyn PeerMemory>,
    pub mem_off: u64,
    pub len: u64,
    /// Index of the fixed buffer holding `mem` (io_uring), and `mem_off` relative to it.
    pub fixed: Option<u16>,
}

/// A completion: bytes read, or the OS error.
pub(crate) type Done = (u64, io::Result<usize>);

pub(crate) enum Io {
    Uring(Box<Ring>),
    Pool(Pool),
}

impl Io {
    pub(crate) fn uring(depth: usize) -> io::Result<Io> {
        Ok(Io::Uring(Box::new(Ring::new(depth as u32)?)))
    }

    pub(crate) fn pool(depth: usize) -> Io {
        Io::Pool(Pool::new(depth))
    }

    pub(crate) fn is_uring(&self) -> bool {
        matches!(self, Io::Uring(_))
    }

    /// Registers whole host regions as fixed buffers (io_uring only); index = position. Kept
    /// (and the regions held) until a different set is registered or the loader closes.
    pub(crate) fn register(&mut self, bufs: Vec<Arc<dyn PeerMemory>>) -> Result<(), String> {
        let Io::Uring(ring) = self else { return Err("the preadv pool has no fixed buffers".into()) };
        if ring.is_registered(&bufs) {
            return Ok(());
        }
        ring.register(bufs).map_err(|e| format!("io_uring buffer registration: {e}"))
    }

    /// Drops the fixed-buffer set when nothing is in flight.
    pub(crate) fn unregister(&mut self) {
        if let Io::Uring(ring) = self {
            if let Err(e) = ring.unregister() {
                tracing::debug!(%e, "io_uring: fixed buffers kept");
            }
        }
    }

    /// Queues a read; `false` when the engine has no room (nothing queued). The engine holds
    /// the read's memory and file until its completion comes back from `wait`.
    pub(crate) fn push(&mut self, tag: u64, req: IoReq) -> Result<bool, LoadError> {
        match self {
            Io::Uring(ring) => Ok(ring.push(tag, req)?),
            Io::Pool(p) => {
                p.jobs.as_ref().ok_or(LoadError::Closed)?.send((tag, req)).map_err(|_| LoadError::Closed)?;
                Ok(true)
            }
        }
    }

    /// Submits what was queued and collects completions, waiting at most `timeout` for the
    /// first one (none: the wait timed out).
    pub(crate) fn wait(&mut self, out: &mut Vec<Done>, timeout: Duration) -> Result<(), LoadError> {
        match self {
            Io::Uring(ring) => {
                ring.wait(1, timeout, out).map_err(|e| LoadError::Engine(format!("io_uring_enter: {e}")))
            }
            Io::Pool(p) => {
                match p.done.recv_timeout(timeout) {
                    Ok(d) => out.push(d),
                    Err(RecvTimeoutError::Timeout) => return Ok(()),
                    Err(RecvTimeoutError::Disconnected) => return Err(LoadError::Closed),
                }
                out.extend(p.done.try_iter());
                Ok(())
            }
        }
    }
}

/// `depth` threads, each taking one read at a time (`preadv` of one iovec into the memory).
pub(crate) struct Pool {
    jobs: Option<Sender<(u64, IoReq)>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(depth: usize) -> Pool {
        let (jobs, rx) = mpsc::channel::<(u64, IoReq)>();
        let (tx, done) = mpsc::channel::<Done>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..depth.max(1))
            .map(|_| {
                let rx = rx.clone();
                let tx = tx.clone();
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((tag, req)) = job else { return };
                    let r = req
                        .mem
                        .span_at(Side::Destination, req.mem_off, req.len)
                        .map_err(io::Error::other)
                        .and_then(|span| peermem_nvme::pread_into(&req.file.file, req.off, span));
                    // The memory and file are released only after the read returned.
                    drop(req);
                    if tx.send((tag, r)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Pool { jobs: Some(jobs), done, threads }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the queue ends every thread after its current read (each read is one bounded
        // syscall on a regular file or block device).
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
