//! Where the bytes come from: a file or block device read through the kernel (O_DIRECT when the
//! filesystem allows), or a namespace of a controller owned by the userspace VFIO driver.
//!
//! Owns: opening sources, finding the PCI function behind a file. Must not: write to a source.

use std::fs::{File, OpenOptions};

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use peermem::{Bdf, Topology};
use peermem_nvme::Controller;

use crate::error::LoadError;

/// O_DIRECT alignment the loader uses for files and block devices.
pub const ALIGN: u64 = 4096;

/// A source opened through the kernel: a regular file or a block device (a namespace).
#[derive(Debug)]
pub struct KernelSource {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// Opened with O_DIRECT (false when the filesystem refused it).
    pub(crate) direct: bool,
    len: u64,
    /// The PCI function behind the file's block device, when there is one.
    pub(crate) device: Option<Bdf>,
}

impl KernelSource {
    /// Opens `path` read-only, with O_DIRECT when the filesystem allows, and finds the PCI
    /// device that serves it (sysfs `/sys/dev/block/MAJ:MIN`).
    pub fn open(path: impl AsRef<Path>) -> Result<KernelSource, LoadError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| LoadError::Io { path: path.clone(), source };
        // The type is checked before opening (opening a FIFO would wait for a writer) and again
        // on the open file. No O_NONBLOCK: a block device read with it may come back short.
        let not_a_file = |ft: std::fs::FileType| {
            let kind = if ft.is_file() || ft.is_block_device() {
                return None;
            } else if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a file"
            };
            Some(kind)
        };
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
        let dev = if meta.file_type().is_file() { meta.dev() } else { meta.rdev() };
        let len = if meta.file_type().is_file() { meta.len() } else { (&file).seek(SeekFrom::End(0)).map_err(io)? };
        let device = pci_device_of(libc::major(dev), libc::minor(dev));
        Ok(KernelSource { path, file, direct, len, device })
    }

    /// The first namespace of the NVMe controller `bdf` (kernel driver bound).
    pub fn namespace(topo: &Topology, bdf: Bdf) -> Result<KernelSource, LoadError> {
        let bd = peermem_nvme::BlockDevice::open_namespace(topo, bdf)
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

    /// Whether this is a block device that now reads as empty (what a namespace whose
    /// controller was removed looks like from the inside).
    pub(crate) fn emptied_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file.metadata().is_ok_and(|m| m.file_type().is_block_device())
            && (&self.file).seek(SeekFrom::End(0)).is_ok_and(|n| n == 0)
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
    pub(crate) fn align(&self) -> u64 {
        match self {
            Source::Kernel(k) if k.direct => ALIGN,
            Source::Kernel(_) => 1,
            Source::Vfio(c) => c.namespace().block_size,
        }
    }
    pub(crate) fn describe(&self) -> String {
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
