//! Routes through the registry for BAR-backed regions on captured and derived fixtures: the
//! route kind follows the verdict and the client's IOMMU, the address follows the bus offset.

use std::path::PathBuf;
use std::sync::Arc;

use peermem::{
    BarError, BarRegion, Bdf, BounceWhy, BusAddr, CpuPhys, DmaAddr, PeerMemory, Registry, RegistryError, RouteKind,
    Topology,
};

fn registry(name: &str) -> Registry {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name);
    Registry::new(Arc::new(Topology::discover(root).unwrap()))
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// nvme 03:00.0's CMB (BAR2, 64 MiB at CPU = bus 0xe4000000 in qemu-switch).
fn cmb(offset: u64, len: u64) -> Arc<dyn PeerMemory> {
    Arc::new(BarRegion { bdf: bdf("0000:03:00.0"), bar: 2, offset, len })
}

#[test]
fn switch_peer_gets_the_bus_address_and_lookup_by_bus_finds_it() {
    let reg = registry("qemu-switch");
    let g = reg.register(cmb(0x1000, 0x10_0000)).unwrap();
    let r = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::BusAddr(BusAddr::new(0xe400_1000)));
    assert_eq!(r.at(0x10), Ok(RouteKind::BusAddr(BusAddr::new(0xe400_1010))));
    assert_eq!(r.dma_address_at(0x10), Ok(Some(DmaAddr::Bus(BusAddr::new(0xe400_1010)))));
    assert!(r.at(0x10_0000).is_err(), "past the region's end");
    assert!(r.at(u64::MAX).is_err());
    let client = reg.topology().idx(bdf("0000:04:00.0")).unwrap();
    let snap = reg.snapshot();
    let hit = snap.lookup_bus(reg.hierarchy_of(client).unwrap(), BusAddr::new(0xe400_1010)).unwrap();
    assert_eq!((hit.entry.id(), hit.offset), (g.id(), 0x10));
    assert!(snap.lookup_bus(reg.hierarchy_of(client).unwrap(), BusAddr::new(0xe400_0fff)).is_none());
}

