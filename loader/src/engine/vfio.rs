//! Namespace reads through the userspace VFIO NVMe driver, for the asynchronous loader: a
//! batch's reads of one destination become NVMe read commands, up to `depth` in flight, aimed at
//! the address the registry routes for the controller (bus address, IOVA, or the controller's
//! own mapping of host pages); what cannot go direct is read into registered host staging buffers
//! and copied on (by the CPU, or by the GPU for device-local memory).
//!
//! Owns: the per-destination plan for a controller (the mover's planner, with a read-only probe
//! of device memory using the namespace's own bytes), splitting reads into commands and staged
//! pieces, and the report. Must not: compute a DMA address (the driver resolves every region
//! through the registry) or release a buffer a command may still write: the driver returns from
//! every transfer with no command in flight, having disabled the controller first after a
//! timeout or a failure (commands it could not stop keep their regions alive).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use peermem::mover::{BounceReason, Decision, Plan, Probe, Reach};
use peermem::{Bdf, Entry, HostRegion, Peer, PeerMemory, Provider, Registration, Registry};
use peermem_nvme::driver::Namespace;
use peermem_nvme::{Controller, Dir, Io};

use super::{
    check_read, cpu_window, hash_region, BatchReport, Dest, DestReport, Outcome, Planned, Via, Worker, PROBE_LEN,
};
use crate::error::LoadError;
use crate::options::Verify;

/// A namespace of a controller owned by the userspace VFIO driver, as a loader source. Cheap to
/// clone; batches holding it keep the controller open.
#[derive(Clone)]
pub struct NvmeHandle(Arc<NvmeSource>);

struct NvmeSource {
    ctrl: Mutex<Controller>,
    bdf: Bdf,
    peer: Peer,
    ns: Namespace,
}

impl std::fmt::Debug for NvmeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeHandle").field("bdf", &self.0.bdf).field("ns", &self.0.ns).finish()
    }
}

impl NvmeHandle {
    pub(crate) fn new(ctrl: Controller, reg: &Registry) -> Result<NvmeHandle, LoadError> {
        let bdf = ctrl.bdf();
        // The loader's registry must know the controller: it resolves every destination for it.
        reg.peer(bdf).map_err(|e| LoadError::Unreachable(format!("{bdf}: not in the loader's topology: {e}")))?;
        let (peer, ns) = (ctrl.peer(), ctrl.namespace());
        Ok(NvmeHandle(Arc::new(NvmeSource { ctrl: Mutex::new(ctrl), bdf, peer, ns })))
    }
    /// The controller's PCI function.
    pub fn bdf(&self) -> Bdf {
        self.0.bdf
    }
    pub fn nsid(&self) -> u32 {
        self.0.ns.nsid
    }
    pub fn block_size(&self) -> u64 {
        self.0.ns.block_size
    }
    /// Bytes of the namespace.
    pub fn len(&self) -> u64 {
        self.0.ns.bytes()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The most read commands the controller held at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.ctrl().peak_in_flight()
    }
    /// Whether a failure (a timeout, a device error) disabled the controller; the next batch
    /// re-creates its queues.
    pub fn needs_reinit(&self) -> bool {
        self.ctrl().needs_reinit()
    }
    /// The controller back, once no other clone of this handle (and no queued batch) holds it.
    pub fn into_controller(self) -> Result<Controller, NvmeHandle> {
        Arc::try_unwrap(self.0).map(|s| s.ctrl.into_inner().unwrap_or_else(|p| p.into_inner())).map_err(NvmeHandle)
    }
    fn ctrl(&self) -> MutexGuard<'_, Controller> {
        self.0.ctrl.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn describe(&self) -> String {
        format!("namespace {} of {} (VFIO driver)", self.0.ns.nsid, self.0.bdf)
    }
}

/// One namespace read of a batch.
#[derive(Debug, Clone)]
pub(crate) struct NvmeRead {
    pub(crate) ns: NvmeHandle,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) dest: Dest,
    pub(crate) dest_offset: u64,
    pub(crate) expect: Option<u64>,
}

