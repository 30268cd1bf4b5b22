//! Choosing a physical device (as `info` describes it) and the opened `Device` that allocates,
//! imports and copies.
//!
//! Owns: device selection (PCI address, index, best, and which devices can be opened at all),
//! memory-type and handle-type policy, and the transfer queue. Must not: call Vulkan itself
//! (`sys` does) or invent a PCI address: a device without VK_EXT_pci_bus_info has none, and
//! says so.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ash::vk;
use peermem::{Bdf, PeerMemory};

use crate::error::VkError;
use crate::info::{DeviceInfo, DeviceKind, HandleType};
use crate::region::{Export, Origin, VulkanRegion};
use crate::sys::{self, AllocSpec, FdImport, MemType, RawDevice, RawMemory, Transfer};

/// Preference order of `Select::Best` (lower first).
fn rank(kind: DeviceKind) -> u8 {
    match kind {
        DeviceKind::Discrete => 0,
        DeviceKind::Integrated => 1,
        DeviceKind::Virtual => 2,
        DeviceKind::Cpu => 3,
        DeviceKind::Other => 4,
    }
}

/// Why device `d` cannot be opened, if it cannot.
fn unusable(d: &DeviceInfo) -> Option<VkError> {
    let (major, minor, _) = d.api_version;
    if (major, minor) < (1, 1) {
        return Some(VkError::TooOld { what: format!("device '{}'", d.name), major, minor });
    }
    if !d.caps.opaque_fd.extension {
        return Some(VkError::MissingExtension { device: d.name.clone(), ext: "VK_KHR_external_memory_fd" });
    }
    None
}

/// Which physical device to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Select {
    /// Discrete first, then integrated, virtual, CPU; the lowest index among equals.
    #[default]
    Best,
    /// The loader's enumeration index.
    Index(usize),
    /// The device VK_EXT_pci_bus_info places at this PCI address.
    Pci(Bdf),
}

impl FromStr for Select {
    type Err = String;
    /// `best`, a decimal index, or a PCI address (`dddd:bb:dd.f`).
    fn from_str(s: &str) -> Result<Select, String> {
        if s == "best" {
            return Ok(Select::Best);
        }
        if let Ok(i) = s.parse::<usize>() {
            return Ok(Select::Index(i));
        }
        s.parse::<Bdf>()
            .map(Select::Pci)
            .map_err(|e| format!("device selector {s:?}: not 'best', an index or a PCI address ({e})"))
    }
}

/// A loaded Vulkan instance and its physical devices.
pub struct Vulkan {
    instance: Arc<sys::Instance>,
    devices: Vec<DeviceInfo>,
}

impl fmt::Debug for Vulkan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vulkan").field("devices", &self.devices).finish()
    }
}

impl Vulkan {
    /// Opens the Vulkan loader (dlopen: a missing libvulkan is `VkError::NoLoader`) and lists
    /// its devices (none is `VkError::NoDevice`).
    pub fn load() -> Result<Vulkan, VkError> {
        let instance = sys::Instance::load()?;
        let devices = instance
            .physical_devices()?
            .into_iter()
            .enumerate()
            .map(|(i, pd)| instance.describe(i, pd))
            .collect::<Result<Vec<_>, _>>()?;
        if devices.is_empty() {
            return Err(VkError::NoDevice);
        }
        for d in &devices {
            tracing::debug!(device = %d, caps = ?d.caps, "Vulkan physical device");
        }
        Ok(Vulkan { instance, devices })
    }

    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The device `sel` names.
    pub fn select(&self, sel: Select) -> Result<&DeviceInfo, VkError> {
        match sel {
            Select::Index(index) => {
                self.devices.get(index).ok_or(VkError::NoSuchIndex { index, count: self.devices.len() })
            }
            Select::Pci(bdf) => self.devices.iter().find(|d| d.pci == Some(bdf)).ok_or_else(|| {
                let known: Vec<String> =
                    self.devices.iter().filter_map(|d| d.pci.map(|p| format!("{p} ('{}')", d.name))).collect();
                let why = if known.is_empty() {
                    let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
                    format!("no device reports VK_EXT_pci_bus_info (devices: {})", names.join(", "))
                } else {
                    format!("devices are at {}", known.join(", "))
                };
                VkError::NoDeviceAt { bdf, why }
            }),
            Select::Best => {
                let mut usable: Vec<&DeviceInfo> = self.devices.iter().filter(|d| unusable(d).is_none()).collect();
                usable.sort_by_key(|d| (rank(d.kind), d.index));
                match usable.first() {
                    Some(d) => Ok(d),
                    // Report why the first device cannot be used.
                    None => Err(unusable(&self.devices[0]).unwrap_or(VkError::NoDevice)),
                }
            }
        }
    }

