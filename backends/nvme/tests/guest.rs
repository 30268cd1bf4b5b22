//! Inside the testbed guest only (cargo feature `guest`; run through `testbed/run`): the real
//! Linux 6.12 P2PDMA code decides every NVMe pair, and peermem's verdict must predict it.
//!
//! For every ordered (provider, client) pair of NVMe controllers: allocate 1 MiB of the
//! provider's CMB through `p2pmem/allocate`, O_DIRECT-read the client's namespace into it, and
//! compare with `Topology::verdict(provider, client)` read from the same live sysfs: EREMOTEIO
//! exactly when peermem says `not_supported`, success otherwise. On success the data must match,
//! except in the one measured trap: under QEMU's translated vIOMMU, QEMU sends
//! the switch-local peer-to-peer DMA through the IOMMU while the kernel programmed bus addresses,
//! so the read "succeeds" with wrong data. That case is asserted as what it is.

use std::sync::Arc;

use std::time::Duration;

use peermem::mover::{reachable, Reach};
use peermem::{BarRegion, Bdf, HostRegion, MapType, PeerMemory, Registry, RouteKind, Topology};
use peermem_nvme::cmb::open_bar0_sysfs;
use peermem_nvme::regs::CmbState;
use peermem_nvme::{Binding, BlockDevice, CmbRegion, Controller, Dir, Io, IommuMode, NvmeError, P2pmemRegion};

mod common;
use common::*;

const LEN: u64 = 1 << 20;

/// A pattern unique to each client (its BDF) and offset.
fn pattern(client: Bdf, i: usize) -> u8 {
    (i as u64 * 131 + client.bus() as u64 * 7 + (i as u64 >> 12)) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Match,
    Corrupt,
    Eremoteio,
}

#[test]
fn kernel_p2pdma_agrees_with_peermem_for_every_nvme_pair() {
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    assert!(nvmes.len() >= 4, "expected the testbed's 4 NVMe controllers, found {nvmes:?}");

    // Write each client's pattern to its namespace from host memory.
    for &c in &nvmes {
        let bd = BlockDevice::open_namespace(&topo, c).unwrap();
        let mut buf = HostRegion::new(LEN).unwrap();
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(c, i);
        }
        bd.write_at(0, buf.as_mut_slice()).unwrap();
    }

    let reg = Registry::new(topo.clone());
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    for &p in nvmes.iter().filter(|&&b| topo.by_bdf(b).unwrap().p2pmem.is_some()) {
        for &c in &nvmes {
            let v = topo.verdict(topo.idx(p).unwrap(), topo.idx(c).unwrap());
            let mut region = P2pmemRegion::allocate(&topo, p, LEN).unwrap();
            region.as_mut_slice().fill(0xee);
            let bd = BlockDevice::open_namespace(&topo, c).unwrap();
            let outcome = match bd.read_at(0, region.as_mut_slice()) {
                Ok(()) => {
                    let mut back = vec![0u8; LEN as usize];
                    region.read_at(0, &mut back).unwrap();
                    if back.iter().enumerate().all(|(i, &b)| b == pattern(c, i)) {
                        Outcome::Match
                    } else {
                        Outcome::Corrupt
                    }
                }
                Err(e) if e.is_remote() => Outcome::Eremoteio,
                Err(e) => panic!("{p} -> {c}: unexpected error {e}"),
            };
            // The registry's route for the same region and client.
            let g = reg.register(Arc::new(region) as Arc<dyn PeerMemory>).unwrap();
            let route = reg.resolve(&g, reg.peer(c).unwrap()).unwrap();
            // `switch-iommu` and its variants (`switch-iommu-zen`) share the trap.
            let iommu_trap = topology.starts_with("switch-iommu") && v.map_type == MapType::BusAddr && p != c;
            let expected = match v.map_type {
                MapType::NotSupported => Outcome::Eremoteio,
                _ if iommu_trap => Outcome::Corrupt,
                _ => Outcome::Match,
            };
            table.push(format!(
                "{p} -> {c}: peermem {} (distance {}, route {}), kernel {:?}",
                v.map_type.as_str(),
                v.distance,
                route.kind.name(),
                outcome
            ));
            if outcome != expected {
                wrong.push(format!("{p} -> {c}: expected {expected:?}, got {outcome:?}"));
            }
            match v.map_type {
                MapType::BusAddr => assert!(matches!(route.kind, RouteKind::BusAddr(_)), "{p}->{c}: {:?}", route.kind),
                MapType::NotSupported => {
                    assert!(matches!(route.kind, RouteKind::Bounce(_)), "{p}->{c}: {:?}", route.kind)
                }
                MapType::ThruHostBridge => {}
            }
        }
    }
    println!("topology {topology}:");
    for l in &table {
        println!("  {l}");
    }
    assert!(wrong.is_empty(), "kernel and peermem disagree:\n{}", wrong.join("\n"));
    assert!(table.len() >= 16);
}

/// the real registers of every controller, read through sysfs `resource0` while the
/// kernel driver owns it, decode to what QEMU's `nvme,cmb_size_mb=N` presents.
#[test]
fn live_registers_decode_through_sysfs_resource0() {
    let topo = live();
    for bdf in nvme_controllers(&topo) {
        let bar0 = open_bar0_sysfs(&topo, bdf).unwrap();
        let r = bar0.registers().unwrap();
        println!(
            "{bdf}: NVMe {} MQES {} TO {} ms DSTRD {} MPS {}..{} CC.EN {} CSTS.RDY {} AQA {:?} CMBS {} CMBMSC.CRE {} cmb {:?}",
            r.vs, r.cap.mqes, r.cap.timeout_ms, r.cap.doorbell_stride, r.cap.mps_min, r.cap.mps_max, r.cc.en,
            r.csts.rdy, r.aqa, r.cap.cmbs, r.cmbmsc.cre, r.cmb()
        );
        assert!(r.vs.major >= 1);
        assert!(r.cc.en && r.csts.rdy && !r.csts.cfs, "the kernel driver keeps {bdf} enabled");
        assert_eq!((r.cc.iosqes, r.cc.iocqes), (6, 4));
        assert_ne!(r.asq, 0);
        let has_cmb = topo.by_bdf(bdf).unwrap().p2pmem.is_some();
        match r.cmb().unwrap() {
            CmbState::Present(c) => {
                assert!(has_cmb, "{bdf}: CMB without p2pmem");
                assert_eq!(c.bir, 2);
                assert!(c.caps.wds && c.caps.rds && c.caps.lists && c.caps.sqs, "{c:?}");
                let bar = topo.by_bdf(bdf).unwrap().bar(2).unwrap().cpu.len();
                c.check_within(bar).unwrap();
            }
            other => assert!(!has_cmb, "{bdf}: p2pmem but registers say {other:?}"),
        }
    }
}

