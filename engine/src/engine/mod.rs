//! The engine: memory registered once per (region, NIC), metadata for the peer, connections over
//! rdma_cm (one per pair of NICs that reach each other), and batches of RDMA READ and WRITE posted
//! as one unit: each request cut into slices dealt to the rails the fabric allows for its two
//! memories, weighted by bandwidth and by what each rail delivers; a rail whose queue pair fails
//! is taken out and its unacknowledged slices go to the others; a peer whose engine is gone (it
//! closed the connections, or nothing listens where it did) ends its batches at once; memory
//! that bounces on the peer (none of its NICs takes it directly) is staged by the peer's engine,
//! asked before reads and after writes; the peer's notification is sent once every byte has
//! landed in its memory, and received once. A peer known by one address is connected with its
//! metadata read over that connection (`connect_to`).
//!
//! Progress is made by whoever waits (a ticket, a notification) and by the engine's listener
//! thread, under one lock: no completion is polled outside it.
//!
//! - `state`: the engine's tables and the progress loop.
//! - `local`: the host's NICs, their addresses and listeners.
//! - `link`: one connection to a peer's NIC and its work requests in flight.
//! - `notify`: receive rings for messages (notifications, staging requests, their answers).
//! - `stage`: staging on the peer, on the wire.
//! - `page`: the metadata page every listener offers.
//!
//! Owns: `Engine`, `EngineOptions`, `Ticket`, `Report`, `RailReport`, `Request`, `Op`,
//! `PeerId`, `Notification`, `EngineError`. Must not: judge what a NIC reaches (the core's
//! ranking, through `rails::fabric`), or release memory a NIC may still write (a region in use by
//! a posted batch cannot be unregistered; a failed rail's queue pair is destroyed before its
//! slices are posted again).

mod link;
mod local;
mod notify;
mod page;
mod stage;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peermem::{PeerMemory, Registry};
use peermem_rdma::{ConnectOpts, RdmaError};

use crate::metadata::{Metadata, MetadataError};
use crate::rails::RailOptions;
use crate::span::RegionId;
use state::Inner;

/// The engine's knobs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The host's name in the metadata (default: the kernel's hostname).
    pub host: Option<String>,
    /// The NICs to use (default: every RDMA device whose port is active).
    pub nics: Option<Vec<String>>,
    /// The rdma_cm port each NIC listens on (0: any free one).
    pub port: u16,
    /// Slice size, moving-average weight, cool-down of a failed rail.
    pub rails: RailOptions,
    /// Each connection's timeouts and queue depths.
    pub connect: ConnectOpts,
    /// Work requests in flight per rail.
    pub depth: usize,
    /// The bound on a batch: past it the ticket fails (after its rails are stopped).
    pub timeout: Duration,
    /// Where sysfs is read (`/` on a live system).
    pub root: PathBuf,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            host: None,
            nics: None,
            port: 0,
            rails: RailOptions::default(),
            connect: ConnectOpts::default(),
            depth: 64,
            timeout: Duration::from_secs(60),
            root: PathBuf::from("/"),
        }
    }
}

/// Why the engine refused or a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no RDMA device could be opened")]
    NoNic,
    #[error("reading the RDMA devices: {0}")]
    Nic(String),
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("{0} is not registered with this engine")]
    UnknownRegion(RegionId),
    #[error("the peer has no {0}")]
    UnknownRemoteRegion(RegionId),
    #[error("{0:?} is not a connected peer")]
    UnknownPeer(PeerId),
    #[error("{0} is in use by a posted batch: unregister it once the batch has ended")]
    InUse(RegionId),
    #[error("request {index}: {why}")]
    BadRequest { index: usize, why: String },
    #[error("cannot connect to {addr}: {why}")]
    Unreached { addr: SocketAddr, why: String, nothing_listens: bool },
    #[error("{addr} is not a peermem engine's listener: {why}")]
    NotAnEngine { addr: SocketAddr, why: String },
    #[error("no NIC of this host connects to {host}: {reasons:?}")]
    NoLink { host: String, reasons: Vec<String> },
    #[error("no rail reaches both memories of request {index}: {reasons:?}")]
    NoRail { index: usize, reasons: Vec<String> },
    #[error("every rail to {host} failed and none returned within the batch's bound: {failures:?}")]
    NoRailLeft { host: String, failures: Vec<String> },
    #[error("{host} is gone: every rail failed, and its engine closed the connections or no longer listens ({why})")]
    PeerGone { host: String, why: String },
    #[error("the peer refused access to its memory ({error}): its region was unregistered, or the range is not its")]
    RemoteAccess { error: String },
    #[error("the peer could not stage its memory: {error}")]
    RemoteStaging { error: String },
    #[error("the batch did not end within {ms} ms; its rails were stopped before this error")]
    Timeout { ms: u128 },
    #[error("a notification of {len} bytes: at most {max}")]
    NotifyTooLong { len: usize, max: usize },
    #[error("the engine's lock was poisoned by a panic in another thread")]
    Poisoned,
}

