//! The engine's tables (NICs, regions and their registrations, peers and their links, batches in
//! flight, notifications received) and the progress loop over them. Everything here runs under
//! the engine's lock.
//!
//! Owns: `Inner`, `serve` (the listener thread). Must not: wait without a bound, or free a buffer
//! a queue pair may still use (a batch ends only when none of its work requests is in flight).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peermem::nic::rank_nics;
use peermem::{HostRegion, PeerMemory, Registration, Registry};
use peermem_rdma::{Access, Connection, Local, Nic, NicMr, RdmaError, RemoteBuf};

use super::link::{Link, LinkState, Wr};
use super::local::{open_nics, Listener, LocalNic};
use super::notify::{Incoming, Ring, Seen, WIRE};
use super::page::MetaPage;
use super::stage::{ACK_SLOTS, ACK_WIRE};
use super::{EngineError, EngineOptions, Notification, Op, PeerId, RailReport, Report, Request, Shared};
use crate::cache::{CacheCounts, RangeCache};
use crate::metadata::{Metadata, NicAddr, RegionMeta, RemoteKey, VERSION};
use crate::rails::{choose, Choice, NicReach, Plan, RailId, Rails, SliceId, SliceState};
use crate::span::{RegionId, Span};
use crate::verbs::{Regions, VerbsRegistrar};

/// A region registered with the engine.
struct LocalRegion {
    region: Arc<dyn PeerMemory>,
    /// How each local NIC reaches it (index = NIC index), from the core's ranking.
    reach: Vec<NicReach>,
    /// Batches posted and not ended that use it.
    in_use: usize,
}

/// The rails between one local and one remote region, and the links they ride on.
struct RailSet {
    rails: Rails,
    /// The link of each rail (index = `RailId`).
    links: Vec<usize>,
    routes: Vec<String>,
    /// The peer's memory bounces on every rail: its engine copies (see `stage`).
    staged: bool,
}

struct Peer {
    meta: Metadata,
    links: Vec<Link>,
    rails: HashMap<(RegionId, RegionId), RailSet>,
    /// Set when a reconnect found nothing listening where the peer's engine listened, or could
    /// not reach a peer that had closed the connection: its process (or host) is gone, so no
    /// rail returns.
    gone: Option<String>,
}

/// A dial that failed: why, and whether the peer's CM said nothing listens there.
pub(super) struct DialError {
    why: String,
    nothing_listens: bool,
}

impl DialError {
    fn new(why: String) -> DialError {
        DialError { why, nothing_listens: false }
    }
}

struct Req {
    req: Request,
    plan: Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotifyState {
    None,
    Pending,
    Posted,
    Done,
}

/// A posted batch.
struct Batch {
    peer: PeerId,
    reqs: Vec<Req>,
    notify: Option<Vec<u8>>,
    notify_state: NotifyState,
    started: Instant,
    deadline: Instant,
    error: Option<EngineError>,
    /// Bytes and slices acknowledged per link.
    per_link: HashMap<usize, (u64, u64)>,
    retries: u64,
    routes: Vec<String>,
    result: Option<Result<Report, EngineError>>,
    forgotten: bool,
    /// The peer's staging for the requests whose memory bounces there.
    stage: remote::Staging,
}

/// Send buffers for notifications, one ring per local NIC.
struct NotifyBufs {
    mr: NicMr,
    busy: Vec<bool>,
}

const NOTIFY_SLOTS: usize = 64;

/// Fields drop in order: the queue pairs (peers, incoming) go before the registrations they
/// may use.
pub(crate) struct Inner {
    peers: HashMap<PeerId, Peer>,
    incoming: Vec<Incoming>,
    page: MetaPage,
    registry: Registry,
    options: EngineOptions,
    host: String,
    nics: Vec<LocalNic>,
    caches: Vec<RangeCache<VerbsRegistrar>>,
    regions: Regions,
    local: HashMap<RegionId, LocalRegion>,
    next_region: u32,
    next_peer: u32,
    notes: Vec<Notification>,
    seen: Seen,
    batches: HashMap<u64, Batch>,
    next_ticket: u64,
    notify_bufs: Vec<NotifyBufs>,
    epoch: Instant,
    token: u64,
}

/// Each NIC, and whether it listens (has an address peers connect to).
fn listening(nics: &[LocalNic]) -> Vec<(Arc<Nic>, bool)> {
    nics.iter().map(|n| (n.nic.clone(), n.addr.is_some())).collect()
}

/// The kernel's host name; empty when unset (`(none)`).
fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    if h == "(none)" {
        String::new()
    } else {
        h
    }
}