/// every CMB found from its registers is a region the registry resolves; a peer gets
/// `BusAddr` exactly when the kernel verdict is bus_addr (the switch pair in `switch`).
#[test]
fn cmb_regions_resolve_through_the_registry() {
    let topo = live();
    let reg = Registry::new(topo.clone());
    let nvmes = nvme_controllers(&topo);
    let mut bus_pairs = 0;
    for &p in nvmes.iter().filter(|&&b| topo.by_bdf(b).unwrap().p2pmem.is_some()) {
        let region = CmbRegion::discover(&topo, p).unwrap();
        let bar = topo.by_bdf(p).unwrap().bar(region.bar()).unwrap().clone();
        let g = reg.register(Arc::new(region) as Arc<dyn PeerMemory>).unwrap();
        assert_eq!(g.cpu_phys(), Some(bar.cpu.start()));
        for &c in nvmes.iter().filter(|&&c| c != p) {
            let v = topo.verdict(topo.idx(p).unwrap(), topo.idx(c).unwrap());
            let route = reg.resolve(&g, reg.peer(c).unwrap()).unwrap();
            match v.map_type {
                MapType::BusAddr => {
                    bus_pairs += 1;
                    assert_eq!(route.kind, RouteKind::BusAddr(bar.window().unwrap().bus().start()), "{p} -> {c}");
                }
                MapType::NotSupported => {
                    assert!(matches!(route.kind, RouteKind::Bounce(_)), "{p} -> {c}: {:?}", route.kind)
                }
                MapType::ThruHostBridge => {
                    assert!(
                        matches!(route.kind, RouteKind::HostBridge(_) | RouteKind::Iommu(_)),
                        "{p} -> {c}: {:?}",
                        route.kind
                    )
                }
            }
        }
    }
    assert!(bus_pairs >= 2, "the switch pair resolves bus_addr both ways");
}

/// the userspace VFIO driver reads known data into host memory and into peer memory
/// through the registry's routes, writes through VFIO and the kernel reads it back, refuses a
/// `Bounce` pair with no command issued (then the data bounces through host memory into the
/// ivshmem BAR, verified in the host's backing file), and hands the controller back to nvme.
#[test]
fn vfio_driver_moves_data_only_through_registry_routes() {
    const LEN: u64 = 1 << 20;
    const SRC: u64 = 16 << 20;
    const DST: u64 = 32 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, switch_peer) = vfio_candidate(&topo, &nvmes);
    let shm = ivshmem(&topo);
    println!("{topology}: VFIO on {x}, switch peer {switch_peer:?}, ivshmem {shm:?}");

    // Known data at SRC through the kernel driver, before VFIO takes the controller.
    let expect = write_known(&topo, x, SRC, LEN, 1);
    // Peer memory that stays owned by the kernel: a p2pmem allocation on the switch peer.
    let peer_region = switch_peer.map(|y| P2pmemRegion::allocate(&topo, y, LEN).unwrap());

    let reg = Registry::new(topo.clone());
    // Decided before binding: vfio-pci gives a no-IOMMU function a (noiommu-N) group too.
    let translated = iommu_group_size(x).is_some();
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let ns = ctrl.namespace();
    println!("  {:?} {:?} mode {:?}", ctrl.info(), ns, ctrl.mode());
    assert_eq!(ctrl.mode(), if translated { IommuMode::Type1 } else { IommuMode::NoIommu });
    let bs = ns.block_size;

    // Host memory: route cpu_mapped, DMA through the container's IOVA or locked pages.
    let host_mem = Arc::new(HostRegion::new(LEN).unwrap());
    let host = reg.register(host_mem.clone() as Arc<dyn PeerMemory>).unwrap();
    ctrl.transfer(&reg, Dir::Read, &host, 0, SRC / bs, LEN).unwrap();
    let mut got = vec![0u8; LEN as usize];
    host_mem.read_at(0, &mut got).unwrap();
    assert!(got == expect, "VFIO read into host memory differs");

    // Write through VFIO from host memory, read back through VFIO.
    let src_mem = Arc::new(HostRegion::new(LEN).unwrap());
    let src = reg.register(src_mem.clone() as Arc<dyn PeerMemory>).unwrap();
    let pattern2: Vec<u8> = (0..LEN as usize).map(|i| fill(2, i)).collect();
    src_mem.write_at(0, &pattern2).unwrap();
    ctrl.transfer(&reg, Dir::Write, &src, 0, DST / bs, LEN).unwrap();
    ctrl.transfer(&reg, Dir::Read, &host, 0, DST / bs, LEN).unwrap();
    host_mem.read_at(0, &mut got).unwrap();
    assert!(got == pattern2, "VFIO write/read round trip differs");

    // Controller reset between transfers (CC.EN 1 -> 0 -> 1, fresh queues): I/O works after it.
    ctrl.reset().unwrap();
    host_mem.write_at(0, &vec![0u8; LEN as usize]).unwrap();
    ctrl.transfer(&reg, Dir::Read, &host, 0, DST / bs, LEN).unwrap();
    host_mem.read_at(0, &mut got).unwrap();
    assert!(got == pattern2, "read after a controller reset differs");

    // Bad input: past the namespace, misaligned, past the region: typed, and no command.
    let before = ctrl.commands_issued();
    let e = ctrl.transfer(&reg, Dir::Read, &host, 0, ns.blocks - 1, 2 * bs).unwrap_err();
    assert!(matches!(e, NvmeError::OutOfNamespace { .. }), "{e}");
    assert!(matches!(ctrl.transfer(&reg, Dir::Read, &host, 0, 0, 100).unwrap_err(), NvmeError::BadTransfer { .. }));
    assert!(matches!(ctrl.transfer(&reg, Dir::Read, &host, 4096, 0, LEN).unwrap_err(), NvmeError::BadTransfer { .. }));
    assert_eq!(ctrl.commands_issued(), before);

    // The stand-in GPU BAR (ivshmem BAR2): direct when the registry says so, else refused
    // before any command and bounced through host memory by the CPU. (`wide` has no ivshmem.)
    if let Some(shm) = shm {
        // Zero the BAR first, so only this transfer can put the data there.
        open_resource(&topo, shm, 2, LEN).write_at(0, &vec![0u8; LEN as usize]).unwrap();
        let gpu =
            reg.register(Arc::new(BarRegion { bdf: shm, bar: 2, offset: 0, len: LEN }) as Arc<dyn PeerMemory>).unwrap();
        let route = reg.resolve(&gpu, reg.peer(x).unwrap()).unwrap();
        println!("  {x} -> ivshmem BAR2: route {} ({:?})", route.kind.name(), route.map_type());
        let before = ctrl.commands_issued();
        match ctrl.transfer(&reg, Dir::Read, &gpu, 0, SRC / bs, LEN) {
            Ok(()) => {
                let direct = reachable(&route.kind, &gpu, Reach::DeviceAddress);
                assert!(direct.is_ok(), "a {} route must not DMA: {direct:?}", route.kind.name());
                if topology == "switch-gpu" {
                    assert!(matches!(route.kind, RouteKind::BusAddr(_)), "ivshmem under the switch: {:?}", route.kind);
                }
            }
            Err(NvmeError::RouteRefused { kind, .. }) => {
                let direct = reachable(&route.kind, &gpu, Reach::DeviceAddress).is_ok();
                assert!(!direct || kind == "iommu", "refused a direct route: {kind}");
                assert_eq!(ctrl.commands_issued(), before, "a refused route issued commands");
                // Bounce: namespace -> host (VFIO) -> ivshmem BAR (CPU through sysfs resource2).
                ctrl.transfer(&reg, Dir::Read, &host, 0, SRC / bs, LEN).unwrap();
                host_mem.read_at(0, &mut got).unwrap();
                let bar = open_resource(&topo, shm, 2, LEN);
                bar.write_at(0, &got).unwrap();
            }
            Err(e) => panic!("{x} -> ivshmem: {e}"),
        }
        if let Some(file) = std::env::var_os("PEERMEM_IVSHMEM_FILE") {
            let mut back = vec![0u8; LEN as usize];
            std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&file).unwrap(), &mut back, 0).unwrap();
            assert!(back == expect, "the host's ivshmem file does not hold the namespace data");
            println!("  ivshmem backing file verified ({} bytes)", back.len());
        }
    }

    // A switch peer's p2pmem pages (kernel-owned CMB pool): BusAddr, direct.
    if let (Some(y), Some(region)) = (switch_peer, peer_region) {
        let region = Arc::new(region);
        let p = reg.register(region.clone() as Arc<dyn PeerMemory>).unwrap();
        let route = reg.resolve(&p, reg.peer(x).unwrap()).unwrap();
        println!("  {x} -> {y} p2pmem: route {}", route.kind.name());
        assert!(matches!(route.kind, RouteKind::BusAddr(_)));
        ctrl.transfer(&reg, Dir::Read, &p, 0, SRC / bs, LEN).unwrap();
        region.read_at(0, &mut got).unwrap();
        let ok = got == expect;
        println!("  VFIO read into {y}'s CMB through its bus address: {}", if ok { "data matches" } else { "CORRUPT" });
        if ctrl.mode() == IommuMode::NoIommu {
            assert!(ok, "bus-address DMA into the switch peer's CMB differs");
        }
    }

    drop(ctrl);
    binding.restore().unwrap();
    let topo = wait_for_nvme_driver(x);
    let mut back = HostRegion::new(LEN).unwrap();
    BlockDevice::open_namespace(&topo, x).unwrap().read_at(DST, back.as_mut_slice()).unwrap();
    assert!(back.as_mut_slice() == &pattern2[..], "the kernel reads back what VFIO wrote");
}

