//! peermem NVMe backend.
//!
//! - [`blockdev`]: [`BlockDevice`], O_DIRECT I/O between a namespace and a CPU-mapped region.
//! - [`cmb`]: the controller memory buffer as a `PeerMemory` region of its BAR.
//! - [`driver`]: a polled userspace NVMe driver whose PRP entries come only from registry routes.
//! - `mapcache`: which DMA mappings stay between transfers (a bounded cache whose entries end
//!   with their registration) and a free-range IOVA allocator; pure data (private).
//! - [`p2pmem`]: [`P2pmemRegion`], pages of a provider's kernel P2PDMA pool (`p2pmem/allocate`).
//! - [`regs`]: NVMe register decoding (CAP, VS, CC, CSTS, AQA/ASQ/ACQ, CMB*), typed errors.
//! - `signals`: SIGINT/SIGTERM while a function is bound to vfio-pci (private).
//! - `sys`: the raw layer (MMIO, VFIO ioctls through vfio-bindings and rustix, mlock; private).
//! - [`vfio`]: VFIO plumbing (type1 or no-IOMMU): binding, container, BARs, DMA mappings.
//!
//! The kernel P2PDMA path ([`p2pmem`], [`blockdev`]): the kernel answers EREMOTEIO exactly when
//! peermem's verdict says `not_supported` (the guest tests check every pair). The VFIO path
//! ([`vfio`], [`driver`]) works with type1 or no-IOMMU containers. On a signal, waits end early,
//! owners unwind and give the function back to its driver, then the process ends.

pub mod blockdev;
pub mod cmb;
mod mapcache;
pub mod p2pmem;
pub mod regs;
mod signals;
#[allow(unsafe_code)]
mod sys;

pub use blockdev::{BlockDevice, DirectIoError};
pub use cmb::{CmbError, CmbRegion};
pub use p2pmem::{P2pmemError, P2pmemRegion};
pub use regs::{RegError, Registers};
pub use sys::{MappedMmio, Mmio};
pub mod driver;
pub mod vfio;

pub use driver::{Controller, Dir, Io, NvmeError};
pub use vfio::{Binding, IommuMode, MapKey, MapStats, Owner, Vfio, VfioError};
