//! `Loader`: the only way the loader moves bytes. `Loader::new(&registry, opts)`, `open(path)`
//! (`open_many(paths)` for a data set, `open_nvme(controller)`), `submit(batch) -> Ticket`,
//! `ticket.wait()`. A worker thread
//! runs each batch through the stages: plan (`plan`), I/O (`io`), verify (`verify`), report
//! (`report`).
//!
//! Owns: the worker and its queue, the tickets and their bounded waits, the staging pools and
//! fixed buffers of a batch, and keeping every region and source alive until the reads into it
//! are reaped. Must not: decide directness (the planner does, through the plan stage) or
//! compute an address.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peermem::{Bdf, Entry, PeerMemory, Provider, Registration, Registry};
use peermem_vulkan::{Device, VulkanRegion};

use crate::batch::Batch;
use crate::dest::{Dest, Staging};
use crate::error::LoadError;
use crate::io::{self, files, Engine, Flow};
use crate::options::{Access, Options};
use crate::plan::{DestRun, Planned, Planner, Req, Target};
use crate::report::{DestReport, Report, Via};
use crate::source::Source;
use crate::stage::{Pool, Sink, Slot};
use crate::verify;

type Outcome = Result<Report, LoadError>;

/// Where a submitted batch's outcome lands.
#[derive(Default)]
struct Pending {
    result: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl Pending {
    fn set(&self, r: Outcome) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }
}

/// A submitted batch. Dropping it does not cancel the batch: its regions and sources stay held
/// by the loader until its reads complete.
pub struct Ticket {
    pending: Arc<Pending>,
    progress: Arc<AtomicU64>,
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
        let r = self.pending.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.taken |= r.is_some();
        r
    }
    /// Waits at most `t` for the outcome (`None`: not done yet, or already taken).
    pub fn wait_timeout(&mut self, t: Duration) -> Option<Outcome> {
        if self.taken {
            return None;
        }
        let g = self.pending.result.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self.pending.cv.wait_timeout_while(g, t, |r| r.is_none()).unwrap_or_else(|p| p.into_inner());
        let r = g.take();
        self.taken |= r.is_some();
        r
    }
    /// Waits for the outcome as long as the loader makes progress: `LoadError::Timeout` once no
    /// byte landed (of this batch or of one queued before it) within the loader's timeout.
    pub fn wait(self) -> Outcome {
        let t = self.timeout;
        self.wait_reporting(t, |_| {})
    }
    /// As `wait`, calling `tick` with the bytes the loader landed so far every `every` (a
    /// progress line).
    pub fn wait_reporting(mut self, every: Duration, mut tick: impl FnMut(u64)) -> Outcome {
        let every = every.min(self.timeout).max(Duration::from_millis(1));
        let mut last = (self.progress.load(Ordering::Relaxed), Instant::now());
        loop {
            if let Some(r) = self.wait_timeout(every) {
                return r;
            }
            let now = self.progress.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if self.taken || last.1.elapsed() >= self.timeout {
                return Err(LoadError::Timeout { what: "waiting for a batch", ms: self.timeout.as_millis() });
            }
            tick(now);
        }
    }
}

/// Reads files and namespaces into registered memory, asynchronously and in batches.
pub struct Loader {
    registry: Registry,
    opts: Options,
    tx: Option<Sender<(Batch, Arc<Pending>)>>,
    worker: Option<JoinHandle<()>>,
    progress: Arc<AtomicU64>,
    engine: String,
    /// The staging buffers of `cuda_dest`, per device ordinal.
    cuda_staging: Mutex<Vec<(usize, Arc<Staging>)>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("engine", &self.engine).field("opts", &self.opts).finish()
    }
}

