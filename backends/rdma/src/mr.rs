//! Registration by route: a `PeerMemory` region becomes a memory registration (MR) of one NIC
//! in the ways core's plan for the pair (region, NIC) gives (`peermem::nic::route_for`, the same
//! plan the NIC ranking ranks by), falling back to the next way when the device refuses.
//!
//! | route                                   | tried, in order                          |
//! |-----------------------------------------|------------------------------------------|
//! | `kernel_import`                         | dma-buf MR, `ibv_reg_mr` on the CPU VA, bounce |
//! | `cpu_mapped`                            | `ibv_reg_mr` on the CPU VA, bounce       |
//! | `bus_addr` / `host_bridge` / `iommu`    | dma-buf MR (dma-buf backings), `ibv_reg_mr` on the BAR mapping, bounce |
//! | `bounce`                                | bounce                                   |
//!
//! A virtual NIC (rxe, siw) is judged as the CPU peer; when the region is a dma-buf its kernel
//! driver is the importer, so the route becomes `kernel_import`.
//!
//! Owns: `Access`, `NicMr`, `Nic::register`. Must not: compute an address itself (the registry
//! and the MR do), or keep an MR alive after its region's registration ends.

use std::sync::Arc;

use peermem::nic::{route_for, NicRoute, RegPlan, RegWay};
use peermem::{Backing, HostRegion, Iova, PeerMemory, Registration, Registry, RouteKind};

use crate::device::Nic;
use crate::error::{Method, RdmaError, Refusal};
use crate::sys;

/// The access a registration grants. Nothing is granted that was not asked for; verbs require
/// local write whenever remote write is granted, so `remote_write` implies it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub local_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

impl Access {
    /// Local reads only (the source of a SEND or RDMA WRITE).
    pub const LOCAL_READ: Access = Access { local_write: false, remote_read: false, remote_write: false };
    /// Local writes (the target of a RECV or RDMA READ).
    pub const LOCAL_WRITE: Access = Access { local_write: true, remote_read: false, remote_write: false };
    /// Peers may RDMA WRITE into it.
    pub const REMOTE_WRITE: Access = Access { local_write: true, remote_read: false, remote_write: true };
    /// Peers may RDMA READ from it.
    pub const REMOTE_READ: Access = Access { local_write: false, remote_read: true, remote_write: false };

    pub fn with_remote_read(mut self) -> Access {
        self.remote_read = true;
        self
    }

    /// The `ibv_access_flags` bits.
    pub fn bits(self) -> u32 {
        let mut b = 0;
        if self.local_write || self.remote_write {
            b |= sys::access::LOCAL_WRITE;
        }
        if self.remote_write {
            b |= sys::access::REMOTE_WRITE;
        }
        if self.remote_read {
            b |= sys::access::REMOTE_READ;
        }
        b
    }
}

/// Where a peer sends its RDMA READ/WRITE: address in the MR's address space, key, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

impl RemoteBuf {
    /// The sub-buffer at `offset` of `len` bytes, if it fits.
    pub fn slice(&self, offset: u64, len: u64) -> Option<RemoteBuf> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| RemoteBuf { addr: self.addr + offset, rkey: self.rkey, len })
    }

    pub fn to_bytes(self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_le_bytes());
        b[12..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 20]) -> RemoteBuf {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        RemoteBuf {
            addr: u64_at(0),
            rkey: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            len: u64_at(12),
        }
    }
}

/// A region registered with a NIC. Dropping it deregisters the MR first, then ends the region's
/// registry registration: from then on its rkey no longer works.
pub struct NicMr {
    mr: Option<sys::Mr>,
    method: Method,
    route: RouteKind,
    reasons: Vec<String>,
    refusals: Vec<Refusal>,
    access: Access,
    bounce: Option<Arc<HostRegion>>,
    region: Arc<dyn PeerMemory>,
    /// The registered range of the region: `len` bytes at `offset`.
    offset: u64,
    len: u64,
    registration: Option<Held>,
    dev: String,
}

