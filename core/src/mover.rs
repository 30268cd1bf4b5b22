//! The move planner: whether a transfer goes direct or through host memory, when a route may lie.
//!
//! Owns: `reachable` (the project's only "is this route direct for this initiator?"), the one
//! planner (`RouteHealth::decide`: the registry's route + the initiator's `Reach` + the caller's
//! precondition + a probe + what earlier probes proved -> `Decision`, with every reason), and
//! `RouteHealth` (per (region, peer): routes a probe proved broken, never trusted again), the
//! canary and its comparison.
//! Must not: know any device or move bytes itself: the caller supplies the probe's transfers as
//! closures (a backend's DMA, an O_DIRECT read, a CPU copy), so the core stays device-free, and
//! the caller moves the data as the decision says. A probe that cannot run is reported, never
//! assumed to have passed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::region::{Backing, Provider, RegionError};
use crate::registry::{Entry, RegionId, ResolveError};
use crate::route::{BounceWhy, Peer, Route, RouteKind};

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("probe of {region} for {peer:?}: the direct transfer failed: {why}")]
    ProbeTransfer { region: RegionId, peer: Peer, why: String },
    #[error("probe of {region} for {peer:?}: reading the canary back failed: {why}")]
    ProbeReadBack { region: RegionId, peer: Peer, why: String },
    #[error("probe of {region} for {peer:?}: reading the known bytes through host memory failed: {why}")]
    ProbeKnown { region: RegionId, peer: Peer, why: String },
    #[error("staging buffer: {0}")]
    Staging(#[from] RegionError),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BounceReason {
    /// The registry has no route for the pair (why not).
    Unresolved(String),
    /// The initiator cannot reach the region through the registry's route, or the caller's
    /// precondition for a direct transfer failed (the route, and why not).
    NotDirect { route: RouteKind, why: String },
    /// A probe proved the direct route corrupts data.
    Broken(Broken),
    /// The probe itself could not run (the transfer or the read-back failed).
    ProbeFailed(String),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Direct => write!(f, "direct"),
            Plan::Bounce(BounceReason::Unresolved(why)) => {
                write!(f, "bounce through host memory: no route for the pair: {why}")
            }
            Plan::Bounce(BounceReason::NotDirect { route, why }) => {
                write!(f, "bounce through host memory: route {}: {why}", route.name())
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The CPU stores the bytes, as a buffered read's copy from the page cache does: direct into
    /// any region with a CPU mapping (host pages, a mapped BAR, host-visible GPU memory),
    /// whatever the route; a region without one cannot be stored into.
    CpuCopy,
    /// A GPU driver's storage path (GPUDirect Storage: cuFile with nvidia-fs or the kernel's
    /// P2PDMA) has the storage device write GPU memory that the GPU's driver maps for it: direct
    /// into a PCI GPU's device memory, a dma-buf or driver-private, wherever the pair's verdict
    /// allows peer-to-peer; never into host memory or a raw BAR.
    GpuStorage,
}

/// The one answer to "does this transfer go direct?": the plan, the route it rests on, and every
/// reason (the route's, then the planner's). Only `RouteHealth::decide` makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub plan: Plan,
    /// The registry's route for the pair; `None` when it could not resolve one.
    pub route: Option<RouteKind>,
    pub reasons: Vec<String>,
}

impl Decision {
    /// The route's CLI/JSON name (`unresolved` when there is none).
    pub fn route_name(&self) -> &'static str {
        RouteKind::name_of(self.route.as_ref())
    }
}

/// What the planner is asked: may `peer`, reaching memory the way `reach` says, move data into
/// `entry` directly? `precondition` is what the caller knows rules a direct transfer out before
/// the route is looked at (a file the filesystem would not open for direct I/O, say).
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub entry: &'a Entry,
    pub peer: Peer,
    pub reach: Reach,
    pub precondition: Result<(), &'a str>,
}

