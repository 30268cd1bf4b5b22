//! A dma-buf over host pages (`/dev/udmabuf` on a sealed memfd), CPU-mapped: the simplest region
//! whose backing is a real dma-buf, to exercise the dma-buf route of a NIC.
//!
//! Owns: `UdmabufRegion`. Must not: assume `/dev/udmabuf` exists (it is a kernel option).

use std::os::fd::{AsFd, OwnedFd};

use peermem::mem::{MappedSpan, Mapping};
use peermem::{Backing, PeerMemory, Provider, RegionError};

use crate::error::RdmaError;
use crate::sys;

/// `len` bytes of host memory exported as a dma-buf, mapped for the CPU.
#[derive(Debug)]
pub struct UdmabufRegion {
    map: Mapping,
    dmabuf: OwnedFd,
    _memfd: OwnedFd,
}

impl UdmabufRegion {
    /// `len` rounded up to the page size.
    pub fn new(len: u64) -> Result<UdmabufRegion, RdmaError> {
        let page = peermem::mem::page_size();
        let rounded = len
            .checked_next_multiple_of(page)
            .filter(|&r| r > 0)
            .ok_or_else(|| RdmaError::Invalid(format!("udmabuf of {len} bytes")))?;
        let os = |what: &'static str| move |source| RdmaError::Region(RegionError::Os { what, source });
        let memfd = peermem::mem::sealed_memfd("peermem-udmabuf", rounded).map_err(os("memfd_create"))?;
        let dmabuf = sys::udmabuf_create(memfd.as_fd(), 0, rounded).map_err(os("UDMABUF_CREATE"))?;
        let map = Mapping::shared(memfd.as_fd(), rounded).map_err(os("mmap"))?;
        Ok(UdmabufRegion { map, dmabuf, _memfd: memfd })
    }
}

impl PeerMemory for UdmabufRegion {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn provider(&self) -> Provider {
        Provider::Host { numa: None }
    }
    fn backing(&self) -> Backing<'_> {
        Backing::DmaBuf(self.dmabuf.as_fd())
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        Some(self.map.span())
    }
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        self.dmabuf.try_clone().map_err(|source| RegionError::Os { what: "dup", source })
    }
}