/// One destination of the namespace reads being run.
struct NvDest {
    entry: Arc<Entry>,
    via: Via,
    route: &'static str,
    reasons: Vec<String>,
    window: Option<Arc<dyn PeerMemory>>,
    bytes_direct: u64,
    bytes_staged: u64,
}

/// Source bytes `at..at+read` (whole blocks) staged, of which `skip..skip+n` go to destination
/// offset `doff`.
#[derive(Clone, Copy)]
struct Piece {
    at: u64,
    read: u64,
    skip: u64,
    n: u64,
    doff: u64,
}

/// A registered host buffer namespace bytes are staged in.
pub(super) struct Stage {
    host: Arc<HostRegion>,
    reg: Registration,
}

impl Stage {
    fn len(&self) -> u64 {
        self.host.len()
    }
}

/// Reads `n` bytes (whole blocks, at most the stage's length) at byte `at` of the namespace
/// through the stage.
fn read_host(ctrl: &mut Controller, reg: &Registry, stage: &Stage, at: u64, n: u64) -> Result<Vec<u8>, LoadError> {
    let bs = ctrl.namespace().block_size;
    ctrl.transfer(reg, Dir::Read, &stage.reg, 0, at / bs, n)?;
    let mut v = vec![0u8; n as usize];
    stage.host.read_at(0, &mut v)?;
    Ok(v)
}

impl Worker {
    /// The stage, made on first use: `depth` chunks, and at least a probe's length.
    fn nvme_stage(&mut self) -> Result<&Stage, LoadError> {
        if self.nvme_stage.is_none() {
            let len = (self.opts.block_chunk() * self.opts.depth.clamp(1, 64) as u64).max(PROBE_LEN);
            let host = Arc::new(HostRegion::new(len)?);
            let reg = self.registry.register(host.clone() as Arc<dyn PeerMemory>)?;
            self.nvme_stage = Some(Stage { host, reg });
        }
        Ok(self.nvme_stage.as_ref().expect("just made"))
    }

    /// Every namespace read checked before any read of the batch starts.
    pub(super) fn check_nvme(&self, reads: &[NvmeRead]) -> Result<(), LoadError> {
        for r in reads {
            let len = r.ns.len();
            if r.len == 0 || r.offset.checked_add(r.len).is_none_or(|e| e > len) {
                return Err(LoadError::BadRange { start: r.offset, end: r.offset.saturating_add(r.len), len });
            }
            if r.dest_offset.checked_add(r.len).is_none_or(|e| e > r.dest.len()) {
                return Err(LoadError::TooSmall { len: r.len, offset: r.dest_offset, region_len: r.dest.len() });
            }
            if !r.dest.entry.is_live() {
                return Err(LoadError::Unregistered { region: r.dest.id() });
            }
        }
        Ok(())
    }

