//! CPU mappings of PCI BARs: the only place a sysfs `resourceN` file is mapped.
//!
//! Owns: `Topology::map_bar` and `BarMapping`, a `PeerMemory` of `Backing::Bar` with a CPU
//! mapping. Checks the BAR against the topology (exists, is a memory BAR, holds the range) before
//! opening anything, and opens the file below the topology's sysroot, never `/sys` of the live
//! system behind a capture's back. Must not: compute bus addresses (the registry does).

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::PathBuf;

use super::topology::{Bar, BarKind};
use super::{Bdf, DevIdx, Topology};
use crate::region::{Backing, PeerMemory, Provider};
use crate::sys::{self, MappedSpan, Mapping};

/// Why a byte range of a BAR cannot be used as peer memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    #[error("unknown PCI device {0}")]
    UnknownDevice(Bdf),
    #[error("{bdf} has no BAR{bar} (empty or not a BAR 0-5)")]
    NoSuchBar { bdf: Bdf, bar: u8 },
    #[error("{bdf} BAR{bar} is an I/O port BAR: peers cannot DMA to it")]
    IoBar { bdf: Bdf, bar: u8 },
    #[error("{bdf} BAR{bar}: {len:#x} bytes at offset {offset:#x} do not fit the BAR's {bar_len:#x} bytes")]
    OutOfBar { bdf: Bdf, bar: u8, offset: u64, len: u64, bar_len: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum MapBarError {
    #[error(transparent)]
    Bar(#[from] BarError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// `len` bytes at `offset` of one memory BAR, mapped for the CPU through sysfs `resource<bar>`.
#[derive(Debug)]
pub struct BarMapping {
    bdf: Bdf,
    bar: u8,
    offset: u64,
    len: u64,
    /// The mapping starts on the page holding `offset`: `skip` bytes before it.
    skip: u64,
    map: Mapping,
}

impl BarMapping {
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    pub fn bar(&self) -> u8 {
        self.bar
    }
    /// Byte offset of the mapped range inside the BAR.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// The whole page-granular mapping, which starts `offset % page` bytes before the range
    /// asked for (0 for a page-aligned offset): for register blocks mapped from offset 0.
    pub fn into_mapping(self) -> Mapping {
        self.map
    }
}

impl PeerMemory for BarMapping {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::Bar { bdf: self.bdf, bar: self.bar, offset: self.offset }
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        self.map.span().sub(self.skip, self.len).ok()
    }
}

impl Topology {
    /// The memory BAR `bar` of `bdf`, checked to hold `len` (> 0) bytes at `offset`.
    pub fn memory_bar(&self, bdf: Bdf, bar: u8, offset: u64, len: u64) -> Result<(DevIdx, &Bar), BarError> {
        let idx = self.idx(bdf).map_err(|_| BarError::UnknownDevice(bdf))?;
        let b = self.device(idx).bar(bar).ok_or(BarError::NoSuchBar { bdf, bar })?;
        if b.kind == BarKind::Io {
            return Err(BarError::IoBar { bdf, bar });
        }
        let bar_len = b.cpu.len();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > bar_len) {
            return Err(BarError::OutOfBar { bdf, bar, offset, len, bar_len });
        }
        Ok((idx, b))
    }

    /// Maps `len` bytes at `offset` of memory BAR `bar` of `bdf` for the CPU (root only on a live
    /// system; a capture has no BAR contents). Any offset works: the mapping is page-granular
    /// and the returned region covers exactly the range asked for.
    pub fn map_bar(&self, bdf: Bdf, bar: u8, offset: u64, len: u64) -> Result<BarMapping, MapBarError> {
        let (idx, _) = self.memory_bar(bdf, bar, offset, len)?;
        let dev = self.device(idx);
        let skip = offset % sys::page_size();
        let path = self.root().join(&dev.sysfs_dir).join(format!("resource{bar}"));
        let io = |source| MapBarError::Io { path: path.clone(), source };
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
        let map = Mapping::shared_at(f.as_fd(), skip + len, offset - skip).map_err(io)?;
        Ok(BarMapping { bdf, bar, offset, len, skip, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology::discover(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch")).unwrap()
    }

    #[test]
    fn bars_are_checked_before_anything_is_opened() {
        let t = topo();
        let nvme: Bdf = "0000:03:00.0".parse().unwrap();
        assert!(matches!(
            t.map_bar("0000:7f:00.0".parse().unwrap(), 0, 0, 4096),
            Err(MapBarError::Bar(BarError::UnknownDevice(_)))
        ));
        assert!(matches!(t.map_bar(nvme, 5, 0, 4096), Err(MapBarError::Bar(BarError::NoSuchBar { .. }))));
        let bar2 = t.by_bdf(nvme).unwrap().bar(2).unwrap().cpu.len();
        assert!(matches!(t.map_bar(nvme, 2, bar2 - 4095, 4096), Err(MapBarError::Bar(BarError::OutOfBar { .. }))));
        assert!(matches!(t.map_bar(nvme, 2, u64::MAX, 2), Err(MapBarError::Bar(BarError::OutOfBar { .. }))));
        assert!(matches!(t.map_bar(nvme, 2, 0, 0), Err(MapBarError::Bar(BarError::OutOfBar { .. }))));
        // A capture holds no resource files: the error names the file below the capture.
        match t.map_bar(nvme, 2, 0, 4096) {
            Err(MapBarError::Io { path, .. }) => {
                assert!(path.starts_with(t.root()) && path.ends_with("resource2"), "{}", path.display())
            }
            other => panic!("{other:?}"),
        }
    }
}
