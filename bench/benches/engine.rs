//! The transfer engine's own costs on a real (soft-RoCE) NIC, each against the same work done
//! directly with the RDMA backend's verbs, in one guest run:
//! - registration: 1000 sub-ranges of one large host buffer through the engine's range cache
//!   (one `ibv_reg_mr` for the buffer, then lookups) against one `ibv_reg_mr` per sub-range;
//! - a batch of 256 x 4 KiB RDMA WRITEs, post to completion, through `Engine::post` (scattered
//!   destinations, one engine writing into another's memory over rxe0) against the same count,
//!   size and depth posted with `Connection::write_stream`; rounds alternate, medians compared.
//!
//! Runs only inside the testbed guest:
//!   cargo bench -p peermem-bench --bench engine --no-run      # prints the binary
//!   testbed/run switch -- target/release/deps/engine-XXXX
//! Elsewhere it prints "skipped" and exits 0. Env: PEERMEM_REG_MIB (the buffer, default 1024),
//! PEERMEM_REG_RANGES (default 1000, 1 MiB each), PEERMEM_BATCH_ROUNDS (default 9).

mod guest;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::{env, median, rxe0, DEV};
use peermem::{HostRegion, PeerMemory, Registry, Topology};
use peermem_engine::verbs::ACCESS;
use peermem_engine::{Engine, EngineOptions, Op, Request};
use peermem_rdma::{Access, ConnectOpts, Connection, Nic};

const MIB: u64 = 1 << 20;
const SMALL: u64 = 4096;
const BATCH: usize = 256;
const DEPTH: usize = 64;

fn registry() -> Registry {
    Registry::new(Arc::new(Topology::discover("/").expect("live sysfs")))
}

fn engine() -> Result<Engine, String> {
    let options = EngineOptions { nics: Some(vec![DEV.into()]), depth: DEPTH, ..EngineOptions::default() };
    Engine::new(registry(), options).map_err(|e| e.to_string())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The range cache: the buffer once, then `ranges` sub-ranges of 1 MiB.
fn cached(buf: &Arc<dyn PeerMemory>, ranges: u64) -> Result<(), String> {
    let e = engine()?;
    let t = Instant::now();
    let id = e.register(buf.clone()).map_err(|x| x.to_string())?;
    let whole = t.elapsed();
    let t = Instant::now();
    for k in 0..ranges {
        e.register_range(id, k * MIB, MIB).map_err(|x| x.to_string())?;
    }
    let subs = t.elapsed();
    let c = e.cache_counts().map_err(|x| x.to_string())?;
    println!(
        "registration, range cache: the {} MiB buffer {:.1} ms, then {ranges} sub-ranges {:.3} ms; \
         ibv_reg_mr calls {}, cache hits {}",
        buf.len() / MIB,
        ms(whole),
        ms(subs),
        c.registers,
        c.hits
    );
    Ok(())
}

/// One `ibv_reg_mr` per sub-range (every one kept until the last is made).
fn each(nic: &Nic, buf: &Arc<dyn PeerMemory>, ranges: u64) -> Result<(), String> {
    let reg = registry();
    let registration = Arc::new(reg.register(buf.clone()).map_err(|e| e.to_string())?);
    let t = Instant::now();
    let mut mrs = Vec::with_capacity(ranges as usize);
    for k in 0..ranges {
        let mr = nic
            .register_shared(&reg, registration.clone(), buf.clone(), k * MIB, MIB, ACCESS)
            .map_err(|e| e.to_string())?;
        mrs.push(mr);
    }
    let made = t.elapsed();
    let t = Instant::now();
    drop(mrs);
    println!(
        "registration, one each: {ranges} sub-ranges {:.1} ms ({:.3} ms a call), deregistered in {:.1} ms; \
         ibv_reg_mr calls {ranges}",
        ms(made),
        ms(made) / ranges as f64,
        ms(t.elapsed())
    );
    Ok(())
}

/// Two engines on rxe0, the client's 256 x 4 KiB written to scattered places of the server's
/// buffer: the batch and the function that times one.
struct EngineBatch {
    client: Engine,
    _server: Engine,
    peer: peermem_engine::PeerId,
    batch: Vec<Request>,
}

impl EngineBatch {
    fn new() -> Result<EngineBatch, String> {
        let server = engine()?;
        let client = engine()?;
        let far: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(2 * BATCH as u64 * SMALL).map_err(|e| e.to_string())?);
        let near: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(BATCH as u64 * SMALL).map_err(|e| e.to_string())?);
        let remote = server.register(far).map_err(|e| e.to_string())?;
        let local = client.register(near).map_err(|e| e.to_string())?;
        let peer = client.connect(&server.metadata().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let batch = (0..BATCH as u64)
            .map(|j| Request {
                op: Op::Write,
                local,
                local_offset: j * SMALL,
                remote,
                remote_offset: (j * 97 % (2 * BATCH as u64)) * SMALL,
                len: SMALL,
            })
            .collect();
        Ok(EngineBatch { client, _server: server, peer, batch })
    }

    fn run(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let ticket = self.client.post(self.peer, &self.batch, None).map_err(|e| e.to_string())?;
        ticket.wait().map_err(|e| e.to_string())?;
        Ok(t.elapsed())
    }
}

