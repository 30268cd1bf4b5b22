//! The CUDA backend against the real driver. Without one (no libcuda, no device) each test
//! checks the typed error instead and says so on stderr ("no CUDA driver: skipped").

use std::sync::Arc;

use peermem::{Backing, HostRegion, PeerMemory, Provider, Registry, RouteKind, Topology};
use peermem_cuda::{Alloc, Cuda, CudaError, Device, DevicePtr, Foreign, Origin};

/// Device 0, or None after checking that the reason is a typed "no CUDA here" error.
fn gpu(test: &str) -> Option<Device> {
    match Cuda::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(e.is_unavailable(), "{test}: opening cuda:0 failed with an unexpected error: {e}");
            let s = e.to_string();
            assert!(s.contains("NVIDIA driver") || s.contains("CUDA device"), "{test}: {s}");
            eprintln!("{test}: no CUDA driver: skipped ({s})");
            None
        }
    }
}

#[test]
fn without_a_driver_every_entry_point_is_the_same_typed_error() {
    match Cuda::driver_version() {
        Ok(v) => {
            let devs = Cuda::devices().unwrap();
            eprintln!("CUDA {v}: {} device(s): {:?}", devs.len(), devs.iter().map(|d| &d.name).collect::<Vec<_>>());
            let n = devs.len();
            assert!(
                matches!(Cuda::open(n), Err(CudaError::NoSuchDevice { ordinal, count }) if ordinal == n && count == n)
            );
        }
        Err(e) => {
            assert!(matches!(e, CudaError::NoDriver { .. }), "{e:?}");
            assert!(e.to_string().starts_with("libcuda.so.1 not found: no NVIDIA driver"), "{e}");
            assert!(matches!(Cuda::devices(), Err(CudaError::NoDriver { .. })));
            assert!(matches!(Cuda::open(0), Err(CudaError::NoDriver { .. })));
            eprintln!("no CUDA driver: skipped the device checks ({e})");
        }
    }
}

#[test]
fn device_memory_round_trips_through_pinned_copies_and_scratch() {
    let Some(gpu) = gpu("round trip") else { return };
    let len = 3 << 20;
    let vram = gpu.allocate(len + 123).unwrap();
    assert!(vram.alloc_size() >= vram.len());
    assert!(vram.cpu_mapping().is_none());
    let host = Arc::new(HostRegion::new(len).unwrap());
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    host.write_at(0, &data).unwrap();
    let pinned = gpu.pin(host.clone()).unwrap();
    gpu.copy_to_device(&pinned, 0, &vram, 123, len).unwrap();
    let mut back = vec![0u8; len as usize];
    gpu.read(&vram, 123, &mut back).unwrap();
    assert!(back == data, "bytes differ after host -> device -> host");
    gpu.write(&vram, 0, b"peermem").unwrap();
    let out = Arc::new(HostRegion::new(4096).unwrap());
    let pout = gpu.pin(out.clone()).unwrap();
    gpu.copy_to_host(&vram, 0, &pout, 10, 7).unwrap();
    let mut got = [0u8; 7];
    out.read_at(10, &mut got).unwrap();
    assert_eq!(&got, b"peermem");
    assert_eq!(gpu.settle(), 0);
}

#[test]
fn copies_past_either_end_are_refused_before_the_driver_sees_them() {
    let Some(gpu) = gpu("ranges") else { return };
    let vram = gpu.allocate(1 << 20).unwrap();
    let pinned = gpu.pin(Arc::new(HostRegion::new(4096).unwrap())).unwrap();
    let e = gpu.copy_to_device(&pinned, 0, &vram, (1 << 20) - 100, 4096).unwrap_err();
    assert!(matches!(e, CudaError::OutOfRange { which: "device memory", .. }), "{e}");
    let e = gpu.copy_to_device(&pinned, 1, &vram, 0, 4096).unwrap_err();
    assert!(matches!(e, CudaError::OutOfRange { which: "host buffer", .. }), "{e}");
    assert!(matches!(gpu.read(&vram, u64::MAX, &mut [0u8; 2]), Err(CudaError::OutOfRange { .. })));
    assert!(matches!(gpu.allocate(0), Err(CudaError::BadLength { .. })));
}