#[test]
fn refused_pairs_bounce_and_say_why() {
    let reg = registry("qemu-switch");
    let g = reg.register(cmb(0, 4096)).unwrap();
    let r = reg.resolve(&g, reg.peer(bdf("0000:05:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::Bounce(BounceWhy::NotSupported));
    assert!(r.reasons().iter().any(|s| s.contains("EREMOTEIO")));
}

#[test]
fn host_bridge_route_programs_the_cpu_address_without_iommu_and_an_iova_with_one() {
    let reg = registry("derived-amd-zen");
    let g = reg.register(cmb(0x2000, 4096)).unwrap();
    let r = reg.resolve(&g, reg.peer(bdf("0000:81:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::HostBridge(CpuPhys::new(0xe400_2000)));
    assert_eq!(r.dma_address(), Some(DmaAddr::Phys(CpuPhys::new(0xe400_2000))));
    assert_eq!(r.dma_address().unwrap().device_bits(), 0xe400_2000);

    let reg = registry("derived-iommu-amd-zen");
    let g = reg.register(cmb(0x2000, 4096)).unwrap();
    let r = reg.resolve(&g, reg.peer(bdf("0000:81:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::Iommu(None), "client in a DMA domain: IOVA to be mapped");
    assert_eq!(r.dma_address(), None);
    // Switch peers stay on bus addresses even under the IOMMU (no ACS on the xio3130 ports).
    let r = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
    assert!(matches!(r.kind, RouteKind::BusAddr(_)));
}

#[test]
fn negative_bus_offset_gives_bus_below_cpu() {
    let reg = registry("derived-bus-offset-negative");
    let g = reg.register(cmb(0x10, 4096)).unwrap();
    assert_eq!(g.cpu_phys(), Some(CpuPhys::new(0x6000_e400_0010)));
    assert_eq!(g.bus_addr(), Some(BusAddr::new(0xe400_0010)));
    let r = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::BusAddr(BusAddr::new(0xe400_0010)));
    assert_eq!(r.cpu_address.unwrap().raw() - r.bus_address.unwrap().raw(), 0x6000_0000_0000);
}

#[test]
fn positive_bus_offset_gives_bus_above_cpu() {
    let reg = registry("derived-bus-offset-positive");
    let g = reg.register(cmb(0x10, 4096)).unwrap();
    assert_eq!(g.cpu_phys(), Some(CpuPhys::new(0x6400_0010)));
    let r = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
    assert_eq!(r.kind, RouteKind::BusAddr(BusAddr::new(0xe400_0010)));
}

#[test]
fn bad_bar_regions_are_refused_at_registration() {
    let reg = registry("qemu-switch");
    let e = reg.register(cmb(0x400_0000 - 0x800, 0x1000)).unwrap_err();
    assert!(matches!(e, RegistryError::Bar(BarError::OutOfBar { .. })), "{e}");
    let e = reg.register(cmb(u64::MAX, 2)).unwrap_err();
    assert!(matches!(e, RegistryError::Bar(BarError::OutOfBar { .. })), "{e}");
    let e = reg.register(Arc::new(BarRegion { bdf: bdf("0000:03:00.0"), bar: 1, offset: 0, len: 1 })).unwrap_err();
    assert!(matches!(e, RegistryError::Bar(BarError::NoSuchBar { .. })), "{e}");
    let e = reg.register(Arc::new(BarRegion { bdf: bdf("0000:00:10.0"), bar: 0, offset: 0, len: 1 })).unwrap_err();
    assert!(matches!(e, RegistryError::Bar(BarError::IoBar { .. })), "{e}");
    let e = reg.register(Arc::new(BarRegion { bdf: bdf("0000:0a:00.0"), bar: 0, offset: 0, len: 1 })).unwrap_err();
    assert!(matches!(e, RegistryError::Bar(BarError::UnknownDevice(_))), "{e}");
    // Two registrations of the same bus range on one hierarchy overlap.
    let _g = reg.register(cmb(0, 0x2000)).unwrap();
    let e = reg.register(cmb(0x1000, 0x2000)).unwrap_err();
    assert!(matches!(e, RegistryError::Overlap { space: "bus", .. }), "{e}");
}

#[test]
fn cached_and_uncached_resolves_agree() {
    let reg = registry("derived-allow-skylake");
    let g = reg.register(cmb(0, 4096)).unwrap();
    for c in ["0000:03:00.0", "0000:04:00.0", "0000:05:00.0", "0000:81:00.0", "0000:07:00.0"] {
        let p = reg.peer(bdf(c)).unwrap();
        let a = reg.resolve(&g, p).unwrap();
        let b = reg.resolve_uncached(&g, p).unwrap();
        assert_eq!(a, b, "{c}");
        assert_eq!(reg.resolve(&g, p).unwrap(), a, "{c}: second (cached) resolve");
    }
}

/// Device memory its driver keeps private (CUDA memory without a dma-buf): no peer reaches it
/// directly, whatever the verdict for the pair, and the reason says so. The verdict still rides
/// along (the memory's own driver may let a peer in, as GPUDirect Storage does): a pair the
/// kernel refuses is `not_supported`, one it allows stays driver-private.
#[test]
fn driver_private_device_memory_bounces_for_every_peer() {
    #[derive(Debug)]
    struct Private(Bdf);
    impl PeerMemory for Private {
        fn len(&self) -> u64 {
            1 << 20
        }
        fn provider(&self) -> peermem::Provider {
            peermem::Provider::Pci(self.0)
        }
        fn backing(&self) -> peermem::Backing<'_> {
            peermem::Backing::DriverPrivate
        }
    }
    let reg = registry("qemu-switch");
    let g = reg.register(Arc::new(Private(bdf("0000:03:00.0")))).unwrap();
    let same_switch = reg.resolve(&g, reg.peer(bdf("0000:04:00.0")).unwrap()).unwrap();
    assert_eq!(same_switch.kind, RouteKind::Bounce(BounceWhy::OpaqueToPeer));
    assert!(same_switch.reasons().iter().any(|s| s.contains("GPU memory without a dma-buf")));
    assert_eq!(same_switch.map_type().map(|m| m.as_str()), Some("bus_addr"), "the verdict rides along");
    let refused = reg.resolve(&g, reg.peer(bdf("0000:05:00.0")).unwrap()).unwrap();
    assert_eq!(refused.kind, RouteKind::Bounce(BounceWhy::NotSupported));
    assert!(refused.reasons().iter().any(|s| s.contains("EREMOTEIO")), "{:?}", refused.reasons());
    assert!(reg.snapshot().lookup_va(peermem::VirtAddr::new(0x1000)).is_none());
}
