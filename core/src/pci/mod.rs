//! PCI: function addresses, config-space decoding and the topology of a sysroot.
//!
//! - [`bdf`]: function addresses (`Bdf`).
//! - [`config`]: config-space decoding (BAR registers, PCIe and ACS capabilities).
//! - [`topology`]: the functions of a sysroot, their upstream bridges, BARs and class devices.
//! - [`select`]: endpoint kinds, labels (`GPU0`, `NIC0`, ...) and selections of them.
//! - [`bar`]: the checks on a BAR range and the CPU mapping of `resourceN` (the region over it
//!   is `region::BarMapping`).
//!
//! Must not: know what a region is (the region layer wraps what `bar` maps).

pub mod bar;
pub mod bdf;
pub mod config;
pub mod select;
pub mod topology;

pub use bar::{BarError, MapBarError};
pub use bdf::Bdf;
pub use select::{EndpointKind, Labels, Selection};
pub use topology::{Bar, BarKind, DevIdx, PciDevice, Topology, TopologyError};
