//! Where a batch's bytes come from: one type for every source, a file or block device read
//! through the kernel (O_DIRECT when the filesystem allows) or the namespace of a controller
//! owned by the userspace VFIO driver, with what the plan needs from it: the device that reads
//! it (the registry's peer), how that device reaches memory, the alignment of a direct read, a
//! read of known bytes through host memory (for the route probe), and a second read for hashing.
//!
//! Owns: opening sources and the PCI function behind a file (asked of `peermem::storage`, under
//! the registry's root). Must not: write to a source, or decide direct or bounce.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use peermem::mover::Reach;
use peermem::storage::serving_function;
use peermem::sysroot::Sysroot;
use peermem::{Bdf, Entry, Peer, PeerMemory, Registry};
use peermem_nvme::driver::Namespace;
use peermem_nvme::{Controller, Dir};

use crate::error::LoadError;
use crate::stage::Slot;

/// O_DIRECT alignment the loader uses for files and block devices (file offsets, lengths and
/// memory addresses).
pub const ALIGN: u64 = 4096;
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
    /// Opened with O_DIRECT (false when the filesystem refused it).
    direct: bool,
    len: u64,
    /// The PCI function that serves the file, or why none is known.
    device: Result<Bdf, String>,
}

struct NvmeSource {
    ctrl: Mutex<Controller>,
    bdf: Bdf,
    peer: Peer,
    ns: Namespace,
}

impl FileSource {
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

impl Source {
    /// Opens `path` read-only, with O_DIRECT when the filesystem allows, and asks
    /// `peermem::storage` under the registry's root which PCI function serves it.
    pub fn open(path: impl AsRef<Path>, reg: &Registry) -> Result<Source, LoadError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| LoadError::Io { path: path.clone(), source };
        // The type is checked before opening (opening a FIFO would wait for a writer) and again
        // on the open file. No O_NONBLOCK: a block device read with it may come back short.
        if let Some(kind) = not_a_file(std::fs::metadata(&path).map_err(io)?.file_type()) {
            return Err(LoadError::NotAFile { path, kind });
        }
        let open = |flags| OpenOptions::new().read(true).custom_flags(flags).open(&path);
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0).map_err(io)?, false),
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        if let Some(kind) = not_a_file(meta.file_type()) {
            return Err(LoadError::NotAFile { path, kind });
        }
        let len = if meta.file_type().is_file() { meta.len() } else { (&file).seek(SeekFrom::End(0)).map_err(io)? };
        let device = Sysroot::open(reg.topology().root())
            .map_err(|e| e.to_string())
            .and_then(|sys| serving_function(&sys, &path).map(|s| s.bdf).map_err(|e| e.to_string()));
        Ok(Source(Arc::new(Kind::File(FileSource { path, file: Arc::new(file), direct, len, device }))))
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
            Kind::File(f) => f.direct,
            Kind::Nvme(_) => true,
        }
    }
    /// What the source is, how it is read and by which device.
    pub fn describe(&self) -> String {
        match &*self.0 {
            Kind::File(f) => format!(
                "{} ({}, {})",
                f.path.display(),
                if f.direct { "O_DIRECT" } else { "buffered: the filesystem refused O_DIRECT" },
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

    /// The peer the registry resolves destinations for: the reading device, or the CPU when no
    /// PCI function is known (a file on tmpfs, say).
    pub(crate) fn peer(&self, reg: &Registry) -> Peer {
        match &*self.0 {
            Kind::File(f) => f.device.as_ref().ok().and_then(|b| reg.peer(*b).ok()).unwrap_or(Peer::Cpu),
            Kind::Nvme(n) => n.peer,
        }
    }
    /// How the reading device reaches memory: the kernel pins pages for O_DIRECT; the VFIO
    /// driver programs addresses.
    pub(crate) fn reach(&self) -> Reach {
        match &*self.0 {
            Kind::File(_) => Reach::KernelPages,
            Kind::Nvme(_) => Reach::DeviceAddress,
        }
    }
    /// What rules a direct read out whatever the route (the planner's precondition).
    pub(crate) fn precondition(&self) -> Result<(), &'static str> {
        match &*self.0 {
            Kind::File(f) if !f.direct => Err("the filesystem refused O_DIRECT (page cache copies)"),
            _ => Ok(()),
        }
    }
    /// Alignment of source offsets and lengths a read takes.
    pub(crate) fn align(&self) -> u64 {
        match &*self.0 {
            Kind::File(f) if f.direct => ALIGN,
            Kind::File(_) => 1,
            Kind::Nvme(n) => n.ns.block_size,
        }
    }
    /// Alignment of the destination memory address (or, without a CPU mapping, offset) a direct
    /// read needs.
    pub(crate) fn mem_align(&self) -> u64 {
        match &*self.0 {
            Kind::File(f) if f.direct => ALIGN,
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