/// A connected peer, as `connect` returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Local bytes to the peer's memory.
    Write,
    /// The peer's bytes to local memory.
    Read,
}

/// One request of a batch: `len` bytes between `local` at `local_offset` and the peer's
/// `remote` at `remote_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub local: RegionId,
    pub local_offset: u64,
    pub remote: RegionId,
    pub remote_offset: u64,
    pub len: u64,
}

/// What one rail did for a batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RailReport {
    pub nic: String,
    pub remote_nic: String,
    pub bytes: u64,
    pub slices: u64,
    /// `up`, or `failed` (then `error` says why).
    pub state: String,
    pub error: Option<String>,
}

/// A finished batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub bytes: u64,
    pub requests: usize,
    pub seconds: f64,
    pub rails: Vec<RailReport>,
    /// Slices posted again after their rail failed.
    pub retries: u64,
    /// How each side's NICs reach the memories, and any staging, in the ranking's words.
    pub routes: Vec<String>,
    /// Whether the notification was sent.
    pub notified: bool,
}

/// A notification a peer sent after a batch of its landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The peer's host name, from its connection.
    pub from: String,
    pub message: Vec<u8>,
}

/// The most bytes a notification carries.
pub const NOTIFY_MAX: usize = 4096;

/// What the engine's threads share.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, EngineError> {
        self.inner.lock().map_err(|_| EngineError::Poisoned)
    }
}

/// The transfer engine. Dropping it stops its listener and closes every connection.
pub struct Engine {
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

/// A posted batch.
pub struct Ticket {
    shared: Arc<Shared>,
    id: u64,
}

impl Engine {
    /// Opens the NICs and starts listening. `registry` judges every (region, NIC) pair.
    pub fn new(registry: Registry, options: EngineOptions) -> Result<Engine, EngineError> {
        let (inner, listeners) = Inner::new(registry, options)?;
        let shared = Arc::new(Shared { inner: Mutex::new(inner), stop: AtomicBool::new(false) });
        let s = shared.clone();
        let listener = std::thread::Builder::new()
            .name("peermem-engine".into())
            .spawn(move || state::serve(&s, listeners))
            .map_err(|e| EngineError::Nic(format!("starting the listener thread: {e}")))?;
        Ok(Engine { shared, listener: Some(listener) })
    }

    /// Registers `region` with every NIC of the engine (once per region: the same `Arc` again
    /// gives the same id). How each NIC registered it, and why, is in `routes`.
    pub fn register(&self, region: Arc<dyn PeerMemory>) -> Result<RegionId, EngineError> {
        self.shared.lock()?.register(region)
    }

    /// Registers every region of `regions` under one lock, all or none: when one fails, those
    /// this call registered before it are unregistered, and its error comes with its index.
    pub fn register_all(&self, regions: &[Arc<dyn PeerMemory>]) -> Result<Vec<RegionId>, EngineError> {
        self.shared.lock()?.register_all(regions)
    }

    /// `len` bytes at `offset` of a registered region, registered on their own where no
    /// registration covers them yet (a range cache: sub-ranges of a registered region cost
    /// nothing).
    pub fn register_range(&self, region: RegionId, offset: u64, len: u64) -> Result<(), EngineError> {
        self.shared.lock()?.register_range(region, offset, len)
    }

    /// Ends a region's registrations; refused while a posted batch uses it.
    pub fn unregister(&self, region: RegionId) -> Result<(), EngineError> {
        self.shared.lock()?.unregister(region)
    }

    /// How each NIC registered `region`, one line each.
    pub fn routes(&self, region: RegionId) -> Result<Vec<String>, EngineError> {
        self.shared.lock()?.routes(region)
    }

    /// Registrar calls and cache hits, summed over the NICs.
    pub fn cache_counts(&self) -> Result<crate::cache::CacheCounts, EngineError> {
        Ok(self.shared.lock()?.cache_counts())
    }

    /// This host's metadata, encoded for the peer.
    pub fn metadata(&self) -> Result<Vec<u8>, EngineError> {
        Ok(self.shared.lock()?.metadata().encode())
    }

    /// Connects to the peer that `metadata` describes: one connection per pair of NICs that
    /// reach each other.
    pub fn connect(&self, metadata: &[u8]) -> Result<PeerId, EngineError> {
        let meta = Metadata::decode(metadata)?;
        self.shared.lock()?.connect(meta)
    }

    /// Connects to the engine listening at `addr` (any one of its NICs' addresses, as its
    /// `listen_addrs` gives them), with no metadata carried by the application: the listener
    /// offers its metadata page with the connection and this side reads it (RDMA READ), then
    /// connects to the peer's other NICs. The peer's regions are those it had registered when
    /// the page was read: connect again (or carry `metadata`) to see later ones.
    /// `EngineError::Unreached` says whether nothing listens at `addr` (a peer still starting).
    pub fn connect_to(&self, addr: SocketAddr) -> Result<PeerId, EngineError> {
        self.shared.lock()?.connect_to(addr)
    }