impl Inner {
    pub fn new(registry: Registry, mut options: EngineOptions) -> Result<(Inner, Vec<Listener>), EngineError> {
        // A link's send queue holds its slices in flight and the notifications and staging
        // requests sharing it (one per notification buffer at most).
        let sends = options.depth.max(1).saturating_add(NOTIFY_SLOTS);
        options.connect.max_send_wr = options.connect.max_send_wr.max(u32::try_from(sends).unwrap_or(u32::MAX));
        let (nics, listeners) = open_nics(&options.root, options.nics.as_deref(), options.port)?;
        let regions: Regions = Arc::new(Mutex::new(HashMap::new()));
        let caches = nics
            .iter()
            .map(|n| RangeCache::new(VerbsRegistrar::new(n.nic.clone(), registry.clone(), regions.clone())))
            .collect();
        let mut notify_bufs = Vec::new();
        for n in &nics {
            let host = Arc::new(HostRegion::new((NOTIFY_SLOTS * WIRE) as u64).map_err(RdmaError::from)?);
            let mr = n.nic.register(&registry, host as Arc<dyn PeerMemory>, Access::LOCAL_READ)?;
            notify_bufs.push(NotifyBufs { mr, busy: vec![false; NOTIFY_SLOTS] });
        }
        let page = MetaPage::new(&registry, &listening(&nics))?;
        let host = options.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(hostname);
        let host = if host.is_empty() { format!("peermem-{}", std::process::id()) } else { host };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let token = (std::process::id() as u64) << 32 | nanos as u64;
        let mut inner = Inner {
            page,
            registry,
            options,
            host,
            nics,
            caches,
            regions,
            local: HashMap::new(),
            next_region: 1,
            peers: HashMap::new(),
            next_peer: 1,
            incoming: Vec::new(),
            notes: Vec::new(),
            seen: Seen::default(),
            batches: HashMap::new(),
            next_ticket: 1,
            notify_bufs,
            epoch: Instant::now(),
            token,
        };
        inner.publish()?;
        Ok((inner, listeners))
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    // ---- memory --------------------------------------------------------------------------------

    pub fn register(&mut self, region: Arc<dyn PeerMemory>) -> Result<RegionId, EngineError> {
        let id = self.register_one(region)?;
        self.publish()?;
        Ok(id)
    }

    fn register_one(&mut self, region: Arc<dyn PeerMemory>) -> Result<RegionId, EngineError> {
        if let Some((id, _)) = self.local.iter().find(|(_, r)| Arc::ptr_eq(&r.region, &region)) {
            return Ok(*id);
        }
        let id = RegionId(self.next_region);
        let registration = Arc::new(self.registry.register(region.clone()).map_err(RdmaError::from)?);
        let reach = self.reach(&registration)?;
        self.regions.lock().map_err(|_| EngineError::Poisoned)?.insert(id, (region.clone(), registration));
        let whole =
            Span::new(id, 0, region.len()).map_err(|e| EngineError::BadRequest { index: 0, why: e.to_string() })?;
        for c in &mut self.caches {
            if let Err(e) = c.register(whole) {
                for c in &mut self.caches {
                    c.invalidate(id);
                }
                self.regions.lock().map_err(|_| EngineError::Poisoned)?.remove(&id);
                return Err(EngineError::Rdma(e.source));
            }
        }
        self.next_region += 1;
        self.local.insert(id, LocalRegion { region, reach, in_use: 0 });
        Ok(id)
    }

    pub fn register_all(&mut self, regions: &[Arc<dyn PeerMemory>]) -> Result<Vec<RegionId>, EngineError> {
        let mut ids = Vec::with_capacity(regions.len());
        let mut new = Vec::new();
        for (index, region) in regions.iter().enumerate() {
            let known = self.local.values().any(|r| Arc::ptr_eq(&r.region, region));
            match self.register_one(region.clone()) {
                Ok(id) => {
                    ids.push(id);
                    if !known {
                        new.push(id);
                    }
                }
                Err(e) => {
                    for id in new {
                        let _ = self.unregister_one(id);
                    }
                    self.publish()?;
                    return Err(EngineError::BadRequest { index, why: format!("registering it: {e}") });
                }
            }
        }
        self.publish()?;
        Ok(ids)
    }

    /// How each local NIC reaches `region`, by the core's ranking.
    fn reach(&self, reg: &Registration) -> Result<Vec<NicReach>, EngineError> {
        let devs: Vec<_> = self.nics.iter().map(|n| n.nic.device().clone()).collect();
        let ranks = rank_nics(&self.registry, reg.entry(), &devs).map_err(RdmaError::from)?;
        Ok(self
            .nics
            .iter()
            .map(|n| {
                ranks.iter().find(|r| r.device.name == n.nic.name()).map(NicReach::from_rank).unwrap_or(NicReach {
                    nic: n.nic.name().to_string(),
                    direct: false,
                    bandwidth_gbs: None,
                    why: "the ranking did not list this NIC".into(),
                })
            })
            .collect())
    }

    pub fn register_range(&mut self, region: RegionId, offset: u64, len: u64) -> Result<(), EngineError> {
        let r = self.local.get(&region).ok_or(EngineError::UnknownRegion(region))?;
        if offset.checked_add(len).is_none_or(|e| e > r.region.len()) {
            return Err(EngineError::BadRequest {
                index: 0,
                why: format!("{len} bytes at {offset} do not fit {region} of {} bytes", r.region.len()),
            });
        }
        let span =
            Span::new(region, offset, len).map_err(|e| EngineError::BadRequest { index: 0, why: e.to_string() })?;
        for c in &mut self.caches {
            c.register(span).map_err(|e| EngineError::Rdma(e.source))?;
        }
        Ok(())
    }

    pub fn unregister(&mut self, region: RegionId) -> Result<(), EngineError> {
        self.unregister_one(region)?;
        self.publish()
    }

    fn unregister_one(&mut self, region: RegionId) -> Result<(), EngineError> {
        let r = self.local.get(&region).ok_or(EngineError::UnknownRegion(region))?;
        if r.in_use > 0 {
            return Err(EngineError::InUse(region));
        }
        for c in &mut self.caches {
            c.invalidate(region);
        }
        self.local.remove(&region);
        self.regions.lock().map_err(|_| EngineError::Poisoned)?.remove(&region);
        Ok(())
    }

    /// The registration of `span` with local NIC `nic`.
    fn mr(&self, nic: usize, span: &Span) -> Option<Arc<NicMr>> {
        self.caches.get(nic)?.lookup(span)
    }

    pub fn routes(&self, region: RegionId) -> Result<Vec<String>, EngineError> {
        let r = self.local.get(&region).ok_or(EngineError::UnknownRegion(region))?;
        let whole = Span::new(region, 0, r.region.len())
            .map_err(|e| EngineError::BadRequest { index: 0, why: e.to_string() })?;
        let mut out = Vec::new();
        for (i, n) in self.nics.iter().enumerate() {
            out.push(format!("{}: {}", n.nic.name(), r.reach[i].why));
            if let Some(mr) = self.mr(i, &whole) {
                out.extend(mr.reasons().iter().map(|s| format!("{}: {s}", n.nic.name())));
            }
        }
        Ok(out)
    }

    pub fn cache_counts(&self) -> CacheCounts {
        self.caches.iter().map(|c| c.counts()).fold(CacheCounts::default(), |a, c| CacheCounts {
            registers: a.registers + c.registers,
            deregisters: a.deregisters + c.deregisters,
            hits: a.hits + c.hits,
        })
    }

    pub fn metadata(&self) -> Metadata {
        let nics = self
            .nics
            .iter()
            .filter_map(|n| n.addr.map(|a| NicAddr { nic: n.nic.name().to_string(), address: a.to_string() }))
            .collect();
        let mut regions: Vec<RegionMeta> = self
            .local
            .iter()
            .map(|(&id, r)| {
                let keys = (0..self.nics.len())
                    .filter(|&i| self.nics[i].addr.is_some())
                    .filter_map(|i| {
                        let mr = self.mr(i, &Span::new(id, 0, r.region.len()).ok()?)?;
                        Some(RemoteKey {
                            nic: self.nics[i].nic.name().to_string(),
                            rkey: mr.rkey(),
                            addr: mr.addr().wrapping_sub(mr.offset()),
                            direct: r.reach[i].direct,
                            bandwidth_gbs: r.reach[i].bandwidth_gbs,
                        })
                    })
                    .collect();
                RegionMeta { id, len: r.region.len(), keys }
            })
            .collect();
        regions.sort_by_key(|r| r.id);
        Metadata { version: VERSION, host: self.host.clone(), nics, regions }
    }

    /// Writes the current metadata into the page the listeners offer.
    fn publish(&mut self) -> Result<(), EngineError> {
        let meta = self.metadata().encode();
        self.page.publish(&self.registry, &listening(&self.nics), &meta)?;
        Ok(())
    }

    /// What local NIC `nic`'s listener offers with its accept: the metadata page.
    pub fn offer(&self, nic: usize) -> Option<RemoteBuf> {
        self.page.offer(nic)
    }

    pub fn listen_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.nics.iter().filter_map(|n| n.addr.map(|a| (n.nic.name().to_string(), a))).collect()
    }

