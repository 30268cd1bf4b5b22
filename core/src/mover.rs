//! Moving data when a route may lie: the route integrity probe, and bounce copies through host
//! staging buffers (pipelined, several buffers in flight).
//!
//! Owns: the one move planner (`RouteHealth::decide` over `reachable`: route kind + the
//! initiator's `Reach` + probe + health -> `Decision`, direct or bounce with every reason),
//! `RouteHealth` (per (region, peer): routes a probe proved broken, never trusted again), the
//! canary and its comparison, and `Pipeline`, a two-thread fill/drain copy over page-aligned
//! `HostRegion` staging buffers.
//! Must not: know any device or move bytes itself through a device: the caller supplies the
//! transfers as closures (a backend's DMA, an O_DIRECT read, a CPU copy), so the core stays
//! device-free. A probe that cannot run is reported, never assumed to have passed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::region::{Backing, HostRegion, Provider, RegionError};
use crate::registry::{Entry, RegionId};
use crate::route::{Peer, Route, RouteKind};

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("probe of {region} for {peer:?}: the direct transfer failed: {why}")]
    ProbeTransfer { region: RegionId, peer: Peer, why: String },
    #[error("probe of {region} for {peer:?}: reading the canary back failed: {why}")]
    ProbeReadBack { region: RegionId, peer: Peer, why: String },
    #[error("staging buffer: {0}")]
    Staging(#[from] RegionError),
    #[error("copy at offset {offset:#x}: {stage} failed: {why}")]
    Copy { offset: u64, stage: &'static str, why: String },
    #[error("pipeline: chunk {chunk} and depth {depth} must be non-zero")]
    BadPipeline { chunk: u64, depth: usize },
}

/// Why a route was found broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Byte index of the first wrong byte of the canary, and how many were wrong.
    pub first_mismatch: usize,
    pub mismatched: usize,
    pub canary_len: usize,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the canary came back corrupt: {} of {} bytes wrong, first at byte {}",
            self.mismatched, self.canary_len, self.first_mismatch
        )
    }
}

/// What to do for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The route is direct for this initiator and (if probed) carried the canary intact.
    Direct,
    /// Stage through host memory.
    Bounce(BounceReason),
}

impl Plan {
    pub fn is_direct(&self) -> bool {
        matches!(self, Plan::Direct)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BounceReason {
    /// The initiator cannot reach the region through the registry's route (its kind name, and
    /// why not).
    NotDirect { route: &'static str, why: String },
    /// A probe proved the direct route corrupts data.
    Broken(Broken),
    /// The probe itself could not run (the transfer or the read-back failed).
    ProbeFailed(String),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Direct => write!(f, "direct"),
            Plan::Bounce(BounceReason::NotDirect { route, why }) => {
                write!(f, "bounce through host memory: route {route}: {why}")
            }
            Plan::Bounce(BounceReason::Broken(b)) => {
                write!(f, "bounce through host memory: the direct route is broken ({b})")
            }
            Plan::Bounce(BounceReason::ProbeFailed(e)) => {
                write!(f, "bounce through host memory: the route probe could not run ({e})")
            }
        }
    }
}

/// How an initiator reaches memory, which decides which routes are direct for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A device programmed with an address by a userspace driver (the VFIO NVMe driver): any
    /// route with a DMA address (`bus_addr`, `host_bridge`, `iommu`), or CPU-mapped host pages
    /// (the driver translates or maps them).
    DeviceAddress,
    /// The kernel pins the region's CPU pages for its device (O_DIRECT, `ibv_reg_mr`): host pages,
    /// P2PDMA pages (`p2pmem`), or a host-memory dma-buf with a CPU mapping. A raw BAR mapping
    /// has no pages to pin (EFAULT).
    KernelPages,
    /// The device's kernel driver imports the region's dma-buf (`ibv_reg_dmabuf_mr`).
    DmaBufImport,
}

/// The one answer to "does this transfer go direct?": the plan, the route it rests on, and every
/// reason (the route's, then the planner's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub plan: Plan,
    /// The registry's route kind for the pair.
    pub route: &'static str,
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn is_direct(&self) -> bool {
        self.plan.is_direct()
    }
}

