//! The controller memory buffer as a peer-memory region, found from the registers alone.
//!
//! Owns: mapping BAR0 (through `Topology::map_bar`), reading the CMB geometry (setting CMBMSC.CRE
//! when the registers read 0, as NVMe 1.4 requires), checking it against the BAR the topology
//! reports, and `CmbRegion`, a `PeerMemory` with `Backing::Bar { bdf, bar: BIR, offset }`.
//! Must not: compute CPU or bus addresses (the registry derives them from the topology), or touch
//! the CMB's contents while the kernel driver owns the controller (it may keep queues there).

use peermem::mem::MappedSpan;
use peermem::pci::topology::BarKind;
use peermem::{Backing, BarMapping, Bdf, PeerMemory, Provider, Topology};

use crate::regs::{Bar0, Cmb, CmbState, RegError};
use crate::sys::MappedMmio;

#[derive(Debug, thiserror::Error)]
pub enum CmbError {
    #[error(transparent)]
    MapBar(#[from] peermem::MapBarError),
    #[error(transparent)]
    Topology(#[from] peermem::TopologyError),
    #[error("{bdf}: {source}")]
    Registers { bdf: Bdf, source: RegError },
    #[error("{bdf} has no controller memory buffer")]
    Absent { bdf: Bdf },
    #[error("{bdf}: CMBLOC/CMBSZ still read 0 after setting CMBMSC.CRE")]
    NotEnabled { bdf: Bdf },
    #[error("{bdf}: the CMB is in BAR{bar}, which the topology does not list as a memory BAR")]
    NoSuchBar { bdf: Bdf, bar: u8 },
}

/// BAR0 of a controller mapped through sysfs `resource0` of the live system (root only).
pub fn open_bar0_sysfs(topo: &Topology, bdf: Bdf) -> Result<Bar0<MappedMmio>, CmbError> {
    let dev = topo.by_bdf(bdf)?;
    let bar = dev.bar(0).filter(|b| b.kind == BarKind::Mem).ok_or(CmbError::NoSuchBar { bdf, bar: 0 })?;
    // Registers and the first doorbells are all this crate needs from a kernel-owned BAR0.
    let len = bar.cpu.len().min(0x2000);
    let map = topo.map_bar(bdf, 0, 0, len)?.into_mapping();
    Bar0::new(MappedMmio::new(map)).map_err(|source| CmbError::Registers { bdf, source })
}

/// Reads the CMB geometry from `bar0`, setting CMBMSC.CRE first if CMBLOC/CMBSZ read 0.
pub fn read_cmb<M: crate::sys::Mmio>(bar0: &Bar0<M>, bdf: Bdf) -> Result<Cmb, CmbError> {
    let regs = |b: &Bar0<M>| b.registers().map_err(|source| CmbError::Registers { bdf, source });
    let state = regs(bar0)?.cmb().map_err(|source| CmbError::Registers { bdf, source })?;
    let state = match state {
        CmbState::NotEnabled => {
            bar0.enable_cmb_registers().map_err(|source| CmbError::Registers { bdf, source })?;
            regs(bar0)?.cmb().map_err(|source| CmbError::Registers { bdf, source })?
        }
        s => s,
    };
    match state {
        CmbState::Present(c) => Ok(c),
        CmbState::Absent => Err(CmbError::Absent { bdf }),
        CmbState::NotEnabled => Err(CmbError::NotEnabled { bdf }),
    }
}

/// A controller's CMB (or a sub-range of it) as a region of its BAR.
#[derive(Debug)]
pub struct CmbRegion {
    bdf: Bdf,
    cmb: Cmb,
    /// Byte offset of this region inside the CMB, and its length.
    start: u64,
    len: u64,
    cpu: Option<BarMapping>,
}

impl CmbRegion {
    /// The whole CMB `cmb` of `bdf`, checked against the BAR `topo` reports.
    pub fn new(topo: &Topology, bdf: Bdf, cmb: Cmb) -> Result<CmbRegion, CmbError> {
        let dev = topo.by_bdf(bdf)?;
        let bar =
            dev.bar(cmb.bir).filter(|b| b.kind == BarKind::Mem).ok_or(CmbError::NoSuchBar { bdf, bar: cmb.bir })?;
        cmb.check_within(bar.cpu.len()).map_err(|source| CmbError::Registers { bdf, source })?;
        Ok(CmbRegion { bdf, cmb, start: 0, len: cmb.size, cpu: None })
    }

    /// Finds the CMB of a live controller from its registers (sysfs `resource0`).
    pub fn discover(topo: &Topology, bdf: Bdf) -> Result<CmbRegion, CmbError> {
        let bar0 = open_bar0_sysfs(topo, bdf)?;
        let cmb = read_cmb(&bar0, bdf)?;
        tracing::debug!(%bdf, bir = cmb.bir, offset = cmb.offset, size = cmb.size, ?cmb.caps, "CMB found");
        CmbRegion::new(topo, bdf, cmb)
    }

    /// `len` bytes at `offset` of the CMB (e.g. a staging window the caller owns).
    pub fn sub(&self, offset: u64, len: u64) -> Result<CmbRegion, CmbError> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.len => {}
            _ => {
                return Err(CmbError::Registers {
                    bdf: self.bdf,
                    source: RegError::CmbOutsideBar { bir: self.cmb.bir, offset, size: len, bar_len: self.len },
                })
            }
        }
        Ok(CmbRegion { bdf: self.bdf, cmb: self.cmb, start: self.start + offset, len, cpu: None })
    }

