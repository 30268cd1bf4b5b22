//! Inside the testbed guest only (cargo feature `guest`; run through `testbed/run`): the loader
//! moves namespace and file ranges into every destination kind of the testbed (host memory,
//! p2pmem of a switch peer and across the host bridge, the ivshmem "GPU" BAR, a Vulkan buffer),
//! through the kernel's NVMe driver and through the userspace VFIO driver, and every byte is
//! checked (and, for the ivshmem BAR, in the host file behind it).

use std::sync::Arc;

use peermem::{BarRegion, Bdf, HostRegion, MapType, PeerMemory, Registry, Topology};
use peermem_loader::{IoMode, Loader, Options, Verify, Via};
use peermem_nvme::{Binding, Controller, P2pmemRegion};
use xxhash_rust::xxh3::xxh3_64;

#[path = "../../backends/nvme/tests/common/mod.rs"]
mod common;
use common::*;

/// Every destination kind the testbed offers a namespace of `x`: host memory, p2pmem of its
/// switch peer `y`, p2pmem across the host bridge (when some pool is refused for `x`), and `len`
/// bytes at `shm_at` of the ivshmem "GPU" BAR (when present).
fn every_destination(
    topo: &Topology,
    nvmes: &[Bdf],
    x: Bdf,
    y: Bdf,
    shm_at: u64,
    len: u64,
) -> Vec<(&'static str, Arc<dyn PeerMemory>)> {
    let far = nvmes.iter().copied().find(|&z| {
        z != x
            && topo.by_bdf(z).unwrap().p2pmem.is_some()
            && topo.verdict(topo.idx(z).unwrap(), topo.idx(x).unwrap()).map_type == MapType::NotSupported
    });
    let mut dests: Vec<(&'static str, Arc<dyn PeerMemory>)> = vec![
        ("host", Arc::new(HostRegion::new(len).unwrap())),
        ("p2pmem switch peer", Arc::new(P2pmemRegion::allocate(topo, y, len).unwrap())),
    ];
    if let Some(z) = far {
        dests.push(("p2pmem across the host bridge", Arc::new(P2pmemRegion::allocate(topo, z, len).unwrap())));
    }
    if let Some(shm) = ivshmem(topo) {
        dests.push(("ivshmem BAR2", Arc::new(BarRegion { bdf: shm, bar: 2, offset: shm_at, len })));
    }
    dests
}

