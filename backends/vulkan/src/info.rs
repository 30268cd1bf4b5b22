//! What the backend reports about a physical device, as plain data: its kind, the fd kinds of
//! external memory (`HandleType`), what it can export and import (`HandleCaps`,
//! `ExternalCaps`), and `DeviceInfo`, which gathers them with its identity and PCI function.
//!
//! Owns: these types and what follows from them alone (the provider and the note that explains
//! it). Must not: import from any other module of the crate: the raw `sys` layer fills these,
//! and `device`, `region`, `error` and `ipc` read them.

use std::fmt;

use ash::vk;
use peermem::{Bdf, Provider};

/// What kind of device the driver says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Discrete,
    Integrated,
    Virtual,
    /// A software rasterizer on the CPU (Mesa lavapipe, SwiftShader).
    Cpu,
    Other,
}

impl DeviceKind {
    pub(crate) fn from_vk(t: vk::PhysicalDeviceType) -> DeviceKind {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => DeviceKind::Discrete,
            vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceKind::Integrated,
            vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceKind::Virtual,
            vk::PhysicalDeviceType::CPU => DeviceKind::Cpu,
            _ => DeviceKind::Other,
        }
    }
}

/// An fd kind for external memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandleType {
    /// `VK_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD_BIT`: driver-private; only the same driver and
    /// device (equal UUIDs) can import it. On lavapipe it is a memfd with a 4096-byte Mesa header.
    OpaqueFd,
    /// `VK_EXTERNAL_MEMORY_HANDLE_TYPE_DMA_BUF_BIT_EXT`: a Linux dma-buf any importer can use.
    DmaBuf,
}

impl HandleType {
    pub(crate) fn to_vk(self) -> vk::ExternalMemoryHandleTypeFlags {
        match self {
            HandleType::OpaqueFd => vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD,
            HandleType::DmaBuf => vk::ExternalMemoryHandleTypeFlags::DMA_BUF_EXT,
        }
    }
}

impl fmt::Display for HandleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandleType::OpaqueFd => "opaque",
            HandleType::DmaBuf => "dma-buf",
        })
    }
}

/// What `vkGetPhysicalDeviceExternalBufferProperties` says about one handle type (for buffers
/// used as transfer source, destination and storage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandleCaps {
    /// The device extension for this handle type is present.
    pub extension: bool,
    pub exportable: bool,
    pub importable: bool,
    /// Exports and imports must be dedicated allocations.
    pub dedicated_only: bool,
}

/// The device's external-memory capabilities for buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExternalCaps {
    pub opaque_fd: HandleCaps,
    pub dma_buf: HandleCaps,
    /// VK_EXT_external_memory_host (import only).
    pub host_allocation: HandleCaps,
    /// `minImportedHostPointerAlignment`, when VK_EXT_external_memory_host is present.
    pub min_host_pointer_alignment: Option<u64>,
}

/// One physical device as the backend reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Position in the loader's enumeration (`Select::Index`).
    pub index: usize,
    pub name: String,
    pub kind: DeviceKind,
    pub vendor_id: u32,
    pub device_id: u32,
    pub api_version: (u32, u32, u32),
    /// `VkPhysicalDeviceDriverProperties` (Vulkan 1.2), e.g. "llvmpipe".
    pub driver_name: Option<String>,
    pub driver_info: Option<String>,
    /// The PCI function, only from VK_EXT_pci_bus_info (never guessed).
    pub pci: Option<Bdf>,
    pub device_uuid: [u8; 16],
    pub driver_uuid: [u8; 16],
    pub caps: ExternalCaps,
    /// Device extension names.
    pub extensions: Vec<String>,
    pub(crate) handle: vk::PhysicalDevice,
}

const VENDOR_MESA: u32 = 0x1_0005;

impl DeviceInfo {
    /// Mesa's lavapipe (llvmpipe Vulkan): a CPU device whose memory is system RAM.
    pub fn is_lavapipe(&self) -> bool {
        self.kind == DeviceKind::Cpu
            && (self.vendor_id == VENDOR_MESA || self.driver_name.as_deref() == Some("llvmpipe"))
    }

    /// Who owns this device's allocations: its PCI function when VK_EXT_pci_bus_info names it,
    /// otherwise host memory (unknown NUMA node), as stated by `provider_note`.
    pub fn provider(&self) -> Provider {
        match self.pci {
            Some(bdf) => Provider::Pci(bdf),
            None => Provider::Host { numa: None },
        }
    }

    /// Why `provider()` is what it is, in one sentence.
    pub fn provider_note(&self) -> String {
        let driver = self.driver_name.as_deref().unwrap_or("unknown driver");
        match (self.pci, self.kind) {
            (Some(bdf), _) => format!("provider: PCI {bdf} ('{}', {driver}), from VK_EXT_pci_bus_info", self.name),
            (None, DeviceKind::Cpu) => format!(
                "provider: host memory: '{}' ({driver}{}) is a CPU Vulkan device without a PCI function \
                 (no VK_EXT_pci_bus_info); its allocations are system RAM",
                self.name,
                if self.is_lavapipe() { ", Mesa lavapipe" } else { "" }
            ),
            (None, _) => format!(
                "provider: reported as host memory because '{}' ({driver}) does not expose VK_EXT_pci_bus_info; \
                 its PCI function and BAR are unknown, so no bus address can be given",
                self.name
            ),
        }
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b, c) = self.api_version;
        write!(f, "#{} '{}' {:?} Vulkan {a}.{b}.{c}", self.index, self.name, self.kind)?;
        if let Some(d) = &self.driver_name {
            write!(f, " driver {d}")?;
        }
        match self.pci {
            Some(bdf) => write!(f, " pci {bdf}"),
            None => write!(f, " pci unknown (no VK_EXT_pci_bus_info)"),
        }
    }
}
