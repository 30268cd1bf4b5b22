//! The backend's only unsafe code: Vulkan calls through `ash`, raw copies through CPU mappings,
//! and fd passing over a unix socket (`SCM_RIGHTS`).
//!
//! Owns: the Vulkan handles and their lifetimes. `Instance` <- `RawDevice` <- `RawMemory` are
//! chained by `Arc`, so a child handle keeps its parents alive and is destroyed first, whatever
//! order the safe wrappers are dropped in. `Transfer` keeps every buffer of a submitted copy alive
//! until its fence signals. Every function here is safe to call with any argument: it checks
//! bounds, alignment and device identity itself before handing anything to the driver.
//! Must not: choose policy (memory types, handle types, which device): the safe modules do, through
//! the callbacks and plain values passed in.

use std::ffi::{c_void, CStr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use ash::vk;
use std::ptr::NonNull;

use peermem::mem::MappedSpan;
use peermem::{Bdf, PeerMemory, VirtAddr};

use crate::error::VkError;
use crate::info::{DeviceInfo, DeviceKind, ExternalCaps, HandleCaps};

/// Buffer usage of every buffer the backend creates (and queries external capabilities for).
pub(crate) const USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::TRANSFER_SRC.as_raw()
        | vk::BufferUsageFlags::TRANSFER_DST.as_raw()
        | vk::BufferUsageFlags::STORAGE_BUFFER.as_raw(),
);

const FD_EXT: &CStr = ash::khr::external_memory_fd::NAME;
const DMA_BUF_EXT: &CStr = ash::ext::external_memory_dma_buf::NAME;
const HOST_EXT: &CStr = ash::ext::external_memory_host::NAME;
const PCI_EXT: &CStr = ash::ext::pci_bus_info::NAME;

/// A `VkInstance` with the loader library it came from.
pub(crate) struct Instance {
    raw: ash::Instance,
    /// Keeps libvulkan loaded while `raw` lives.
    _entry: ash::Entry,
    api: u32,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every child object holds an `Arc<Instance>`, so none is alive any more.
        unsafe { self.raw.destroy_instance(None) };
    }
}

fn version(v: u32) -> (u32, u32, u32) {
    (vk::api_version_major(v), vk::api_version_minor(v), vk::api_version_patch(v))
}