/// The region's registry registration: the MR's own, or one shared by the MRs of several NICs
/// (the registry keeps one registration per memory).
enum Held {
    Own(Registration),
    Shared(Arc<Registration>),
}

impl Held {
    fn get(&self) -> &Registration {
        match self {
            Held::Own(r) => r,
            Held::Shared(r) => r,
        }
    }
}

impl std::fmt::Debug for NicMr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NicMr")
            .field("dev", &self.dev)
            .field("method", &self.method)
            .field("route", &self.route)
            .field("rkey", &self.mr.as_ref().map(|m| m.rkey))
            .field("refusals", &self.refusals)
            .finish()
    }
}

impl NicMr {
    fn mr(&self) -> &sys::Mr {
        // Present from construction until drop.
        self.mr.as_ref().expect("MR present until drop")
    }
    pub fn method(&self) -> Method {
        self.method
    }
    /// The registry's route for (region, NIC).
    pub fn route(&self) -> RouteKind {
        self.route
    }
    /// The registry's reasons for the route, then one line per refusal and the method used.
    pub fn reasons(&self) -> &[String] {
        &self.reasons
    }
    /// Ways tried before the one that worked, with the device's errors.
    pub fn refusals(&self) -> &[Refusal] {
        &self.refusals
    }
    pub fn access(&self) -> Access {
        self.access
    }
    pub fn lkey(&self) -> u32 {
        self.mr().lkey
    }
    pub fn rkey(&self) -> u32 {
        self.mr().rkey
    }
    /// Bytes registered (the whole region, or the range given to `register_range`).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Where the registered range starts in the region.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Start of the MR's address space (what work requests name).
    pub fn addr(&self) -> u64 {
        self.mr().addr
    }
    /// What a peer needs to RDMA READ/WRITE this region (meaningful only with remote access).
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf { addr: self.addr(), rkey: self.rkey(), len: self.len() }
    }
    pub fn region(&self) -> &Arc<dyn PeerMemory> {
        &self.region
    }
    pub fn registration(&self) -> &Registration {
        self.registration.as_ref().expect("registration present until drop").get()
    }
    /// The host bounce buffer, for `Method::Bounce`.
    pub fn bounce(&self) -> Option<&Arc<HostRegion>> {
        self.bounce.as_ref()
    }

    /// For a bounce registration: copies what peers wrote into the bounce buffer to the region
    /// (through the region's CPU mapping). `offset` is within the registration. A no-op for
    /// direct registrations.
    pub fn bounce_to_region(&self, offset: u64, len: u64) -> Result<(), RdmaError> {
        match &self.bounce {
            Some(b) => Ok(b.copy_to(offset, &*self.region, self.offset + offset, len)?),
            None => Ok(()),
        }
    }

    /// For a bounce registration: copies the region into the bounce buffer (before peers read
    /// it or it is sent). `offset` is within the registration. A no-op for direct
    /// registrations.
    pub fn region_to_bounce(&self, offset: u64, len: u64) -> Result<(), RdmaError> {
        match &self.bounce {
            Some(b) => Ok(self.region.copy_to(self.offset + offset, &**b, offset, len)?),
            None => Ok(()),
        }
    }

    /// The NIC this region is registered with.
    pub fn nic_name(&self) -> &str {
        &self.dev
    }

    /// Wraps an MR made outside `register` (device memory) with the region's registration.
    pub(crate) fn from_parts(
        nic: &Nic,
        registry: &Registry,
        region: Arc<dyn PeerMemory>,
        mr: sys::Mr,
        method: Method,
        access: Access,
    ) -> Result<NicMr, RdmaError> {
        let registration = registry.register(region.clone())?;
        let route = RouteKind::Bounce(peermem::BounceWhy::OpaqueToPeer);
        let reasons = vec![
            format!("{}: {}", nic.name(), nic.place().describe()),
            format!(
                "device memory of {} registered with {} (rkey {:#x}); other peers bounce",
                nic.name(),
                method,
                mr.rkey
            ),
        ];
        Ok(NicMr {
            mr: Some(mr),
            method,
            route,
            reasons,
            refusals: Vec::new(),
            access,
            bounce: None,
            offset: 0,
            len: region.len(),
            region,
            registration: Some(Held::Own(registration)),
            dev: nic.name().to_string(),
        })
    }
}