/// Whether `reach` can use a route of kind `route` to reach `entry` directly; `Err` says why not.
/// The only "is this route direct for me?" check of the project.
pub fn reachable(route: &RouteKind, entry: &Entry, reach: Reach) -> Result<(), String> {
    let region = entry.region();
    let mapped = entry.cpu_range().is_some();
    let host_memory = matches!(region.provider(), Provider::Host { .. });
    // Pages the kernel can pin through the CPU mapping: system memory, or P2PDMA pages.
    let pinnable = mapped && (host_memory || matches!(region.backing(), Backing::P2pmem { .. }));
    let pci_device = matches!(region.provider(), Provider::Pci(_));
    match (reach, route) {
        // The registry gives driver-private device memory this route unless the pair's verdict
        // is not_supported (then `Bounce(NotSupported)`, refused below).
        (Reach::GpuStorage, RouteKind::KernelImport | RouteKind::Bounce(BounceWhy::OpaqueToPeer)) if pci_device => {
            Ok(())
        }
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
        (Reach::CpuCopy, _) if mapped => Ok(()),
        (Reach::CpuCopy, _) => Err("the region has no CPU mapping for the CPU to store into".into()),
        (Reach::GpuStorage, k) => {
            Err(format!("GPUDirect Storage writes a GPU's device memory only, not a {} region", k.name()))
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
            Probe::Known { len, expected, poison, transfer: run, read_back } => {
                let known = |why: String| MoveError::ProbeKnown { region, peer, why };
                let expected = expected().map_err(|e| known(e.to_string()))?;
                if expected.len() != len {
                    return Err(known(format!("{} bytes arrived, {len} were asked for", expected.len())));
                }
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

    /// The one move planner: whether `ask.peer`, reaching memory the way `ask.reach` says, moves
    /// data into `ask.entry` directly, given the registry's answer for the pair (`route`). Bounce
    /// when there is no route, when the caller's precondition fails, when the route is not
    /// direct for this initiator (`reachable`) or was proven broken; otherwise, for device
    /// memory a device writes, probe it once (when `probe` is given) before trusting it (CPU
    /// stores need none). A probe that cannot run bounces.
    pub fn decide<E: std::fmt::Display>(
        &self,
        route: Result<&Route<'_>, &ResolveError>,
        ask: Ask<'_>,
        probe: Option<Probe<'_, E>>,
    ) -> Decision {
        let route = match route {
            Ok(r) => r,
            Err(e) => {
                let plan = Plan::Bounce(BounceReason::Unresolved(e.to_string()));
                return Decision { reasons: vec![format!("plan: {plan}")], plan, route: None };
            }
        };
        let mut reasons = route.reasons();
        let plan = self.plan_inner(route, ask, probe, &mut reasons);
        reasons.push(format!("plan: {plan}"));
        Decision { plan, route: Some(route.kind), reasons }
    }

    fn plan_inner<E: std::fmt::Display>(
        &self,
        route: &Route<'_>,
        ask: Ask<'_>,
        probe: Option<Probe<'_, E>>,
        reasons: &mut Vec<String>,
    ) -> Plan {
        let not_direct = |why: String| Plan::Bounce(BounceReason::NotDirect { route: route.kind, why });
        if let Err(why) = ask.precondition {
            return not_direct(why.to_string());
        }
        if let Err(why) = reachable(&route.kind, ask.entry, ask.reach) {
            return not_direct(why);
        }
        let region = ask.entry.id();
        if let Some(b) = self.broken(region, ask.peer) {
            return Plan::Bounce(BounceReason::Broken(b));
        }
        if matches!(ask.entry.provider(), Provider::Host { .. }) {
            return Plan::Direct;
        }
        if ask.reach == Reach::CpuCopy {
            reasons.push("probe: none: the CPU stores through the mapping a probe would read back through".into());
            return Plan::Direct;
        }
        match probe {
            None => {
                reasons.push("probe: not run by this caller; the route is trusted on the verdict alone".into());
                Plan::Direct
            }
            Some(p) => match (p.len(), self.probe(region, ask.peer, p)) {
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
        len: usize,
        /// Reads the `len` known bytes through host memory (run only when the probe runs).
        expected: Box<dyn FnOnce() -> Result<Vec<u8>, E> + 'a>,
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
            Probe::Known { len, .. } => *len,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Bdf;
    use crate::{BarRegion, HostRegion, PeerMemory, Registration, Registry};

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

    fn ask(entry: &Entry, reach: Reach) -> Ask<'_> {
        Ask { entry, peer: Peer::Cpu, reach, precondition: Ok(()) }
    }

    /// A CMB-sized BAR region of the switch NVMe (device memory: probed before trusted).
    /// Device memory the CPU maps: host pages standing in for P2PDMA pages of a switch NVMe's BAR.
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
        fn cpu_mapping(&self) -> Option<crate::mem::MappedSpan<'_>> {
            self.0.cpu_mapping()
        }
    }

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
        let dest = std::cell::RefCell::new(Vec::new());
        let r = route(RouteKind::BusAddr(crate::BusAddr::new(0x1000)));
        // A "direct path" that flips a bit, as the vIOMMU trap does.
        let d = h.decide(Ok(&r), ask(&g, Reach::DeviceAddress), Some(flipping(&dest, 4096, Some(4000))));
        assert!(matches!(&d.plan, Plan::Bounce(BounceReason::Broken(b)) if b.first_mismatch == 4000), "{d:?}");
        assert!(d.reasons.last().unwrap().contains("broken"));
        assert_eq!(d.route, Some(r.kind));
        // Remembered: no second probe needed.
        let again = h.decide::<String>(Ok(&r), ask(&g, Reach::DeviceAddress), None);
        assert_eq!(again.plan, d.plan);
    }

    #[test]
    fn an_intact_route_goes_direct_and_a_bounce_route_is_never_probed() {
        let reg = registry();
        let g = bar(&reg);
        let h = RouteHealth::new();
        let cell = std::cell::RefCell::new(Vec::new());
        let r = route(RouteKind::BusAddr(crate::BusAddr::new(0)));
        let d = h.decide(Ok(&r), ask(&g, Reach::DeviceAddress), Some(flipping(&cell, 512, None)));
        assert_eq!(d.plan, Plan::Direct);
        assert!(d.reasons.iter().any(|s| s.contains("arrived intact")), "{:?}", d.reasons);
        let never: Fns = Probe::Canary {
            len: 512,
            write: Box::new(|_: &[u8]| panic!("probed a bounce route")),
            read_back: Box::new(|_: &mut [u8]| Ok(())),
        };
        let d = h.decide(
            Ok(&route(RouteKind::Bounce(BounceWhy::NotSupported))),
            ask(&g, Reach::DeviceAddress),
            Some(never),
        );
        assert!(matches!(d.plan, Plan::Bounce(BounceReason::NotDirect { route: RouteKind::Bounce(_), .. })), "{d:?}");
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
        let p2p = reg.register(Arc::new(P2p(HostRegion::new(4096).unwrap()))).unwrap();
        let p2p_va = route(RouteKind::CpuMapped(p2p.cpu_range().unwrap().start()));
        assert!(reachable(&p2p_va.kind, &p2p, Reach::KernelPages).is_ok());
        assert!(reachable(&bus.kind, &p2p, Reach::KernelPages).is_ok());
        assert!(reachable(&p2p_va.kind, &p2p, Reach::DeviceAddress).is_err());
        // Host memory needs no probe.
        let d = RouteHealth::new().decide::<String>(Ok(&cpu), ask(&host, Reach::KernelPages), None);
        assert_eq!(d.plan, Plan::Direct);
    }

    /// GPUDirect Storage goes direct into a PCI GPU's device memory, a dma-buf or driver-private,
    /// unless the pair's verdict refuses peer-to-peer; never into host memory or a BAR.
    #[test]
    fn gpu_storage_reaches_gpu_memory_the_verdict_allows_and_nothing_else() {
        #[derive(Debug)]
        struct Gpu;
        impl PeerMemory for Gpu {
            fn len(&self) -> u64 {
                4096
            }
            fn provider(&self) -> Provider {
                Provider::Pci("0000:03:00.0".parse().unwrap())
            }
            fn backing(&self) -> Backing<'_> {
                Backing::DriverPrivate
            }
        }
        let reg = registry();
        let gpu = reg.register(Arc::new(Gpu)).unwrap();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let private = RouteKind::Bounce(BounceWhy::OpaqueToPeer);
        assert!(reachable(&private, &gpu, Reach::GpuStorage).is_ok());
        assert!(reachable(&RouteKind::KernelImport, &gpu, Reach::GpuStorage).is_ok());
        assert!(reachable(&private, &gpu, Reach::KernelPages).is_err(), "only the GPU's driver reaches it");
        let e = reachable(&RouteKind::Bounce(BounceWhy::NotSupported), &gpu, Reach::GpuStorage).unwrap_err();
        assert!(e.contains("no direct path"), "{e}");
        let va = host.cpu_range().unwrap().start();
        let e = reachable(&RouteKind::CpuMapped(va), &host, Reach::GpuStorage).unwrap_err();
        assert!(e.contains("GPU's device memory only"), "{e}");
        assert!(reachable(&private, &host, Reach::GpuStorage).is_err(), "host memory is no GPU's");
        let d = RouteHealth::new().decide::<String>(Ok(&route(private)), ask(&gpu, Reach::GpuStorage), None);
        assert_eq!(d.plan, Plan::Direct, "{d:?}");
    }

    /// A buffered read's CPU copy out of the page cache needs only a CPU mapping: host pages and
    /// a mapped BAR (a P2PDMA or host-visible GPU region) go direct whatever the route, with no
    /// probe; a BAR the CPU has no mapping of does not, and the CPU resolves no route to it.
    #[test]
    fn a_cpu_copy_goes_direct_into_any_cpu_mapped_region_and_nowhere_else() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let cpu = reg.resolve(&host, Peer::Cpu).unwrap();
        assert!(matches!(cpu.kind, RouteKind::CpuMapped(_)), "{:?}", cpu.kind);
        assert!(reachable(&cpu.kind, &host, Reach::CpuCopy).is_ok());
        // Whatever route a device would take, the CPU's own mapping is what it stores through.
        assert!(reachable(&RouteKind::KernelImport, &host, Reach::CpuCopy).is_ok());
        assert!(reachable(&RouteKind::Bounce(BounceWhy::NotSupported), &host, Reach::CpuCopy).is_err());
        let d = RouteHealth::new().decide::<String>(Ok(&cpu), ask(&host, Reach::CpuCopy), None);
        assert_eq!(d.plan, Plan::Direct);

        // Device memory the CPU maps (here a P2PDMA-style region): direct, and no probe is run.
        let mapped = reg.register(Arc::new(P2p(HostRegion::new(4096).unwrap()))).unwrap();
        let r = reg.resolve(&mapped, Peer::Cpu).unwrap();
        assert!(matches!(r.kind, RouteKind::CpuMapped(_)), "{:?}", r.kind);
        let never: Fns = Probe::Canary {
            len: 64,
            write: Box::new(|_: &[u8]| panic!("probed a CPU copy")),
            read_back: Box::new(|_: &mut [u8]| Ok(())),
        };
        let d = RouteHealth::new().decide(Ok(&r), ask(&mapped, Reach::CpuCopy), Some(never));
        assert_eq!(d.plan, Plan::Direct, "{d:?}");
        assert!(d.reasons.iter().any(|s| s.contains("the CPU stores")), "{:?}", d.reasons);

        // A raw BAR without a CPU mapping: the CPU has no route, and a CPU copy cannot reach it.
        let raw = bar(&reg);
        assert!(matches!(reg.resolve(&raw, Peer::Cpu), Err(ResolveError::NoCpuMapping(_))));
        let bus = route(RouteKind::BusAddr(crate::BusAddr::new(0)));
        let e = reachable(&bus.kind, &raw, Reach::CpuCopy).unwrap_err();
        assert!(e.contains("no CPU mapping"), "{e}");
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
        let d = RouteHealth::new().decide(Ok(&r), ask(&g, Reach::DeviceAddress), Some(fails));
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
            len: 256,
            expected: Box::new(|| Ok(expected.clone())),
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
            len: 256,
            expected: Box::new(|| Ok(expected.clone())),
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

    /// A precondition the caller states (a file not opened for direct I/O) bounces before the
    /// route is looked at, with the route still named; no route at all bounces with the error.
    #[test]
    fn a_failed_precondition_or_a_missing_route_bounces_with_its_reason() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let cpu = route(RouteKind::CpuMapped(host.cpu_range().unwrap().start()));
        let a = Ask { precondition: Err("the filesystem refused O_DIRECT"), ..ask(&host, Reach::KernelPages) };
        let d = RouteHealth::new().decide::<String>(Ok(&cpu), a, None);
        assert!(matches!(&d.plan, Plan::Bounce(BounceReason::NotDirect { why, .. }) if why.contains("O_DIRECT")));
        assert_eq!(d.route_name(), "cpu_mapped");
        let gone = ResolveError::PeerGone("0000:03:00.0".parse().unwrap());
        let d = RouteHealth::new().decide::<String>(Err(&gone), ask(&host, Reach::KernelPages), None);
        assert!(matches!(d.plan, Plan::Bounce(BounceReason::Unresolved(_))), "{d:?}");
        assert_eq!((d.route, d.route_name()), (None, "unresolved"));
    }
}
