//! Which NIC should move a region's data: every RDMA device ranked for the region (the pairing
//! NCCL and UCX derive by hand). A NIC is direct when it sits below a common switch with the
//! region's device AND its registration takes the memory directly (dma-buf import or pinned
//! pages; a raw BAR it can only bounce); then come NICs on the region's host bridge, then on its
//! NUMA node, then the rest; within a tier a direct registration first, then the wider
//! bottleneck link, then the shorter path. Software devices (rxe, siw) reach memory with the CPU
//! and come last.
//!
//! Owns: `NicRank`, `Tier`, `nearest_nic`, `rank_nics`, `rank_for_export`, `rank_for_node`. Must not: judge a PCI
//! pair itself (the registry's verdict does), decide how a NIC registers (`register` does) or
//! open a device.

use std::sync::Arc;

use super::device::{devices, NicPlace, RdmaDevice};
use super::register::{route_for, NicRoute, RegPlan};
use super::NicError;
use crate::pci::{Bdf, PciDevice};
use crate::region::{HostRegion, PlannedDmaBuf, Provider};
use crate::registry::{Entry, Registry};
use crate::route::RouteKind;
use crate::verdict::{MapType, PathLabel};

/// How close a NIC is to a region, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Peer-to-peer below a common upstream bridge, and the NIC registers the memory directly:
    /// it programs the region's bus address.
    Direct,
    /// On the region's host bridge (through the root complex), or below a common switch with a
    /// registration that bounces.
    HostBridge,
    /// On the region's NUMA node, another host bridge.
    Numa,
    /// Another host bridge and NUMA node (or unknown).
    Far,
    /// A software device: its kernel driver copies with the CPU.
    Software,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Direct => "direct",
            Tier::HostBridge => "host_bridge",
            Tier::Numa => "numa",
            Tier::Far => "far",
            Tier::Software => "software",
        }
    }
}

/// One NIC's place in the ranking, with the facts behind it.
#[derive(Debug, Clone)]
pub struct NicRank {
    pub device: RdmaDevice,
    pub tier: Tier,
    /// The route the NIC's registration rests on (`route.name()`: `bus_addr`, `host_bridge`,
    /// `cpu_mapped`, `kernel_import`, `bounce`, ...).
    pub route: RouteKind,
    /// How the NIC registers the region (what `Nic::register` tries, in that order).
    pub registration: RegPlan,
    pub map_type: Option<MapType>,
    pub path: Option<PathLabel>,
    pub distance: Option<u32>,
    pub bandwidth_gbs: Option<f64>,
    /// Why, one fact a line: the tier first, then the registration, then the registry's reasons.
    pub reasons: Vec<String>,
}

/// Every RDMA device of the registry's topology root, ranked for `region` (best first).
pub fn nearest_nic(registry: &Registry, region: &Entry) -> Result<Vec<NicRank>, NicError> {
    let devs = devices(registry.topology().root())?;
    rank_nics(registry, region, &devs)
}

/// Every RDMA device of the registry's root ranked for the memory of PCI function `bdf` as its
/// driver exports it to a NIC (a dma-buf: what GPUDirect RDMA registers), best first. The
/// region is a plan (`PlannedDmaBuf`): nothing is allocated or imported, so this answers for a
/// captured machine too.
pub fn rank_for_export(registry: &Registry, bdf: Bdf) -> Result<Vec<NicRank>, NicError> {
    let region = registry.register(Arc::new(PlannedDmaBuf { bdf, len: 4096 }))?;
    nearest_nic(registry, region.entry())
}

/// Every RDMA device of the registry's root ranked for host memory on NUMA node `numa` (`None`:
/// a node that is not known), best first: the node's own NICs, then the others, software devices
/// last. A page of anonymous memory stands for the node's memory; nothing is pinned.
pub fn rank_for_node(registry: &Registry, numa: Option<i32>) -> Result<Vec<NicRank>, NicError> {
    let pages = HostRegion::anonymous(4096).map_err(NicError::Region)?.on_node(numa);
    let region = registry.register(Arc::new(pages))?;
    nearest_nic(registry, region.entry())
}