impl Drop for NicMr {
    fn drop(&mut self) {
        let rkey = self.mr.as_ref().map(|m| m.rkey);
        drop(self.mr.take());
        drop(self.registration.take());
        tracing::debug!(dev = %self.dev, ?rkey, "deregistered MR and ended the registration");
    }
}

/// The ways to try, in order: what core's plan says the NIC's kernel driver can take directly
/// (it imports a dma-buf, or pins the CPU pages), then always a bounce buffer.
fn methods(plan: &RegPlan) -> Vec<Method> {
    let direct = plan.direct.iter().map(|w| match w {
        RegWay::DmaBufImport => Method::DmaBuf,
        RegWay::PinnedPages => Method::CpuMapping,
    });
    direct.chain([Method::Bounce]).collect()
}

/// `len` bytes at `offset` must be a non-empty range of `region`.
fn check_range(region: &dyn PeerMemory, offset: u64, len: u64) -> Result<(), RdmaError> {
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(RdmaError::Invalid(format!(
            "{len} bytes at {offset:#x} are not a range of the {:#x}-byte region",
            region.len()
        )));
    }
    Ok(())
}

impl Nic {
    /// Registers `region` in `registry` and with this NIC, granting exactly `access`, in the ways
    /// core's plan for the pair gives (`peermem::nic::route_for`). Refusals are kept on the
    /// result; when every way is refused the error lists them all (and nothing stays registered).
    pub fn register(
        &self,
        registry: &Registry,
        region: Arc<dyn PeerMemory>,
        access: Access,
    ) -> Result<NicMr, RdmaError> {
        let len = region.len();
        self.register_range(registry, region, 0, len, access)
    }

