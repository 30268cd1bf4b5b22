//! Surprise removal, inside the testbed guest of the `hotplug` topology only (cargo feature
//! `guest`; `testbed/run hotplug -- <this binary> --test-threads=1`): the host's QEMU unplugs an
//! NVMe and the ivshmem BAR (`device_del`, asked for through `testbed/guest/hotplug`) while
//! peermem uses them. Loads in flight end with `LoadError::DeviceGone` in bounded time, the
//! registry's regions of the removed device die (lookups miss, resolves fail with
//! `DeviceGone`), the other NVMe keeps working, and once QEMU plugs the devices back they
//! register and load again. Each test leaves the devices plugged in.

use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::hotplug::Watcher;
use peermem::{BarRegion, Bdf, HostRegion, Peer, Registry, RegistryError, ResolveError};
use peermem_loader::{Batch, Dest, IoMode, LoadError, Loader, Options};
use peermem_nvme::{Binding, BlockDevice, Controller, P2pmemRegion};
use xxhash_rust::xxh3::xxh3_64;

#[path = "../../backends/nvme/tests/common/mod.rs"]
mod common;
use common::*;

/// The QEMU arguments that plug each device back (as in testbed/topologies/hotplug; the ivshmem
/// comes back on the second memory backend, see there why).
const NVME_A: &str = "nvme,id=nvA,serial=HOT-A,drive=dA,cmb_size_mb=64,bus=rp1";
const SHM: &str = "ivshmem-plain,id=shm,memdev=shm2,bus=rp3";
/// Bound on each wait of these tests (pciehp waits 5 s after the button; TCG is slow).
const LIMIT: Duration = Duration::from_secs(120);
const LOAD_LEN: u64 = 32 << 20;

