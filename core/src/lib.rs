//! peermem: one userspace translation layer for PCIe peer-to-peer memory.
//!
//! - [`addr`]: address spaces as types (`CpuPhys`, `BusAddr`, `Iova`, `VirtAddr`) and the one
//!   place that converts between them.
//! - [`pci`]: the topology of a sysroot (live `/` or a capture).
//! - [`verdict`]: the kernel-exact P2P verdict for a (provider, client) pair, then explained.
//! - [`pciids`], [`storage`], [`nccl`]: device names from `pci.ids`, the PCI function behind a
//!   file, and NCCL's topology XML; `archive` (cargo feature `archive`): capture archives.
//! - [`region`], [`registry`], [`route`]: peer-memory regions, the lock-free registry that looks
//!   them up by address and resolves what a peer must program to reach them.
//! - [`nic`]: RDMA devices as the topology sees them, how a NIC registers a region, and which NIC
//!   should move it (no verbs library needed: the rdma backend builds on it).

pub mod addr;
#[cfg(feature = "archive")]
pub mod archive;
pub mod capture;
#[cfg(feature = "harness")]
#[doc(hidden)]
pub mod harness;
pub mod hotplug;
pub mod mover;
pub mod nccl;
pub mod nic;
pub mod pci;
pub mod pciids;
pub mod platform;
pub mod region;
pub mod registry;
pub mod route;
mod spanmap;
pub mod storage;
#[allow(unsafe_code)]
pub mod sys;
pub mod sysroot;
pub mod verdict;

pub use addr::{AddrRange, Address, BarWindow, BusAddr, BusOffset, CpuPhys, DmaAddr, Iova, VirtAddr};
pub use pci::{BarError, BarMapping, Bdf, DevIdx, MapBarError, Topology, TopologyError};
pub use region::{AccessError, Backing, BarRegion, HostRegion, HostSlice, PeerMemory, Provider, RegionError, Side};
pub use registry::{Entry, Hit, Reader, RegionId, Registration, Registry, RegistryError, ResolveError, Snapshot};
pub use route::{BounceWhy, Peer, Route, RouteKind, VerdictRef};
pub use verdict::{MapType, PairFacts, PairMatrix, PathLabel, Verdict};
