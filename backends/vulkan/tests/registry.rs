//! A Vulkan region in the core registry: registered, found by virtual address, and resolved
//! against a PCI peer of a captured topology (fixtures/qemu-switch), with the reason spelled out.

mod common;

use std::sync::Arc;

use common::{device, registry};
use peermem::{Peer, PeerMemory, Provider, RouteKind, VirtAddr};
use peermem_vulkan::{Placement, VulkanRegion};

const LEN: u64 = 1 << 20;

#[test]
fn a_lavapipe_region_resolves_to_its_cpu_mapping_for_a_pci_peer_because_it_is_host_memory() {
    let Some(dev) = device() else { return };
    let reg = registry("qemu-switch");
    let region = Arc::new(dev.allocate(LEN, Placement::DeviceLocal).unwrap());
    let guard = reg.register(region.clone()).unwrap();
    assert_eq!(guard.len(), LEN);
    assert_eq!(guard.provider(), region.provider());

    // Lookup by any address inside the region.
    let va = region.cpu_range().expect("lavapipe memory is host-visible").start();
    let snap = reg.snapshot();
    let hit = snap.lookup_va(VirtAddr::new(va.raw() + 12345)).expect("registered");
    assert_eq!((hit.entry.id(), hit.offset), (guard.id(), 12345));
    let found: &Arc<dyn PeerMemory> = hit.entry.region();
    assert!(std::ptr::addr_eq(Arc::as_ptr(found), Arc::as_ptr(&region)), "the same region object");
    assert!(snap.lookup_va(VirtAddr::new(va.raw() + LEN)).is_none());
    drop(snap);

    // An NVMe of the captured guest resolves it.
    let nvme = reg.peer("0000:03:00.0".parse().unwrap()).unwrap();
    let route = reg.resolve(&guard, nvme).unwrap();
    let why = region.explain(&route);
    if dev.info().is_lavapipe() {
        assert_eq!(region.provider(), Provider::Host { numa: None });
        assert_eq!(route.kind, RouteKind::CpuMapped(va), "{why:#?}");
        assert_eq!(route.dma_address(), None, "host memory has no BAR address");
        assert!(why.iter().any(|r| r.contains("host memory")), "{why:#?}");
        assert!(why.iter().any(|r| r.contains("lavapipe")), "{why:#?}");
        assert!(why.iter().any(|r| r.contains("cpu_mapped")), "{why:#?}");
        assert!(why.iter().any(|r| r.contains("no VK_EXT_pci_bus_info")), "{why:#?}");
        let dbg = format!("{region:?}");
        assert!(dbg.contains("Host") && dbg.contains("no VK_EXT_pci_bus_info"), "{dbg}");
    } else {
        // A real GPU: CpuMapped when the memory is mapped, KernelImport for a dma-buf, else bounce.
        assert!(matches!(route.kind, RouteKind::CpuMapped(_) | RouteKind::KernelImport | RouteKind::Bounce(_)));
    }
    // The CPU itself is always pointed at the mapping.
    assert_eq!(reg.resolve(&guard, Peer::Cpu).unwrap().kind, RouteKind::CpuMapped(va));

    // Unregistering: lookups miss, later resolves fail, the region lives on.
    let entry = guard.entry().clone();
    drop(guard);
    assert!(reg.snapshot().lookup_va(va).is_none());
    assert!(reg.resolve(&entry, nvme).is_err());
    region.write_at(0, b"still here").unwrap();
}

#[test]
fn an_imported_region_registers_like_the_original() {
    let Some(a) = device() else { return };
    let b = common::device().unwrap();
    let reg = registry("qemu-switch");
    let ra = Arc::new(a.allocate(LEN, Placement::Mappable).unwrap());
    let rb: Arc<VulkanRegion> = Arc::new(b.import(ra.export().unwrap()).unwrap());
    let ga = reg.register(ra.clone()).unwrap();
    let gb = reg.register(rb.clone()).unwrap();
    assert_ne!(ga.id(), gb.id(), "two mappings of one memory are two regions");
    let hit = reg.snapshot().lookup_va(rb.cpu_range().unwrap().start()).map(|h| h.entry.id());
    assert_eq!(hit, Some(gb.id()));
    let peer = reg.peer("0000:04:00.0".parse().unwrap()).unwrap();
    assert_eq!(reg.resolve(&gb, peer).unwrap().kind, RouteKind::CpuMapped(rb.cpu_range().unwrap().start()));
}