/// The same writes posted directly: one connection over rxe0, 256 x 4 KiB, `DEPTH` in flight.
fn raw_pair(
    nic: &Nic,
    reg: &Registry,
) -> Result<(Connection, Connection, peermem_rdma::NicMr, peermem_rdma::RemoteBuf, peermem_rdma::NicMr), String> {
    let opts = ConnectOpts { max_send_wr: DEPTH as u32, ..Default::default() };
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let (server, client) = std::thread::scope(|s| {
        let h = s.spawn(|| Connection::accept(nic, &l, opts));
        let c = Connection::connect(nic, addr, opts);
        (h.join().expect("accept thread"), c)
    });
    let (mut server, mut client) = (server.map_err(|e| e.to_string())?, client.map_err(|e| e.to_string())?);
    let far = Arc::new(HostRegion::new(2 * BATCH as u64 * SMALL).map_err(|e| e.to_string())?);
    let fmr = nic.register(reg, far, Access::REMOTE_WRITE).map_err(|e| e.to_string())?;
    server.advertise(fmr.remote()).map_err(|e| e.to_string())?;
    let remote = client.expect_remote().map_err(|e| e.to_string())?;
    let near = Arc::new(HostRegion::new(BATCH as u64 * SMALL).map_err(|e| e.to_string())?);
    let nmr = nic.register(reg, near, Access::LOCAL_READ).map_err(|e| e.to_string())?;
    Ok((server, client, fmr, remote, nmr))
}

fn batches(nic: &Nic, rounds: usize) -> Result<(), String> {
    let reg = registry();
    let (_server, mut client, _fmr, remote, nmr) = raw_pair(nic, &reg)?;
    let eb = EngineBatch::new()?;
    // One of each first: connections warm, pages touched.
    eb.run()?;
    client.write_stream(&nmr, remote, SMALL as u32, BATCH, DEPTH).map_err(|e| e.to_string())?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let a = eb.run()?;
        let b = client.write_stream(&nmr, remote, SMALL as u32, BATCH, DEPTH).map_err(|e| e.to_string())?;
        println!("round {r}: engine {:.2} ms, verbs {:.2} ms", ms(a), ms(b));
        ours.push(ms(a));
        raw.push(ms(b));
    }
    let (a, b) = (median(ours), median(raw));
    println!(
        "batch of {BATCH} x {SMALL} B RDMA WRITEs on {DEV}, depth {DEPTH}, post to completion: engine {a:.2} ms, \
         verbs {b:.2} ms (medians of {rounds}): overhead {:.2} ms ({:.1} us a request), ratio {:.3}",
        a - b,
        (a - b) * 1e3 / BATCH as f64,
        a / b
    );
    Ok(())
}

fn run() -> Result<(), String> {
    let nic = rxe0()?;
    let mib = env("PEERMEM_REG_MIB", 1024);
    let ranges = env("PEERMEM_REG_RANGES", 1000).min(mib);
    let rounds = env("PEERMEM_BATCH_ROUNDS", 9).max(1) as usize;
    batches(&nic, rounds)?;
    let buf: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(mib * MIB).map_err(|e| e.to_string())?);
    each(&nic, &buf, ranges)?;
    cached(&buf, ranges)
}

fn main() {
    if !guest::in_guest() {
        println!("engine: skipped (needs the testbed guest: testbed/run switch -- <this binary>)");
        return;
    }
    if let Err(e) = run() {
        eprintln!("engine: {e}");
        std::process::exit(1);
    }
}
