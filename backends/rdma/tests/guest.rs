//! Inside the testbed guest only (cargo feature `guest`; run through `testbed/run`): soft-RoCE
//! (rxe on the isolated virtio-net, link-local GID 0, out-of-band exchange over 127.0.0.1) is
//! the NIC. Each test brings rxe0 up itself if it is absent, and checks with `rdma res show`
//! that it leaves no MR or QP behind.

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{HostRegion, Peer, PeerMemory, Registry, RouteKind, Topology};
use peermem_rdma::{
    devices, Access, CmListener, ConnectOpts, Connection, DeviceMemory, Local, Method, Nic, NicPlace, RdmaError,
    UdmabufRegion,
};

const DEV: &str = "rxe0";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Brings rxe0 up on eth0 (idempotent) and opens it, waiting at most 20 s for the port.
fn nic() -> Nic {
    assert!(
        std::env::var_os("PEERMEM_GUEST").is_some(),
        "this test needs the testbed guest: testbed/run switch -- <this test binary>"
    );
    if !sh("rdma link show").contains(DEV) {
        sh("ip link set eth0 up; sleep 2; rdma link add rxe0 type rxe netdev eth0");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Nic::open(Some(DEV)) {
            Ok(n) => return n,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for {DEV}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{DEV} did not come up: {e}\n{}", sh("rdma link show; ip link")),
        }
    }
}

fn registry() -> Registry {
    Registry::new(Arc::new(Topology::discover("/").expect("live sysfs")))
}

/// (qp, mr) counts of rxe0 from `rdma res show`.
fn resources() -> (u64, u64) {
    let out = sh("rdma res show");
    let line = out.lines().find(|l| l.contains(DEV)).unwrap_or_default().to_string();
    let count = |key: &str| -> u64 {
        let w: Vec<&str> = line.split_whitespace().collect();
        w.windows(2).find(|p| p[0] == key).and_then(|p| p[1].parse().ok()).unwrap_or(0)
    };
    (count("qp"), count("mr"))
}

/// Runs `f`, then asserts rxe0 holds no more QPs and MRs than before.
fn no_leaks(f: impl FnOnce()) {
    let before = resources();
    f();
    let after = resources();
    assert!(after.0 <= before.0 && after.1 <= before.1, "leaked: (qp, mr) before {before:?}, after {after:?}");
}

/// A connected pair on one NIC over 127.0.0.1.
fn pair(nic: &Nic, opts: ConnectOpts) -> (Connection, Connection) {
    pair_with(nic, opts, opts)
}

/// As `pair`, the server with `server` options, the client with `client`.
fn pair_with(nic: &Nic, server: ConnectOpts, client: ConnectOpts) -> (Connection, Connection) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let srv = s.spawn(|| Connection::accept(nic, &l, server));
        let cli = Connection::connect(nic, addr, client).expect("connect");
        (srv.join().unwrap().expect("accept"), cli)
    })
}

/// The IPv4 address of eth0 that rdma_cm resolves to rxe0: the testbed's (two-host runs set
/// PEERMEM_LOCAL_IP), else 10.77.0.1/24 added here (the isolated NIC has none).
fn cm_ip() -> std::net::IpAddr {
    if let Ok(ip) = std::env::var("PEERMEM_LOCAL_IP") {
        return ip.parse().expect("PEERMEM_LOCAL_IP");
    }
    if !sh("ip -4 addr show dev eth0").contains("inet ") {
        sh("ip addr add 10.77.0.1/24 dev eth0");
    }
    let out = sh("ip -4 -o addr show dev eth0");
    let ip = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).expect("eth0 has an IPv4 address");
    ip.split('/').next().unwrap().parse().unwrap()
}

/// A pair on one NIC connected by rdma_cm; the server offers `offer`.
fn cm_pair(nic: &Nic, opts: ConnectOpts, offer: Option<peermem_rdma::RemoteBuf>) -> (Connection, Connection) {
    cm_pair_with(nic, opts, opts, offer)
}