/// Through the kernel's NVMe driver: a namespace range (and a file range) loaded into every
/// destination kind: host memory and a switch peer's p2pmem go direct (O_DIRECT into the pages;
/// under the translated vIOMMU the probe catches the corruption and the load bounces), a p2pmem
/// pool across the host bridge and the ivshmem BAR bounce. Every load's xxh3 matches a second
/// read of the source, the bytes are compared, and the ivshmem load is checked in the host's
/// backing file.
#[test]
fn loader_moves_a_namespace_range_into_every_destination_kind() {
    const LEN: u64 = 8 << 20;
    const AT: u64 = 64 << 20;
    const SHM_AT: u64 = 128 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, y) = switch_pair(&topo, &nvmes).expect("a switch-local NVMe pair");
    let expect = write_known(&topo, x, AT, LEN, 6);

    let reg = Registry::new(topo.clone());
    let dests = every_destination(&topo, &nvmes, x, y, SHM_AT, LEN);
    let want = xxh3_64(&expect);
    let opts = Options { chunk: 1 << 20, depth: 4, verify: Verify::Reread, ..Default::default() };
    let loader = Loader::new(&reg, opts.clone()).unwrap();
    let src = loader.open_namespace(x).unwrap();
    for (name, region) in dests {
        let g = reg.register(region.clone()).unwrap();
        let r = loader.read(&src, AT, LEN, &g, 0).unwrap();
        println!("{topology}: {x} -> {name}:\n{r}");
        assert_eq!((r.checksums.clone(), r.source_checksums.clone()), (vec![want], vec![want]), "{name}");
        assert!(read_dest(&topo, &region, 0, LEN) == expect, "{name}: bytes differ");
        let direct = r.dests[0].via == Via::Direct;
        match name {
            "host" => assert!(direct, "{name}: {r}"),
            "p2pmem switch peer" if topology == "switch-iommu" => {
                assert!(!direct, "the probe must catch the vIOMMU corruption: {r}")
            }
            "p2pmem switch peer" => assert!(direct, "{name}: {r}"),
            _ => assert!(!direct, "{name}: {r}"),
        }
        if name == "ivshmem BAR2" {
            if let Some(back) = ivshmem_file(SHM_AT, LEN) {
                assert!(back == expect, "the host's ivshmem file does not hold the loaded range");
                println!("  ivshmem backing file verified at {SHM_AT:#x} ({LEN} bytes)");
            }
        }
    }

    // A file range (tmpfs, no PCI device behind it), unaligned at both ends, into host memory.
    let path = std::path::Path::new("/tmp/peermem-loader-src.bin");
    std::fs::write(path, &expect).unwrap();
    let host: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(LEN).unwrap());
    let g = reg.register(host.clone()).unwrap();
    let src = loader.open(path).unwrap();
    let range = 1234..LEN - 77;
    let r = loader.read(&src, range.start, range.end - range.start, &g, 100).unwrap();
    println!("{topology}: file -> host:\n{r}");
    let part = &expect[range.start as usize..range.end as usize];
    assert_eq!(r.checksums, vec![xxh3_64(part)]);
    assert!(read_dest(&topo, &host, 100, range.end - range.start) == part);
    std::fs::remove_file(path).unwrap();
}

/// Through the userspace VFIO driver: into the ivshmem BAR direct when the registry routes
/// it (bus_addr under the switch in `switch-gpu`, an IOVA under the vIOMMU), else bounced (and no
/// command aimed at the BAR); into host memory direct. Verified by checksum, by the bytes, and in
/// the host's ivshmem file; the controller goes back to the kernel driver afterwards.
#[test]
fn loader_through_the_vfio_driver_reaches_the_gpu_bar() {
    use peermem::RouteKind as K;
    const LEN: u64 = 8 << 20;
    const AT: u64 = 80 << 20;
    const SHM_AT: u64 = 160 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    let expect = write_known(&topo, x, AT, LEN, 7);
    let want = xxh3_64(&expect);

    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let loader = Loader::new(&reg, Options { verify: Verify::Reread, ..Default::default() }).unwrap();
    let src = loader.open_nvme(Controller::open(&binding, &reg, 1).unwrap()).unwrap();
    let peer = reg.peer(x).unwrap();
    let mut dests: Vec<(&str, Arc<dyn PeerMemory>)> = vec![("host", Arc::new(HostRegion::new(LEN).unwrap()))];
    if let Some(shm) = ivshmem(&topo) {
        dests.push(("ivshmem BAR2", Arc::new(BarRegion { bdf: shm, bar: 2, offset: SHM_AT, len: LEN })));
    }
    for (name, region) in dests {
        let g = reg.register(region.clone()).unwrap();
        let kind = reg.resolve(&g, peer).unwrap().kind;
        let r = loader.read(&src, AT, LEN, &g, 0).unwrap();
        println!("{topology}: {x} (VFIO) -> {name}:\n{r}");
        assert_eq!((r.checksums.clone(), r.source_checksums.clone()), (vec![want], vec![want]), "{name}");
        assert!(read_dest(&topo, &region, 0, LEN) == expect, "{name}: bytes differ");
        match kind {
            K::Bounce(_) => assert_eq!(r.dests[0].via, Via::Bounce, "{name}: {r}"),
            K::BusAddr(_) | K::CpuMapped(_) => assert_eq!(r.dests[0].via, Via::Direct, "{name}: {r}"),
            _ => {}
        }
        if name == "ivshmem BAR2" {
            if topology == "switch-gpu" {
                assert!(matches!(kind, K::BusAddr(_)), "ivshmem under the switch: {kind:?}");
            }
            if let Some(back) = ivshmem_file(SHM_AT, LEN) {
                assert!(back == expect, "the host's ivshmem file does not hold the loaded range");
                println!("  ivshmem backing file verified at {SHM_AT:#x} ({LEN} bytes)");
            }
        }
    }
    drop(loader);
    drop(src.into_controller().expect("no loader holds the namespace any more"));
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}

