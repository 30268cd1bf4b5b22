//! peermem: one userspace translation layer for PCIe peer-to-peer memory.
//!
//! - [`addr`]: address spaces as types (`CpuPhys`, `BusAddr`, `Iova`, `VirtAddr`), converted here.
//! - `archive`: capture archives (a sysroot in one `.tar[.gz|.bz2|.xz]` file; cargo feature
//!   `archive`, which the CLI and the Python package enable).
//! - [`capture`]: copies the files peermem reads from a live root into a replayable sysroot.
//! - `harness`: fuzz harnesses, one per parser (hidden; cargo feature `harness`, for
//!   `peermem-fuzz`).
//! - [`hotplug`]: surprise removal and return of PCI functions, from the kernel's uevents.
//! - [`mem`]: CPU memory: shared mappings, mapped-byte spans, sealed memfds, pagemap lookups.
//! - [`mover`]: the one move planner (direct or bounce, with reasons) and the route probe.
//! - [`nccl`]: the topology as NCCL's topology XML.
//! - [`nic`]: RDMA devices as the topology sees them, how a NIC registers a region, and which
//!   NIC should move it (no verbs library needed: the rdma backend builds on it).
//! - [`pci`]: the PCI topology of a sysroot (live `/` or a capture), BAR checks and mappings.
//! - [`pciids`]: device names from `pci.ids`.
//! - [`platform`]: kernel release, CPU, virtualization signals, device-tree PCI windows.
//! - [`region`]: the `PeerMemory` trait and the core's regions (host pages, PCI BAR ranges).
//! - [`registry`]: the lock-free registry that looks regions up by address and resolves routes.
//! - [`route`]: what a peer must program to reach a region, and why.
//! - `spanmap`: the registry's direct-indexed span tables (private).
//! - [`storage`]: the PCI function behind a file or block device.
//! - `sys`: the system calls under `mem` and `hotplug`, with their `unsafe` (private).
//! - [`sysroot`]: confined, size-capped reads below a sysroot.
//! - [`verdict`]: the kernel-exact P2P verdict for a (provider, client) pair, then explained.

pub mod addr;
#[cfg(feature = "archive")]
pub mod archive;
pub mod capture;
#[cfg(feature = "harness")]
#[doc(hidden)]
pub mod harness;
pub mod hotplug;
pub mod mem;
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
mod sys;
pub mod sysroot;
pub mod verdict;

pub use addr::{AddrRange, Address, BarWindow, BusAddr, BusOffset, CpuPhys, DmaAddr, Iova, VirtAddr};
pub use pci::{BarError, Bdf, DevIdx, MapBarError, Topology, TopologyError};
pub use region::{
    AccessError, Backing, BarMapping, BarRegion, HostRegion, HostSlice, PeerMemory, PlannedDmaBuf, Provider,
    RegionError, Side,
};
pub use registry::{Entry, Hit, Reader, RegionId, Registration, Registry, RegistryError, ResolveError, Snapshot};
pub use route::{BounceWhy, Peer, Route, RouteKind, VerdictRef};
pub use verdict::{MapType, PairFacts, PairMatrix, PathLabel, Verdict};