/// As `cm_pair`, the server with `server` options, the client with `client`.
fn cm_pair_with(
    nic: &Nic,
    server: ConnectOpts,
    client: ConnectOpts,
    offer: Option<peermem_rdma::RemoteBuf>,
) -> (Connection, Connection) {
    let l = CmListener::bind((cm_ip(), 0).into()).expect("rdma_cm listen");
    let addr = l.local_addr();
    std::thread::scope(|s| {
        let srv = s.spawn(|| l.accept(nic, server, offer));
        let cli = Connection::connect_cm(nic, addr, client).expect("rdma_cm connect");
        (srv.join().unwrap().expect("rdma_cm accept"), cli)
    })
}

fn host(len: u64, fill: u8) -> Arc<HostRegion> {
    let mut r = HostRegion::new(len).unwrap();
    r.as_mut_slice().fill(fill);
    Arc::new(r)
}

fn pattern(i: usize) -> u8 {
    (i * 7 + 3) as u8
}

#[test]
fn rxe_is_a_virtual_peer_without_a_pci_function() {
    let nic = nic();
    let d = devices("/").unwrap().into_iter().find(|d| d.name == DEV).expect("rxe0 in sysfs");
    assert_eq!(d.place, NicPlace::Virtual { netdev: Some("eth0".into()) });
    assert_eq!(nic.peer(&registry()).unwrap(), Peer::Cpu);
    println!("{DEV}: {}", d.place.describe());
}

#[test]
fn host_pages_register_through_their_cpu_mapping() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let mr = nic.register(&reg, host(1 << 16, 0), Access::REMOTE_WRITE).unwrap();
        assert_eq!(mr.method(), Method::CpuMapping);
        assert!(matches!(mr.route(), RouteKind::CpuMapped(_)));
        assert!(mr.refusals().is_empty());
        assert_eq!(reg.len(), 1);
        for r in mr.reasons() {
            println!("  {r}");
        }
        drop(mr);
        assert_eq!(reg.len(), 0, "dropping the MR ends the registration");
    });
}

#[test]
fn dmabuf_mr_is_refused_with_eopnotsupp_then_cpu_mapping_is_used() {
    let nic = nic();
    let reg = registry();
    let region = Arc::new(UdmabufRegion::new(1 << 16).expect("/dev/udmabuf (CONFIG_UDMABUF)"));
    no_leaks(|| {
        let mr = nic.register(&reg, region.clone(), Access::REMOTE_WRITE).unwrap();
        assert_eq!(mr.route(), RouteKind::KernelImport);
        assert_eq!(mr.method(), Method::CpuMapping);
        let r = &mr.refusals()[0];
        assert_eq!(r.method, Method::DmaBuf);
        assert_eq!(r.error.errno(), Some(libc::EOPNOTSUPP), "{}", r.error);
        for r in mr.reasons() {
            println!("  {r}");
        }
    });
}

#[test]
fn p2pmem_vma_is_refused_with_efault_then_bounces() {
    let nic = nic();
    let reg = registry();
    let topo = reg.topology().clone();
    let Some(bdf) = topo.devices().iter().find(|d| d.p2pmem.is_some()).map(|d| d.bdf) else {
        panic!("no NVMe with p2pmem in this topology (use the switch topology)");
    };
    let mut region = peermem_nvme::P2pmemRegion::allocate(&topo, bdf, 1 << 16).unwrap();
    region.as_mut_slice().fill(0);
    let region = Arc::new(region);
    no_leaks(|| {
        let mr = nic.register(&reg, region.clone(), Access::REMOTE_WRITE).unwrap();
        assert_eq!(mr.method(), Method::Bounce, "{:?}", mr.refusals());
        let r = mr.refusals().iter().find(|r| r.method == Method::CpuMapping).expect("reg_mr was tried");
        assert_eq!(r.error.errno(), Some(libc::EFAULT), "{}", r.error);
        for r in mr.reasons() {
            println!("  {r}");
        }
        // Data written by a peer into the bounce lands in the CMB after staging.
        let (mut server, mut client) = pair(&nic, ConnectOpts::default());
        server.advertise(mr.remote()).unwrap();
        let remote = client.expect_remote().unwrap();
        let src = host(4096, 0);
        let mut s = HostRegion::new(4096).unwrap();
        for (i, b) in s.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(i);
        }
        drop(src);
        let smr = nic.register(&reg, Arc::new(s), Access::LOCAL_READ).unwrap();
        client.write(Local::all(&smr).unwrap(), remote).unwrap();
        mr.bounce_to_region(0, 4096).unwrap();
        let mut back = vec![0u8; 4096];
        region.read_at(0, &mut back).unwrap();
        assert!(back.iter().enumerate().all(|(i, &b)| b == pattern(i)), "CMB holds the written pattern");
    });
}

