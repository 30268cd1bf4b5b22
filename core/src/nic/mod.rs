//! RDMA NICs as the topology sees them: which PCI function each verbs device sits on, how a NIC's
//! kernel driver can take a region into a memory registration, and which NIC should move a
//! region's data. All of it is sysfs and registry knowledge, so it needs no verbs library: the
//! `peermem-rdma` backend opens the devices and registers memory on top of it.
//!
//! - [`device`]: `sys/class/infiniband/<dev>` mapped to its PCI function (or a software device),
//!   read through the confined sysroot.
//! - [`register`]: how a NIC registers a region for a route (dma-buf import, pinned CPU pages,
//!   or a bounce buffer, with the reasons), over the mover's `reachable`.
//! - [`rank`]: every NIC ranked for a region by what that registration can do and where the NIC
//!   sits (direct below a common switch, host bridge, NUMA node, bandwidth).
//! - [`pick`]: the ranking cut into what an engine's device list needs (UCX, NIXL, Mooncake):
//!   the best NICs with ties together, the others that reach the memory, those that cannot.
//!
//! Owns: `NicError` and the four parts above. Must not: open a device, issue a verbs call, or
//! judge a PCI pair itself (the registry's verdict does).

pub mod device;
pub mod pick;
pub mod rank;
pub mod register;

pub use device::{device_at, devices, devices_in, facts, NicPlace, RdmaDevice, RdmaFacts, RdmaPort};
pub use pick::{cuda_order, numa_nodes, pick, Memory, Pick};
pub use rank::{nearest_nic, rank_for_export, rank_for_node, rank_nics, NicRank, Tier};
pub use register::{registration, route_for, NicRoute, RegPlan, RegWay};

use std::path::PathBuf;

use crate::pci::Bdf;
use crate::region::RegionError;
use crate::registry::{RegistryError, ResolveError};
use crate::sysroot::SysrootError;

/// Why NIC discovery or ranking gave no answer. Each names the device or function concerned.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("bad RDMA device name {0:?}")]
    BadName(String),
    #[error("no RDMA device{}", .wanted.as_ref().map(|w| format!(" named {w}")).unwrap_or_default())]
    NoDevice { wanted: Option<String> },
    /// A NIC's PCI function that the topology lacks: a sysroot that is not one machine.
    #[error("RDMA device {name} sits on {bdf}, which the topology of {root} lacks")]
    NotInTopology { name: String, bdf: Bdf, root: PathBuf },
    #[error("the region's provider {0} is not in the topology")]
    ProviderUnknown(Bdf),
    #[error(transparent)]
    Sysroot(#[from] SysrootError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The page that stands for a NUMA node's memory in a ranking could not be allocated.
    #[error("host memory for a NUMA node's ranking: {0}")]
    Region(#[source] RegionError),
}
