//! The I/O stage: a batch's requests kept `depth` deep in an engine (files: io_uring or a
//! thread pool; a namespace: the VFIO driver; CUDA memory the plan sent to GPUDirect Storage:
//! cuFile readers), direct requests landing in their destination,
//! staged ones in a staging buffer that is copied on once all of its parts arrived (by the CPU,
//! or by the GPU for device-local memory) on a copy thread, so reads keep flowing meanwhile.
//!
//! Owns: the request loop, staging-buffer hand-out and return, short-read continuation, and
//! counting what landed. Must not: plan (the plan stage did) or give a staging buffer back
//! while a read into it may still be in flight.

pub(crate) mod files;
pub(crate) mod gds;
pub(crate) mod nvme;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use peermem::{Entry, PeerMemory};

use crate::batch::Read;
use crate::error::LoadError;
use crate::plan::{Group, Req, Target};
use crate::source::Source;
use crate::stage::{drain, Sink, Slot};

/// A completion: the request's tag, and the bytes that arrived or why none did.
type Done = (u64, Result<u64, LoadError>);

/// Memory a request lands in: the region, and its registry entry (which the VFIO driver needs).
#[derive(Clone, Copy)]
struct Mem<'a> {
    region: &'a Arc<dyn PeerMemory>,
    entry: Option<&'a Arc<Entry>>,
}

/// The engine one group of a batch's requests runs in.
pub(crate) enum Engine<'a> {
    Files(&'a mut files::Io),
    Nvme(nvme::Nvme<'a>),
    Gds(gds::Gds),
}

impl Engine<'_> {
    /// Requests in flight at once.
    fn window(&self, depth: usize) -> usize {
        match self {
            Engine::Files(_) => depth,
            Engine::Nvme(_) => nvme::window(depth),
            Engine::Gds(g) => g.window(),
        }
    }

    /// Queues request `q` into `mem` at `mem_off` (through fixed buffer `fixed`, files only);
    /// `false` when the engine has no room.
    fn push(
        &mut self,
        tag: u64,
        src: &Source,
        q: &Req,
        mem: Mem<'_>,
        mem_off: u64,
        fixed: Option<u16>,
    ) -> Result<bool, LoadError> {
        match self {
            Engine::Files(io) => {
                let file = src.file().ok_or_else(|| LoadError::Engine("a file read of a namespace".into()))?.clone();
                let mem = mem.region.clone();
                io.push(tag, crate::sys::Read { file, off: q.off, mem, mem_off, len: q.len, fixed })
            }
            Engine::Nvme(n) => {
                let entry = mem
                    .entry
                    .ok_or_else(|| LoadError::Engine("a namespace read into an unregistered buffer".into()))?;
                Ok(n.push(tag, q.off, entry, mem_off, q.len))
            }
            Engine::Gds(g) => match q.target {
                Target::Direct { doff } => g.push(tag, q.dest, q.off, doff, q.len),
                Target::Stage { .. } => Err(LoadError::Engine("a staged request given to cuFile".into())),
            },
        }
    }

    /// Collects completions, waiting at most `timeout` for the first (none: the wait timed out).
    fn wait(&mut self, out: &mut Vec<Done>, timeout: Duration, path: impl Fn(u64) -> PathBuf) -> Result<(), LoadError> {
        match self {
            Engine::Files(io) => {
                let mut done = Vec::new();
                io.wait(&mut done, timeout)?;
                out.extend(done.into_iter().map(|(tag, r)| {
                    (tag, r.map(|n| n as u64).map_err(|source| LoadError::Io { path: path(tag), source }))
                }));
                Ok(())
            }
            Engine::Nvme(n) => n.wait(out),
            Engine::Gds(g) => g.wait(out, timeout),
        }
    }
}

/// What the loop reads from: the batch, where each destination's bytes go, the staging buffers.
pub(crate) struct Flow<'a> {
    pub reads: &'a [Read],
    /// Per destination run: the registered destination (direct requests), its sink (staged
    /// copies), its staging pool, and its fixed buffer index (io_uring) for direct requests.
    pub entries: Vec<&'a Arc<Entry>>,
    pub sinks: Vec<Sink<'a>>,
    pub dest_pool: Vec<usize>,
    pub dest_fixed: Vec<Option<u16>>,
    /// Staging pools (0: the CPU pool), and the fixed buffer index of each one's first buffer.
    pub pools: Vec<&'a [Slot]>,
    pub pool_fixed: Vec<Option<u16>>,
    pub depth: usize,
    pub timeout: Duration,
    /// Bytes landed in destinations, for the loader's progress.
    pub progress: &'a AtomicU64,
}

