//! Surprise removal as the registry sees it: a removed device's regions die (lookups miss,
//! resolves fail with `DeviceGone`), other devices keep working, nothing new registers on it,
//! and it comes back only at the same addresses. The sweep finds devices whose sysfs directory
//! vanished. Captured sysroots only, so these run anywhere; the live removal is a guest test.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use peermem::{BarRegion, BusAddr, HostRegion, Peer, PeerMemory, Registry, RegistryError, ResolveError, Topology};

const SWITCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/qemu-switch");

fn copy_switch() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-a").arg(format!("{SWITCH}/.")).arg(d.path()).status().unwrap();
    assert!(st.success());
    d
}

fn bar(bdf: &str, offset: u64, len: u64) -> Arc<dyn PeerMemory> {
    Arc::new(BarRegion { bdf: bdf.parse().unwrap(), bar: 2, offset, len })
}

#[test]
fn a_removed_device_s_regions_die_and_the_others_keep_working() {
    let topo = Arc::new(Topology::discover(SWITCH).unwrap());
    let reg = Registry::new(topo.clone());
    let a1 = reg.register(bar("0000:03:00.0", 0, 0x1000)).unwrap();
    let a2 = reg.register(bar("0000:03:00.0", 0x10_0000, 0x2000)).unwrap();
    let b = reg.register(bar("0000:04:00.0", 0, 0x1000)).unwrap();
    let host = reg.register(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
    let gone: peermem::Bdf = "0000:03:00.0".parse().unwrap();
    let h0 = reg.hierarchy_of(topo.idx(gone).unwrap()).unwrap();
    let peer_b = reg.peer("0000:04:00.0".parse().unwrap()).unwrap();
    let peer_gone = reg.peer(gone).unwrap();
    assert!(reg.resolve(&a1, peer_b).is_ok());

    assert_eq!(reg.device_gone(gone), 2);
    assert!(reg.is_device_gone(gone));
    assert_eq!(reg.len(), 2);
    let snap = reg.snapshot();
    assert!(snap.lookup_bus(h0, BusAddr::new(0xe400_0000)).is_none(), "a dead region is not found");
    assert!(snap.lookup_bus(h0, BusAddr::new(0xe410_0000)).is_none());
    for e in [&a1, &a2] {
        assert!(e.is_gone() && !e.is_live());
        assert_eq!(reg.resolve(e, peer_b).unwrap_err(), ResolveError::DeviceGone { bdf: gone, id: e.id() });
        assert_eq!(reg.resolve(e, Peer::Cpu).unwrap_err(), ResolveError::DeviceGone { bdf: gone, id: e.id() });
    }
    // the other NVMe: still found, still resolves, but not towards the removed one
    let hit = snap.lookup_bus(h0, b.bus_addr().unwrap()).expect("other devices keep their regions");
    assert_eq!(hit.entry.id(), b.id());
    assert!(reg.resolve(&b, Peer::Cpu).is_err_and(|e| matches!(e, ResolveError::NoCpuMapping(_))));
    assert_eq!(reg.resolve(&b, peer_gone).unwrap_err(), ResolveError::PeerGone(gone));
    assert!(reg.resolve(&host, peer_b).is_ok());
    // nothing new registers on it
    assert!(matches!(reg.register(bar("0000:03:00.0", 0, 0x1000)), Err(RegistryError::DeviceGone(d)) if d == gone));
    // a second report changes nothing; dropping the dead guards does not unregister twice
    assert_eq!(reg.device_gone(gone), 0);
    drop(a1);
    drop(a2);
    assert_eq!(reg.len(), 2);
    drop(b);
    assert_eq!(reg.len(), 1);
}

#[test]
fn a_device_back_at_the_same_addresses_registers_again() {
    let topo = Arc::new(Topology::discover(SWITCH).unwrap());
    let reg = Registry::new(topo.clone());
    let bdf = "0000:03:00.0".parse().unwrap();
    let old = reg.register(bar("0000:03:00.0", 0, 0x1000)).unwrap();
    reg.device_gone(bdf);
    let now = Topology::discover(SWITCH).unwrap();
    reg.device_back(bdf, &now).unwrap();
    assert!(!reg.is_device_gone(bdf));
    let new = reg.register(bar("0000:03:00.0", 0, 0x1000)).expect("registers again once back");
    assert!(reg.resolve(&new, Peer::Pci(topo.idx(bdf).unwrap())).is_ok());
    assert!(matches!(reg.resolve(&old, Peer::Cpu), Err(ResolveError::DeviceGone { .. })), "old regions stay dead");
    drop(old);
    assert_eq!(reg.len(), 1, "dropping the dead guard leaves the new registration alone");
}

#[test]
fn a_device_back_at_other_addresses_stays_gone() {
    let reg = Registry::new(Arc::new(Topology::discover(SWITCH).unwrap()));
    let bdf = "0000:03:00.0".parse().unwrap();
    reg.device_gone(bdf);
    let d = copy_switch();
    let res = d.path().join("sys/bus/pci/devices/0000:03:00.0/resource");
    let text = std::fs::read_to_string(&res).unwrap();
    std::fs::write(
        &res,
        text.replace("0x00000000e4000000 0x00000000e7ffffff", "0x00000000d0000000 0x00000000d3ffffff"),
    )
    .unwrap();
    let now = Topology::discover(d.path()).unwrap();
    let e = reg.device_back(bdf, &now).unwrap_err();
    assert!(matches!(e, RegistryError::DeviceMoved { bdf: b, .. } if b == bdf), "{e}");
    assert!(reg.is_device_gone(bdf));
    // not there at all: still gone
    std::fs::remove_dir_all(
        d.path().join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0"),
    )
    .unwrap();
    std::fs::remove_file(d.path().join("sys/bus/pci/devices/0000:03:00.0")).unwrap();
    let now = Topology::discover(d.path()).unwrap();
    assert!(matches!(reg.device_back(bdf, &now), Err(RegistryError::DeviceGone(b)) if b == bdf));
}

#[test]
fn the_sweep_marks_devices_whose_sysfs_directory_vanished() {
    let d = copy_switch();
    let reg = Registry::new(Arc::new(Topology::discover(d.path()).unwrap()));
    let r = reg.register(bar("0000:04:00.0", 0, 0x1000)).unwrap();
    assert_eq!(peermem::hotplug::sweep(&reg, d.path()), 0);
    let dir = Path::new("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0");
    std::fs::remove_dir_all(d.path().join(dir)).unwrap();
    assert_eq!(peermem::hotplug::sweep(&reg, d.path()), 1);
    assert!(reg.is_device_gone("0000:04:00.0".parse().unwrap()));
    assert!(r.is_gone());
    assert!(!reg.is_device_gone("0000:03:00.0".parse().unwrap()));
}

#[test]
fn an_unknown_device_provides_nothing_to_kill() {
    let reg = Registry::new(Arc::new(Topology::discover(SWITCH).unwrap()));
    assert_eq!(reg.device_gone("0000:42:00.0".parse().unwrap()), 0);
    assert!(!reg.is_device_gone("0000:42:00.0".parse().unwrap()));
}

#[test]
fn no_lookup_or_resolve_finds_a_region_after_device_gone_returned() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let topo = Arc::new(Topology::discover(SWITCH).unwrap());
    let gone: peermem::Bdf = "0000:03:00.0".parse().unwrap();
    let h0 = topo.host_bridges().iter().position(|h| h.name == "pci0000:00").unwrap();
    for round in 0..20 {
        let reg = Registry::new(topo.clone());
        let r = reg.register(bar("0000:03:00.0", 0, 0x1000)).unwrap();
        let peer = reg.peer("0000:04:00.0".parse().unwrap()).unwrap();
        let bus = r.bus_addr().unwrap();
        let returned = AtomicBool::new(false);
        let (late, seen) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let mut reader = reg.reader();
                    loop {
                        // `returned` is read first: a hit after it was set came after device_gone.
                        let after = returned.load(Ordering::SeqCst);
                        let hit = reader.snapshot().lookup_bus(h0, bus).map(|h| h.entry.clone());
                        let resolved =
                            hit.as_ref().is_some_and(|e| reg.resolve(e, peer).is_ok()) || reg.resolve(&r, peer).is_ok();
                        if resolved || hit.is_some() {
                            seen.fetch_add(1, Ordering::Relaxed);
                            if after {
                                late.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if after {
                            break;
                        }
                    }
                });
            }
            // the readers are finding the region before it dies
            while seen.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            reg.device_gone(gone);
            returned.store(true, Ordering::SeqCst);
        });
        assert_eq!(late.load(Ordering::Relaxed), 0, "round {round}: a region was found after device_gone returned");
    }
}