    /// Opens the selected device with one transfer queue and every external-memory extension it has.
    pub fn open(&self, sel: Select) -> Result<Device, VkError> {
        let info = self.select(sel)?;
        if let Some(e) = unusable(info) {
            return Err(e);
        }
        let raw = RawDevice::create(&self.instance, info)?;
        let transfer = Transfer::new(&raw)?;
        tracing::info!(device = %info, note = %info.provider_note(), "opened Vulkan device");
        Ok(Device {
            inner: Arc::new(DeviceInner {
                transfer: Mutex::new(transfer),
                raw,
                info: Arc::new(info.clone()),
                timeout_ns: AtomicU64::new(DEFAULT_TIMEOUT.as_nanos() as u64),
                dma_buf_export: AtomicU8::new(if info.caps.dma_buf.exportable { UNTRIED } else { REFUSED }),
            }),
        })
    }
}

/// Where an allocation should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Device-local memory (VRAM on a discrete GPU), host-visible too when the device offers
    /// such a type (resizable BAR); otherwise the region has no CPU mapping.
    #[default]
    DeviceLocal,
    /// Host-visible, coherent memory (always CPU-mapped), device-local when possible.
    Mappable,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const UNTRIED: u8 = 0;
const WORKS: u8 = 1;
const REFUSED: u8 = 2;

struct DeviceInner {
    /// Dropped first: waits for the last copy, then destroys its pool and fence.
    transfer: Mutex<Transfer>,
    raw: Arc<RawDevice>,
    info: Arc<DeviceInfo>,
    timeout_ns: AtomicU64,
    /// Whether dma-buf export works on this device (some drivers advertise it and then refuse).
    dma_buf_export: AtomicU8,
}

/// An opened Vulkan device. Cheap to clone. Regions hold the device's handles themselves, so
/// dropping every `Device` before its regions is safe: the `VkDevice` goes with the last region.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("info", &format_args!("{}", self.inner.info))
            .field("provider", &self.inner.info.provider())
            .field("caps", &self.inner.info.caps)
            .finish()
    }
}

const COHERENT: vk::MemoryPropertyFlags = vk::MemoryPropertyFlags::from_raw(
    vk::MemoryPropertyFlags::HOST_VISIBLE.as_raw() | vk::MemoryPropertyFlags::HOST_COHERENT.as_raw(),
);

/// The first type in `types` with the most preferred flags (each preference a subset of flags).
fn pick(types: &[MemType], prefs: &[vk::MemoryPropertyFlags]) -> Option<u32> {
    prefs.iter().find_map(|p| types.iter().find(|t| t.flags.contains(*p))).map(|t| t.index)
}

