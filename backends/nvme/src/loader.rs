//! The NVMe-to-GPU loader: a byte range of a file or namespace into any registered region (a GPU
//! BAR, a p2pmem/CMB region, host memory), straight from the device when the route allows,
//! otherwise through a pipeline of host staging buffers.
//!
//! Owns: choosing the method from the registry's route (`Method`), the read-only route probe for
//! peer memory, the copy loops, the checksum and its verification against the source.
//! Must not: compute a DMA address (the driver takes them from the registry), trust a direct route
//! to peer memory without probing it, or write to the source (files and namespaces are opened
//! read-only; the VFIO source only reads).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use peermem::mover::{compare, Pipeline, RouteHealth};
use peermem::sys::Mapping;
use peermem::{Backing, Bdf, Entry, HostRegion, Peer, PeerMemory, Provider, Registry, RouteKind, Topology, VirtAddr};

use crate::driver::{Controller, Dir, NvmeError};
use crate::sys;

/// O_DIRECT alignment the loader uses for files and block devices.
pub const ALIGN: u64 = 4096;
/// Bytes a route probe moves (read-only: the source's own data, never a write to it).
const PROBE_LEN: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("range {start:#x}..{end:#x} is empty or runs past the source's {len} bytes")]
    BadRange { start: u64, end: u64, len: u64 },
    #[error("{len} bytes at offset {offset:#x} do not fit the {region_len}-byte destination")]
    TooSmall { len: u64, offset: u64, region_len: u64 },
    #[error("the destination cannot be reached by the CPU either: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("resolve: {0}")]
    Resolve(#[from] peermem::ResolveError),
    #[error(transparent)]
    Move(#[from] peermem::mover::MoveError),
    #[error(transparent)]
    Registry(#[from] peermem::RegistryError),
    #[error("staging: {0}")]
    Region(#[from] peermem::RegionError),
    #[error("{what} at offset {offset:#x}: {why}")]
    Copy { what: &'static str, offset: u64, why: String },
    #[error("checksum mismatch: destination {dest:#018x}, source {source_sum:#018x}")]
    Mismatch { dest: u64, source_sum: u64 },
}

/// A source opened through the kernel: a regular file or a block device (a namespace).
#[derive(Debug)]
pub struct KernelSource {
    path: PathBuf,
    file: File,
    /// Opened with O_DIRECT (false when the filesystem refused it).
    direct: bool,
    len: u64,
    /// The PCI function behind the file's block device, when there is one.
    device: Option<Bdf>,
}

impl KernelSource {
    /// Opens `path` read-only, with O_DIRECT when the filesystem allows, and finds the PCI
    /// device that serves it (sysfs `/sys/dev/block/MAJ:MIN`).
    pub fn open(path: impl AsRef<Path>) -> Result<KernelSource, LoadError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| LoadError::Io { path: path.clone(), source };
        let (file, direct) = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (File::open(&path).map_err(io)?, false),
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        let dev = if meta.file_type().is_file() { meta.dev() } else { meta.rdev() };
        let len = if meta.file_type().is_file() { meta.len() } else { (&file).seek(SeekFrom::End(0)).map_err(io)? };
        let device = pci_device_of(libc::major(dev), libc::minor(dev));
        Ok(KernelSource { path, file, direct, len, device })
    }

    /// The first namespace of the NVMe controller `bdf` (kernel driver bound).
    pub fn namespace(topo: &Topology, bdf: Bdf) -> Result<KernelSource, LoadError> {
        let bd = crate::BlockDevice::open_namespace(topo, bdf)
            .map_err(|e| LoadError::Io { path: format!("nvme {bdf}").into(), source: std::io::Error::other(e) })?;
        KernelSource::open(bd.path())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> Option<Bdf> {
        self.device
    }
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

/// The last PCI function on the sysfs path of block device MAJ:MIN (a partition's controller too).
fn pci_device_of(major: u32, minor: u32) -> Option<Bdf> {
    let real = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    real.components().rev().find_map(|c| c.as_os_str().to_str()?.parse::<Bdf>().ok())
}

/// Where the bytes come from.
#[derive(Debug)]
pub enum Source<'a> {
    /// A file or block device read through the kernel (O_DIRECT when possible).
    Kernel(KernelSource),
    /// The namespace of a controller owned by the userspace VFIO driver.
    Vfio(&'a mut Controller),
}

impl Source<'_> {
    /// Bytes readable from the source.
    pub fn len(&self) -> u64 {
        match self {
            Source::Kernel(k) => k.len,
            Source::Vfio(c) => c.namespace().bytes(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Alignment of the reads the source takes.
    fn align(&self) -> u64 {
        match self {
            Source::Kernel(k) if k.direct => ALIGN,
            Source::Kernel(_) => 1,
            Source::Vfio(c) => c.namespace().block_size,
        }
    }
    fn describe(&self) -> String {
        match self {
            Source::Kernel(k) => format!(
                "{} ({}{})",
                k.path.display(),
                if k.direct { "O_DIRECT" } else { "buffered" },
                k.device.map(|d| format!(", device {d}")).unwrap_or_default()
            ),
            Source::Vfio(c) => format!("namespace {} of {} (VFIO driver)", c.namespace().nsid, c.bdf()),
        }
    }
}

/// How the bytes moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `pread` straight into the destination's CPU mapping: with O_DIRECT the device DMAs into
    /// those pages (host pages, or p2pmem pages through the kernel's P2PDMA path).
    KernelDirect,
    /// The userspace VFIO driver DMAs straight into the destination at the routed address.
    VfioDirect,
    /// Staged through `depth` host buffers in flight, then copied by the CPU.
    Bounce { why: String },
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::KernelDirect => write!(f, "direct: pread straight into the destination's pages"),
            Method::VfioDirect => write!(f, "direct: the VFIO driver DMAs into the destination"),
            Method::Bounce { why } => write!(f, "bounce through host staging buffers: {why}"),
        }
    }
}

/// Knobs of a load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Bytes per request / per staging buffer (a multiple of 4096).
    pub chunk: u64,
    /// Requests (direct) or staging buffers (bounce) in flight.
    pub depth: usize,
    /// Byte offset in the destination.
    pub dest_offset: u64,
    /// Re-read the source through host memory and compare checksums (not timed).
    pub verify: bool,
    /// Routes probed broken stay broken across loads that share this.
    pub health: RouteHealth,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { chunk: 1 << 20, depth: 4, dest_offset: 0, verify: true, health: RouteHealth::new() }
    }
}

/// What a load did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub source: String,
    /// The registry's route kind for (destination, the device reading the source).
    pub route: &'static str,
    pub method: Method,
    /// Why: the route's reasons, then the loader's.
    pub reasons: Vec<String>,
    pub bytes: u64,
    /// Wall time of the copy (verification excluded).
    pub seconds: f64,
    /// Checksum of the destination bytes after the load.
    pub checksum: u64,
    /// Checksum of the source range read again through host memory (when verified).
    pub source_checksum: Option<u64>,
}

impl LoadReport {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e6
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "source:     {}", self.source)?;
        writeln!(f, "route:      {}", self.route)?;
        writeln!(f, "method:     {}", self.method)?;
        for r in &self.reasons {
            writeln!(f, "  why:      {r}")?;
        }
        writeln!(f, "moved:      {} bytes in {:.3} s = {:.1} MB/s", self.bytes, self.seconds, self.mb_per_s())?;
        match self.source_checksum {
            Some(s) => write!(f, "checksum:   {:#018x} (source {s:#018x}: verified)", self.checksum),
            None => write!(f, "checksum:   {:#018x} (not verified)", self.checksum),
        }
    }
}

