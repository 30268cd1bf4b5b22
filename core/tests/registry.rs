//! Registry behaviour: lookups by address, unregister semantics, overlap refusal, and readers
//! racing writers. Host memory only, so these run anywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use peermem::{
    HostRegion, HostSlice, Peer, PeerMemory, Registry, RegistryError, ResolveError, RouteKind, Topology, VirtAddr,
};

fn host_fixture() -> Arc<Topology> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/host-fc-amd");
    Arc::new(Topology::discover(root).expect("host fixture"))
}

#[test]
fn lookup_by_va_returns_region_and_offset() {
    let reg = Registry::new(host_fixture());
    let r = Arc::new(HostRegion::new(3 * 4096).unwrap());
    let base = r.cpu_range().unwrap().start();
    let g = reg.register(r.clone()).unwrap();
    let snap = reg.snapshot();
    let hit = snap.lookup_va(VirtAddr::new(base.raw() + 5000)).unwrap();
    assert_eq!(hit.entry.id(), g.id());
    assert_eq!(hit.offset, 5000);
    assert!(snap.lookup_va(VirtAddr::new(base.raw() + 3 * 4096)).is_none());
    assert!(snap.lookup_va(VirtAddr::new(base.raw() - 1)).is_none());
    let mut reader = reg.reader();
    assert_eq!(reader.lookup_va(base).unwrap().offset, 0);
}

#[test]
fn cpu_and_pci_peers_reach_host_memory_through_its_mapping() {
    let topo = host_fixture();
    let reg = Registry::new(topo.clone());
    let r = Arc::new(HostRegion::new(4096).unwrap());
    let va = r.cpu_range().unwrap().start();
    let g = reg.register(r).unwrap();
    let route = reg.resolve(&g, Peer::Cpu).unwrap();
    assert_eq!(route.kind, RouteKind::CpuMapped(va));
    let nic = reg.peer("0000:00:03.0".parse().unwrap()).unwrap();
    let route = reg.resolve(&g, nic).unwrap();
    assert_eq!(route.kind, RouteKind::CpuMapped(va));
    assert!(route.verdict.is_none(), "host memory involves no PCI pair");
    assert!(matches!(reg.peer("0000:09:00.0".parse().unwrap()), Err(RegistryError::UnknownDevice(_))));
}

#[test]
fn unregister_makes_lookups_miss_and_resolves_fail_but_old_snapshots_stay_valid() {
    let reg = Registry::new(host_fixture());
    let mut r = HostRegion::new(4096).unwrap();
    r.as_mut_slice()[0] = 0xa5;
    let r = Arc::new(r);
    let va = r.cpu_range().unwrap().start();
    let g = reg.register(r.clone()).unwrap();
    let old = reg.snapshot();
    let entry = g.entry().clone();
    let weak = Arc::downgrade(&r);
    drop(r);
    drop(g);
    assert!(reg.snapshot().lookup_va(va).is_none());
    assert_eq!(reg.resolve(&entry, Peer::Cpu), Err(ResolveError::Unregistered(entry.id())));
    // A reader that looked the region up before the unregister still holds valid memory...
    assert!(old.lookup_va(va).is_some(), "old snapshot still sees it");
    let alive = weak.upgrade().expect("memory outlives the registration while a reader holds it");
    let mut b = [0u8; 1];
    alive.read_at(0, &mut b).unwrap();
    assert_eq!(b[0], 0xa5);
    drop(alive);
    // ...and it is freed once the last reader and entry let go.
    drop(old);
    drop(entry);
    assert!(weak.upgrade().is_none(), "region freed after the last reader");
    assert_eq!(reg.len(), 0);
}

#[test]
fn overlapping_registrations_are_refused() {
    let reg = Registry::new(host_fixture());
    let pool = Arc::new(HostRegion::new(16 * 4096).unwrap());
    let _a = reg.register(Arc::new(HostSlice::new(pool.clone(), 0, 8192).unwrap())).unwrap();
    let e = reg.register(Arc::new(HostSlice::new(pool.clone(), 4096, 8192).unwrap())).unwrap_err();
    assert!(matches!(e, RegistryError::Overlap { space: "virtual", .. }), "{e}");
    let e = reg.register(pool.clone()).unwrap_err();
    assert!(matches!(e, RegistryError::Overlap { .. }), "{e}");
    let _b = reg.register(Arc::new(HostSlice::new(pool, 8192, 4096).unwrap())).unwrap();
    assert_eq!(reg.len(), 2);
}

