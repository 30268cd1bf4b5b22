//! Alone in its test binary (other tests would open fds meanwhile): 10k loads, successful and
//! failing, leave no fd, registration or pinned buffer behind.

use std::path::Path;
use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry, Topology};
use peermem_loader::{Engine, Loader, Options};

fn registry() -> Registry {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    Registry::new(Arc::new(Topology::discover(root).unwrap()))
}

fn host(reg: &Registry, len: u64) -> (Arc<HostRegion>, peermem::Registration) {
    let h = Arc::new(HostRegion::new(len).unwrap());
    let g = reg.register(h.clone() as Arc<dyn PeerMemory>).unwrap();
    (h, g)
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn ten_thousand_loads_leave_no_fd_or_registration_behind() {
    for engine in [Engine::Uring, Engine::Pool] {
        leaks(engine, 5_000);
    }
}

fn leaks(engine: Engine, loads: u64) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("src");
    std::fs::write(&p, (0..64u32 << 10).map(|i| (i * 7) as u8).collect::<Vec<u8>>()).unwrap();
    let reg = registry();
    let regions = reg.len();
    let fds = count_fds();
    {
        let loader = Loader::new(&reg, Options { engine, ..Options::default() }).unwrap();
        for i in 0..loads {
            let f = loader.open(&p).unwrap();
            let (_h, g) = host(&reg, 8192);
            let off = (i * 4099) % (60 << 10);
            match i % 4 {
                // Misaligned (staged), aligned (direct), past the end (error), too big (error).
                0 => drop(loader.read(&f, off, 1000, &g, 3).unwrap()),
                1 => drop(loader.read(&f, 4096, 4096, &g, 0).unwrap()),
                2 => assert!(loader.read(&f, 60 << 10, 8 << 10, &g, 0).is_err()),
                _ => assert!(loader.read(&f, 0, 9000, &g, 0).is_err()),
            }
        }
        assert_eq!(reg.len(), regions);
    }
    assert_eq!(reg.len(), regions);
    assert_eq!(count_fds(), fds, "{engine:?}: fds before and after {loads} loads");
}