/// With the GPU as the destination: a host-visible Vulkan buffer (lavapipe in the guest,
/// reached through the host root) filled from a namespace range by the loader. lavapipe memory is
/// system RAM without a PCI function, so the route is through its CPU mapping; the data is checked
/// by the loader's xxh3 and by a GPU copy (vkCmdCopyBuffer) into a second buffer read back.
#[test]
fn loader_fills_a_vulkan_buffer_checked_by_a_gpu_copy() {
    use peermem_vulkan::{Device, Placement, Select};
    const LEN: u64 = 8 << 20;
    const AT: u64 = 96 << 20;
    let topo = live();
    let x = nvme_controllers(&topo)[0];
    let expect = write_known(&topo, x, AT, LEN, 11);

    let gpu = Device::open(Select::Best).expect("a Vulkan device (lavapipe) in the guest");
    let vram = Arc::new(gpu.allocate(LEN, Placement::Mappable).unwrap());
    let reg = Registry::new(topo.clone());
    let g = reg.register(vram.clone()).unwrap();
    let loader = Loader::new(&reg, Options { verify: Verify::Reread, ..Default::default() }).unwrap();
    let src = loader.open_namespace(x).unwrap();
    let r = loader.read(&src, AT, LEN, &g, 0).unwrap();
    println!("{x} -> Vulkan buffer:\n{r}");
    assert_eq!((r.checksums.clone(), r.source_checksums.clone()), (vec![xxh3_64(&expect)], vec![xxh3_64(&expect)]));
    // lavapipe memory is host memory with a CPU mapping: O_DIRECT lands straight in it.
    assert_eq!(r.dests[0].via, Via::Direct, "{r}");

    let back = gpu.allocate(LEN, Placement::Mappable).unwrap();
    gpu.copy(&vram, 0, &back, 0, LEN).unwrap();
    let mut got = vec![0u8; LEN as usize];
    back.read_at(0, &mut got).unwrap();
    assert!(got == expect, "the GPU copy of the loaded buffer differs from the namespace range");
    drop(g);
}

