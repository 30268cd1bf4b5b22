//! The registry: registered peer-memory regions, looked up by address without locks, and
//! resolved per (region, peer) into the route the peer must take.
//!
//! Read side: an immutable `Snapshot` (direct-indexed span tables by virtual address and, per
//! host-bridge hierarchy, by bus address: see `spanmap`) published through `arc_swap`; a
//! `Reader` keeps a per-thread cached `Arc` so a lookup costs one atomic load plus two or three
//! dependent slot loads, and never touches a lock or a shared reference count. Verdicts are
//! cached per (provider, client) in write-once cells, like the kernel's `map_types` xarray.
//! Write side: one mutex serialises writers; each edit copies only the table nodes on its path
//! and publishes a new snapshot. Unregistering publishes a snapshot without the region and marks
//! its entry dead, so later lookups miss and later resolves fail; readers still holding an older
//! snapshot keep the region alive (the snapshot's era holds it), so nothing resolves into freed
//! memory.
//!
//! A PCI function that leaves the machine (surprise removal, learnt by `hotplug::Watcher`) is
//! marked gone with `device_gone`: its regions leave the snapshot at once, their resolves fail
//! with `DeviceGone`, resolves towards it as a peer fail the same way, and nothing new registers
//! on it until `device_back` has checked that it came back at the same addresses.
//!
//! Must not: compute a verdict itself (that is `verdict`), or hand out an address it did not derive
//! from the topology through `addr`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, Cache, Guard};

use crate::addr::{AddrError, AddrRange, BusAddr, CpuPhys, VirtAddr};
use crate::pci::BarError;
use crate::pci::{Bdf, DevIdx, PciDevice, Topology};
use crate::region::{Backing, PeerMemory, Provider};
use crate::route::{BounceWhy, Peer, Route, RouteKind, VerdictRef};
use crate::spanmap::{SpanSet, SpanWriter};
use crate::verdict::{MapType, Verdict};

/// Identity of one registration (never reused within a registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(u64);

