//! Host-pointer imports (VK_EXT_external_memory_host): a registered `HostRegion` used by the GPU
//! in place, and the alignment and size rules checked by the backend even where the driver
//! (lavapipe) does not enforce them.

mod common;

use std::sync::Arc;

use common::{device, pattern, registry};
use peermem::{Backing, BarRegion, HostRegion, HostSlice, PeerMemory, RegistryError, VirtAddr};
use peermem_vulkan::{Origin, Placement, VkError};

const LEN: u64 = 1 << 20;

#[test]
fn a_registered_host_region_is_used_by_the_gpu_in_place() {
    let Some(dev) = device() else { return };
    let reg = registry("qemu-switch");
    let host = Arc::new(HostRegion::new(LEN).unwrap());
    let guard = reg.register(host.clone()).unwrap();
    host.write_at(0, &pattern(21, LEN as usize)).unwrap();

    let imp = dev.import_host(host.clone()).unwrap();
    assert_eq!(imp.origin(), Origin::HostPointer);
    assert_eq!(imp.len(), LEN);
    assert_eq!(imp.cpu_range(), host.cpu_range(), "the GPU uses the host pages, no copy");
    assert_eq!(imp.provider(), host.provider());
    assert!(matches!(imp.backing(), Backing::HostPages));
    assert!(imp.export().is_err(), "the source exports itself");

    // The import's address is the registered host region's.
    let hit = reg
        .snapshot()
        .lookup_va(VirtAddr::new(imp.cpu_range().unwrap().start().raw() + 4096))
        .map(|h| (h.entry.id(), h.offset));
    assert_eq!(hit, Some((guard.id(), 4096)));
    // Registering the same pages twice is an overlap: register the source or the import.
    let dup = reg.register(Arc::new(dev.import_host(host.clone()).unwrap()));
    assert!(matches!(dup, Err(RegistryError::Overlap { .. })), "{dup:?}");

    // GPU reads the host pages ...
    let gpu = dev.allocate(LEN, Placement::Mappable).unwrap();
    dev.copy(&imp, 0, &gpu, 0, LEN).unwrap();
    let mut buf = vec![0u8; LEN as usize];
    gpu.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(21, LEN as usize));
    // ... and writes them.
    gpu.write_at(0, &pattern(22, LEN as usize)).unwrap();
    dev.copy(&gpu, 0, &imp, 0, LEN).unwrap();
    host.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(22, LEN as usize));
}

#[test]
fn misaligned_host_imports_are_refused_with_the_alignment() {
    let Some(dev) = device() else { return };
    let Some(align) = dev.info().caps.min_host_pointer_alignment else {
        return eprintln!("{} has no VK_EXT_external_memory_host: nothing to check", dev.info());
    };
    let pool = Arc::new(HostRegion::new(4 * align).unwrap());
    let start = pool.cpu_range().unwrap().start().raw();
    for off in [64, align / 2, align + 8] {
        let s = Arc::new(HostSlice::new(pool.clone(), off, align).unwrap());
        match dev.import_host(s) {
            Err(VkError::Misaligned { addr, align: a, misalign, .. }) => {
                assert_eq!((addr.raw(), a, misalign), (start + off, align, off % align));
            }
            other => panic!("offset {off:#x}: expected Misaligned, got {other:?}"),
        }
    }
    // Aligned slices of whole alignment units import.
    let s = Arc::new(HostSlice::new(pool.clone(), align, 2 * align).unwrap());
    assert_eq!(dev.import_host(s).unwrap().len(), 2 * align);
}

#[test]
fn host_imports_of_a_partial_alignment_unit_are_refused() {
    let Some(dev) = device() else { return };
    let Some(align) = dev.info().caps.min_host_pointer_alignment else {
        return eprintln!("{} has no VK_EXT_external_memory_host: nothing to check", dev.info());
    };
    let pool = Arc::new(HostRegion::new(4 * align).unwrap());
    for len in [100, align - 1, align + 1, 3 * align - 64] {
        let s = Arc::new(HostSlice::new(pool.clone(), 0, len).unwrap());
        match dev.import_host(s) {
            Err(VkError::BadImportSize { len: l, align: a, .. }) => assert_eq!((l, a), (len, align)),
            other => panic!("len {len:#x}: expected BadImportSize, got {other:?}"),
        }
    }
    let err = dev.import_host(Arc::new(HostSlice::new(pool, 0, 100).unwrap())).unwrap_err();
    assert!(err.to_string().contains("minImportedHostPointerAlignment"), "{err}");
}

#[test]
fn regions_without_a_cpu_mapping_cannot_be_imported_as_host_memory() {
    let Some(dev) = device() else { return };
    if dev.info().caps.min_host_pointer_alignment.is_none() {
        return;
    }
    let bar = Arc::new(BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 1 << 20 });
    assert!(matches!(dev.import_host(bar), Err(VkError::NotMapped { .. })));
}