/// the core mover's route integrity probe. For every switch-local pair (kernel verdict
/// bus_addr, route BusAddr), a canary goes namespace -> provider's p2pmem by O_DIRECT (the
/// direct route) and is read back by the CPU. Under `switch-iommu` QEMU's translated vIOMMU
/// makes that DMA "succeed" with corrupt data (the kernel programmed bus addresses): the probe must mark the route
/// broken and the copy must fall back to a bounce through host memory, which delivers the right
/// bytes. Elsewhere the canary is intact and the copy goes direct.
#[test]
fn route_probe_catches_the_viommu_corruption_and_bounces() {
    use peermem::mover::{Ask, BounceReason, Plan, Probe, Reach, RouteHealth};
    use std::cell::RefCell;
    const CANARY: u64 = 64 << 10;
    const LEN: u64 = 1 << 20;
    const AT: u64 = 48 << 20;
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let reg = Registry::new(topo.clone());
    let health = RouteHealth::new();
    let mut pairs = 0;
    for &p in nvmes.iter().filter(|&&b| topo.by_bdf(b).unwrap().p2pmem.is_some()) {
        for &c in nvmes.iter().filter(|&&c| c != p) {
            let v = topo.verdict(topo.idx(p).unwrap(), topo.idx(c).unwrap());
            if v.map_type != MapType::BusAddr {
                continue;
            }
            pairs += 1;
            let region = RefCell::new(P2pmemRegion::allocate(&topo, p, LEN).unwrap());
            let (bar, off) = (region.borrow().bar(), region.borrow().bar_offset());
            // The same pages as the registry sees them: a range of p's BAR.
            let g = reg
                .register(Arc::new(BarRegion { bdf: p, bar, offset: off, len: LEN }) as Arc<dyn PeerMemory>)
                .unwrap();
            let peer = reg.peer(c).unwrap();
            let route = reg.resolve(&g, peer).unwrap();
            assert!(matches!(route.kind, RouteKind::BusAddr(_)));
            let bd = BlockDevice::open_namespace(&topo, c).unwrap();
            let stage = RefCell::new(HostRegion::new(LEN).unwrap());
            let direct = |canary: &[u8]| -> Result<(), String> {
                let mut h = stage.borrow_mut();
                h.as_mut_slice()[..canary.len()].copy_from_slice(canary);
                bd.write_at(AT, &h.as_mut_slice()[..canary.len()]).map_err(|e| e.to_string())?;
                bd.read_at(AT, &mut region.borrow_mut().as_mut_slice()[..canary.len()]).map_err(|e| e.to_string())
            };
            let read_back = |buf: &mut [u8]| region.borrow().read_at(0, buf).map_err(|e| e.to_string());
            let probe = Probe::Canary { len: CANARY as usize, write: Box::new(direct), read_back: Box::new(read_back) };
            let ask = Ask { entry: &g, peer, reach: Reach::DeviceAddress, precondition: Ok(()) };
            let plan = health.decide(Ok(&route), ask, Some(probe)).plan;
            println!("{topology}: {c} -> {p} p2pmem: route {}, plan: {plan}", route.kind.name());
            let mut region = region.into_inner();

            // The real copy: namespace data at AT+LEN into the region, as the plan says.
            let data: Vec<u8> = (0..LEN as usize).map(|i| fill(5, i)).collect();
            stage.borrow_mut().as_mut_slice().copy_from_slice(&data);
            bd.write_at(AT + LEN, stage.borrow_mut().as_mut_slice()).unwrap();
            match &plan {
                Plan::Direct => bd.read_at(AT + LEN, region.as_mut_slice()).unwrap(),
                Plan::Bounce(_) => {
                    // Through host memory: O_DIRECT into a page-aligned host buffer, then a CPU
                    // copy into the region.
                    let mut tmp = HostRegion::new(LEN).unwrap();
                    bd.read_at(AT + LEN, tmp.as_mut_slice()).unwrap();
                    region.as_mut_slice().copy_from_slice(tmp.as_mut_slice());
                    println!("  bounced {LEN} bytes through host memory");
                }
            }
            let mut back = vec![0u8; LEN as usize];
            region.read_at(0, &mut back).unwrap();
            assert!(back == data, "{c} -> {p}: the planned copy ({plan}) delivered wrong data");
            if topology.starts_with("switch-iommu") {
                assert!(
                    matches!(plan, Plan::Bounce(BounceReason::Broken(_))),
                    "the probe missed the vIOMMU corruption"
                );
            } else {
                assert_eq!(plan, Plan::Direct, "{c} -> {p}");
            }
        }
    }
    assert!(pairs >= 2, "no switch-local pair to probe");
}