impl RegionId {
    /// The number behind the id (unique within one registry), for logs and maps.
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region#{}", self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown PCI device {0}")]
    UnknownDevice(Bdf),
    #[error(transparent)]
    Bar(#[from] BarError),
    #[error("region is empty")]
    Empty,
    #[error("the region's CPU mapping covers {mapped:#x} of its {len:#x} bytes")]
    ShortMapping { mapped: u64, len: u64 },
    #[error("{space} range {start:#x}..={last:#x} overlaps {existing}")]
    Overlap { space: &'static str, start: u64, last: u64, existing: RegionId },
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error("PCI device {0} was removed from the machine")]
    DeviceGone(Bdf),
    #[error("PCI device {bdf} came back with other BARs than the registry's topology ({why}): use a new registry")]
    DeviceMoved { bdf: Bdf, why: String },
    /// A `DevIdx` handed out by another topology than this registry's.
    #[error("device index {index} belongs to topology #{topology}, not to this registry's topology")]
    ForeignHandle { index: usize, topology: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{0} was unregistered")]
    Unregistered(RegionId),
    #[error("{0} has no CPU mapping, so the CPU cannot reach it")]
    NoCpuMapping(RegionId),
    #[error("PCI device {bdf} was removed from the machine ({id} is dead)")]
    DeviceGone { bdf: Bdf, id: RegionId },
    #[error("PCI device {0} (the peer) was removed from the machine")]
    PeerGone(Bdf),
    /// The entry was registered with another registry.
    #[error("{0} belongs to another registry")]
    ForeignEntry(RegionId),
    /// The peer is a device of another topology than this registry's.
    #[error("peer device index {index} belongs to topology #{topology}, not to this registry's topology")]
    ForeignPeer { index: usize, topology: u32 },
}

/// Where a BAR-backed region sits.
#[derive(Debug, Clone, Copy)]
struct BarPlace {
    dev: DevIdx,
    hierarchy: usize,
    cpu: CpuPhys,
    bus: Option<BusAddr>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Bar(BarPlace),
    HostPages,
    DmaBuf,
    OpaqueFd,
}

/// A registered region as the registry keeps it: the region plus what was derived at
/// registration (its PCI place and addresses), so resolving needs no I/O and no allocation.
pub struct Entry {
    id: RegionId,
    /// The registry that holds it (`Shared::id`).
    registry: u64,
    region: Arc<dyn PeerMemory>,
    live: AtomicBool,
    /// Set (before `live` is cleared) when the region died because its device was removed.
    gone: AtomicBool,
    len: u64,
    provider: Provider,
    va: Option<AddrRange<VirtAddr>>,
    kind: Kind,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("provider", &self.provider)
            .field("va", &self.va)
            .field("live", &self.is_live())
            .finish()
    }
}

impl Entry {
    pub fn id(&self) -> RegionId {
        self.id
    }
    pub fn region(&self) -> &Arc<dyn PeerMemory> {
        &self.region
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn provider(&self) -> Provider {
        self.provider
    }
    pub fn cpu_range(&self) -> Option<AddrRange<VirtAddr>> {
        self.va
    }
    /// CPU physical address of the region's first byte (BAR-backed regions).
    pub fn cpu_phys(&self) -> Option<CpuPhys> {
        self.bar().map(|b| b.cpu)
    }
    /// Bus address of the region's first byte (BAR-backed regions whose bus start is known).
    pub fn bus_addr(&self) -> Option<BusAddr> {
        self.bar().and_then(|b| b.bus)
    }
    fn bar(&self) -> Option<BarPlace> {
        match self.kind {
            Kind::Bar(p) => Some(p),
            _ => None,
        }
    }
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
    /// True when the region died because its device left the machine (not a plain unregister).
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// A lookup hit: the region and the byte offset of the address inside it.
#[derive(Debug, Clone, Copy)]
pub struct Hit<'a> {
    pub entry: &'a Arc<Entry>,
    pub offset: u64,
}

/// Table of the span set holding virtual addresses; bus tables follow, one per hierarchy.
const VA_TABLE: usize = 0;

/// One immutable view of the registry.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Table `VA_TABLE`: virtual addresses; table `1 + h`: bus addresses on host-bridge
    /// hierarchy `h` (index into `Topology::host_bridges()`).
    spans: SpanSet<Arc<Entry>>,
    regions: usize,
}

impl Snapshot {
    /// The region whose CPU mapping contains `va`.
    #[inline(always)]
    pub fn lookup_va(&self, va: VirtAddr) -> Option<Hit<'_>> {
        let (start, entry) = self.spans.get(VA_TABLE, va.raw())?;
        Some(Hit { entry, offset: va.raw() - start })
    }
    /// The BAR-backed region at bus address `bus` on host-bridge hierarchy `hierarchy`.
    #[inline]
    pub fn lookup_bus(&self, hierarchy: usize, bus: BusAddr) -> Option<Hit<'_>> {
        let (start, entry) = self.spans.get(hierarchy.checked_add(1)?, bus.raw())?;
        Some(Hit { entry, offset: bus.raw() - start })
    }
    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.regions
    }
    pub fn is_empty(&self) -> bool {
        self.regions == 0
    }
}

/// One provider's verdicts, indexed by client.
type VerdictRow = Box<[OnceLock<Verdict>]>;

/// Write-once verdict cells per (provider, client); rows are allocated on first use.
struct VerdictCache {
    rows: Box<[OnceLock<VerdictRow>]>,
}

impl VerdictCache {
    fn new(n: usize) -> Self {
        VerdictCache { rows: (0..n).map(|_| OnceLock::new()).collect() }
    }
    #[inline]
    fn get<'a>(&'a self, topo: &Topology, p: DevIdx, c: DevIdx) -> &'a Verdict {
        let n = self.rows.len();
        let row = self.rows[p.get()].get_or_init(|| (0..n).map(|_| OnceLock::new()).collect());
        row[c.get()].get_or_init(|| topo.verdict(p, c))
    }
}

