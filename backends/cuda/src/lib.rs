//! CUDA backend of peermem: CUDA device memory as peer memory, on the driver API through
//! [`cudarc`] (libcuda is dlopened at run time: the build needs no CUDA toolkit, and a machine
//! without the NVIDIA driver gets [`CudaError::NoDriver`], never a panic).
//!
//! Modules:
//! - `info`: the driver and a device as plain data ([`DeviceInfo`], [`DriverVersion`],
//!   [`KernelModule`]), the device address space [`DevicePtr`], why a dma-buf is refused
//!   ([`DmaBufRefusal`]).
//! - `device`: [`Cuda`] (the driver: version, devices, `open`) and the opened [`Device`], which
//!   allocates, adopts foreign memory, pins host memory and copies with bounded waits.
//! - `region`: [`CudaRegion`], device memory as a `PeerMemory`, and [`PinnedHost`].
//! - [`gds`]: GPUDirect Storage through cuFile ([`Gds`], [`GdsFile`]): where libcufile is looked
//!   for, its driver opened once, files registered, reads from a file straight into a region.
//! - `error`: [`CudaError`], the backend's one error type (driver and cuFile errors by their
//!   own names).
//! - `sys`: the only `unsafe`: driver calls, memory and copy lifetimes, and [`Foreign`], whose
//!   `unsafe` constructor is where a caller vouches for memory it hands in; `sys::cufile`
//!   (libcufile) and `sys::external` (opaque-fd imports, e.g. Vulkan memory:
//!   [`Device::import_opaque_fd`] with an [`OpaqueFd`]).
//!
//! A region's provider is the GPU's PCI function (`cuDeviceGetPCIBusId`); its backing is a
//! dma-buf where the driver exports one (the open kernel module, CUDA 11.7 or newer), which a
//! NIC registers through `ibv_reg_dmabuf_mr` when the registry routes a kernel import; otherwise
//! the memory is driver-private and reached through CUDA copies.
//!
//! Lifetimes: a region and a pinned buffer keep their device's context alive; a copy keeps both
//! sides alive until it completes, also after its wait timed out; a foreign region keeps the
//! owner it was given (a DLPack capsule, a tensor), so any drop order is safe.
//!
//! ```no_run
//! use std::sync::Arc;
//! use peermem::{HostRegion, PeerMemory};
//! use peermem_cuda::Cuda;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gpu = Cuda::open(0)?;
//! let vram = gpu.allocate(1 << 20)?;
//! println!("{:?}: {:?}", vram.provider(), vram.notes());
//! let host = gpu.pin(Arc::new(HostRegion::new(1 << 20)?))?;
//! host.region().write_at(0, b"peer memory")?;
//! gpu.copy_to_device(&host, 0, &vram, 0, 1 << 20)?;
//! let mut back = [0u8; 11];
//! gpu.read(&vram, 0, &mut back)?;
//! assert_eq!(&back, b"peer memory");
//! # Ok(()) }
//! ```

mod device;
mod error;
pub mod gds;
mod info;
mod region;
#[allow(unsafe_code)]
mod sys;

pub use device::{Alloc, Cuda, Device, DEFAULT_COPY_TIMEOUT};
pub use error::{CudaError, CufileCall, DriverCall};
pub use gds::{Gds, GdsFile, GdsInfo};
pub use info::{parse_pci_bus_id, DeviceInfo, DevicePtr, DmaBufRefusal, DriverVersion, KernelModule};
pub use region::{CudaRegion, OpaqueFd, Origin, PinnedHost};
pub use sys::Foreign;
