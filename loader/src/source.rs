//! Where a batch's bytes come from: one type for every source, a file or block device read
//! through the kernel (with O_DIRECT, or through the page cache as the I/O mode says) or the
//! namespace of a controller owned by the userspace VFIO driver, with what the plan needs from
//! it: the device that reads it (the registry's peer; the CPU for a read through the page
//! cache), how that reader reaches memory, the alignment of a direct read, a read of known bytes
//! through host memory (for the route probe), and a second read for hashing.
//!
//! Owns: opening sources (a data set's files together, so Auto judges them against memory as
//! one), the way each file is read and why, and the PCI function behind a file (asked of
//! `peermem::storage`, under the registry's root). Must not: write to a source, decide direct or
//! bounce, or judge the page cache itself (`pagecache` does).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use peermem::mover::Reach;
use peermem::storage::serving_function;
use peermem::sysroot::Sysroot;
use peermem::{Bdf, Entry, Peer, PeerMemory, Provider, Registry};
use peermem_cuda::{Gds, GdsFile};
use peermem_nvme::driver::Namespace;
use peermem_nvme::{Controller, Dir};

use crate::error::LoadError;
use crate::options::{Access, IoMode};
use crate::pagecache::{self, Choice};
use crate::stage::Slot;

pub use crate::options::ALIGN;
/// Alignment of the first DMA address an NVMe command takes (a dword).
const NVME_MEM_ALIGN: u64 = 4;

/// A source of a batch: a file or block device, or a VFIO-owned namespace. Cheap to clone; the
/// file stays open (the controller owned) until the last clone and the last read of it are gone.
#[derive(Clone)]
pub struct Source(Arc<Kind>);

enum Kind {
    File(FileSource),
    Nvme(Box<NvmeSource>),
}

struct FileSource {
    path: PathBuf,
    file: Arc<File>,
    how: How,
    len: u64,
    /// The PCI function that serves the file, or why none is known.
    device: Result<Bdf, String>,
    /// An Auto source read through the page cache: the same file with O_DIRECT, for reads into
    /// device memory (opened on the first such read; `None` inside when that failed).
    twin: Option<OnceLock<Option<Source>>>,
    /// The file registered with cuFile on the first read into CUDA memory, or why it cannot be.
    gds: OnceLock<Result<Arc<GdsFile>, String>>,
}

/// How a file is read, and why in words.
#[derive(Debug, Clone)]
struct How {
    /// With O_DIRECT (else through the page cache).
    direct: bool,
    why: String,
    /// O_DIRECT was wanted and the filesystem refused it.
    refused: bool,
}

/// A file or block device opened read-only (with O_DIRECT when asked and allowed), its way of
/// reading not yet settled.
struct Opened {
    path: PathBuf,
    file: File,
    direct: bool,
    len: u64,
}

struct NvmeSource {
    ctrl: Mutex<Controller>,
    bdf: Bdf,
    peer: Peer,
    ns: Namespace,
}

impl FileSource {
    /// The same open file once more, with O_DIRECT (through /proc/self/fd, so it is the same
    /// inode even if the path was replaced since): the twin an Auto source reads device memory
    /// through. `None` when it cannot be opened so.
    fn open_twin(&self) -> Option<Source> {
        let fd = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&fd) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), %e, "no O_DIRECT twin: device memory is read buffered");
                return None;
            }
        };
        let why = "the destination is device memory, which the device writes itself (host memory is read \
                   through the page cache)";
        Some(Source(Arc::new(Kind::File(FileSource {
            path: self.path.clone(),
            file: Arc::new(file),
            how: How { direct: true, why: why.into(), refused: false },
            len: self.len,
            device: self.device.clone(),
            twin: None,
            gds: OnceLock::new(),
        }))))
    }

    /// `n` bytes at `at` straight into `mem` at `off` in one `pread` (a short read is an error).
    fn read_exact(&self, at: u64, mem: &dyn PeerMemory, off: u64, n: u64) -> Result<(), LoadError> {
        let got = crate::sys::pread_into(&self.file, at, mem, off, n)
            .map_err(|source| LoadError::Io { path: self.path.clone(), source })?;
        if (got as u64) < n {
            return Err(LoadError::ShortRead { path: self.path.clone(), offset: at, got: got as u64, want: n });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why a path cannot be a source (`None`: a regular file or block device).
fn not_a_file(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() || ft.is_block_device() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// Opens `path` read-only, with O_DIRECT when `try_direct` and the filesystem allows.
fn open_file(path: &Path, try_direct: bool) -> Result<Opened, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    // The type is checked before opening (opening a FIFO would wait for a writer) and again on
    // the open file. No O_NONBLOCK: a block device read with it may come back short.
    if let Some(kind) = not_a_file(std::fs::metadata(path).map_err(io)?.file_type()) {
        return Err(LoadError::NotAFile { path: path.to_path_buf(), kind });
    }
    let open = |flags| OpenOptions::new().read(true).custom_flags(flags).open(path);
    let (file, direct) = match try_direct {
        false => (open(0).map_err(io)?, false),
        true => match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0).map_err(io)?, false),
            Err(e) => return Err(io(e)),
        },
    };
    let meta = file.metadata().map_err(io)?;
    if let Some(kind) = not_a_file(meta.file_type()) {
        return Err(LoadError::NotAFile { path: path.to_path_buf(), kind });
    }
    let len = if meta.file_type().is_file() { meta.len() } else { (&file).seek(SeekFrom::End(0)).map_err(io)? };
    Ok(Opened { path: path.to_path_buf(), file, direct, len })
}

