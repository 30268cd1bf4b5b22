//! The transfer engine across hosts, its pure-logic layer: which (local NIC, remote NIC) rails
//! carry a request and in what shares (`rails`), a registration range cache (`cache`), and the
//! metadata a host sends its peer (`metadata`). No verbs call is made here: the RDMA layer builds
//! on these.
//!
//! Owns: the three modules below. Must not: decide whether a NIC reaches a memory directly (the
//! core's `peermem::nic` ranking, over the mover's `reachable`, does), read the clock (time is
//! passed in), or touch a device.

pub mod cache;
pub mod metadata;
pub mod rails;
pub mod span;
