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