/// Word-granular pattern for the soak (cheap to generate and check in a debug build under TCG).
fn soak_fill(buf: &mut [u8], pass: u64, at: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let x = (at / 8 + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass.rotate_left(29);
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// write/read/verify soak through the VFIO driver: 256 MiB (or the whole namespace if
/// smaller) written in MDTS-sized commands from host memory, read back into other host memory and
/// compared, then the controller goes back to the kernel, which reads the same bytes.
#[test]
fn vfio_soak_writes_reads_and_verifies_hundreds_of_mib() {
    const BATCH: u64 = 16 << 20;
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let ns = ctrl.namespace();
    let total = (256u64 << 20).min(ns.bytes() / BATCH * BATCH);
    let bs = ns.block_size;
    let src_mem = Arc::new(HostRegion::new(BATCH).unwrap());
    let dst_mem = Arc::new(HostRegion::new(BATCH).unwrap());
    let src = reg.register(src_mem.clone() as Arc<dyn PeerMemory>).unwrap();
    let dst = reg.register(dst_mem.clone() as Arc<dyn PeerMemory>).unwrap();
    let mut buf = vec![0u8; BATCH as usize];
    let mut back = vec![0u8; BATCH as usize];
    let start = std::time::Instant::now();
    let before = ctrl.commands_issued();
    for at in (0..total).step_by(BATCH as usize) {
        soak_fill(&mut buf, 1, at);
        src_mem.write_at(0, &buf).unwrap();
        ctrl.transfer(&reg, Dir::Write, &src, 0, at / bs, BATCH).unwrap();
    }
    let wrote = start.elapsed();
    for at in (0..total).step_by(BATCH as usize) {
        ctrl.transfer(&reg, Dir::Read, &dst, 0, at / bs, BATCH).unwrap();
        dst_mem.read_at(0, &mut back).unwrap();
        soak_fill(&mut buf, 1, at);
        if buf != back {
            let i = buf.iter().zip(&back).position(|(a, b)| a != b).unwrap_or(0);
            panic!("soak: byte {:#x} differs after write/read", at + i as u64);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "soak {x}: {} MiB written ({:.1} s) and read back + verified ({:.1} s total), {} commands, {:?}",
        total >> 20,
        wrote.as_secs_f64(),
        secs,
        ctrl.commands_issued() - before,
        ctrl.mode()
    );
    assert!(total >= 128 << 20, "soak too small: {total} bytes");
    drop(ctrl);
    binding.restore().unwrap();
    // The kernel reads the last batch back as the soak wrote it.
    let topo = wait_for_nvme_driver(x);
    let mut k = HostRegion::new(BATCH).unwrap();
    BlockDevice::open_namespace(&topo, x).unwrap().read_at(total - BATCH, k.as_mut_slice()).unwrap();
    soak_fill(&mut buf, 1, total - BATCH);
    assert!(k.as_mut_slice() == &buf[..], "the kernel reads back what the soak wrote");
}

/// Sets or clears bus-master enable of a function through sysfs config space (root): with it
/// cleared the device can neither fetch commands nor post completions, i.e. it stops answering.
fn set_bus_master(bdf: Bdf, on: bool) {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::OpenOptions::new().read(true).write(true).open(format!("/sys/bus/pci/devices/{bdf}/config")).unwrap();
    let mut cmd = [0u8; 2];
    f.read_exact_at(&mut cmd, 4).unwrap();
    let v = u16::from_le_bytes(cmd);
    let v = if on { v | 0x4 } else { v & !0x4 };
    f.write_all_at(&v.to_le_bytes(), 4).unwrap();
}

/// Bad input and faults: a device that stops answering mid-stream (bus mastering cleared behind
/// the driver's back while I/O runs) gives a typed error within the driver's bounded wait, never
/// a hang; after bus mastering is restored, a controller reset brings I/O back with correct data.
#[test]
fn a_controller_that_stops_answering_fails_bounded_and_recovers_after_reset() {
    const LEN: u64 = 4 << 20;
    const AT: u64 = 96 << 20;
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    let expect = write_known(&topo, x, AT, LEN, 9);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let bs = ctrl.namespace().block_size;
    let limit = Duration::from_secs(2);
    ctrl.set_timeout(limit);
    let mem = Arc::new(HostRegion::new(LEN).unwrap());
    let g = reg.register(mem.clone() as Arc<dyn PeerMemory>).unwrap();
    ctrl.transfer(&reg, Dir::Read, &g, 0, AT / bs, LEN).unwrap();

    // Mid-stream: a second thread clears bus mastering while a stream of reads runs.
    let t0 = std::time::Instant::now();
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            set_bus_master(x, false);
        });
        let mut n = 0;
        loop {
            match ctrl.transfer(&reg, Dir::Read, &g, 0, AT / bs, LEN) {
                Ok(()) => n += 1,
                Err(e) => break (e, n),
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "the stream never noticed the dead device");
        }
    });
    let waited = t0.elapsed();
    println!("{x}: after {} good transfers, with bus mastering off: {} (after {waited:?})", err.1, err.0);
    assert!(
        matches!(err.0, NvmeError::Timeout { .. } | NvmeError::Fatal | NvmeError::Command { .. }),
        "untyped failure: {:?}",
        err.0
    );
    // Bounded: the failing transfer waited at most the timeout (plus slack for TCG).
    assert!(waited < Duration::from_secs(30), "took {waited:?}");

    set_bus_master(x, true);
    ctrl.reset().unwrap();
    mem.write_at(0, &vec![0u8; LEN as usize]).unwrap();
    ctrl.transfer(&reg, Dir::Read, &g, 0, AT / bs, LEN).unwrap();
    let mut got = vec![0u8; LEN as usize];
    mem.read_at(0, &mut got).unwrap();
    assert!(got == expect, "data after recovery differs");
    println!("{x}: recovered by a controller reset; data verified");
    drop(ctrl);
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}
/// A small xorshift for test layouts (deterministic per seed).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// 64 ranges of 4 KiB..1 MiB (some needing PRP lists, some starting mid-page) gathered from
/// random places of a `src_len`-byte source area into one region, with gaps between them.
/// Returns (region offset, source offset, len) per range and the region length needed.
fn mixed_layout(bs: u64, src_len: u64, seed: u64) -> (Vec<(u64, u64, u64)>, u64) {
    let mut x = seed | 1;
    let mut at = 0u64;
    let mut out = Vec::new();
    for i in 0..64u64 {
        let len = (4096u64 << (i % 9)) + (i % 3) * bs;
        // Start mid-page for a third of them (PRP1 with an offset, then page-aligned entries).
        at += if i % 3 == 1 { bs } else { 0 };
        let src = xorshift(&mut x) % ((src_len - len) / bs) * bs;
        out.push((at, src, len));
        at = (at + len + 4096).div_ceil(4096) * 4096;
    }
    (out, at)
}