/// The region's host bridge (device memory) and NUMA node, when known.
struct Home {
    host_bridge: Option<String>,
    numa: Option<i32>,
}

/// `devs` ranked for `region` (best first). A NIC whose PCI function the topology lacks is an
/// error (a sysroot that is not one machine).
pub fn rank_nics(registry: &Registry, region: &Entry, devs: &[RdmaDevice]) -> Result<Vec<NicRank>, NicError> {
    let topo = registry.topology();
    let home = match region.provider() {
        Provider::Pci(b) => {
            let d = topo.by_bdf(b).map_err(|_| NicError::ProviderUnknown(b))?;
            Home { host_bridge: Some(d.host_bridge.clone()), numa: d.numa_node }
        }
        Provider::Host { numa } => Home { host_bridge: None, numa },
    };
    let mut out = Vec::with_capacity(devs.len());
    for dev in devs {
        out.push(match &dev.place {
            NicPlace::Virtual { .. } => software_rank(dev, route_for(registry, &dev.place, region)?),
            NicPlace::Pci(bdf) => {
                let nic = topo.by_bdf(*bdf).map_err(|_| NicError::NotInTopology {
                    name: dev.name.clone(),
                    bdf: *bdf,
                    root: topo.root().to_path_buf(),
                })?;
                pci_rank(dev, nic, &home, route_for(registry, &dev.place, region)?)
            }
        });
    }
    out.sort_by(|a, b| {
        a.tier
            .cmp(&b.tier)
            .then_with(|| a.registration.bounces().cmp(&b.registration.bounces()))
            .then_with(|| b.bandwidth_gbs.unwrap_or(0.0).total_cmp(&a.bandwidth_gbs.unwrap_or(0.0)))
            .then_with(|| a.distance.unwrap_or(u32::MAX).cmp(&b.distance.unwrap_or(u32::MAX)))
            .then_with(|| a.device.name.cmp(&b.device.name))
    });
    Ok(out)
}

fn software_rank(dev: &RdmaDevice, nr: NicRoute<'_>) -> NicRank {
    let mut reasons = vec![format!("{}: software device, {}", dev.name, dev.place.describe())];
    reasons.push(nr.plan.describe());
    reasons.extend(nr.reasons);
    NicRank {
        device: dev.clone(),
        tier: Tier::Software,
        route: nr.plan.route,
        registration: nr.plan,
        map_type: None,
        path: None,
        distance: None,
        bandwidth_gbs: None,
        reasons,
    }
}

fn pci_rank(dev: &RdmaDevice, nic: &PciDevice, home: &Home, nr: NicRoute<'_>) -> NicRank {
    let v = nr.route.as_ref().and_then(|r| r.verdict.as_deref());
    let map_type = v.map(|v| v.map_type);
    let (tier, why) = tier_of(map_type, &nr.plan, nic, home);
    let mut reasons =
        vec![format!("{} at {}: {} tier: {why}; route {}", dev.name, nic.bdf, tier.as_str(), nr.plan.route.name())];
    reasons.push(nr.plan.describe());
    let (path, distance, bandwidth_gbs) = (v.map(|v| v.path), v.map(|v| v.distance), v.and_then(|v| v.bandwidth_gbs));
    reasons.extend(nr.reasons);
    NicRank {
        device: dev.clone(),
        tier,
        route: nr.plan.route,
        registration: nr.plan,
        map_type,
        path,
        distance,
        bandwidth_gbs,
        reasons,
    }
}

