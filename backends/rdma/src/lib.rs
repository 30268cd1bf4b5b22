//! RDMA backend: peer-memory regions as verbs memory registrations, NIC device memory
//! as a region, and an RC data path.
//!
//! - [`device`]: RDMA devices as peers (each mapped to its PCI function through sysfs; rxe and
//!   siw are virtual), and an opened [`Nic`].
//! - [`mr`]: registration by route: [`Nic::register`] turns any `PeerMemory` into an MR the way
//!   the registry's route says (dma-buf MR, `ibv_reg_mr` on the CPU mapping, or a bounce
//!   buffer), falling back on typed refusals; the MR ends with the region's registration.
//! - [`nearest`]: [`nearest_nic`] ranks the RDMA devices for a region by the registry's route
//!   (bus address, host bridge, NUMA node, bandwidth), with reasons.
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
pub mod nearest;
#[allow(unsafe_code)]
pub mod sys;
pub mod udmabuf;

pub use cm::CmListener;
pub use conn::{ConnectOpts, Connection, Endpoint, Local};
pub use device::{devices, Nic, NicPlace, RdmaDevice};
pub use dm::DeviceMemory;
pub use error::{Method, RdmaError, Refusal, WcError};
pub use mr::{Access, NicMr, RemoteBuf};
pub use nearest::{nearest_nic, rank_nics, NicRank, Tier};
pub use udmabuf::UdmabufRegion;
