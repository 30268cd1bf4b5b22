//! The plan stage: every read of a batch checked before any starts, one decision per
//! destination and reader (a device, or the CPU for reads through the page cache) from the
//! mover's planner (cached per loader, device memory probed once with the source's own bytes),
//! and each read split into a direct body and staged pieces, as requests of at most `chunk`
//! bytes; direct requests of one source that continue each other in the file and in the
//! destination are merged into one (up to `chunk`).
//!
//! Owns: range checks, strictness, the alignment split, coalescing, the decision cache. Must
//! not: decide direct or bounce itself (`peermem::mover` does), move bytes, or compute an
//! address.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use peermem::mover::{Ask, Decision, Plan as MoverPlan, Probe, Reach, RouteHealth};
use peermem::{Entry, Peer, PeerMemory, Provider, RegionId, Registry, RouteKind};
use peermem_cuda::{CudaRegion, Gds, GdsFile};

use crate::batch::Read;
use crate::dest::{cpu_window, GpuStage};
use crate::error::LoadError;
use crate::options::Options;
use crate::report::Via;
use crate::source::Source;
use crate::stage::Pool;

/// Bytes a route probe into device memory moves (the source's own bytes, read-only).
const PROBE_LEN: u64 = 64 << 10;

/// One destination of a batch as one device reads into it.
pub(crate) struct DestRun {
    pub entry: Arc<Entry>,
    /// The first read's source: it names the reading device.
    pub source: Source,
    pub peer: Peer,
    pub route: Option<RouteKind>,
    pub via: Via,
    pub reasons: Vec<String>,
    /// The CPU's view of the destination (its own mapping or a BAR mapping): staged copies and
    /// verification. `None` for device-local GPU memory.
    pub window: Option<Arc<dyn PeerMemory>>,
    pub gpu: Option<Arc<GpuStage>>,
    /// The source registered with cuFile, for a run read through GPUDirect Storage.
    pub gds: Option<Arc<GdsFile>>,
}

/// Where a request's bytes land.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// Straight into the destination at this offset.
    Direct { doff: u64 },
    /// Into the staging buffer of `group`, at byte `at` of it.
    Stage { group: usize, at: u64 },
}

/// One request: `len` bytes at source offset `off` of read `read`, for destination run `dest`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Req {
    pub read: usize,
    pub dest: usize,
    pub off: u64,
    pub len: u64,
    pub target: Target,
}

/// Aligned source bytes read into one staging buffer (by `parts` requests), of which bytes
/// `skip..skip+n` go to destination offset `doff` once every part arrived.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub dest: usize,
    pub skip: u64,
    pub n: u64,
    pub doff: u64,
    pub parts: u32,
    pub pushed: u32,
    pub arrived: u32,
    /// The staging buffer, while the group holds one.
    pub slot: Option<usize>,
}

/// What the plan stage hands on.
pub(crate) struct Planned {
    pub dests: Vec<DestRun>,
    pub read_dest: Vec<usize>,
    pub queue: VecDeque<Req>,
    pub groups: Vec<Group>,
    pub fallbacks: Vec<String>,
}

/// A decision for (destination, peer), kept while the destination stays registered.
struct Cached {
    entry: Weak<Entry>,
    decision: Decision,
}

/// The loader's memory of decisions and of routes probed broken.
#[derive(Default)]
pub(crate) struct Planner {
    decisions: HashMap<(RegionId, Peer, Reach), Cached>,
    health: RouteHealth,
}

