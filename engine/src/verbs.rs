//! The range cache's registrar for one NIC: a span of a registered region becomes a verbs memory
//! registration the way the RDMA backend plans it for the pair (dma-buf MR where the route is a
//! kernel import, `ibv_reg_mr` on the CPU mapping where pages can be pinned, a registered bounce
//! where neither), with its reasons.
//!
//! Owns: `VerbsRegistrar`, `Regions` (the regions a registrar may be asked for). Must not: choose
//! how a NIC registers memory (`peermem_rdma::Nic::register_range`, over the core's plan, does).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use peermem::{PeerMemory, Registration, Registry};
use peermem_rdma::{Access, Nic, NicMr, RdmaError};

use crate::cache::Registrar;
use crate::span::{RegionId, Span};

/// The regions registered with the engine, by id, with their one registry registration, shared
/// by every NIC's registrar.
pub type Regions = Arc<Mutex<HashMap<RegionId, (Arc<dyn PeerMemory>, Arc<Registration>)>>>;

/// What every engine registration grants: peers read and write it, local work requests write it.
pub const ACCESS: Access = Access { local_write: true, remote_read: true, remote_write: true };

/// Registers spans of the engine's regions with one NIC.
pub struct VerbsRegistrar {
    nic: Arc<Nic>,
    registry: Registry,
    regions: Regions,
}

impl VerbsRegistrar {
    pub fn new(nic: Arc<Nic>, registry: Registry, regions: Regions) -> VerbsRegistrar {
        VerbsRegistrar { nic, registry, regions }
    }

    pub fn nic(&self) -> &Arc<Nic> {
        &self.nic
    }
}

impl Registrar for VerbsRegistrar {
    type Key = Arc<NicMr>;
    type Error = RdmaError;

    fn register(&mut self, span: Span) -> Result<Arc<NicMr>, RdmaError> {
        let (region, registration) = self
            .regions
            .lock()
            .map_err(|_| RdmaError::Invalid("the engine's region table was poisoned".into()))?
            .get(&span.region())
            .cloned()
            .ok_or_else(|| RdmaError::Invalid(format!("{} is not registered with the engine", span.region())))?;
        let mr = self.nic.register_shared(&self.registry, registration, region, span.start(), span.len(), ACCESS)?;
        Ok(Arc::new(mr))
    }

    fn deregister(&mut self, key: Arc<NicMr>) {
        // The MR is deregistered when the last holder drops it.
        drop(key);
    }
}