/// The `Loader` through the kernel's NVMe driver (io_uring, then the pread pool):
/// one batch of namespace ranges, aligned and not, into host memory, a switch peer's p2pmem
/// (O_DIRECT straight into P2PDMA pages; under the translated vIOMMU the probe catches the
/// corruption and the bytes are staged), p2pmem across the host bridge and the ivshmem BAR
/// (staged through host buffers). Every byte is compared, and the report's route and method
/// match the verdict.
#[test]
fn async_loader_batches_namespace_ranges_into_every_destination_kind() {
    use peermem_loader::{Batch, Dest, Engine};
    const LEN: u64 = 4 << 20;
    const AT: u64 = 112 << 20;
    const SHM_AT: u64 = 192 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, y) = switch_pair(&topo, &nvmes).expect("a switch-local NVMe pair");
    let expect = write_known(&topo, x, AT, LEN, 13);
    let reg = Registry::new(topo.clone());
    let dests = every_destination(&topo, &nvmes, x, y, SHM_AT, LEN);
    let ns = Loader::new(&reg, Options::default()).unwrap().open_namespace(x).unwrap().path().unwrap().to_path_buf();
    for engine in [Engine::Uring, Engine::Pool] {
        let loader = Loader::new(
            &reg,
            Options {
                engine,
                verify: Verify::Hash,
                chunk: 512 << 10,
                depth: 8,
                io: IoMode::Direct,
                ..Default::default()
            },
        )
        .unwrap();
        let f = loader.open(&ns).unwrap();
        assert!(f.is_direct());
        let guards: Vec<_> = dests.iter().map(|(_, r)| reg.register(r.clone()).unwrap()).collect();
        let mut b = Batch::new();
        for g in &guards {
            // The first half aligned, the second half starting 5 bytes in.
            b.read(&f, AT, LEN / 2, Dest::region(g), 0);
            b.read(&f, AT + LEN / 2 + 5, LEN / 2 - 5, Dest::region(g), LEN / 2 + 5);
        }
        let r = loader.run(b).unwrap();
        println!("{topology} {engine:?}: {x} -> {} destinations:\n{r}", dests.len());
        for ((name, region), d) in dests.iter().zip(&r.dests) {
            let mut want = expect.clone();
            let got = read_dest(&topo, region, 0, LEN);
            want[LEN as usize / 2..LEN as usize / 2 + 5].copy_from_slice(&got[LEN as usize / 2..LEN as usize / 2 + 5]);
            assert!(got == want, "{engine:?} {name}: bytes differ");
            match *name {
                "host" => assert_eq!(d.via, Via::Direct, "{name}: {d:?}"),
                "p2pmem switch peer" if topology == "switch-iommu" => assert_eq!(d.via, Via::Bounce, "{name}: {d:?}"),
                "p2pmem switch peer" => assert_eq!(d.via, Via::Direct, "{name}: {d:?}"),
                _ => assert_eq!(d.via, Via::Bounce, "{name}: {d:?}"),
            }
        }
        assert_eq!(r.checksums.len(), 2 * dests.len());
    }
}

/// `ShardReader` over a namespace split into fixed-size records by an index: every record of an
/// epoch lands in a host ring and equals the namespace bytes.
#[test]
fn shard_reader_reads_namespace_records_into_a_host_ring() {
    use peermem_loader::{Layout, RingBuffer, ShardOptions, ShardReader};
    const AT: u64 = 128 << 20;
    const REC: u64 = 64 << 10;
    const N: u64 = 64;
    let topo = live();
    let x = nvme_controllers(&topo)[0];
    let expect = write_known(&topo, x, AT, REC * N, 17);
    let reg = Registry::new(topo.clone());
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let f = loader.open_namespace(x).unwrap();
    let index = (0..N).map(|i| (0, AT + i * REC, REC)).collect();
    let opts = ShardOptions { batch_size: 8, shuffle: true, seed: 3, ..Default::default() };
    let mut r = ShardReader::new(loader, vec![f], Layout::Index(index), opts, RingBuffer::host).unwrap();
    let mut seen = Vec::new();
    while let Some(b) = r.next_batch() {
        let b = b.unwrap();
        for (i, &g) in b.indices.iter().enumerate() {
            let want = &expect[(g as u64 * REC) as usize..((g as u64 + 1) * REC) as usize];
            assert!(b.read_record(i).unwrap() == want, "record {g}");
        }
        seen.extend(b.indices.iter().copied());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..N as usize).collect::<Vec<_>>());
}