/// Asks the host's QEMU (through testbed/guest/hotplug) and checks that it did it.
fn qemu(args: &[&str]) {
    let tool = std::env::var("PEERMEM_HOTPLUG").expect("PEERMEM_HOTPLUG: run this in the `hotplug` topology");
    let out = Command::new(tool).args(args).output().unwrap();
    println!("hotplug {}: {}", args.join(" "), String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() {
        // What the guest's kernel made of it (pciehp, vfio-pci), for the report.
        if let Ok(d) = Command::new("dmesg").output() {
            let text = String::from_utf8_lossy(&d.stdout);
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            println!("guest kernel, last lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    assert!(out.status.success(), "hotplug {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn unplug(id: &str) {
    qemu(&["del", id, &LIMIT.as_secs().to_string()]);
}

/// Waits (bounded by `LIMIT`) for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{what}: after {:.1} s", start.elapsed().as_secs_f64());
}

/// The NVMe controller with serial `serial` (the kernel's nvmeN names move between plugs).
fn by_serial(serial: &str) -> Option<Bdf> {
    std::fs::read_dir("/sys/class/nvme").ok()?.flatten().find_map(|c| {
        let s = std::fs::read_to_string(c.path().join("serial")).ok()?;
        if s.trim() != serial {
            return None;
        }
        let dev = std::fs::canonicalize(c.path().join("device")).ok()?;
        dev.file_name()?.to_str()?.parse().ok()
    })
}

/// The NVMe HOT-A, plugged back first if an earlier test left it out.
fn hot_a() -> Bdf {
    if by_serial("HOT-A").is_none() {
        qemu(&["add", NVME_A]);
        wait_for("HOT-A is plugged back", || by_serial("HOT-A").is_some());
    }
    by_serial("HOT-A").unwrap()
}

/// Runs `one_load` again and again on a thread until it fails (or `LIMIT` passes: then `Ok`
/// with the count), then drops it there (and with it what it owns: a source, a controller), so
/// the caller can bound its wait on the result.
fn load_until_error(
    mut one_load: impl FnMut() -> Result<(), LoadError> + Send + 'static,
) -> mpsc::Receiver<(Result<usize, LoadError>, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0;
        let r = loop {
            if start.elapsed() > LIMIT {
                break Ok(n);
            }
            if let Err(e) = one_load() {
                break Err(e);
            }
            n += 1;
        };
        drop(one_load);
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// Options of the loads that run into a removal: small requests, so one is always in flight;
/// O_DIRECT, so every request reaches the device (the page cache would answer some).
fn small() -> Options {
    Options { chunk: 256 << 10, depth: 2, timeout: LIMIT, io: IoMode::Direct, ..Default::default() }
}

/// The block device of the first namespace of `bdf` as `topo` names it (kernel names move
/// between plugs).
fn namespace(topo: &peermem::Topology, bdf: Bdf) -> std::path::PathBuf {
    BlockDevice::open_namespace(topo, bdf).unwrap().path().to_path_buf()
}

/// Through the kernel's NVMe driver: an O_DIRECT load from the NVMe QEMU unplugs ends with
/// `DeviceGone`; its p2pmem region and the ivshmem BAR region (unplugged next) die in the
/// registry while the other NVMe's region and loads carry on; plugged back, both register and
/// load again.
#[test]
fn kernel_load_p2pmem_and_bar_regions_die_with_their_device_and_come_back() {
    let a = hot_a();
    let topo = live();
    let reg = Registry::new(topo.clone());
    let _watch = Watcher::spawn(reg.clone(), "/").unwrap();
    let b = by_serial("KEEP-B").expect("the NVMe KEEP-B");
    let shm = ivshmem(&topo).expect("the ivshmem function");
    let expect_b = write_known(&topo, b, 0, 4 << 20, 3);

    let pa = reg.register(Arc::new(P2pmemRegion::allocate(&topo, a, 1 << 20).unwrap())).unwrap();
    let pb = reg.register(Arc::new(P2pmemRegion::allocate(&topo, b, 4 << 20).unwrap())).unwrap();
    let bar = reg.register(Arc::new(BarRegion { bdf: shm, bar: 2, offset: 0, len: 1 << 20 })).unwrap();
    let host = reg.register(Arc::new(HostRegion::new(LOAD_LEN).unwrap())).unwrap();
    let (peer_a, peer_b) = (reg.peer(a).unwrap(), reg.peer(b).unwrap());
    let va_a = pa.cpu_range().expect("p2pmem is mapped").start();
    let h = reg.hierarchy_of(topo.idx(shm).unwrap()).unwrap();
    let bar_bus = bar.bus_addr().expect("the BAR's bus address");
    assert!(reg.snapshot().lookup_va(va_a).is_some());
    assert!(reg.resolve(&bar, peer_a).is_ok());

    // A load from A in flight, then QEMU unplugs A.
    let loader = Loader::new(&reg, small()).unwrap();
    let src = loader.open(namespace(&topo, a)).unwrap();
    let rx = load_until_error(move || loader.read(&src, 0, LOAD_LEN, &host, 0).map(drop));
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    unplug("nvA");
    let (r, ended) = rx.recv_timeout(LIMIT).expect("the load from the removed NVMe did not end");
    let e = r.expect_err("loads from a removed NVMe must fail");
    println!("kernel load from {a}: {e} ({:.1} s after device_del)", ended.duration_since(asked).as_secs_f64());
    assert!(matches!(e, LoadError::DeviceGone { bdf, role: "source", .. } if bdf == a), "{e:?}");

    wait_for("the registry learns that A is gone", || reg.is_device_gone(a));
    assert!(pa.is_gone() && !pa.is_live());
    assert!(reg.snapshot().lookup_va(va_a).is_none(), "a dead region is not found");
    assert_eq!(reg.resolve(&pa, peer_b).unwrap_err(), ResolveError::DeviceGone { bdf: a, id: pa.id() });
    assert_eq!(reg.resolve(&bar, peer_a).unwrap_err(), ResolveError::PeerGone(a));
    assert!(matches!(
        reg.register(Arc::new(BarRegion { bdf: a, bar: 2, offset: 0, len: 4096 })),
        Err(RegistryError::DeviceGone(d)) if d == a
    ));
    // B carries on: a load from its namespace into its own p2pmem, checked.
    let o = Options { verify: peermem_loader::Verify::Reread, io: IoMode::Direct, ..Default::default() };
    let loader = Loader::new(&reg, o).unwrap();
    let sb = loader.open(namespace(&topo, b)).unwrap();
    let r = loader.read(&sb, 0, 4 << 20, &pb, 0).unwrap();
    assert_eq!(r.checksums, vec![xxh3_64(&expect_b)], "the other NVMe keeps working");
    assert!(reg.resolve(&bar, peer_b).is_ok());

    // The ivshmem BAR goes too.
    unplug("shm");
    wait_for("the registry learns that the ivshmem is gone", || reg.is_device_gone(shm));
    assert!(matches!(reg.resolve(&bar, peer_b), Err(ResolveError::DeviceGone { bdf, .. }) if bdf == shm));
    assert!(reg.snapshot().lookup_bus(h, bar_bus).is_none());

    // Back in: both register again, A loads again (its kernel name may have changed).
    qemu(&["add", NVME_A]);
    qemu(&["add", SHM]);
    wait_for("A and the ivshmem are back in the registry", || !reg.is_device_gone(a) && !reg.is_device_gone(shm));
    let now = wait_for_nvme_driver(a);
    let expect_a = write_known(&now, a, 0, 4 << 20, 9);
    let pa2 = reg.register(Arc::new(P2pmemRegion::allocate(&now, a, 4 << 20).unwrap())).unwrap();
    let sa = loader.open(namespace(&now, a)).unwrap();
    let r = loader.read(&sa, 0, 4 << 20, &pa2, 0).unwrap();
    assert_eq!(r.checksums, vec![xxh3_64(&expect_a)], "A loads again after the re-plug");
    let bar2 = reg.register(Arc::new(BarRegion { bdf: shm, bar: 2, offset: 0, len: 1 << 20 })).unwrap();
    assert!(reg.resolve(&bar2, reg.peer(a).unwrap()).is_ok());
    assert!(reg.snapshot().lookup_bus(h, bar_bus).is_some_and(|hit| hit.entry.id() == bar2.id()));
    assert!(matches!(reg.resolve(&pa, Peer::Cpu), Err(ResolveError::DeviceGone { .. })), "old regions stay dead");
}

/// Through the userspace VFIO driver: the kernel asks for the device back when QEMU unplugs it
/// (vfio-pci's remove waits for the owner), the driver ends its commands with `DeviceGone`,
/// quiesces the controller, the load fails with `DeviceGone`, closing the device lets the
/// removal finish, and the re-plugged NVMe comes back to the kernel driver.
#[test]
fn vfio_load_from_a_removed_nvme_ends_with_device_gone() {
    let a = hot_a();
    let topo = live();
    let reg = Registry::new(topo.clone());
    let _watch = Watcher::spawn(reg.clone(), "/").unwrap();
    let host = reg.register(Arc::new(HostRegion::new(LOAD_LEN).unwrap())).unwrap();

    let binding = Binding::to_vfio(a).unwrap();
    // The controller lives on the load thread: it is dropped (the device closed) there as soon
    // as the load fails, which is what lets the kernel finish the removal.
    let loader = Loader::new(&reg, small()).unwrap();
    let src = loader.open_nvme(Controller::open(&binding, &reg, 1).unwrap()).unwrap();
    let rx = load_until_error(move || loader.read(&src, 0, LOAD_LEN, &host, 0).map(drop));
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    let del = std::thread::spawn(|| unplug("nvA"));
    let (r, ended) = rx.recv_timeout(LIMIT).expect("the VFIO load from the removed NVMe did not end");
    println!("VFIO load from {a}: {r:?} ({:.1} s after device_del)", ended.duration_since(asked).as_secs_f64());
    let e = r.expect_err("a load from a removed NVMe must fail");
    assert!(matches!(&e, LoadError::DeviceGone { bdf, role: "source", .. } if *bdf == a), "{e:?}");
    del.join().expect("QEMU finished the unplug once the device was closed");
    drop(binding);
    wait_for("the registry learns that A is gone", || reg.is_device_gone(a));

    qemu(&["add", NVME_A]);
    wait_for_nvme_driver(a);
    wait_for("A is back in the registry", || !reg.is_device_gone(a));
}

/// The `Loader` (io_uring or its thread pool, through the kernel's NVMe driver):
/// batches from the NVMe QEMU unplugs end with `DeviceGone` naming it as the source, within the
/// bounded wait; a loader reading the other NVMe keeps working; plugged back, A loads again.
#[test]
fn async_loader_batch_from_a_removed_nvme_ends_with_device_gone() {
    let a = hot_a();
    let topo = live();
    let reg = Registry::new(topo.clone());
    let _watch = Watcher::spawn(reg.clone(), "/").unwrap();
    let b = by_serial("KEEP-B").expect("the NVMe KEEP-B");
    let expect_b = write_known(&topo, b, 0, 4 << 20, 5);
    let path_a = namespace(&topo, a);
    let host = reg.register(Arc::new(HostRegion::new(LOAD_LEN).unwrap())).unwrap();
    let opts = Options { chunk: 256 << 10, depth: 4, timeout: LIMIT, io: IoMode::Direct, ..Options::default() };

    let (tx, rx) = mpsc::channel();
    let (r2, o2, dest) = (reg.clone(), opts.clone(), Dest::region(&host));
    std::thread::spawn(move || {
        let loader = Loader::new(&r2, o2).unwrap();
        let file = loader.open(&path_a).unwrap();
        let start = Instant::now();
        let mut n = 0usize;
        let r = loop {
            if start.elapsed() > LIMIT {
                break Ok(n);
            }
            let mut batch = Batch::new();
            for i in 0..8u64 {
                let part = LOAD_LEN / 8;
                batch.read(&file, i * part, part, &dest, i * part);
            }
            match loader.submit(batch).and_then(|t| t.wait()) {
                Ok(_) => n += 1,
                Err(e) => break Err(e),
            }
        };
        drop((file, loader));
        let _ = tx.send((r, Instant::now()));
    });
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    unplug("nvA");
    let (r, ended) = rx.recv_timeout(LIMIT * 2).expect("the asynchronous loader's batch did not end");
    let e = r.expect_err("batches from a removed NVMe must fail");
    println!("async batch from {a}: {e} ({:.1} s after device_del)", ended.duration_since(asked).as_secs_f64());
    assert!(matches!(&e, LoadError::DeviceGone { bdf, role: "source", .. } if *bdf == a), "{e:?}");

    // The other NVMe, through another asynchronous loader of the same registry: intact bytes.
    let pb = reg.register(Arc::new(P2pmemRegion::allocate(&topo, b, 4 << 20).unwrap())).unwrap();
    let loader = Loader::new(&reg, opts.clone()).unwrap();
    let fb = loader.open(namespace(&topo, b)).unwrap();
    loader.read(&fb, 0, 4 << 20, &pb, 0).unwrap();
    let mut got = vec![0u8; 4 << 20];
    pb.region().read_at(0, &mut got).unwrap();
    assert!(got == expect_b, "the other NVMe keeps working");

    qemu(&["add", NVME_A]);
    let now = wait_for_nvme_driver(a);
    wait_for("A is back in the registry", || !reg.is_device_gone(a));
    let expect_a = write_known(&now, a, 0, 4 << 20, 11);
    let fa = loader.open(namespace(&now, a)).unwrap();
    loader.read(&fa, 0, 4 << 20, &host, 0).unwrap();
    let mut got = vec![0u8; 4 << 20];
    host.region().read_at(0, &mut got).unwrap();
    assert!(got == expect_a, "A loads again through the loader after the re-plug");
}