/// A 64-bit streaming checksum (FxHash-style over little-endian words, length-terminated): fast
/// enough for hundreds of MiB under emulation; catches any changed, missing or shifted byte with
/// overwhelming probability. Not cryptographic.
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    tail: [u8; 8],
    pending: usize,
    total: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    pub fn new() -> Checksum {
        // A non-zero start: zero words must still change the state.
        Checksum { h: 0x243f_6a88_85a3_08d3, tail: [0; 8], pending: 0, total: 0 }
    }
    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.pending > 0 {
            let n = (8 - self.pending).min(data.len());
            self.tail[self.pending..self.pending + n].copy_from_slice(&data[..n]);
            self.pending += n;
            data = &data[n..];
            if self.pending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.tail));
            self.pending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.pending = rest.len();
    }
    pub fn finish(&self) -> u64 {
        let mut c = self.clone();
        if c.pending > 0 {
            let mut t = [0u8; 8];
            t[..c.pending].copy_from_slice(&c.tail[..c.pending]);
            c.word(u64::from_le_bytes(t));
        }
        c.word(c.total);
        c.h
    }
    /// The checksum of one buffer.
    pub fn of(data: &[u8]) -> u64 {
        let mut c = Checksum::new();
        c.update(data);
        c.finish()
    }
}