fn c_string(bytes: Result<&CStr, std::ffi::FromBytesUntilNulError>) -> String {
    bytes.map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

impl Instance {
    /// Opens the system loader (dlopen of libvulkan.so.1) and creates an instance.
    pub(crate) fn load() -> Result<Arc<Instance>, VkError> {
        // SAFETY: loads the system Vulkan loader with dlopen; its initialisers are those of any
        // Vulkan application. ash resolves and checks the global entry points.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| VkError::NoLoader(e.to_string()))?;
        // SAFETY: a valid entry; vkEnumerateInstanceVersion has no preconditions.
        let loader = unsafe { entry.try_enumerate_instance_version() }
            .map_err(VkError::call("vkEnumerateInstanceVersion"))?
            .unwrap_or(vk::API_VERSION_1_0);
        let (major, minor, _) = version(loader);
        if loader < vk::API_VERSION_1_1 {
            return Err(VkError::TooOld { what: "the Vulkan loader".into(), major, minor });
        }
        let api = if loader >= vk::API_VERSION_1_2 { vk::API_VERSION_1_2 } else { vk::API_VERSION_1_1 };
        let app = vk::ApplicationInfo::default().application_name(c"peermem").engine_name(c"peermem").api_version(api);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `info` and what it points to live across the call; no allocation callbacks.
        let raw = unsafe { entry.create_instance(&info, None) }.map_err(|result| match result {
            // The loader's answer when it found no driver (ICD) at all.
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => VkError::NoDevice,
            result => VkError::Call { call: "vkCreateInstance", result },
        })?;
        tracing::debug!(loader = ?version(loader), "Vulkan instance created");
        Ok(Arc::new(Instance { raw, _entry: entry, api }))
    }

    pub(crate) fn physical_devices(&self) -> Result<Vec<vk::PhysicalDevice>, VkError> {
        // SAFETY: a live instance.
        unsafe { self.raw.enumerate_physical_devices() }.map_err(VkError::call("vkEnumeratePhysicalDevices"))
    }

    /// Everything the backend reports about one physical device.
    pub(crate) fn describe(&self, index: usize, pd: vk::PhysicalDevice) -> Result<DeviceInfo, VkError> {
        // SAFETY: `pd` was enumerated from this live instance.
        let exts = unsafe { self.raw.enumerate_device_extension_properties(pd) }
            .map_err(VkError::call("vkEnumerateDeviceExtensionProperties"))?;
        let has = |name: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(name));
        let (has_fd, has_dma_buf, has_host, has_pci) = (has(FD_EXT), has(DMA_BUF_EXT), has(HOST_EXT), has(PCI_EXT));
        // SAFETY: as above.
        let props = unsafe { self.raw.get_physical_device_properties(pd) };
        let name = c_string(props.device_name_as_c_str());
        let kind = DeviceKind::from_vk(props.device_type);
        let mut info = DeviceInfo {
            index,
            name,
            kind,
            vendor_id: props.vendor_id,
            device_id: props.device_id,
            api_version: version(props.api_version),
            driver_name: None,
            driver_info: None,
            pci: None,
            device_uuid: [0; 16],
            driver_uuid: [0; 16],
            caps: ExternalCaps::default(),
            handle: pd,
            extensions: exts.iter().map(|e| c_string(e.extension_name_as_c_str())).collect(),
        };
        if props.api_version < vk::API_VERSION_1_1 {
            // The 1.1 queries below are not valid on a 1.0 device; `open` refuses it by version.
            return Ok(info);
        }
        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut drv = vk::PhysicalDeviceDriverProperties::default();
        let mut pci = vk::PhysicalDevicePCIBusInfoPropertiesEXT::default();
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let with_driver = self.api >= vk::API_VERSION_1_2 && props.api_version >= vk::API_VERSION_1_2;
        let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
        if with_driver {
            p2 = p2.push_next(&mut drv);
        }
        if has_pci {
            p2 = p2.push_next(&mut pci);
        }
        if has_host {
            p2 = p2.push_next(&mut host);
        }
        // SAFETY: a valid pNext chain of structures this device's extensions/version define.
        unsafe { self.raw.get_physical_device_properties2(pd, &mut p2) };
        info.device_uuid = id.device_uuid;
        info.driver_uuid = id.driver_uuid;
        if with_driver {
            info.driver_name = Some(c_string(drv.driver_name_as_c_str()));
            info.driver_info = Some(c_string(drv.driver_info_as_c_str()));
        }
        if has_pci {
            info.pci = u8::try_from(pci.pci_bus)
                .ok()
                .zip(u8::try_from(pci.pci_device).ok())
                .zip(u8::try_from(pci.pci_function).ok())
                .and_then(|((b, d), f)| Bdf::new(pci.pci_domain, b, d, f));
        }
        let query = |present: bool, t: vk::ExternalMemoryHandleTypeFlags| {
            if !present || !has_fd && t != vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT {
                return HandleCaps::default();
            }
            let q = vk::PhysicalDeviceExternalBufferInfo::default().usage(USAGE).handle_type(t);
            let mut out = vk::ExternalBufferProperties::default();
            // SAFETY: a 1.1 instance and device; the handle type's extension is present.
            unsafe { self.raw.get_physical_device_external_buffer_properties(pd, &q, &mut out) };
            let f = out.external_memory_properties.external_memory_features;
            HandleCaps {
                extension: true,
                exportable: f.contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE),
                importable: f.contains(vk::ExternalMemoryFeatureFlags::IMPORTABLE),
                dedicated_only: f.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY),
            }
        };
        info.caps = ExternalCaps {
            opaque_fd: query(has_fd, vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD),
            dma_buf: query(has_dma_buf, vk::ExternalMemoryHandleTypeFlags::DMA_BUF_EXT),
            host_allocation: query(has_host, vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT),
            min_host_pointer_alignment: has_host.then_some(host.min_imported_host_pointer_alignment),
        };
        Ok(info)
    }
}

