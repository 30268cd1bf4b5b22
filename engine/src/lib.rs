//! The transfer engine across hosts. Its pure-logic layer: which (local NIC, remote NIC) rails
//! carry a request and in what shares (`rails`), a registration range cache (`cache`), and the
//! metadata a host sends its peer (`metadata`). On it, the engine itself (`engine`): verbs
//! registrations through the range cache (`verbs`), connections over
//! rdma_cm, batches posted across the rails, failover, notifications.
//!
//! Owns: the modules below. Must not: decide whether a NIC reaches a memory directly (the
//! core's `peermem::nic` ranking, over the mover's `reachable`, does).

pub mod cache;
pub mod engine;
pub mod metadata;
pub mod rails;
pub mod span;
pub mod verbs;

pub use engine::{
    Engine, EngineError, EngineOptions, Notification, Op, PeerId, RailReport, Report, Request, Ticket, NOTIFY_MAX,
};
pub use span::RegionId;