/// Many commands of mixed sizes in flight at once: 64 reads of 4 KiB..1 MiB (PRP1 only, PRP1 +
/// PRP2, PRP lists; some starting mid-page) gather known data from random places of the
/// namespace into one region in one batch, the queue full (depth - 1 commands in flight), and
/// every byte is checked, the gaps between ranges included (no command wrote outside its
/// range). Then the same layout goes back to the namespace as one batch of writes and the
/// kernel reads it back. Every completion matches a command in flight by its id.
#[test]
fn vfio_many_mixed_commands_in_flight_every_byte_checked() {
    const SRC: u64 = 128 << 20;
    const SRC_LEN: u64 = 32 << 20;
    const DST: u64 = 192 << 20;
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    let known = write_known(&topo, x, SRC, SRC_LEN, 21);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let bs = ctrl.namespace().block_size;
    let (layout, region_len) = mixed_layout(bs, SRC_LEN, 0x5eed);
    let mem = Arc::new(HostRegion::new(region_len).unwrap());
    mem.write_at(0, &vec![0xee; region_len as usize]).unwrap();
    let g = reg.register(mem.clone() as Arc<dyn PeerMemory>).unwrap();
    let ios: Vec<Io> = layout.iter().map(|&(off, src, len)| Io { offset: off, lba: (SRC + src) / bs, len }).collect();
    let (issued, completed) = (ctrl.commands_issued(), ctrl.commands_completed());
    ctrl.transfer_batch(&reg, Dir::Read, &g, &ios).unwrap();
    let n = ctrl.commands_issued() - issued;
    println!(
        "{x}: {} ranges ({} KiB) as {n} commands, at most {} in flight, {:?}",
        ios.len(),
        ios.iter().map(|i| i.len).sum::<u64>() >> 10,
        ctrl.peak_in_flight(),
        ctrl.mode()
    );
    assert!(ctrl.peak_in_flight() >= 32, "only {} commands were in flight at once", ctrl.peak_in_flight());
    assert_eq!(ctrl.commands_completed() - completed, n, "every command's own completion was seen");
    assert_eq!(ctrl.stray_completions(), 0);
    let mut got = vec![0u8; region_len as usize];
    mem.read_at(0, &mut got).unwrap();
    let mut end = 0;
    for (i, &(off, src, len)) in layout.iter().enumerate() {
        let (off, src, len) = (off as usize, src as usize, len as usize);
        assert!(got[end..off].iter().all(|&b| b == 0xee), "range {i}: the gap before it was written");
        if got[off..off + len] != known[src..src + len] {
            let j = (0..len).find(|&j| got[off + j] != known[src + j]).unwrap();
            panic!("range {i} ({len} bytes at region offset {off:#x}): byte {j:#x} differs");
        }
        end = off + len;
    }
    assert!(got[end..].iter().all(|&b| b == 0xee), "the tail past the last range was written");

    // The same ranges written back out, contiguous on the namespace from DST, as one batch.
    let mut lba = DST / bs;
    let writes: Vec<Io> = layout
        .iter()
        .map(|&(off, _, len)| {
            let io = Io { offset: off, lba, len };
            lba += len / bs;
            io
        })
        .collect();
    ctrl.transfer_batch(&reg, Dir::Write, &g, &writes).unwrap();
    assert_eq!(ctrl.stray_completions(), 0);
    drop(ctrl);
    binding.restore().unwrap();
    let topo = wait_for_nvme_driver(x);
    let total: u64 = layout.iter().map(|l| l.2).sum();
    let mut back = HostRegion::new(total).unwrap();
    BlockDevice::open_namespace(&topo, x).unwrap().read_at(DST, back.as_mut_slice()).unwrap();
    let mut at = 0;
    for (i, &(_, src, len)) in layout.iter().enumerate() {
        let (src, len) = (src as usize, len as usize);
        assert!(back.as_mut_slice()[at..at + len] == known[src..src + len], "write {i}: the kernel reads other bytes");
        at += len;
    }
}