/// A BAR range without a CPU mapping of its own (a `BarRegion`), mapped through sysfs
/// `resource<bar>` so the CPU can fill it on a bounce.
struct MappedBar {
    bdf: Bdf,
    bar: u8,
    offset: u64,
    map: Mapping,
}

// SAFETY: the BAR mapping is owned by this value and unmapped only when it drops.
unsafe impl PeerMemory for MappedBar {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::Bar { bdf: self.bdf, bar: self.bar, offset: self.offset }
    }
    fn cpu_mapping(&self) -> Option<VirtAddr> {
        Some(self.map.addr())
    }
}

/// The destination as the CPU reaches it: its own mapping, or a fresh mapping of its BAR range.
fn cpu_window(reg: &Registry, dest: &Entry) -> Result<Arc<dyn PeerMemory>, LoadError> {
    if dest.region().cpu_mapping().is_some() {
        return Ok(dest.region().clone());
    }
    let (bdf, bar, offset) = match dest.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => (bdf, bar, offset),
        _ => return Err(LoadError::Unreachable("a driver-private region without a CPU mapping".into())),
    };
    let page = peermem::sys::page_size();
    if !offset.is_multiple_of(page) {
        return Err(LoadError::Unreachable(format!("BAR offset {offset:#x} is not page aligned")));
    }
    let dev = reg.topology().by_bdf(bdf).map_err(|e| LoadError::Unreachable(e.to_string()))?;
    let path = reg.topology().root().join(&dev.sysfs_dir).join(format!("resource{bar}"));
    let io = |source| LoadError::Io { path: path.clone(), source };
    let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
    let map = Mapping::shared_at(f.as_fd(), dest.len(), offset).map_err(io)?;
    Ok(Arc::new(MappedBar { bdf, bar, offset, map }))
}

fn is_direct_kind(k: &RouteKind) -> bool {
    matches!(k, RouteKind::BusAddr(_) | RouteKind::HostBridge(_) | RouteKind::Iommu(_) | RouteKind::CpuMapped(_))
}