/// A `VkDevice` with one transfer-capable queue and the external-memory entry points.
pub(crate) struct RawDevice {
    raw: ash::Device,
    fd_ext: ash::khr::external_memory_fd::Device,
    host_ext: Option<ash::ext::external_memory_host::Device>,
    queue: vk::Queue,
    family: u32,
    mem_types: Vec<vk::MemoryType>,
    pub(crate) name: String,
    pub(crate) min_host_alignment: Option<u64>,
    /// Keeps the instance alive while the device lives (destroyed after it).
    _instance: Arc<Instance>,
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        // SAFETY: every memory, buffer, pool and fence of this device holds an `Arc<RawDevice>`,
        // so all are destroyed; waiting for idle first covers work the driver may still retire.
        unsafe {
            let _ = self.raw.device_wait_idle();
            self.raw.destroy_device(None);
        }
        tracing::debug!(device = %self.name, "VkDevice destroyed");
    }
}

/// A memory type as the policy code sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemType {
    pub(crate) index: u32,
    pub(crate) flags: vk::MemoryPropertyFlags,
}

impl RawDevice {
    /// Creates the device on `info`'s physical device with the external-memory extensions it has.
    pub(crate) fn create(instance: &Arc<Instance>, info: &DeviceInfo) -> Result<Arc<RawDevice>, VkError> {
        let pd = info.handle;
        // SAFETY: `pd` belongs to this live instance.
        let families = unsafe { instance.raw.get_physical_device_queue_family_properties(pd) };
        let can_copy = vk::QueueFlags::TRANSFER | vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE;
        // A transfer-only family is the copy engine on real GPUs; any family that can copy will do.
        let family = families
            .iter()
            .position(|f| f.queue_count > 0 && f.queue_flags & can_copy == vk::QueueFlags::TRANSFER)
            .or_else(|| families.iter().position(|f| f.queue_count > 0 && f.queue_flags.intersects(can_copy)))
            .ok_or_else(|| VkError::Unsupported { device: info.name.clone(), what: "copy: no transfer queue".into() })?
            as u32;
        let mut names = vec![FD_EXT.as_ptr()];
        if info.caps.dma_buf.extension {
            names.push(DMA_BUF_EXT.as_ptr());
        }
        if info.caps.host_allocation.extension {
            names.push(HOST_EXT.as_ptr());
        }
        let prio = [1.0f32];
        let qinfo = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&prio)];
        let dinfo = vk::DeviceCreateInfo::default().queue_create_infos(&qinfo).enabled_extension_names(&names);
        // SAFETY: the extensions were enumerated on `pd`, the family index exists, and the
        // create info and its arrays outlive the call.
        let raw = unsafe { instance.raw.create_device(pd, &dinfo, None) }.map_err(VkError::call("vkCreateDevice"))?;
        // SAFETY: queue 0 of a family created above.
        let queue = unsafe { raw.get_device_queue(family, 0) };
        // SAFETY: `pd` belongs to this live instance.
        let mp = unsafe { instance.raw.get_physical_device_memory_properties(pd) };
        let fd_ext = ash::khr::external_memory_fd::Device::new(&instance.raw, &raw);
        let host_ext = info
            .caps
            .host_allocation
            .extension
            .then(|| ash::ext::external_memory_host::Device::new(&instance.raw, &raw));
        tracing::info!(device = %info.name, family, "VkDevice created");
        Ok(Arc::new(RawDevice {
            raw,
            fd_ext,
            host_ext,
            queue,
            family,
            mem_types: mp.memory_types_as_slice().to_vec(),
            name: info.name.clone(),
            min_host_alignment: info.caps.min_host_pointer_alignment,
            _instance: instance.clone(),
        }))
    }

    /// The memory types of `bits` (a `memoryTypeBits` mask), in the driver's order.
    pub(crate) fn types(&self, bits: u32) -> Vec<MemType> {
        (0..self.mem_types.len() as u32)
            .filter(|i| bits & (1 << i) != 0)
            .map(|i| MemType { index: i, flags: self.mem_types[i as usize].property_flags })
            .collect()
    }

    fn flags(&self, index: u32) -> vk::MemoryPropertyFlags {
        self.mem_types.get(index as usize).map(|t| t.property_flags).unwrap_or_default()
    }

    /// A buffer of `len` bytes declared for `handle` external memory (empty: not external).
    fn buffer(&self, len: u64, handle: vk::ExternalMemoryHandleTypeFlags) -> Result<Buffer<'_>, VkError> {
        let mut ext = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let mut info = vk::BufferCreateInfo::default().size(len).usage(USAGE).sharing_mode(vk::SharingMode::EXCLUSIVE);
        if !handle.is_empty() {
            info = info.push_next(&mut ext);
        }
        // SAFETY: a live device and a valid create info (len > 0 is checked by every caller).
        let raw = unsafe { self.raw.create_buffer(&info, None) }.map_err(VkError::call("vkCreateBuffer"))?;
        // SAFETY: a buffer just created on this device.
        let reqs = unsafe { self.raw.get_buffer_memory_requirements(raw) };
        Ok(Buffer { dev: self, raw, reqs })
    }

    /// Allocates memory (or imports it, per the chain of `info`).
    fn allocate_raw(&self, info: &vk::MemoryAllocateInfo<'_>) -> Result<DeviceMemory<'_>, vk::Result> {
        // SAFETY: `info` is a valid allocate info whose pNext chain the caller built from live
        // structures; the memory type index was checked against this device's types.
        let raw = unsafe { self.raw.allocate_memory(info, None) }?;
        Ok(DeviceMemory { dev: self, raw, type_index: info.memory_type_index })
    }

    /// Binds `mem` to `buf` and maps it when its type is host-visible and coherent and `map` is
    /// set; hands both out (they are then owned by a `RawMemory`).
    fn finish(
        &self,
        buf: Buffer<'_>,
        mem: DeviceMemory<'_>,
        map: bool,
    ) -> Result<(vk::Buffer, vk::DeviceMemory, Option<VirtAddr>), VkError> {
        // SAFETY: buffer and memory are of this device, the buffer is unbound, and the memory is
        // at least reqs.size bytes of a type in reqs.memory_type_bits (checked by the callers).
        unsafe { self.raw.bind_buffer_memory(buf.raw, mem.raw, 0) }.map_err(VkError::call("vkBindBufferMemory"))?;
        let want = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let va = if map && self.flags(mem.type_index).contains(want) {
            // SAFETY: host-visible memory of this device, not mapped yet, mapped whole once.
            let p = unsafe { self.raw.map_memory(mem.raw, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
                .map_err(VkError::call("vkMapMemory"))?;
            Some(VirtAddr::from_ptr(p as *const u8))
        } else {
            None
        };
        let out = (buf.raw, mem.raw, va);
        std::mem::forget(buf);
        std::mem::forget(mem);
        Ok(out)
    }
}

/// A buffer being set up: destroyed if setup fails before it is bound.
struct Buffer<'d> {
    dev: &'d RawDevice,
    raw: vk::Buffer,
    reqs: vk::MemoryRequirements,
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        // SAFETY: an unbound buffer of this device that no command uses.
        unsafe { self.dev.raw.destroy_buffer(self.raw, None) };
    }
}