struct Writer {
    spans: SpanWriter<Arc<Entry>>,
    regions: usize,
    va_ranges: BTreeMap<u64, (u64, RegionId)>,
    bus_ranges: BTreeMap<(usize, u64), (u64, RegionId)>,
    /// Every entry whose guard is alive, live or dead (what `device_gone` searches).
    entries: BTreeMap<RegionId, Arc<Entry>>,
}

struct Shared {
    /// Unique within the process: entries carry it, so another registry refuses them.
    id: u64,
    topo: Arc<Topology>,
    current: Arc<ArcSwap<Snapshot>>,
    writer: Mutex<Writer>,
    verdicts: VerdictCache,
    next_id: AtomicU64,
    /// Per device of the topology: removed from the machine (set by `device_gone`).
    gone: Box<[AtomicBool]>,
}

/// The registry. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("regions", &self.len()).finish()
    }
}

/// The registration guard: the region stays registered until this is dropped.
pub struct Registration {
    shared: Arc<Shared>,
    entry: Arc<Entry>,
    /// Resources tied to this registration (a NIC's MR, an IOMMU mapping), dropped last-first
    /// before the region leaves the registry.
    attached: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Registration {
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// Ties `resource` to this registration: it is dropped (newest first) just before the region
    /// is unregistered, so e.g. a memory registration never outlives the region's registration.
    pub fn attach(&mut self, resource: impl std::any::Any + Send + Sync) {
        self.attached.push(Box::new(resource));
    }
}

impl Deref for Registration {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.entry.fmt(f)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        while let Some(r) = self.attached.pop() {
            drop(r);
        }
        self.shared.unregister(&self.entry);
    }
}

/// A per-thread reader: caches the current snapshot, re-checking it with one atomic load.
pub struct Reader {
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
}

impl Reader {
    /// The current snapshot (refreshed if a writer published since the last call).
    #[inline]
    pub fn snapshot(&mut self) -> &Snapshot {
        self.cache.load()
    }
    #[inline(always)]
    pub fn lookup_va(&mut self, va: VirtAddr) -> Option<Hit<'_>> {
        self.cache.load().lookup_va(va)
    }
}

fn overlap_check<K: Ord + Copy>(
    map: &BTreeMap<K, (u64, RegionId)>,
    lo_key: K,
    key_of_last: K,
    start: u64,
    space: &'static str,
    last: u64,
) -> Result<(), RegistryError> {
    if let Some((_, &(elast, id))) = map.range(lo_key..=key_of_last).next_back() {
        if elast >= start {
            return Err(RegistryError::Overlap { space, start, last, existing: id });
        }
    }
    Ok(())
}

impl Shared {
    fn publish(&self, w: &mut Writer) {
        let spans = w.spans.publish();
        self.current.store(Arc::new(Snapshot { spans, regions: w.regions }));
    }

    fn unregister(&self, e: &Arc<Entry>) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.entries.remove(&e.id);
        if !e.is_live() {
            // Already withdrawn by `device_gone`.
            return;
        }
        Self::withdraw(&mut w, e);
        self.publish(&mut w);
        e.live.store(false, Ordering::Release);
    }

    /// Takes `e` out of the span tables and of the writer's range maps (published by the caller).
    fn withdraw(w: &mut Writer, e: &Entry) {
        if let Some(va) = e.va {
            w.spans.remove(VA_TABLE, va.start().raw(), va.last().raw());
            w.va_ranges.remove(&va.start().raw());
        }
        if let Some(BarPlace { hierarchy, bus: Some(bus), .. }) = e.bar() {
            w.spans.remove(1 + hierarchy, bus.raw(), bus.raw() + (e.len - 1));
            w.bus_ranges.remove(&(hierarchy, bus.raw()));
        }
        w.regions -= 1;
    }

    fn is_gone(&self, dev: DevIdx) -> bool {
        self.gone.get(dev.get()).is_some_and(|g| g.load(Ordering::Acquire))
    }
}

/// Ids of registries (never reused within a process).
static NEXT_REGISTRY: AtomicU64 = AtomicU64::new(1);

