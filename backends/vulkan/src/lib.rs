//! Vulkan backend of peermem: GPU memory as exportable peer memory, and peer memory imported
//! into the GPU, on [`ash`] (libvulkan is dlopened at run time: no loader is a typed error).
//!
//! Modules:
//! - `info`: what a physical device is and can do (kind, fd kinds, export and import caps).
//! - `device`: choosing and opening a device; the opened [`Device`] allocates, imports, copies.
//! - `region`: [`VulkanRegion`], Vulkan memory as a `PeerMemory`, and its [`Export`].
//! - `error`: [`VkError`], the backend's one error type.
//! - [`ipc`]: send an [`Export`] to another process over a unix socket (`SCM_RIGHTS`).
//! - `sys`: the only `unsafe`: Vulkan calls through `ash`, raw copies, fd passing (private).
//!
//! What they offer:
//! - [`Vulkan`] / [`Device`]: pick a device by PCI address (VK_EXT_pci_bus_info), index, or
//!   best (discrete first) with [`Select`]; [`DeviceInfo::caps`] reports which fd types it can
//!   export and import for buffers (`vkGetPhysicalDeviceExternalBufferProperties`).
//! - [`VulkanRegion`]: buffer + memory implementing [`peermem::PeerMemory`]: exportable as a
//!   dma-buf when the driver can, else an opaque fd; CPU-mapped when host-visible; register it
//!   in a [`peermem::Registry`] like any region. Its provider is the device's PCI function only
//!   when the driver reports one; otherwise host memory, and [`VulkanRegion::notes`] says why.
//! - Imports: [`Device::import`] (opaque fd from another `VkDevice` or process, dma-buf) and
//!   [`Device::import_host`] (any CPU-mapped region, alignment and size checked here).
//! - Transfers: [`Device::copy`] (vkCmdCopyBuffer, fence, bounded wait), and CPU copies through
//!   the core's `PeerMemory::{read_at, write_at, copy_to}`.
//!
//! Lifetimes: a region keeps its device's handles alive, an import keeps its source alive, and
//! a copy keeps its regions alive until its fence signals, so any drop order is safe.
//!
//! ```no_run
//! use std::sync::Arc;
//! use peermem::{HostRegion, PeerMemory, Registry, Topology};
//! use peermem_vulkan::{Device, Placement, Select};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gpu = Device::open(Select::Best)?;
//! let vram = Arc::new(gpu.allocate(1 << 20, Placement::DeviceLocal)?);
//!
//! // GPU memory in the registry: look it up by address, resolve it for a peer, say why.
//! let reg = Registry::new(Arc::new(Topology::discover("/")?));
//! let guard = reg.register(vram.clone())?;
//! if let Some(va) = vram.cpu_range().map(|r| r.start()) {
//!     let found = reg.snapshot().lookup_va(va).map(|hit| hit.entry.id());
//!     assert_eq!(found, Some(guard.id()));
//! }
//! let route = reg.resolve(&guard, reg.peer("0000:03:00.0".parse()?)?)?;
//! println!("{}: {:#?}", route.kind.name(), vram.explain(&route));
//!
//! // Host pages into the GPU, then a GPU copy into VRAM.
//! let host = Arc::new(HostRegion::new(1 << 20)?);
//! host.write_at(0, b"peer memory")?;
//! let staged = gpu.import_host(host)?;
//! gpu.copy(&staged, 0, &vram, 0, 1 << 20)?;
//!
//! // Hand the VRAM to another device or process.
//! let export = vram.export()?; // export.fd: dma-buf or opaque fd
//! let other = Device::open(Select::Best)?.import(export)?;
//! # let _ = other; Ok(()) }
//! ```

mod device;
mod error;
mod info;
pub mod ipc;
mod region;
#[allow(unsafe_code)]
mod sys;

pub use device::{Device, Placement, Select, Vulkan};
pub use error::VkError;
pub use info::{DeviceInfo, DeviceKind, ExternalCaps, HandleCaps, HandleType};
pub use region::{Export, ExportLayout, Origin, VulkanRegion};