/// Memory being set up: freed if setup fails before it is handed out.
struct DeviceMemory<'d> {
    dev: &'d RawDevice,
    raw: vk::DeviceMemory,
    type_index: u32,
}

impl Drop for DeviceMemory<'_> {
    fn drop(&mut self) {
        // SAFETY: memory of this device not bound to any live buffer in use and not mapped.
        unsafe { self.dev.raw.free_memory(self.raw, None) };
    }
}

/// What a new allocation is declared as.
pub(crate) struct AllocSpec {
    pub(crate) len: u64,
    /// Handle types it may be exported as (empty: not exportable).
    pub(crate) export: vk::ExternalMemoryHandleTypeFlags,
    pub(crate) dedicated: bool,
}

/// How an fd is imported.
pub(crate) struct FdImport {
    pub(crate) handle: vk::ExternalMemoryHandleTypeFlags,
    pub(crate) fd: OwnedFd,
    pub(crate) len: u64,
    pub(crate) dedicated: bool,
}

/// A buffer bound to its own memory. Freed (unmapped first) when the last `Arc` goes.
pub(crate) struct RawMemory {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    pub(crate) len: u64,
    pub(crate) alloc_size: u64,
    pub(crate) type_index: u32,
    pub(crate) dedicated: bool,
    /// Our own `vkMapMemory` mapping (host-visible, coherent memory).
    pub(crate) map: Option<VirtAddr>,
    pub(crate) dev: Arc<RawDevice>,
    /// Host import: the region whose pages are this memory, kept alive until it is freed.
    pub(crate) host: Option<Arc<dyn PeerMemory>>,
}