/// Whether `reach` can use a route of kind `route` to reach `entry` directly; `Err` says why not.
/// The only "is this route direct for me?" check of the project.
pub fn reachable(route: &RouteKind, entry: &Entry, reach: Reach) -> Result<(), String> {
    let region = entry.region();
    let mapped = entry.cpu_range().is_some();
    let host_memory = matches!(region.provider(), Provider::Host { .. });
    // Pages the kernel can pin through the CPU mapping: system memory, or P2PDMA pages.
    let pinnable = mapped && (host_memory || matches!(region.backing(), Backing::P2pmem { .. }));
    match (reach, route) {
        (_, RouteKind::Bounce(_)) => Err("no direct path exists for this pair".into()),
        (Reach::DeviceAddress, RouteKind::BusAddr(_) | RouteKind::HostBridge(_) | RouteKind::Iommu(_)) => Ok(()),
        (Reach::DeviceAddress, RouteKind::CpuMapped(_)) if host_memory => Ok(()),
        (Reach::DeviceAddress, RouteKind::KernelImport) if host_memory && mapped => Ok(()),
        (Reach::DeviceAddress, k) => Err(format!("a device cannot be programmed with a {} route", k.name())),
        (Reach::KernelPages, RouteKind::KernelImport) if host_memory && mapped => Ok(()),
        (Reach::KernelPages, RouteKind::KernelImport) => {
            Err("the kernel cannot pin a device dma-buf's pages through its CPU mapping".into())
        }
        (Reach::KernelPages, _) if pinnable => Ok(()),
        (Reach::KernelPages, _) if !mapped => Err("the region has no CPU mapping for the kernel to pin".into()),
        (Reach::KernelPages, _) => {
            Err("the kernel cannot pin a raw BAR mapping (no P2PDMA pages: EFAULT); a userspace driver can reach it"
                .into())
        }
        (Reach::DmaBufImport, RouteKind::KernelImport) => Ok(()),
        (Reach::DmaBufImport, k) => Err(format!("the region is not a dma-buf (route {})", k.name())),
    }
}

/// A canary of `len` bytes for `seed`: no run of equal bytes, and different for every seed, so
/// neither zeroed, stale nor shifted memory passes for it.
pub fn canary(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|i| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) as u8) ^ (i as u8)
        })
        .collect()
}

/// Compares what came back with the canary; `None` when intact.
pub fn compare(canary: &[u8], back: &[u8]) -> Option<Broken> {
    let mut first = None;
    let mut wrong = 0;
    for (i, (a, b)) in canary.iter().zip(back).enumerate() {
        if a != b {
            first.get_or_insert(i);
            wrong += 1;
        }
    }
    wrong += canary.len().abs_diff(back.len());
    if wrong == 0 {
        return None;
    }
    Some(Broken {
        first_mismatch: first.unwrap_or(canary.len().min(back.len())),
        mismatched: wrong,
        canary_len: canary.len(),
    })
}

/// Routes proven broken, per (region, peer). Cheap to share between threads.
#[derive(Debug, Default, Clone)]
pub struct RouteHealth {
    broken: Arc<Mutex<HashMap<(RegionId, Peer), Broken>>>,
}

impl RouteHealth {
    pub fn new() -> RouteHealth {
        RouteHealth::default()
    }

    pub fn broken(&self, region: RegionId, peer: Peer) -> Option<Broken> {
        self.broken.lock().unwrap_or_else(|p| p.into_inner()).get(&(region, peer)).cloned()
    }

    pub fn mark_broken(&self, region: RegionId, peer: Peer, why: Broken) {
        tracing::warn!(%region, ?peer, %why, "route marked broken: falling back to bounce");
        self.broken.lock().unwrap_or_else(|p| p.into_inner()).insert((region, peer), why);
    }

