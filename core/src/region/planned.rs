//! A device's memory as its driver exports it to peers (a dma-buf), described without the fd:
//! the region a plan registers when it asks how a peer would reach a GPU's memory on a machine
//! it only reads (a capture, or a live system where no memory is allocated for the question).
//!
//! Owns: `PlannedDmaBuf`. Must not: pretend to be importable (it has no fd and no CPU mapping,
//! so every transfer into it is refused) or compute a route (the registry resolves it as any
//! dma-buf of the device).

use super::{Backing, PeerMemory, Provider};
use crate::pci::Bdf;

/// `len` bytes of `bdf`'s memory as its driver would export them as a dma-buf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedDmaBuf {
    pub bdf: Bdf,
    pub len: u64,
}

impl PeerMemory for PlannedDmaBuf {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::PlannedDmaBuf { bdf: self.bdf }
    }
}
