//! The file engines: io_uring (reads straight into mapped memory, through fixed buffers where
//! registered) and a pool of `pread` threads (when io_uring is unavailable or not wanted). Both
//! take tagged reads and hand back tagged completions with bounded waits.
//!
//! Owns: keeping every buffer a read targets alive until its completion is handed back (the ring
//! holds them; a pool thread holds its read's), and the fixed-buffer set while registered. Must
//! not: plan or split reads (the plan stage does).

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use peermem::PeerMemory;

use crate::error::LoadError;
use crate::sys::{Done, Read, Ring};

/// The engine reading files and block devices.
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
        let Io::Uring(ring) = self else { return Err("the pread pool has no fixed buffers".into()) };
        if ring.is_registered(&bufs) {
            return Ok(());
        }
        ring.register(bufs).map_err(|e| format!("io_uring buffer registration: {e}"))
    }

    /// The registered fixed-buffer set, in index order (empty for the pread pool).
    pub(crate) fn fixed(&self) -> &[Arc<dyn PeerMemory>] {
        match self {
            Io::Uring(ring) => ring.fixed(),
            _ => &[],
        }
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
    pub(crate) fn push(&mut self, tag: u64, req: Read) -> Result<bool, LoadError> {
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

/// `depth` threads, each taking one read at a time (`pread` into the memory).
pub(crate) struct Pool {
    jobs: Option<Sender<(u64, Read)>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(depth: usize) -> Pool {
        let (jobs, rx) = mpsc::channel::<(u64, Read)>();
        let (tx, done) = mpsc::channel::<Done>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..depth.max(1))
            .map(|_| {
                let rx = rx.clone();
                let tx = tx.clone();
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((tag, req)) = job else { return };
                    let r = crate::sys::pread_into(&req.file, req.off, &*req.mem, req.mem_off, req.len);
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

/// The file engine `opts.engine` asks for, and in words which one runs and why when it is the
/// fallback.
pub(crate) fn start(opts: &crate::options::Options) -> Result<(Io, String), LoadError> {
    use crate::options::Engine;
    let pool = |why: &str| (Io::pool(opts.depth), format!("pread thread pool ({} threads): {why}", opts.depth));
    Ok(match opts.engine {
        Engine::Pool => pool("asked for"),
        Engine::Uring => (
            Io::uring(opts.depth).map_err(|e| LoadError::Engine(format!("io_uring unavailable: {e}")))?,
            "io_uring".to_string(),
        ),
        Engine::Auto => match Io::uring(opts.depth) {
            Ok(io) => (io, "io_uring".to_string()),
            Err(e) => {
                tracing::warn!(%e, "io_uring unavailable: reading through a pread thread pool");
                pool(&format!("io_uring unavailable: {e}"))
            }
        },
    })
}