#[test]
fn device_memory_is_cleanly_not_supported_on_rxe() {
    let nic = nic();
    match DeviceMemory::alloc(&nic, 4096) {
        Err(RdmaError::NotSupported { what, why, .. }) => println!("{what}: {why}"),
        other => panic!("expected NotSupported, got {other:?}"),
    }
    assert!(matches!(DeviceMemory::alloc(&nic, 0), Err(RdmaError::Invalid(_))));
}

#[test]
fn rdma_write_read_and_send_recv_move_the_right_bytes() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let (mut server, mut client) = pair(&nic, ConnectOpts::default());
        let target = host(1 << 16, 0);
        let tmr = nic.register(&reg, target.clone(), Access::REMOTE_WRITE.with_remote_read()).unwrap();
        server.advertise(tmr.remote()).unwrap();
        let remote = client.expect_remote().unwrap();

        let mut s = HostRegion::new(1 << 16).unwrap();
        for (i, b) in s.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(i);
        }
        let smr = nic.register(&reg, Arc::new(s), Access::LOCAL_READ).unwrap();
        client.write(Local::all(&smr).unwrap(), remote).unwrap();
        let mut back = vec![0u8; 1 << 16];
        target.read_at(0, &mut back).unwrap();
        assert!(back.iter().enumerate().all(|(i, &b)| b == pattern(i)), "RDMA WRITE landed");

        // READ it back into a third buffer, at an offset.
        let sink = host(1 << 16, 0xee);
        let kmr = nic.register(&reg, sink.clone(), Access::LOCAL_WRITE).unwrap();
        client.read(Local::new(&kmr, 4096, 8192).unwrap(), remote.slice(100, 8192).unwrap()).unwrap();
        let mut got = vec![0u8; 8192];
        sink.read_at(4096, &mut got).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i + 100)), "RDMA READ landed");

        // SEND/RECV.
        let inbox = host(4096, 0);
        let imr = nic.register(&reg, inbox.clone(), Access::LOCAL_WRITE).unwrap();
        server.post_recv(Local::all(&imr).unwrap()).unwrap();
        client.send(Local::new(&smr, 0, 1000).unwrap()).unwrap();
        assert_eq!(server.wait_recv().unwrap(), 1000);
        let mut m = vec![0u8; 1000];
        inbox.read_at(0, &mut m).unwrap();
        assert!(m.iter().enumerate().all(|(i, &b)| b == pattern(i)), "SEND landed");
    });
}

#[test]
fn remote_write_needs_remote_write_access() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let (mut server, mut client) = pair(&nic, ConnectOpts::default());
        let ro = nic.register(&reg, host(4096, 0), Access::REMOTE_READ).unwrap();
        server.advertise(ro.remote()).unwrap();
        let remote = client.expect_remote().unwrap();
        let smr = nic.register(&reg, host(4096, 1), Access::LOCAL_READ).unwrap();
        match client.write(Local::all(&smr).unwrap(), remote) {
            Err(RdmaError::Completion(wc)) => {
                assert!(wc.is_remote_access(), "{wc}");
                println!("{wc}");
            }
            other => panic!("expected a remote access error, got {other:?}"),
        }
        assert!(!client.is_ready(), "a failed completion moves the QP to the error state");
    });
}

#[test]
fn rkey_stops_working_once_the_region_is_unregistered() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let (mut server, mut client) = pair(&nic, ConnectOpts::default());
        let target = nic.register(&reg, host(4096, 0), Access::REMOTE_WRITE).unwrap();
        server.advertise(target.remote()).unwrap();
        let remote = client.expect_remote().unwrap();
        let smr = nic.register(&reg, host(4096, 0x5a), Access::LOCAL_READ).unwrap();
        client.write(Local::all(&smr).unwrap(), remote).unwrap();
        let n = reg.len();
        drop(target);
        assert_eq!(reg.len(), n - 1);
        match client.write(Local::all(&smr).unwrap(), remote) {
            Err(RdmaError::Completion(wc)) => {
                assert!(wc.is_remote_access(), "{wc}");
                println!("after unregister: {wc}");
            }
            other => panic!("expected a remote access error after unregister, got {other:?}"),
        }
    });
}