/// A PCI NIC's tier and why.
fn tier_of(map_type: Option<MapType>, plan: &RegPlan, nic: &PciDevice, home: &Home) -> (Tier, String) {
    let switch = map_type == Some(MapType::BusAddr);
    if switch && !plan.bounces() {
        return (Tier::Direct, "peer-to-peer below a common upstream bridge (bus address)".into());
    }
    // Below a common switch, but the NIC cannot take the memory itself: it reaches the bounce
    // buffer in host memory, so only locality is left to rank by.
    let not_direct = if switch {
        "; not direct: below a common upstream bridge, but the registration bounces through host memory"
    } else {
        ""
    };
    let same_numa = matches!((home.numa, nic.numa_node), (Some(a), Some(b)) if a == b && a >= 0);
    let (tier, why) = if home.host_bridge.as_deref() == Some(nic.host_bridge.as_str()) {
        (Tier::HostBridge, format!("same host bridge {} (through the root complex)", nic.host_bridge))
    } else if same_numa {
        (Tier::Numa, format!("same NUMA node {} (host bridge {})", nic.numa_node.unwrap_or(-1), nic.host_bridge))
    } else if home.host_bridge.is_none() {
        (Tier::Far, "system memory of another or an unknown NUMA node".to_string())
    } else {
        (Tier::Far, format!("another host bridge ({}) and NUMA node", nic.host_bridge))
    };
    (tier, format!("{why}{not_direct}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nic::register::RegWay;
    use crate::region::{Backing, BarRegion, HostRegion, PeerMemory};
    use crate::sys::MappedSpan;
    use crate::Topology;

    fn registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    fn nic(name: &str, place: NicPlace) -> RdmaDevice {
        RdmaDevice { name: name.into(), place, sysfs: format!("sys/class/infiniband/{name}").into() }
    }

    /// The capture of the `switch` topology: 03:00.0 and 04:00.0 below one switch, 05:00.0 on
    /// its own root port (same host bridge), 81:00.0 behind the second host bridge.
    fn nics() -> Vec<RdmaDevice> {
        vec![
            nic("rxe0", NicPlace::Virtual { netdev: Some("eth0".into()) }),
            nic("far", NicPlace::Pci("0000:81:00.0".parse().unwrap())),
            nic("rootport", NicPlace::Pci("0000:05:00.0".parse().unwrap())),
            nic("switch", NicPlace::Pci("0000:04:00.0".parse().unwrap())),
        ]
    }

    /// P2PDMA pages of 03:00.0's BAR 2 (as `p2pmem/allocate` maps them), standing on host pages:
    /// memory a NIC's kernel driver can pin.
    struct P2pPages {
        bdf: Bdf,
        pages: HostRegion,
    }

    impl PeerMemory for P2pPages {
        fn len(&self) -> u64 {
            self.pages.len()
        }
        fn provider(&self) -> Provider {
            Provider::Pci(self.bdf)
        }
        fn backing(&self) -> Backing<'_> {
            Backing::P2pmem { bdf: self.bdf, bar: 2, offset: 0 }
        }
        fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
            self.pages.cpu_mapping()
        }
    }

    #[test]
    fn pinnable_device_memory_ranks_the_switch_nic_direct_then_host_bridge_far_software() {
        let reg = registry();
        let bdf = "0000:03:00.0".parse().unwrap();
        let p2p = reg.register(Arc::new(P2pPages { bdf, pages: HostRegion::new(4096).unwrap() })).unwrap();
        let ranked = rank_nics(&reg, p2p.entry(), &nics()).unwrap();
        let names: Vec<&str> = ranked.iter().map(|r| r.device.name.as_str()).collect();
        assert_eq!(names, ["switch", "rootport", "far", "rxe0"]);
        assert_eq!(ranked[0].tier, Tier::Direct);
        assert_eq!(ranked[0].route.name(), "bus_addr");
        assert_eq!(ranked[0].registration.direct, [RegWay::PinnedPages]);
        assert_eq!(ranked[0].distance, Some(4));
        assert_eq!(ranked[1].tier, Tier::HostBridge);
        assert_eq!(ranked[2].tier, Tier::Far);
        assert_eq!(ranked[3].tier, Tier::Software);
        assert!(ranked[0].reasons[0].contains("direct tier"), "{:?}", ranked[0].reasons);
        assert!(ranked.iter().all(|r| r.reasons.len() > 2), "the registry's reasons follow the tier");
    }

    #[test]
    fn a_raw_bar_below_the_same_switch_is_not_direct_because_registration_bounces_it() {
        let reg = registry();
        let bar = reg
            .register(Arc::new(BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 }))
            .unwrap();
        let ranked = rank_nics(&reg, bar.entry(), &nics()).unwrap();
        assert!(ranked.iter().all(|r| r.tier != Tier::Direct), "{ranked:#?}");
        let switch = ranked.iter().find(|r| r.device.name == "switch").unwrap();
        assert_eq!(switch.route.name(), "bus_addr", "the fabric has a peer-to-peer path");
        assert_eq!(switch.map_type, Some(MapType::BusAddr));
        assert!(switch.registration.bounces());
        assert_eq!(switch.registration.name(), "bounce");
        assert_eq!(switch.tier, Tier::HostBridge);
        let why = switch.reasons[..2].join("\n");
        assert!(why.contains("registration bounces"), "{why}");
        assert!(why.contains("not a dma-buf") && why.contains("no CPU mapping for the kernel to pin"), "{why}");
        // The first NIC is still the switch one (same host bridge, the shortest path).
        assert_eq!(ranked[0].device.name, "switch");
    }

    #[test]
    fn host_memory_ranks_pci_nics_by_numa_and_software_last() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let ranked = rank_nics(&reg, host.entry(), &nics()).unwrap();
        assert_eq!(ranked.last().unwrap().device.name, "rxe0");
        assert!(ranked.iter().all(|r| r.tier != Tier::Direct), "system memory has no bus-address peer");
        assert!(ranked.iter().all(|r| !r.registration.bounces()), "host pages are pinned by every NIC");
    }

    #[test]
    fn a_devices_exported_memory_is_direct_for_the_nic_below_its_switch_only() {
        let reg = registry();
        let ranked = rank_nics(
            &reg,
            reg.register(Arc::new(PlannedDmaBuf { bdf: "0000:03:00.0".parse().unwrap(), len: 4096 })).unwrap().entry(),
            &nics(),
        )
        .unwrap();
        let tiers: Vec<(&str, Tier)> = ranked.iter().map(|r| (r.device.name.as_str(), r.tier)).collect();
        assert_eq!(tiers[0], ("switch", Tier::Direct), "{tiers:?}");
        assert_eq!(ranked[0].registration.direct, [RegWay::DmaBufImport]);
        assert_eq!(ranked[0].route.name(), "kernel_import");
        assert!(ranked[1..].iter().all(|r| r.tier != Tier::Direct), "{tiers:?}");
        // rank_for_export asks the root's own devices: the capture has none.
        assert!(rank_for_export(&reg, "0000:03:00.0".parse().unwrap()).unwrap().is_empty());
    }

    #[test]
    fn a_software_nic_and_an_unmapped_region_register_a_bounce_buffer() {
        let reg = registry();
        let bar = reg
            .register(Arc::new(BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 }))
            .unwrap();
        let rxe = [nic("rxe0", NicPlace::Virtual { netdev: None })];
        let ranked = rank_nics(&reg, bar.entry(), &rxe).unwrap();
        assert_eq!(ranked[0].route.name(), "bounce");
        assert!(ranked[0].registration.bounces());
        assert!(ranked[0].reasons.iter().any(|r| r.contains("no CPU mapping")), "{:?}", ranked[0].reasons);
    }

    #[test]
    fn a_nic_outside_the_topology_is_an_error_not_a_guess() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let ghost = [nic("ghost", NicPlace::Pci("0000:42:00.0".parse().unwrap()))];
        let e = rank_nics(&reg, host.entry(), &ghost).unwrap_err();
        assert!(matches!(e, NicError::NotInTopology { .. }), "{e}");
        assert!(e.to_string().contains("ghost") && e.to_string().contains("0000:42:00.0"), "{e}");
    }
}