    /// Probes a direct route (see `Probe`). A mismatch marks the route broken. Returns the
    /// comparison (`None`: intact).
    pub fn probe<E: std::fmt::Display>(
        &self,
        region: RegionId,
        peer: Peer,
        probe: Probe<'_, E>,
    ) -> Result<Option<Broken>, MoveError> {
        let transfer = |e: E| MoveError::ProbeTransfer { region, peer, why: e.to_string() };
        let read_back_err = |e: E| MoveError::ProbeReadBack { region, peer, why: e.to_string() };
        let (expected, back) = match probe {
            Probe::Canary { len, write, read_back } => {
                static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let c = canary(len, region_hash(region) ^ n.rotate_left(32) ^ len as u64);
                write(&c).map_err(transfer)?;
                let mut back = vec![0u8; len];
                read_back(&mut back).map_err(read_back_err)?;
                (c, back)
            }
            Probe::Known { expected, poison, transfer: run, read_back } => {
                let complement: Vec<u8> = expected.iter().map(|b| !b).collect();
                poison(&complement).map_err(transfer)?;
                run().map_err(transfer)?;
                let mut back = vec![0u8; expected.len()];
                read_back(&mut back).map_err(read_back_err)?;
                (expected, back)
            }
        };
        let verdict = compare(&expected, &back);
        match &verdict {
            Some(b) => self.mark_broken(region, peer, b.clone()),
            None => tracing::debug!(%region, ?peer, len = expected.len(), "route probe: intact"),
        }
        Ok(verdict)
    }

    /// The one move planner: whether `peer`, reaching memory the way `reach` says, moves data
    /// into `entry` directly, given the registry's `route` for the pair. Bounce when the route
    /// is not direct for this initiator or was proven broken; otherwise, for device memory, probe
    /// it once (when `probe` is given) before trusting it. A probe that cannot run bounces.
    pub fn decide<E: std::fmt::Display>(
        &self,
        route: &Route<'_>,
        entry: &Entry,
        peer: Peer,
        reach: Reach,
        probe: Option<Probe<'_, E>>,
    ) -> Decision {
        let mut reasons = route.reasons();
        let plan = self.plan_inner(route, entry, peer, reach, probe, &mut reasons);
        reasons.push(format!("plan: {plan}"));
        Decision { plan, route: route.kind.name(), reasons }
    }

    fn plan_inner<E: std::fmt::Display>(
        &self,
        route: &Route<'_>,
        entry: &Entry,
        peer: Peer,
        reach: Reach,
        probe: Option<Probe<'_, E>>,
        reasons: &mut Vec<String>,
    ) -> Plan {
        if let Err(why) = reachable(&route.kind, entry, reach) {
            return Plan::Bounce(BounceReason::NotDirect { route: route.kind.name(), why });
        }
        let region = entry.id();
        if let Some(b) = self.broken(region, peer) {
            return Plan::Bounce(BounceReason::Broken(b));
        }
        if matches!(entry.provider(), Provider::Host { .. }) {
            return Plan::Direct;
        }
        match probe {
            None => {
                reasons.push("probe: not run by this caller; the route is trusted on the verdict alone".into());
                Plan::Direct
            }
            Some(p) => match (p.len(), self.probe(region, peer, p)) {
                (len, Ok(None)) => {
                    reasons.push(format!("probe: {len} bytes through the direct route arrived intact"));
                    Plan::Direct
                }
                (_, Ok(Some(b))) => Plan::Bounce(BounceReason::Broken(b)),
                (_, Err(e)) => Plan::Bounce(BounceReason::ProbeFailed(e.to_string())),
            },
        }
    }
}

/// A route integrity probe: what the caller moves through the route under test, and how the
/// CPU reads the destination back through a path that does not depend on that route.
pub enum Probe<'a, E> {
    /// Write a fresh canary of `len` bytes through the route (`write`), then read it back.
    Canary { len: usize, write: WriteFn<'a, E>, read_back: ReadFn<'a, E> },
    /// Read-only: the route carries bytes already known by another path (a source's own data,
    /// read through host memory). The destination is first poisoned with their complement, so
    /// stale or untouched memory cannot pass; `transfer` then moves them through the route.
    Known {
        expected: Vec<u8>,
        poison: WriteFn<'a, E>,
        transfer: Box<dyn FnOnce() -> Result<(), E> + 'a>,
        read_back: ReadFn<'a, E>,
    },
}

/// Puts bytes into the destination (through the route under test, or as poison).
pub type WriteFn<'a, E> = Box<dyn FnOnce(&[u8]) -> Result<(), E> + 'a>;
/// Reads the destination back by the CPU.
pub type ReadFn<'a, E> = Box<dyn FnOnce(&mut [u8]) -> Result<(), E> + 'a>;

