//! Export -> import between two VkDevices in one process, GPU and CPU copies, and the fd imports
//! a driver must refuse. Runs on the real driver (lavapipe in CI).

mod common;

use std::sync::Arc;

use common::{device, pattern};
use peermem::{AccessError, Backing, HostRegion, PeerMemory, Provider, Side};
use peermem_vulkan::{Device, Export, HandleType, Origin, Placement, VkError, VulkanRegion};

const LEN: u64 = 1 << 20;
const HALF: u64 = LEN / 2;

fn read(r: &VulkanRegion, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    r.read_at(off, &mut b).unwrap();
    b
}

fn second_device(a: &Device) -> Device {
    let b = Device::open(common::selector()).expect("a second VkDevice on the same physical device");
    assert_eq!(a.info().device_uuid, b.info().device_uuid);
    b
}

#[test]
fn exported_memory_is_shared_both_ways_between_two_vkdevices() {
    let Some(a) = device() else { return };
    let b = second_device(&a);
    let ra = a.allocate(LEN, Placement::Mappable).unwrap();
    assert_eq!(ra.origin(), Origin::Allocated(ra.handle_type().unwrap()));
    assert!(ra.cpu_mapping().is_some(), "mappable placement gives a CPU mapping");
    ra.write_at(0, &pattern(1, HALF as usize)).unwrap();

    let export = ra.export().unwrap();
    assert_eq!(export.len, LEN);
    let rb = b.import(export).unwrap();
    assert_eq!(rb.origin(), Origin::Imported(ra.handle_type().unwrap()));
    assert_eq!(rb.len(), LEN);
    assert_ne!(rb.cpu_range(), ra.cpu_range(), "B maps the memory on its own");

    // A -> B: the CPU sees A's write through B's mapping, and B's GPU copies it.
    assert_eq!(read(&rb, 0, HALF), pattern(1, HALF as usize));
    let scratch = b.allocate(LEN, Placement::Mappable).unwrap();
    b.copy(&rb, 0, &scratch, 0, HALF).unwrap();
    assert_eq!(read(&scratch, 0, HALF), pattern(1, HALF as usize));

    // B -> A: B's GPU writes the second half, A reads it through its own mapping and GPU.
    scratch.write_at(HALF, &pattern(2, HALF as usize)).unwrap();
    b.copy(&scratch, HALF, &rb, HALF, HALF).unwrap();
    assert_eq!(read(&ra, HALF, HALF), pattern(2, HALF as usize));
    let back = a.allocate(LEN, Placement::Mappable).unwrap();
    a.copy(&ra, 0, &back, 0, LEN).unwrap();
    assert_eq!(read(&back, 0, HALF), pattern(1, HALF as usize));
    assert_eq!(read(&back, HALF, HALF), pattern(2, HALF as usize));
}

#[test]
fn an_import_can_be_exported_again_and_keeps_backing_and_provider() {
    let Some(a) = device() else { return };
    let b = second_device(&a);
    let ra = a.allocate(LEN, Placement::DeviceLocal).unwrap();
    let rb = b.import(ra.export().unwrap()).unwrap();
    let rc = a.import(rb.export().unwrap()).unwrap();
    assert_eq!(rc.provider(), ra.provider());
    match (ra.backing(), rc.backing()) {
        (Backing::OpaqueFd(_), Backing::OpaqueFd(_)) | (Backing::DmaBuf(_), Backing::DmaBuf(_)) => {}
        (x, y) => panic!("backing changed through re-export: {x:?} -> {y:?}"),
    }
    if ra.cpu_mapping().is_some() {
        rc.write_at(100, b"third hop").unwrap();
        let mut buf = [0u8; 9];
        ra.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"third hop");
    }
    if a.info().pci.is_none() {
        assert_eq!(ra.provider(), Provider::Host { numa: None }, "no VK_EXT_pci_bus_info: host memory, stated");
    }
}

#[test]
fn lavapipe_reports_its_measured_caps_and_exports_opaque_fds() {
    let Some(a) = device() else { return };
    if !a.info().is_lavapipe() {
        eprintln!("not lavapipe ({}): nothing to check", a.info());
        return;
    }
    let caps = a.info().caps;
    assert!(caps.opaque_fd.exportable && caps.opaque_fd.importable);
    assert!(caps.dma_buf.importable && !caps.dma_buf.exportable);
    assert!(caps.host_allocation.importable);
    assert_eq!(caps.min_host_pointer_alignment, Some(4096));
    assert_eq!(a.info().pci, None);
    let r = a.allocate(4096, Placement::DeviceLocal).unwrap();
    assert_eq!(r.handle_type(), Some(HandleType::OpaqueFd));
    assert!(matches!(r.backing(), Backing::OpaqueFd(_)));
}