#[test]
fn a_peer_that_disconnects_is_a_typed_error_not_a_hang() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let opts =
            ConnectOpts { ack_timeout: 10, retry_cnt: 2, timeout: Duration::from_secs(10), ..Default::default() };
        let (mut server, mut client) = pair(&nic, opts);
        let target = nic.register(&reg, host(4096, 0), Access::REMOTE_WRITE).unwrap();
        server.advertise(target.remote()).unwrap();
        let remote = client.expect_remote().unwrap();
        drop(server);
        let smr = nic.register(&reg, host(4096, 1), Access::LOCAL_READ).unwrap();
        let t = Instant::now();
        let r = client.write(Local::all(&smr).unwrap(), remote);
        println!("after the peer vanished: {r:?} in {:?}", t.elapsed());
        assert!(matches!(r, Err(RdmaError::Completion(_)) | Err(RdmaError::Timeout { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(11));
    });
}

#[test]
fn many_regions_register_and_unregister_concurrently_with_traffic() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let (mut server, mut client) = pair(&nic, ConnectOpts::default());
        let target = nic.register(&reg, host(1 << 16, 0), Access::REMOTE_WRITE).unwrap();
        server.advertise(target.remote()).unwrap();
        let remote = client.expect_remote().unwrap();
        let smr = nic.register(&reg, host(1 << 16, 9), Access::LOCAL_READ).unwrap();
        std::thread::scope(|s| {
            for t in 0..3 {
                let (nic, reg) = (&nic, &reg);
                s.spawn(move || {
                    for i in 0..40 {
                        let mrs: Vec<_> = (0..4)
                            .map(|k| {
                                nic.register(reg, host(4096 * (1 + k), (t + i) as u8), Access::REMOTE_WRITE).unwrap()
                            })
                            .collect();
                        assert!(mrs.iter().all(|m| m.method() == Method::CpuMapping));
                    }
                });
            }
            for _ in 0..50 {
                client.write(Local::new(&smr, 0, 1 << 16).unwrap(), remote).unwrap();
            }
        });
        assert_eq!(reg.len(), 2);
    });
}

