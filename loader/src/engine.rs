//! The asynchronous, batched loader: `Loader::new(&registry, opts)`, `open(path)`,
//! `submit(batch) -> Ticket`, `ticket.wait()`. Each read of a batch is `(file, offset, len,
//! destination, destination offset)`; a worker thread plans every destination with the mover's
//! planner, splits reads into requests of `chunk` bytes, keeps `depth` of them in flight in the
//! I/O engine, and reports per destination the route, the method, every reason and fallback.
//!
//! Owns: batch validation, splitting (direct O_DIRECT bodies, aligned bounces for misaligned
//! pieces), staging pools (host buffers for CPU copies, host buffers imported into Vulkan for
//! GPU copies into device-local memory), verification, and keeping every region and file alive
//! until the reads into it are reaped. Must not: decide directness (`peermem::mover` does) or
//! compute an address.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peermem::mover::{BounceReason, Decision, Plan, Probe, Reach, RouteHealth};
use peermem::{Backing, Bdf, Entry, HostRegion, Peer, PeerMemory, Provider, RegionId, Registration, Registry, Side};
use peermem_vulkan::{Device, VulkanRegion};
use xxhash_rust::xxh3::Xxh3;

use crate::error::LoadError;
use crate::io::{Done, Io, IoReq};
use crate::options::{Engine, Options, Verify};
use crate::source::{KernelSource, ALIGN};

mod vfio;
pub use vfio::NvmeHandle;
use vfio::NvmeRead;

/// Bytes a route probe into device memory moves (the source's own bytes, read-only).
const PROBE_LEN: u64 = 64 << 10;

/// An open source file or block device (O_DIRECT when the filesystem allows). Cheap to clone;
/// the fd closes when the last clone and the last read of it are gone.
#[derive(Debug, Clone)]
pub struct FileHandle(pub(crate) Arc<KernelSource>);

impl FileHandle {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.0.is_direct()
    }
}

/// A staging buffer: host pages, and their import into the GPU.
type StageSlot = (Arc<HostRegion>, VulkanRegion);
/// A batch's hold on one destination's GPU staging slots (`None`: not GPU-staged).
type HeldSlots<'a> = Option<std::sync::MutexGuard<'a, Vec<StageSlot>>>;

/// A GPU destination without a usable CPU mapping for direct reads: bytes are staged through
/// pinned host buffers imported into the device, then copied by the GPU.
struct GpuStage {
    device: Device,
    region: Arc<VulkanRegion>,
    /// Staging buffers (host pages, and their import into the device). Locked by the batch using
    /// them, so two loaders never share a slot.
    slots: Mutex<Vec<StageSlot>>,
    /// Bytes per staging buffer.
    slot_len: u64,
    /// A batch gave up on reads still in flight into these slots: they take no new reads.
    abandoned: std::sync::atomic::AtomicBool,
}

/// Where a read's bytes go: a registered region, optionally with a GPU staging path.
#[derive(Clone)]
pub struct Dest {
    entry: Arc<Entry>,
    gpu: Option<Arc<GpuStage>>,
}

impl std::fmt::Debug for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dest").field("region", &self.entry.id()).field("gpu_staged", &self.gpu.is_some()).finish()
    }
}

impl Dest {
    /// A registered region (host memory, p2pmem, a BAR, a host-visible Vulkan buffer).
    pub fn region(reg: &Registration) -> Dest {
        Dest { entry: reg.entry().clone(), gpu: None }
    }
    pub fn id(&self) -> RegionId {
        self.entry.id()
    }
    pub fn len(&self) -> u64 {
        self.entry.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entry.is_empty()
    }
}

impl From<&Registration> for Dest {
    fn from(r: &Registration) -> Dest {
        Dest::region(r)
    }
}

impl From<&Dest> for Dest {
    fn from(d: &Dest) -> Dest {
        d.clone()
    }
}

/// One read of a batch.
#[derive(Debug, Clone)]
struct Read {
    file: FileHandle,
    offset: u64,
    len: u64,
    dest: Dest,
    dest_offset: u64,
    expect: Option<u64>,
}

/// Reads submitted together; one report for all.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    reads: Vec<Read>,
    /// Reads of namespaces owned by the VFIO driver.
    nvme: Vec<NvmeRead>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    /// Adds a read of `len` bytes of `file` at `offset` into `dest` at `dest_offset`.
    pub fn read(
        &mut self,
        file: &FileHandle,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
    ) -> &mut Self {
        let dest = dest.into();
        self.reads.push(Read { file: file.clone(), offset, len, dest, dest_offset, expect: None });
        self
    }
    /// As `read`, with the xxh3-64 the bytes must have (checked when verification is on).
    pub fn read_expect(
        &mut self,
        file: &FileHandle,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
        xxh3: u64,
    ) -> &mut Self {
        self.read(file, offset, len, dest, dest_offset);
        self.reads.last_mut().expect("just pushed").expect = Some(xxh3);
        self
    }
    /// Adds a read of `len` bytes at byte `offset` of the namespace behind `ns` (through the
    /// userspace VFIO driver) into `dest` at `dest_offset`.
    pub fn read_nvme(
        &mut self,
        ns: &NvmeHandle,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
    ) -> &mut Self {
        self.nvme.push(NvmeRead { ns: ns.clone(), offset, len, dest: dest.into(), dest_offset, expect: None });
        self
    }
    /// As `read_nvme`, with the xxh3-64 the bytes must have (checked when verification is on).
    pub fn read_nvme_expect(
        &mut self,
        ns: &NvmeHandle,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
        xxh3: u64,
    ) -> &mut Self {
        self.read_nvme(ns, offset, len, dest, dest_offset);
        self.nvme.last_mut().expect("just pushed").expect = Some(xxh3);
        self
    }
    /// Reads in the batch (file and namespace reads).
    pub fn len(&self) -> usize {
        self.reads.len() + self.nvme.len()
    }
    pub fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.nvme.is_empty()
    }
    /// Total bytes the batch moves.
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.len).chain(self.nvme.iter().map(|r| r.len)).sum()
    }
}