/// A timeout mid-stream: QEMU limits the drive to 20 requests/s (a command waits a twentieth of a second) and the
/// driver's bound is 5 ms, so a batch of reads fails with `Timeout` while commands are in flight.
/// The driver must have stopped the controller before returning: the buffer it was reading into
/// is then filled with a marker and released, and no byte of it changes afterwards (no late DMA). A new transfer (normal timeout) into a
/// new buffer re-creates the queues, sees no stale completion (every completion matches one of
/// its own commands by id) and delivers the right data.
#[test]
fn vfio_timeout_mid_stream_quiesces_before_release_and_a_new_transfer_sees_no_stale_completion() {
    const AT: u64 = 64 << 20;
    const AT2: u64 = 112 << 20;
    const LEN: u64 = 8 << 20;
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    write_known(&topo, x, AT, LEN, 31);
    let expect2 = write_known(&topo, x, AT2, LEN, 32);
    let slow = Throttle::new(x, 20);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    let bs = ctrl.namespace().block_size;
    let normal = Duration::from_secs(10);
    let chunk = 128 << 10;
    let ios: Vec<Io> =
        (0..LEN / chunk).map(|i| Io { offset: i * chunk, lba: (AT + i * chunk) / bs, len: chunk }).collect();

    let old = Arc::new(HostRegion::new(LEN).unwrap());
    let old_reg = reg.register(old.clone() as Arc<dyn PeerMemory>).unwrap();
    // Depth 4: at the throttled rate the four commands in flight at the timeout complete within
    // the quiesce's drain, before the controller is disabled.
    ctrl.set_timeout(Duration::from_millis(5));
    let err = ctrl.random_reads(&reg, &old_reg, 128 << 10, 64, 1, 4).expect_err("64 throttled reads within 5 ms each");
    println!("{x}: {err}");
    assert!(matches!(err, NvmeError::Timeout { .. }), "{err:?}");
    assert!(ctrl.needs_reinit(), "a timeout with commands in flight must disable the controller");
    drop(slow);

    // Release: the marker, then the registration and the driver's hold on the pages are gone.
    old.write_at(0, &vec![0x5a; LEN as usize]).unwrap();
    drop(old_reg);

    ctrl.set_timeout(normal);
    let fresh = Arc::new(HostRegion::new(LEN).unwrap());
    let g = reg.register(fresh.clone() as Arc<dyn PeerMemory>).unwrap();
    let ios2: Vec<Io> = ios.iter().map(|io| Io { lba: (AT2 + io.offset) / bs, ..*io }).collect();
    let (issued, completed, strays) = (ctrl.commands_issued(), ctrl.commands_completed(), ctrl.stray_completions());
    ctrl.transfer_batch(&reg, Dir::Read, &g, &ios2).unwrap();
    assert!(!ctrl.needs_reinit());
    assert_eq!(ctrl.stray_completions(), strays, "a stale completion reached the new transfer");
    assert_eq!(ctrl.commands_issued() - issued, ctrl.commands_completed() - completed, "unmatched completions");
    let mut got = vec![0u8; LEN as usize];
    fresh.read_at(0, &mut got).unwrap();
    assert!(got == expect2, "the new transfer's data differs");
    old.read_at(0, &mut got).unwrap();
    let late = got.iter().filter(|&&b| b != 0x5a).count();
    assert_eq!(late, 0, "{late} bytes of the released buffer changed after the timeout returned");
    println!("{x}: re-initialised, new transfer verified, released buffer untouched");
    drop(ctrl);
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}

/// Runs this test binary's test `name` again as a child with PEERMEM_VFIO_SIGTERM_CHILD set,
/// sends it SIGTERM once it printed `LOADING`, and returns how it ended (bounded: 120 s), its
/// output and how long it took to end.
fn sigterm_child(name: &str) -> (std::process::ExitStatus, Vec<String>, Duration) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(SIGTERM_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        out.push(line.clone());
        // libtest prints the test's name without a newline: the marker ends the line.
        if line.ends_with("LOADING") {
            break;
        }
    }
    assert!(out.last().is_some_and(|l| l.ends_with("LOADING")), "the child never loaded: {out:?}");
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("the child did not end within 120 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = t0.elapsed();
    out.extend(reader.join().unwrap());
    (status, out, waited)
}

const SIGTERM_CHILD: &str = "PEERMEM_VFIO_SIGTERM_CHILD";

/// The function is back on `nvme` (bounded wait: 30 s) with an empty `driver_override`.
fn assert_back_on_nvme(x: Bdf) {
    let dir = format!("/sys/bus/pci/devices/{x}");
    let t0 = std::time::Instant::now();
    loop {
        let driver = std::fs::read_link(format!("{dir}/driver")).ok();
        if driver.as_ref().is_some_and(|d| d.ends_with("nvme")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{x}: bound to {driver:?}, not nvme");
        std::thread::sleep(Duration::from_millis(50));
    }
    let over = std::fs::read_to_string(format!("{dir}/driver_override")).unwrap();
    assert!(over.trim().is_empty() || over.trim() == "(null)", "driver_override left as {over:?}");
    wait_for_nvme_driver(x);
}

/// SIGTERM while the owner of a bound controller is not in the driver (it sleeps, holding the
/// controller and the binding): nothing unwinds, so after its grace period the signal watcher
/// clears bus mastering and driver_override, leaves a helper to rebind, and the process dies of
/// the signal; once it is gone the helper gives the function back to `nvme`.
#[test]
fn vfio_sigterm_while_the_owner_is_idle_still_gives_the_controller_back() {
    const NAME: &str = "vfio_sigterm_while_the_owner_is_idle_still_gives_the_controller_back";
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    if std::env::var_os(SIGTERM_CHILD).is_some() {
        let reg = Registry::new(topo.clone());
        let binding = Binding::to_vfio(x).unwrap();
        let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
        let bs = ctrl.namespace().block_size;
        let mem = Arc::new(HostRegion::new(1 << 20).unwrap());
        let g = reg.register(mem as Arc<dyn PeerMemory>).unwrap();
        ctrl.transfer(&reg, Dir::Read, &g, 0, 0, (1 << 20) / bs * bs).unwrap();
        println!("LOADING");
        std::thread::sleep(Duration::from_secs(120));
        panic!("still alive 120 s after SIGTERM");
    }
    let (status, out, waited) = sigterm_child(NAME);
    println!("{x}: idle child {status:?} after {waited:?}:\n  {}", out.join("\n  "));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(15), "not ended by SIGTERM");
    assert_back_on_nvme(x);
}

