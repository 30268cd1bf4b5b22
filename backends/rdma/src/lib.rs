//! RDMA backend: peer-memory regions as verbs memory registrations, NIC device memory
//! as a region, and an RC data path.
//!
//! Modules:
//! - [`cm`]: rdma_cm connections: resolve, listen/accept with an offered buffer, reject.
//! - [`conn`]: RC queue pairs, RDMA WRITE/READ/SEND-RECV, bounded completion waits.
//! - [`device`]: an opened [`Nic`]. Where each RDMA device sits ([`devices`], [`NicPlace`]) and
//!   the ranking of NICs for a region ([`nearest_nic`]) are sysfs and registry knowledge: they
//!   live in core's `peermem::nic` (no verbs library needed) and are re-exported here.
//! - [`dm`]: on-NIC device memory (`ibv_alloc_dm`) as a region.
//! - [`error`]: the backend's errors ([`RdmaError`], [`WcError`], [`Refusal`], [`Method`]).
//! - [`event`]: work completions ([`Wc`]) and device asynchronous events ([`AsyncEvent`]).
//! - [`mr`]: registration by route ([`Nic::register`], as core's `peermem::nic::route_for` plans
//!   it), ended with the region's registration.
//! - `offer`: the private data an rdma_cm accept or refusal carries (private).
//! - `sys`: raw verbs and rdma_cm (`rdma-mummy-sys`, dlopened), every `unsafe` (private).
//! - [`udmabuf`]: a dma-buf over host pages (`/dev/udmabuf`) as a CPU-mapped region.
//!
//! [`Nic::register`] turns any `PeerMemory` into an MR the way core plans it (dma-buf MR,
//! `ibv_reg_mr` on the CPU mapping, or a bounce buffer), falling back on typed refusals.
//! [`nearest_nic`] ranks by what registration can do, then host bridge, NUMA node, bandwidth.
//! Connections come from rdma_cm or a TCP exchange; a peer's disconnect and failed completions
//! are typed errors.

pub mod cm;
pub mod conn;
pub mod device;
pub mod dm;
pub mod error;
pub mod event;
pub mod mr;
mod offer;
#[allow(unsafe_code)]
mod sys;
pub mod udmabuf;

pub use cm::CmListener;
pub use conn::{ConnectOpts, Connection, Endpoint, Local};
pub use device::Nic;
pub use dm::DeviceMemory;
pub use error::{Method, RdmaError, Refusal, WcError};
pub use event::{AsyncEvent, Wc};
pub use mr::{Access, NicMr, RemoteBuf};
pub use peermem::nic::{
    device_at, devices, nearest_nic, rank_nics, NicPlace, NicRank, RdmaDevice, RegPlan, RegWay, Tier,
};
pub use udmabuf::UdmabufRegion;