/// How the bytes of one destination moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The reading device wrote the destination's pages itself (O_DIRECT into them).
    Direct,
    /// Read into host staging buffers, copied on by the CPU.
    Bounce,
    /// Read into pinned host staging buffers, copied on by the GPU (device-local memory).
    GpuStaged,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Bounce => "bounce",
            Via::GpuStaged => "staged-gpu-copy",
        }
    }
}

/// What happened for one destination of a batch.
#[derive(Debug, Clone)]
pub struct DestReport {
    pub region: RegionId,
    /// The registry's route kind for (destination, the device reading the files).
    pub route: &'static str,
    pub via: Via,
    /// How, in words (engine, fixed buffers, staging).
    pub method: String,
    /// The route's reasons, then the planner's and the loader's.
    pub reasons: Vec<String>,
    /// Bytes that went direct, and through staging.
    pub bytes_direct: u64,
    pub bytes_staged: u64,
}

/// What a batch did.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub bytes: u64,
    /// Wall time from the start of the batch's I/O to its last completion (verification excluded).
    pub seconds: f64,
    /// The I/O engine, and why when it is the fallback.
    pub engine: String,
    pub dests: Vec<DestReport>,
    /// Every fallback taken (engine, fixed buffers, misaligned pieces bounced, buffered files).
    pub fallbacks: Vec<String>,
    /// xxh3-64 of each read's destination bytes (verification on): the file reads in batch
    /// order, then the namespace reads (`Batch::read_nvme`) in batch order.
    pub checksums: Vec<u64>,
    /// `Some(true)` when every check asked for passed (a failed one is an error instead);
    /// `None` when verification was off or nothing could be checked.
    pub verified: Option<bool>,
}

impl BatchReport {
    /// One report for two parts of a batch run one after the other.
    fn merge(mut self, o: BatchReport) -> BatchReport {
        self.bytes += o.bytes;
        self.seconds += o.seconds;
        if o.engine != self.engine {
            self.engine = format!("{}; {}", self.engine, o.engine);
        }
        self.dests.extend(o.dests);
        self.fallbacks.extend(o.fallbacks);
        self.checksums.extend(o.checksums);
        self.verified = match (self.verified, o.verified) {
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        self
    }
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e6
    }
    /// The route of the first destination ("none" for an empty batch).
    pub fn route(&self) -> &'static str {
        self.dests.first().map_or("none", |d| d.route)
    }
    /// The way the first destination was filled ("none" for an empty batch).
    pub fn via(&self) -> &'static str {
        self.dests.first().map_or("none", |d| d.via.name())
    }
    /// True when every byte went direct.
    pub fn all_direct(&self) -> bool {
        self.dests.iter().all(|d| d.bytes_staged == 0 && d.via == Via::Direct)
    }
}

impl std::fmt::Display for BatchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "engine:     {}", self.engine)?;
        for d in &self.dests {
            writeln!(f, "region {}: route {}, {} ({})", d.region, d.route, d.via.name(), d.method)?;
            for r in &d.reasons {
                writeln!(f, "  why:      {r}")?;
            }
        }
        for fb in &self.fallbacks {
            writeln!(f, "fallback:   {fb}")?;
        }
        let v = match self.verified {
            Some(true) => "verified (xxh3)",
            Some(false) => "NOT verified",
            None => "not verified",
        };
        write!(f, "moved:      {} bytes in {:.3} s = {:.1} MB/s, {v}", self.bytes, self.seconds, self.mb_per_s())
    }
}

type Outcome = Result<BatchReport, LoadError>;

#[derive(Default)]
struct Slot {
    result: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl Slot {
    fn set(&self, r: Outcome) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }
}

/// A submitted batch. Dropping it does not cancel the batch: its regions and files stay held by
/// the loader until its reads complete.
pub struct Ticket {
    slot: Arc<Slot>,
    timeout: Duration,
    taken: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("taken", &self.taken).finish()
    }
}

impl Ticket {
    /// The outcome if the batch is done (once: later calls give `None`).
    pub fn try_wait(&mut self) -> Option<Outcome> {
        let r = self.slot.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.taken |= r.is_some();
        r
    }
    /// Waits at most `t` for the outcome (`None`: not done yet, or already taken).
    pub fn wait_timeout(&mut self, t: Duration) -> Option<Outcome> {
        if self.taken {
            return None;
        }
        let g = self.slot.result.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self.slot.cv.wait_timeout_while(g, t, |r| r.is_none()).unwrap_or_else(|p| p.into_inner());
        let r = g.take();
        self.taken |= r.is_some();
        r
    }
    /// Waits for the outcome, at most the loader's timeout per batch queued ahead of it and for
    /// this batch itself (`LoadError::Timeout` after that).
    pub fn wait(mut self) -> Outcome {
        let t = self.timeout;
        self.wait_timeout(t).unwrap_or(Err(LoadError::Timeout { what: "waiting for a batch", ms: t.as_millis() }))
    }
}

enum Job {
    Batch(Batch, Arc<Slot>),
}

/// Reads files into registered memory, asynchronously and in batches.
pub struct Loader {
    registry: Registry,
    opts: Options,
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    engine: String,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("engine", &self.engine).field("opts", &self.opts).finish()
    }
}

