//! `VulkanRegion`: Vulkan buffer memory as a `PeerMemory` region, and `Export`, the fd plus
//! what an importer needs to know about it.
//!
//! Owns: the region's identity as the registry sees it (provider, backing, CPU mapping, fd) and
//! the words that explain it. Must not: decide a route (the registry does) or claim a PCI
//! address the driver did not report.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use peermem::mem::MappedSpan;
use peermem::{Backing, PeerMemory, Provider, RegionError, Route};

use crate::error::VkError;
use crate::info::{DeviceInfo, HandleType};
use crate::sys::RawMemory;

/// How a region came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Allocated by this backend, exportable as this handle type.
    Allocated(HandleType),
    /// Imported from an fd of this handle type.
    Imported(HandleType),
    /// The CPU mapping of another region, imported through VK_EXT_external_memory_host.
    HostPointer,
}

/// What the exporter knows about its allocation, which an opaque-fd importer must repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLayout {
    /// `allocationSize` of the exported memory.
    pub alloc_size: u64,
    /// `memoryTypeIndex` of the exported memory.
    pub memory_type: u32,
    /// A dedicated allocation (the import must be dedicated too).
    pub dedicated: bool,
    /// `deviceUUID` and `driverUUID` of the exporter: opaque fds only import where both match.
    pub device_uuid: [u8; 16],
    pub driver_uuid: [u8; 16],
}

/// An exported fd with what an importer needs: from `VulkanRegion::export`, or
/// `Export::dma_buf` for a dma-buf (or, on drivers that accept it, a memfd) made elsewhere.
#[derive(Debug)]
pub struct Export {
    pub fd: OwnedFd,
    pub handle: HandleType,
    /// Bytes of the region (the importer's buffer size).
    pub len: u64,
    /// Who owns the memory physically (the exporter's provider).
    pub provider: Provider,
    /// Allocation details: required for opaque fds, absent for foreign dma-bufs.
    pub layout: Option<ExportLayout>,
}

impl Export {
    /// A dma-buf `len` bytes long made by another exporter (a udmabuf, a NIC or NVMe driver's
    /// dma-buf, or on lavapipe a memfd such as `HostRegion::export_fd`), owned by `provider`.
    pub fn dma_buf(fd: OwnedFd, len: u64, provider: Provider) -> Export {
        Export { fd, handle: HandleType::DmaBuf, len, provider, layout: None }
    }
}

/// Buffer memory of one `VkDevice`, as a peer-memory region.
///
/// - provider: the device's PCI function when VK_EXT_pci_bus_info names it; otherwise
///   `Provider::Host { numa: None }`, and `notes()` / `Debug` say why (lavapipe: system RAM).
///   A host-pointer import reports its source's provider.
/// - backing: `DmaBuf(fd)` or `OpaqueFd(fd)` for allocated and fd-imported memory; a host-pointer
///   import reports its source's backing.
/// - CPU mapping: when the memory type is host-visible and coherent (our own `vkMapMemory`), or
///   the source's mapping for a host-pointer import. Regions imported from a host pointer share
///   their source's addresses: register the source *or* the import, not both.
///
/// The region owns its buffer, memory, mapping and fd and keeps the device's handles alive, so
/// it may outlive the `Device` it came from, and an import may outlive the region it was
/// exported from (the fd and the driver keep the memory).
pub struct VulkanRegion {
    mem: Arc<RawMemory>,
    info: Arc<DeviceInfo>,
    origin: Origin,
    /// The fd `backing()` lends out (allocated and fd-imported regions).
    fd: Option<OwnedFd>,
    provider: Provider,
}

impl VulkanRegion {
    pub(crate) fn new(
        mem: Arc<RawMemory>,
        info: Arc<DeviceInfo>,
        origin: Origin,
        fd: Option<OwnedFd>,
        provider: Option<Provider>,
    ) -> VulkanRegion {
        let provider = provider.unwrap_or_else(|| info.provider());
        VulkanRegion { mem, info, origin, fd, provider }
    }

