//! The engine on a real NIC: soft-RoCE rxe0 in the testbed guest (`testbed/run switch -- <this
//! binary>`, run by `testbed/guest-suite`), two engines of one process talking over it through
//! rdma_cm. What needs a NIC and a peer: a batch of writes and reads whose every byte lands
//! where asked and nowhere else, its notification received once; registration of many regions
//! at once, all or none; several batches watched at once each end with their own report; a peer
//! that goes away mid-batch ends the batch within seconds; an engine connected by address alone;
//! memory that bounces on the peer (the ivshmem BAR) staged by the peer's engine both ways.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{BarRegion, HostRegion, PeerMemory, Registry, Topology};
use peermem_engine::{Engine, EngineError, EngineOptions, Op, Request, Ticket};

const DEV: &str = "rxe0";
const BLOCK: u64 = 64 << 10;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// An engine on rxe0, which is brought up on eth0 with an address (rdma_cm needs one) when it
/// is absent; waits at most 20 s for its port.
fn engine() -> Engine {
    assert!(
        std::env::var_os("PEERMEM_GUEST").is_some(),
        "this test needs the testbed guest: testbed/run switch -- <this test binary>"
    );
    if !sh("rdma link show").contains(DEV) {
        sh("ip link set eth0 up; ip addr add 10.9.0.1/24 dev eth0; sleep 2; rdma link add rxe0 type rxe netdev eth0");
    }
    let registry = Registry::new(Arc::new(Topology::discover("/").expect("live sysfs")));
    let options = EngineOptions {
        nics: Some(vec![DEV.into()]),
        depth: 16,
        timeout: Duration::from_secs(30),
        ..EngineOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Engine::new(registry.clone(), options.clone()) {
            Ok(e) => return e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for {DEV}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("no engine on {DEV}: {e}\n{}", sh("rdma link show; ip addr")),
        }
    }
}

fn host(len: u64, fill: u8) -> Arc<dyn PeerMemory> {
    let r = HostRegion::new(len).expect("host memory");
    r.write_at(0, &vec![fill; len as usize]).expect("fill");
    Arc::new(r)
}

fn bytes(r: &dyn PeerMemory, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    r.read_at(off, &mut b).expect("read back");
    b
}

fn req(op: Op, local: peermem_engine::RegionId, lo: u64, remote: peermem_engine::RegionId, ro: u64) -> Request {
    Request { op, local, local_offset: lo, remote, remote_offset: ro, len: BLOCK }
}

#[test]
fn a_batch_lands_every_byte_where_asked_and_its_notification_arrives_once() {
    let (server, client) = (engine(), engine());
    let far = host(16 * BLOCK, 0xee);
    let near = host(8 * BLOCK, 0);
    for k in 0..8u64 {
        near.write_at(k * BLOCK, &vec![k as u8 + 1; BLOCK as usize]).unwrap();
    }
    let remote = server.register(far.clone()).unwrap();
    let local = client.register(near.clone()).unwrap();
    let peer = client.connect(&server.metadata().unwrap()).unwrap();
    // Local block k to remote slot 2k + 1: the even slots must stay as they were.
    let writes: Vec<Request> = (0..8).map(|k| req(Op::Write, local, k * BLOCK, remote, (2 * k + 1) * BLOCK)).collect();
    let report = client.post(peer, &writes, Some(b"eight blocks")).unwrap().wait().unwrap();
    assert_eq!(report.bytes, 8 * BLOCK);
    assert!(report.notified, "{report:?}");
    for s in 0..16u64 {
        let want = if s % 2 == 1 { (s / 2) as u8 + 1 } else { 0xee };
        assert!(bytes(&*far, s * BLOCK, BLOCK).iter().all(|&b| b == want), "slot {s}");
    }
    let notes = server.notifications(Duration::from_secs(10)).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].message, b"eight blocks");
    assert!(server.notifications(Duration::from_millis(500)).unwrap().is_empty(), "a notification arrived twice");
    // Read the odd slots back, reversed, over the local blocks.
    near.write_at(0, &vec![0u8; (8 * BLOCK) as usize]).unwrap();
    let reads: Vec<Request> =
        (0..8).map(|k| req(Op::Read, local, (7 - k) * BLOCK, remote, (2 * k + 1) * BLOCK)).collect();
    client.post(peer, &reads, None).unwrap().wait().unwrap();
    for k in 0..8u64 {
        assert!(bytes(&*near, (7 - k) * BLOCK, BLOCK).iter().all(|&b| b == k as u8 + 1), "block {k}");
    }
}

