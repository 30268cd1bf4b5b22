//! Inside the testbed guest only (cargo feature `guest`; run through `testbed/run`): the real
//! Linux 6.12 P2PDMA code decides every NVMe pair, and peermem's verdict must predict it.
//!
//! For every ordered (provider, client) pair of NVMe controllers: allocate 1 MiB of the
//! provider's CMB through `p2pmem/allocate`, O_DIRECT-read the client's namespace into it, and
//! compare with `Topology::verdict(provider, client)` read from the same live sysfs: EREMOTEIO
//! exactly when peermem says `not_supported`, success otherwise. On success the data must match,
//! except in the one measured trap (DESIGN section 8): under QEMU's translated vIOMMU, QEMU sends
//! the switch-local peer-to-peer DMA through the IOMMU while the kernel programmed bus addresses,
//! so the read "succeeds" with wrong data. That case is asserted as what it is.

use std::sync::Arc;

use peermem::{Bdf, HostRegion, MapType, PeerMemory, Registry, RouteKind, Topology};
use peermem_nvme::{BlockDevice, P2pmemRegion};

const LEN: u64 = 1 << 20;

fn live() -> Arc<Topology> {
    assert!(
        std::env::var_os("PEERMEM_GUEST").is_some(),
        "this test needs the testbed guest: testbed/run switch -- <this test binary>"
    );
    Arc::new(Topology::discover("/").expect("live sysfs"))
}

fn nvme_controllers(t: &Topology) -> Vec<Bdf> {
    t.devices().iter().filter(|d| d.class_devices.iter().any(|c| c.class == "nvme")).map(|d| d.bdf).collect()
}

/// A pattern unique to each client (its BDF) and offset.
fn pattern(client: Bdf, i: usize) -> u8 {
    (i as u64 * 131 + client.bus() as u64 * 7 + (i as u64 >> 12)) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Match,
    Corrupt,
    Eremoteio,
}

#[test]
fn kernel_p2pdma_agrees_with_peermem_for_every_nvme_pair() {
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    assert!(nvmes.len() >= 4, "expected the testbed's 4 NVMe controllers, found {nvmes:?}");

    // Write each client's pattern to its namespace from host memory.
    for &c in &nvmes {
        let bd = BlockDevice::open_namespace(&topo, c).unwrap();
        let mut buf = HostRegion::new(LEN).unwrap();
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(c, i);
        }
        bd.write_at(0, buf.as_mut_slice()).unwrap();
    }

    let reg = Registry::new(topo.clone());
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    for &p in nvmes.iter().filter(|&&b| topo.by_bdf(b).unwrap().p2pmem.is_some()) {
        for &c in &nvmes {
            let v = topo.verdict(topo.idx(p).unwrap(), topo.idx(c).unwrap());
            let mut region = P2pmemRegion::allocate(&topo, p, LEN).unwrap();
            region.as_mut_slice().fill(0xee);
            let bd = BlockDevice::open_namespace(&topo, c).unwrap();
            let outcome = match bd.read_at(0, region.as_mut_slice()) {
                Ok(()) => {
                    let mut back = vec![0u8; LEN as usize];
                    region.read_at(0, &mut back).unwrap();
                    if back.iter().enumerate().all(|(i, &b)| b == pattern(c, i)) {
                        Outcome::Match
                    } else {
                        Outcome::Corrupt
                    }
                }
                Err(e) if e.is_remote() => Outcome::Eremoteio,
                Err(e) => panic!("{p} -> {c}: unexpected error {e}"),
            };
            // The registry's route for the same region and client.
            let g = reg.register(Arc::new(region) as Arc<dyn PeerMemory>).unwrap();
            let route = reg.resolve(&g, reg.peer(c).unwrap()).unwrap();
            let iommu_trap = topology == "switch-iommu" && v.map_type == MapType::BusAddr && p != c;
            let expected = match v.map_type {
                MapType::NotSupported => Outcome::Eremoteio,
                _ if iommu_trap => Outcome::Corrupt,
                _ => Outcome::Match,
            };
            table.push(format!(
                "{p} -> {c}: peermem {} (distance {}, route {}), kernel {:?}",
                v.map_type.as_str(),
                v.distance,
                route.kind.name(),
                outcome
            ));
            if outcome != expected {
                wrong.push(format!("{p} -> {c}: expected {expected:?}, got {outcome:?}"));
            }
            match v.map_type {
                MapType::BusAddr => assert!(matches!(route.kind, RouteKind::BusAddr(_)), "{p}->{c}: {:?}", route.kind),
                MapType::NotSupported => assert!(!route.kind.is_direct()),
                MapType::ThruHostBridge => {}
            }
        }
    }
    println!("topology {topology}:");
    for l in &table {
        println!("  {l}");
    }
    assert!(wrong.is_empty(), "kernel and peermem disagree:\n{}", wrong.join("\n"));
    assert!(table.len() >= 16);
}
