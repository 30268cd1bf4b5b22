//! Moving data when a route may lie: the route integrity probe, and bounce copies through host
//! staging buffers (pipelined, several buffers in flight).
//!
//! Owns: `RouteHealth` (per (region, peer): routes a probe proved broken, never trusted again),
//! the canary and its comparison, `Plan` (direct or bounce, and why), and `Pipeline`, a
//! two-thread fill/drain copy over page-aligned `HostRegion` staging buffers.
//! Must not: know any device or move bytes itself through a device: the caller supplies the
//! transfers as closures (a backend's DMA, an O_DIRECT read, a CPU copy), so the core stays
//! device-free. A probe that cannot run is reported, never assumed to have passed.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::region::{HostRegion, RegionError};
use crate::registry::RegionId;
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
    /// The route is direct and (if probed) carried the canary intact.
    Direct,
    /// Stage through host memory.
    Bounce(BounceReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BounceReason {
    /// The registry's route is not direct (its kind name: `bounce`, `kernel_import`, ...).
    RouteNotDirect(&'static str),
    /// A probe proved the direct route corrupts data.
    Broken(Broken),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Direct => write!(f, "direct (route verified)"),
            Plan::Bounce(BounceReason::RouteNotDirect(k)) => {
                write!(f, "bounce through host memory: the registry's route is {k}")
            }
            Plan::Bounce(BounceReason::Broken(b)) => {
                write!(f, "bounce through host memory: the direct route is broken ({b})")
            }
        }
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

    /// Probes a direct route: `direct` must move the given canary into the destination through
    /// the route (the peer's DMA), `read_back` must read the destination through a path that
    /// does not depend on the route (the CPU mapping). A mismatch marks the route broken.
    /// Returns the comparison (`None`: intact).
    pub fn probe<E: std::fmt::Display>(
        &self,
        region: RegionId,
        peer: Peer,
        canary_len: usize,
        direct: impl FnOnce(&[u8]) -> Result<(), E>,
        read_back: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Option<Broken>, MoveError> {
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = region_hash(region) ^ n.rotate_left(32) ^ canary_len as u64;
        let c = canary(canary_len, seed);
        direct(&c).map_err(|e| MoveError::ProbeTransfer { region, peer, why: e.to_string() })?;
        let mut back = vec![0u8; canary_len];
        read_back(&mut back).map_err(|e| MoveError::ProbeReadBack { region, peer, why: e.to_string() })?;
        let verdict = compare(&c, &back);
        match &verdict {
            Some(b) => self.mark_broken(region, peer, b.clone()),
            None => tracing::debug!(%region, ?peer, canary_len, "route probe: canary intact"),
        }
        Ok(verdict)
    }

    /// The plan for `route` (region `region`, seen by `peer`): bounce when the route is not direct
    /// or was proven broken; otherwise probe it once (if `probe` is given) and decide.
    pub fn plan<E: std::fmt::Display>(
        &self,
        route: &Route<'_>,
        region: RegionId,
        peer: Peer,
        probe: Option<(usize, ProbeFns<'_, E>)>,
    ) -> Result<Plan, MoveError> {
        if !is_dma_route(&route.kind) {
            return Ok(Plan::Bounce(BounceReason::RouteNotDirect(route.kind.name())));
        }
        if let Some(b) = self.broken(region, peer) {
            return Ok(Plan::Bounce(BounceReason::Broken(b)));
        }
        if let Some((len, (direct, read_back))) = probe {
            if let Some(b) = self.probe(region, peer, len, direct, read_back)? {
                return Ok(Plan::Bounce(BounceReason::Broken(b)));
            }
        }
        Ok(Plan::Direct)
    }
}

/// The two transfers of a probe: into the destination through the route, and back by the CPU.
pub type ProbeFns<'a, E> =
    (Box<dyn FnOnce(&[u8]) -> Result<(), E> + 'a>, Box<dyn FnOnce(&mut [u8]) -> Result<(), E> + 'a>);

fn is_dma_route(k: &RouteKind) -> bool {
    matches!(
        k,
        RouteKind::BusAddr(_)
            | RouteKind::HostBridge(_)
            | RouteKind::Iommu(_)
            | RouteKind::CpuMapped(_)
            | RouteKind::KernelImport
    )
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
/// on a second one, so up to `depth` chunks are in flight.
#[derive(Debug)]
pub struct Pipeline {
    chunk: u64,
    staging: Vec<Arc<HostRegion>>,
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
    /// Stops at the first error of either side and returns it (the other side then stops too).
    pub fn run<F, D, E>(&self, len: u64, mut fill: F, mut drain: D) -> Result<CopyStats, MoveError>
    where
        F: FnMut(usize, u64, u64) -> Result<(), E>,
        D: FnMut(usize, u64, u64) -> Result<(), E> + Send,
        E: std::fmt::Display,
    {
        let start = Instant::now();
        let depth = self.staging.len();
        let (full_tx, full_rx) = mpsc::sync_channel::<(usize, u64, u64)>(depth);
        let (free_tx, free_rx) = mpsc::sync_channel::<usize>(depth);
        for s in 0..depth {
            free_tx.send(s).expect("receiver alive");
        }
        let mut chunks = 0u64;
        let result = std::thread::scope(|scope| {
            let drainer = scope.spawn(move || -> Result<(), MoveError> {
                while let Ok((slot, off, n)) = full_rx.recv() {
                    drain(slot, off, n).map_err(|e| MoveError::Copy {
                        offset: off,
                        stage: "drain",
                        why: e.to_string(),
                    })?;
                    if free_tx.send(slot).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let mut fill_result = Ok(());
            let mut off = 0;
            while off < len {
                let Ok(slot) = free_rx.recv() else { break };
                let n = self.chunk.min(len - off);
                if let Err(e) = fill(slot, off, n) {
                    fill_result = Err(MoveError::Copy { offset: off, stage: "fill", why: e.to_string() });
                    break;
                }
                if full_tx.send((slot, off, n)).is_err() {
                    break;
                }
                chunks += 1;
                off += n;
            }
            drop(full_tx);
            let drain_result = drainer.join().unwrap_or_else(|_| {
                Err(MoveError::Copy { offset: off, stage: "drain", why: "the drain thread panicked".into() })
            });
            fill_result.and(drain_result)
        });
        result?;
        Ok(CopyStats { bytes: len, chunks, elapsed: start.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::BounceWhy;

    fn rid(n: u64) -> RegionId {
        // RegionIds come from a registry; make two through one.
        let topo = std::sync::Arc::new(
            crate::Topology::discover(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch"))
                .unwrap(),
        );
        let reg = crate::Registry::new(topo);
        let mut last = None;
        let mut keep = Vec::new();
        for _ in 0..n {
            let g = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
            last = Some(g.id());
            keep.push(g);
        }
        last.unwrap()
    }

    fn route(kind: RouteKind) -> Route<'static> {
        Route { kind, len: 4096, cpu_address: None, bus_address: None, verdict: None }
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
        let h = RouteHealth::new();
        let r = rid(1);
        let peer = Peer::Cpu;
        let dest = std::cell::RefCell::new(Vec::new());
        // A "direct path" that flips a bit, as the vIOMMU trap does.
        let plan = h
            .plan::<String>(
                &route(RouteKind::BusAddr(crate::BusAddr::new(0x1000))),
                r,
                peer,
                Some((
                    4096,
                    (
                        Box::new(|c: &[u8]| {
                            let mut v = c.to_vec();
                            v[4000] ^= 0x40;
                            *dest.borrow_mut() = v;
                            Ok(())
                        }),
                        Box::new(|b: &mut [u8]| {
                            b.copy_from_slice(&dest.borrow());
                            Ok(())
                        }),
                    ),
                )),
            )
            .unwrap();
        assert!(matches!(&plan, Plan::Bounce(BounceReason::Broken(b)) if b.first_mismatch == 4000), "{plan:?}");
        assert!(plan.to_string().contains("broken"));
        // Remembered: no second probe needed.
        let again = h.plan::<String>(&route(RouteKind::BusAddr(crate::BusAddr::new(0x1000))), r, peer, None).unwrap();
        assert_eq!(again, plan);
    }

    #[test]
    fn an_intact_route_goes_direct_and_a_bounce_route_is_never_probed() {
        let h = RouteHealth::new();
        let r = rid(2);
        let cell = std::cell::RefCell::new(Vec::new());
        let plan = h
            .plan::<String>(
                &route(RouteKind::BusAddr(crate::BusAddr::new(0))),
                r,
                Peer::Cpu,
                Some((
                    512,
                    (
                        Box::new(|c: &[u8]| {
                            *cell.borrow_mut() = c.to_vec();
                            Ok(())
                        }),
                        Box::new(|b: &mut [u8]| {
                            b.copy_from_slice(&cell.borrow());
                            Ok(())
                        }),
                    ),
                )),
            )
            .unwrap();
        assert_eq!(plan, Plan::Direct);
        let p = h
            .plan::<String>(
                &route(RouteKind::Bounce(BounceWhy::NotSupported)),
                r,
                Peer::Cpu,
                Some((512, (Box::new(|_: &[u8]| panic!("probed a bounce route")), Box::new(|_: &mut [u8]| Ok(()))))),
            )
            .unwrap();
        assert_eq!(p, Plan::Bounce(BounceReason::RouteNotDirect("bounce")));
    }

    #[test]
    fn a_failing_probe_transfer_is_an_error_not_a_pass() {
        let h = RouteHealth::new();
        let e = h.probe(rid(1), Peer::Cpu, 64, |_| Err("EIO"), |_| Ok::<(), &str>(())).unwrap_err();
        assert!(matches!(e, MoveError::ProbeTransfer { .. }), "{e}");
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