/// `kill -TERM` during a long load through the VFIO driver: this test runs itself again as a
/// child process (PEERMEM_VFIO_SIGTERM_CHILD set) that binds the controller and reads in a loop;
/// the parent sends SIGTERM once the load runs. The child's driver sees the interrupt in its
/// bounded wait and fails the transfer, its owners unwind (controller disabled, vfio-pci
/// unbound), and the child dies of the signal. The function is then back on `nvme` with an empty
/// `driver_override`, and the kernel reads the namespace.
#[test]
fn vfio_sigterm_during_a_long_load_gives_the_controller_back_to_nvme() {
    const NAME: &str = "vfio_sigterm_during_a_long_load_gives_the_controller_back_to_nvme";
    let topo = live();
    let nvmes = nvme_controllers(&topo);
    let (x, _) = vfio_candidate(&topo, &nvmes);
    if std::env::var_os(SIGTERM_CHILD).is_some() {
        let reg = Registry::new(topo.clone());
        let binding = Binding::to_vfio(x).unwrap();
        let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
        let bs = ctrl.namespace().block_size;
        let mem = Arc::new(HostRegion::new(8 << 20).unwrap());
        let g = reg.register(mem as Arc<dyn PeerMemory>).unwrap();
        let t0 = std::time::Instant::now();
        for n in 0u64.. {
            match ctrl.transfer(&reg, Dir::Read, &g, 0, (n % 16) * (8 << 20) / bs, 8 << 20) {
                Ok(()) if n == 0 => println!("LOADING"),
                Ok(()) => {}
                Err(e) => {
                    println!("STOPPED after {n} transfers: {e}");
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "no signal came");
        }
        drop(ctrl);
        binding.restore().unwrap();
        println!("RESTORED");
        // The signal's default action ends the process now that nothing is bound.
        std::thread::sleep(Duration::from_secs(60));
        panic!("still alive 60 s after SIGTERM");
    }

    let (status, out, waited) = sigterm_child(NAME);
    println!("{x}: child {status:?}, after {waited:?}:\n  {}", out.join("\n  "));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(15), "not ended by SIGTERM");
    assert!(out.iter().any(|l| l.starts_with("STOPPED") && l.contains("interrupted")), "no interrupt seen");
    assert!(out.iter().any(|l| l == "RESTORED"));
    assert_back_on_nvme(x);
}

/// How many fresh registrations the mapping tests go through on one controller.
const FRESH: usize = 10_000;
/// Each transfer of the mapping tests: two pages (PRP1 and PRP2).
const FRESH_XFER: u64 = 8192;
/// Where on the namespace (and how much of it) the mapping tests read known data.
const FRESH_SRC: u64 = 48 << 20;
const FRESH_SPAN: u64 = 1 << 20;

/// A long-lived controller lets go of each transfer's DMA mappings once their registration has
/// ended (SPDK's rule): 10,000 transfers, each into a fresh registered host buffer that is
/// unregistered afterwards, keep at most the one live buffer mapped, map each buffer once, and
/// reuse the same few IOVA ranges; every transfer's bytes are checked. A buffer that stays
/// registered is mapped once for all its transfers. Then the same with fresh BAR-backed
/// registrations, where the topology routes a BAR directly to the controller.
#[test]
fn vfio_mappings_end_with_their_registrations_over_ten_thousand_fresh_buffers() {
    let topo = live();
    let topology = std::env::var("PEERMEM_TOPOLOGY").unwrap_or_default();
    let nvmes = nvme_controllers(&topo);
    let (x, switch_peer) = vfio_candidate(&topo, &nvmes);
    let expect = write_known(&topo, x, FRESH_SRC, FRESH_SPAN, 9);
    let reg = Registry::new(topo.clone());
    let binding = Binding::to_vfio(x).unwrap();
    let mut ctrl = Controller::open(&binding, &reg, 1).unwrap();
    println!("{topology}: VFIO on {x} ({:?}), switch peer {switch_peer:?}", ctrl.mode());
    fresh_host_buffers(&reg, &mut ctrl, &expect);
    one_buffer_many_transfers(&reg, &mut ctrl, &expect);
    fresh_bar_registrations(&topo, &reg, &mut ctrl, switch_peer, &expect);
    let m = ctrl.dma_mappings();
    assert_eq!((m.kept, m.stuck), (0, 0), "{m:?}");
    drop(ctrl);
    binding.restore().unwrap();
    wait_for_nvme_driver(x);
}

/// Namespace block of byte `at` of the known span, for transfer `i`, and where the bytes are.
fn fresh_at(ctrl: &Controller, i: usize) -> (u64, usize) {
    let at = i as u64 * FRESH_XFER % FRESH_SPAN;
    ((FRESH_SRC + at) / ctrl.namespace().block_size, at as usize)
}

/// `FRESH` transfers, each into a fresh host buffer registered for it and unregistered after.
fn fresh_host_buffers(reg: &Registry, ctrl: &mut Controller, expect: &[u8]) {
    let before = ctrl.dma_mappings();
    let start = std::time::Instant::now();
    let mut got = vec![0u8; FRESH_XFER as usize];
    let mut peak = 0;
    for i in 0..FRESH {
        let mem = Arc::new(HostRegion::new(FRESH_XFER).unwrap());
        let r = reg.register(mem.clone() as Arc<dyn PeerMemory>).unwrap();
        let (lba, at) = fresh_at(ctrl, i);
        ctrl.transfer(reg, Dir::Read, &r, 0, lba, FRESH_XFER).unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        mem.read_at(0, &mut got).unwrap();
        assert!(got[..] == expect[at..at + got.len()], "transfer {i}: the fresh buffer holds other bytes");
        let m = ctrl.dma_mappings();
        // The one live registration; the previous one ended and was let go before the commands.
        assert_eq!(m.kept, 1, "transfer {i}: {m:?}");
        peak = peak.max(m.iova_high_water);
        assert_eq!(ctrl.release_ended_mappings(), 0, "transfer {i}: its registration is live");
        drop(r);
    }
    let secs = start.elapsed().as_secs_f64();
    let m = ctrl.dma_mappings();
    println!("  {FRESH} fresh host buffers in {secs:.1} s: {m:?}");
    assert_eq!(m.made - before.made, FRESH as u64, "each fresh buffer mapped once");
    assert_eq!(m.released - before.released, FRESH as u64 - 1);
    if ctrl.mode() == IommuMode::Type1 {
        // The pool, and two buffers with their guard pages at most (the new one is mapped
        // before the ended one goes): the IOVA space is reused, not consumed.
        let pool = before.iova_reserved;
        assert!(peak <= pool + 2 * (FRESH_XFER + 4096), "IOVA high water {peak:#x}, pool {pool:#x}");
    }
    assert_eq!(ctrl.release_ended_mappings(), 1, "the last buffer's registration ended");
    assert_eq!(ctrl.dma_mappings().kept, 0);
}

