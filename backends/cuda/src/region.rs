//! `CudaRegion`: CUDA device memory as a `PeerMemory` region (allocated here, or someone else's
//! kept alive by its owner), and `PinnedHost`, host memory registered for the GPU's copies.
//!
//! Owns: the region's identity as the registry sees it (provider, backing, dma-buf or the reason
//! for none) and the words that explain it. Must not: decide a route (the registry does) or
//! claim a PCI function the driver did not report.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use peermem::{Backing, PeerMemory, Provider, RegionError, Route};

use crate::info::{DeviceInfo, DevicePtr, DmaBufRefusal};
use crate::sys::{RawMemory, RawPinned};

/// How a region came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `cuMemCreate` + `cuMemMap` (virtual memory management): exportable as a dma-buf where
    /// the driver allows.
    Vmm,
    /// `cuMemAlloc`.
    Alloc,
    /// Someone else's allocation (a PyTorch or CuPy tensor through DLPack), kept alive by the
    /// owner handed in with it.
    Foreign,
    /// Another API's allocation on this GPU, exported as an opaque fd (a Vulkan allocation) and
    /// imported (`cuImportExternalMemory`): the same bytes as the exporter's region.
    Imported,
}

/// Memory another API allocated on a GPU and exported as an opaque fd (a Vulkan allocation
/// through `VK_KHR_external_memory_fd`), as `Device::import_opaque_fd` takes it.
#[derive(Debug)]
pub struct OpaqueFd {
    pub fd: OwnedFd,
    /// Bytes of the region, from the allocation's start.
    pub len: u64,
    /// Bytes of the exported allocation (Vulkan's `allocationSize`).
    pub alloc_size: u64,
    /// A dedicated allocation (the import must say so).
    pub dedicated: bool,
    /// The exporter's PCI function (Vulkan: VK_EXT_pci_bus_info): it must be the importing
    /// device's.
    pub provider: Provider,
    /// The exporter's device UUID (Vulkan's `deviceUUID`), compared where given.
    pub device_uuid: Option<[u8; 16]>,
    /// The exporter in words, for errors (`Vulkan device 'NVIDIA H100'`).
    pub exporter: String,
}

/// Device memory of one CUDA device, as a peer-memory region.
///
/// - provider: the GPU's PCI function (`cuDeviceGetPCIBusId`).
/// - backing: `DmaBuf(fd)` when the driver exported the memory as a dma-buf (a NIC's kernel
///   driver can import it); otherwise `DriverPrivate`, and `dma_buf_refusal()` says why.
/// - no CPU mapping: the CPU reaches the bytes through the device's copies
///   (`Device::read`/`write`, or pinned staging).
///
/// The region keeps its device's context alive, so it may outlive the `Device` it came from.
pub struct CudaRegion {
    pub(crate) mem: Arc<RawMemory>,
    origin: Origin,
    dma_buf: Result<OwnedFd, DmaBufRefusal>,
    /// Why the allocation is not the kind first tried, when it is not.
    fallback: Option<String>,
}

impl CudaRegion {
    pub(crate) fn new(mem: RawMemory, origin: Origin, dma_buf: Result<OwnedFd, DmaBufRefusal>) -> CudaRegion {
        CudaRegion { mem: Arc::new(mem), origin, dma_buf, fallback: None }
    }
    pub(crate) fn with_fallback(mut self, why: Option<String>) -> CudaRegion {
        self.fallback = why;
        self
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }
    /// The first byte, as kernels and copies address it.
    pub fn device_ptr(&self) -> DevicePtr {
        self.mem.ptr
    }
    /// Bytes the driver allocated for the region (its length rounded up to the granularity).
    pub fn alloc_size(&self) -> u64 {
        self.mem.alloc_size()
    }
    /// The device this memory belongs to.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.mem.dev.info
    }
    /// Why the region has no dma-buf, if it has none.
    pub fn dma_buf_refusal(&self) -> Option<&DmaBufRefusal> {
        self.dma_buf.as_ref().err()
    }
    pub fn has_dma_buf(&self) -> bool {
        self.dma_buf.is_ok()
    }

    /// What the registry cannot know about this region.
    pub fn notes(&self) -> Vec<String> {
        let i = self.device_info();
        let mut n = vec![format!(
            "cuda: {} bytes of device {} ({}, PCI {}), {}",
            self.mem.len,
            i.ordinal,
            i.name,
            i.pci_text,
            match self.origin {
                Origin::Vmm => "a cuMemCreate allocation",
                Origin::Alloc => "a cuMemAlloc allocation",
                Origin::Foreign => "memory another library allocated (kept alive by its owner)",
                Origin::Imported => "another API's allocation imported from its opaque fd (cuImportExternalMemory)",
            }
        )];
        n.push(format!("cuda: {}", i.provider_note()));
        n.extend(self.fallback.iter().map(|w| format!("cuda: {w}")));
        n.push(match &self.dma_buf {
            Ok(_) => {
                "cuda: exported as a dma-buf (cuMemGetHandleForAddressRange): a peer's kernel driver can import it"
                    .to_string()
            }
            Err(why) => format!("cuda: no dma-buf ({why}): peers reach it through CUDA copies and host staging"),
        });
        n
    }

    /// The route's reasons followed by this region's notes: the full answer to "why this route".
    pub fn explain(&self, route: &Route<'_>) -> Vec<String> {
        let mut r = route.reasons();
        r.extend(self.notes());
        r
    }
}

impl fmt::Debug for CudaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaRegion")
            .field("device", &self.device_info().ordinal)
            .field("ptr", &self.mem.ptr)
            .field("len", &self.mem.len)
            .field("origin", &self.origin)
            .field("dma_buf", &self.dma_buf.as_ref().map(|_| "exported"))
            .finish()
    }
}

impl PeerMemory for CudaRegion {
    fn len(&self) -> u64 {
        self.mem.len
    }
    fn provider(&self) -> Provider {
        self.device_info().provider()
    }
    fn backing(&self) -> Backing<'_> {
        match &self.dma_buf {
            Ok(fd) => Backing::DmaBuf(fd.as_fd()),
            Err(_) => Backing::DriverPrivate,
        }
    }
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        match &self.dma_buf {
            Ok(fd) => fd.try_clone().map_err(|source| RegionError::Os { what: "dup", source }),
            Err(_) => Err(RegionError::NotExportable("CUDA memory without a dma-buf (see CudaRegion::notes)")),
        }
    }
}

/// Host memory registered with the CUDA driver (`cuMemHostRegister`), so the device's copies
/// into and out of it run as DMA. Keeps the region (and its pages) alive; unregisters on drop,
/// after every copy using it completed. Cheap to clone.
#[derive(Clone)]
pub struct PinnedHost {
    pub(crate) raw: Arc<RawPinned>,
}

impl PinnedHost {
    /// The host memory.
    pub fn region(&self) -> &Arc<dyn PeerMemory> {
        &self.raw.region
    }
    pub fn len(&self) -> u64 {
        self.raw.len
    }
    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }
}

impl fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHost").field("device", &self.raw.dev.info.ordinal).field("len", &self.raw.len).finish()
    }
}