impl Device {
    /// Loads Vulkan and opens the selected device.
    pub fn open(sel: Select) -> Result<Device, VkError> {
        Vulkan::load()?.open(sel)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Bounded wait of every copy (default 10 s).
    pub fn copy_timeout(&self) -> Duration {
        Duration::from_nanos(self.inner.timeout_ns.load(Ordering::Relaxed))
    }

    /// Sets the bounded wait of copies (at most ~584 years; zero polls).
    pub fn set_copy_timeout(&self, t: Duration) {
        self.inner.timeout_ns.store(t.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Allocates `len` bytes exportable as an fd: dma-buf when the driver can export it (tried
    /// once per device: some drivers advertise it and then refuse), otherwise opaque fd.
    pub fn allocate(&self, len: u64, placement: Placement) -> Result<VulkanRegion, VkError> {
        let caps = &self.inner.info.caps;
        if self.inner.dma_buf_export.load(Ordering::Relaxed) != REFUSED {
            match self.allocate_as(len, placement, HandleType::DmaBuf, caps.dma_buf.dedicated_only) {
                Ok(r) => {
                    self.inner.dma_buf_export.store(WORKS, Ordering::Relaxed);
                    return Ok(r);
                }
                Err(e) if self.inner.dma_buf_export.load(Ordering::Relaxed) == UNTRIED => {
                    tracing::info!(device = %self.inner.info.name, error = %e,
                        "the driver advertises dma-buf export but refused it; exporting opaque fds instead");
                    self.inner.dma_buf_export.store(REFUSED, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if !caps.opaque_fd.exportable {
            return Err(VkError::Unsupported {
                device: self.inner.info.name.clone(),
                what: "export buffer memory as an fd (neither dma-buf nor opaque fd is exportable)".into(),
            });
        }
        self.allocate_as(len, placement, HandleType::OpaqueFd, caps.opaque_fd.dedicated_only)
    }

    /// Allocates `len` bytes exportable as `handle` only: an opaque fd for an importer that
    /// takes nothing else (CUDA's `cuImportExternalMemory` on the same GPU), a dma-buf for a
    /// kernel importer. A device that cannot export that handle type is `VkError::Unsupported`.
    pub fn allocate_with(&self, len: u64, placement: Placement, handle: HandleType) -> Result<VulkanRegion, VkError> {
        let caps = &self.inner.info.caps;
        let c = match handle {
            HandleType::OpaqueFd => caps.opaque_fd,
            HandleType::DmaBuf => caps.dma_buf,
        };
        let refused = handle == HandleType::DmaBuf && self.inner.dma_buf_export.load(Ordering::Relaxed) == REFUSED;
        if !c.exportable || refused {
            return Err(VkError::Unsupported {
                device: self.inner.info.name.clone(),
                what: format!("export buffer memory as a {handle} fd"),
            });
        }
        self.allocate_as(len, placement, handle, c.dedicated_only)
    }

    fn allocate_as(
        &self,
        len: u64,
        placement: Placement,
        handle: HandleType,
        dedicated: bool,
    ) -> Result<VulkanRegion, VkError> {
        let raw = &self.inner.raw;
        let spec = AllocSpec { len, export: handle.to_vk(), dedicated };
        let mem = RawMemory::allocate(raw, &spec, |reqs| {
            let types = raw.types(reqs.memory_type_bits);
            let local = vk::MemoryPropertyFlags::DEVICE_LOCAL;
            let choice = match placement {
                Placement::DeviceLocal => pick(&types, &[local | COHERENT, local, vk::MemoryPropertyFlags::empty()]),
                Placement::Mappable => pick(&types, &[local | COHERENT, COHERENT]),
            };
            choice.ok_or(VkError::NoMemoryType { what: "an exportable buffer", bits: reqs.memory_type_bits })
        })?;
        let fd = mem.export_fd(handle.to_vk())?;
        tracing::debug!(len, %handle, memory_type = mem.type_index, mapped = mem.map.is_some(), "allocated exportable region");
        Ok(VulkanRegion::new(Arc::new(mem), self.inner.info.clone(), Origin::Allocated(handle), Some(fd), None))
    }

    /// Imports an exported fd: an opaque fd from another `VkDevice` or process on the same
    /// driver and device, or a dma-buf from anyone (when the device supports dma-buf import).
    /// Sizes are checked against the fd itself where the kernel tells it (memfd, dma-buf).
    pub fn import(&self, export: Export) -> Result<VulkanRegion, VkError> {
        let info = &self.inner.info;
        let Export { fd, handle, len, provider, layout } = export;
        let caps = match handle {
            HandleType::OpaqueFd => info.caps.opaque_fd,
            HandleType::DmaBuf => info.caps.dma_buf,
        };
        if !caps.importable {
            return Err(VkError::CannotImport { device: info.name.clone(), handle });
        }
        if len == 0 {
            return Err(VkError::BadLength { len, why: "a region cannot be empty" });
        }
        let fd_size = fd_size(&fd);
        let (type_hint, alloc_hint, dedicated) = match (handle, &layout) {
            (HandleType::OpaqueFd, None) => {
                return Err(VkError::BadDescriptor(
                    "an opaque fd import needs the exporter's allocation size and memory type".into(),
                ))
            }
            (HandleType::OpaqueFd, Some(l)) => {
                if (l.device_uuid, l.driver_uuid) != (info.device_uuid, info.driver_uuid) {
                    return Err(VkError::ForeignDevice {
                        device: info.name.clone(),
                        exporter: hex(&l.device_uuid),
                        exporter_driver: hex(&l.driver_uuid),
                        importer: hex(&info.device_uuid),
                        importer_driver: hex(&info.driver_uuid),
                    });
                }
                (Some(l.memory_type), Some(l.alloc_size), l.dedicated || caps.dedicated_only)
            }
            (HandleType::DmaBuf, l) => (None, l.as_ref().map(|l| l.alloc_size), caps.dedicated_only),
        };
        if let Some(a) = alloc_hint {
            if len > a {
                return Err(VkError::ImportTooSmall { what: "import (exported allocation)", need: len, have: a });
            }
        }
        // Keep a second reference for `backing()` and re-export; the driver takes the first.
        let keep = fd.try_clone().map_err(|source| VkError::Os { what: "dup of the imported fd", source })?;
        let raw = &self.inner.raw;
        let imp = FdImport { handle: handle.to_vk(), fd, len, dedicated };
        let mem = RawMemory::import_fd(raw, imp, |reqs, fd_bits| {
            let alloc = alloc_hint.unwrap_or(reqs.size);
            if let Some(have) = fd_size {
                if have < alloc {
                    return Err(VkError::ImportTooSmall { what: "fd import (size of the fd)", need: alloc, have });
                }
            }
            let bits = reqs.memory_type_bits & fd_bits;
            let ty = match type_hint {
                Some(t) => t,
                None => pick(
                    &raw.types(bits),
                    &[vk::MemoryPropertyFlags::DEVICE_LOCAL | COHERENT, COHERENT, vk::MemoryPropertyFlags::empty()],
                )
                .ok_or(VkError::NoMemoryType { what: "the imported fd", bits })?,
            };
            Ok((ty, alloc))
        })?;
        tracing::debug!(len, %handle, fd_size, mapped = mem.map.is_some(), "imported fd");
        Ok(VulkanRegion::new(Arc::new(mem), info.clone(), Origin::Imported(handle), Some(keep), Some(provider)))
    }

    /// Imports the CPU mapping of any peer region (a registered `HostRegion`, another process's
    /// shared pages, a mapped BAR) through VK_EXT_external_memory_host, so the GPU copies to and
    /// from it directly. Start and length must be multiples of `minImportedHostPointerAlignment`
    /// (checked here even where the driver does not enforce it). The import keeps `source` alive.
    pub fn import_host(&self, source: Arc<dyn PeerMemory>) -> Result<VulkanRegion, VkError> {
        let raw = &self.inner.raw;
        let provider = source.provider();
        let mem = RawMemory::import_host(raw, source, |reqs, host_bits| {
            let bits = reqs.memory_type_bits & host_bits;
            pick(&raw.types(bits), &[COHERENT, vk::MemoryPropertyFlags::empty()])
                .ok_or(VkError::NoMemoryType { what: "a host-pointer import", bits })
        })?;
        tracing::debug!(len = mem.len, "imported host pointer");
        Ok(VulkanRegion::new(Arc::new(mem), self.inner.info.clone(), Origin::HostPointer, None, Some(provider)))
    }

    /// Copies `len` bytes on the GPU (vkCmdCopyBuffer on the transfer queue) and waits for the
    /// fence, at most `copy_timeout()`. Both regions must belong to this device (allocated or
    /// imported here). On timeout the copy's regions stay alive until it completes.
    pub fn copy(
        &self,
        src: &VulkanRegion,
        src_offset: u64,
        dst: &VulkanRegion,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), VkError> {
        let timeout = self.copy_timeout();
        let mut t = self.inner.transfer.lock().unwrap_or_else(|p| p.into_inner());
        t.copy(src.raw(), src_offset, dst.raw(), dst_offset, len, timeout)
    }

    /// Waits (at most `copy_timeout()`) until no copy is in flight.
    pub fn wait_idle(&self) -> Result<(), VkError> {
        let timeout = self.copy_timeout();
        self.inner.transfer.lock().unwrap_or_else(|p| p.into_inner()).wait(timeout)
    }
}

/// The size the kernel reports for an fd (memfd, dma-buf), if any.
fn fd_size(fd: &std::os::fd::OwnedFd) -> Option<u64> {
    let f = std::fs::File::from(fd.try_clone().ok()?);
    let m = f.metadata().ok()?;
    (m.len() > 0).then_some(m.len())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Option<Device> {
        match Device::open(Select::Best) {
            Ok(d) => Some(d),
            Err(e) if std::env::var("PEERMEM_SKIP_VULKAN").as_deref() == Ok("1") => {
                eprintln!("SKIPPED (PEERMEM_SKIP_VULKAN=1): {e}");
                None
            }
            Err(e) => panic!("needs a Vulkan device (lavapipe in CI); PEERMEM_SKIP_VULKAN=1 skips: {e}"),
        }
    }

    #[test]
    fn a_refused_dma_buf_export_falls_back_to_opaque_fd_and_is_not_retried() {
        let Some(dev) = device() else { return };
        if !dev.info().is_lavapipe() {
            return;
        }
        // lavapipe does not advertise dma-buf export; force one attempt as if it did (lavapipe
        // refuses it with VK_ERROR_OUT_OF_DEVICE_MEMORY).
        dev.inner.dma_buf_export.store(UNTRIED, Ordering::Relaxed);
        let r = dev.allocate(4096, Placement::Mappable).unwrap();
        assert_eq!(r.handle_type(), Some(HandleType::OpaqueFd));
        assert_eq!(dev.inner.dma_buf_export.load(Ordering::Relaxed), REFUSED);
    }

    #[test]
    fn selectors_parse_and_unknown_pci_addresses_say_why() {
        assert_eq!("best".parse::<Select>().unwrap(), Select::Best);
        assert_eq!("2".parse::<Select>().unwrap(), Select::Index(2));
        assert_eq!("0000:03:00.0".parse::<Select>().unwrap(), Select::Pci("0000:03:00.0".parse().unwrap()));
        assert!("gpu".parse::<Select>().is_err());
        let Some(dev) = device() else { return };
        let vk = Vulkan::load().unwrap();
        assert!(matches!(vk.open(Select::Index(99)), Err(VkError::NoSuchIndex { index: 99, .. })));
        assert_eq!(vk.select(Select::Index(0)).unwrap().index, 0);
        let best = vk.select(Select::Best).unwrap();
        assert_eq!(best.device_uuid, dev.info().device_uuid);
        assert!(vk.devices().iter().all(|d| rank(d.kind) >= rank(best.kind)), "discrete first");
        let bdf = "0000:7f:1f.7".parse().unwrap();
        match vk.select(Select::Pci(bdf)) {
            Err(VkError::NoDeviceAt { why, .. }) if dev.info().is_lavapipe() => {
                assert!(why.contains("VK_EXT_pci_bus_info"), "{why}")
            }
            Err(VkError::NoDeviceAt { .. }) => {}
            other => panic!("no device sits at {bdf}: {other:?}"),
        }
        if let Some(pci) = dev.info().pci {
            assert_eq!(vk.select(Select::Pci(pci)).unwrap().pci, Some(pci));
        }
    }
}