/// 100 transfers into one buffer that stays registered: mapped once, kept while registered.
fn one_buffer_many_transfers(reg: &Registry, ctrl: &mut Controller, expect: &[u8]) {
    let before = ctrl.dma_mappings();
    let mem = Arc::new(HostRegion::new(FRESH_XFER).unwrap());
    let r = reg.register(mem.clone() as Arc<dyn PeerMemory>).unwrap();
    let mut got = vec![0u8; FRESH_XFER as usize];
    for i in 0..100 {
        let (lba, at) = fresh_at(ctrl, i);
        ctrl.transfer(reg, Dir::Read, &r, 0, lba, FRESH_XFER).unwrap();
        mem.read_at(0, &mut got).unwrap();
        assert!(got[..] == expect[at..at + got.len()], "transfer {i} into the kept buffer");
    }
    let m = ctrl.dma_mappings();
    assert_eq!((m.made - before.made, m.kept), (1, 1), "one mapping for 100 transfers: {m:?}");
    assert_eq!(ctrl.release_ended_mappings(), 0, "its registration is live");
    drop(r);
    assert_eq!(ctrl.release_ended_mappings(), 1);
}

/// Four transfer-sized ranges of a BAR the topology routes directly to the VFIO controller,
/// registered afresh for each transfer, and a CPU window over them to check the bytes: the
/// stand-in GPU BAR (ivshmem BAR2) when its route is direct, else pages of the switch peer's
/// p2pmem pool (allocated once; the registrations are plain BAR ranges over them).
struct FreshBar {
    bdf: Bdf,
    bar: u8,
    offset: u64,
    window: Arc<dyn PeerMemory>,
}

impl FreshBar {
    fn find(topo: &Arc<Topology>, reg: &Registry, x: Bdf, switch_peer: Option<Bdf>) -> Option<FreshBar> {
        let direct = |bdf, bar, offset| {
            let r = reg.register(Arc::new(BarRegion { bdf, bar, offset, len: FRESH_XFER })).unwrap();
            let kind = reg.resolve(&r, reg.peer(x).unwrap()).unwrap().kind;
            reachable(&kind, &r, Reach::DeviceAddress).is_ok()
        };
        if let Some(s) = ivshmem(topo).filter(|&s| direct(s, 2, 0)) {
            let window = Arc::new(open_resource(topo, s, 2, 4 * FRESH_XFER));
            return Some(FreshBar { bdf: s, bar: 2, offset: 0, window });
        }
        let pages = P2pmemRegion::allocate(topo, switch_peer?, 4 * FRESH_XFER).unwrap();
        let peermem::Backing::P2pmem { bdf, bar, offset } = pages.backing() else { panic!("p2pmem backing") };
        direct(bdf, bar, offset).then(|| FreshBar { bdf, bar, offset, window: Arc::new(pages) })
    }

    /// Registration `i`'s range: runs of 100 registrations of one range, then the next range.
    fn slot(i: usize) -> u64 {
        (i / 100 % 4) as u64 * FRESH_XFER
    }

    fn region(&self, i: usize) -> Arc<dyn PeerMemory> {
        Arc::new(BarRegion { bdf: self.bdf, bar: self.bar, offset: self.offset + Self::slot(i), len: FRESH_XFER })
    }

    fn read(&self, i: usize, got: &mut [u8]) {
        self.window.read_at(Self::slot(i), got).unwrap();
    }
}

/// `FRESH` transfers, each into a fresh registration of a BAR range (runs of 100 registrations of
/// one range, four ranges in turn): mapped once per run where the route maps the range (`iommu`),
/// never where the device gets a bus address.
fn fresh_bar_registrations(
    topo: &Arc<Topology>,
    reg: &Registry,
    ctrl: &mut Controller,
    switch_peer: Option<Bdf>,
    expect: &[u8],
) {
    let Some(bars) = FreshBar::find(topo, reg, ctrl.bdf(), switch_peer) else {
        println!("  no BAR routed directly to {} here: fresh BAR registrations skipped", ctrl.bdf());
        return;
    };
    let before = ctrl.dma_mappings();
    let start = std::time::Instant::now();
    let mut got = vec![0u8; FRESH_XFER as usize];
    let mut route = "";
    for i in 0..FRESH {
        let r = reg.register(bars.region(i)).unwrap();
        route = reg.resolve(&r, ctrl.peer()).unwrap().kind.name();
        let (lba, at) = fresh_at(ctrl, i);
        ctrl.transfer(reg, Dir::Read, &r, 0, lba, FRESH_XFER).unwrap_or_else(|e| panic!("BAR transfer {i}: {e}"));
        bars.read(i, &mut got);
        if ctrl.mode() == IommuMode::NoIommu || route != "bus_addr" {
            assert!(got[..] == expect[at..at + got.len()], "BAR transfer {i} ({route}): other bytes");
        }
        assert!(ctrl.dma_mappings().kept <= 1, "BAR transfer {i}: {:?}", ctrl.dma_mappings());
        assert_eq!(ctrl.release_ended_mappings(), 0, "BAR transfer {i}: its registration is live");
    }
    let secs = start.elapsed().as_secs_f64();
    let m = ctrl.dma_mappings();
    println!("  {FRESH} fresh BAR registrations ({route}) in {secs:.1} s: {m:?}");
    // A mapped route maps each run of registrations of one BAR range once; a bus address maps
    // nothing.
    let runs = if route == "iommu" { FRESH as u64 / 100 } else { 0 };
    assert_eq!(m.made - before.made, runs, "{m:?}");
    assert_eq!(ctrl.release_ended_mappings() as u64, runs.min(1), "the last registration ended");
}