#[test]
fn readers_never_see_a_torn_or_freed_region_while_writers_churn() {
    let reg = Registry::new(host_fixture());
    let pool = Arc::new(HostRegion::new(256 * 4096).unwrap());
    let base = pool.cpu_range().unwrap().start().raw();
    // Half the slots stay registered throughout; the other half churn.
    let stable: Vec<_> = (0..128)
        .map(|i| reg.register(Arc::new(HostSlice::new(pool.clone(), i * 8192, 4096).unwrap())).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for t in 0..2u64 {
        let reg = reg.clone();
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            let mut reader = reg.reader();
            let mut n = 0u64;
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                i = (i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 33) % 256;
                let va = VirtAddr::new(base + i * 4096 + 17);
                let hit = reader.lookup_va(va);
                if i % 2 == 0 {
                    let hit = hit.expect("stable slot always found");
                    assert_eq!(hit.offset, 17);
                    assert_eq!(hit.entry.cpu_range().unwrap().start().raw(), base + i * 4096);
                } else if let Some(hit) = hit {
                    // A churning slot: if seen, it is whole and correct.
                    assert_eq!(hit.entry.cpu_range().unwrap().start().raw(), base + i * 4096);
                    assert_eq!(hit.entry.region().len(), 4096);
                }
                n += 1;
            }
            n
        }));
    }
    for round in 0..300u64 {
        let i = 2 * (round % 128) + 1;
        let g = reg.register(Arc::new(HostSlice::new(pool.clone(), i * 4096, 4096).unwrap())).unwrap();
        assert!(reg.snapshot().lookup_va(VirtAddr::new(base + i * 4096)).is_some());
        drop(g);
        assert!(reg.snapshot().lookup_va(VirtAddr::new(base + i * 4096)).is_none());
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total > 0);
    assert_eq!(reg.len(), stable.len());
}

#[test]
fn attached_resources_drop_before_the_region_is_unregistered() {
    struct Probe(Registry, VirtAddr, Arc<AtomicBool>);
    impl Drop for Probe {
        fn drop(&mut self) {
            // Still registered while attached resources are released.
            self.2.store(self.0.snapshot().lookup_va(self.1).is_some(), Ordering::SeqCst);
        }
    }
    let reg = Registry::new(host_fixture());
    let r = Arc::new(HostRegion::new(4096).unwrap());
    let va = r.cpu_range().unwrap().start();
    let mut g = reg.register(r).unwrap();
    let seen = Arc::new(AtomicBool::new(false));
    g.attach(Probe(reg.clone(), va, seen.clone()));
    drop(g);
    assert!(seen.load(Ordering::SeqCst), "the resource was dropped while the region was still registered");
    assert!(reg.snapshot().lookup_va(va).is_none());
}

fn qemu_switch() -> Arc<Topology> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/qemu-switch");
    Arc::new(Topology::discover(root).expect("qemu-switch fixture"))
}

#[test]
fn unaligned_and_sub_page_regions_are_found_at_every_byte_edge() {
    let reg = Registry::new(host_fixture());
    let pool = Arc::new(HostRegion::new(8 << 20).unwrap());
    let base = pool.cpu_range().unwrap().start().raw();
    // (offset, len): byte-sized neighbours in one page, a region across a 2 MiB boundary at an
    // odd address, one exactly 2 MiB-aligned, and one covering several 2 MiB slots unaligned.
    let shapes =
        [(0x11, 1), (0x12, 0x7), (0x19, 0xfe7), (0x1f_fff3, 0x31), (0x20_0024, 0x1000), (0x40_0000, 0x20_0000)];
    let shapes = [shapes.as_slice(), &[(0x60_0001, 0x1f_fffe)]].concat();
    let guards: Vec<_> = shapes
        .iter()
        .map(|&(o, l)| reg.register(Arc::new(HostSlice::new(pool.clone(), o, l).unwrap())).unwrap())
        .collect();
    let snap = reg.snapshot();
    for (g, &(o, l)) in guards.iter().zip(&shapes) {
        for (probe, want) in [(o, Some(0)), (o + l - 1, Some(l - 1)), (o + l / 2, Some(l / 2))] {
            let hit = snap.lookup_va(VirtAddr::new(base + probe)).expect("inside a region");
            assert_eq!((hit.entry.id(), Some(hit.offset)), (g.id(), want), "offset {probe:#x}");
        }
        for outside in [o.wrapping_sub(1), o + l] {
            if let Some(hit) = snap.lookup_va(VirtAddr::new(base.wrapping_add(outside))) {
                assert_ne!(hit.entry.id(), g.id(), "offset {outside:#x} is outside {o:#x}+{l:#x}");
            }
        }
    }
    assert!(snap.lookup_va(VirtAddr::new(base + 0x10)).is_none());
    assert!(snap.lookup_va(VirtAddr::new(base + 0x20_0024 + 0x1000)).is_none());
}