    /// What a connect request carries: this engine's token, then its host name's length and
    /// bytes (cut to fit).
    fn private(&self) -> Vec<u8> {
        let mut p = self.token.to_le_bytes().to_vec();
        let name: Vec<u8> = self.host.bytes().take(peermem_rdma::cm::MAX_PRIVATE - 9).collect();
        p.push(name.len() as u8);
        p.extend(name);
        p
    }

    /// A connection from one of our NICs to `addr`: the one rdma_cm routes it through.
    fn dial(&self, addr: SocketAddr, timeout: Duration) -> Result<(usize, Connection), DialError> {
        let opts = peermem_rdma::ConnectOpts { timeout, ..self.options.connect };
        let private = self.private();
        let mut last = format!("no local NIC reaches {addr}");
        for (i, n) in self.nics.iter().enumerate() {
            match Connection::connect_cm_with(&n.nic, addr, opts, &private) {
                Ok(c) => return Ok((i, c)),
                Err(RdmaError::OtherDevice { via, .. }) => {
                    last = format!("{addr} is reached through {via}, not an engine NIC")
                }
                Err(e) => {
                    let why = format!("{} -> {addr}: {e}", n.nic.name());
                    return Err(DialError { why, nothing_listens: e.nothing_listens() });
                }
            }
        }
        Err(DialError::new(last))
    }

