//! CPU mappings of PCI BARs: the only place a sysfs `resourceN` file is mapped.
//!
//! Owns: the BAR checks (`Topology::memory_bar`: exists, is a memory BAR, holds the range) and
//! the page-granular mapping of `resourceN` they guard. Checks before opening anything, and
//! opens the file below the topology's sysroot, never `/sys` of the live system behind a
//! capture's back. The region over such a mapping (`region::BarMapping`, made by
//! `Topology::map_bar`) lives with the regions. Must not: compute bus addresses (the registry
//! does) or know what a region is.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::PathBuf;

use super::topology::{Bar, BarKind};
use super::{Bdf, DevIdx, Topology};
use crate::mem::{self, Mapping};

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

    /// Maps the pages holding `len` bytes at `offset` of memory BAR `bar` of `bdf` (root only on
    /// a live system; a capture has no BAR contents). The mapping starts on the page holding
    /// `offset`; the second value is how many bytes before `offset` that is.
    pub(crate) fn map_bar_pages(
        &self,
        bdf: Bdf,
        bar: u8,
        offset: u64,
        len: u64,
    ) -> Result<(Mapping, u64), MapBarError> {
        let (idx, _) = self.memory_bar(bdf, bar, offset, len)?;
        let dev = self.device(idx);
        let skip = offset % mem::page_size();
        let path = self.root().join(&dev.sysfs_dir).join(format!("resource{bar}"));
        let io = |source| MapBarError::Io { path: path.clone(), source };
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
        let map = Mapping::shared_at(f.as_fd(), skip + len, offset - skip).map_err(io)?;
        Ok((map, skip))
    }
}