#[test]
fn bus_lookups_are_per_host_bridge_hierarchy() {
    let topo = qemu_switch();
    let reg = Registry::new(topo.clone());
    // nvme 03:00.0 sits below pci0000:00 (CMB at bus 0xe4000000), 81:00.0 below pci0000:80
    // (CMB at 0xe8000000): each bus address exists only in its own hierarchy.
    let bar = |bdf: &str, offset, len| -> Arc<dyn PeerMemory> {
        Arc::new(peermem::BarRegion { bdf: bdf.parse().unwrap(), bar: 2, offset, len })
    };
    let a = reg.register(bar("0000:03:00.0", 0x123, 0x1001)).unwrap();
    let b = reg.register(bar("0000:81:00.0", 0x123, 0x1001)).unwrap();
    let h = |bdf: &str| reg.hierarchy_of(topo.idx(bdf.parse().unwrap()).unwrap()).unwrap();
    let (h0, h80) = (h("0000:03:00.0"), h("0000:81:00.0"));
    assert_ne!(h0, h80);
    let snap = reg.snapshot();
    let at = |hier, bus| snap.lookup_bus(hier, peermem::BusAddr::new(bus)).map(|hit| (hit.entry.id(), hit.offset));
    assert_eq!(at(h0, 0xe400_0123), Some((a.id(), 0)));
    assert_eq!(at(h0, 0xe400_1123), Some((a.id(), 0x1000)));
    assert_eq!(at(h0, 0xe400_1124), None);
    assert_eq!(at(h0, 0xe400_0122), None);
    assert_eq!(at(h0, 0xe800_0123), None, "81:00.0's window is not on hierarchy pci0000:00");
    assert_eq!(at(h80, 0xe800_0200), Some((b.id(), 0xdd)));
    assert_eq!(at(h80, 0xe400_0200), None);
    assert_eq!(at(usize::MAX, 0xe400_0200), None, "an unknown hierarchy finds nothing");
    drop(a);
    let snap = reg.snapshot();
    assert!(snap.lookup_bus(h0, peermem::BusAddr::new(0xe400_0123)).is_none());
    assert!(snap.lookup_bus(h80, peermem::BusAddr::new(0xe800_0123)).is_some());
}

#[test]
fn no_lookup_finds_a_region_after_its_unregister_returned() {
    use std::sync::atomic::AtomicU64;
    const SLOTS: u64 = 1024;
    let reg = Registry::new(host_fixture());
    let pool = Arc::new(HostRegion::new(SLOTS * 4096).unwrap());
    let base = pool.cpu_range().unwrap().start().raw();
    // Slot i is registered and unregistered once, in order; `gone` counts the unregisters that
    // have returned. A reader that has seen `gone == g` must miss every slot below g.
    let gone = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|t| {
            let (reg, gone, stop) = (reg.clone(), gone.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reader = reg.reader();
                let (mut x, mut checks, mut hits) = (t + 1, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let g = gone.load(Ordering::Acquire);
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // Either a slot already gone (must miss) or the one being churned now.
                    let i = if g > 0 && x >> 63 == 0 { (x >> 20) % g } else { g };
                    let hit = reader.lookup_va(VirtAddr::new(base + i * 4096 + 99)).map(|h| h.entry.clone());
                    if i < g {
                        assert!(hit.is_none(), "slot {i} found after its unregister returned ({g} gone)");
                        checks += 1;
                    } else if let Some(e) = hit {
                        assert_eq!(e.cpu_range().unwrap().start().raw(), base + i * 4096);
                        hits += 1;
                    }
                }
                (checks, hits)
            })
        })
        .collect();
    for i in 0..SLOTS {
        let g = reg.register(Arc::new(HostSlice::new(pool.clone(), i * 4096, 4096).unwrap())).unwrap();
        std::thread::yield_now();
        drop(g);
        gone.store(i + 1, Ordering::Release);
    }
    stop.store(true, Ordering::Relaxed);
    let checks: u64 = readers.into_iter().map(|r| r.join().unwrap().0).sum();
    assert!(checks > 0);
    assert_eq!(reg.len(), 0);
}

#[test]
fn handles_of_another_registry_or_topology_are_typed_errors() {
    let (ta, tb) = (host_fixture(), host_fixture());
    let (a, b) = (Registry::new(ta.clone()), Registry::new(tb.clone()));
    let nic = "0000:00:03.0".parse().unwrap();
    let g = a.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
    // An entry of registry a, resolved by registry b: refused, for every kind of peer.
    assert_eq!(b.resolve(&g, Peer::Cpu).unwrap_err(), ResolveError::ForeignEntry(g.id()));
    assert_eq!(b.resolve_uncached(&g, b.peer(nic).unwrap()).unwrap_err(), ResolveError::ForeignEntry(g.id()));
    // A peer of topology b (same sysroot, another discovery), used with registry a: refused,
    // not resolved against whatever device has that index in a.
    let foreign = b.peer(nic).unwrap();
    let e = a.resolve(&g, foreign).unwrap_err();
    assert!(matches!(e, ResolveError::ForeignPeer { topology, .. } if topology == tb.id()), "{e}");
    assert_eq!(a.resolve(&g, a.peer(nic).unwrap()).unwrap().len, 4096);
    // A device index of topology b given to registry a.
    let e = a.hierarchy_of(tb.idx(nic).unwrap()).unwrap_err();
    assert!(matches!(e, RegistryError::ForeignHandle { topology, .. } if topology == tb.id()), "{e}");
    assert!(a.hierarchy_of(ta.idx(nic).unwrap()).is_ok());
    // Two registries over one topology share its device indices, but not their entries.
    let a2 = Registry::new(ta.clone());
    assert!(a2.resolve(&g, a.peer(nic).unwrap()).is_err());
    let g2 = a2.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
    assert!(a2.resolve(&g2, a.peer(nic).unwrap()).is_ok());
    assert_eq!(a.resolve(&g2, Peer::Cpu).unwrap_err(), ResolveError::ForeignEntry(g2.id()));
}