#[test]
fn a_memfd_imports_as_a_dma_buf_and_is_shared_both_ways() {
    let Some(dev) = device() else { return };
    if !dev.info().caps.dma_buf.importable {
        eprintln!("{} cannot import dma-bufs: nothing to check", dev.info());
        return;
    }
    let host = Arc::new(HostRegion::new(LEN).unwrap());
    host.write_at(0, &pattern(3, HALF as usize)).unwrap();
    let e = Export::dma_buf(host.export_fd().unwrap(), LEN, host.provider());
    let imp = match dev.import(e) {
        Ok(i) => i,
        // Only lavapipe is known to take a memfd as a dma-buf; a real driver wants a real one.
        Err(e) if !dev.info().is_lavapipe() => return eprintln!("driver refuses a memfd as dma-buf: {e}"),
        Err(e) => panic!("lavapipe accepts a memfd as a dma-buf: {e}"),
    };
    assert_eq!(imp.origin(), Origin::Imported(HandleType::DmaBuf));
    assert!(matches!(imp.backing(), Backing::DmaBuf(_)));
    assert_eq!(imp.provider(), host.provider(), "the exporter's provider, as declared");
    let local = dev.allocate(LEN, Placement::Mappable).unwrap();
    dev.copy(&imp, 0, &local, 0, HALF).unwrap();
    assert_eq!(read(&local, 0, HALF), pattern(3, HALF as usize));
    local.write_at(HALF, &pattern(4, HALF as usize)).unwrap();
    dev.copy(&local, HALF, &imp, HALF, HALF).unwrap();
    let mut b = vec![0u8; HALF as usize];
    host.read_at(HALF, &mut b).unwrap();
    assert_eq!(b, pattern(4, HALF as usize));
}

#[test]
fn fd_imports_larger_than_the_fd_or_from_another_driver_are_refused() {
    let Some(dev) = device() else { return };
    // A dma-buf (here a memfd) of one page cannot back a 64 KiB import.
    let page = HostRegion::new(4096).unwrap();
    let e = Export::dma_buf(page.export_fd().unwrap(), 64 * 1024, page.provider());
    match dev.import(e) {
        Err(VkError::ImportTooSmall { have: 4096, .. }) => {}
        Err(VkError::CannotImport { .. }) if !dev.info().caps.dma_buf.importable => {}
        other => panic!("expected ImportTooSmall, got {other:?}"),
    }

    let r = dev.allocate(64 * 1024, Placement::Mappable).unwrap();
    // Asking for more than was exported.
    let mut e = r.export().unwrap();
    e.len = 128 * 1024;
    assert!(matches!(dev.import(e), Err(VkError::ImportTooSmall { need: 0x20000, have: 0x10000, .. })));
    // A layout claiming a larger allocation than the fd holds (lavapipe: memfd = header + data).
    let mut e = r.export().unwrap();
    let l = e.layout.as_mut().unwrap();
    l.alloc_size = 1 << 30;
    e.len = 1 << 30;
    match dev.import(e) {
        Err(VkError::ImportTooSmall { need, have, .. }) => assert!(need == 1 << 30 && have < need),
        Err(VkError::Call { .. }) if !dev.info().is_lavapipe() => {} // size not visible on that fd
        other => panic!("expected ImportTooSmall, got {other:?}"),
    }
    // An opaque fd of another device/driver.
    if r.handle_type() == Some(HandleType::OpaqueFd) {
        let mut e = r.export().unwrap();
        e.layout.as_mut().unwrap().driver_uuid[0] ^= 0xff;
        let err = dev.import(e).unwrap_err();
        assert!(matches!(err, VkError::ForeignDevice { .. }), "{err}");
        let mut e = r.export().unwrap();
        e.layout = None;
        assert!(matches!(dev.import(e), Err(VkError::BadDescriptor(_))));
    }
    let e = Export { len: 0, ..r.export().unwrap() };
    assert!(matches!(dev.import(e), Err(VkError::BadLength { .. })));
}

#[test]
fn gpu_copies_check_ranges_and_devices() {
    let Some(a) = device() else { return };
    let b = second_device(&a);
    let x = a.allocate(8192, Placement::Mappable).unwrap();
    let y = a.allocate(4096, Placement::Mappable).unwrap();
    let z = b.allocate(4096, Placement::Mappable).unwrap();
    let err = a.copy(&x, 0, &y, 0, 8192).unwrap_err();
    assert!(matches!(err, VkError::OutOfRange { which: "destination", .. }), "{err}");
    assert!(matches!(a.copy(&x, u64::MAX, &y, 0, 2), Err(VkError::OutOfRange { which: "source", .. })));
    assert!(matches!(a.copy(&x, 0, &z, 0, 16), Err(VkError::ForeignRegion { which: "destination", .. })));
    assert!(matches!(a.copy(&x, 0, &x, 100, 200), Err(VkError::BadLength { .. })));
    x.write_at(0, &pattern(5, 8192)).unwrap();
    a.copy(&x, 0, &x, 4096, 4096).unwrap();
    a.copy(&x, 4096 + 1000, &y, 3, 1000).unwrap();
    assert_eq!(read(&y, 3, 1000), pattern(5, 8192)[1000..2000].to_vec());
    a.wait_idle().unwrap();
    assert_eq!(a.copy_timeout().as_secs(), 10);
}

