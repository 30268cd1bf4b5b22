//! The namespace engine: a controller owned by the userspace VFIO driver, as the I/O stage sees
//! an engine. Reads pushed are held until the stage waits, then run as NVMe read commands, up to
//! `depth` in flight, each aimed at the address the registry routes for the controller (the
//! destination's, or a registered staging buffer's).
//!
//! Owns: grouping pushed reads into driver transfers. Must not: compute a DMA address (the
//! driver resolves every region through the registry) or hand a buffer back while a command may
//! still write it: the driver returns from every transfer with no command in flight, having
//! disabled the controller first after a timeout or a failure.

use std::sync::Arc;

use peermem::{Entry, Registry};
use peermem_nvme::{Dir, Io};

use crate::error::LoadError;
use crate::source::Source;

/// Reads the stage pushes before it waits, for `depth` in flight: many rounds of the driver's
/// queue (its queue drains once a wait), few enough that bytes land, and the loader's progress
/// shows, well within any wait's bound.
pub(crate) fn window(depth: usize) -> usize {
    (depth * 16).clamp(64, 1024)
}

/// One controller's pending reads.
pub(crate) struct Nvme<'a> {
    source: &'a Source,
    registry: &'a Registry,
    depth: usize,
    /// The namespace's block size (a read's offset becomes its first LBA).
    block: u64,
    pending: Vec<(u64, Arc<Entry>, Io)>,
}

impl<'a> Nvme<'a> {
    pub(crate) fn new(source: &'a Source, registry: &'a Registry, depth: usize, timeout: std::time::Duration) -> Self {
        let block = source.ctrl().map_or(1, |mut c| {
            c.set_timeout(timeout);
            c.namespace().block_size
        });
        Nvme { source, registry, depth, block, pending: Vec::new() }
    }

    /// Queues a read of `len` bytes (whole blocks) at byte `off` of the namespace into `mem` at
    /// `mem_off`; `false` when the window is full.
    pub(crate) fn push(&mut self, tag: u64, off: u64, mem: &Arc<Entry>, mem_off: u64, len: u64) -> bool {
        if self.pending.len() >= window(self.depth) {
            return false;
        }
        self.pending.push((tag, mem.clone(), Io { offset: mem_off, lba: off / self.block, len }));
        true
    }

    /// Runs every pending read, one driver transfer per target region in the order pushed, and
    /// hands back each read's outcome. A failed transfer fails its reads and every later one
    /// (the driver quiesced the controller; nothing is in flight when this returns).
    pub(crate) fn wait(&mut self, out: &mut Vec<(u64, Result<u64, LoadError>)>) -> Result<(), LoadError> {
        let Some(mut ctrl) = self.source.ctrl() else {
            return Err(LoadError::Engine("a namespace read of a file source".into()));
        };
        let mut pending = std::mem::take(&mut self.pending);
        let mut failed: Option<String> = None;
        while !pending.is_empty() {
            let target = pending[0].1.clone();
            let (group, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, e, _)| Arc::ptr_eq(e, &target));
            pending = rest;
            if let Some(why) = &failed {
                out.extend(group.iter().map(|(t, ..)| (*t, Err(LoadError::Engine(why.clone())))));
                continue;
            }
            let ios: Vec<Io> = group.iter().map(|g| g.2).collect();
            match ctrl.transfer_batch_depth(self.registry, Dir::Read, &target, &ios, self.depth) {
                Ok(()) => out.extend(group.iter().map(|(t, _, io)| (*t, Ok(io.len)))),
                Err(e) => {
                    failed = Some(format!("not run: an earlier transfer of the batch failed ({e})"));
                    let mut tags = group.iter().map(|g| g.0);
                    let first = tags.next().expect("a group has a read");
                    out.push((first, Err(e.into())));
                    out.extend(tags.map(|t| (t, Err(LoadError::Engine("not run: its transfer failed".into())))));
                }
            }
        }
        Ok(())
    }
}