    /// The planner's decision for (destination, controller), cached per loader. Device memory is
    /// probed once: the namespace's bytes at `probe_at` are read through host memory, then
    /// through the direct route into the destination (poisoned first), and compared.
    fn decide_nvme(&mut self, entry: &Arc<Entry>, ns: &NvmeHandle, probe_at: Option<(u64, u64, u64)>) -> Decision {
        let peer = ns.0.peer;
        let key = (entry.id(), peer);
        if let Some(p) = self.decisions.get(&key) {
            return p.decision.clone();
        }
        let reg = self.registry.clone();
        let route = match reg.resolve(entry, peer) {
            Ok(r) => r,
            Err(e) => {
                let plan = Plan::Bounce(BounceReason::NotDirect { route: "none", why: e.to_string() });
                return Decision { reasons: vec![format!("plan: {plan}")], plan, route: "unresolved" };
            }
        };
        let window = cpu_window(&reg, entry);
        let expected = match (entry.provider(), probe_at, &window) {
            (Provider::Pci(_), Some((at, _, n)), Ok(_)) => match self.nvme_stage() {
                Ok(stage) => read_host(&mut ns.ctrl(), &reg, stage, at, n).ok(),
                Err(_) => None,
            },
            _ => None,
        };
        let probe = match (expected, probe_at, window) {
            (Some(expected), Some((at, doff, n)), Ok(w)) => {
                let (w1, w2) = (w.clone(), w);
                let (reg, e) = (&reg, entry.clone());
                Some(Probe::Known {
                    expected,
                    poison: Box::new(move |p: &[u8]| w1.write_at(doff, p).map_err(LoadError::from)),
                    transfer: Box::new(move || {
                        let mut c = ns.ctrl();
                        let bs = c.namespace().block_size;
                        c.transfer(reg, Dir::Read, &e, doff, at / bs, n).map_err(LoadError::from)
                    }),
                    read_back: Box::new(move |b: &mut [u8]| w2.read_at(doff, b).map_err(LoadError::from)),
                })
            }
            _ => None,
        };
        let decision = self.health.decide(&route, entry, peer, Reach::DeviceAddress, probe);
        self.decisions.insert(key, Planned { entry: Arc::downgrade(entry), decision: decision.clone() });
        decision
    }