/// Loads bytes `range` of `source` into the registered region `dest` at `opts.dest_offset`.
///
/// The device reading the source (the file's PCI device, or the VFIO controller) is the peer the
/// registry resolves `dest` for. A direct route is used only if the method can reach the memory
/// (O_DIRECT reaches host and p2pmem pages but not a raw BAR mapping; the VFIO driver reaches any
/// routed address) and, for peer memory, a read-only probe shows it delivers the source's bytes;
/// otherwise the range is pipelined through `opts.depth` host staging buffers.
pub fn load(
    source: &mut Source<'_>,
    range: Range<u64>,
    dest: &Entry,
    reg: &Registry,
    opts: &LoadOptions,
) -> Result<LoadReport, LoadError> {
    let src_len = source.len();
    if range.start >= range.end || range.end > src_len {
        return Err(LoadError::BadRange { start: range.start, end: range.end, len: src_len });
    }
    let len = range.end - range.start;
    let doff = opts.dest_offset;
    if doff.checked_add(len).is_none_or(|e| e > dest.len()) {
        return Err(LoadError::TooSmall { len, offset: doff, region_len: dest.len() });
    }
    let chunk = opts.chunk.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    let depth = opts.depth.max(1);
    let peer = match source {
        Source::Kernel(k) => match k.device {
            Some(b) => reg.peer(b).unwrap_or(Peer::Cpu),
            None => Peer::Cpu,
        },
        Source::Vfio(c) => c.peer(),
    };
    let route = reg.resolve(dest, peer)?;
    let mut reasons = route.reasons();
    let route_name = route.kind.name();
    let window = cpu_window(reg, dest)?;
    let align = source.align();
    // The part a direct method moves: from an aligned start, whole aligned blocks; the tail
    // shorter than one block goes through a small bounce.
    let body = if range.start.is_multiple_of(align) && doff.is_multiple_of(ALIGN) { len / align * align } else { 0 };

    // Which direct method could reach this memory at all.
    let backing_ok_for_odirect =
        matches!(dest.region().backing(), Backing::HostPages | Backing::P2pmem { .. }) && dest.cpu_range().is_some();
    let candidate: Result<Method, String> = if !is_direct_kind(&route.kind) {
        Err(format!("the registry's route is {route_name}"))
    } else if body == 0 {
        Err(format!("range start {:#x} / destination offset {doff:#x} not {align}-byte aligned", range.start))
    } else {
        match source {
            Source::Kernel(k) if !k.direct => Err("the filesystem refused O_DIRECT".into()),
            Source::Kernel(_) if !backing_ok_for_odirect => {
                Err("O_DIRECT cannot target a raw BAR mapping (no P2PDMA pages: EFAULT); a VFIO source reaches it"
                    .into())
            }
            Source::Kernel(_) => Ok(Method::KernelDirect),
            Source::Vfio(_) => Ok(Method::VfioDirect),
        }
    };
    let mut method = match candidate {
        Ok(m) => m,
        Err(why) => Method::Bounce { why },
    };
    // Peer memory: never trust a direct route unprobed.
    if !matches!(method, Method::Bounce { .. }) {
        if let Some(b) = opts.health.broken(dest.id(), peer) {
            method = Method::Bounce { why: format!("a probe proved the direct route broken earlier ({b})") };
        } else if !matches!(dest.region().backing(), Backing::HostPages) {
            let n = PROBE_LEN.min(body);
            match probe(source, &method, range.start, n, dest, reg, &*window, doff) {
                Ok(None) => reasons.push(format!("probe: {n} bytes through the direct route arrived intact")),
                Ok(Some(b)) => {
                    opts.health.mark_broken(dest.id(), peer, b.clone());
                    method = Method::Bounce { why: format!("the direct route is broken ({b})") };
                }
                Err(e) => method = Method::Bounce { why: format!("the direct probe failed: {e}") },
            }
        }
    }
    reasons.push(format!("method: {method}"));
    tracing::info!(route = route_name, %method, len, "load");

    let start = Instant::now();
    let mut moved = 0;
    if matches!(method, Method::KernelDirect | Method::VfioDirect) {
        direct(source, &method, range.start, body, dest, reg, doff, chunk, depth)?;
        moved = body;
    }
    if moved < len {
        let pipe = Pipeline::new(chunk, depth)?;
        bounce(source, &pipe, range.start + moved..range.end, reg, &*window, doff + moved)?;
    }
    let seconds = start.elapsed().as_secs_f64();

    let checksum = checksum_region(&*window, doff, len)?;
    let source_checksum = if opts.verify { Some(checksum_source(source, range.clone(), reg, chunk)?) } else { None };
    if let Some(s) = source_checksum {
        if s != checksum {
            return Err(LoadError::Mismatch { dest: checksum, source_sum: s });
        }
    }
    Ok(LoadReport {
        source: source.describe(),
        route: route_name,
        method,
        reasons,
        bytes: len,
        seconds,
        checksum,
        source_checksum,
    })
}

/// Reads `n` bytes at `at` of the source into `dest` by `method` (direct), starting at `doff`.
#[allow(clippy::too_many_arguments)]
fn direct(
    source: &mut Source<'_>,
    method: &Method,
    at: u64,
    n: u64,
    dest: &Entry,
    reg: &Registry,
    doff: u64,
    chunk: u64,
    depth: usize,
) -> Result<(), LoadError> {
    match (source, method) {
        (Source::Kernel(k), Method::KernelDirect) => {
            let region = dest.region().as_ref();
            let chunks = n.div_ceil(chunk);
            let file = &k.file;
            let path = &k.path;
            // `depth` readers, each taking every depth-th chunk: that many requests in flight.
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..depth as u64)
                    .map(|w| {
                        s.spawn(move || -> Result<(), LoadError> {
                            let mut i = w;
                            while i < chunks {
                                let o = i * chunk;
                                let len = chunk.min(n - o);
                                read_full(file, path, at + o, region, doff + o, len)?;
                                i += depth as u64;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LoadError::Copy { what: "direct read", offset: at, why: "a reader panicked".into() })
                    })
                })
            })
        }
        (Source::Vfio(c), Method::VfioDirect) => {
            let bs = c.namespace().block_size;
            c.transfer(reg, Dir::Read, dest, doff, at / bs, n)?;
            Ok(())
        }
        _ => unreachable!("direct() is called with a direct method matching the source"),
    }
}

/// pread until `len` bytes arrived (a short read only at the end of the source is an error here:
/// the range was checked against the source length).
fn read_full(file: &File, path: &Path, at: u64, region: &dyn PeerMemory, off: u64, len: u64) -> Result<(), LoadError> {
    let mut done = 0;
    while done < len {
        let r = sys::pread_into(file, at + done, region, off + done, len - done)
            .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        if r == 0 {
            return Err(LoadError::Copy { what: "read", offset: at + done, why: "unexpected end of source".into() });
        }
        done += r as u64;
    }
    Ok(())
}