    pub fn connect(&mut self, meta: Metadata) -> Result<PeerId, EngineError> {
        self.connect_with(meta, None)
    }

    /// Connects to every NIC `meta` lists; `first`, a connection already made to one of its
    /// addresses (by `connect_to`), is that address's link.
    fn connect_with(
        &mut self,
        meta: Metadata,
        mut first: Option<(usize, SocketAddr, Connection)>,
    ) -> Result<PeerId, EngineError> {
        let mut links = Vec::new();
        let mut reasons = Vec::new();
        for na in &meta.nics {
            let Ok(addr) = na.address.parse::<SocketAddr>() else {
                reasons.push(format!("{}: address {:?} is not IP:port", na.nic, na.address));
                continue;
            };
            let dialed = match first.take_if(|(_, a, _)| *a == addr) {
                Some((i, _, conn)) => Ok((i, conn)),
                None => self.dial(addr, self.options.connect.timeout).map_err(|e| e.why),
            };
            match dialed.and_then(|(i, conn)| Ok((i, self.with_ring(i, conn)?))) {
                Ok((i, conn)) => {
                    links.push(Link::new(i, self.nics[i].nic.name().to_string(), na.nic.clone(), addr, conn))
                }
                Err(why) => reasons.push(format!("{}: {why}", na.nic)),
            }
        }
        if let Some((_, a, mut conn)) = first {
            tracing::info!(peer = %meta.host, "{a} is not among the addresses the metadata lists: that connection ends");
            let _ = conn.disconnect();
        }
        if links.is_empty() {
            return Err(EngineError::NoLink { host: meta.host, reasons });
        }
        for r in &reasons {
            tracing::info!(peer = %meta.host, "no link: {r}");
        }
        let id = PeerId(self.next_peer);
        self.next_peer += 1;
        self.peers.insert(id, Peer { meta, links, rails: HashMap::new(), gone: None });
        Ok(id)
    }