    /// Runs a batch's namespace reads (already checked): per destination, its direct parts as
    /// read commands to the routed address with up to `depth` in flight, the rest staged.
    pub(super) fn run_nvme(&mut self, reads: Vec<NvmeRead>) -> Outcome {
        self.decisions.retain(|_, p| p.entry.upgrade().is_some_and(|e| e.is_live()));
        let opts = self.opts.clone();
        let chunk = opts.block_chunk();
        let reg = self.registry.clone();
        for r in &reads {
            r.ns.ctrl().set_timeout(opts.timeout);
        }
        // 1. One plan per destination (its first read's controller is the reading device).
        let mut dests: Vec<NvDest> = Vec::new();
        let mut read_dest = Vec::with_capacity(reads.len());
        for r in &reads {
            if let Some(i) = dests.iter().position(|d| d.entry.id() == r.dest.id()) {
                read_dest.push(i);
                continue;
            }
            let bs = r.ns.block_size();
            let n = PROBE_LEN.min(r.len / bs * bs);
            let probe_at = (r.offset.is_multiple_of(bs) && r.dest_offset.is_multiple_of(4) && n > 0).then_some((
                r.offset,
                r.dest_offset,
                n,
            ));
            let entry = r.dest.entry.clone();
            let decision = self.decide_nvme(&entry, &r.ns, probe_at);
            let mut reasons = decision.reasons.clone();
            let via = match (&decision.plan, &r.dest.gpu) {
                (_, Some(g)) if g.abandoned.load(std::sync::atomic::Ordering::SeqCst) => {
                    return Err(LoadError::Engine(
                        "this destination's staging buffers still have reads of a timed-out batch in flight".into(),
                    ));
                }
                (_, Some(_)) => {
                    reasons.push(
                        "destination: device-local GPU memory, filled by GPU copies from registered staging".into(),
                    );
                    Via::GpuStaged
                }
                (Plan::Direct, None) => Via::Direct,
                (Plan::Bounce(_), None) => Via::Bounce,
            };
            if opts.strict && via != Via::Direct {
                let why = match &decision.plan {
                    Plan::Bounce(_) => decision.plan.to_string(),
                    Plan::Direct => "device-local memory is filled through staging buffers and GPU copies".into(),
                };
                return Err(LoadError::NotDirect { what: format!("region {}", entry.id()), why, reasons });
            }
            let window = match via {
                Via::GpuStaged => None,
                _ => Some(cpu_window(&reg, &entry)?),
            };
            read_dest.push(dests.len());
            dests.push(NvDest { entry, via, route: decision.route, reasons, window, bytes_direct: 0, bytes_staged: 0 });
        }

        // 2. Direct bodies (whole blocks from a block-aligned offset into a dword-aligned
        // destination offset) and staged pieces, per (controller, destination).
        let mut fallbacks = Vec::new();
        let mut misaligned = 0u64;
        let mut work: Vec<(NvmeHandle, usize, Vec<Io>, Vec<Piece>)> = Vec::new();
        for (i, r) in reads.iter().enumerate() {
            let di = read_dest[i];
            let d = &dests[di];
            let w = match work.iter().position(|(h, x, ..)| Arc::ptr_eq(&h.0, &r.ns.0) && *x == di) {
                Some(w) => w,
                None => {
                    work.push((r.ns.clone(), di, Vec::new(), Vec::new()));
                    work.len() - 1
                }
            };
            let bs = r.ns.block_size();
            let body = if d.via == Via::Direct && r.offset.is_multiple_of(bs) && r.dest_offset.is_multiple_of(4) {
                r.len / bs * bs
            } else {
                0
            };
            let mut o = 0;
            while o < body {
                let n = chunk.min(body - o);
                work[w].2.push(Io { offset: r.dest_offset + o, lba: (r.offset + o) / bs, len: n });
                o += n;
            }
            if body < r.len {
                if d.via == Via::Direct {
                    misaligned += 1;
                    if opts.strict {
                        return Err(LoadError::NotDirect {
                            what: format!("{} bytes at {:#x} of {}", r.len - body, r.offset + body, r.ns.describe()),
                            why: format!(
                                "NVMe reads move whole {bs}-byte blocks from a block boundary into a 4-byte aligned \
                                 address (namespace offset {:#x}, destination offset {:#x})",
                                r.offset + body,
                                r.dest_offset + body
                            ),
                            reasons: d.reasons.clone(),
                        });
                    }
                }
                let piece = match &r.dest.gpu {
                    Some(g) => g.slot_len,
                    None => chunk,
                };
                let (lo, hi) = (r.offset + body, r.offset + r.len);
                let mut p = lo / bs * bs;
                while p < hi {
                    let pend = (p + piece).min(hi.div_ceil(bs) * bs);
                    let (s, e) = (p.max(lo), pend.min(hi));
                    work[w].3.push(Piece {
                        at: p,
                        read: pend - p,
                        skip: s - p,
                        n: e - s,
                        doff: r.dest_offset + (s - r.offset),
                    });
                    p = pend;
                }
            }
        }
        if misaligned > 0 {
            fallbacks.push(format!(
                "{misaligned} namespace read(s) not block aligned: their unaligned parts went through staging buffers"
            ));
        }

        // 3. The transfers. Each driver call returns with no command in flight (after a failure
        // it has disabled the controller first), so staging buffers may go when it returns.
        let t0 = Instant::now();
        for (h, di, ios, pieces) in &work {
            let mut c = h.ctrl();
            let bs = c.namespace().block_size;
            let d = &mut dests[*di];
            if !ios.is_empty() {
                c.transfer_batch_depth(&reg, Dir::Read, &d.entry, ios, opts.depth)?;
                d.bytes_direct += ios.iter().map(|io| io.len).sum::<u64>();
            }
            if pieces.is_empty() {
                continue;
            }
            let gpu =
                reads[read_dest.iter().position(|x| x == di).expect("a read of this destination")].dest.gpu.clone();
            match gpu {
                None => {
                    let depth = opts.depth.clamp(1, 64);
                    let stage = self.nvme_stage()?;
                    let (host, g) = (&stage.host, &stage.reg);
                    let w = d.window.clone().ok_or_else(|| LoadError::Unreachable("no CPU window".into()))?;
                    for round in pieces.chunks(depth) {
                        let ios: Vec<Io> = round
                            .iter()
                            .enumerate()
                            .map(|(k, p)| Io { offset: k as u64 * chunk, lba: p.at / bs, len: p.read })
                            .collect();
                        c.transfer_batch_depth(&reg, Dir::Read, g, &ios, depth)?;
                        for (k, p) in round.iter().enumerate() {
                            host.copy_to(k as u64 * chunk + p.skip, &*w, p.doff, p.n)?;
                            d.bytes_staged += p.n;
                        }
                    }
                }
                Some(stage) => {
                    let slots = stage.slots.lock().unwrap_or_else(|p| p.into_inner());
                    let (host, vk) = slots.first().ok_or_else(|| LoadError::Engine("no GPU staging buffer".into()))?;
                    let g = reg.register(host.clone() as Arc<dyn PeerMemory>)?;
                    stage.device.set_copy_timeout(opts.timeout);
                    for p in pieces {
                        c.transfer_batch_depth(
                            &reg,
                            Dir::Read,
                            &g,
                            &[Io { offset: 0, lba: p.at / bs, len: p.read }],
                            opts.depth,
                        )?;
                        stage.device.copy(vk, p.skip, &stage.region, p.doff, p.n)?;
                        d.bytes_staged += p.n;
                    }
                }
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        if let Some(d) = dests.iter().find(|d| !d.entry.is_live()) {
            return Err(LoadError::Unregistered { region: d.entry.id() });
        }

        // 4. Verification.
        let mut checksums = Vec::new();
        let mut verified = None;
        if opts.verify != Verify::Off {
            let (mut all, mut any) = (true, false);
            for (i, r) in reads.iter().enumerate() {
                let Some(w) = dests[read_dest[i]].window.clone() else {
                    all = false;
                    continue;
                };
                let h = hash_region(&*w, r.dest_offset, r.len)?;
                checksums.push(h);
                let reread = (opts.verify == Verify::Reread).then_some(|| self.hash_namespace(r, chunk));
                any |= check_read(h, r.expect, reread, || r.ns.describe().into(), r.offset, r.len)?;
            }
            verified = (any && all).then_some(true);
            if !all {
                fallbacks.push("verification: a destination has no CPU mapping to hash".into());
            }
        }

        let engine = match work.first() {
            Some((h, ..)) => format!("VFIO NVMe driver ({}, polled, one I/O queue)", h.bdf()),
            None => "VFIO NVMe driver".into(),
        };
        let qd = opts.depth.clamp(1, peermem_nvme::driver::IO_DEPTH as usize - 1);
        Ok(BatchReport {
            bytes: reads.iter().map(|r| r.len).sum(),
            seconds,
            engine,
            dests: dests
                .into_iter()
                .map(|d| {
                    let method = match d.via {
                        Via::Direct => format!("NVMe read commands to the routed address, up to {qd} in flight"),
                        Via::Bounce => {
                            "NVMe reads into registered host staging, CPU copies into the destination".into()
                        }
                        Via::GpuStaged => {
                            "NVMe reads into registered host staging, GPU copies into the destination".into()
                        }
                    };
                    DestReport {
                        region: d.entry.id(),
                        route: d.route,
                        via: d.via,
                        method,
                        reasons: d.reasons,
                        bytes_direct: d.bytes_direct,
                        bytes_staged: d.bytes_staged,
                    }
                })
                .collect(),
            fallbacks,
            checksums,
            verified,
        })
    }

    /// xxh3-64 of a read's namespace range, read again through host memory.
    fn hash_namespace(&mut self, r: &NvmeRead, chunk: u64) -> Result<u64, LoadError> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let bs = r.ns.block_size();
        let (mut p, end) = (r.offset / bs * bs, r.offset + r.len);
        let reg = self.registry.clone();
        let stage = self.nvme_stage()?;
        let mut c = r.ns.ctrl();
        while p < end {
            let n = chunk.max(bs).min(stage.len()).min(end.div_ceil(bs) * bs - p);
            let v = read_host(&mut c, &reg, stage, p, n)?;
            let lo = r.offset.saturating_sub(p) as usize;
            let hi = ((end - p).min(n)) as usize;
            h.update(&v[lo..hi]);
            p += n;
        }
        Ok(h.digest())
    }
}