#[test]
fn registering_many_regions_is_all_or_none() {
    let e = engine();
    let (a, b) = (host(BLOCK, 1), host(BLOCK, 2));
    let ids = e.register_all(&[a.clone(), b.clone(), a.clone()]).unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[0], ids[2], "the same region twice is one registration");
    // An empty region cannot be registered: the new ones before it are let go, the known stays.
    let c = host(BLOCK, 3);
    let empty: Arc<dyn PeerMemory> =
        Arc::new(BarRegion { bdf: "0000:00:00.0".parse().unwrap(), bar: 0, offset: 0, len: 0 });
    let before = e.cache_counts().unwrap();
    match e.register_all(&[a.clone(), c.clone(), empty]) {
        Err(EngineError::BadRequest { index: 2, .. }) => {}
        other => panic!("expected the third region refused, got {other:?}"),
    }
    let after = e.cache_counts().unwrap();
    assert_eq!(after.registers - before.registers, 1, "c was registered");
    assert_eq!(after.deregisters - before.deregisters, 1, "and let go again");
    assert!(e.routes(ids[0]).is_ok(), "a, registered before the call, stays");
}

#[test]
fn batches_watched_together_each_end_with_their_own_report() {
    let (server, client) = (engine(), engine());
    let far = host(6 * BLOCK, 7);
    let near = host(6 * BLOCK, 0);
    let remote = server.register(far).unwrap();
    let local = client.register(near.clone()).unwrap();
    let peer = client.connect(&server.metadata().unwrap()).unwrap();
    // Batch k reads k + 1 blocks, after those of the batches before it.
    let tickets: Vec<Ticket> = (0..3u64)
        .map(|k| {
            let first = k * (k + 1) / 2;
            let batch: Vec<Request> =
                (first..first + k + 1).map(|b| req(Op::Read, local, b * BLOCK, remote, b * BLOCK)).collect();
            client.post(peer, &batch, None).unwrap()
        })
        .collect();
    let mut got: Vec<Option<u64>> = vec![None; tickets.len()];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "batches still pending after 60 s: {got:?}");
        let pending: Vec<usize> = (0..tickets.len()).filter(|&i| got[i].is_none()).collect();
        let refs: Vec<&Ticket> = pending.iter().map(|&i| &tickets[i]).collect();
        for (i, r) in pending.into_iter().zip(Ticket::try_wait_any(&refs)) {
            got[i] = r.map(|r| r.expect("the batch").bytes);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got, [Some(BLOCK), Some(2 * BLOCK), Some(3 * BLOCK)]);
    assert!(bytes(&*near, 0, 6 * BLOCK).iter().all(|&b| b == 7), "a block did not land");
}

#[test]
fn a_peer_that_goes_away_mid_batch_ends_the_batch_within_seconds() {
    let (server, client) = (engine(), engine());
    let far = host(256 * BLOCK, 7);
    let near = host(256 * BLOCK, 0);
    let remote = server.register(far).unwrap();
    let local = client.register(near).unwrap();
    let peer = client.connect(&server.metadata().unwrap()).unwrap();
    let batch: Vec<Request> = (0..256).map(|k| req(Op::Read, local, k * BLOCK, remote, k * BLOCK)).collect();
    let start = Instant::now();
    let ticket = client.post(peer, &batch, None).unwrap();
    drop(server);
    let result = ticket.wait();
    let took = start.elapsed();
    match &result {
        Err(EngineError::PeerGone { .. }) | Err(EngineError::RemoteAccess { .. }) => {}
        other => panic!("expected the peer gone, got {other:?} after {took:?}"),
    }
    assert!(took < Duration::from_secs(15), "{took:?}: {result:?}");
    match client.post(peer, &batch[..1], None) {
        Err(EngineError::PeerGone { .. }) => {}
        Ok(t) => panic!("a batch to a peer that is gone was posted: {:?}", t.wait()),
        Err(e) => panic!("expected PeerGone, got {e}"),
    }
}