impl<E> Probe<'_, E> {
    /// Bytes the probe moves.
    pub fn len(&self) -> usize {
        match self {
            Probe::Canary { len, .. } => *len,
            Probe::Known { expected, .. } => expected.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn region_hash(r: RegionId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.hash(&mut h);
    h.finish()
}

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyStats {
    pub bytes: u64,
    pub chunks: u64,
    pub elapsed: Duration,
}

impl CopyStats {
    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Host staging buffers for bounce copies: `depth` page-aligned buffers of `chunk` bytes.
/// Fill (source -> staging) runs on the calling thread while drain (staging -> destination) runs
/// on a second one, so up to `depth` chunks are in flight. With one buffer, or a copy of one
/// chunk, nothing can overlap: the calling thread fills and drains in turn and no thread starts.
#[derive(Debug)]
pub struct Pipeline {
    chunk: u64,
    staging: Vec<Arc<HostRegion>>,
}

/// How long a side spins on the other's progress before it parks (a chunk hand-off between two
/// running threads takes well under a microsecond; parking and waking costs tens). After the
/// first microsecond the spin yields, so a peer sharing this core gets to run.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(20);
const PURE_SPIN: Duration = Duration::from_micros(1);
/// Longest single park: a parked side re-checks progress and the stop flag at least this often.
const PARK_SLICE: Duration = Duration::from_millis(1);

/// One side's progress (chunks completed), as the other side waits on it.
struct Progress {
    done: AtomicU64,
    /// Set by the waiting side just before it parks, so the advancing side knows to unpark it.
    parked: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress { done: AtomicU64::new(0), parked: AtomicBool::new(false) }
    }

    fn get(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Publishes `n` completed chunks and wakes `waiter` if it parked on this progress.
    fn advance(&self, n: u64, waiter: &Thread) {
        self.done.store(n, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            waiter.unpark();
        }
    }

    /// Waits until at least `n` chunks are done (true) or `stop` is set (false): spins briefly,
    /// then parks in bounded slices. The store of `parked` and the re-check of `done` are SeqCst,
    /// pairing with `advance`, so a wake-up is never lost (and a lost one costs one slice).
    fn wait_for(&self, n: u64, stop: &AtomicBool) -> bool {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.get() >= n {
                return true;
            }
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            spins += 1;
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let waited = start.elapsed();
            if waited < PURE_SPIN {
                continue;
            }
            if waited < SPIN_BEFORE_PARK {
                std::thread::yield_now();
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            if self.done.load(Ordering::SeqCst) < n && !stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(PARK_SLICE);
            }
            self.parked.store(false, Ordering::Relaxed);
        }
    }
}

impl Pipeline {
    pub fn new(chunk: u64, depth: usize) -> Result<Pipeline, MoveError> {
        if chunk == 0 || depth == 0 {
            return Err(MoveError::BadPipeline { chunk, depth });
        }
        let staging = (0..depth).map(|_| HostRegion::new(chunk).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        Ok(Pipeline { chunk, staging })
    }

    /// The staging buffers (register them where a device must DMA into or out of them).
    pub fn staging(&self) -> &[Arc<HostRegion>] {
        &self.staging
    }
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Copies `len` bytes: `fill(slot, offset, n)` puts bytes `offset..offset+n` of the source
    /// into staging buffer `slot`; `drain(slot, offset, n)` moves them on to the destination.
    /// Chunk `k` covers bytes `k * chunk..` and uses slot `k % depth`; drains run one at a time,
    /// in offset order. Stops at the first error of either side and returns it (the other side
    /// then stops too, once its current call returns).
    ///
    /// Hand-off: two counters (chunks filled, chunks drained) that each side spins on briefly
    /// and then parks on, so a chunk costs two atomic stores, not a channel message and a
    /// thread wake-up. When every buffer is full and the drain thread is not draining (it has
    /// not been scheduled yet, say), the calling thread drains the oldest chunk itself instead
    /// of waiting for it, so a busy machine degrades the copy to one thread, never to a
    /// scheduler round trip per chunk.
    pub fn run<F, D, E>(&self, len: u64, mut fill: F, mut drain: D) -> Result<CopyStats, MoveError>
    where
        F: FnMut(usize, u64, u64) -> Result<(), E>,
        D: FnMut(usize, u64, u64) -> Result<(), E> + Send,
        E: std::fmt::Display,
    {
        let start = Instant::now();
        let depth = self.staging.len() as u64;
        let chunk = self.chunk;
        let total = len.div_ceil(chunk);
        let piece = |k: u64| (k * chunk, chunk.min(len - k * chunk));
        if depth == 1 || total <= 1 {
            for k in 0..total {
                let (off, n) = piece(k);
                fill(0, off, n).map_err(|e| MoveError::Copy { offset: off, stage: "fill", why: e.to_string() })?;
                drain(0, off, n).map_err(|e| MoveError::Copy { offset: off, stage: "drain", why: e.to_string() })?;
            }
            return Ok(CopyStats { bytes: len, chunks: total, elapsed: start.elapsed() });
        }
        let filled = Progress::new();
        let drained = Progress::new();
        let stop = AtomicBool::new(false);
        // The drain closure and the first drain error, taken by whichever thread drains.
        let drainer_state = Mutex::new((drain, None::<MoveError>));
        let filler = std::thread::current();
        let (filled, drained, stop, state) = (&filled, &drained, &stop, &drainer_state);
        // Drains the oldest filled chunk, if any (the caller holds the state's lock); false when
        // there was none or it failed (then `stop` is set and the error kept).
        let drain_one = move |st: &mut (D, Option<MoveError>), wake: &Thread| -> bool {
            let k = drained.get();
            if k >= total || k >= filled.get() || stop.load(Ordering::Relaxed) {
                return false;
            }
            let (off, n) = piece(k);
            if let Err(e) = (st.0)((k % depth) as usize, off, n) {
                st.1 = Some(MoveError::Copy { offset: off, stage: "drain", why: e.to_string() });
                stop.store(true, Ordering::SeqCst);
                wake.unpark();
                return false;
            }
            drained.advance(k + 1, wake);
            true
        };
        let result = std::thread::scope(|scope| {
            let drainer = scope.spawn(move || loop {
                let k = drained.get();
                if k >= total || stop.load(Ordering::SeqCst) || !filled.wait_for(k + 1, stop) {
                    return;
                }
                let Ok(mut st) = state.lock() else { return };
                drain_one(&mut st, &filler);
            });
            let drain_thread = drainer.thread().clone();
            // Waits until chunk `k - depth` is drained (its slot is free), draining it here when
            // the drain thread is not at it; false once either side has stopped.
            let slot_free = |k: u64| -> bool {
                while k >= depth && drained.get() < k + 1 - depth {
                    match state.try_lock() {
                        Ok(mut st) => {
                            drain_one(&mut st, &drain_thread);
                        }
                        Err(std::sync::TryLockError::WouldBlock) => {
                            drained.wait_for(k + 1 - depth, stop);
                        }
                        Err(std::sync::TryLockError::Poisoned(_)) => stop.store(true, Ordering::SeqCst),
                    }
                    if stop.load(Ordering::SeqCst) {
                        return false;
                    }
                }
                !stop.load(Ordering::SeqCst)
            };
            let mut fill_result = Ok(());
            for k in 0..total {
                if !slot_free(k) {
                    break;
                }
                let (off, n) = piece(k);
                if let Err(e) = fill((k % depth) as usize, off, n) {
                    fill_result = Err(MoveError::Copy { offset: off, stage: "fill", why: e.to_string() });
                    stop.store(true, Ordering::SeqCst);
                    drain_thread.unpark();
                    break;
                }
                filled.advance(k + 1, &drain_thread);
            }
            if fill_result.is_ok() {
                // Help drain the tail too (chunk `total - 1 + depth` does not exist: this waits
                // for every chunk).
                slot_free(total - 1 + depth);
            }
            let joined = drainer.join();
            let drain_error = match state.lock() {
                Ok(mut st) => st.1.take(),
                Err(p) => p.into_inner().1.take(),
            };
            fill_result?;
            if let Some(e) = drain_error {
                return Err(e);
            }
            if joined.is_err() {
                return Err(MoveError::Copy { offset: 0, stage: "drain", why: "the drain thread panicked".into() });
            }
            Ok(())
        });
        result?;
        Ok(CopyStats { bytes: len, chunks: total, elapsed: start.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Bdf;
    use crate::route::BounceWhy;
    use crate::{BarRegion, PeerMemory, Registration, Registry};

    fn registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        Registry::new(Arc::new(crate::Topology::discover(root).unwrap()))
    }

    fn rid(n: u64) -> RegionId {
        let reg = registry();
        let keep: Vec<Registration> =
            (0..n).map(|_| reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap()).collect();
        keep.last().unwrap().id()
    }

    fn route(kind: RouteKind) -> Route<'static> {
        Route { kind, len: 4096, cpu_address: None, bus_address: None, verdict: None }
    }

    /// A CMB-sized BAR region of the switch NVMe (device memory: probed before trusted).
    fn bar(reg: &Registry) -> Registration {
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        reg.register(Arc::new(BarRegion { bdf, bar: 2, offset: 0, len: 4096 })).unwrap()
    }

    type Fns<'a> = Probe<'a, String>;

    fn flipping(dest: &std::cell::RefCell<Vec<u8>>, len: usize, at: Option<usize>) -> Fns<'_> {
        Probe::Canary {
            len,
            write: Box::new(move |c: &[u8]| {
                let mut v = c.to_vec();
                if let Some(i) = at {
                    v[i] ^= 0x40;
                }
                *dest.borrow_mut() = v;
                Ok(())
            }),
            read_back: Box::new(move |b: &mut [u8]| {
                b.copy_from_slice(&dest.borrow());
                Ok(())
            }),
        }
    }

    #[test]
    fn canaries_differ_per_seed_and_have_no_runs() {
        let a = canary(4096, 1);
        assert_ne!(a, canary(4096, 2));
        assert!(a.windows(2).filter(|w| w[0] == w[1]).count() < 64);
        assert_eq!(compare(&a, &a), None);
    }

    #[test]
    fn compare_reports_first_and_count_of_wrong_bytes() {
        let a = canary(100, 7);
        let mut b = a.clone();
        b[10] ^= 1;
        b[90] ^= 0xff;
        assert_eq!(compare(&a, &b), Some(Broken { first_mismatch: 10, mismatched: 2, canary_len: 100 }));
        assert_eq!(compare(&a, &a[..50]).unwrap().mismatched, 50);
    }

    #[test]
    fn a_route_that_corrupts_the_canary_is_marked_broken_and_bounced() {
        let reg = registry();
        let g = bar(&reg);
        let h = RouteHealth::new();
        let peer = Peer::Cpu;
        let dest = std::cell::RefCell::new(Vec::new());
        let r = route(RouteKind::BusAddr(crate::BusAddr::new(0x1000)));
        // A "direct path" that flips a bit, as the vIOMMU trap does.
        let d = h.decide(&r, &g, peer, Reach::DeviceAddress, Some(flipping(&dest, 4096, Some(4000))));
        assert!(matches!(&d.plan, Plan::Bounce(BounceReason::Broken(b)) if b.first_mismatch == 4000), "{d:?}");
        assert!(d.reasons.last().unwrap().contains("broken"));
        assert_eq!(d.route, "bus_addr");
        // Remembered: no second probe needed.
        let again = h.decide::<String>(&r, &g, peer, Reach::DeviceAddress, None);
        assert_eq!(again.plan, d.plan);
    }

    #[test]
    fn an_intact_route_goes_direct_and_a_bounce_route_is_never_probed() {
        let reg = registry();
        let g = bar(&reg);
        let h = RouteHealth::new();
        let cell = std::cell::RefCell::new(Vec::new());
        let r = route(RouteKind::BusAddr(crate::BusAddr::new(0)));
        let d = h.decide(&r, &g, Peer::Cpu, Reach::DeviceAddress, Some(flipping(&cell, 512, None)));
        assert_eq!(d.plan, Plan::Direct);
        assert!(d.reasons.iter().any(|s| s.contains("arrived intact")), "{:?}", d.reasons);
        let never: Fns = Probe::Canary {
            len: 512,
            write: Box::new(|_: &[u8]| panic!("probed a bounce route")),
            read_back: Box::new(|_: &mut [u8]| Ok(())),
        };
        let d = h.decide(
            &route(RouteKind::Bounce(BounceWhy::NotSupported)),
            &g,
            Peer::Cpu,
            Reach::DeviceAddress,
            Some(never),
        );
        assert!(matches!(d.plan, Plan::Bounce(BounceReason::NotDirect { route: "bounce", .. })), "{d:?}");
    }

    #[test]
    fn what_is_direct_depends_on_how_the_initiator_reaches_memory() {
        let reg = registry();
        let dev = bar(&reg);
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let va = host.cpu_range().unwrap().start();
        let bus = route(RouteKind::BusAddr(crate::BusAddr::new(0)));
        let cpu = route(RouteKind::CpuMapped(va));
        // A userspace driver programs any DMA address, and host pages.
        assert!(reachable(&bus.kind, &dev, Reach::DeviceAddress).is_ok());
        assert!(reachable(&cpu.kind, &host, Reach::DeviceAddress).is_ok());
        // The kernel pins pages: a raw BAR has none.
        let e = reachable(&bus.kind, &dev, Reach::KernelPages).unwrap_err();
        assert!(e.contains("no CPU mapping"), "{e}");
        assert!(reachable(&cpu.kind, &host, Reach::KernelPages).is_ok());
        // Only a dma-buf is imported.
        assert!(reachable(&cpu.kind, &host, Reach::DmaBufImport).is_err());
        assert!(reachable(&RouteKind::KernelImport, &host, Reach::DmaBufImport).is_ok());
        // A host-memory dma-buf with a CPU mapping is pinned through the mapping.
        assert!(reachable(&RouteKind::KernelImport, &host, Reach::KernelPages).is_ok());
        // P2PDMA pages are pinnable through their mapping (O_DIRECT since Linux 6.2), whatever the route.
        struct P2p(HostRegion);
        impl PeerMemory for P2p {
            fn len(&self) -> u64 {
                self.0.len()
            }
            fn provider(&self) -> Provider {
                Provider::Pci("0000:03:00.0".parse().unwrap())
            }
            fn backing(&self) -> Backing<'_> {
                Backing::P2pmem { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 1 << 20 }
            }
            fn cpu_mapping(&self) -> Option<crate::sys::MappedSpan<'_>> {
                self.0.cpu_mapping()
            }
        }
        let p2p = reg.register(Arc::new(P2p(HostRegion::new(4096).unwrap()))).unwrap();
        let p2p_va = route(RouteKind::CpuMapped(p2p.cpu_range().unwrap().start()));
        assert!(reachable(&p2p_va.kind, &p2p, Reach::KernelPages).is_ok());
        assert!(reachable(&bus.kind, &p2p, Reach::KernelPages).is_ok());
        assert!(reachable(&p2p_va.kind, &p2p, Reach::DeviceAddress).is_err());
        // Host memory needs no probe.
        let d = RouteHealth::new().decide::<String>(&cpu, &host, Peer::Cpu, Reach::KernelPages, None);
        assert_eq!(d.plan, Plan::Direct);
    }

    #[test]
    fn a_probe_that_cannot_run_bounces_with_its_reason() {
        let reg = registry();
        let g = bar(&reg);
        let fails: Fns = Probe::Canary {
            len: 64,
            write: Box::new(|_: &[u8]| Err("EIO".to_string())),
            read_back: Box::new(|_: &mut [u8]| Ok(())),
        };
        let r = route(RouteKind::BusAddr(crate::BusAddr::new(0)));
        let d = RouteHealth::new().decide(&r, &g, Peer::Cpu, Reach::DeviceAddress, Some(fails));
        assert!(matches!(&d.plan, Plan::Bounce(BounceReason::ProbeFailed(e)) if e.contains("EIO")), "{d:?}");
    }

    #[test]
    fn a_failing_probe_transfer_is_an_error_not_a_pass() {
        let h = RouteHealth::new();
        let p: Fns = Probe::Canary {
            len: 64,
            write: Box::new(|_: &[u8]| Err("EIO".to_string())),
            read_back: Box::new(|_: &mut [u8]| Ok(())),
        };
        let e = h.probe(rid(1), Peer::Cpu, p).unwrap_err();
        assert!(matches!(e, MoveError::ProbeTransfer { .. }), "{e}");
    }

    /// The read-only probe poisons the destination first: a route that moves nothing is caught.
    #[test]
    fn a_known_bytes_probe_catches_a_route_that_moves_nothing() {
        let h = RouteHealth::new();
        let dest = std::cell::RefCell::new(vec![0u8; 256]);
        let expected = canary(256, 9);
        let p: Fns = Probe::Known {
            expected: expected.clone(),
            poison: Box::new(|c: &[u8]| {
                dest.borrow_mut().copy_from_slice(c);
                Ok(())
            }),
            transfer: Box::new(|| Ok(())),
            read_back: Box::new(|b: &mut [u8]| {
                b.copy_from_slice(&dest.borrow());
                Ok(())
            }),
        };
        let b = h.probe(rid(1), Peer::Cpu, p).unwrap().expect("nothing moved: every byte wrong");
        assert_eq!(b.mismatched, 256);
        let ok: Fns = Probe::Known {
            expected: expected.clone(),
            poison: Box::new(|_: &[u8]| Ok(())),
            transfer: Box::new(|| {
                dest.borrow_mut().copy_from_slice(&expected);
                Ok(())
            }),
            read_back: Box::new(|b: &mut [u8]| {
                b.copy_from_slice(&dest.borrow());
                Ok(())
            }),
        };
        assert_eq!(h.probe(rid(2), Peer::Cpu, ok).unwrap(), None);
    }

    #[test]
    fn pipelined_copy_moves_every_byte_in_order_of_offsets() {
        let src: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7) as u8).collect();
        let p = Pipeline::new(64 * 1024, 3).unwrap();
        let dst = Mutex::new(vec![0u8; src.len()]);
        let st = p.staging().to_vec();
        let stats = p
            .run(
                src.len() as u64,
                |slot, off, n| st[slot].write_at(0, &src[off as usize..(off + n) as usize]).map_err(|e| e.to_string()),
                |slot, off, n| {
                    let mut d = dst.lock().unwrap();
                    st[slot].read_at(0, &mut d[off as usize..(off + n) as usize]).map_err(|e| e.to_string())
                },
            )
            .unwrap();
        assert_eq!(stats.bytes, src.len() as u64);
        assert_eq!(stats.chunks, 16);
        assert!(*dst.lock().unwrap() == src);
    }

    #[test]
    fn pipeline_drains_every_chunk_once_in_order_from_its_round_robin_slot() {
        for (chunk, depth, len) in [(4096u64, 2usize, 1u64 << 20), (4096, 5, 4096 * 7 + 1), (1 << 16, 4, 3)] {
            let p = Pipeline::new(chunk, depth).unwrap();
            let fills = Mutex::new(Vec::new());
            let drains = Mutex::new(Vec::new());
            let stats = p
                .run(
                    len,
                    |slot, off, n| {
                        fills.lock().unwrap().push((slot, off, n));
                        Ok::<_, String>(())
                    },
                    |slot, off, n| {
                        drains.lock().unwrap().push((slot, off, n));
                        Ok(())
                    },
                )
                .unwrap();
            let want: Vec<(usize, u64, u64)> = (0..len.div_ceil(chunk))
                .map(|k| ((k % depth as u64) as usize, k * chunk, chunk.min(len - k * chunk)))
                .collect();
            assert_eq!(stats.chunks, want.len() as u64);
            assert_eq!(*fills.lock().unwrap(), want);
            assert_eq!(*drains.lock().unwrap(), want);
        }
    }

    #[test]
    fn a_single_buffer_pipeline_fills_and_drains_on_the_calling_thread() {
        let p = Pipeline::new(4096, 1).unwrap();
        let me = std::thread::current().id();
        let order = Mutex::new(Vec::new());
        p.run(
            3 * 4096,
            |_, off, _| {
                assert_eq!(std::thread::current().id(), me);
                order.lock().unwrap().push(("fill", off));
                Ok::<_, String>(())
            },
            |_, off, _| {
                assert_eq!(std::thread::current().id(), me);
                order.lock().unwrap().push(("drain", off));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            [("fill", 0), ("drain", 0), ("fill", 4096), ("drain", 4096), ("fill", 8192), ("drain", 8192)]
        );
    }

    #[test]
    fn pipeline_errors_stop_both_sides() {
        let p = Pipeline::new(4096, 2).unwrap();
        let e = p
            .run(1 << 20, |_, off, _| if off >= 8192 { Err("disk gone") } else { Ok(()) }, |_, _, _| Ok(()))
            .unwrap_err();
        assert!(matches!(e, MoveError::Copy { stage: "fill", offset: 8192, .. }), "{e}");
        let e =
            p.run(1 << 20, |_, _, _| Ok(()), |_, off, _| if off > 0 { Err("gpu gone") } else { Ok(()) }).unwrap_err();
        assert!(matches!(e, MoveError::Copy { stage: "drain", .. }), "{e}");
        assert!(Pipeline::new(0, 1).is_err());
    }
}