impl Loader {
    /// A loader over `registry` (destinations must be registered there). Starts the I/O engine:
    /// io_uring unless unavailable or `opts.engine` says otherwise.
    pub fn new(registry: &Registry, opts: Options) -> Result<Loader, LoadError> {
        opts.check()?;
        let (io, engine) = match opts.engine {
            Engine::Pool => (Io::pool(opts.depth), format!("preadv thread pool ({} threads): asked for", opts.depth)),
            Engine::Uring => (
                Io::uring(opts.depth).map_err(|e| LoadError::Engine(format!("io_uring unavailable: {e}")))?,
                "io_uring".to_string(),
            ),
            Engine::Auto => match Io::uring(opts.depth) {
                Ok(io) => (io, "io_uring".to_string()),
                Err(e) => {
                    tracing::warn!(%e, "io_uring unavailable: reading through a preadv thread pool");
                    (
                        Io::pool(opts.depth),
                        format!("preadv thread pool ({} threads): io_uring unavailable: {e}", opts.depth),
                    )
                }
            },
        };
        let (tx, rx) = mpsc::channel();
        let mut w = Worker {
            registry: registry.clone(),
            opts: opts.clone(),
            io,
            engine: engine.clone(),
            staging: Vec::new(),
            decisions: HashMap::new(),
            health: RouteHealth::new(),
            next_tag: 1,
            nvme_stage: None,
        };
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = queued.clone();
        let worker = std::thread::Builder::new()
            .name("peermem-loader".into())
            .spawn(move || w.serve(rx, &q))
            .map_err(|e| LoadError::Engine(format!("spawning the loader thread: {e}")))?;
        Ok(Loader { registry: registry.clone(), opts, tx: Some(tx), worker: Some(worker), queued, engine })
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
    /// The I/O engine in use, and why when it is the fallback.
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// Opens a source: a regular file or block device, O_DIRECT when the filesystem allows.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<FileHandle, LoadError> {
        Ok(FileHandle(Arc::new(KernelSource::open(path)?)))
    }

    /// Takes a controller owned by the userspace VFIO driver as a source: its namespace is read
    /// with `Batch::read_nvme`, many commands in flight, each aimed at the address the registry
    /// routes for this controller. `NvmeHandle::into_controller` gives it back.
    pub fn open_nvme(&self, ctrl: peermem_nvme::Controller) -> Result<NvmeHandle, LoadError> {
        NvmeHandle::new(ctrl, &self.registry)
    }

