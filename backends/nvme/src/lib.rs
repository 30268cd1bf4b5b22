//! peermem NVMe backend.
//!
//! - [`regs`]: NVMe register decoding (CAP, VS, CC, CSTS, AQA/ASQ/ACQ, CMBLOC, CMBSZ, CMBMSC,
//!   CMBSTS) from a byte image or a mapped BAR0, with typed errors for garbage.
//! - [`cmb`]: the controller memory buffer, found from the registers, as a `PeerMemory` region of
//!   its BAR that the registry resolves like any other.
//! - [`p2pmem`] and [`blockdev`]: the kernel P2PDMA path. [`P2pmemRegion`] allocates pages of a
//!   provider's pool through sysfs `p2pmem/allocate`; [`BlockDevice`] does O_DIRECT I/O between a
//!   namespace and any CPU-mapped region, and the kernel answers EREMOTEIO exactly when peermem's
//!   verdict says `not_supported` (the guest tests check every pair).
//! - [`vfio`] and [`driver`]: a polled userspace NVMe driver over VFIO (type1 or no-IOMMU) whose
//!   PRP entries come only from registry routes.
//! - `mapcache`: which of the driver's DMA mappings stay between transfers (a bounded cache
//!   whose entries end with their registration) and a free-range IOVA allocator; pure data.
//! - `signals`: SIGINT/SIGTERM while a function is bound to vfio-pci: waits end early, owners
//!   unwind and give the function back, then the process ends.
//! - `sys`: the crate's raw layer (MMIO, VFIO ioctls through vfio-bindings and rustix, mlock).

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
pub use sys::{pread_into, MappedMmio, Mmio};
pub mod driver;
pub mod vfio;

pub use driver::{Controller, Dir, Io, NvmeError};
pub use vfio::{Binding, IommuMode, MapKey, MapStats, Owner, Vfio, VfioError};