impl Registry {
    /// A registry resolving against `topo`.
    pub fn new(topo: Arc<Topology>) -> Registry {
        let spans = SpanWriter::new(1 + topo.host_bridges().len());
        let snap = Arc::new(Snapshot { spans: spans.latest(), regions: 0 });
        let n = topo.len();
        Registry {
            shared: Arc::new(Shared {
                id: NEXT_REGISTRY.fetch_add(1, Ordering::Relaxed),
                current: Arc::new(ArcSwap::new(snap)),
                writer: Mutex::new(Writer {
                    spans,
                    regions: 0,
                    va_ranges: BTreeMap::new(),
                    bus_ranges: BTreeMap::new(),
                    entries: BTreeMap::new(),
                }),
                verdicts: VerdictCache::new(n),
                next_id: AtomicU64::new(1),
                gone: (0..n).map(|_| AtomicBool::new(false)).collect(),
                topo,
            }),
        }
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.shared.topo
    }

    /// The current snapshot (an `arc_swap` guard: cheap, but prefer a `Reader` in loops).
    pub fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.shared.current.load()
    }

    /// A reader for one thread.
    pub fn reader(&self) -> Reader {
        Reader { cache: Cache::new(self.shared.current.clone()) }
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The peer for a PCI function of this registry's topology.
    pub fn peer(&self, bdf: Bdf) -> Result<Peer, RegistryError> {
        self.shared.topo.idx(bdf).map(Peer::Pci).map_err(|_| RegistryError::UnknownDevice(bdf))
    }

    /// Host-bridge hierarchy index of a device (for `Snapshot::lookup_bus`); a `DevIdx` of another
    /// topology is refused.
    pub fn hierarchy_of(&self, dev: DevIdx) -> Result<usize, RegistryError> {
        let topo = &self.shared.topo;
        if !topo.owns(dev) {
            return Err(RegistryError::ForeignHandle { index: dev.get(), topology: dev.topology_id() });
        }
        let hb = &topo.device(dev).host_bridge;
        Ok(topo.host_bridges().iter().position(|h| &h.name == hb).expect("every device has its host bridge"))
    }

    /// Registers a region. It stays registered until the returned guard is dropped.
    pub fn register(&self, region: Arc<dyn PeerMemory>) -> Result<Registration, RegistryError> {
        let len = region.len();
        if len == 0 {
            return Err(RegistryError::Empty);
        }
        let topo = &self.shared.topo;
        let kind = match region.backing() {
            Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => {
                let (dev, b) = topo.memory_bar(bdf, bar, offset, len)?;
                let cpu = b.cpu.at(offset)?;
                let bus = match b.window() {
                    Some(w) => Some(w.to_bus(cpu)?),
                    None => None,
                };
                Kind::Bar(BarPlace { dev, hierarchy: self.hierarchy_of(dev)?, cpu, bus })
            }
            Backing::HostPages => Kind::HostPages,
            Backing::DmaBuf(_) | Backing::PlannedDmaBuf { .. } => Kind::DmaBuf,
            Backing::OpaqueFd(_) | Backing::DriverPrivate => Kind::OpaqueFd,
        };
        let va = match region.cpu_mapping() {
            Some(s) if s.len() >= len => Some(AddrRange::new(s.addr(), len)?),
            Some(s) => return Err(RegistryError::ShortMapping { mapped: s.len(), len }),
            None => None,
        };

        let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Provider::Pci(bdf) = region.provider() {
            if self.shared.topo.idx(bdf).is_ok_and(|d| self.shared.is_gone(d)) {
                return Err(RegistryError::DeviceGone(bdf));
            }
        }
        let id = RegionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        if let Some(r) = va {
            overlap_check(&w.va_ranges, 0, r.last().raw(), r.start().raw(), "virtual", r.last().raw())?;
        }
        let bus_range = match kind {
            Kind::Bar(BarPlace { hierarchy, bus: Some(bus), .. }) => {
                let r = AddrRange::new(bus, len)?;
                overlap_check(
                    &w.bus_ranges,
                    (hierarchy, 0),
                    (hierarchy, r.last().raw()),
                    bus.raw(),
                    "bus",
                    r.last().raw(),
                )?;
                Some((hierarchy, r))
            }
            _ => None,
        };
        let entry = Arc::new(Entry {
            id,
            registry: self.shared.id,
            provider: region.provider(),
            region,
            live: AtomicBool::new(true),
            gone: AtomicBool::new(false),
            len,
            va,
            kind,
        });
        w.entries.insert(id, entry.clone());
        if let Some(r) = va {
            w.spans.insert(VA_TABLE, r.start().raw(), r.last().raw(), entry.clone());
            w.va_ranges.insert(r.start().raw(), (r.last().raw(), id));
        }
        if let Some((h, r)) = bus_range {
            w.spans.insert(1 + h, r.start().raw(), r.last().raw(), entry.clone());
            w.bus_ranges.insert((h, r.start().raw()), (r.last().raw(), id));
        }
        w.regions += 1;
        self.shared.publish(&mut w);
        drop(w);
        tracing::debug!(%id, len, "registered region");
        Ok(Registration { shared: self.shared.clone(), entry, attached: Vec::new() })
    }

    /// The route `peer` takes to `entry`, with the verdict cached per (provider, client).
    #[inline]
    pub fn resolve<'r>(&'r self, entry: &Entry, peer: Peer) -> Result<Route<'r>, ResolveError> {
        self.resolve_with(entry, peer, |p, c| VerdictRef::Cached(self.shared.verdicts.get(&self.shared.topo, p, c)))
    }

    /// Like `resolve`, but computes the verdict afresh (no cache): what a first resolve costs.
    pub fn resolve_uncached(&self, entry: &Entry, peer: Peer) -> Result<Route<'static>, ResolveError> {
        self.resolve_with(entry, peer, |p, c| VerdictRef::Fresh(Box::new(self.shared.topo.verdict(p, c))))
    }

    /// Marks PCI function `bdf` as removed from the machine: every region it provides leaves the
    /// lookup maps (one published snapshot) and resolves of them fail with
    /// `ResolveError::DeviceGone`; resolves with it as the peer fail with `PeerGone`; registering
    /// a region on it fails with `RegistryError::DeviceGone`. Returns the number of regions that
    /// died. A device the topology does not know provides nothing here: 0. Idempotent.
    pub fn device_gone(&self, bdf: Bdf) -> usize {
        let Ok(dev) = self.shared.topo.idx(bdf) else {
            return 0;
        };
        let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.gone[dev.get()].store(true, Ordering::Release);
        let dead: Vec<Arc<Entry>> =
            w.entries.values().filter(|e| e.provider == Provider::Pci(bdf) && e.is_live()).cloned().collect();
        if dead.is_empty() {
            return 0;
        }
        for e in &dead {
            Shared::withdraw(&mut w, e);
        }
        self.shared.publish(&mut w);
        for e in &dead {
            e.gone.store(true, Ordering::Release);
            e.live.store(false, Ordering::Release);
        }
        tracing::info!(%bdf, regions = dead.len(), "device removed: its regions are dead");
        dead.len()
    }

    /// Whether `bdf` is marked removed.
    pub fn is_device_gone(&self, bdf: Bdf) -> bool {
        self.shared.topo.idx(bdf).is_ok_and(|d| self.shared.is_gone(d))
    }

    /// Clears the removed mark of `bdf` once it is back, as `now` (a fresh read of the machine)
    /// shows it: only if it has the same identity and memory BARs at the same CPU and bus
    /// addresses as in this registry's topology (else everything derived from the topology would
    /// be wrong: `DeviceMoved`). Its old regions stay dead; new ones can be registered.
    pub fn device_back(&self, bdf: Bdf, now: &Topology) -> Result<(), RegistryError> {
        let dev = self.shared.topo.idx(bdf).map_err(|_| RegistryError::UnknownDevice(bdf))?;
        let fresh = now.idx(bdf).map_err(|_| RegistryError::DeviceGone(bdf))?;
        same_device(self.shared.topo.device(dev), now.device(fresh))
            .map_err(|why| RegistryError::DeviceMoved { bdf, why })?;
        let _w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.gone[dev.get()].store(false, Ordering::Release);
        tracing::info!(%bdf, "device back: it can be registered again");
        Ok(())
    }

    #[inline]
    fn resolve_with<'r>(
        &self,
        entry: &Entry,
        peer: Peer,
        verdict: impl FnOnce(DevIdx, DevIdx) -> VerdictRef<'r>,
    ) -> Result<Route<'r>, ResolveError> {
        if entry.registry != self.shared.id {
            return Err(ResolveError::ForeignEntry(entry.id));
        }
        if let Peer::Pci(c) = peer {
            if !self.shared.topo.owns(c) {
                return Err(ResolveError::ForeignPeer { index: c.get(), topology: c.topology_id() });
            }
        }
        if !entry.is_live() {
            return Err(match entry.provider {
                Provider::Pci(bdf) if entry.is_gone() => ResolveError::DeviceGone { bdf, id: entry.id },
                _ => ResolveError::Unregistered(entry.id),
            });
        }
        if let Peer::Pci(c) = peer {
            if self.shared.is_gone(c) {
                return Err(ResolveError::PeerGone(self.shared.topo.device(c).bdf));
            }
        }
        let mut route = Route {
            kind: RouteKind::Bounce(BounceWhy::OpaqueToPeer),
            len: entry.len,
            cpu_address: entry.cpu_phys(),
            bus_address: entry.bus_addr(),
            verdict: None,
        };
        let client = match peer {
            Peer::Cpu => {
                route.kind = RouteKind::CpuMapped(entry.va.ok_or(ResolveError::NoCpuMapping(entry.id))?.start());
                return Ok(route);
            }
            Peer::Pci(c) => c,
        };
        route.kind = match entry.kind {
            Kind::Bar(place) => {
                let v = verdict(place.dev, client);
                let kind = match v.map_type {
                    MapType::BusAddr => match place.bus {
                        Some(b) => RouteKind::BusAddr(b),
                        None => RouteKind::Bounce(BounceWhy::BusAddrUnknown),
                    },
                    MapType::ThruHostBridge if v.client_iommu.translating => RouteKind::Iommu(None),
                    MapType::ThruHostBridge => RouteKind::HostBridge(place.cpu),
                    MapType::NotSupported => RouteKind::Bounce(BounceWhy::NotSupported),
                };
                route.verdict = Some(v);
                kind
            }
            Kind::DmaBuf => {
                if let Provider::Pci(bdf) = entry.provider {
                    if let Ok(p) = self.shared.topo.idx(bdf) {
                        route.verdict = Some(verdict(p, client));
                    }
                }
                match route.verdict.as_ref().map(|v| v.map_type) {
                    Some(MapType::NotSupported) => RouteKind::Bounce(BounceWhy::NotSupported),
                    _ => RouteKind::KernelImport,
                }
            }
            Kind::HostPages | Kind::OpaqueFd => match entry.va {
                Some(va) => RouteKind::CpuMapped(va.start()),
                None => {
                    // Only the memory's own driver reaches it; whether that driver could let this
                    // peer in (GPUDirect Storage into GPU memory) still rests on the pair's verdict.
                    if let Provider::Pci(bdf) = entry.provider {
                        if let Ok(p) = self.shared.topo.idx(bdf) {
                            route.verdict = Some(verdict(p, client));
                        }
                    }
                    match route.verdict.as_ref().map(|v| v.map_type) {
                        Some(MapType::NotSupported) => RouteKind::Bounce(BounceWhy::NotSupported),
                        _ => RouteKind::Bounce(BounceWhy::OpaqueToPeer),
                    }
                }
            },
        };
        Ok(route)
    }
}

/// `Ok` when `now` is `was` back at the same place: identity and every BAR's addresses.
fn same_device(was: &PciDevice, now: &PciDevice) -> Result<(), String> {
    if (was.vendor, was.device, was.class) != (now.vendor, now.device, now.class) {
        return Err(format!(
            "was {:04x}:{:04x} class {:06x}, now {:04x}:{:04x} class {:06x}",
            was.vendor, was.device, was.class, now.vendor, now.device, now.class
        ));
    }
    if was.bars != now.bars {
        return Err(format!("BARs were {:?}, now {:?}", was.bars, now.bars));
    }
    Ok(())
}
