//! The loader into CUDA device memory: through GPUDirect Storage (cuFile) where it can, else
//! staged through pinned host buffers and copied on by the device, verified by reading back
//! through the device; and Vulkan memory of the same GPU imported into CUDA and filled by the
//! loader. Without a CUDA driver each test checks the typed error and says "no CUDA driver:
//! skipped".

use std::path::Path;
use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry, Topology};
use peermem_cuda::{Cuda, Device};
use peermem_loader::{Batch, IoMode, LoadError, Loader, Options, Report, Verify, Via};

fn pattern(seed: u32, n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed as u8 ^ (i >> 12) as u8).collect()
}

fn gpu(test: &str) -> Option<Device> {
    match Cuda::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(e.is_unavailable(), "{test}: {e}");
            eprintln!("{test}: no CUDA driver: skipped ({e})");
            None
        }
    }
}

fn live() -> Registry {
    Registry::new(Arc::new(Topology::discover("/").unwrap()))
}

fn write_file(dir: &Path, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join("src");
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn files_land_in_cuda_memory_through_pinned_staging_in_every_io_mode() {
    let Some(dev) = gpu("cuda dest") else { return };
    let d = tempfile::tempdir().unwrap();
    let data = pattern(23, (9 << 20) + 12_345);
    let p = write_file(d.path(), &data);
    let reg = live();
    let vram = Arc::new(dev.allocate(16 << 20).unwrap());
    let g = reg.register(vram.clone() as Arc<dyn PeerMemory>).unwrap();
    for io in [IoMode::Direct, IoMode::Buffered] {
        let opts = Options { io, verify: Verify::Reread, chunk: 1 << 20, depth: 8, ..Options::default() };
        let loader = Loader::new(&reg, opts).unwrap();
        let f = loader.open(&p).unwrap();
        let dest = loader.cuda_dest(&g, &dev, vram.clone()).unwrap();
        dev.write(&vram, 0, &vec![0xa5; 16 << 20]).unwrap();
        let mut b = Batch::new();
        b.read(&f, 0, 8 << 20, &dest, 0).read(&f, 777, 1_000_003, &dest, (8 << 20) + 1);
        let r = loader.run(b).unwrap();
        assert_eq!(r.dests[0].via, Via::GpuStaged, "{io:?}: {r}");
        assert_eq!(r.dests[0].bytes_staged, r.bytes, "{io:?}: {r}");
        assert_eq!(r.verified, Some(true), "{io:?}: read back through the device and compared");
        assert!(r.dests[0].reasons.iter().any(|s| s.contains("cuMemHostRegister")), "{r}");
        let mut back = vec![0u8; 8 << 20];
        dev.read(&vram, 0, &mut back).unwrap();
        assert!(back == data[..8 << 20], "{io:?}: first read differs");
        let mut back = vec![0u8; 1_000_005];
        dev.read(&vram, 8 << 20, &mut back).unwrap();
        assert_eq!(back[0], 0xa5, "{io:?}: the byte before the second read was written");
        assert!(back[1..1_000_004] == data[777..777 + 1_000_003], "{io:?}: second read differs");
        assert_eq!(back[1_000_004], 0xa5, "{io:?}: the byte after the second read was written");
        eprintln!("{io:?}: {r}");
    }
}

#[test]
fn strict_loads_refuse_cuda_memory_and_a_foreign_registration_is_refused() {
    let Some(dev) = gpu("cuda strict") else { return };
    let d = tempfile::tempdir().unwrap();
    let p = write_file(d.path(), &pattern(1, 1 << 20));
    let reg = live();
    let vram = Arc::new(dev.allocate(2 << 20).unwrap());
    let g = reg.register(vram.clone() as Arc<dyn PeerMemory>).unwrap();
    let strict = Loader::new(&reg, Options { strict: true, ..Options::default() }).unwrap();
    let f = strict.open(&p).unwrap();
    let dest = strict.cuda_dest(&g, &dev, vram.clone()).unwrap();
    // Direct only through GPUDirect Storage; otherwise refused, saying why cuFile was not taken.
    match strict.read(&f, 0, 4096, &dest, 0) {
        Ok(r) => assert_eq!(r.dests[0].via, Via::Gds, "{r}"),
        Err(LoadError::NotDirect { why, .. }) => {
            assert!(why.contains("GPUDirect Storage") || why.contains("bounce"), "{why}")
        }
        Err(e) => panic!("{e}"),
    }
    let other = reg.register(Arc::new(HostRegion::new(2 << 20).unwrap()) as Arc<dyn PeerMemory>).unwrap();
    assert!(matches!(strict.cuda_dest(&other, &dev, vram), Err(LoadError::Layout(_))));
}

/// The cuFile line of a CUDA destination's reasons: taken, or not taken and why.
fn cufile_line(r: &Report) -> &str {
    r.dests[0].reasons.iter().find(|s| s.starts_with("cufile: taken") || s.starts_with("cufile: not taken")).unwrap()
}

#[test]
fn cufile_reads_into_cuda_memory_where_it_can_and_the_report_says_which_path_and_why() {
    let Some(dev) = gpu("cuda gds") else { return };
    let d = tempfile::tempdir().unwrap();
    let data = pattern(5, (6 << 20) + 333);
    let p = write_file(d.path(), &data);
    let reg = live();
    let vram = Arc::new(dev.allocate(8 << 20).unwrap());
    let g = reg.register(vram.clone() as Arc<dyn PeerMemory>).unwrap();
    for gds in [true, false] {
        let opts = Options { io: IoMode::Direct, verify: Verify::Reread, gds, ..Options::default() };
        let loader = Loader::new(&reg, opts).unwrap();
        let f = loader.open(&p).unwrap();
        let dest = loader.cuda_dest(&g, &dev, vram.clone()).unwrap();
        dev.write(&vram, 0, &vec![0x5a; 8 << 20]).unwrap();
        let mut b = Batch::new();
        b.read(&f, 0, 4 << 20, &dest, 0).read(&f, 4097, (2 << 20) + 100, &dest, (4 << 20) + 3);
        let r = loader.run(b).unwrap();
        let line = cufile_line(&r).to_string();
        match r.dests[0].via {
            Via::Gds => {
                assert!(gds && line.starts_with("cufile: taken"), "{r}");
                assert_eq!(r.dests[0].bytes_direct, r.bytes, "{r}");
                assert!(r.direct(), "GPUDirect Storage is direct: {r}");
            }
            Via::GpuStaged => {
                assert!(line.starts_with("cufile: not taken: "), "{r}");
                assert!(gds || line.contains("PEERMEM_GDS=0"), "{r}");
            }
            v => panic!("{v:?}: {r}"),
        }
        assert_eq!(r.verified, Some(true), "{r}");
        let mut back = vec![0u8; 8 << 20];
        dev.read(&vram, 0, &mut back).unwrap();
        assert!(back[..4 << 20] == data[..4 << 20], "gds {gds}: first read differs");
        assert_eq!(&back[4 << 20..(4 << 20) + 3], &[0x5a; 3], "gds {gds}: bytes before the second read written");
        assert!(back[(4 << 20) + 3..(6 << 20) + 103] == data[4097..4097 + (2 << 20) + 100], "gds {gds}: second read");
        assert_eq!(back[(6 << 20) + 103], 0x5a, "gds {gds}: the byte after the second read was written");
        eprintln!("gds {gds}: {}: {line}", r.dests[0].via.name());
    }
}

/// Vulkan and CUDA on one GPU: device-local Vulkan memory exported as an opaque fd imports into
/// CUDA (the same PCI function, the same UUID), both regions name that GPU as provider, the
/// loader fills the CUDA view and Vulkan reads the same bytes. An export of another device (or
/// of lavapipe, which names no PCI function) is refused as a different GPU.
#[test]
fn vulkan_memory_of_the_same_gpu_imports_into_cuda_and_both_see_the_same_bytes() {
    use peermem_vulkan::{Device as Vk, HandleType, Placement, Select};
    let Some(dev) = gpu("vulkan -> cuda") else { return };
    let Some(bdf) = dev.info().pci else {
        return eprintln!("vulkan -> cuda: the CUDA device's PCI bus id is unknown: skipped");
    };
    let vk = match Vk::open(Select::Pci(bdf)) {
        Ok(v) => v,
        Err(e) => return eprintln!("vulkan -> cuda: no Vulkan device at {bdf} ({e}): skipped"),
    };
    // Vulkan on this driver: its PCI function (VK_EXT_pci_bus_info) and whether it exports dma-bufs.
    let dma_buf = match vk.allocate_with(1 << 20, Placement::DeviceLocal, HandleType::DmaBuf) {
        Ok(r) => format!("yes ({:?})", r.export().map(|e| e.handle)),
        Err(e) => format!("no: {e}"),
    };
    eprintln!("vulkan -> cuda: {}; dma-buf export: {dma_buf}", vk.info());
    let len: u64 = 8 << 20;
    let v = Arc::new(vk.allocate_with(len, Placement::DeviceLocal, HandleType::OpaqueFd).unwrap());
    let e = v.export().unwrap();
    let l = e.layout.unwrap();
    let opaque = |e: peermem_vulkan::Export, exporter: String| peermem_cuda::OpaqueFd {
        fd: e.fd,
        len: e.len,
        alloc_size: e.layout.map_or(e.len, |l| l.alloc_size),
        dedicated: e.layout.is_some_and(|l| l.dedicated),
        provider: e.provider,
        device_uuid: e.layout.map(|l| l.device_uuid),
        exporter,
    };
    let c = Arc::new(dev.import_opaque_fd(opaque(e, format!("Vulkan device '{}'", vk.info().name))).unwrap());
    assert_eq!(c.provider(), v.provider(), "one provider: the GPU's PCI function");
    eprintln!(
        "vulkan -> cuda: {} bytes (allocation {}, dedicated {}): {:?}",
        len,
        l.alloc_size,
        l.dedicated,
        c.notes()
    );
    let reg = live();
    let gv = reg.register(v.clone() as Arc<dyn PeerMemory>).unwrap();
    let gc = reg.register(c.clone() as Arc<dyn PeerMemory>).unwrap();
    assert_eq!(gv.entry().provider(), gc.entry().provider());
    // CUDA writes, Vulkan reads.
    dev.write(&c, 0, &pattern(3, 1 << 20)).unwrap();
    let out = vk.allocate(len, Placement::Mappable).unwrap();
    vk.copy(&v, 0, &out, 0, 1 << 20).unwrap();
    let mut back = vec![0u8; 1 << 20];
    out.read_at(0, &mut back).unwrap();
    assert!(back == pattern(3, 1 << 20), "Vulkan sees CUDA's bytes");
    // The loader fills the CUDA view; Vulkan reads the file's bytes.
    let d = tempfile::tempdir().unwrap();
    let data = pattern(4, len as usize);
    let p = write_file(d.path(), &data);
    let loader = Loader::new(&reg, Options { verify: Verify::Hash, ..Options::default() }).unwrap();
    let f = loader.open(&p).unwrap();
    let r = loader.read(&f, 0, len, loader.cuda_dest(&gc, &dev, c.clone()).unwrap(), 0).unwrap();
    vk.copy(&v, 0, &out, 0, len).unwrap();
    let mut back = vec![0u8; len as usize];
    out.read_at(0, &mut back).unwrap();
    assert!(back == data, "Vulkan sees the bytes the loader put in CUDA memory ({r})");
    eprintln!("vulkan -> cuda: loaded {} MB/s, {}: {}", r.mb_per_s() as u64, r.dests[0].via.name(), cufile_line(&r));
    // Memory of another Vulkan device (lavapipe names no PCI function) is not this GPU's.
    let other = (0..8).filter_map(|i| Vk::open(Select::Index(i)).ok()).find(|o| o.info().pci != Some(bdf));
    match other.filter(|o| o.info().caps.opaque_fd.exportable) {
        Some(o) => {
            let x = o.allocate_with(4096, Placement::DeviceLocal, HandleType::OpaqueFd).unwrap();
            let err = dev.import_opaque_fd(opaque(x.export().unwrap(), format!("'{}'", o.info().name))).unwrap_err();
            assert!(matches!(err, peermem_cuda::CudaError::DifferentGpu { .. }), "{err}");
            eprintln!("vulkan -> cuda: {err}");
        }
        None => eprintln!("vulkan -> cuda: no other Vulkan device: the different-GPU refusal not checked"),
    }
}