/// What one run of the loop did.
pub(crate) struct Ended {
    /// Per destination run: bytes that went direct, and through staging.
    pub moved: Vec<(u64, u64)>,
    /// Pools with reads still in flight (after a failure): they must take no new reads.
    pub abandoned: Vec<usize>,
    pub error: Option<LoadError>,
}

/// A copy out of staging buffer `slot` of pool `pool` into destination run `dest`.
struct Drain {
    dest: usize,
    pool: usize,
    slot: usize,
    skip: u64,
    doff: u64,
    n: u64,
}

type Copied = (Drain, Result<(), LoadError>);

/// The loop's state.
struct Loop<'a, 'f> {
    flow: &'f Flow<'a>,
    queue: std::collections::VecDeque<Req>,
    groups: &'f mut [Group],
    free: Vec<Vec<usize>>,
    flights: HashMap<u64, Req>,
    moved: Vec<(u64, u64)>,
    copying: usize,
    failed: Option<LoadError>,
}

/// Runs `queue` (requests of `flow.reads`, groups in `groups`) through `engine` until every
/// request landed or one failed; `tags` numbers requests across batches (a late completion of
/// an abandoned batch is recognised and ignored).
pub(crate) fn run(
    engine: &mut Engine<'_>,
    flow: &Flow<'_>,
    queue: std::collections::VecDeque<Req>,
    groups: &mut [Group],
    tags: &mut u64,
) -> Ended {
    let free = flow.pools.iter().map(|p| (0..p.len()).rev().collect()).collect();
    let mut l = Loop {
        flow,
        queue,
        groups,
        free,
        flights: HashMap::new(),
        moved: vec![(0, 0); flow.sinks.len()],
        copying: 0,
        failed: None,
    };
    let staged = l.queue.iter().any(|q| matches!(q.target, Target::Stage { .. }));
    let (copy_tx, copy_rx) = mpsc::channel::<Drain>();
    let (back_tx, back_rx) = mpsc::channel::<Copied>();
    std::thread::scope(|sc| {
        if staged {
            sc.spawn(move || {
                for c in copy_rx {
                    let r = drain(&flow.pools[c.pool][c.slot], c.skip, &flow.sinks[c.dest], c.doff, c.n);
                    if back_tx.send((c, r)).is_err() {
                        return;
                    }
                }
            });
        } else {
            drop((copy_rx, back_tx));
        }
        l.turn_until_done(engine, tags, &copy_tx, &back_rx);
        // Ends the copy thread after its last copy (a CPU copy, or a GPU copy bounded by the
        // device's copy timeout).
        drop(copy_tx);
    });
    let mut abandoned: Vec<usize> = l
        .flights
        .values()
        .filter_map(|q| match q.target {
            Target::Stage { .. } => Some(flow.dest_pool[q.dest]),
            Target::Direct { .. } => None,
        })
        .collect();
    abandoned.sort_unstable();
    abandoned.dedup();
    Ended { moved: l.moved, abandoned, error: l.failed }
}

impl Loop<'_, '_> {
    fn turn_until_done(
        &mut self,
        engine: &mut Engine<'_>,
        tags: &mut u64,
        copy: &Sender<Drain>,
        back: &Receiver<Copied>,
    ) {
        let mut done: Vec<Done> = Vec::new();
        loop {
            self.fill(engine, tags);
            if self.flights.is_empty() && self.copying == 0 && (self.queue.is_empty() || self.failed.is_some()) {
                return;
            }
            // Reap reads, or (none in flight) wait for a copy to give its buffer back.
            done.clear();
            let mut copied: Vec<Copied> = Vec::new();
            let t = self.flow.timeout;
            let timeout = |what| LoadError::Timeout { what, ms: t.as_millis() };
            if self.flights.is_empty() {
                match back.recv_timeout(t) {
                    Ok(c) => copied.push(c),
                    Err(_) => {
                        self.failed.get_or_insert(timeout("copies out of staging"));
                        return;
                    }
                }
            } else {
                let (flights, reads) = (&self.flights, self.flow.reads);
                let path = |tag| {
                    flights.get(&tag).and_then(|q| reads[q.read].source.path().map(PathBuf::from)).unwrap_or_default()
                };
                if let Err(e) = engine.wait(&mut done, t, path) {
                    self.failed.get_or_insert(e);
                    return;
                }
                if done.is_empty() {
                    self.failed.get_or_insert(timeout("reads in flight"));
                    return;
                }
            }
            copied.extend(back.try_iter());
            for (c, r) in copied {
                self.copying -= 1;
                self.free[c.pool].push(c.slot);
                match r {
                    Ok(()) => self.landed(c.dest, 0, c.n),
                    Err(e) => {
                        self.failed.get_or_insert(e);
                    }
                }
            }
            for (tag, res) in done.drain(..) {
                // A read of an earlier, abandoned batch: the engine held its memory until now.
                let Some(q) = self.flights.remove(&tag) else { continue };
                if let Err(e) = self.complete(q, res, copy) {
                    self.failed.get_or_insert(e);
                }
            }
        }
    }