/// How each file of a set is to be read, and why.
fn wanted(opened: &[Opened], io: IoMode, strict: bool, access: Access) -> Vec<Choice> {
    let all = |buffered, why: &str| {
        opened.iter().map(|_| Choice { buffered, willneed: false, why: why.to_string() }).collect()
    };
    match (io, strict) {
        (IoMode::Direct, _) => all(false, "asked for (io direct)"),
        (IoMode::Buffered, _) => all(true, "asked for (io buffered)"),
        (IoMode::Auto, true) => all(false, "a strict load asks the reading device to write the destination itself"),
        (IoMode::Auto, false) => pagecache::judge(&opened.iter().map(|o| (&o.file, o.len)).collect::<Vec<_>>(), access),
    }
}

/// The source `o` becomes, read as `c` says: O_DIRECT cleared for a buffered read, a refused
/// O_DIRECT read through the page cache instead. An `auto` source read through the page cache
/// that O_DIRECT could open gets a twin for device memory.
fn settle(o: Opened, c: Choice, auto: bool, root: &Path) -> Result<Source, LoadError> {
    let io = |source| LoadError::Io { path: o.path.clone(), source };
    let mut how = How { direct: o.direct, why: c.why, refused: false };
    if c.buffered {
        if o.direct {
            crate::sys::clear_direct(&o.file).map_err(io)?;
            how.direct = false;
        }
    } else if !o.direct {
        how = How { direct: false, why: "the filesystem refused O_DIRECT".into(), refused: true };
    }
    let twin = (auto && c.buffered && o.direct).then(OnceLock::new);
    let device = Sysroot::open(root)
        .map_err(|e| e.to_string())
        .and_then(|sys| serving_function(&sys, &o.path).map(|s| s.bdf).map_err(|e| e.to_string()));
    let f = FileSource { path: o.path, file: Arc::new(o.file), how, len: o.len, device, twin, gds: OnceLock::new() };
    Ok(Source(Arc::new(Kind::File(f))))
}

impl Source {
    /// Opens `path` read-only with O_DIRECT (through the page cache where the filesystem
    /// refuses it), and asks `peermem::storage` under the registry's root which PCI function
    /// serves it.
    pub fn open(path: impl AsRef<Path>, reg: &Registry) -> Result<Source, LoadError> {
        let mut v = Source::open_set(&[path], reg, IoMode::Direct, false, Access::Records)?;
        Ok(v.remove(0))
    }

    /// Opens the files of one data set, each read as `io` says; with `IoMode::Auto` they are
    /// judged together (`pagecache::choose`: residency, the whole set's bytes against memory,
    /// and how they will be read, `access`), except under `strict`, which reads with O_DIRECT (a
    /// strict load asks the reading device to write the destination itself).
    pub fn open_set<P: AsRef<Path>>(
        paths: &[P],
        reg: &Registry,
        io: IoMode,
        strict: bool,
        access: Access,
    ) -> Result<Vec<Source>, LoadError> {
        let try_direct = io != IoMode::Buffered;
        let opened = paths.iter().map(|p| open_file(p.as_ref(), try_direct)).collect::<Result<Vec<_>, _>>()?;
        let choices = wanted(&opened, io, strict, access);
        let auto = io == IoMode::Auto && !strict;
        let root = reg.topology().root();
        let mut ahead = Vec::new();
        let mut sources = Vec::with_capacity(opened.len());
        for (o, c) in opened.into_iter().zip(choices) {
            let willneed = c.willneed;
            let s = settle(o, c, auto, root)?;
            if let (true, Some(f)) = (willneed, s.file()) {
                ahead.push((Arc::downgrade(f), s.len()));
            }
            sources.push(s);
        }
        pagecache::read_ahead(ahead);
        Ok(sources)
    }

