//! RDMA backend: peer-memory regions as verbs memory registrations, NIC device memory
//! as a region, and an RC data path.
//!
//! - [`device`]: an opened [`Nic`]. Where each RDMA device sits ([`devices`], [`NicPlace`]) and
//!   the ranking of NICs for a region ([`nearest_nic`]) are sysfs and registry knowledge: they
//!   live in core's `peermem::nic` (no verbs library needed) and are re-exported here.
//! - [`mr`]: registration by route: [`Nic::register`] turns any `PeerMemory` into an MR the way
//!   core's `peermem::nic::route_for` plans it (dma-buf MR, `ibv_reg_mr` on the CPU mapping, or
//!   a bounce buffer), falling back on typed refusals; the MR ends with the region's
//!   registration.
//! - [`dm`]: on-NIC device memory (`ibv_alloc_dm`) as a region.
//! - [`cm`]: connection management with rdma_cm: resolve, listen/accept with an offered
//!   buffer, connect, reject, disconnect events as typed errors.
//! - [`conn`]: RC queue pairs (connected by rdma_cm, or over a TCP exchange), RDMA
//!   WRITE/READ/SEND-RECV, bounded completion waits, decoded completion errors.
//! - `sys`: the only module with raw verbs (`rdma-mummy-sys`, which dlopens libibverbs).

pub mod cm;
pub mod conn;
pub mod device;
pub mod dm;
pub mod error;
pub mod mr;
#[allow(unsafe_code)]
pub mod sys;
pub mod udmabuf;

pub use cm::CmListener;
pub use conn::{ConnectOpts, Connection, Endpoint, Local};
pub use device::Nic;
pub use dm::DeviceMemory;
pub use error::{Method, RdmaError, Refusal, WcError};
pub use mr::{Access, NicMr, RemoteBuf};
pub use peermem::nic::{
    device_at, devices, nearest_nic, rank_nics, NicPlace, NicRank, RdmaDevice, RegPlan, RegWay, Tier,
};
pub use udmabuf::UdmabufRegion;
