//! The loader into CUDA device memory: reads staged through pinned host buffers and copied on by
//! the device, verified by reading back through the device. Without a CUDA driver each test
//! checks the typed error and says "no CUDA driver: skipped".

use std::path::Path;
use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry, Topology};
use peermem_cuda::{Cuda, Device};
use peermem_loader::{Batch, IoMode, LoadError, Loader, Options, Verify, Via};

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
    assert!(matches!(strict.read(&f, 0, 4096, &dest, 0), Err(LoadError::NotDirect { .. })));
    let other = reg.register(Arc::new(HostRegion::new(2 << 20).unwrap()) as Arc<dyn PeerMemory>).unwrap();
    assert!(matches!(strict.cuda_dest(&other, &dev, vram), Err(LoadError::Layout(_))));
}