    pub(crate) fn raw(&self) -> &Arc<RawMemory> {
        &self.mem
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The device this region's memory belongs to.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The fd type of `export()`, if the region can be exported.
    pub fn handle_type(&self) -> Option<HandleType> {
        match self.origin {
            Origin::Allocated(h) | Origin::Imported(h) => Some(h),
            Origin::HostPointer => None,
        }
    }

    /// A new fd for this memory plus what an importer needs (in this or another process).
    pub fn export(&self) -> Result<Export, VkError> {
        let handle =
            self.handle_type().ok_or(RegionError::NotExportable("a host-pointer import is exported by its source"))?;
        let fd = match (self.origin, &self.fd) {
            (Origin::Allocated(h), _) => self.mem.export_fd(h.to_vk())?,
            (_, Some(fd)) => fd.try_clone().map_err(|source| VkError::Os { what: "dup", source })?,
            (_, None) => return Err(RegionError::NotExportable("no fd").into()),
        };
        Ok(Export {
            fd,
            handle,
            len: self.mem.len,
            provider: self.provider,
            layout: Some(ExportLayout {
                alloc_size: self.mem.alloc_size,
                memory_type: self.mem.type_index,
                dedicated: self.mem.dedicated,
                device_uuid: self.info.device_uuid,
                driver_uuid: self.info.driver_uuid,
            }),
        })
    }

    /// What the registry cannot know about this region: where the memory really is and why the
    /// provider is what it is.
    pub fn notes(&self) -> Vec<String> {
        let mut n = Vec::new();
        match self.origin {
            Origin::HostPointer => n.push(format!(
                "vulkan: host-pointer import into '{}' of a {:?} region: the GPU reaches those pages directly",
                self.info.name, self.provider
            )),
            Origin::Allocated(h) | Origin::Imported(h) => {
                if let Origin::Imported(_) = self.origin {
                    n.push(format!("vulkan: imported {h} fd into '{}'", self.info.name));
                }
                if self.provider == self.info.provider() {
                    n.push(format!("vulkan: {}", self.info.provider_note()));
                } else {
                    n.push(format!("vulkan: provider {:?} as the exporter declared it", self.provider));
                }
                n.push(match h {
                    HandleType::OpaqueFd => {
                        "vulkan: backing is an opaque fd: only the same Vulkan driver and device can import it; \
                         other peers reach the memory through its CPU mapping or a bounce"
                            .to_string()
                    }
                    HandleType::DmaBuf => {
                        "vulkan: backing is a dma-buf: a peer's kernel driver can import it".to_string()
                    }
                });
            }
        }
        if self.info.is_lavapipe() && self.provider == self.info.provider() {
            n.push(
                "vulkan: lavapipe memory is host memory: no BAR exists, so no bus address or peer-to-peer route".into(),
            );
        }
        n
    }

    /// The route's reasons followed by this region's notes: the full answer to "why this route".
    pub fn explain(&self, route: &Route<'_>) -> Vec<String> {
        let mut r = route.reasons();
        r.extend(self.notes());
        r
    }
}

impl fmt::Debug for VulkanRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VulkanRegion")
            .field("device", &self.info.name)
            .field("len", &self.mem.len)
            .field("origin", &self.origin)
            .field("provider", &self.provider)
            .field("provider_note", &self.info.provider_note())
            .field("cpu_mapping", &self.cpu_mapping())
            .field("alloc_size", &self.mem.alloc_size)
            .field("memory_type", &self.mem.type_index)
            .finish()
    }
}

impl PeerMemory for VulkanRegion {
    fn len(&self) -> u64 {
        self.mem.len
    }
    fn provider(&self) -> Provider {
        self.provider
    }
    fn backing(&self) -> Backing<'_> {
        match (self.origin, &self.fd, &self.mem.host) {
            (Origin::HostPointer, _, Some(src)) => src.backing(),
            (Origin::Allocated(HandleType::DmaBuf) | Origin::Imported(HandleType::DmaBuf), Some(fd), _) => {
                Backing::DmaBuf(fd.as_fd())
            }
            (_, Some(fd), _) => Backing::OpaqueFd(fd.as_fd()),
            // Unreachable by construction (every non-host region keeps its fd).
            _ => Backing::HostPages,
        }
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        self.mem.cpu_mapping()
    }
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        Ok(self.export()?.fd)
    }
}