impl Drop for RawMemory {
    fn drop(&mut self) {
        // SAFETY: nothing uses the buffer any more: copies hold an `Arc<RawMemory>` until their
        // fence signals, and the mapping is only reached through an `Arc` holder. Unmap before
        // free, destroy the buffer before freeing its memory. `host` (a field) is dropped after
        // this body, so imported host pages outlive the memory object that aliases them.
        unsafe {
            if self.map.is_some() {
                self.dev.raw.unmap_memory(self.memory);
            }
            self.dev.raw.destroy_buffer(self.buffer, None);
            self.dev.raw.free_memory(self.memory, None);
        }
    }
}

impl RawMemory {
    /// Allocates an exportable (per `spec.export`) buffer + memory; `choose` picks the type from
    /// the buffer's requirements.
    pub(crate) fn allocate(
        dev: &Arc<RawDevice>,
        spec: &AllocSpec,
        choose: impl FnOnce(&vk::MemoryRequirements) -> Result<u32, VkError>,
    ) -> Result<RawMemory, VkError> {
        if spec.len == 0 {
            return Err(VkError::BadLength { len: 0, why: "a region cannot be empty" });
        }
        let buf = dev.buffer(spec.len, spec.export)?;
        let type_index = choose(&buf.reqs)?;
        check_type(dev, type_index, buf.reqs.memory_type_bits)?;
        let alloc_size = buf.reqs.size;
        let mut export = vk::ExportMemoryAllocateInfo::default().handle_types(spec.export);
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buf.raw);
        let mut info = vk::MemoryAllocateInfo::default().allocation_size(alloc_size).memory_type_index(type_index);
        if !spec.export.is_empty() {
            info = info.push_next(&mut export);
        }
        if spec.dedicated {
            info = info.push_next(&mut dedicated);
        }
        let mem = dev.allocate_raw(&info).map_err(VkError::call("vkAllocateMemory"))?;
        let (buffer, memory, map) = dev.finish(buf, mem, true)?;
        Ok(RawMemory {
            buffer,
            memory,
            len: spec.len,
            alloc_size,
            type_index,
            dedicated: spec.dedicated,
            map,
            dev: dev.clone(),
            host: None,
        })
    }

    /// A new fd of `handle` type for this memory (the caller owns it).
    pub(crate) fn export_fd(&self, handle: vk::ExternalMemoryHandleTypeFlags) -> Result<OwnedFd, VkError> {
        let info = vk::MemoryGetFdInfoKHR::default().memory(self.memory).handle_type(handle);
        // SAFETY: memory of this device; exporting a type it was not allocated for fails with an
        // error code (the caller only asks for declared types).
        let raw = unsafe { self.dev.fd_ext.get_memory_fd(&info) }.map_err(VkError::call("vkGetMemoryFdKHR"))?;
        if raw < 0 {
            return Err(VkError::Call { call: "vkGetMemoryFdKHR", result: vk::Result::ERROR_INVALID_EXTERNAL_HANDLE });
        }
        // SAFETY: vkGetMemoryFdKHR returns a new fd whose ownership passes to the application.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Imports an fd. `choose(requirements, fd_type_bits)` returns (memory type, allocation size):
    /// the policy code checks sizes against the fd and picks the type.
    pub(crate) fn import_fd(
        dev: &Arc<RawDevice>,
        imp: FdImport,
        choose: impl FnOnce(&vk::MemoryRequirements, u32) -> Result<(u32, u64), VkError>,
    ) -> Result<RawMemory, VkError> {
        if imp.len == 0 {
            return Err(VkError::BadLength { len: 0, why: "a region cannot be empty" });
        }
        let buf = dev.buffer(imp.len, imp.handle)?;
        let fd_bits = if imp.handle == vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD {
            // vkGetMemoryFdPropertiesKHR is not defined for opaque fds: any type of the buffer.
            u32::MAX
        } else {
            let mut props = vk::MemoryFdPropertiesKHR::default();
            // SAFETY: a live fd we own for the duration of the call; a non-opaque handle type.
            unsafe { dev.fd_ext.get_memory_fd_properties(imp.handle, imp.fd.as_raw_fd(), &mut props) }
                .map_err(VkError::call("vkGetMemoryFdPropertiesKHR"))?;
            props.memory_type_bits
        };
        let (type_index, alloc_size) = choose(&buf.reqs, fd_bits)?;
        check_type(dev, type_index, buf.reqs.memory_type_bits & fd_bits)?;
        if alloc_size < buf.reqs.size {
            return Err(VkError::ImportTooSmall { what: "import allocation", need: buf.reqs.size, have: alloc_size });
        }
        let raw_fd = imp.fd.into_raw_fd();
        let mut import = vk::ImportMemoryFdInfoKHR::default().handle_type(imp.handle).fd(raw_fd);
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buf.raw);
        let mut info = vk::MemoryAllocateInfo::default()
            .allocation_size(alloc_size)
            .memory_type_index(type_index)
            .push_next(&mut import);
        if imp.dedicated {
            info = info.push_next(&mut dedicated);
        }
        let mem = match dev.allocate_raw(&info) {
            Ok(mem) => mem,
            Err(result) => {
                // SAFETY: the import failed, so the driver did not take `raw_fd` (spec of
                // VkImportMemoryFdInfoKHR): it is still ours and nothing else owns it.
                drop(unsafe { OwnedFd::from_raw_fd(raw_fd) });
                return Err(VkError::Call { call: "vkAllocateMemory (fd import)", result });
            }
        };
        // From here the driver owns `raw_fd`: freeing `mem` releases it.
        let (buffer, memory, map) = dev.finish(buf, mem, true)?;
        Ok(RawMemory {
            buffer,
            memory,
            len: imp.len,
            alloc_size,
            type_index,
            dedicated: imp.dedicated,
            map,
            dev: dev.clone(),
            host: None,
        })
    }

    /// Imports the CPU mapping of `source` (all of it) through VK_EXT_external_memory_host,
    /// refusing what the driver's rules forbid even when the driver itself would accept it.
    pub(crate) fn import_host(
        dev: &Arc<RawDevice>,
        source: Arc<dyn PeerMemory>,
        choose: impl FnOnce(&vk::MemoryRequirements, u32) -> Result<u32, VkError>,
    ) -> Result<RawMemory, VkError> {
        let (Some(ext), Some(align)) = (dev.host_ext.as_ref(), dev.min_host_alignment) else {
            return Err(VkError::MissingExtension { device: dev.name.clone(), ext: "VK_EXT_external_memory_host" });
        };
        let va = source.cpu_mapping().ok_or(VkError::NotMapped { which: "host import source" })?.addr();
        let len = source.len();
        if !align.is_power_of_two() {
            // The spec guarantees a power of two; anything else is a driver bug we will not guess around.
            return Err(VkError::Unsupported {
                device: dev.name.clone(),
                what: format!("import host memory: minImportedHostPointerAlignment {align:#x} is not a power of two"),
            });
        }
        let misalign = va.raw() & (align - 1);
        if misalign != 0 {
            return Err(VkError::Misaligned { addr: va, align, misalign, device: dev.name.clone() });
        }
        if len == 0 || len & (align - 1) != 0 {
            return Err(VkError::BadImportSize { len, align, device: dev.name.clone() });
        }
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let buf = dev.buffer(len, handle)?;
        if buf.reqs.size > len {
            return Err(VkError::ImportTooSmall {
                what: "host import (buffer requirements)",
                need: buf.reqs.size,
                have: len,
            });
        }
        let ptr = va.raw() as usize as *mut c_void;
        let mut props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `ptr` is the start of `len` mapped bytes of `source` (the PeerMemory contract of
        // `cpu_mapping`), aligned as the device requires; the call only inspects the pointer.
        unsafe { (ext.fp().get_memory_host_pointer_properties_ext)(dev.raw.handle(), handle, ptr, &mut props) }
            .result()
            .map_err(VkError::call("vkGetMemoryHostPointerPropertiesEXT"))?;
        let type_index = choose(&buf.reqs, props.memory_type_bits)?;
        check_type(dev, type_index, buf.reqs.memory_type_bits & props.memory_type_bits)?;
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default().handle_type(handle).host_pointer(ptr);
        let info =
            vk::MemoryAllocateInfo::default().allocation_size(len).memory_type_index(type_index).push_next(&mut import);
        // The CPU mapping stays the source's: no vkMapMemory on host-pointer imports.
        let mem = dev.allocate_raw(&info).map_err(VkError::call("vkAllocateMemory (host pointer import)"))?;
        let (buffer, memory, _) = dev.finish(buf, mem, false)?;
        Ok(RawMemory {
            buffer,
            memory,
            len,
            alloc_size: len,
            type_index,
            dedicated: false,
            map: None,
            dev: dev.clone(),
            // Keeps the pages alive as long as the Vulkan memory aliases them.
            host: Some(source),
        })
    }

    /// The CPU mapping of this memory: our `vkMapMemory` mapping, or the host import's source.
    pub(crate) fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        match self.map {
            Some(va) => {
                let ptr = NonNull::new(va.raw() as usize as *mut u8)?;
                // SAFETY: vkMapMemory mapped `len` bytes at `va` (host-visible, coherent); they
                // stay mapped until `drop` unmaps them, which cannot happen while `&self` is
                // borrowed; no Rust reference ever covers those bytes.
                Some(unsafe { MappedSpan::from_raw(ptr, self.len as usize) })
            }
            None => self.host.as_ref().and_then(|h| h.cpu_mapping()),
        }
    }
}

