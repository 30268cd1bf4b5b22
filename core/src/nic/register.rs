//! How a NIC registers a region: the registry's route for the pair, taken the way a NIC's kernel
//! driver takes memory (it imports a dma-buf, or pins the CPU pages behind a mapping), and what
//! is left when it can do neither (a host bounce buffer). `Nic::register` in the rdma backend
//! tries exactly these ways, and the ranking ranks by them, so both say the same thing.
//!
//! Owns: `RegWay`, `RegPlan`, `registration`, `NicRoute`, `route_for`. Must not: decide
//! directness itself (the mover's `reachable` does) or issue a verbs call.

use super::device::NicPlace;
use super::NicError;
use crate::mover::{reachable, Reach};
use crate::region::Backing;
use crate::registry::{Entry, Registry, ResolveError};
use crate::route::{BounceWhy, Peer, Route, RouteKind};

/// A way a NIC's kernel driver takes a region's memory directly, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegWay {
    /// It imports the region's dma-buf (`ibv_reg_dmabuf_mr`).
    DmaBufImport,
    /// It pins the pages behind the region's CPU mapping (`ibv_reg_mr`).
    PinnedPages,
}

impl RegWay {
    pub const ALL: [RegWay; 2] = [RegWay::DmaBufImport, RegWay::PinnedPages];

    pub fn name(self) -> &'static str {
        match self {
            RegWay::DmaBufImport => "dma_buf_import",
            RegWay::PinnedPages => "pinned_pages",
        }
    }

    /// How an initiator registering this way reaches memory, in the mover's terms.
    pub fn reach(self) -> Reach {
        match self {
            RegWay::DmaBufImport => Reach::DmaBufImport,
            RegWay::PinnedPages => Reach::KernelPages,
        }
    }
}

/// How a NIC registers a region for one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegPlan {
    /// The route the registration rests on (for a software NIC importing a dma-buf,
    /// `kernel_import` rather than the CPU's route).
    pub route: RouteKind,
    /// The ways that take the memory directly, best first; none means a host bounce buffer.
    pub direct: Vec<RegWay>,
    /// Each way that cannot, and why.
    pub refused: Vec<(RegWay, String)>,
    /// What the plan adds to the route's own reasons (the software NIC's import).
    pub notes: Vec<String>,
}

impl RegPlan {
    /// True when no way takes the memory directly: the NIC registers a bounce buffer.
    pub fn bounces(&self) -> bool {
        self.direct.is_empty()
    }

    /// The best way's name, or `bounce`.
    pub fn name(&self) -> &'static str {
        self.direct.first().map_or("bounce", |w| w.name())
    }

    /// One line: how the NIC registers the region, and why not directly when it bounces.
    pub fn describe(&self) -> String {
        if let Some(w) = self.direct.first() {
            return format!("registration: {} (route {})", w.name(), self.route.name());
        }
        let why: Vec<String> = self.refused.iter().map(|(w, why)| format!("{}: {why}", w.name())).collect();
        format!("registration bounces through host memory (route {}): {}", self.route.name(), why.join("; "))
    }
}

/// How a NIC at `place` registers `entry`, given the registry's `route` kind for the pair (for a
/// software NIC, the CPU's route). Each way is asked of `reachable`; the bounce buffer always
/// remains.
pub fn registration(place: &NicPlace, route: &RouteKind, entry: &Entry) -> RegPlan {
    let mut notes = Vec::new();
    let is_dma_buf = matches!(entry.region().backing(), Backing::DmaBuf(_) | Backing::PlannedDmaBuf { .. });
    let route = match (place, route) {
        // A software NIC's kernel driver is itself the dma-buf importer.
        (NicPlace::Virtual { .. }, RouteKind::CpuMapped(_) | RouteKind::Bounce(_)) if is_dma_buf => {
            notes.push(
                "the NIC is virtual: its kernel driver is the dma-buf importer, so the route is kernel_import".into(),
            );
            RouteKind::KernelImport
        }
        _ => *route,
    };
    let (mut direct, mut refused) = (Vec::new(), Vec::new());
    for way in RegWay::ALL {
        match reachable(&route, entry, way.reach()) {
            Ok(()) => direct.push(way),
            Err(why) => refused.push((way, why)),
        }
    }
    RegPlan { route, direct, refused, notes }
}

/// The registry's answer for a NIC and a region, and how the NIC registers it.
#[derive(Debug, Clone)]
pub struct NicRoute<'r> {
    /// The registry's route for the pair; `None` for a software NIC and a region the CPU cannot
    /// reach (it registers a bounce buffer).
    pub route: Option<Route<'r>>,
    pub plan: RegPlan,
    /// The route's reasons, then the plan's notes.
    pub reasons: Vec<String>,
}

/// Resolves `entry` for a NIC at `place` (a software NIC is the CPU peer) and plans its
/// registration. A PCI NIC missing from the registry's topology is an error.
pub fn route_for<'r>(registry: &'r Registry, place: &NicPlace, entry: &Entry) -> Result<NicRoute<'r>, NicError> {
    let peer = match place {
        NicPlace::Pci(b) => registry.peer(*b)?,
        NicPlace::Virtual { .. } => Peer::Cpu,
    };
    let (route, kind, mut reasons) = match registry.resolve(entry, peer) {
        Ok(route) => {
            let (kind, reasons) = (route.kind, route.reasons());
            (Some(route), kind, reasons)
        }
        Err(ResolveError::NoCpuMapping(_)) if peer == Peer::Cpu => (
            None,
            RouteKind::Bounce(BounceWhy::OpaqueToPeer),
            vec!["the region has no CPU mapping, and a virtual NIC reaches memory only through the CPU".into()],
        ),
        Err(e) => return Err(e.into()),
    };
    let plan = registration(place, &kind, entry);
    reasons.extend(plan.notes.iter().cloned());
    Ok(NicRoute { route, plan, reasons })
}