    /// A destination in device-local GPU memory: reads are staged through `depth` pinned host
    /// buffers of `chunk` bytes, imported into `device`, and copied there by the GPU while the
    /// next reads are in flight. `reg` must be the registration of `region`.
    pub fn vulkan_device_dest(
        &self,
        reg: &Registration,
        device: &Device,
        region: Arc<VulkanRegion>,
    ) -> Result<Dest, LoadError> {
        if reg.len() != region.len() || reg.cpu_range() != region.cpu_range() {
            return Err(LoadError::Layout("the registration is not the given Vulkan region's".into()));
        }
        // Staging buffers of up to 8 requests each (at least 4 MiB): one GPU copy per buffer,
        // and enough buffers to keep `depth` requests in flight while copies run.
        let chunk = self.opts.block_chunk();
        let slot_len = (chunk * 8).clamp(4 << 20, crate::sys::MAX_FIXED);
        let n = (self.opts.depth as u64 * chunk).div_ceil(slot_len).max(1) + 2;
        let slots = (0..n.min(64))
            .map(|_| {
                let h = Arc::new(HostRegion::new(slot_len)?);
                let v = device.import_host(h.clone() as Arc<dyn PeerMemory>)?;
                Ok((h, v))
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Dest {
            entry: reg.entry().clone(),
            gpu: Some(Arc::new(GpuStage {
                device: device.clone(),
                region,
                slots: Mutex::new(slots),
                slot_len,
                abandoned: false.into(),
            })),
        })
    }

    /// Queues `batch`; its reads start as soon as the batches before it are done.
    pub fn submit(&self, batch: Batch) -> Result<Ticket, LoadError> {
        let slot = Arc::new(Slot::default());
        let tx = self.tx.as_ref().ok_or(LoadError::Closed)?;
        let ahead = self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u32;
        tx.send(Job::Batch(batch, slot.clone())).map_err(|_| LoadError::Closed)?;
        Ok(Ticket { slot, timeout: self.opts.timeout * (ahead + 1), taken: false })
    }

    /// Submits `batch` and waits for it.
    pub fn run(&self, batch: Batch) -> Outcome {
        self.submit(batch)?.wait()
    }

    /// One read, start to end.
    pub fn read(&self, file: &FileHandle, offset: u64, len: u64, dest: impl Into<Dest>, dest_offset: u64) -> Outcome {
        let mut b = Batch::new();
        b.read(file, offset, len, dest, dest_offset);
        self.run(b)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // The worker finishes the queued batches (each bounded by the timeout), then exits.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// What a destination gets for one peer: the planner's decision, cached per loader.
#[derive(Clone)]
struct Planned {
    entry: Weak<Entry>,
    decision: Decision,
}

/// A read request in the worker: where its bytes land.
#[derive(Clone)]
enum Target {
    /// Straight into the destination's pages.
    Direct,
    /// Into the staging buffer of `group`, at byte `at` of it.
    Stage { group: usize, at: u64 },
}

#[derive(Clone)]
struct Req {
    read: usize,
    dest: usize,
    off: u64,
    len: u64,
    /// Destination offset (direct).
    doff: u64,
    target: Target,
}

/// One destination of the batch being run.
struct DestRun {
    entry: Arc<Entry>,
    via: Via,
    route: &'static str,
    reasons: Vec<String>,
    /// The CPU's view of the destination (its own mapping or a BAR mapping), for bounces.
    window: Option<Arc<dyn PeerMemory>>,
    gpu: Option<Arc<GpuStage>>,
    fixed: Option<u16>,
    method: String,
    bytes_direct: u64,
    bytes_staged: u64,
}

/// A read in flight: what it holds alive.
struct Flight {
    req: IoReq,
    job: Option<Req>,
}

/// Aligned source bytes read into one staging buffer (by one or more requests), of which bytes
/// `skip..skip+n` go to destination offset `doff` once every part arrived.
struct Group {
    dest: usize,
    skip: u64,
    n: u64,
    doff: u64,
    parts: u32,
    pushed: u32,
    arrived: u32,
    slot: Option<usize>,
}

struct Worker {
    registry: Registry,
    opts: Options,
    io: Io,
    engine: String,
    /// Host staging buffers for CPU bounces (`depth` x `chunk`), allocated on first use.
    staging: Vec<Arc<HostRegion>>,
    decisions: HashMap<(RegionId, Peer), Planned>,
    health: RouteHealth,
    next_tag: u64,
    /// The registered host buffer namespace reads are staged in (bounces, probes, re-reads),
    /// kept for the loader's life: the VFIO driver keeps every buffer it was given mapped until
    /// the controller is closed, so a fresh one per batch would pile up.
    nvme_stage: Option<vfio::Stage>,
}

fn reader_peer(reg: &Registry, f: &KernelSource) -> Peer {
    f.device().and_then(|b| reg.peer(b).ok()).unwrap_or(Peer::Cpu)
}

/// The destination as the CPU reaches it: its own mapping, or a fresh mapping of its BAR range.
fn cpu_window(reg: &Registry, dest: &Entry) -> Result<Arc<dyn PeerMemory>, LoadError> {
    if dest.region().cpu_mapping().is_some() {
        return Ok(dest.region().clone());
    }
    match dest.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => {
            Ok(Arc::new(reg.topology().map_bar(bdf, bar, offset, dest.len())?))
        }
        _ => Err(LoadError::Unreachable("a driver-private region without a CPU mapping".into())),
    }
}

impl Worker {
    fn serve(&mut self, rx: Receiver<Job>, queued: &std::sync::atomic::AtomicUsize) {
        while let Ok(Job::Batch(b, slot)) = rx.recv() {
            // What the batch touches, to name a device that left if the batch fails.
            let mut sources: Vec<Bdf> = b.reads.iter().filter_map(|r| r.file.0.device()).collect();
            sources.extend(b.nvme.iter().map(|r| r.ns.bdf()));
            let dests: Vec<Arc<Entry>> =
                b.reads.iter().map(|r| &r.dest.entry).chain(b.nvme.iter().map(|r| &r.dest.entry)).cloned().collect();
            let files: Vec<Arc<KernelSource>> = b.reads.iter().map(|r| r.file.0.clone()).collect();
            let r = self.run_batch(b).map_err(|e| {
                let emptied = files.iter().any(|f| f.emptied_block_device());
                crate::gone::explain_batch(e, &sources, emptied, &dests, &self.registry)
            });
            if let Err(e) = &r {
                tracing::debug!(%e, "batch failed");
            }
            queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            slot.set(r);
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// The planner's decision for (destination, reader), probing device memory once with the
    /// source's own bytes.
    fn decide(&mut self, entry: &Arc<Entry>, file: &KernelSource, probe_at: Option<(u64, u64)>) -> Decision {
        let peer = reader_peer(&self.registry, file);
        let key = (entry.id(), peer);
        if let Some(p) = self.decisions.get(&key) {
            return p.decision.clone();
        }
        let route = match self.registry.resolve(entry, peer) {
            Ok(r) => r,
            Err(e) => {
                let plan = Plan::Bounce(BounceReason::NotDirect { route: "none", why: e.to_string() });
                return Decision { reasons: vec![format!("plan: {plan}")], plan, route: "unresolved" };
            }
        };
        let decision = if !file.is_direct() {
            let plan = Plan::Bounce(BounceReason::NotDirect {
                route: route.kind.name(),
                why: "the filesystem refused O_DIRECT (page cache copies)".into(),
            });
            let mut reasons = route.reasons();
            reasons.push(format!("plan: {plan}"));
            Decision { plan, route: route.kind.name(), reasons }
        } else {
            let probe = match (entry.provider(), probe_at, cpu_window(&self.registry, entry)) {
                (Provider::Pci(_), Some((at, doff)), Ok(w)) => known_probe(file, at, doff, w),
                _ => None,
            };
            self.health.decide(&route, entry, peer, Reach::KernelPages, probe)
        };
        self.decisions.insert(key, Planned { entry: Arc::downgrade(entry), decision: decision.clone() });
        decision
    }

    fn run_batch(&mut self, mut batch: Batch) -> Outcome {
        if !batch.nvme.is_empty() {
            // Namespace reads are checked before any read of the batch starts, then run after its
            // file reads; one report for both.
            let nvme = std::mem::take(&mut batch.nvme);
            self.check_nvme(&nvme)?;
            let files = if batch.reads.is_empty() { None } else { Some(self.run_batch(batch)?) };
            let ns = self.run_nvme(nvme)?;
            return Ok(match files {
                Some(f) => f.merge(ns),
                None => ns,
            });
        }
        self.decisions.retain(|_, p| p.entry.upgrade().is_some_and(|e| e.is_live()));
        let opts = self.opts.clone();
        let chunk = opts.block_chunk();
        // 1. Every read checked before any starts.
        for r in &batch.reads {
            let flen = r.file.len();
            if r.len == 0 || r.offset.checked_add(r.len).is_none_or(|e| e > flen) {
                return Err(LoadError::BadRange { start: r.offset, end: r.offset.saturating_add(r.len), len: flen });
            }
            if r.dest_offset.checked_add(r.len).is_none_or(|e| e > r.dest.len()) {
                return Err(LoadError::TooSmall { len: r.len, offset: r.dest_offset, region_len: r.dest.len() });
            }
            if !r.dest.entry.is_live() {
                return Err(LoadError::Unregistered { region: r.dest.id() });
            }
        }
        let mut fallbacks = Vec::new();
        if !self.io.is_uring() {
            fallbacks.push(format!("engine: {}", self.engine));
        }
        // 2. One plan per destination (the first read's file names the reading device).
        let mut dests: Vec<DestRun> = Vec::new();
        let mut dest_of: HashMap<RegionId, usize> = HashMap::new();
        let mut read_dest = Vec::with_capacity(batch.reads.len());
        for r in &batch.reads {
            let id = r.dest.id();
            if let Some(&i) = dest_of.get(&id) {
                read_dest.push(i);
                continue;
            }
            let run = self.plan_dest(r, &opts)?;
            dest_of.insert(id, dests.len());
            read_dest.push(dests.len());
            dests.push(run);
        }
        for r in batch.reads.iter().filter(|r| !r.file.is_direct()) {
            fallbacks.push(format!(
                "{}: the filesystem refused O_DIRECT: read through the page cache",
                r.file.path().display()
            ));
        }
        // 3. Requests.
        let mut queue: VecDeque<Req> = VecDeque::new();
        let mut groups: Vec<Group> = Vec::new();
        let mut misaligned = 0u64;
        for (i, r) in batch.reads.iter().enumerate() {
            let d = &dests[read_dest[i]];
            let a = if r.file.is_direct() { ALIGN } else { 1 };
            let body = match d.via {
                Via::Direct => {
                    let va = d.entry.cpu_range().map(|c| c.start().raw() + r.dest_offset);
                    if r.offset % a == 0 && va.is_some_and(|v| v % a == 0) {
                        r.len / a * a
                    } else {
                        0
                    }
                }
                _ => 0,
            };
            let mut o = 0;
            while o < body {
                let n = chunk.min(body - o);
                queue.push_back(Req {
                    read: i,
                    dest: read_dest[i],
                    off: r.offset + o,
                    len: n,
                    doff: r.dest_offset + o,
                    target: Target::Direct,
                });
                o += n;
            }
            if body < r.len {
                if d.via == Via::Direct {
                    misaligned += 1;
                    if opts.strict {
                        return Err(LoadError::NotDirect {
                            what: format!("{} bytes at {:#x} of {}", r.len - body, r.offset + body, r.file.path().display()),
                            why: format!(
                                "O_DIRECT needs {a}-byte aligned file offsets, lengths and memory (file offset {:#x}, destination offset {:#x})",
                                r.offset + body,
                                r.dest_offset + body
                            ),
                            reasons: d.reasons.clone(),
                        });
                    }
                }
                // Aligned pieces covering the rest, each one staging buffer (GPU staging buffers
                // are larger: fewer, longer GPU copies), read in requests of `chunk` bytes.
                let piece = d.gpu.as_ref().map_or(chunk, |g| g.slot_len);
                let (lo, hi) = (r.offset + body, r.offset + r.len);
                let flen_a = r.file.len().div_ceil(a) * a;
                let mut p = lo / a * a;
                while p < hi {
                    let pend = (p + piece).min(hi.div_ceil(a) * a);
                    let (s, e) = (p.max(lo), pend.min(hi));
                    let read_len = pend.min(flen_a) - p;
                    let g = groups.len();
                    let parts = read_len.div_ceil(chunk);
                    groups.push(Group {
                        dest: read_dest[i],
                        skip: s - p,
                        n: e - s,
                        doff: r.dest_offset + (s - r.offset),
                        parts: parts as u32,
                        pushed: 0,
                        arrived: 0,
                        slot: None,
                    });
                    for k in 0..parts {
                        let at = k * chunk;
                        queue.push_back(Req {
                            read: i,
                            dest: read_dest[i],
                            off: p + at,
                            len: chunk.min(read_len - at),
                            doff: 0,
                            target: Target::Stage { group: g, at },
                        });
                    }
                    p = pend;
                }
            }
        }
        if misaligned > 0 {
            fallbacks.push(format!(
                "{misaligned} read(s) not aligned for O_DIRECT: their unaligned parts went through aligned staging buffers"
            ));
        }
        // 4. Staging and fixed buffers.
        let needs_cpu_stage =
            queue.iter().any(|q| matches!(q.target, Target::Stage { .. }) && dests[q.dest].gpu.is_none());
        if needs_cpu_stage && self.staging.is_empty() {
            self.staging =
                (0..opts.depth.min(64)).map(|_| HostRegion::new(chunk).map(Arc::new)).collect::<Result<_, _>>()?;
        }
        let gpu_stages: Vec<Option<Arc<GpuStage>>> = dests.iter().map(|d| d.gpu.clone()).collect();
        let mut gpu_slots: Vec<HeldSlots<'_>> = Vec::new();
        for g in &gpu_stages {
            gpu_slots.push(g.as_ref().map(|g| g.slots.lock().unwrap_or_else(|p| p.into_inner())));
        }
        let mut fixed_set: Vec<Arc<dyn PeerMemory>> = Vec::new();
        let mut staging_fixed = None;
        let mut gpu_fixed: Vec<Option<u16>> = vec![None; dests.len()];
        if self.io.is_uring() && opts.fixed_buffers {
            for d in dests.iter_mut() {
                if d.via == Via::Direct
                    && matches!(d.entry.provider(), Provider::Host { .. })
                    && d.entry.len() <= crate::sys::MAX_FIXED
                    && fixed_set.len() < 1000
                {
                    d.fixed = Some(fixed_set.len() as u16);
                    fixed_set.push(d.entry.region().clone());
                }
            }
            if needs_cpu_stage {
                staging_fixed = Some(fixed_set.len() as u16);
                fixed_set.extend(self.staging.iter().map(|s| s.clone() as Arc<dyn PeerMemory>));
            }
            for (i, g) in gpu_slots.iter().enumerate() {
                if let Some(slots) = g {
                    gpu_fixed[i] = Some(fixed_set.len() as u16);
                    fixed_set.extend(slots.iter().map(|(h, _)| h.clone() as Arc<dyn PeerMemory>));
                }
            }
            if fixed_set.is_empty() {
                // Release an earlier batch's set (and the regions it holds).
                self.io.unregister();
            } else {
                if let Err(why) = self.io.register(fixed_set.clone()) {
                    fallbacks.push(format!("fixed buffers not registered ({why}): plain io_uring reads"));
                    staging_fixed = None;
                    gpu_fixed.iter_mut().for_each(|g| *g = None);
                    for d in dests.iter_mut() {
                        d.fixed = None;
                    }
                }
            }
        }
        for d in dests.iter_mut() {
            let how = match (d.via, self.io.is_uring()) {
                (Via::Direct, true) if d.fixed.is_some() => {
                    "io_uring O_DIRECT reads into the destination's pages, registered as fixed buffers"
                }
                (Via::Direct, true) => "io_uring O_DIRECT reads into the destination's pages",
                (Via::Direct, false) => "preadv O_DIRECT reads into the destination's pages (thread pool)",
                (Via::Bounce, _) => "reads into host staging buffers, CPU copies into the destination",
                (Via::GpuStaged, _) => "reads into pinned host staging buffers, GPU copies into the destination",
            };
            d.method = how.to_string();
        }

        // 5. Keep `depth` requests in flight until all are done (or one failed). GPU copies out
        // of staging run on their own thread, so reads keep flowing while the GPU copies.
        let t0 = Instant::now();
        let mut free_cpu: Vec<usize> = (0..self.staging.len()).rev().collect();
        let mut free_gpu: Vec<Vec<usize>> =
            gpu_slots.iter().map(|g| g.as_ref().map_or(Vec::new(), |s| (0..s.len()).rev().collect())).collect();
        let mut flights: HashMap<u64, Flight> = HashMap::new();
        let mut failed: Option<LoadError> = None;
        let (copy_tx, copy_rx) = mpsc::channel::<GpuCopy>();
        let (back_tx, back_rx) = mpsc::channel::<(GpuCopy, Result<(), LoadError>)>();
        let mut copying = 0usize;
        let copy_timeout = opts.timeout;
        let slots_ref = &gpu_slots;
        let stages_ref = &gpu_stages;
        std::thread::scope(|sc| {
            if gpu_stages.iter().any(Option::is_some) {
                sc.spawn(move || {
                    for c in copy_rx {
                        let r = match (&stages_ref[c.dest], &slots_ref[c.dest]) {
                            (Some(g), Some(slots)) => {
                                g.device.set_copy_timeout(copy_timeout);
                                g.device.copy(&slots[c.slot].1, c.skip, &g.region, c.doff, c.n).map_err(LoadError::from)
                            }
                            _ => Err(LoadError::Engine("a GPU copy for a destination without staging".into())),
                        };
                        if back_tx.send((c, r)).is_err() {
                            return;
                        }
                    }
                });
            } else {
                drop((copy_rx, back_tx));
            }
            let mut done: Vec<Done> = Vec::new();
            loop {
                // Fill.
                while failed.is_none() && flights.len() < opts.depth {
                    let Some(q) = queue.front() else { break };
                    let r = &batch.reads[q.read];
                    let d = &dests[q.dest];
                    let (mem, mem_off, fixed): (Arc<dyn PeerMemory>, u64, Option<u16>) = match q.target {
                        Target::Direct => (d.entry.region().clone(), q.doff, d.fixed),
                        Target::Stage { group, at } => {
                            let slot = match groups[group].slot {
                                Some(s) => s,
                                None => {
                                    let free = match &gpu_slots[q.dest] {
                                        Some(_) => &mut free_gpu[q.dest],
                                        None => &mut free_cpu,
                                    };
                                    let Some(s) = free.pop() else { break };
                                    groups[group].slot = Some(s);
                                    s
                                }
                            };
                            match &gpu_slots[q.dest] {
                                Some(slots) => (slots[slot].0.clone(), at, gpu_fixed[q.dest].map(|b| b + slot as u16)),
                                None => (self.staging[slot].clone(), at, staging_fixed.map(|f| f + slot as u16)),
                            }
                        }
                    };
                    let req = IoReq { file: r.file.0.clone(), off: q.off, mem, mem_off, len: q.len, fixed };
                    let tag = self.tag();
                    let pushed = self.io.push(tag, req.clone());
                    if let Target::Stage { group, .. } = q.target {
                        let g = &mut groups[group];
                        match pushed {
                            Ok(true) => g.pushed += 1,
                            // Nothing of the group in flight: its buffer goes back.
                            _ if g.pushed == 0 => {
                                give_back(g.slot.take(), &gpu_slots[q.dest], &mut free_cpu, &mut free_gpu[q.dest])
                            }
                            _ => {}
                        }
                    }
                    match pushed {
                        Ok(true) => {
                            let q = queue.pop_front().expect("front exists");
                            flights.insert(tag, Flight { req, job: Some(q) });
                        }
                        Ok(false) => break,
                        Err(e) => failed = Some(e),
                    }
                }
                if flights.is_empty() && copying == 0 && (queue.is_empty() || failed.is_some()) {
                    break;
                }
                // Reap reads, or (none in flight) wait for a GPU copy to give its slot back.
                done.clear();
                let mut copied: Vec<(GpuCopy, Result<(), LoadError>)> = Vec::new();
                if flights.is_empty() {
                    match back_rx.recv_timeout(opts.timeout) {
                        Ok(c) => copied.push(c),
                        Err(_) => {
                            failed.get_or_insert(LoadError::Timeout {
                                what: "GPU copies out of staging",
                                ms: opts.timeout.as_millis(),
                            });
                            break;
                        }
                    }
                } else {
                    if let Err(e) = self.io.wait(&mut done, opts.timeout) {
                        failed.get_or_insert(e);
                        break;
                    }
                    if done.is_empty() {
                        failed.get_or_insert(LoadError::Timeout {
                            what: "reads in flight",
                            ms: opts.timeout.as_millis(),
                        });
                        break;
                    }
                }
                copied.extend(back_rx.try_iter());
                for (c, r) in copied {
                    copying -= 1;
                    free_gpu[c.dest].push(c.slot);
                    match r {
                        Ok(()) => dests[c.dest].bytes_staged += c.n,
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                for (tag, res) in done.drain(..) {
                    // A read of an earlier, abandoned batch: the engine held its memory until now.
                    let Some(f) = flights.remove(&tag) else { continue };
                    let q = f.job.clone().expect("every flight of this batch has its job");
                    let r = &batch.reads[q.read];
                    let outcome = match res {
                        Err(e) => Err(LoadError::Io { path: r.file.path().to_path_buf(), source: e }),
                        Ok(n) => self.complete(&q, n as u64, &f, &dests, &mut groups, r, &mut queue),
                    };
                    match outcome {
                        Ok(Completed::Bytes { direct, staged, group }) => {
                            dests[q.dest].bytes_direct += direct;
                            dests[q.dest].bytes_staged += staged;
                            if let Some(g) = group {
                                release(&mut groups[g], &gpu_slots, &mut free_cpu, &mut free_gpu);
                            }
                        }
                        Ok(Completed::Pending) => {
                            if let (Some(_), Target::Stage { group, .. }) = (&failed, &q.target) {
                                release(&mut groups[*group], &gpu_slots, &mut free_cpu, &mut free_gpu);
                            }
                        }
                        Ok(Completed::GpuCopy { group }) => {
                            let g = &mut groups[group];
                            let slot = g.slot.take().expect("a staged group has its buffer");
                            let c = GpuCopy { dest: g.dest, slot, skip: g.skip, doff: g.doff, n: g.n };
                            if copy_tx.send(c).is_ok() {
                                copying += 1;
                            } else {
                                free_gpu[q.dest].push(slot);
                                failed.get_or_insert(LoadError::Engine("the GPU copy thread is gone".into()));
                            }
                        }
                        Err(e) => {
                            if let Target::Stage { group, .. } = q.target {
                                groups[group].arrived += 1;
                                release(&mut groups[group], &gpu_slots, &mut free_cpu, &mut free_gpu);
                            }
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
            // Ends the copy thread after its last copy (each bounded by the copy timeout).
            drop(copy_tx);
        });
        let seconds = t0.elapsed().as_secs_f64();
        if !flights.is_empty() {
            // Abandoned with reads still in flight (the engine holds their memory until they
            // complete): their staging buffers must not take new reads.
            for f in flights.values() {
                if let Some(j @ Req { target: Target::Stage { .. }, .. }) = &f.job {
                    match &dests[j.dest].gpu {
                        Some(g) => g.abandoned.store(true, std::sync::atomic::Ordering::SeqCst),
                        None => self.staging = Vec::new(),
                    }
                }
            }
        }
        drop(gpu_slots);
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(d) = dests.iter().find(|d| !d.entry.is_live()) {
            return Err(LoadError::Unregistered { region: d.entry.id() });
        }
        // 6. Verification.
        let mut checksums = Vec::new();
        let mut verified = None;
        if opts.verify != Verify::Off {
            let mut all = true;
            let mut any = false;
            for (i, r) in batch.reads.iter().enumerate() {
                let d = &dests[read_dest[i]];
                let Some(w) =
                    d.window.clone().or_else(|| d.entry.region().cpu_mapping().map(|_| d.entry.region().clone()))
                else {
                    all = false;
                    continue;
                };
                let h = hash_region(&*w, r.dest_offset, r.len)?;
                checksums.push(h);
                let reread = (opts.verify == Verify::Reread).then_some(|| hash_source(&r.file.0, r.offset, r.len));
                any |= check_read(h, r.expect, reread, || r.file.path().to_path_buf(), r.offset, r.len)?;
            }
            verified = (any && all).then_some(true);
            if !all {
                fallbacks.push("verification: a destination has no CPU mapping to hash".into());
            }
        }
        Ok(BatchReport {
            bytes: batch.bytes(),
            seconds,
            engine: self.engine.clone(),
            dests: dests
                .into_iter()
                .map(|d| DestReport {
                    region: d.entry.id(),
                    route: d.route,
                    via: d.via,
                    method: d.method,
                    reasons: d.reasons,
                    bytes_direct: d.bytes_direct,
                    bytes_staged: d.bytes_staged,
                })
                .collect(),
            fallbacks,
            checksums,
            verified,
        })
    }

    fn plan_dest(&mut self, r: &Read, opts: &Options) -> Result<DestRun, LoadError> {
        let entry = r.dest.entry.clone();
        let probe_at = (r.offset.is_multiple_of(ALIGN) && r.dest_offset.is_multiple_of(ALIGN) && r.len >= ALIGN)
            .then_some((r.offset, r.dest_offset));
        let decision = self.decide(&entry, &r.file.0, probe_at);
        let mut reasons = decision.reasons.clone();
        let via = match (&decision.plan, &r.dest.gpu) {
            (_, Some(g)) if g.abandoned.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(LoadError::Engine(
                    "this destination's staging buffers still have reads of a timed-out batch in flight".into(),
                ));
            }
            (_, Some(_)) => {
                reasons.push("destination: device-local GPU memory, filled by GPU copies from pinned staging".into());
                Via::GpuStaged
            }
            (Plan::Direct, None) => Via::Direct,
            (Plan::Bounce(_), None) => Via::Bounce,
        };
        if opts.strict && via != Via::Direct {
            let why = match (&decision.plan, via) {
                (Plan::Bounce(_), _) => decision.plan.to_string(),
                _ => "device-local memory is filled through staging buffers and GPU copies".into(),
            };
            return Err(LoadError::NotDirect { what: format!("region {}", entry.id()), why, reasons });
        }
        let window = match via {
            Via::Bounce | Via::Direct => Some(cpu_window(&self.registry, &entry)?),
            Via::GpuStaged => None,
        };
        Ok(DestRun {
            entry,
            via,
            route: decision.route,
            reasons,
            window,
            gpu: r.dest.gpu.clone(),
            fixed: None,
            method: String::new(),
            bytes_direct: 0,
            bytes_staged: 0,
        })
    }

    /// Handles one completion: a short direct read continues; the last part of a staged group
    /// is copied on by the CPU here, or handed to the GPU copy thread.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        q: &Req,
        n: u64,
        f: &Flight,
        dests: &[DestRun],
        groups: &mut [Group],
        r: &Read,
        queue: &mut VecDeque<Req>,
    ) -> Result<Completed, LoadError> {
        let short = |got| LoadError::ShortRead { path: r.file.path().to_path_buf(), offset: q.off, got, want: q.len };
        match q.target {
            Target::Direct => {
                if n == 0 {
                    return Err(short(0));
                }
                if n < q.len {
                    queue.push_front(Req { off: q.off + n, len: q.len - n, doff: q.doff + n, ..q.clone() });
                }
                Ok(Completed::Bytes { direct: n.min(q.len), staged: 0, group: None })
            }
            Target::Stage { group, at } => {
                let g = &mut groups[group];
                // Past the end of the file a read may come back short; the wanted bytes may not.
                let need = (g.skip + g.n).saturating_sub(at).min(q.len);
                if n < need {
                    return Err(short(n));
                }
                g.arrived += 1;
                if g.arrived < g.parts {
                    return Ok(Completed::Pending);
                }
                let d = &dests[q.dest];
                if d.gpu.is_some() {
                    return Ok(Completed::GpuCopy { group });
                }
                let w = d.window.as_ref().ok_or_else(|| LoadError::Unreachable("no CPU window".into()))?;
                f.req.mem.copy_to(g.skip, &**w, g.doff, g.n)?;
                Ok(Completed::Bytes { direct: 0, staged: g.n, group: Some(group) })
            }
        }
    }
}

/// What a completed read leaves to do.
enum Completed {
    /// These bytes arrived (and `group`, when given, is done with its staging buffer).
    Bytes { direct: u64, staged: u64, group: Option<usize> },
    /// A part of a staged group arrived; others are still in flight or queued.
    Pending,
    /// Every part of `group` arrived: the GPU copies it on.
    GpuCopy { group: usize },
}

/// A GPU copy out of staging slot `slot` of destination `dest`.
struct GpuCopy {
    dest: usize,
    slot: usize,
    skip: u64,
    doff: u64,
    n: u64,
}

/// Gives a group's staging buffer back once nothing of it is in flight any more.
fn release(g: &mut Group, gpu_slots: &[HeldSlots<'_>], free_cpu: &mut Vec<usize>, free_gpu: &mut [Vec<usize>]) {
    if g.arrived >= g.pushed {
        give_back(g.slot.take(), &gpu_slots[g.dest], free_cpu, &mut free_gpu[g.dest]);
    }
}

fn give_back(slot: Option<usize>, gpu: &HeldSlots<'_>, free_cpu: &mut Vec<usize>, free_gpu: &mut Vec<usize>) {
    if let Some(s) = slot {
        if gpu.is_some() {
            free_gpu.push(s);
        } else {
            free_cpu.push(s);
        }
    }
}

/// A read-only probe of a device-memory route with the source's own bytes: read them through a
/// host buffer, then through the direct route, and compare.
fn known_probe<'a>(
    file: &'a KernelSource,
    at: u64,
    doff: u64,
    window: Arc<dyn PeerMemory>,
) -> Option<Probe<'a, LoadError>> {
    let n = PROBE_LEN
        .min(window.len().saturating_sub(doff) / ALIGN * ALIGN)
        .min(file.len().saturating_sub(at) / ALIGN * ALIGN);
    if n == 0 {
        return None;
    }
    let host = HostRegion::new(n).ok()?;
    let span = host.span_at(Side::Destination, 0, n).ok()?;
    match peermem_nvme::pread_into(&file.file, at, span) {
        Ok(got) if got as u64 == n => {}
        _ => return None,
    }
    let mut expected = vec![0u8; n as usize];
    host.read_at(0, &mut expected).ok()?;
    let (w1, w2, w3) = (window.clone(), window.clone(), window);
    Some(Probe::Known {
        expected,
        poison: Box::new(move |p: &[u8]| w1.write_at(doff, p).map_err(LoadError::from)),
        transfer: Box::new(move || {
            let span = w2.span_at(Side::Destination, doff, n)?;
            let got = peermem_nvme::pread_into(&file.file, at, span)
                .map_err(|source| LoadError::Io { path: file.path().to_path_buf(), source })?;
            if (got as u64) < n {
                return Err(LoadError::ShortRead {
                    path: file.path().to_path_buf(),
                    offset: at,
                    got: got as u64,
                    want: n,
                });
            }
            Ok(())
        }),
        read_back: Box::new(move |b: &mut [u8]| w3.read_at(doff, b).map_err(LoadError::from)),
    })
}

/// Checks one read's destination hash `h` against its expected hash and, when `reread` is
/// given, against a second read of its source; the first that differs is a `HashMismatch`
/// naming the source (`path`), its range and both hashes. Returns whether anything was checked.
pub(crate) fn check_read(
    h: u64,
    expect: Option<u64>,
    reread: Option<impl FnOnce() -> Result<u64, LoadError>>,
    path: impl Fn() -> std::path::PathBuf,
    offset: u64,
    len: u64,
) -> Result<bool, LoadError> {
    let mismatch = |expected| LoadError::HashMismatch { path: path(), offset, len, dest: h, expected };
    if let Some(x) = expect.filter(|&x| x != h) {
        return Err(mismatch(x));
    }
    let mut checked = expect.is_some();
    if let Some(reread) = reread {
        checked = true;
        let s = reread()?;
        if s != h {
            return Err(mismatch(s));
        }
    }
    Ok(checked)
}

/// xxh3-64 of `len` bytes of `w` at `off` (copied out in 1 MiB pieces: no reference over shared
/// memory).
pub(crate) fn hash_region(w: &dyn PeerMemory, off: u64, len: u64) -> Result<u64, LoadError> {
    let mut h = Xxh3::new();
    crate::checksum::read_pieces(w, off, len, |piece| h.update(piece))?;
    Ok(h.digest())
}

/// xxh3-64 of a source range read again through the page cache (a second, buffered open).
fn hash_source(file: &KernelSource, off: u64, len: u64) -> Result<u64, LoadError> {
    use std::os::unix::fs::FileExt;
    let io = |source| LoadError::Io { path: file.path().to_path_buf(), source };
    let f = std::fs::File::open(file.path()).map_err(io)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    let mut o = 0;
    while o < len {
        let n = (buf.len() as u64).min(len - o) as usize;
        f.read_exact_at(&mut buf[..n], off + o).map_err(io)?;
        h.update(&buf[..n]);
        o += n as u64;
    }
    Ok(h.digest())
}