#[test]
fn async_events_can_be_polled_without_blocking() {
    let nic = nic();
    let t = Instant::now();
    let ev = nic.poll_async_event().unwrap();
    println!("pending async event: {ev:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// Waits for `child` at most `timeout`; kills it past that.
fn wait_bounded(child: &mut std::process::Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `examples/rdma_to_gpu` end to end with no arguments (both ends in one process, connected by
/// rdma_cm, two transfer engines): the server registers a Vulkan (lavapipe) buffer with its
/// engine, the client's engine RDMA-writes a pattern into it, the server checks it through a
/// Vulkan copy.
/// The example is built on the host beforehand:
/// `cargo build -p peermem-examples --example rdma_to_gpu`.
#[test]
fn example_rdma_to_gpu_runs_end_to_end() {
    let _nic = nic();
    let _ip = cm_ip();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or(root.join("target"));
    let bin = target.join("debug/examples/rdma_to_gpu");
    assert!(
        bin.exists(),
        "{} is missing: build it on the host first with `cargo build -p peermem-examples --example rdma_to_gpu`",
        bin.display()
    );
    no_leaks(|| {
        let mut child = Command::new(&bin)
            .args(["--size", &(4 << 20).to_string(), "--iters", "2", "--timeout", "60"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the example");
        let status = wait_bounded(&mut child, Duration::from_secs(180), "rdma_to_gpu");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        print!("{out}");
        assert!(status.success(), "rdma_to_gpu failed: {status}");
        assert!(out.contains("data matched"), "{out}");
        // Each side prints the topology's ranking; the client's engine reports its rail.
        assert!(out.contains("server:   rxe0 (software, route"), "{out}");
        assert!(out.contains("client:   rxe0 (software, route"), "{out}");
        assert!(out.contains("client:   rail rxe0 -> rxe0:"), "{out}");
        assert!(out.contains("listening on") && out.contains("(rdma_cm, rxe0"), "{out}");
        assert!(out.contains("registered with reg_mr"), "{out}");
        assert!(out.contains("lavapipe memory is host memory"), "{out}");
        assert!(out.contains("client: connected to") && out.contains("MiB/s"), "{out}");
    });
}

#[test]
fn rdma_cm_connects_and_the_offered_buffer_takes_writes_and_reads() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let target = host(1 << 16, 0);
        let tmr = nic.register(&reg, target.clone(), Access::REMOTE_WRITE.with_remote_read()).unwrap();
        let (mut server, mut client) = cm_pair(&nic, ConnectOpts::default(), Some(tmr.remote()));
        assert!(server.is_cm() && client.is_cm());
        assert_eq!(client.remote_endpoint().qpn, server.qpn(), "the CM paired the two QPs");
        assert_eq!(server.remote_endpoint().qpn, client.qpn());
        assert!(server.peer().starts_with(&cm_ip().to_string()), "the server names the client: {}", server.peer());
        let remote = client.expect_remote().unwrap();
        assert_eq!(remote, tmr.remote(), "the accept's private data carries the offer");
        let mut s = HostRegion::new(1 << 16).unwrap();
        for (i, b) in s.as_mut_slice().iter_mut().enumerate() {
            *b = pattern(i);
        }
        let smr = nic.register(&reg, Arc::new(s), Access::LOCAL_READ).unwrap();
        client.write(Local::all(&smr).unwrap(), remote).unwrap();
        let mut back = vec![0u8; 1 << 16];
        target.read_at(0, &mut back).unwrap();
        assert!(back.iter().enumerate().all(|(i, &b)| b == pattern(i)), "RDMA WRITE landed");
        let sink = host(4096, 0xee);
        let kmr = nic.register(&reg, sink.clone(), Access::LOCAL_WRITE).unwrap();
        client.read(Local::all(&kmr).unwrap(), remote.slice(8, 4096).unwrap()).unwrap();
        let mut got = vec![0u8; 4096];
        sink.read_at(0, &mut got).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i + 8)), "RDMA READ landed");
        // SEND/RECV on the queue pair replaces the TCP stream's messages.
        let inbox = host(4096, 0);
        let imr = nic.register(&reg, inbox.clone(), Access::LOCAL_WRITE).unwrap();
        server.post_recv(Local::all(&imr).unwrap()).unwrap();
        client.send(Local::new(&smr, 0, 100).unwrap()).unwrap();
        assert_eq!(server.wait_recv().unwrap(), 100);
        assert!(matches!(server.send_oob(b"x"), Err(RdmaError::Invalid(_))), "no TCP stream on an rdma_cm connection");
    });
}

#[test]
fn read_depths_are_agreed_by_both_sides_over_rdma_cm_and_tcp() {
    let nic = nic();
    let reg = registry();
    let shallow = ConnectOpts { rd_atomic: 2, ..ConnectOpts::default() };
    no_leaks(|| {
        // (responder resources, initiator depth) of the server's QP, then of the client's.
        let depths = |(server, client): (Connection, Connection)| {
            (server.rd_atomic().unwrap(), client.rd_atomic().unwrap(), server, client)
        };
        let (s, c, _, _) = depths(cm_pair(&nic, ConnectOpts::default(), None));
        assert_eq!((s, c), ((16, 16), (16, 16)), "rxe takes the default 16 each way");
        for (what, (s, c, server, mut client)) in [
            ("rdma_cm, shallow client", depths(cm_pair_with(&nic, ConnectOpts::default(), shallow, None))),
            ("rdma_cm, shallow server", depths(cm_pair_with(&nic, shallow, ConnectOpts::default(), None))),
            ("tcp, shallow client", depths(pair_with(&nic, ConnectOpts::default(), shallow))),
            ("tcp, shallow server", depths(pair_with(&nic, shallow, ConnectOpts::default()))),
        ] {
            assert_eq!((s, c), ((2, 2), (2, 2)), "{what}: neither side goes beyond the shallower one");
            // Many READs at once still complete: no side issues more than the other serves.
            let src = host(1 << 20, 0x5a);
            let smr = nic.register(&reg, src, Access::REMOTE_READ).unwrap();
            let dst = host(1 << 20, 0);
            let dmr = nic.register(&reg, dst.clone(), Access::LOCAL_WRITE).unwrap();
            let remote = smr.remote();
            for i in 0..16u64 {
                let (off, len) = (i << 16, 1u32 << 16);
                let src = remote.slice(off, len.into()).unwrap();
                client.post_read(Local::new(&dmr, off, len).unwrap(), src).unwrap();
            }
            let done = client.wait_send(16).unwrap_or_else(|e| panic!("{what}: 16 READs at depth 2: {e}"));
            assert_eq!(done.len(), 16, "{what}");
            let mut got = vec![0u8; 1 << 20];
            dst.read_at(0, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == 0x5a), "{what}: every READ landed");
            drop(server);
        }
    });
}