#[test]
fn the_region_names_the_gpu_function_and_has_a_dma_buf_or_the_reason() {
    let Some(gpu) = gpu("provider") else { return };
    let info = gpu.info().clone();
    eprintln!("{info:?}");
    let vram = gpu.allocate(2 << 20).unwrap();
    // VMM where the device has it, unless the driver refused it (the notes then say why).
    assert!(info.vmm || vram.origin() == Origin::Alloc);
    assert!(vram.origin() == Origin::Vmm || vram.notes().iter().any(|n| n.contains("refused")) || !info.vmm);
    assert_eq!(vram.provider(), Provider::Pci(info.pci.expect("the driver names the PCI function")));
    match (vram.backing(), vram.dma_buf_refusal()) {
        (Backing::DmaBuf(_), None) => {
            assert!(vram.export_fd().is_ok());
            eprintln!("dma-buf exported");
        }
        (Backing::DriverPrivate, Some(why)) => {
            assert!(vram.export_fd().is_err());
            eprintln!("no dma-buf: {why}");
        }
        (b, r) => panic!("backing {b:?} with refusal {r:?}"),
    }
    let plain = gpu.allocate_as(1 << 20, Alloc::Plain).unwrap();
    assert_eq!(plain.origin(), Origin::Alloc);
    for n in vram.notes() {
        eprintln!("{n}");
    }
}

#[test]
fn the_registry_routes_a_nic_to_cuda_memory_by_its_backing() {
    let Some(gpu) = gpu("registry") else { return };
    let topo = Arc::new(Topology::discover("/").unwrap());
    let reg = Registry::new(topo.clone());
    let vram = Arc::new(gpu.allocate(2 << 20).unwrap());
    let guard = reg.register(vram.clone()).unwrap();
    let Some(client) = topo.devices().iter().map(|d| d.bdf).find(|b| Some(*b) != gpu.info().pci) else {
        eprintln!("registry: no other PCI function to resolve for: skipped");
        return;
    };
    let route = reg.resolve(&guard, reg.peer(client).unwrap()).unwrap();
    match (&route.kind, vram.has_dma_buf()) {
        (RouteKind::KernelImport | RouteKind::Bounce(_), true) => {}
        (RouteKind::Bounce(_), false) => {}
        (k, d) => panic!("route {k:?} for a region with dma-buf {d}"),
    }
    eprintln!("{client}: {:#?}", vram.explain(&route));
}

#[test]
#[allow(unsafe_code)]
fn foreign_memory_is_checked_by_the_driver_and_kept_alive_by_its_owner() {
    let Some(gpu) = gpu("adopt") else { return };
    let owner = Arc::new(gpu.allocate(4 << 20).unwrap());
    gpu.write(&owner, 4096, b"shared bytes").unwrap();
    let ptr = owner.device_ptr().checked_add(4096).unwrap();
    // SAFETY: the owner handed in is the allocation itself, held by the adopted region.
    let adopted = gpu.adopt(unsafe { Foreign::new(ptr, 1 << 20, Box::new(owner.clone())) }).unwrap();
    assert_eq!(adopted.origin(), Origin::Foreign);
    let mut got = [0u8; 12];
    gpu.read(&adopted, 0, &mut got).unwrap();
    assert_eq!(&got, b"shared bytes");
    // Past the allocation's end, and host memory, are refused.
    // SAFETY: refused before anything is kept.
    let past = gpu.adopt(unsafe { Foreign::new(ptr, 8 << 20, Box::new(())) });
    assert!(matches!(past, Err(CudaError::NotDeviceMemory { .. })), "{past:?}");
    let host = HostRegion::new(4096).unwrap();
    let va = DevicePtr::new(host.cpu_range().unwrap().start().raw());
    // SAFETY: refused before anything is kept.
    let not_device = gpu.adopt(unsafe { Foreign::new(va, 4096, Box::new(())) });
    assert!(matches!(not_device, Err(CudaError::NotDeviceMemory { .. })), "{not_device:?}");
    drop(owner);
    gpu.read(&adopted, 0, &mut got).unwrap();
    assert_eq!(&got, b"shared bytes", "the adopted region keeps its owner alive");
}