#[test]
fn cpu_copies_work_between_any_mapped_regions() {
    let Some(dev) = device() else { return };
    let host = HostRegion::new(LEN).unwrap();
    host.write_at(0, &pattern(6, LEN as usize)).unwrap();
    let gpu = dev.allocate(LEN, Placement::Mappable).unwrap();
    host.copy_to(0, &gpu, 0, LEN).unwrap();
    assert_eq!(read(&gpu, 0, LEN), pattern(6, LEN as usize));
    gpu.copy_to(10, &gpu, 20, 1000).unwrap(); // overlapping: memmove
    assert_eq!(read(&gpu, 20, 1000), pattern(6, LEN as usize)[10..1010].to_vec());
    assert!(matches!(host.copy_to(LEN - 1, &gpu, 0, 2), Err(AccessError::OutOfRange { side: Side::Source, .. })));
    let bar = peermem::BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 };
    assert_eq!(bar.copy_to(0, &gpu, 0, 1), Err(AccessError::NoCpuMapping { side: Side::Source }));
}

#[test]
fn a_copy_that_outlives_its_bounded_wait_keeps_its_regions_alive() {
    let Some(dev) = device() else { return };
    if !dev.info().is_lavapipe() {
        return eprintln!("timing assumption (128 MiB take > 1 ms) only made for lavapipe");
    }
    const BIG: u64 = 128 << 20;
    let src = dev.allocate(BIG, Placement::Mappable).unwrap();
    let dst = dev.allocate(BIG, Placement::Mappable).unwrap();
    src.write_at(BIG - 4096, &pattern(7, 4096)).unwrap();
    dev.set_copy_timeout(std::time::Duration::from_millis(1));
    let err = dev.copy(&src, 0, &dst, 0, BIG).unwrap_err();
    assert!(matches!(err, VkError::Timeout(_)), "{err}");
    // The copy still runs: dropping its source now must not free memory the GPU reads.
    drop(src);
    dev.set_copy_timeout(std::time::Duration::from_secs(30));
    dev.wait_idle().unwrap();
    assert_eq!(read(&dst, BIG - 4096, 4096), pattern(7, 4096));
    // The next copy after a timeout waits for the previous one first and then works.
    let small = dev.allocate(4096, Placement::Mappable).unwrap();
    dev.copy(&dst, BIG - 4096, &small, 0, 4096).unwrap();
    assert_eq!(read(&small, 0, 4096), pattern(7, 4096));
}

/// What a CUDA import of Vulkan memory needs (`cuImportExternalMemory` takes opaque fds only):
/// device-local memory exported as an opaque fd on request, a fresh fd per export (the importer
/// owns the one it is given), the allocation's size and dedication, the exporter's UUID; the fd
/// shows the same bytes to another importer. A handle type the device cannot export is refused.
#[test]
fn device_local_memory_exports_as_an_opaque_fd_on_request_with_what_an_importer_needs() {
    let Some(a) = device() else { return };
    if !a.info().caps.opaque_fd.exportable {
        eprintln!("{}: no opaque-fd export: nothing to check", a.info());
        return;
    }
    let r = a.allocate_with(LEN + 100, Placement::DeviceLocal, HandleType::OpaqueFd).unwrap();
    assert_eq!(r.handle_type(), Some(HandleType::OpaqueFd));
    let (e1, e2) = (r.export().unwrap(), r.export().unwrap());
    use std::os::fd::AsRawFd;
    assert_ne!(e1.fd.as_raw_fd(), e2.fd.as_raw_fd(), "each export is its own fd");
    let l = e1.layout.expect("an opaque fd carries its allocation's layout");
    assert!(l.alloc_size >= LEN + 100, "{l:?}");
    assert_eq!(l.device_uuid, a.info().device_uuid);
    assert_eq!(e1.provider, a.info().provider(), "the provider an importer checks is the device's");
    // Written through the GPU into device-local memory, read back through the other fd.
    let host = Arc::new(HostRegion::new(LEN).unwrap());
    host.write_at(0, &pattern(9, LEN as usize)).unwrap();
    let staged = a.import_host(host).unwrap();
    a.copy(&staged, 0, &r, 0, LEN).unwrap();
    let b = second_device(&a);
    let rb = b.import(e2).unwrap();
    let out = b.allocate(LEN, Placement::Mappable).unwrap();
    b.copy(&rb, 0, &out, 0, LEN).unwrap();
    assert!(read(&out, 0, LEN) == pattern(9, LEN as usize), "the opaque fd shows the same bytes");
    drop(e1);
    if !a.info().caps.dma_buf.exportable {
        let e = a.allocate_with(4096, Placement::DeviceLocal, HandleType::DmaBuf).unwrap_err();
        assert!(matches!(e, VkError::Unsupported { .. }) && e.to_string().contains("dma-buf"), "{e}");
    }
}