#[test]
fn rdma_cm_peer_disconnect_is_a_typed_error_on_the_waiting_side() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let opts = ConnectOpts { timeout: Duration::from_secs(30), ..Default::default() };
        let (mut server, mut client) = cm_pair(&nic, opts, None);
        let inbox = nic.register(&reg, host(4096, 0), Access::LOCAL_WRITE).unwrap();
        server.post_recv(Local::all(&inbox).unwrap()).unwrap();
        client.disconnect().unwrap();
        let r = server.wait_recv();
        println!("server after the client disconnected: {r:?}");
        assert!(matches!(r, Err(RdmaError::PeerDisconnected { .. })), "{r:?}");
        // And the same when the peer's connection is simply dropped (its process ended).
        let (mut server, client) = cm_pair(&nic, opts, None);
        server.post_recv(Local::all(&inbox).unwrap()).unwrap();
        drop(client);
        let r = server.wait_recv();
        assert!(matches!(r, Err(RdmaError::PeerDisconnected { .. })), "{r:?}");
    });
}

#[test]
fn rdma_cm_refused_and_unlistened_connections_are_rejected() {
    let nic = nic();
    let opts = ConnectOpts { timeout: Duration::from_secs(20), ..Default::default() };
    let l = CmListener::bind((cm_ip(), 0).into()).unwrap();
    let addr = l.local_addr();
    let r = std::thread::scope(|s| {
        let server = s.spawn(|| l.reject_next(opts.timeout));
        let r = Connection::connect_cm(&nic, addr, opts);
        server.join().unwrap().expect("reject");
        r
    });
    println!("refused: {r:?}");
    assert!(matches!(r, Err(RdmaError::Rejected { .. })), "{r:?}");
    drop(l);
    let r = Connection::connect_cm(&nic, addr, opts);
    println!("nobody listening: {r:?}");
    assert!(matches!(r, Err(RdmaError::Rejected { .. })), "{r:?}");
}

#[test]
fn rdma_cm_unknown_peer_address_is_unreachable_within_the_timeout() {
    let nic = nic();
    let ip = match cm_ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            std::net::Ipv4Addr::new(o[0], o[1], o[2], 99)
        }
        std::net::IpAddr::V6(_) => panic!("IPv4 expected"),
    };
    let opts = ConnectOpts { timeout: Duration::from_secs(5), ..Default::default() };
    let r = Connection::connect_cm(&nic, (ip, 4791).into(), opts);
    println!("nobody at {ip}: {r:?}");
    assert!(matches!(r, Err(RdmaError::Unreachable { .. }) | Err(RdmaError::Timeout { .. })), "{r:?}");
}

#[test]
fn rdma_cm_rkey_stops_working_once_the_region_is_unregistered() {
    let nic = nic();
    let reg = registry();
    no_leaks(|| {
        let target = host(4096, 0);
        let tmr = nic.register(&reg, target.clone(), Access::REMOTE_WRITE).unwrap();
        let (_server, mut client) = cm_pair(&nic, ConnectOpts::default(), Some(tmr.remote()));
        let remote = client.expect_remote().unwrap();
        let smr = nic.register(&reg, host(4096, 0x5a), Access::LOCAL_READ).unwrap();
        client.write(Local::all(&smr).unwrap(), remote).unwrap();
        drop(tmr);
        target.write_at(0, &[0u8; 4096]).unwrap();
        match client.write(Local::all(&smr).unwrap(), remote) {
            Err(RdmaError::Completion(wc)) => {
                assert!(wc.is_remote_access(), "{wc}");
                println!("remote side after unregister: {wc}");
            }
            other => panic!("expected a remote access error after unregister, got {other:?}"),
        }
        let mut back = vec![1u8; 4096];
        target.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "nothing was written after the unregister");
    });
}