    /// The hosts connected to this engine (one entry per open accepted connection, by the name
    /// each peer's engine gave): a peer whose process ended leaves the list.
    pub fn accepted(&self) -> Result<Vec<String>, EngineError> {
        let mut inner = self.shared.lock()?;
        inner.poll_incoming();
        Ok(inner.accepted_hosts())
    }

    /// The local addresses peers connect to.
    pub fn listen_addrs(&self) -> Result<Vec<(String, SocketAddr)>, EngineError> {
        Ok(self.shared.lock()?.listen_addrs())
    }

    /// Posts a batch to `peer`; `notify`, when given, reaches the peer after every byte landed.
    pub fn post(&self, peer: PeerId, batch: &[Request], notify: Option<&[u8]>) -> Result<Ticket, EngineError> {
        if let Some(n) = notify.filter(|n| n.len() > NOTIFY_MAX) {
            return Err(EngineError::NotifyTooLong { len: n.len(), max: NOTIFY_MAX });
        }
        let id = self.shared.lock()?.post(peer, batch, notify)?;
        Ok(Ticket { shared: self.shared.clone(), id })
    }

    /// Notifications received so far, waiting up to `timeout` for the first. Only the receive
    /// rings are polled here (batches progress in their tickets' waits and the listener
    /// thread), at most a millisecond apart once nothing arrives.
    pub fn notifications(&self, timeout: Duration) -> Result<Vec<Notification>, EngineError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            let got = {
                let mut inner = self.shared.lock()?;
                inner.poll_incoming();
                inner.take_notifications()
            };
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// The regions `peer` registered, with their lengths, as its metadata listed them.
    pub fn remote_regions(&self, peer: PeerId) -> Result<Vec<(RegionId, u64)>, EngineError> {
        self.shared.lock()?.remote_regions(peer)
    }

    /// The rails' states towards `peer`, for a report without a batch.
    pub fn rails(&self, peer: PeerId) -> Result<Vec<RailReport>, EngineError> {
        self.shared.lock()?.rail_states(peer)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
    }
}

impl Ticket {
    /// The report if the batch has ended (or its error), else `None`. Makes progress.
    pub fn try_wait(&self) -> Option<Result<Report, EngineError>> {
        match self.shared.lock() {
            Ok(mut inner) => {
                inner.progress();
                inner.finished(self.id)
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// `try_wait` of every ticket in `tickets` (in order), with one progress round per engine
    /// rather than one per ticket: the way to watch many batches at once.
    pub fn try_wait_any(tickets: &[&Ticket]) -> Vec<Option<Result<Report, EngineError>>> {
        let mut out: Vec<Option<Result<Report, EngineError>>> = tickets.iter().map(|_| None).collect();
        let mut seen = vec![false; tickets.len()];
        for i in 0..tickets.len() {
            if seen[i] {
                continue;
            }
            let shared = &tickets[i].shared;
            let mut inner = shared.lock();
            if let Ok(inner) = inner.as_mut() {
                inner.progress();
            }
            for (j, t) in tickets.iter().enumerate().skip(i).filter(|(_, t)| Arc::ptr_eq(&t.shared, shared)) {
                seen[j] = true;
                out[j] = match inner.as_mut() {
                    Ok(inner) => inner.finished(t.id),
                    Err(_) => Some(Err(EngineError::Poisoned)),
                };
            }
        }
        out
    }

    /// Waits for the batch, at most `timeout`; `Ok(None)` when it has not ended by then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<Report>, EngineError> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if let Some(r) = self.try_wait() {
                return r.map(Some);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            spins += 1;
            if spins > 256 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Waits for the batch; bounded by the engine's `timeout` (the batch fails past it).
    pub fn wait(&self) -> Result<Report, EngineError> {
        loop {
            if let Some(r) = self.wait_timeout(Duration::from_secs(1))? {
                return Ok(r);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A dropped ticket's batch goes on; its result is forgotten once it ends.
        if let Ok(mut inner) = self.shared.lock() {
            inner.forget(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)
    }

    #[test]
    fn a_host_without_rdma_devices_is_a_typed_error_not_a_panic() {
        let root = fixture("qemu-switch");
        let registry = Registry::new(Arc::new(peermem::Topology::discover(&root).unwrap()));
        let options = EngineOptions { root, ..EngineOptions::default() };
        match Engine::new(registry, options) {
            Err(EngineError::NoNic) | Err(EngineError::Rdma(RdmaError::NoLibrary)) => {}
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("an engine without a NIC"),
        }
    }

    #[test]
    fn a_named_nic_that_is_absent_is_named_in_the_error() {
        let root = fixture("qemu-switch");
        let registry = Registry::new(Arc::new(peermem::Topology::discover(&root).unwrap()));
        let options = EngineOptions { root, nics: Some(vec!["mlx5_9".into()]), ..EngineOptions::default() };
        let Err(e) = Engine::new(registry, options) else { panic!("an engine on a NIC that is not there") };
        let text = e.to_string();
        assert!(text.contains("mlx5_9") || text.contains("libibverbs"), "{text}");
    }
}