/// Pipelined bounce of `range` of the source into `window` at `doff`: fill reads aligned pieces
/// into the staging buffers, drain copies the wanted bytes on to the destination.
fn bounce(
    source: &mut Source<'_>,
    pipe: &Pipeline,
    range: Range<u64>,
    reg: &Registry,
    window: &dyn PeerMemory,
    doff: u64,
) -> Result<(), LoadError> {
    let align = source.align();
    let src_len = source.len();
    let a0 = range.start / align * align;
    let a1 = (range.end.div_ceil(align) * align).min(src_len.div_ceil(align) * align);
    let staging = pipe.staging().to_vec();
    // The VFIO driver reaches staging buffers only through the registry.
    let regs = match source {
        Source::Vfio(_) => {
            staging.iter().map(|s| reg.register(s.clone() as Arc<dyn PeerMemory>)).collect::<Result<Vec<_>, _>>()?
        }
        Source::Kernel(_) => Vec::new(),
    };
    let drain = |slot: usize, off: u64, n: u64| -> Result<(), String> {
        // This piece holds source bytes a0+off .. a0+off+n; keep the part inside `range`.
        let lo = (a0 + off).max(range.start);
        let hi = (a0 + off + n).min(range.end);
        if lo >= hi {
            return Ok(());
        }
        peermem::sys::copy_mapped(&*staging[slot], lo - (a0 + off), window, doff + (lo - range.start), hi - lo)
    };
    match source {
        Source::Kernel(k) => {
            let fill = |slot: usize, off: u64, n: u64| -> Result<(), String> {
                let want = n.min(src_len - (a0 + off));
                let mut done = 0;
                while done < want {
                    let r = sys::pread_into(&k.file, a0 + off + done, &*staging[slot], done, n - done)
                        .map_err(|e| format!("{}: {e}", k.path.display()))?;
                    if r == 0 {
                        break;
                    }
                    done += r as u64;
                }
                if done < want {
                    return Err(format!("{}: short read, {done} of {want} bytes", k.path.display()));
                }
                Ok(())
            };
            pipe.run(a1 - a0, fill, drain)?;
        }
        Source::Vfio(c) => {
            let bs = c.namespace().block_size;
            let fill = |slot: usize, off: u64, n: u64| -> Result<(), String> {
                c.transfer(reg, Dir::Read, &regs[slot], 0, (a0 + off) / bs, n.div_ceil(bs) * bs)
                    .map_err(|e| e.to_string())
            };
            pipe.run(a1 - a0, fill, drain)?;
        }
    }
    Ok(())
}

/// Reads `n` bytes at `at` of the source through host memory (the known-good path).
fn read_via_host(source: &mut Source<'_>, at: u64, n: u64, reg: &Registry) -> Result<Vec<u8>, LoadError> {
    let pipe = Pipeline::new(n.max(ALIGN).div_ceil(ALIGN) * ALIGN, 1)?;
    let out = HostRegion::new(n)?;
    let out: Arc<dyn PeerMemory> = Arc::new(out);
    bounce(source, &pipe, at..at + n, reg, &*out, 0)?;
    let mut v = vec![0u8; n as usize];
    peermem::sys::read_mapped(&*out, 0, &mut v).map_err(|why| LoadError::Copy { what: "read back", offset: 0, why })?;
    Ok(v)
}

/// The read-only route probe: the source's first `n` bytes through host memory (expected), the
/// destination pre-filled with their complement, the same bytes through the direct route, then a
/// CPU read-back. `Some` when the direct route delivered anything else.
#[allow(clippy::too_many_arguments)]
fn probe(
    source: &mut Source<'_>,
    method: &Method,
    at: u64,
    n: u64,
    dest: &Entry,
    reg: &Registry,
    window: &dyn PeerMemory,
    doff: u64,
) -> Result<Option<peermem::mover::Broken>, LoadError> {
    let expected = read_via_host(source, at, n, reg)?;
    let poison: Vec<u8> = expected.iter().map(|b| !b).collect();
    let copy_err = |what, why| LoadError::Copy { what, offset: doff, why };
    peermem::sys::write_mapped(window, doff, &poison).map_err(|w| copy_err("probe poison", w))?;
    direct(source, method, at, n, dest, reg, doff, n, 1)?;
    let mut back = vec![0u8; n as usize];
    peermem::sys::read_mapped(window, doff, &mut back).map_err(|w| copy_err("probe read-back", w))?;
    Ok(compare(&expected, &back))
}

