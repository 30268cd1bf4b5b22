//! PCI: function addresses, config-space decoding and the topology of a sysroot.

pub mod bar;
pub mod bdf;
pub mod config;
pub mod select;
pub mod topology;

pub use bar::{BarError, BarMapping, MapBarError};
pub use bdf::Bdf;
pub use select::{EndpointKind, Labels, Selection};
pub use topology::{Bar, BarKind, DevIdx, PciDevice, Topology, TopologyError};
