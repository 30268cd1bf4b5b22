//! Kernel P2PDMA memory: pages of a provider's BAR handed out by sysfs `p2pmem/allocate`.
//!
//! Owns: allocating (mmap of `p2pmem/allocate`), finding the allocation's place in the BAR, and the
//! `PeerMemory` impl. Must not: compute bus addresses (the registry does from the BAR place).

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::PathBuf;

use peermem::mem::{MappedSpan, Mapping};
use peermem::pci::topology::BarKind;
use peermem::{Backing, Bdf, CpuPhys, PeerMemory, Provider, Topology, VirtAddr};

#[derive(Debug, thiserror::Error)]
pub enum P2pmemError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{bdf} has no p2pmem (not a P2PDMA provider, or the kernel lacks CONFIG_PCI_P2PDMA)")]
    NotProvider { bdf: Bdf },
    #[error("{bdf}: {len} bytes requested, {available} available in its p2pmem pool")]
    Exhausted { bdf: Bdf, len: u64, available: u64 },
    #[error("p2pmem page at {va}: {source}")]
    NoPhysAddr { va: VirtAddr, source: peermem::mem::PagemapError },
    #[error("{bdf}: p2pmem page at CPU {cpu} lies in no memory BAR of the device")]
    NotInBar { bdf: Bdf, cpu: CpuPhys },
    #[error("{bdf}: p2pmem pages are not physically contiguous ({first} then {at} at +{offset:#x})")]
    NotContiguous { bdf: Bdf, first: CpuPhys, at: CpuPhys, offset: u64 },
    #[error(transparent)]
    Topology(#[from] peermem::TopologyError),
}

/// `len` bytes of a provider's p2pmem pool, mapped into this process.
#[derive(Debug)]
pub struct P2pmemRegion {
    bdf: Bdf,
    bar: u8,
    bar_offset: u64,
    map: Mapping,
}

impl P2pmemRegion {
    /// Allocates `len` bytes (rounded up to pages) from `bdf`'s pool on the live system, and
    /// finds which BAR of `topo`'s device holds them.
    pub fn allocate(topo: &Topology, bdf: Bdf, len: u64) -> Result<P2pmemRegion, P2pmemError> {
        let dev = topo.by_bdf(bdf)?;
        let pool = dev.p2pmem.ok_or(P2pmemError::NotProvider { bdf })?;
        let page = peermem::mem::page_size();
        let len = len.max(1).div_ceil(page) * page;
        if len > pool.available {
            return Err(P2pmemError::Exhausted { bdf, len, available: pool.available });
        }
        let path = topo.root().join(&dev.sysfs_dir).join("p2pmem/allocate");
        let io = |source| P2pmemError::Io { path: path.clone(), source };
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
        let map = Mapping::shared(f.as_fd(), len).map_err(io)?;
        // Touch every page so it is faulted in (the kernel allocates from the pool at fault time),
        // then check the pages are one contiguous range of one BAR.
        let span = map.span();
        for off in (0..len).step_by(page as usize) {
            span.write_at(off, &[0]).map_err(|e| io(std::io::Error::other(e)))?;
        }
        let phys = |off: u64| {
            let va = span.sub(off, 1).expect("offset inside the mapping").addr();
            peermem::mem::virt_to_phys(va).map_err(|source| P2pmemError::NoPhysAddr { va, source })
        };
        let first = phys(0)?;
        for off in (page..len).step_by(page as usize) {
            let at = phys(off)?;
            if at.raw() != first.raw() + off {
                return Err(P2pmemError::NotContiguous { bdf, first, at, offset: off });
            }
        }
        let bar = dev
            .bars
            .iter()
            .find(|b| b.kind == BarKind::Mem && b.cpu.contains(first))
            .ok_or(P2pmemError::NotInBar { bdf, cpu: first })?;
        let bar_offset = first.raw() - bar.cpu.start().raw();
        tracing::debug!(%bdf, bar = bar.index, bar_offset, len, "p2pmem allocated");
        Ok(P2pmemRegion { bdf, bar: bar.index, bar_offset, map })
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    pub fn bar(&self) -> u8 {
        self.bar
    }
    /// Byte offset of the allocation inside its BAR.
    pub fn bar_offset(&self) -> u64 {
        self.bar_offset
    }
    /// Exclusive access to the pages through the CPU (as an O_DIRECT buffer, or to fill them).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }
}

impl PeerMemory for P2pmemRegion {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::P2pmem { bdf: self.bdf, bar: self.bar, offset: self.bar_offset }
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        Some(self.map.span())
    }
}