fn checksum_region(window: &dyn PeerMemory, off: u64, len: u64) -> Result<u64, LoadError> {
    let mut c = Checksum::new();
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    let mut o = 0;
    while o < len {
        let n = (buf.len() as u64).min(len - o) as usize;
        peermem::sys::read_mapped(window, off + o, &mut buf[..n]).map_err(|why| LoadError::Copy {
            what: "checksum",
            offset: off + o,
            why,
        })?;
        c.update(&buf[..n]);
        o += n as u64;
    }
    Ok(c.finish())
}

/// The checksum of the source range, read again through host staging buffers.
fn checksum_source(source: &mut Source<'_>, range: Range<u64>, reg: &Registry, chunk: u64) -> Result<u64, LoadError> {
    let mut c = Checksum::new();
    let mut at = range.start;
    let piece = chunk.max(ALIGN) * 4;
    while at < range.end {
        let n = piece.min(range.end - at);
        c.update(&read_via_host(source, at, n, reg)?);
        at += n;
    }
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_independent_of_how_the_bytes_are_split() {
        let data: Vec<u8> = (0..10_007u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let whole = Checksum::of(&data);
        for split in [1, 3, 7, 8, 9, 4096, 10_000] {
            let mut c = Checksum::new();
            for part in data.chunks(split) {
                c.update(part);
            }
            assert_eq!(c.finish(), whole, "split {split}");
        }
        let mut changed = data.clone();
        changed[5000] ^= 1;
        assert_ne!(Checksum::of(&changed), whole);
        assert_ne!(Checksum::of(&data[..10_006]), whole);
        assert_ne!(Checksum::of(&[0u8; 8]), Checksum::of(&[0u8; 16]));
        // Zero words change the state (no all-zero fixed point before the length is mixed in).
        let mut a = Checksum::new();
        a.update(&[0u8; 64]);
        assert_ne!(a.h, Checksum::new().h);
    }

    fn fixture_registry() -> Registry {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qemu-switch");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    /// A file on a filesystem without a PCI device (the CPU is the peer): any byte range, aligned
    /// or not, lands in a host region with the source's checksum.
    #[test]
    fn a_file_range_loads_into_host_memory_with_a_verified_checksum() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.bin");
        let data: Vec<u8> = (0..(3 << 20) + 123u32).map(|i| (i ^ (i >> 9)) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let reg = fixture_registry();
        let host = Arc::new(HostRegion::new(4 << 20).unwrap());
        let g = reg.register(host.clone() as Arc<dyn PeerMemory>).unwrap();
        for (range, doff) in [(0..data.len() as u64, 0), (4096..(2 << 20) + 5, 8192), (777..1_000_001, 3)] {
            let mut src = Source::Kernel(KernelSource::open(&p).unwrap());
            let opts = LoadOptions { chunk: 256 << 10, depth: 3, dest_offset: doff, ..Default::default() };
            let r = load(&mut src, range.clone(), &g, &reg, &opts).unwrap();
            assert_eq!(r.bytes, range.end - range.start);
            assert_eq!(Some(r.checksum), r.source_checksum);
            assert_eq!(r.checksum, Checksum::of(&data[range.start as usize..range.end as usize]));
            let mut back = vec![0u8; r.bytes as usize];
            host.read_at(doff, &mut back).unwrap();
            assert!(back == data[range.start as usize..range.end as usize], "{range:?}: {}", r.method);
            assert!(r.reasons.iter().any(|s| s.starts_with("method:")));
        }
    }

    #[test]
    fn bad_ranges_and_small_destinations_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.bin");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let reg = fixture_registry();
        let g = reg.register(Arc::new(HostRegion::new(4096).unwrap()) as Arc<dyn PeerMemory>).unwrap();
        let mut src = Source::Kernel(KernelSource::open(&p).unwrap());
        let o = LoadOptions::default();
        assert!(matches!(load(&mut src, 0..10_001, &g, &reg, &o), Err(LoadError::BadRange { .. })));
        assert!(matches!(load(&mut src, 5..5, &g, &reg, &o), Err(LoadError::BadRange { .. })));
        assert!(matches!(load(&mut src, 0..8192, &g, &reg, &o), Err(LoadError::TooSmall { .. })));
        let o = LoadOptions { dest_offset: 4000, ..Default::default() };
        assert!(matches!(load(&mut src, 0..100, &g, &reg, &o), Err(LoadError::TooSmall { .. })));
    }
}