#[test]
fn an_engine_known_by_one_address_is_connected_with_its_metadata_read_over_rdma() {
    let (server, client) = (engine(), engine());
    let far = host(4 * BLOCK, 0x5a);
    let remote = server.register(far.clone()).unwrap();
    let (_, addr) = server.listen_addrs().unwrap()[0];
    let peer = client.connect_to(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.accepted().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the server never listed the client's connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    let near = host(4 * BLOCK, 0);
    let local = client.register(near.clone()).unwrap();
    client.post(peer, &[req(Op::Read, local, BLOCK, remote, 2 * BLOCK)], None).unwrap().wait().unwrap();
    assert!(bytes(&*near, BLOCK, BLOCK).iter().all(|&b| b == 0x5a));
    assert!(bytes(&*near, 0, BLOCK).iter().all(|&b| b == 0), "outside the destination range");
    let rails = client.rails(peer).unwrap();
    assert_eq!(rails.len(), 1, "the connection that read the page is the rail: {rails:?}");

    // A region registered after the page was read is unknown to that peer, and known to a new one.
    let later = server.register(host(BLOCK, 0x77)).unwrap();
    match client.post(peer, &[req(Op::Read, local, 0, later, 0)], None) {
        Err(EngineError::UnknownRemoteRegion(r)) => assert_eq!(r, later),
        Err(e) => panic!("expected the later region unknown, got {e}"),
        Ok(t) => panic!("posted against a region the page did not list: {:?}", t.wait()),
    }
    let again = client.connect_to(addr).unwrap();
    client.post(again, &[req(Op::Read, local, 0, later, 0)], None).unwrap().wait().unwrap();
    assert!(bytes(&*near, 0, BLOCK).iter().all(|&b| b == 0x77));

    // Where nothing listens, the error says so (a peer still starting is retried on that).
    let nowhere = std::net::SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1));
    match client.connect_to(nowhere) {
        Err(EngineError::Unreached { nothing_listens: true, .. }) => {}
        other => panic!("expected nothing listening at {nowhere}, got {:?}", other.map(|_| ())),
    }
    // A peer that leaves is no longer listed by the one it connected to.
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server.accepted().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "a client gone for 15 s is still listed: {:?}", server.accepted());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The testbed's GPU stand-in BAR (ivshmem, BAR2), mapped for the CPU: no NIC registers it
/// directly (a BAR mapping has no pages to pin and is no dma-buf), so rxe's registration bounces.
fn gpu_bar(len: u64) -> Arc<dyn PeerMemory> {
    let topo = Topology::discover("/").expect("live sysfs");
    let dev = topo
        .devices()
        .iter()
        .find(|d| d.vendor == 0x1af4 && d.device == 0x1110)
        .expect("the switch topology has an ivshmem device (the GPU stand-in)");
    Arc::new(topo.map_bar(dev.bdf, 2, 0, len).expect("mapping ivshmem BAR2"))
}

#[test]
fn memory_that_bounces_on_the_peer_is_staged_by_its_engine_both_ways() {
    let (server, client) = (engine(), engine());
    let bar = gpu_bar(8 * BLOCK);
    bar.write_at(0, &vec![0x11; (8 * BLOCK) as usize]).unwrap();
    let remote = server.register(bar.clone()).unwrap();
    let near = host(8 * BLOCK, 0);
    for k in 0..4u64 {
        near.write_at(k * BLOCK, &vec![0xa0 + k as u8; BLOCK as usize]).unwrap();
    }
    let local = client.register(near.clone()).unwrap();
    let peer = client.connect(&server.metadata().unwrap()).unwrap();
    // Local blocks 0..4 to the BAR's odd blocks, then a notification: when it arrives, the bytes
    // are in the BAR itself, not in the bounce only.
    let writes: Vec<Request> = (0..4).map(|k| req(Op::Write, local, k * BLOCK, remote, (2 * k + 1) * BLOCK)).collect();
    let report = client.post(peer, &writes, Some(b"in the BAR")).unwrap().wait().unwrap();
    assert!(report.routes.iter().any(|r| r.contains("staged on the peer")), "{:?}", report.routes);
    assert!(report.notified);
    let notes = server.notifications(Duration::from_secs(10)).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    for s in 0..8u64 {
        let want = if s % 2 == 1 { 0xa0 + (s / 2) as u8 } else { 0x11 };
        assert!(bytes(&*bar, s * BLOCK, BLOCK).iter().all(|&b| b == want), "BAR block {s}");
    }
    // The BAR changes behind the engine's back (a GPU kernel would): a read stages it out first.
    bar.write_at(6 * BLOCK, &vec![0x66; BLOCK as usize]).unwrap();
    let reads =
        [req(Op::Read, local, 4 * BLOCK, remote, 6 * BLOCK), req(Op::Read, local, 5 * BLOCK, remote, 3 * BLOCK)];
    let report = client.post(peer, &reads, None).unwrap().wait().unwrap();
    assert_eq!(report.bytes, 2 * BLOCK);
    assert!(bytes(&*near, 4 * BLOCK, BLOCK).iter().all(|&b| b == 0x66), "what the BAR holds now");
    assert!(bytes(&*near, 5 * BLOCK, BLOCK).iter().all(|&b| b == 0xa1), "block 1 as written");
    assert!(bytes(&*near, 6 * BLOCK, 2 * BLOCK).iter().all(|&b| b == 0), "outside the destinations");

    // Unregistered on the peer: its engine answers that it cannot stage, and the batch fails.
    server.unregister(remote).unwrap();
    match client.post(peer, &reads[..1], None).unwrap().wait() {
        Err(EngineError::RemoteStaging { error }) => assert!(error.contains("not registered"), "{error}"),
        other => panic!("expected the peer's staging refused, got {other:?}"),
    }
}
