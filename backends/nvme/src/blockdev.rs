//! NVMe block devices and O_DIRECT I/O between a namespace and a CPU-mapped buffer.
//!
//! Owns: finding `/dev/nvmeXnY` for a controller from sysfs, and aligned direct reads/writes.
//! Must not: decide whether peer-to-peer is allowed: the kernel does (EREMOTEIO), peermem's
//! verdict predicts it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use peermem::{Bdf, Topology};

#[derive(Debug, thiserror::Error)]
pub enum DirectIoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{bdf} has no NVMe namespace block device")]
    NoNamespace { bdf: Bdf },
    #[error("O_DIRECT needs {align}-byte alignment: offset {offset:#x}, length {len:#x}, buffer at {addr:#x}")]
    Misaligned { align: u64, offset: u64, len: u64, addr: u64 },
    #[error("{path}: short transfer, {done} of {len} bytes")]
    Short { path: PathBuf, done: usize, len: usize },
    #[error("{path}: the kernel refused peer-to-peer DMA (EREMOTEIO): {source}")]
    Remote { path: PathBuf, source: std::io::Error },
}

impl DirectIoError {
    /// True when the kernel refused the transfer as peer-to-peer it cannot do.
    pub fn is_remote(&self) -> bool {
        matches!(self, DirectIoError::Remote { .. })
    }
}

/// The first namespace of an NVMe controller, opened for O_DIRECT.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    /// Logical block size: the O_DIRECT alignment.
    block: u64,
}

const ALIGN: u64 = 4096;

impl BlockDevice {
    /// Opens the first namespace (`nvmeXn1`) of the NVMe controller at `bdf`.
    pub fn open_namespace(topo: &Topology, bdf: Bdf) -> Result<BlockDevice, DirectIoError> {
        let dev = topo.by_bdf(bdf).map_err(|_| DirectIoError::NoNamespace { bdf })?;
        let ctrl = dev.class_devices.iter().find(|c| c.class == "nvme").ok_or(DirectIoError::NoNamespace { bdf })?;
        let dir = topo.root().join("sys/class/nvme").join(&ctrl.name);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|source| DirectIoError::Io { path: dir.clone(), source })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&ctrl.name) && n[ctrl.name.len()..].starts_with('n'))
            .collect();
        names.sort();
        let ns = names.first().ok_or(DirectIoError::NoNamespace { bdf })?;
        let block = std::fs::read_to_string(dir.join(ns).join("queue/logical_block_size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512u64);
        BlockDevice::open(Path::new("/dev").join(ns), block)
    }

    /// Opens `path` for O_DIRECT reads and writes.
    pub fn open(path: PathBuf, block: u64) -> Result<BlockDevice, DirectIoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|source| DirectIoError::Io { path: path.clone(), source })?;
        Ok(BlockDevice { path, file, block })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, buf: &[u8]) -> Result<(), DirectIoError> {
        let align = ALIGN.max(self.block);
        let addr = buf.as_ptr() as u64;
        if !offset.is_multiple_of(align) || !(buf.len() as u64).is_multiple_of(align) || !addr.is_multiple_of(align) {
            return Err(DirectIoError::Misaligned { align, offset, len: buf.len() as u64, addr });
        }
        Ok(())
    }

    fn err(&self, source: std::io::Error) -> DirectIoError {
        if source.raw_os_error() == Some(libc::EREMOTEIO) {
            DirectIoError::Remote { path: self.path.clone(), source }
        } else {
            DirectIoError::Io { path: self.path.clone(), source }
        }
    }

    /// Reads `buf.len()` bytes at `offset` straight into `buf` (DMA by the controller).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DirectIoError> {
        self.check(offset, buf)?;
        let n = self.file.read_at(buf, offset).map_err(|e| self.err(e))?;
        if n != buf.len() {
            return Err(DirectIoError::Short { path: self.path.clone(), done: n, len: buf.len() });
        }
        Ok(())
    }

    /// Writes `buf` at `offset` straight from `buf` (DMA by the controller).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DirectIoError> {
        self.check(offset, buf)?;
        let n = self.file.write_at(buf, offset).map_err(|e| self.err(e))?;
        if n != buf.len() {
            return Err(DirectIoError::Short { path: self.path.clone(), done: n, len: buf.len() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_direct_io_is_refused_before_any_syscall() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        // tmpfs may refuse O_DIRECT: then only the open fails, which is a typed error too.
        match BlockDevice::open(p.clone(), 512) {
            Ok(b) => {
                let mut v = vec![0u8; 8192];
                let e = b.read_at(1, &mut v[..4096]).unwrap_err();
                assert!(matches!(e, DirectIoError::Misaligned { .. }), "{e}");
            }
            Err(e) => assert!(matches!(e, DirectIoError::Io { .. }), "{e}"),
        }
    }
}