/// The `Loader` reading a namespace through the userspace VFIO driver: one batch of
/// ranges, block aligned and not, into host memory, the ivshmem "GPU" BAR and a switch peer's
/// p2pmem (when the controller has one). Direct parts are read commands aimed at the routed
/// address with many in flight; unaligned parts (and destinations the route bounces) are staged.
/// Every byte is compared, the expected xxh3 and a second read of the namespace are checked, and
/// a strict loader refuses the unaligned read by name.
#[test]
fn async_loader_reads_a_vfio_namespace_with_many_commands_in_flight() {
    use peermem::RouteKind as K;
    use peermem_loader::{Batch, Dest, LoadError};
    const LEN: u64 = 4 << 20;
    const AT: u64 = 144 << 20;
    const SHM_AT: u64 = 208 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, y) = vfio_candidate(&topo, &nvmes);
    let expect = write_known(&topo, x, AT, LEN, 19);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let peer = reg.peer(x).unwrap();
    let mut dests: Vec<(&str, Arc<dyn PeerMemory>)> = vec![("host", Arc::new(HostRegion::new(LEN).unwrap()))];
    if let Some(shm) = ivshmem(&topo) {
        dests.push(("ivshmem BAR2", Arc::new(BarRegion { bdf: shm, bar: 2, offset: SHM_AT, len: LEN })));
    }
    if let Some(y) = y {
        dests.push(("p2pmem switch peer", Arc::new(P2pmemRegion::allocate(&topo, y, LEN).unwrap())));
    }
    // TCG on a loaded host: a generous bound on each wait.
    let timeout = std::time::Duration::from_secs(600);
    let opts = Options { verify: Verify::Reread, chunk: 128 << 10, depth: 32, timeout, ..Default::default() };
    let loader = Loader::new(&reg, opts).unwrap();
    let ns = loader.open_nvme(ctrl).unwrap();
    let guards: Vec<_> = dests.iter().map(|(_, r)| reg.register(r.clone()).unwrap()).collect();
    let half = LEN as usize / 2;
    let mut b = Batch::new();
    for g in &guards {
        b.read_expect(&ns, AT, LEN / 2, Dest::region(g), 0, xxh3_64(&expect[..half]));
        b.read(&ns, AT + LEN / 2 + 5, LEN / 2 - 5, Dest::region(g), LEN / 2 + 5);
    }
    let t0 = std::time::Instant::now();
    let r = loader.run(b).unwrap();
    println!(
        "{topology}: {x} (VFIO, async) -> {} destinations, peak {} commands in flight, {:.1} s with probes and \
         verification:\n{r}",
        dests.len(),
        ns.peak_in_flight(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(r.verified, Some(true), "{r}");
    assert_eq!(r.checksums.len(), 2 * dests.len());
    assert!(r.engine.contains("VFIO"), "{}", r.engine);
    assert!(ns.peak_in_flight() > 1, "a batch must keep several commands in flight");
    for ((name, region), d) in dests.iter().zip(&r.dests) {
        let mut want = expect.clone();
        let got = read_dest(&topo, region, 0, LEN);
        want[half..half + 5].copy_from_slice(&got[half..half + 5]);
        assert!(got == want, "{name}: bytes differ");
        let kind = reg.resolve(&guards[dests.iter().position(|(n, _)| n == name).unwrap()], peer).unwrap().kind;
        match kind {
            K::Bounce(_) => assert_eq!(d.via, Via::Bounce, "{name}: {d:?}"),
            K::BusAddr(_) | K::CpuMapped(_) => {
                assert_eq!(d.via, Via::Direct, "{name}: {d:?}");
                assert!(d.bytes_direct >= LEN / 2, "{name}: {d:?}");
            }
            _ => {}
        }
        assert!(d.reasons.iter().any(|s| s.starts_with("plan:")), "{name}: {:?}", d.reasons);
        if *name == "ivshmem BAR2" {
            if let Some(back) = ivshmem_file(SHM_AT, LEN) {
                assert!(back[..half] == expect[..half], "the host's ivshmem file does not hold the loaded range");
            }
        }
    }
    assert!(r.fallbacks.iter().any(|f| f.contains("not aligned for a direct read")), "{:?}", r.fallbacks);

    // Bad input: typed errors before any command is built.
    let bad = |offset: u64, len: u64, doff: u64| {
        let mut b = Batch::new();
        b.read(&ns, offset, len, Dest::region(&guards[0]), doff);
        loader.run(b).unwrap_err()
    };
    let issued = ns.peak_in_flight();
    assert!(matches!(bad(ns.len() - 4096, 8192, 0), LoadError::BadRange { .. }));
    assert!(matches!(bad(AT, 0, 0), LoadError::BadRange { .. }));
    assert!(matches!(bad(AT, 4096, LEN - 100), LoadError::TooSmall { .. }));
    assert!(matches!(bad(u64::MAX - 10, 4096, 0), LoadError::BadRange { .. }));
    assert_eq!(ns.peak_in_flight(), issued);

    let strict = Loader::new(&reg, Options { strict: true, ..Default::default() }).unwrap();
    let mut b = Batch::new();
    b.read(&ns, AT + 5, 4096, Dest::region(&guards[0]), 0);
    let e = strict.run(b).unwrap_err();
    assert!(matches!(e, LoadError::NotDirect { .. }), "{e:?}");
    drop((strict, loader, guards));
    drop(ns.into_controller().expect("no batch holds the namespace any more"));
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}

/// A batch whose commands outlive the loader's timeout (5 ms; QEMU limits the drive to 20
/// requests/s, a twentieth of a second a command) ends with the driver's typed timeout after the controller was
/// disabled (no buffer is released while it may still write); the namespace handle then serves a
/// loader with a sane timeout, whose batch re-creates the queues and delivers the right bytes.
#[test]
fn vfio_timeout_ends_an_async_batch_with_a_typed_error_after_a_quiesce() {
    use peermem_loader::{Batch, Dest, LoadError};
    use peermem_nvme::NvmeError;
    use std::time::Duration;
    const LEN: u64 = 8 << 20;
    const AT: u64 = 176 << 20;
    const REC: u64 = 128 << 10;
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    let expect = write_known(&topo, x, AT, LEN, 23);
    let slow = Throttle::new(x, 20);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let ns =
        Loader::new(&reg, Options::default()).unwrap().open_nvme(Controller::open(&binding, &reg, 1).unwrap()).unwrap();
    let host = Arc::new(HostRegion::new(LEN).unwrap());
    let g = reg.register(host.clone() as Arc<dyn PeerMemory>).unwrap();
    let batch = |ns: &peermem_loader::Source| {
        let mut b = Batch::new();
        // Records in reverse order: one command each.
        for i in (0..LEN / REC).rev() {
            b.read(ns, AT + i * REC, REC, Dest::region(&g), i * REC);
        }
        b
    };
    // Depth 4: at the throttled rate the four commands in flight at the timeout complete within
    // the quiesce's drain, before the controller is disabled.
    let fast =
        Loader::new(&reg, Options { timeout: Duration::from_millis(5), depth: 4, ..Default::default() }).unwrap();
    let mut t = fast.submit(batch(&ns)).unwrap();
    let r = t.wait_timeout(Duration::from_secs(300)).expect("the batch ends within the test's bound");
    drop(fast);
    let e = r.expect_err("64 throttled reads within 5 ms each");
    println!("{x}: {e}");
    assert!(matches!(e, LoadError::Nvme(NvmeError::Timeout { .. } | NvmeError::Fatal)), "{e:?}");
    assert!(ns.needs_reinit(), "a timeout with commands in flight must disable the controller");
    drop(slow);

    host.write_at(0, &vec![0x5a; LEN as usize]).unwrap();
    let loader = Loader::new(&reg, Options::default()).unwrap();
    let r = loader.run(batch(&ns)).unwrap();
    println!("{x}: after the quiesce:\n{r}");
    assert!(!ns.needs_reinit());
    assert!(read_dest(&topo, &(host.clone() as Arc<dyn PeerMemory>), 0, LEN) == expect, "bytes after the re-init");
    drop((loader, g));
    drop(ns.into_controller().expect("no loader holds the namespace any more"));
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}