impl Loader {
    /// A loader over `registry` (destinations must be registered there). Starts the file
    /// engine: io_uring unless unavailable or `opts.engine` says otherwise.
    pub fn new(registry: &Registry, opts: Options) -> Result<Loader, LoadError> {
        opts.check()?;
        let (io, engine) = files::start(&opts)?;
        let (tx, rx) = mpsc::channel();
        let progress = Arc::new(AtomicU64::new(0));
        let mut w = Worker {
            registry: registry.clone(),
            cpu: Pool::new(opts.depth.min(64), opts.block_chunk()),
            opts: opts.clone(),
            io,
            engine: engine.clone(),
            planner: Planner::default(),
            tags: 0,
            progress: progress.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("peermem-loader".into())
            .spawn(move || w.serve(rx))
            .map_err(|e| LoadError::Engine(format!("spawning the loader thread: {e}")))?;
        Ok(Loader {
            registry: registry.clone(),
            opts,
            tx: Some(tx),
            worker: Some(worker),
            progress,
            engine,
            cuda_staging: Mutex::new(Vec::new()),
        })
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
    /// The file engine in use, and why when it is the fallback.
    pub fn engine(&self) -> &str {
        &self.engine
    }
    /// Bytes this loader landed in destinations so far.
    pub fn moved(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Opens a file or block device, read as the options' `io` mode says (Auto: judged alone
    /// against memory; see `open_many`).
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Source, LoadError> {
        let mut v = self.open_many(&[path])?;
        Ok(v.remove(0))
    }
    /// Opens the files of one data set, read as the options' `io` mode says. Auto judges them
    /// together, once, at open: each file's page-cache residency, and the whole set's bytes
    /// against the memory it may take (eight files of 3 GiB are 24 GiB, not 3 GiB eight times).
    pub fn open_many<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Vec<Source>, LoadError> {
        Source::open_set(paths, &self.registry, self.opts.io, self.opts.strict, Access::Records)
    }
    /// As `open_many`, for files read whole, once, in large requests (a load of whole files,
    /// not records): Auto reads them with O_DIRECT unless they are mostly cached already (the
    /// page cache would add a copy to one sequential pass, and reading ahead would read twice).
    pub fn open_stream<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Vec<Source>, LoadError> {
        Source::open_set(paths, &self.registry, self.opts.io, self.opts.strict, Access::Stream)
    }
    /// Opens the first namespace of NVMe controller `bdf` (kernel driver bound), as a block device
    /// read with O_DIRECT whatever the `io` mode (the device writes the destination).
    pub fn open_namespace(&self, bdf: Bdf) -> Result<Source, LoadError> {
        Source::open_namespace(bdf, &self.registry)
    }
    /// Takes a controller owned by the userspace VFIO driver as a source: its namespace is read
    /// with many commands in flight, each aimed at the address the registry routes for this
    /// controller. `Source::into_controller` gives it back.
    pub fn open_nvme(&self, ctrl: peermem_nvme::Controller) -> Result<Source, LoadError> {
        Source::nvme(ctrl, &self.registry)
    }

    /// A destination in device-local GPU memory: reads are staged through pinned host buffers
    /// imported into `device` (each up to 8 requests long, enough of them to keep `depth`
    /// requests in flight while copies run) and copied there by the GPU. `reg` must be the
    /// registration of `region`.
    pub fn vulkan_device_dest(
        &self,
        reg: &Registration,
        device: &Device,
        region: Arc<VulkanRegion>,
    ) -> Result<Dest, LoadError> {
        let (slot_len, n) = self.gpu_staging();
        Dest::gpu(reg, device, region, slot_len, n)
    }

    /// A destination in CUDA device memory: reads are staged through host buffers pinned for
    /// `device` (sized as for `vulkan_device_dest`; made once per device and loader, shared by
    /// its CUDA destinations) and copied there by the device while the next reads are in flight.
    /// `reg` must be the registration of `region`.
    pub fn cuda_dest(
        &self,
        reg: &Registration,
        device: &peermem_cuda::Device,
        region: Arc<peermem_cuda::CudaRegion>,
    ) -> Result<Dest, LoadError> {
        let (slot_len, n) = self.gpu_staging();
        let gpu = crate::stage::Gpu::Cuda { device: device.clone(), region };
        let ordinal = device.info().ordinal;
        let mut cache = self.cuda_staging.lock().unwrap_or_else(|p| p.into_inner());
        let staging = match cache.iter().find(|(o, s)| *o == ordinal && !s.is_abandoned()) {
            Some((_, s)) => s.clone(),
            None => {
                let s = Arc::new(Staging::new(&gpu, slot_len, n)?);
                cache.retain(|(o, _)| *o != ordinal);
                cache.push((ordinal, s.clone()));
                s
            }
        };
        drop(cache);
        Dest::cuda_staged(reg, gpu, staging)
    }

    /// GPU staging buffers: each up to 8 requests long, enough of them to keep `depth` requests
    /// in flight while copies run (bytes per buffer, buffers).
    fn gpu_staging(&self) -> (u64, usize) {
        let chunk = self.opts.block_chunk();
        let slot_len = (chunk * 8).clamp(4 << 20, crate::sys::MAX_FIXED.max(chunk));
        let n = (self.opts.depth as u64 * chunk).div_ceil(slot_len).max(1) + 2;
        (slot_len, n.min(64) as usize)
    }

    /// Queues `batch`; its reads start as soon as the batches before it are done.
    pub fn submit(&self, batch: Batch) -> Result<Ticket, LoadError> {
        let pending = Arc::new(Pending::default());
        let tx = self.tx.as_ref().ok_or(LoadError::Closed)?;
        tx.send((batch, pending.clone())).map_err(|_| LoadError::Closed)?;
        Ok(Ticket { pending, progress: self.progress.clone(), timeout: self.opts.timeout, taken: false })
    }
    /// Submits `batch` and waits for it.
    pub fn run(&self, batch: Batch) -> Outcome {
        self.submit(batch)?.wait()
    }
    /// One read, start to end.
    pub fn read(&self, source: &Source, offset: u64, len: u64, dest: impl Into<Dest>, dest_offset: u64) -> Outcome {
        let mut b = Batch::new();
        b.read(source, offset, len, dest, dest_offset);
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

/// The loader's thread and what it keeps between batches.
struct Worker {
    registry: Registry,
    opts: Options,
    io: files::Io,
    engine: String,
    planner: Planner,
    /// Host staging buffers for CPU copies (also the scratch of probes and re-reads).
    cpu: Pool,
    tags: u64,
    progress: Arc<AtomicU64>,
}

/// How each destination run of a batch is filled, and where its staged bytes go.
struct Layout<'a> {
    guards: Vec<MutexGuard<'a, Vec<Slot>>>,
    dest_pool: Vec<usize>,
}

impl Worker {
    fn serve(&mut self, rx: Receiver<(Batch, Arc<Pending>)>) {
        while let Ok((b, pending)) = rx.recv() {
            let r = self.run_batch(&b).map_err(|e| {
                // What the batch touches, to name a device that left.
                let sources: Vec<Bdf> = b.reads.iter().filter_map(|r| r.source.device()).collect();
                let dests: Vec<Arc<Entry>> = b.reads.iter().map(|r| r.dest.entry.clone()).collect();
                let emptied = b.reads.iter().any(|r| r.source.emptied());
                crate::gone::explain_batch(e, &sources, emptied, &dests, &self.registry)
            });
            if let Err(e) = &r {
                tracing::debug!(%e, "batch failed");
            }
            // The batch's hold on its regions and sources ends before its waiter hears of it.
            drop(b);
            pending.set(r);
        }
    }

    fn run_batch(&mut self, batch: &Batch) -> Outcome {
        let reg = self.registry.clone();
        let reads = &batch.reads;
        let mut p = self.planner.plan(&reg, reads, &self.opts, &mut self.cpu)?;
        let stages: Vec<Arc<Staging>> =
            p.dests.iter().filter_map(|d| d.gpu.as_ref().map(|g| g.staging.clone())).fold(Vec::new(), |mut v, g| {
                if !v.iter().any(|x| Arc::ptr_eq(x, &g)) {
                    v.push(g);
                }
                v
            });
        let cpu_staged = self.prepare_staging(&reg, &p, reads, &stages)?;
        let requests = p.queue.len();
        let t0 = Instant::now();
        let done = self.move_bytes(&reg, &mut p, reads, &stages, cpu_staged);
        let seconds = t0.elapsed().as_secs_f64();
        for a in done.abandoned.iter().copied() {
            match a {
                0 => self.cpu.abandon(),
                i => stages[i - 1].abandon(),
            }
        }
        let mut fallbacks = done.fallbacks;
        let fixed = done.fixed;
        let (moved, engines) = done.result?;
        if let Some(d) = p.dests.iter().find(|d| !d.entry.is_live()) {
            return Err(LoadError::Unregistered { region: d.entry.id() });
        }
        let checked = verify::verify(self.opts.verify, &reg, reads, &p.read_dest, &p.dests, &mut self.cpu)?;
        fallbacks.append(&mut p.fallbacks);
        fallbacks.extend(checked.fallbacks);
        Ok(Report {
            bytes: batch.bytes(),
            seconds,
            engine: engines,
            requests,
            io: sources_io(reads),
            dests: self.dest_reports(&p, &moved, &fixed),
            fallbacks,
            checksums: checked.checksums,
            source_checksums: checked.source_checksums,
            verified: checked.verified,
        })
    }

    /// Makes the CPU staging buffers when a request of the batch is staged for a CPU copy (true
    /// then), and registers the buffers namespace reads are staged into.
    fn prepare_staging(
        &mut self,
        reg: &Registry,
        p: &Planned,
        reads: &[crate::batch::Read],
        stages: &[Arc<Staging>],
    ) -> Result<bool, LoadError> {
        let staged = |gpu: bool, nvme: bool| {
            p.queue.iter().any(|q| {
                matches!(q.target, Target::Stage { .. })
                    && p.dests[q.dest].gpu.is_some() == gpu
                    && (!nvme || reads[q.read].source.is_nvme())
            })
        };
        let cpu_staged = staged(false, false);
        if cpu_staged {
            let slots = self.cpu.ensure()?;
            if staged(false, true) {
                crate::stage::register_all(slots, reg)?;
            }
        }
        if staged(true, true) {
            for s in stages {
                crate::stage::register_all(&mut s.lock(), reg)?;
            }
        }
        Ok(cpu_staged)
    }

    /// The I/O stage of a batch: its file reads through the file engine, then each controller's
    /// reads through the driver.
    fn move_bytes(
        &mut self,
        reg: &Registry,
        p: &mut Planned,
        reads: &[crate::batch::Read],
        stages: &[Arc<Staging>],
        cpu_staged: bool,
    ) -> Moved {
        let groups = engine_groups(&mut p.queue, reads, &p.dests);
        let layout = Layout::new(&p.dests, stages);
        let mut pools: Vec<&[Slot]> = vec![if cpu_staged { self.cpu.slots() } else { &[] }];
        pools.extend(layout.guards.iter().map(|g| g.as_slice()));
        let mut fallbacks = Vec::new();
        let files_used = reads.iter().any(|r| !r.source.is_nvme());
        let (dest_fixed, pool_fixed) = if files_used {
            fixed_buffers(&mut self.io, self.opts.fixed_buffers, &p.dests, &pools, &mut fallbacks)
        } else {
            (vec![None; p.dests.len()], vec![None; pools.len()])
        };
        if files_used && !self.io.is_uring() {
            fallbacks.push(format!("engine: {}", self.engine));
        }
        for g in p.dests.iter().filter_map(|d| d.gpu.as_ref()) {
            g.gpu.set_copy_timeout(self.opts.timeout);
        }
        let flow = Flow {
            reads,
            entries: p.dests.iter().map(|d| &d.entry).collect(),
            sinks: sinks(&p.dests),
            dest_pool: layout.dest_pool.clone(),
            dest_fixed,
            pools,
            pool_fixed,
            depth: self.opts.depth,
            timeout: self.opts.timeout,
            progress: &self.progress,
        };
        let fixed = flow.dest_fixed.iter().map(Option::is_some).collect();
        let mut out =
            Moved { result: Ok((vec![(0, 0); p.dests.len()], String::new())), fallbacks, abandoned: Vec::new(), fixed };
        let mut engines: Vec<String> = Vec::new();
        for (by, queue) in groups {
            let mut engine = match by {
                By::Files => {
                    engines.push(self.engine.clone());
                    Engine::Files(&mut self.io)
                }
                By::Gds => match io::gds::Gds::new(gds_targets(&p.dests), self.opts.depth) {
                    Ok(g) => {
                        engines.push(format!("cuFile (GPUDirect Storage, {} readers)", g.window()));
                        Engine::Gds(g)
                    }
                    Err(e) => {
                        out.result = Err(e);
                        return out;
                    }
                },
                By::Nvme(i) => {
                    let src = &reads[i].source;
                    let bdf = src.device().map(|b| b.to_string()).unwrap_or_default();
                    engines.push(format!("VFIO NVMe driver ({bdf}, polled, one I/O queue)"));
                    Engine::Nvme(io::nvme::Nvme::new(src, reg, self.opts.depth, self.opts.timeout))
                }
            };
            let ended = io::run(&mut engine, &flow, queue, &mut p.groups, &mut self.tags);
            out.abandoned.extend(ended.abandoned);
            if let Ok((moved, _)) = &mut out.result {
                for (m, e) in moved.iter_mut().zip(&ended.moved) {
                    m.0 += e.0;
                    m.1 += e.1;
                }
            }
            if let Some(e) = ended.error {
                out.result = Err(e);
                return out;
            }
        }
        if let Ok((_, names)) = &mut out.result {
            *names = engines.join("; ");
        }
        out
    }

    /// One report per destination run, with how its bytes moved.
    fn dest_reports(&self, p: &Planned, moved: &[(u64, u64)], fixed: &[bool]) -> Vec<DestReport> {
        let qd = self.opts.depth.clamp(1, peermem_nvme::driver::IO_DEPTH as usize - 1);
        p.dests
            .iter()
            .zip(moved)
            .zip(fixed)
            .map(|((d, &(bytes_direct, bytes_staged)), &fixed)| {
                let buffered = !d.source.is_direct();
                let method = match (d.via, d.source.is_nvme(), self.io.is_uring()) {
                    (Via::Direct, true, _) => format!("NVMe read commands to the routed address, up to {qd} in flight"),
                    (Via::Direct, false, uring) if buffered => format!(
                        "{} buffered reads: the kernel copies the bytes out of the page cache into the destination{}",
                        if uring { "io_uring" } else { "pread (thread pool)" },
                        if fixed { ", registered as fixed buffers" } else { "" }
                    ),
                    (Via::Direct, false, true) if fixed => {
                        "io_uring O_DIRECT reads into the destination's pages, registered as fixed buffers".into()
                    }
                    (Via::Direct, false, true) => "io_uring O_DIRECT reads into the destination's pages".into(),
                    (Via::Direct, false, false) => {
                        "pread O_DIRECT reads into the destination's pages (thread pool)".into()
                    }
                    (Via::Bounce, ..) => "reads into host staging buffers, CPU copies into the destination".into(),
                    (Via::GpuStaged, ..) => {
                        "reads into pinned host staging buffers, GPU copies into the destination".into()
                    }
                    (Via::Gds, ..) => format!(
                        "cuFileRead (GPUDirect Storage): the storage device writes the GPU memory, up to {} reads in flight",
                        self.opts.depth.clamp(1, io::gds::MAX_READERS)
                    ),
                };
                DestReport {
                    region: d.entry.id(),
                    source: d.source.describe(),
                    io: d.source.io(),
                    route: d.route,
                    via: d.via,
                    method,
                    reasons: d.reasons.clone(),
                    bytes_direct,
                    bytes_staged,
                }
            })
            .collect()
    }
}

impl<'a> Layout<'a> {
    /// Locks each distinct GPU staging of the batch's destinations (pool 1, 2, ...; pool 0 is
    /// the CPU pool) for the batch.
    fn new(dests: &[DestRun], stages: &'a [Arc<Staging>]) -> Layout<'a> {
        let pool_of =
            |g: &crate::dest::GpuStage| 1 + stages.iter().position(|s| Arc::ptr_eq(s, &g.staging)).expect("listed");
        let dest_pool = dests.iter().map(|d| d.gpu.as_deref().map_or(0, pool_of)).collect();
        Layout { guards: stages.iter().map(|s| s.lock()).collect(), dest_pool }
    }
}

/// How each distinct source of a batch was read, and why: `path: mode: why`, in batch order.
fn sources_io(reads: &[crate::batch::Read]) -> Vec<String> {
    let mut seen: Vec<&Source> = Vec::new();
    let mut out = Vec::new();
    for r in reads {
        if !seen.iter().any(|s| s.same(&r.source)) {
            seen.push(&r.source);
            let name = r.source.path().map_or_else(|| r.source.describe(), |p| p.display().to_string());
            out.push(format!("{name}: {}", r.source.io()));
        }
    }
    out
}

/// Per destination run: what cuFile reads it into, for runs planned for GPUDirect Storage.
fn gds_targets(dests: &[DestRun]) -> Vec<Option<io::gds::Target>> {
    dests
        .iter()
        .map(|d| match (&d.gds, d.gpu.as_deref().map(|g| &g.gpu)) {
            (Some(f), Some(crate::stage::Gpu::Cuda { region, .. })) => Some((f.clone(), region.clone())),
            _ => None,
        })
        .collect()
}

/// Where each destination run's staged bytes are copied to.
fn sinks(dests: &[DestRun]) -> Vec<Sink<'_>> {
    dests
        .iter()
        .map(|d| match (&d.gpu, &d.window) {
            (Some(g), _) => Sink::gpu(&g.gpu),
            (None, Some(w)) => Sink::Cpu(&**w),
            (None, None) => unreachable!("the plan gives every destination without GPU staging a CPU window"),
        })
        .collect()
}

/// What the I/O stage of a batch did: per destination run (direct, staged) bytes and the
/// engines' names, or the first failure; the fallbacks taken; the staging pools that must take
/// no new reads.
struct Moved {
    result: Result<(Vec<(u64, u64)>, String), LoadError>,
    fallbacks: Vec<String>,
    abandoned: Vec<usize>,
    /// Per destination run: its direct reads went through an io_uring fixed buffer.
    fixed: Vec<bool>,
}

type Queue = std::collections::VecDeque<Req>;

/// Which engine a group of requests runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum By {
    /// The file engine (io_uring or the thread pool).
    Files,
    /// cuFile readers (destinations planned for GPUDirect Storage).
    Gds,
    /// The VFIO driver of the controller behind read `.0`.
    Nvme(usize),
}

/// The batch's requests grouped by engine, in order: the file reads, the cuFile reads, then
/// each controller's.
fn engine_groups(queue: &mut Queue, reads: &[crate::batch::Read], dests: &[DestRun]) -> Vec<(By, Queue)> {
    let mut groups: Vec<(By, Queue)> = Vec::new();
    for q in queue.drain(..) {
        let src = &reads[q.read].source;
        let key = match (src.is_nvme(), dests[q.dest].via, q.target) {
            (true, ..) => By::Nvme(q.read),
            (false, Via::Gds, Target::Direct { .. }) => By::Gds,
            _ => By::Files,
        };
        let found = groups.iter().position(|(k, _)| match (k, key) {
            (By::Nvme(a), By::Nvme(_)) => reads[*a].source.same(src),
            (a, b) => *a == b,
        });
        match found {
            Some(i) => groups[i].1.push_back(q),
            None => groups.push((key, std::iter::once(q).collect())),
        }
    }
    groups.sort_by_key(|(k, _)| match k {
        By::Nvme(_) => 2,
        By::Gds => 1,
        By::Files => 0,
    });
    groups
}

/// The largest host destination registered as an io_uring fixed buffer. Registering faults in
/// and pins every page before the first read starts; a plain read pins its own request's pages
/// while earlier requests are on the device, so a large destination read once (a fresh
/// buffer the size of a file) fills sooner without registration. Fixed buffers pay where the
/// same buffer is read into again and again: ring buffers and staging pools, which are smaller.
const FIXED_DEST_MAX: u64 = 64 << 20;

/// Buffers of earlier batches kept in the fixed set beside a batch's own, at most this many and
/// `FIXED_KEEP_BYTES` in all, while someone still holds them: a `ShardReader` rotating through
/// its ring then finds each buffer registered, instead of the set being replaced (every page
/// unpinned, then the next buffer's faulted and pinned) on every batch.
const FIXED_KEEP: usize = 64;
const FIXED_KEEP_BYTES: u64 = 256 << 20;

/// Where `run` (regions registered one after another) starts in `set`.
fn run_at(set: &[Arc<dyn PeerMemory>], run: &[Arc<dyn PeerMemory>]) -> Option<u16> {
    let first = run.first()?;
    let at = set.iter().position(|r| Arc::ptr_eq(r, first))?;
    let same = set.get(at..at + run.len())?.iter().zip(run).all(|(a, b)| Arc::ptr_eq(a, b));
    same.then_some(at as u16)
}

/// Registers the batch's host destinations that go direct (up to `FIXED_DEST_MAX` bytes each)
/// and its staging pools as io_uring fixed buffers, beside the earlier batches' buffers still in
/// use (`FIXED_KEEP`); a batch whose buffers are all registered already registers nothing. The
/// index of each destination's buffer and of each pool's first buffer, or none when the engine
/// has no fixed buffers.
fn fixed_buffers(
    io: &mut files::Io,
    wanted: bool,
    dests: &[DestRun],
    pools: &[&[Slot]],
    fallbacks: &mut Vec<String>,
) -> (Vec<Option<u16>>, Vec<Option<u16>>) {
    let none = (vec![None; dests.len()], vec![None; pools.len()]);
    if !io.is_uring() || !wanted {
        return none;
    }
    // The batch's buffers, as runs: one region per destination, a pool's slots in order.
    enum Of {
        Dest(usize),
        Pool(usize),
    }
    let mut runs: Vec<(Of, Vec<Arc<dyn PeerMemory>>)> = Vec::new();
    for (i, d) in dests.iter().enumerate() {
        let host = matches!(d.entry.provider(), Provider::Host { .. });
        if d.via == Via::Direct && host && d.entry.len() <= FIXED_DEST_MAX && runs.len() < 1000 {
            runs.push((Of::Dest(i), vec![d.entry.region().clone()]));
        }
    }
    for (i, pool) in pools.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
        runs.push((Of::Pool(i), pool.iter().map(|s| s.region.clone()).collect()));
    }
    if runs.is_empty() {
        // Release the earlier set (and the regions it holds).
        io.unregister();
        return none;
    }
    if !runs.iter().all(|(_, run)| run_at(io.fixed(), run).is_some()) {
        let mut set: Vec<Arc<dyn PeerMemory>> = runs.iter().flat_map(|(_, run)| run.iter().cloned()).collect();
        let mut bytes: u64 = set.iter().map(|r| r.len()).sum();
        let mut kept = 0;
        for r in io.fixed() {
            // Held elsewhere too (the set's own reference is one), and not already in the set.
            let held = Arc::strong_count(r) > 1 && !set.iter().any(|s| Arc::ptr_eq(s, r));
            if held && kept < FIXED_KEEP && bytes + r.len() <= FIXED_KEEP_BYTES {
                bytes += r.len();
                kept += 1;
                set.push(r.clone());
            }
        }
        if let Err(why) = io.register(set) {
            fallbacks.push(format!("fixed buffers not registered ({why}): plain io_uring reads"));
            return none;
        }
    }
    let (mut dest_fixed, mut pool_fixed) = none;
    for (of, run) in &runs {
        let at = run_at(io.fixed(), run);
        match of {
            Of::Dest(d) => dest_fixed[*d] = at,
            Of::Pool(p) => pool_fixed[*p] = at,
        }
    }
    (dest_fixed, pool_fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermem::HostRegion;

    fn region() -> Arc<dyn PeerMemory> {
        Arc::new(HostRegion::new(4096).unwrap())
    }

    #[test]
    fn a_run_is_found_only_where_its_regions_follow_each_other_in_order() {
        let (a, b, c, d) = (region(), region(), region(), region());
        let set = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(run_at(&set, std::slice::from_ref(&c)), Some(2));
        assert_eq!(run_at(&set, &[b.clone(), c.clone()]), Some(1));
        assert_eq!(run_at(&set, &[a.clone(), c.clone()]), None, "not consecutive");
        assert_eq!(run_at(&set, &[c.clone(), b.clone()]), None, "out of order");
        assert_eq!(run_at(&set, &[c, d.clone()]), None, "runs past the set");
        assert_eq!(run_at(&set, &[d]), None);
        assert_eq!(run_at(&set, &[]), None);
    }
}
