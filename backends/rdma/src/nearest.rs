//! Which NIC should move a region's data: every RDMA device ranked by the registry's route
//! between the region and the NIC (the pairing NCCL and UCX derive by hand): a direct bus
//! address below a common switch first, then a NIC on the region's host bridge, then one on its
//! NUMA node, then the rest; within a tier the wider bottleneck link, then the shorter path.
//! Software devices (rxe, siw) reach memory with the CPU and come last for device memory.
//!
//! Owns: `NicRank`, `Tier`, `nearest_nic`, `rank_nics`. Must not: judge a PCI pair itself (the
//! registry's verdict does) or open a device.

use peermem::{Entry, MapType, PathLabel, Peer, Provider, Registry};

use crate::device::{devices, NicPlace, RdmaDevice};
use crate::error::RdmaError;

/// How close a NIC is to a region, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Peer-to-peer below a common upstream bridge: the NIC programs the region's bus address.
    Direct,
    /// On the region's host bridge (through the root complex).
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
    /// The registry's route kind for the pair (`bus_addr`, `host_bridge`, `cpu_mapped`, ...;
    /// `none` when the registry has no route for it).
    pub route: &'static str,
    pub map_type: Option<MapType>,
    pub path: Option<PathLabel>,
    pub distance: Option<u32>,
    pub bandwidth_gbs: Option<f64>,
    /// Why, one fact a line: the tier first, then the registry's reasons.
    pub reasons: Vec<String>,
}

/// Every RDMA device of the registry's topology root, ranked for `region` (best first).
pub fn nearest_nic(registry: &Registry, region: &Entry) -> Result<Vec<NicRank>, RdmaError> {
    let devs = devices(registry.topology().root())?;
    rank_nics(registry, region, &devs)
}

/// `devs` ranked for `region` (best first). A NIC whose PCI function the topology lacks is an
/// error (a sysroot that is not one machine).
pub fn rank_nics(registry: &Registry, region: &Entry, devs: &[RdmaDevice]) -> Result<Vec<NicRank>, RdmaError> {
    let topo = registry.topology();
    let (region_hb, region_numa) = match region.provider() {
        Provider::Pci(b) => {
            let d = topo.by_bdf(b).map_err(|e| RdmaError::Invalid(format!("region provider {b}: {e}")))?;
            (Some(d.host_bridge.clone()), d.numa_node)
        }
        Provider::Host { numa } => (None, numa),
    };
    let mut out = Vec::with_capacity(devs.len());
    for dev in devs {
        let rank = match &dev.place {
            NicPlace::Virtual { .. } => {
                let mut reasons = vec![format!("{}: software device, {}", dev.name, dev.place.describe())];
                // A region the CPU cannot reach (a BAR nobody mapped) is no route for it at all.
                let route = match registry.resolve(region, Peer::Cpu) {
                    Ok(route) => {
                        reasons.extend(route.reasons());
                        route.kind.name()
                    }
                    Err(e) => {
                        reasons.push(format!("no route for the CPU: {e}"));
                        "none"
                    }
                };
                NicRank {
                    device: dev.clone(),
                    tier: Tier::Software,
                    route,
                    map_type: None,
                    path: None,
                    distance: None,
                    bandwidth_gbs: None,
                    reasons,
                }
            }
            NicPlace::Pci(bdf) => {
                let nic = topo.by_bdf(*bdf).map_err(|e| RdmaError::Invalid(format!("{} at {bdf}: {e}", dev.name)))?;
                let peer = registry.peer(*bdf)?;
                let route = registry.resolve(region, peer)?;
                let v = route.verdict.as_deref();
                let map_type = v.map(|v| v.map_type);
                let same_numa = matches!((region_numa, nic.numa_node), (Some(a), Some(b)) if a == b && a >= 0);
                let (tier, why) = if map_type == Some(MapType::BusAddr) && route.kind.is_direct() {
                    (Tier::Direct, "peer-to-peer below a common upstream bridge (bus address)".to_string())
                } else if region_hb.as_deref() == Some(nic.host_bridge.as_str()) {
                    (Tier::HostBridge, format!("same host bridge {} (through the root complex)", nic.host_bridge))
                } else if same_numa {
                    (
                        Tier::Numa,
                        format!("same NUMA node {} (host bridge {})", nic.numa_node.unwrap_or(-1), nic.host_bridge),
                    )
                } else if region_hb.is_none() {
                    (Tier::Far, "system memory of another or an unknown NUMA node".to_string())
                } else {
                    (Tier::Far, format!("another host bridge ({}) and NUMA node", nic.host_bridge))
                };
                let mut reasons =
                    vec![format!("{} at {bdf}: {} tier: {why}; route {}", dev.name, tier.as_str(), route.kind.name())];
                reasons.extend(route.reasons());
                NicRank {
                    device: dev.clone(),
                    tier,
                    route: route.kind.name(),
                    map_type,
                    path: v.map(|v| v.path),
                    distance: v.map(|v| v.distance),
                    bandwidth_gbs: v.and_then(|v| v.bandwidth_gbs),
                    reasons,
                }
            }
        };
        out.push(rank);
    }
    out.sort_by(|a, b| {
        a.tier
            .cmp(&b.tier)
            .then_with(|| b.bandwidth_gbs.unwrap_or(0.0).total_cmp(&a.bandwidth_gbs.unwrap_or(0.0)))
            .then_with(|| a.distance.unwrap_or(u32::MAX).cmp(&b.distance.unwrap_or(u32::MAX)))
            .then_with(|| a.device.name.cmp(&b.device.name))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermem::{BarRegion, HostRegion, Topology};
    use std::sync::Arc;

    fn registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qemu-switch");
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

    #[test]
    fn bus_addr_nic_first_then_host_bridge_then_far_then_software() {
        let reg = registry();
        let bar = reg
            .register(Arc::new(BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 }))
            .unwrap();
        let ranked = rank_nics(&reg, bar.entry(), &nics()).unwrap();
        let names: Vec<&str> = ranked.iter().map(|r| r.device.name.as_str()).collect();
        assert_eq!(names, ["switch", "rootport", "far", "rxe0"]);
        assert_eq!(ranked[0].tier, Tier::Direct);
        assert_eq!(ranked[0].route, "bus_addr");
        assert_eq!(ranked[0].distance, Some(4));
        assert_eq!(ranked[1].tier, Tier::HostBridge);
        assert_eq!(ranked[2].tier, Tier::Far);
        assert_eq!(ranked[3].tier, Tier::Software);
        assert!(ranked[0].reasons[0].contains("direct tier"), "{:?}", ranked[0].reasons);
        assert!(ranked.iter().all(|r| r.reasons.len() > 1), "the registry's reasons follow the tier");
    }

    #[test]
    fn host_memory_ranks_pci_nics_by_numa_and_software_last() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let ranked = rank_nics(&reg, host.entry(), &nics()).unwrap();
        assert_eq!(ranked.last().unwrap().device.name, "rxe0");
        assert!(ranked.iter().all(|r| r.tier != Tier::Direct), "system memory has no bus-address peer");
    }

    #[test]
    fn a_nic_outside_the_topology_is_an_error_not_a_guess() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
        let ghost = [nic("ghost", NicPlace::Pci("0000:42:00.0".parse().unwrap()))];
        assert!(matches!(rank_nics(&reg, host.entry(), &ghost), Err(RdmaError::Invalid(_))));
    }
}