/// Every read checked before any read of the batch starts.
fn check(reads: &[Read]) -> Result<(), LoadError> {
    for r in reads {
        let len = r.source.len();
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

/// The address (or, without a CPU mapping, the offset) a direct read into `entry` at `doff`
/// starts at, for alignment checks.
fn mem_at(entry: &Entry, doff: u64) -> u64 {
    entry.cpu_range().map_or(doff, |c| c.start().raw().wrapping_add(doff))
}

/// Bytes of `r` a direct read moves from its start: whole aligned units from an aligned source
/// offset into an aligned destination address; 0 when either is misaligned.
fn direct_body(r: &Read, entry: &Entry) -> u64 {
    let (a, ma) = (r.source.align(), r.source.mem_align());
    if r.offset.is_multiple_of(a) && mem_at(entry, r.dest_offset).is_multiple_of(ma) {
        r.len / a * a
    } else {
        0
    }
}

impl Planner {
    /// Forgets decisions for destinations no longer registered.
    pub(crate) fn forget_dead(&mut self) {
        self.decisions.retain(|_, c| c.entry.upgrade().is_some_and(|e| e.is_live()));
    }

    /// The plan of a batch: checks, one decision per (destination, reading device), requests.
    pub(crate) fn plan(
        &mut self,
        reg: &Registry,
        reads: &[Read],
        opts: &Options,
        cpu: &mut Pool,
    ) -> Result<Planned, LoadError> {
        check(reads)?;
        self.forget_dead();
        let mut dests: Vec<DestRun> = Vec::new();
        let mut read_dest = Vec::with_capacity(reads.len());
        for r in reads {
            let peer = r.source.peer(reg);
            let found = dests.iter().position(|d| {
                // One peer can read two ways (a controller through the kernel or through the VFIO
                // driver); a file read through the page cache is read by the CPU.
                d.entry.id() == r.dest.id()
                    && d.peer == peer
                    && d.source.reach() == r.source.reach()
                    // Into CUDA memory each file is its own run: its own cuFile registration.
                    && (r.dest.cuda_target().is_none() || d.source.same(&r.source))
            });
            let i = match found {
                Some(i) => i,
                None => {
                    dests.push(self.dest_run(reg, r, peer, opts, cpu)?);
                    dests.len() - 1
                }
            };
            read_dest.push(i);
        }
        let mut planned =
            Planned { dests, read_dest, queue: VecDeque::new(), groups: Vec::new(), fallbacks: Vec::new() };
        let mut misaligned = 0;
        for i in 0..reads.len() {
            misaligned += split(&mut planned, reads, i, opts)? as u32;
        }
        let mut files: Vec<&Source> = Vec::new();
        for r in reads.iter().filter(|r| r.source.refused_direct()) {
            if !files.iter().any(|f| f.same(&r.source)) {
                files.push(&r.source);
                let path = r.source.path().map(|p| p.display().to_string()).unwrap_or_default();
                planned.fallbacks.push(format!("{path}: the filesystem refused O_DIRECT: read through the page cache"));
            }
        }
        if misaligned > 0 {
            planned.fallbacks.push(format!(
                "{misaligned} read(s) not aligned for a direct read: their unaligned parts went through staging buffers"
            ));
        }
        Ok(planned)
    }

    /// The run of destination `r.dest` as read by `peer`: the planner's decision (for CUDA
    /// memory, whether GPUDirect Storage reads it), what it means for the destination, and
    /// strictness.
    fn dest_run(
        &mut self,
        reg: &Registry,
        r: &Read,
        peer: Peer,
        opts: &Options,
        cpu: &mut Pool,
    ) -> Result<DestRun, LoadError> {
        let entry = r.dest.entry.clone();
        // The CPU's view: the probe's poison and read-back, then staged copies and verification.
        let window = cpu_window(reg, &entry);
        let (decision, gds) = match r.dest.cuda_target() {
            Some((dev, region)) => {
                let (d, file) = self.decide_gds(reg, r, peer, opts, cpu, (dev, region));
                (d, Some(file))
            }
            None => {
                let probe = ProbeAt { window: window.as_ref().ok(), at: probe_at(r, &entry) };
                (self.decide(reg, &entry, &r.source, peer, probe, cpu), None)
            }
        };
        let mut reasons = decision.reasons.clone();
        reasons.extend(r.source.io_reason());
        let via = match (&decision.plan, &r.dest.gpu, &gds) {
            (MoverPlan::Direct, Some(_), Some(Ok(_))) => {
                reasons.push("cufile: taken: cuFileRead has the storage device write the CUDA memory itself".into());
                Via::Gds
            }
            (_, Some(g), _) if g.staging.is_abandoned() => {
                return Err(LoadError::Engine(
                    "this destination's staging buffers still have reads of a timed-out batch in flight".into(),
                ));
            }
            (_, Some(g), gds) => {
                if let Some(Err(why)) = gds {
                    reasons.push(format!("cufile: not taken: {why}"));
                }
                reasons.push(format!("destination: {}", g.gpu.describe()));
                Via::GpuStaged
            }
            (MoverPlan::Direct, None, _) => Via::Direct,
            (MoverPlan::Bounce(_), None, _) => Via::Bounce,
        };
        if opts.strict && !via.is_direct() {
            let why = match (&decision.plan, &gds) {
                (_, Some(Err(why))) => format!("GPUDirect Storage not possible: {why}"),
                (MoverPlan::Bounce(_), _) => decision.plan.to_string(),
                (MoverPlan::Direct, _) => "device-local memory is filled through staging buffers and GPU copies".into(),
            };
            return Err(LoadError::NotDirect { what: format!("region {}", entry.id()), why, reasons });
        }
        let window = match via {
            Via::GpuStaged | Via::Gds => None,
            _ => Some(window?),
        };
        Ok(DestRun {
            entry,
            source: r.source.clone(),
            peer,
            route: decision.route,
            via,
            reasons,
            window,
            gpu: r.dest.gpu.clone(),
            gds: gds.and_then(Result::ok).filter(|_| via == Via::Gds),
        })
    }

    /// Whether GPUDirect Storage reads `r` into its CUDA memory `target`: the precondition (the
    /// option, a known storage device, cuFile's library and driver, the file registered with
    /// it), then the registry's route between the storage device and the GPU (`Reach::
    /// GpuStorage`), then once per (destination, device) a probe: the source's bytes read by
    /// cuFile into the destination (poisoned first) against the same bytes read through host
    /// memory. The decision, and the registered file or why cuFile is not taken.
    fn decide_gds(
        &mut self,
        reg: &Registry,
        r: &Read,
        peer: Peer,
        opts: &Options,
        cpu: &mut Pool,
        (dev, region): (&peermem_cuda::Device, &Arc<CudaRegion>),
    ) -> (Decision, Result<Arc<GdsFile>, String>) {
        let (entry, src) = (&r.dest.entry, &r.source);
        let ready = gds_ready(src, opts);
        let key = (entry.id(), peer, Reach::GpuStorage);
        let cached = self.decisions.get(&key).filter(|_| ready.is_ok()).map(|c| c.decision.clone());
        let decision = cached.unwrap_or_else(|| {
            let route = reg.resolve(entry, peer);
            let probe = match (&ready, probe_at(r, entry)) {
                (Ok((_, file)), Some((at, doff, n))) => {
                    let n = n.min(cpu.slot_len() / src.align() * src.align());
                    let (file, region2, region3) = (file.clone(), region.clone(), region.clone());
                    let (dev1, dev2) = (dev.clone(), dev.clone());
                    let known = move || -> Result<Vec<u8>, LoadError> { src.read_known(reg, cpu.first()?, at, n) };
                    (n > 0).then(|| Probe::Known {
                        len: n as usize,
                        expected: Box::new(known),
                        poison: Box::new(move |p: &[u8]| dev1.write(&region2, doff, p).map_err(LoadError::from)),
                        transfer: Box::new(move || file.read(&region3, doff, at, n).map(drop).map_err(LoadError::from)),
                        read_back: Box::new(move |b: &mut [u8]| dev2.read(region, doff, b).map_err(LoadError::from)),
                    })
                }
                _ => None,
            };
            let precondition = ready.as_ref().map(drop).map_err(String::as_str);
            let ask = Ask { entry, peer, reach: Reach::GpuStorage, precondition };
            let mut d = self.health.decide(route.as_ref(), ask, probe);
            if let Ok((gds, _)) = &ready {
                d.reasons.push(format!("cufile: {}", gds.info().describe()));
                self.decisions.insert(key, Cached { entry: Arc::downgrade(entry), decision: d.clone() });
            }
            d
        });
        let file = match (ready, &decision.plan) {
            (Ok((_, f)), MoverPlan::Direct) => Ok(f),
            (Ok(_), plan) => Err(plan.to_string()),
            (Err(why), _) => Err(why),
        };
        (decision, file)
    }

    /// The planner's decision for (destination, reading device), cached. Device memory is probed
    /// once: the source's bytes at `probe_at` are read through host memory, then through the
    /// direct route into the destination (poisoned first), and compared.
    fn decide(
        &mut self,
        reg: &Registry,
        entry: &Arc<Entry>,
        src: &Source,
        peer: Peer,
        probe_at: ProbeAt<'_>,
        cpu: &mut Pool,
    ) -> Decision {
        let reach = src.reach();
        let key = (entry.id(), peer, reach);
        if let Some(c) = self.decisions.get(&key) {
            return c.decision.clone();
        }
        let route = reg.resolve(entry, peer);
        let probe = match (entry.provider(), probe_at.at, probe_at.window) {
            (Provider::Pci(_), Some((at, doff, n)), Some(w)) => {
                let n = n.min(cpu.slot_len() / src.align() * src.align());
                let (w1, w2) = (w.clone(), w.clone());
                let known = move || -> Result<Vec<u8>, LoadError> { src.read_known(reg, cpu.first()?, at, n) };
                (n > 0).then(|| Probe::Known {
                    len: n as usize,
                    expected: Box::new(known),
                    poison: Box::new(move |p: &[u8]| w1.write_at(doff, p).map_err(LoadError::from)),
                    transfer: Box::new(move || src.read_into(reg, at, entry, doff, n)),
                    read_back: Box::new(move |b: &mut [u8]| w2.read_at(doff, b).map_err(LoadError::from)),
                })
            }
            _ => None,
        };
        let ask = Ask { entry, peer, reach, precondition: Ok(()) };
        let decision = self.health.decide(route.as_ref(), ask, probe);
        self.decisions.insert(key, Cached { entry: Arc::downgrade(entry), decision: decision.clone() });
        decision
    }
}

/// What GPUDirect Storage needs before the route is looked at: the option on, a storage device
/// the registry can judge, cuFile's library and driver, and the source registered with cuFile.
fn gds_ready(src: &Source, opts: &Options) -> Result<(Gds, Arc<GdsFile>), String> {
    if !opts.gds {
        return Err("GPUDirect Storage is switched off (PEERMEM_GDS=0)".into());
    }
    if let Some(why) = src.device_unknown() {
        return Err(format!("the file's storage device is unknown ({why}): no route to the GPU can be judged"));
    }
    let gds = Gds::open().map_err(|e| e.to_string())?;
    Ok((gds, src.gds_file(gds)?))
}

/// Where a probe can run: the destination as the CPU reaches it (`None`: it cannot), and the
/// source offset, destination offset and bytes (`None`: the read allows no probe).
struct ProbeAt<'w> {
    window: Option<&'w Arc<dyn PeerMemory>>,
    at: Option<(u64, u64, u64)>,
}

/// Where a probe of read `r`'s route can run: (source offset, destination offset, bytes), when
/// the read is aligned for a direct read and long enough.
fn probe_at(r: &Read, entry: &Entry) -> Option<(u64, u64, u64)> {
    let n = PROBE_LEN.min(direct_body(r, entry)).min(entry.len().saturating_sub(r.dest_offset));
    (n > 0 && r.source.is_direct()).then_some((r.offset, r.dest_offset, n))
}

/// Queues direct request `q` of read `reads[q.read]`, merged into the request queued last when
/// that one is direct into the same destination run, reads the same source, ends where `q`
/// starts both in the source and in the destination, and the two stay within `chunk` bytes.
fn push_direct(p: &mut Planned, reads: &[Read], q: Req, chunk: u64) {
    if let (Some(last), Target::Direct { doff }) = (p.queue.back_mut(), q.target) {
        if let Target::Direct { doff: last_doff } = last.target {
            if last.dest == q.dest
                && reads[last.read].source.same(&reads[q.read].source)
                && last.off + last.len == q.off
                && last_doff + last.len == doff
                && last.len + q.len <= chunk
            {
                last.len += q.len;
                return;
            }
        }
    }
    p.queue.push_back(q);
}

/// Splits read `i` into requests: its direct body (when its destination goes direct) in `chunk`
/// pieces (merged with a neighbour's, `push_direct`), the rest as aligned staged groups of one
/// staging buffer each. Returns whether a direct destination had a misaligned part (refused when
/// strict).
fn split(p: &mut Planned, reads: &[Read], i: usize, opts: &Options) -> Result<bool, LoadError> {
    let r = &reads[i];
    let chunk = opts.block_chunk();
    let di = p.read_dest[i];
    let d = &p.dests[di];
    // cuFile takes any offset and length (it aligns through its own GPU buffers).
    let body = match d.via {
        Via::Direct => direct_body(r, &d.entry),
        Via::Gds => r.len,
        Via::Bounce | Via::GpuStaged => 0,
    };
    let mut o = 0;
    while o < body {
        let n = chunk.min(body - o);
        let target = Target::Direct { doff: r.dest_offset + o };
        push_direct(p, reads, Req { read: i, dest: di, off: r.offset + o, len: n, target }, chunk);
        o += n;
    }
    let d = &p.dests[di];
    if body == r.len {
        return Ok(false);
    }
    let misaligned = d.via == Via::Direct;
    if misaligned && opts.strict {
        return Err(LoadError::NotDirect {
            what: format!("{} bytes at {:#x} of {}", r.len - body, r.offset + body, r.source.describe()),
            why: format!(
                "{} (source offset {:#x}, destination offset {:#x})",
                r.source.alignment_rule(),
                r.offset + body,
                r.dest_offset + body
            ),
            reasons: d.reasons.clone(),
        });
    }
    // Aligned pieces covering the rest, each one staging buffer (GPU staging buffers are larger:
    // fewer, longer GPU copies), read in requests of `chunk` bytes; past the end of a file a
    // read may come back short.
    let a = r.source.align();
    let piece = d.gpu.as_ref().map_or(chunk, |g| g.staging.slot_len);
    let (lo, hi) = (r.offset + body, r.offset + r.len);
    let end_a = r.source.len().div_ceil(a) * a;
    let mut at = lo / a * a;
    while at < hi {
        let pend = (at + piece).min(hi.div_ceil(a) * a);
        let (s, e) = (at.max(lo), pend.min(hi));
        let read_len = pend.min(end_a) - at;
        let g = p.groups.len();
        let parts = read_len.div_ceil(chunk);
        let doff = r.dest_offset + (s - r.offset);
        p.groups.push(Group {
            dest: di,
            skip: s - at,
            n: e - s,
            doff,
            parts: parts as u32,
            pushed: 0,
            arrived: 0,
            slot: None,
        });
        for k in 0..parts {
            let len = chunk.min(read_len - k * chunk);
            p.queue.push_back(Req {
                read: i,
                dest: di,
                off: at + k * chunk,
                len,
                target: Target::Stage { group: g, at: k * chunk },
            });
        }
        at = pend;
    }
    Ok(misaligned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// `nvidia` package directories of the Python test environments (`python/run-tests`
    /// installs torch, which brings the `nvidia-cufile` wheel).
    fn nvidia_dirs() -> Vec<PathBuf> {
        let ls = |p: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> =
                std::fs::read_dir(p).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
            v.sort();
            v
        };
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let venvs = ls(&home.join(".cache/peermem"));
        let pys = venvs.iter().flat_map(|v| ls(&v.join("lib")));
        pys.map(|p| p.join("site-packages/nvidia")).filter(|p| p.is_dir()).collect()
    }

    /// Why GPUDirect Storage is not taken, before any CUDA memory is needed: the option, a file
    /// whose storage device is unknown, then cuFile itself (the wheel's library, found as the
    /// Python package finds it; without CUDA its driver refuses to open, in its own words).
    #[test]
    fn gpudirect_storage_says_why_not_before_the_route_is_looked_at() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 1 << 16]).unwrap();
        let live = Registry::new(Arc::new(peermem::Topology::discover("/").unwrap()));
        let src = Source::open(&p, &live).unwrap();
        let off = Options { gds: false, ..Options::default() };
        let e = gds_ready(&src, &off).err().unwrap();
        assert!(e.contains("switched off (PEERMEM_GDS=0)"), "{e}");

        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        let elsewhere = Registry::new(Arc::new(peermem::Topology::discover(fixture).unwrap()));
        let e = gds_ready(&Source::open(&p, &elsewhere).unwrap(), &Options::default()).err().unwrap();
        assert!(e.contains("the file's storage device is unknown"), "{e}");

        if let Some(why) = src.device_unknown() {
            eprintln!("no PCI function serves {} here ({why}): the cuFile part skipped", p.display());
            return;
        }
        let wheels: Vec<PathBuf> = nvidia_dirs().iter().flat_map(|n| peermem_cuda::gds::wheel_dirs(n)).collect();
        wheels.iter().for_each(peermem_cuda::gds::search_also);
        let cuda = peermem_cuda::Cuda::driver_version();
        match (gds_ready(&src, &Options::default()), wheels.is_empty(), cuda) {
            (Err(e), false, Err(_)) => assert!(e.starts_with("cuFileDriverOpen failed: CU_FILE_"), "{e}"),
            (Err(e), true, Err(_)) => {
                assert!(e.starts_with("libcufile.so not found"), "{e}");
                eprintln!("no nvidia-cufile wheel in the Python test environment: only the missing library checked");
            }
            (r, _, Ok(v)) => eprintln!("CUDA {v} here: cuFile answered {:?}", r.map(|(g, _)| g.info().describe())),
            (Ok(_), _, Err(e)) => panic!("cuFile opened without a CUDA driver ({e})"),
        }
    }
}
