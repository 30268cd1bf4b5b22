//! Regions over a PCI memory BAR: `BarRegion` (a range peers reach, with no CPU mapping of its
//! own) and `BarMapping` (a range mapped for the CPU through sysfs `resource<bar>`, made by
//! `Topology::map_bar`).
//!
//! Owns: these two `PeerMemory` implementations of `Backing::Bar`. The BAR checks and the
//! mapping itself come from `pci` (`Topology::memory_bar`, `pci::bar`); this module wraps them
//! into regions. Must not: compute bus addresses (the registry does).

use super::{Backing, PeerMemory, Provider};
use crate::mem::{MappedSpan, Mapping};
use crate::pci::{Bdf, MapBarError, Topology};

/// `len` bytes at `offset` of a PCI memory BAR, without a CPU mapping of its own. The registry
/// checks the BAR exists, is a memory BAR and holds the range when it is registered.
#[derive(Debug, Clone)]
pub struct BarRegion {
    pub bdf: Bdf,
    pub bar: u8,
    pub offset: u64,
    pub len: u64,
}

impl PeerMemory for BarRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::Bar { bdf: self.bdf, bar: self.bar, offset: self.offset }
    }
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
    /// Maps `len` bytes at `offset` of memory BAR `bar` of `bdf` for the CPU (root only on a live
    /// system; a capture has no BAR contents). Any offset works: the mapping is page-granular
    /// and the returned region covers exactly the range asked for.
    pub fn map_bar(&self, bdf: Bdf, bar: u8, offset: u64, len: u64) -> Result<BarMapping, MapBarError> {
        let (map, skip) = self.map_bar_pages(bdf, bar, offset, len)?;
        Ok(BarMapping { bdf, bar, offset, len, skip, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::BarError;

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