    /// Maps the region for the CPU through sysfs `resource<BIR>`. Only for a controller the
    /// kernel driver does not own (the kernel may keep submission queues in the CMB).
    pub fn map_cpu(&mut self, topo: &Topology) -> Result<(), CmbError> {
        self.cpu = Some(topo.map_bar(self.bdf, self.cmb.bir, self.bar_offset(), self.len)?);
        Ok(())
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    pub fn cmb(&self) -> &Cmb {
        &self.cmb
    }
    pub fn bar(&self) -> u8 {
        self.cmb.bir
    }
    /// Byte offset of the region's start inside its BAR.
    pub fn bar_offset(&self) -> u64 {
        self.cmb.offset + self.start
    }
}

impl PeerMemory for CmbRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::Bar { bdf: self.bdf, bar: self.cmb.bir, offset: self.bar_offset() }
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        self.cpu.as_ref().and_then(|m| m.cpu_mapping())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peermem::{Registry, RouteKind};

    use super::*;
    use crate::regs::{CmbCaps, Registers};

    fn fixture() -> Arc<Topology> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qemu-switch");
        Arc::new(Topology::discover(root).unwrap())
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn cmb_from_qemu_registers_resolves_bus_addr_for_the_switch_peer_only() {
        let topo = fixture();
        let regs = Registers::decode(&crate::regs::tests::qemu_image()).unwrap();
        let CmbState::Present(cmb) = regs.cmb().unwrap() else { panic!() };
        let region = CmbRegion::new(&topo, bdf("0000:03:00.0"), cmb).unwrap();
        assert_eq!(region.len(), 64 << 20);
        let reg = Registry::new(topo.clone());
        let g = reg.register(Arc::new(region)).unwrap();
        let bar2 = topo.by_bdf(bdf("0000:03:00.0")).unwrap().bar(2).unwrap().cpu.start();
        assert_eq!(g.cpu_phys(), Some(bar2));
        let r = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
        assert!(matches!(r.kind, RouteKind::BusAddr(a) if a.raw() == bar2.raw()), "{:?}", r.kind);
        let r = reg.resolve(&g, reg.peer(bdf("0000:05:00.0")).unwrap()).unwrap();
        assert!(matches!(r.kind, RouteKind::Bounce(_)), "{:?}", r.kind);
    }

    #[test]
    fn a_cmb_outside_its_bar_or_in_a_missing_bar_is_refused() {
        let topo = fixture();
        let caps = CmbCaps::default();
        let too_big = Cmb { bir: 2, offset: 1 << 20, size: 64 << 20, caps };
        assert!(matches!(
            CmbRegion::new(&topo, bdf("0000:03:00.0"), too_big),
            Err(CmbError::Registers { source: RegError::CmbOutsideBar { .. }, .. })
        ));
        let no_bar = Cmb { bir: 4, offset: 0, size: 4096, caps };
        assert!(matches!(CmbRegion::new(&topo, bdf("0000:03:00.0"), no_bar), Err(CmbError::NoSuchBar { bar: 4, .. })));
        let ok = CmbRegion::new(&topo, bdf("0000:03:00.0"), Cmb { bir: 2, offset: 0, size: 1 << 20, caps }).unwrap();
        assert!(ok.sub(4096, 1 << 20).is_err());
        assert_eq!(ok.sub(4096, 4096).unwrap().bar_offset(), 4096);
    }
}