    /// `conn` (from local NIC `nic`) with receives posted for the peer's answers.
    fn with_ring(&self, nic: usize, mut conn: Connection) -> Result<(Connection, Ring), String> {
        match Ring::new(&self.nics[nic].nic, &self.registry, &mut conn, ACK_SLOTS, ACK_WIRE) {
            Ok(ring) => Ok((conn, ring)),
            Err(e) => Err(format!("receives for the peer's answers: {e}")),
        }
    }

    /// A connection a peer made to us: its notifications arrive on it.
    fn accepted(&mut self, nic: usize, conn: Connection) {
        // The transport may pad the private data: the name's length says where it ends.
        let private = conn.private_data();
        let name = private.get(8).and_then(|&n| private.get(9..9 + n as usize));
        let token = private.first_chunk::<8>().map_or(0, |t| u64::from_le_bytes(*t));
        let from = match name {
            Some(n) if !n.is_empty() => String::from_utf8_lossy(n).into_owned(),
            _ => conn.peer().to_string(),
        };
        match Incoming::new(&self.nics[nic].nic, &self.registry, conn, from, token) {
            Ok(inc) => self.incoming.push(inc),
            Err(e) => tracing::warn!("cannot take a connection's notifications: {e}"),
        }
    }

    pub fn accepted_hosts(&self) -> Vec<String> {
        self.incoming.iter().filter(|i| !i.closed).map(|i| i.from.clone()).collect()
    }

    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notes)
    }

    pub fn remote_regions(&self, peer: PeerId) -> Result<Vec<(RegionId, u64)>, EngineError> {
        let p = self.peers.get(&peer).ok_or(EngineError::UnknownPeer(peer))?;
        Ok(p.meta.regions.iter().map(|r| (r.id, r.len)).collect())
    }

    pub fn rail_states(&self, peer: PeerId) -> Result<Vec<RailReport>, EngineError> {
        let p = self.peers.get(&peer).ok_or(EngineError::UnknownPeer(peer))?;
        Ok(p.links.iter().map(|l| rail_report(l, 0, 0)).collect())
    }
}

fn rail_report(l: &Link, bytes: u64, slices: u64) -> RailReport {
    let (state, error) = match &l.state {
        LinkState::Up => ("up", l.failures.last().cloned()),
        LinkState::Down { why, .. } => ("failed", Some(why.clone())),
    };
    RailReport {
        nic: l.local_name.clone(),
        remote_nic: l.remote.clone(),
        bytes,
        slices,
        state: if state == "up" && !l.failures.is_empty() { "recovered".into() } else { state.into() },
        error,
    }
}

/// The listener thread: accepts peers' connections on every listening NIC and makes progress,
/// until the engine is dropped.
pub(crate) fn serve(shared: &Shared, listeners: Vec<Listener>) {
    let (nics, opts) = match shared.lock() {
        Ok(inner) => (inner.nics.iter().map(|n| n.nic.clone()).collect::<Vec<Arc<Nic>>>(), inner.options.connect),
        Err(_) => return,
    };
    let wait = Duration::from_millis(if listeners.is_empty() { 0 } else { 20 / listeners.len() as u64 + 1 });
    while !shared.stop.load(Ordering::Acquire) {
        for (i, l) in &listeners {
            let offer = match shared.lock() {
                Ok(inner) => inner.offer(*i),
                Err(_) => return,
            };
            match l.accept_within(&nics[*i], opts, offer, wait) {
                Ok(conn) => match shared.lock() {
                    Ok(mut inner) => inner.accepted(*i, conn),
                    Err(_) => return,
                },
                Err(RdmaError::Timeout { .. }) => {}
                Err(e) => tracing::debug!(nic = nics[*i].name(), "accept: {e}"),
            }
        }
        if listeners.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        match shared.lock() {
            Ok(mut inner) => inner.progress(),
            Err(_) => return,
        }
    }
}

mod batch;
mod bootstrap;
mod finish;
mod remote;