    /// The first namespace of NVMe controller `bdf` (kernel driver bound), as a block device.
    pub fn open_namespace(bdf: Bdf, reg: &Registry) -> Result<Source, LoadError> {
        let bd = peermem_nvme::BlockDevice::open_namespace(reg.topology(), bdf)
            .map_err(|e| LoadError::Io { path: format!("nvme {bdf}").into(), source: std::io::Error::other(e) })?;
        Source::open(bd.path(), reg)
    }

    /// The namespace of a controller owned by the userspace VFIO driver. The registry must know
    /// the controller: it resolves every destination for it.
    pub fn nvme(ctrl: Controller, reg: &Registry) -> Result<Source, LoadError> {
        let bdf = ctrl.bdf();
        reg.peer(bdf).map_err(|e| LoadError::Unreachable(format!("{bdf}: not in the loader's topology: {e}")))?;
        let (peer, ns) = (ctrl.peer(), ctrl.namespace());
        Ok(Source(Arc::new(Kind::Nvme(Box::new(NvmeSource { ctrl: Mutex::new(ctrl), bdf, peer, ns })))))
    }

    /// Bytes readable from the source.
    pub fn len(&self) -> u64 {
        match &*self.0 {
            Kind::File(f) => f.len,
            Kind::Nvme(n) => n.ns.bytes(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The path of a file or block device (`None` for a VFIO-owned namespace).
    pub fn path(&self) -> Option<&Path> {
        match &*self.0 {
            Kind::File(f) => Some(&f.path),
            Kind::Nvme(_) => None,
        }
    }
    /// The PCI function that reads the source (the file's device, or the controller).
    pub fn device(&self) -> Option<Bdf> {
        match &*self.0 {
            Kind::File(f) => f.device.as_ref().ok().copied(),
            Kind::Nvme(n) => Some(n.bdf),
        }
    }
    /// A file opened with O_DIRECT, or a namespace (the device writes the destination itself).
    pub fn is_direct(&self) -> bool {
        match &*self.0 {
            Kind::File(f) => f.how.direct,
            Kind::Nvme(_) => true,
        }
    }
    /// How the source is read and why: `O_DIRECT: ...`, `buffered: ...` (through the page
    /// cache), or the VFIO driver's read commands.
    pub fn io(&self) -> String {
        match &*self.0 {
            Kind::File(f) if f.how.direct => format!("O_DIRECT: {}", f.how.why),
            Kind::File(f) if f.twin.is_some() => format!("buffered: {}; into device memory O_DIRECT", f.how.why),
            Kind::File(f) => format!("buffered: {}", f.how.why),
            Kind::Nvme(_) => "NVMe read commands of the VFIO driver".into(),
        }
    }
    /// What the source is, how it is read and by which device.
    pub fn describe(&self) -> String {
        match &*self.0 {
            Kind::File(f) => format!(
                "{} ({}, {})",
                f.path.display(),
                match (&f.how, &f.twin) {
                    (How { direct: true, .. }, _) => "O_DIRECT",
                    (How { refused: true, .. }, _) => "buffered: the filesystem refused O_DIRECT",
                    (_, Some(_)) => "buffered; into device memory O_DIRECT",
                    _ => "buffered",
                },
                match &f.device {
                    Ok(d) => format!("device {d}"),
                    Err(why) => format!("read by the CPU: {why}"),
                }
            ),
            Kind::Nvme(n) => format!("namespace {} of {} (VFIO driver)", n.ns.nsid, n.bdf),
        }
    }

    /// The most read commands the controller held at once so far (0 for a file).
    pub fn peak_in_flight(&self) -> usize {
        self.ctrl().map_or(0, |c| c.peak_in_flight())
    }
    /// Whether a failure (a timeout, a device error) disabled the controller; the next batch
    /// re-creates its queues (false for a file).
    pub fn needs_reinit(&self) -> bool {
        self.ctrl().is_some_and(|c| c.needs_reinit())
    }
    /// The controller back, once no other clone of this source (and no queued batch) holds it.
    pub fn into_controller(self) -> Result<Controller, Source> {
        match Arc::try_unwrap(self.0) {
            Ok(Kind::Nvme(n)) => Ok(n.ctrl.into_inner().unwrap_or_else(|p| p.into_inner())),
            Ok(k) => Err(Source(Arc::new(k))),
            Err(a) => Err(Source(a)),
        }
    }

    /// Whether two handles name the same open source.
    pub(crate) fn same(&self, o: &Source) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
    pub(crate) fn is_nvme(&self) -> bool {
        matches!(&*self.0, Kind::Nvme(_))
    }
    /// The open file (files only).
    pub(crate) fn file(&self) -> Option<&Arc<File>> {
        match &*self.0 {
            Kind::File(f) => Some(&f.file),
            Kind::Nvme(_) => None,
        }
    }
    /// The controller, locked (namespaces only).
    pub(crate) fn ctrl(&self) -> Option<MutexGuard<'_, Controller>> {
        match &*self.0 {
            Kind::Nvme(n) => Some(n.ctrl.lock().unwrap_or_else(|p| p.into_inner())),
            Kind::File(_) => None,
        }
    }

    /// O_DIRECT was wanted and the filesystem refused it: the file is read through the page cache.
    pub(crate) fn refused_direct(&self) -> bool {
        matches!(&*self.0, Kind::File(f) if f.how.refused)
    }
    /// The reason line a destination's report carries for how its source is read (none for a
    /// namespace of the VFIO driver).
    pub(crate) fn io_reason(&self) -> Option<String> {
        match &*self.0 {
            Kind::File(f) if f.how.direct => Some(format!("read with O_DIRECT: {}", f.how.why)),
            Kind::File(f) => Some(format!("read through the page cache (buffered): {}", f.how.why)),
            Kind::Nvme(_) => None,
        }
    }

    /// The source a read into `dest` goes through. An Auto source read through the page cache
    /// reads device memory with O_DIRECT (its twin: the same open file), where the device
    /// writes the destination itself instead of the CPU storing into device memory; host
    /// memory, and every other source, reads through the source itself.
    pub(crate) fn for_dest(&self, dest: &Entry) -> Source {
        let Kind::File(f) = &*self.0 else { return self.clone() };
        match &f.twin {
            Some(twin) if !matches!(dest.provider(), Provider::Host { .. }) => {
                twin.get_or_init(|| f.open_twin()).clone().unwrap_or_else(|| self.clone())
            }
            _ => self.clone(),
        }
    }

    /// The source registered with cuFile (`gds`), made on the first call and kept with the open
    /// file; `Err` says why GPUDirect Storage cannot read it (no O_DIRECT, a filesystem or device
    /// cuFile does not read directly, a namespace of peermem's own NVMe driver).
    pub(crate) fn gds_file(&self, gds: Gds) -> Result<Arc<GdsFile>, String> {
        let f = match &*self.0 {
            Kind::File(f) => f,
            Kind::Nvme(n) => {
                return Err(format!("{} is read by peermem's own NVMe driver (VFIO), not through a file", n.bdf))
            }
        };
        let r = f.gds.get_or_init(|| match (f.how.direct, f.how.refused) {
            (true, _) => gds.register(f.file.clone()).map(Arc::new).map_err(|e| e.to_string()),
            (false, true) => Err("O_DIRECT not possible for this file: the filesystem refused it".into()),
            (false, false) => {
                Err(format!("O_DIRECT not possible for this file: it is read through the page cache ({})", f.how.why))
            }
        });
        r.clone()
    }

    /// Why no PCI function is known to serve this file (`None`: one is, or not a file).
    pub(crate) fn device_unknown(&self) -> Option<String> {
        match &*self.0 {
            Kind::File(f) => f.device.as_ref().err().cloned(),
            Kind::Nvme(_) => None,
        }
    }

    /// The peer the registry resolves destinations for: the reading device; the CPU for a read
    /// through the page cache (the kernel's copy out of it), or when no PCI function is known.
    pub(crate) fn peer(&self, reg: &Registry) -> Peer {
        match &*self.0 {
            Kind::File(f) if !f.how.direct => Peer::Cpu,
            Kind::File(f) => f.device.as_ref().ok().and_then(|b| reg.peer(*b).ok()).unwrap_or(Peer::Cpu),
            Kind::Nvme(n) => n.peer,
        }
    }
    /// How the reader reaches memory: the kernel pins pages for O_DIRECT; the CPU stores a
    /// buffered read's bytes; the VFIO driver programs addresses.
    pub(crate) fn reach(&self) -> Reach {
        match &*self.0 {
            Kind::File(f) if f.how.direct => Reach::KernelPages,
            Kind::File(_) => Reach::CpuCopy,
            Kind::Nvme(_) => Reach::DeviceAddress,
        }
    }
    /// Alignment of source offsets and lengths a read takes.
    pub(crate) fn align(&self) -> u64 {
        match &*self.0 {
            Kind::File(f) if f.how.direct => ALIGN,
            Kind::File(_) => 1,
            Kind::Nvme(n) => n.ns.block_size,
        }
    }
    /// Alignment of the destination memory address (or, without a CPU mapping, offset) a direct
    /// read needs.
    pub(crate) fn mem_align(&self) -> u64 {
        match &*self.0 {
            Kind::File(f) if f.how.direct => ALIGN,
            Kind::File(_) => 1,
            Kind::Nvme(_) => NVME_MEM_ALIGN,
        }
    }
    /// How the source reads alignment rules out a direct read, in words.
    pub(crate) fn alignment_rule(&self) -> String {
        match &*self.0 {
            Kind::File(_) => format!("O_DIRECT needs {ALIGN}-byte aligned file offsets, lengths and memory"),
            Kind::Nvme(n) => format!(
                "NVMe reads move whole {}-byte blocks from a block boundary into a {NVME_MEM_ALIGN}-byte aligned address",
                n.ns.block_size
            ),
        }
    }

    /// Reads `n` bytes at `at` (aligned for this source) straight into `entry` at `doff`, outside
    /// any batch (the route probe's transfer).
    pub(crate) fn read_into(&self, reg: &Registry, at: u64, entry: &Entry, doff: u64, n: u64) -> Result<(), LoadError> {
        match &*self.0 {
            Kind::File(f) => f.read_exact(at, &**entry.region(), doff, n),
            Kind::Nvme(s) => {
                let mut c = s.ctrl.lock().unwrap_or_else(|p| p.into_inner());
                Ok(c.transfer(reg, Dir::Read, entry, doff, at / s.ns.block_size, n)?)
            }
        }
    }

    /// `n` bytes at `at` (aligned, at most the slot's length) read through the host staging
    /// buffer `slot`: the known-good path a route probe compares with.
    pub(crate) fn read_known(&self, reg: &Registry, slot: &mut Slot, at: u64, n: u64) -> Result<Vec<u8>, LoadError> {
        match &*self.0 {
            Kind::File(f) => f.read_exact(at, &*slot.region, 0, n)?,
            Kind::Nvme(_) => {
                let entry = slot.register(reg)?.clone();
                self.read_into(reg, at, &entry, 0, n)?;
            }
        }
        let mut v = vec![0u8; n as usize];
        slot.host.read_at(0, &mut v)?;
        Ok(v)
    }

    /// xxh3-64 of `len` bytes at `off`, read a second time: a file through the page cache (a
    /// second, buffered open), a namespace through the host staging buffer `slot`.
    pub(crate) fn hash(&self, reg: &Registry, slot: &mut Slot, off: u64, len: u64) -> Result<u64, LoadError> {
        match &*self.0 {
            Kind::File(f) => {
                let io = |source| LoadError::Io { path: f.path.clone(), source };
                let file = File::open(&f.path).map_err(io)?;
                xxh3_in_pieces(len, |o, buf| file.read_exact_at(buf, off + o).map_err(io))
            }
            Kind::Nvme(s) => {
                // Whole blocks through the staging buffer; only the asked bytes are hashed.
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let bs = s.ns.block_size;
                let (mut p, end) = (off / bs * bs, off + len);
                while p < end {
                    let n = (slot.len() / bs * bs).min(end.div_ceil(bs) * bs - p);
                    let v = self.read_known(reg, slot, p, n)?;
                    let lo = off.saturating_sub(p) as usize;
                    let hi = (end - p).min(n) as usize;
                    h.update(&v[lo..hi]);
                    p += n;
                }
                Ok(h.digest())
            }
        }
    }

    /// Whether this is a block device that now reads as empty (what a namespace whose
    /// controller was removed looks like from the inside).
    pub(crate) fn emptied(&self) -> bool {
        match &*self.0 {
            Kind::File(f) => {
                f.file.metadata().is_ok_and(|m| m.file_type().is_block_device())
                    && (&*f.file).seek(SeekFrom::End(0)).is_ok_and(|n| n == 0)
            }
            Kind::Nvme(_) => false,
        }
    }
}

/// xxh3-64 of `len` bytes that `read(offset, buf)` copies out a piece (up to 1 MiB) at a time:
/// no buffer of the whole range, and no reference over memory a device may write.
pub(crate) fn xxh3_in_pieces<E>(len: u64, mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>) -> Result<u64, E> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    let mut o = 0;
    while o < len {
        let n = (buf.len() as u64).min(len - o) as usize;
        read(o, &mut buf[..n])?;
        h.update(&buf[..n]);
        o += n as u64;
    }
    Ok(h.digest())
}