fn check_type(dev: &RawDevice, index: u32, bits: u32) -> Result<(), VkError> {
    if (index as usize) < dev.mem_types.len() && index < 32 && bits & (1 << index) != 0 {
        Ok(())
    } else {
        Err(VkError::NoMemoryType { what: "the requested memory type index", bits })
    }
}

/// One command buffer + fence on the device's transfer queue, used one copy at a time.
pub(crate) struct Transfer {
    dev: Arc<RawDevice>,
    pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    /// Buffers of the submitted, not yet completed copy.
    in_flight: Vec<Arc<RawMemory>>,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        // SAFETY: waits (unbounded: destroying earlier would free objects the GPU still uses)
        // for the last submission, then destroys the fence and the pool (and its buffer).
        unsafe {
            if !self.in_flight.is_empty() {
                if let Err(e) = self.dev.raw.wait_for_fences(&[self.fence], true, u64::MAX) {
                    tracing::error!(error = %e, "waiting for the last copy at device drop failed; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut self.in_flight));
                }
            }
            self.dev.raw.destroy_fence(self.fence, None);
            self.dev.raw.destroy_command_pool(self.pool, None);
        }
    }
}

impl Transfer {
    pub(crate) fn new(dev: &Arc<RawDevice>) -> Result<Transfer, VkError> {
        let pinfo = vk::CommandPoolCreateInfo::default()
            .queue_family_index(dev.family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER | vk::CommandPoolCreateFlags::TRANSIENT);
        // SAFETY: a live device and a family it was created with.
        let pool =
            unsafe { dev.raw.create_command_pool(&pinfo, None) }.map_err(VkError::call("vkCreateCommandPool"))?;
        let ainfo = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: a pool just created; on error the pool is destroyed before returning.
        let cmd = match unsafe { dev.raw.allocate_command_buffers(&ainfo) } {
            Ok(v) => v[0],
            Err(e) => {
                // SAFETY: the pool has no buffers in use.
                unsafe { dev.raw.destroy_command_pool(pool, None) };
                return Err(VkError::Call { call: "vkAllocateCommandBuffers", result: e });
            }
        };
        // SAFETY: a live device.
        let fence = match unsafe { dev.raw.create_fence(&vk::FenceCreateInfo::default(), None) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: the pool and its buffer are unused.
                unsafe { dev.raw.destroy_command_pool(pool, None) };
                return Err(VkError::Call { call: "vkCreateFence", result: e });
            }
        };
        Ok(Transfer { dev: dev.clone(), pool, cmd, fence, in_flight: Vec::new() })
    }

    /// Waits up to `timeout` for the last submitted copy; its buffers are released when it is done.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<(), VkError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: a fence of this device, submitted with the in-flight copy.
        match unsafe { self.dev.raw.wait_for_fences(&[self.fence], true, ns) } {
            Ok(()) => {
                self.in_flight.clear();
                Ok(())
            }
            Err(vk::Result::TIMEOUT) => Err(VkError::Timeout(timeout)),
            Err(e) => Err(VkError::Call { call: "vkWaitForFences", result: e }),
        }
    }

    /// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` on the GPU and waits up to
    /// `timeout` for it. Both must be memory of this device; ranges are checked here.
    pub(crate) fn copy(
        &mut self,
        src: &Arc<RawMemory>,
        src_off: u64,
        dst: &Arc<RawMemory>,
        dst_off: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<(), VkError> {
        for (which, m) in [("source", src), ("destination", dst)] {
            if !Arc::ptr_eq(&m.dev, &self.dev) {
                return Err(VkError::ForeignRegion { which, device: self.dev.name.clone() });
            }
        }
        check_range("source", src_off, len, src.len)?;
        check_range("destination", dst_off, len, dst.len)?;
        if len == 0 {
            return Ok(());
        }
        if Arc::ptr_eq(src, dst) && src_off < dst_off + len && dst_off < src_off + len {
            return Err(VkError::BadLength { len, why: "vkCmdCopyBuffer ranges of one buffer must not overlap" });
        }
        // The previous copy must be done before its command buffer and fence are reused.
        self.wait(timeout)?;
        let d = &self.dev.raw;
        let region = [vk::BufferCopy { src_offset: src_off, dst_offset: dst_off, size: len }];
        // Make the copy's writes visible to host reads through the mappings.
        let barrier = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        // SAFETY: the command buffer is not pending (waited above), both buffers are live
        // buffers of this device (held by `in_flight` until the fence signals), the ranges were
        // checked, the queue is only used under the caller's `&mut self` (the device's mutex),
        // and the fence is unsignalled after the reset.
        unsafe {
            d.reset_fences(&[self.fence]).map_err(VkError::call("vkResetFences"))?;
            d.reset_command_buffer(self.cmd, vk::CommandBufferResetFlags::empty())
                .map_err(VkError::call("vkResetCommandBuffer"))?;
            let begin = vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
            d.begin_command_buffer(self.cmd, &begin).map_err(VkError::call("vkBeginCommandBuffer"))?;
            d.cmd_copy_buffer(self.cmd, src.buffer, dst.buffer, &region);
            d.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &barrier,
                &[],
                &[],
            );
            d.end_command_buffer(self.cmd).map_err(VkError::call("vkEndCommandBuffer"))?;
            let cmds = [self.cmd];
            let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
            d.queue_submit(self.dev.queue, &submit, self.fence).map_err(VkError::call("vkQueueSubmit"))?;
        }
        self.in_flight = vec![src.clone(), dst.clone()];
        self.wait(timeout)
    }
}

pub(crate) fn check_range(which: &'static str, offset: u64, len: u64, size: u64) -> Result<(), VkError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VkError::OutOfRange { which, offset, len, size }),
    }
}