    /// As `register`, for `len` bytes at `offset` of `region` only (a range cache registers the
    /// ranges in use of a large buffer). The MR's address space starts at the range.
    pub fn register_range(
        &self,
        registry: &Registry,
        region: Arc<dyn PeerMemory>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<NicMr, RdmaError> {
        check_range(&*region, offset, len)?;
        let registration = Held::Own(registry.register(region.clone())?);
        self.register_held(registry, registration, region, offset, len, access)
    }

    /// As `register_range`, for a region already registered in `registry` as `registration`
    /// (shared by the MRs of every NIC that registers it).
    pub fn register_shared(
        &self,
        registry: &Registry,
        registration: Arc<Registration>,
        region: Arc<dyn PeerMemory>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<NicMr, RdmaError> {
        check_range(&*region, offset, len)?;
        self.register_held(registry, Held::Shared(registration), region, offset, len, access)
    }

    fn register_held(
        &self,
        registry: &Registry,
        registration: Held,
        region: Arc<dyn PeerMemory>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<NicMr, RdmaError> {
        let NicRoute { plan, reasons: mut route_reasons, .. } =
            route_for(registry, &self.dev.place, registration.get())?;
        let kind = plan.route;
        let mut reasons = vec![format!("{}: {}", self.name(), self.dev.place.describe())];
        reasons.append(&mut route_reasons);
        if plan.bounces() {
            reasons.push(plan.describe());
        }
        let mut refusals = Vec::new();
        let bits = access.bits();
        for method in methods(&plan) {
            let attempt = match method {
                Method::DmaBuf => match region.backing() {
                    Backing::DmaBuf(fd) => {
                        let iova = region.cpu_range().map(|r| Iova::new(r.start().raw() + offset)).unwrap_or_default();
                        self.pd
                            .reg_dmabuf_mr(fd, offset, len as usize, iova, bits)
                            .map(|mr| (mr, None))
                            .map_err(self.verbs_err("ibv_reg_dmabuf_mr"))
                    }
                    _ => continue,
                },
                Method::CpuMapping => self
                    .pd
                    .reg_mr(&region, offset, len, bits)
                    .map(|mr| (mr, None))
                    .map_err(self.verbs_err("ibv_reg_mr")),
                Method::Bounce => HostRegion::new(len).map_err(RdmaError::from).and_then(|b| {
                    let b = Arc::new(b);
                    self.pd
                        .reg_mr(&(b.clone() as Arc<dyn PeerMemory>), 0, len, bits)
                        .map(|mr| (mr, Some(b)))
                        .map_err(self.verbs_err("ibv_reg_mr (bounce)"))
                }),
                Method::DeviceMemory => continue,
            };
            match attempt {
                Ok((mr, bounce)) => {
                    for r in &refusals {
                        reasons.push(format!("refused: {r}"));
                    }
                    reasons.push(format!(
                        "registered with {} (rkey {:#x}, access {:#x})",
                        method.name(),
                        mr.rkey,
                        bits
                    ));
                    tracing::debug!(dev = %self.name(), route = kind.name(), %method, refused = refusals.len(), "registered region");
                    return Ok(NicMr {
                        mr: Some(mr),
                        method,
                        route: kind,
                        reasons,
                        refusals,
                        access,
                        bounce,
                        region,
                        offset,
                        len,
                        registration: Some(registration),
                        dev: self.name().to_string(),
                    });
                }
                Err(error) => {
                    tracing::debug!(dev = %self.name(), %method, "refused: {error}");
                    refusals.push(Refusal { method, error });
                }
            }
        }
        Err(RdmaError::AllRefused { dev: self.name().to_string(), refusals })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_bits_are_minimal_and_remote_write_implies_local_write() {
        assert_eq!(Access::LOCAL_READ.bits(), 0);
        assert_eq!(Access::LOCAL_WRITE.bits(), sys::access::LOCAL_WRITE);
        assert_eq!(Access::REMOTE_WRITE.bits(), sys::access::LOCAL_WRITE | sys::access::REMOTE_WRITE);
        assert_eq!(Access::REMOTE_READ.bits(), sys::access::REMOTE_READ);
        assert_eq!(Access::default().bits() & sys::access::REMOTE_WRITE, 0);
    }

    #[test]
    fn plans_follow_the_route_and_always_end_in_bounce() {
        use peermem::nic::{registration, NicPlace};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qemu-switch");
        let reg = Registry::new(Arc::new(peermem::Topology::discover(root).unwrap()));
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let bar = peermem::BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 };
        let bar = reg.register(Arc::new(bar)).unwrap();
        let va = host.cpu_range().unwrap().start();
        let nic = NicPlace::Pci("0000:04:00.0".parse().unwrap());
        let plan = |kind: RouteKind, e: &peermem::Entry| methods(&registration(&nic, &kind, e));
        assert_eq!(plan(RouteKind::KernelImport, &host), [Method::DmaBuf, Method::CpuMapping, Method::Bounce]);
        assert_eq!(plan(RouteKind::CpuMapped(va), &host), [Method::CpuMapping, Method::Bounce]);
        // A raw BAR has no pages for the NIC's kernel driver to pin, and is no dma-buf.
        assert_eq!(plan(RouteKind::HostBridge(peermem::CpuPhys::new(0)), &bar), [Method::Bounce]);
        assert_eq!(plan(RouteKind::Bounce(peermem::BounceWhy::NotSupported), &host), [Method::Bounce]);
    }

    #[test]
    fn remote_buf_round_trips_and_slices_check_bounds() {
        let r = RemoteBuf { addr: 0x1234_5678_9abc, rkey: 0xdead, len: 4096 };
        assert_eq!(RemoteBuf::from_bytes(r.to_bytes()), r);
        assert_eq!(r.slice(4000, 96).unwrap().addr, r.addr + 4000);
        assert!(r.slice(4000, 97).is_none());
        assert!(r.slice(u64::MAX, 2).is_none());
    }
}
