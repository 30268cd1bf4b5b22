//! A route: what one peer must program (or do) to reach one registered region, and why.
//!
//! Owns: `Route`, `RouteKind`, `Peer` and the words that explain a route. Must not: decide the
//! route (the registry does, from the verdict) or hold a lock.

use std::ops::Deref;

use crate::addr::{AddrError, Address, BusAddr, CpuPhys, DmaAddr, Iova, VirtAddr};
use crate::pci::DevIdx;
use crate::verdict::{MapType, Verdict};

/// Who wants to reach the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Code on the CPU, in this process.
    Cpu,
    /// A PCI function (get one from `Registry::peer(bdf)`).
    Pci(DevIdx),
}

/// Why a route has to bounce through host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceWhy {
    /// The kernel's verdict for the pair is `not_supported`.
    NotSupported,
    /// The BAR's bus address is unknown (its register read 0: an SR-IOV VF or an unassigned BAR).
    BusAddrUnknown,
    /// The region is a driver-private fd with no CPU mapping: only its own driver can reach it.
    OpaqueToPeer,
}

/// What the peer programs or does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Peer-to-peer below a common upstream bridge: program this PCI bus address.
    BusAddr(BusAddr),
    /// Through the root complex, the peer not behind a translating IOMMU: program this CPU
    /// physical address.
    HostBridge(CpuPhys),
    /// Through the root complex into a translating IOMMU domain: program an IOVA, `None` until
    /// one is mapped (VFIO map_dma, or the peer's kernel driver).
    Iommu(Option<Iova>),
    /// The peer's kernel driver imports the region's dma-buf and maps it itself.
    KernelImport,
    /// System memory (or the CPU itself): use this CPU mapping; a device's driver pins it.
    CpuMapped(VirtAddr),
    /// No direct path: stage through host memory.
    Bounce(BounceWhy),
}

impl RouteKind {
    /// The CLI/JSON name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            RouteKind::BusAddr(_) => "bus_addr",
            RouteKind::HostBridge(_) => "host_bridge",
            RouteKind::Iommu(_) => "iommu",
            RouteKind::KernelImport => "kernel_import",
            RouteKind::CpuMapped(_) => "cpu_mapped",
            RouteKind::Bounce(_) => "bounce",
        }
    }

    /// The name of `route`, or `unresolved` where the registry gave none (a `Decision`'s or a
    /// report's route).
    pub fn name_of(route: Option<&RouteKind>) -> &'static str {
        route.map_or("unresolved", RouteKind::name)
    }

    /// The address a device programs, for the kinds that have one.
    pub fn dma_address(&self) -> Option<DmaAddr> {
        match *self {
            RouteKind::BusAddr(a) => Some(DmaAddr::Bus(a)),
            RouteKind::HostBridge(a) => Some(DmaAddr::Phys(a)),
            RouteKind::Iommu(Some(a)) => Some(DmaAddr::Iova(a)),
            _ => None,
        }
    }
}

/// The verdict behind a route: borrowed from the registry's per-pair cache, or computed afresh.
/// (A pointer either way, so a `Route` stays small and cheap to return.)
#[derive(Debug, Clone)]
pub enum VerdictRef<'r> {
    Cached(&'r Verdict),
    Fresh(Box<Verdict>),
}

/// Equal when the verdicts are equal, cached or not.
impl PartialEq for VerdictRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Deref for VerdictRef<'_> {
    type Target = Verdict;
    fn deref(&self) -> &Verdict {
        match self {
            VerdictRef::Cached(v) => v,
            VerdictRef::Fresh(v) => v,
        }
    }
}

/// The registry's answer for one (region, peer) pair. Addresses are of the region's first byte;
/// `at(offset)` gives the address of any byte.
#[derive(Debug, Clone, PartialEq)]
pub struct Route<'r> {
    pub kind: RouteKind,
    pub len: u64,
    /// CPU physical and bus address of the region's start, for BAR-backed regions.
    pub cpu_address: Option<CpuPhys>,
    pub bus_address: Option<BusAddr>,
    /// The PCI verdict behind the route, when a PCI pair was judged.
    pub verdict: Option<VerdictRef<'r>>,
}

impl Route<'_> {
    pub fn map_type(&self) -> Option<MapType> {
        self.verdict.as_ref().map(|v| v.map_type)
    }

    /// The route to byte `offset` of the region (checked: past the end, or an address that would
    /// overflow, is an error).
    pub fn at(&self, offset: u64) -> Result<RouteKind, AddrError> {
        if offset >= self.len {
            return Err(AddrError::OutsideWindow { space: "region offset", addr: offset, start: 0, end: self.len });
        }
        Ok(match self.kind {
            RouteKind::BusAddr(a) => RouteKind::BusAddr(Address::checked_add(a, offset)?),
            RouteKind::HostBridge(a) => RouteKind::HostBridge(Address::checked_add(a, offset)?),
            RouteKind::Iommu(Some(a)) => RouteKind::Iommu(Some(Address::checked_add(a, offset)?)),
            RouteKind::CpuMapped(a) => RouteKind::CpuMapped(Address::checked_add(a, offset)?),
            k => k,
        })
    }

    /// What the peer programs for the region's first byte, if the route has a DMA address.
    pub fn dma_address(&self) -> Option<DmaAddr> {
        self.kind.dma_address()
    }

    /// What the peer programs for byte `offset` of the region (checked).
    pub fn dma_address_at(&self, offset: u64) -> Result<Option<DmaAddr>, AddrError> {
        Ok(self.at(offset)?.dma_address())
    }

    /// Every reason, the verdict's first, then what the route adds.
    pub fn reasons(&self) -> Vec<String> {
        let mut r: Vec<String> = self.verdict.as_ref().map(|v| v.reasons.clone()).unwrap_or_default();
        r.push(match self.kind {
            RouteKind::BusAddr(a) => format!("route bus_addr: the client programs PCI bus address {a} (CPU address + the BAR's bus offset)"),
            RouteKind::HostBridge(a) => format!("route host_bridge: the client programs CPU physical address {a} (no IOMMU translation)"),
            RouteKind::Iommu(None) => "route iommu: the client's DMA is translated; map the region into its IOMMU domain and program the IOVA".to_string(),
            RouteKind::Iommu(Some(a)) => format!("route iommu: the client programs IOVA {a}"),
            RouteKind::KernelImport => "route kernel_import: the client's kernel driver imports the region's dma-buf and maps it".to_string(),
            RouteKind::CpuMapped(a) => format!("route cpu_mapped: the memory is reached through the CPU mapping at {a}"),
            RouteKind::Bounce(BounceWhy::NotSupported) => "route bounce: no peer-to-peer path; data must be staged through host memory".to_string(),
            RouteKind::Bounce(BounceWhy::BusAddrUnknown) => "route bounce: the BAR's bus address is unknown (its register reads 0), so no direct address can be given".to_string(),
            RouteKind::Bounce(BounceWhy::OpaqueToPeer) => "route bounce: the region is driver-private memory without a CPU mapping (an opaque fd, or GPU memory without a dma-buf); only its own driver can reach it".to_string(),
        });
        r
    }
}