    fn landed(&mut self, dest: usize, direct: u64, staged: u64) {
        self.moved[dest].0 += direct;
        self.moved[dest].1 += staged;
        self.flow.progress.fetch_add(direct + staged, Ordering::Relaxed);
    }

    /// Pushes requests while the engine has room, there is a staging buffer for each staged one
    /// and nothing failed.
    fn fill(&mut self, engine: &mut Engine<'_>, tags: &mut u64) {
        let flow = self.flow;
        while self.failed.is_none() && self.flights.len() < engine.window(flow.depth) {
            let Some(&q) = self.queue.front() else { return };
            let (mem, mem_off, fixed) = match q.target {
                Target::Direct { doff } => {
                    let entry = flow.entries[q.dest];
                    (Mem { region: entry.region(), entry: Some(entry) }, doff, flow.dest_fixed[q.dest])
                }
                Target::Stage { group, at } => {
                    let pool = flow.dest_pool[q.dest];
                    let slot = match self.groups[group].slot {
                        Some(s) => s,
                        None => {
                            let Some(s) = self.free[pool].pop() else { return };
                            self.groups[group].slot = Some(s);
                            s
                        }
                    };
                    let s = &flow.pools[pool][slot];
                    (Mem { region: &s.region, entry: s.entry() }, at, flow.pool_fixed[pool].map(|b| b + slot as u16))
                }
            };
            *tags += 1;
            let pushed = engine.push(*tags, &flow.reads[q.read].source, &q, mem, mem_off, fixed);
            if let Target::Stage { group, .. } = q.target {
                match pushed {
                    Ok(true) => self.groups[group].pushed += 1,
                    // Nothing of the group in flight: its buffer goes back.
                    _ if self.groups[group].pushed == 0 => self.give_back(group),
                    _ => {}
                }
            }
            match pushed {
                Ok(true) => {
                    self.queue.pop_front();
                    self.flights.insert(*tags, q);
                }
                Ok(false) => return,
                Err(e) => self.failed = Some(e),
            }
        }
    }

    /// Handles one completion: a short direct read continues; the last part of a staged group
    /// is copied on by the CPU here, or handed to the GPU copy thread.
    fn complete(&mut self, q: Req, res: Result<u64, LoadError>, copy: &Sender<Drain>) -> Result<(), LoadError> {
        let r = &self.flow.reads[q.read];
        let short = |got| LoadError::ShortRead {
            path: r.source.path().map(PathBuf::from).unwrap_or_else(|| r.source.describe().into()),
            offset: q.off,
            got,
            want: q.len,
        };
        let (group, at) = match q.target {
            Target::Direct { doff } => {
                let n = res?;
                if n == 0 {
                    return Err(short(0));
                }
                if n < q.len {
                    let rest = Req { off: q.off + n, len: q.len - n, target: Target::Direct { doff: doff + n }, ..q };
                    self.queue.push_front(rest);
                }
                self.landed(q.dest, n.min(q.len), 0);
                return Ok(());
            }
            Target::Stage { group, at } => (group, at),
        };
        self.groups[group].arrived += 1;
        let g = self.groups[group].clone();
        // Past the end of a file a read may come back short; the wanted bytes may not.
        let arrived = match res {
            Ok(n) if n >= (g.skip + g.n).saturating_sub(at).min(q.len) => Ok(()),
            Ok(n) => Err(short(n)),
            Err(e) => Err(e),
        };
        if let Err(e) = arrived {
            self.release(group);
            return Err(e);
        }
        if g.arrived < g.parts {
            if self.failed.is_some() {
                self.release(group);
            }
            return Ok(());
        }
        // Every part arrived: the copy thread moves the bytes on and gives the buffer back.
        let pool = self.flow.dest_pool[q.dest];
        let slot = g.slot.expect("a staged group holds a buffer");
        self.groups[group].slot = None;
        let c = Drain { dest: q.dest, pool, slot, skip: g.skip, doff: g.doff, n: g.n };
        if copy.send(c).is_err() {
            self.free[pool].push(slot);
            return Err(LoadError::Engine("the copy thread is gone".into()));
        }
        self.copying += 1;
        Ok(())
    }

    /// Gives a group's staging buffer back once nothing of it is in flight any more.
    fn release(&mut self, group: usize) {
        let g = &self.groups[group];
        if g.arrived >= g.pushed {
            self.give_back(group);
        }
    }

    fn give_back(&mut self, group: usize) {
        let pool = self.flow.dest_pool[self.groups[group].dest];
        if let Some(s) = self.groups[group].slot.take() {
            self.free[pool].push(s);
        }
    }
}
