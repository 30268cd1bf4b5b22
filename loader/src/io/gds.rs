//! The GPUDirect Storage engine: direct requests into CUDA memory as `cuFileRead` calls, each on
//! one of a few reader threads (cuFile's read is synchronous and takes no timeout), completions
//! back through a channel that the request loop waits on with its bound.
//!
//! Owns: the reader threads and what each read holds. A read holds its file handle and its
//! destination region until cuFile returns, so a batch that gave up waiting (a timeout) frees
//! nothing a storage device may still write: the thread finishes the read, drops them and exits
//! once the engine is gone. Must not: decide that a destination is read through cuFile (the plan
//! stage did) or read into anything but the region the plan named.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peermem_cuda::{CudaRegion, GdsFile};

use super::Done;
use crate::error::LoadError;

/// Reader threads at most: cuFile splits each read across the device's queues itself.
pub(crate) const MAX_READERS: usize = 16;

/// What one destination run is read into through cuFile: the source's handle, the region.
pub(crate) type Target = (Arc<GdsFile>, Arc<CudaRegion>);

struct Job {
    tag: u64,
    file: Arc<GdsFile>,
    region: Arc<CudaRegion>,
    doff: u64,
    off: u64,
    len: u64,
}

/// The engine of one batch's cuFile requests.
pub(crate) struct Gds {
    /// Per destination run of the batch: its cuFile target, for runs the plan sent to cuFile.
    targets: Vec<Option<Target>>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    readers: usize,
}

/// Reads until the job channel closes; a result nobody waits for any more is dropped.
fn reader(jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Done>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let r = job.file.read(&job.region, job.doff, job.off, job.len).map_err(LoadError::from);
        // The handle and the region are released only now that cuFile returned.
        drop(job.file);
        drop(job.region);
        if done.send((job.tag, r)).is_err() {
            // The batch is gone; later jobs were dropped with it.
            return;
        }
    }
}

impl Gds {
    /// An engine for `targets` with up to `depth` reads in flight.
    pub(crate) fn new(targets: Vec<Option<Target>>, depth: usize) -> Result<Gds, LoadError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let readers = depth.clamp(1, MAX_READERS);
        for i in 0..readers {
            let (rx, tx) = (rx.clone(), done_tx.clone());
            // Not joined: a reader stuck in cuFile past the batch's timeout keeps its memory
            // alive and ends by itself.
            std::thread::Builder::new()
                .name(format!("peermem-gds-{i}"))
                .spawn(move || reader(rx, tx))
                .map_err(|e| LoadError::Engine(format!("spawning a cuFile reader: {e}")))?;
        }
        Ok(Gds { targets, jobs: Some(jobs), done, readers })
    }

    /// Reads in flight at once.
    pub(crate) fn window(&self) -> usize {
        self.readers
    }

    /// Queues `len` bytes at `off` of the file of destination run `dest` into it at `doff`.
    pub(crate) fn push(&mut self, tag: u64, dest: usize, off: u64, doff: u64, len: u64) -> Result<bool, LoadError> {
        let (file, region) = self
            .targets
            .get(dest)
            .and_then(Option::as_ref)
            .ok_or_else(|| LoadError::Engine("a cuFile read for a destination not planned for cuFile".into()))?;
        let job = Job { tag, file: file.clone(), region: region.clone(), doff, off, len };
        let jobs = self.jobs.as_ref().ok_or(LoadError::Closed)?;
        jobs.send(job).map_err(|_| LoadError::Engine("the cuFile readers are gone".into()))?;
        Ok(true)
    }

    /// Collects completions, waiting at most `timeout` for the first.
    pub(crate) fn wait(&mut self, out: &mut Vec<Done>, timeout: Duration) -> Result<(), LoadError> {
        match self.done.recv_timeout(timeout) {
            Ok(d) => out.push(d),
            Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => return Err(LoadError::Engine("the cuFile readers are gone".into())),
        }
        out.extend(self.done.try_iter());
        Ok(())
    }
}

impl Drop for Gds {
    fn drop(&mut self) {
        // Closing the channel ends each reader after its current read.
        self.jobs.take();
    }
}
