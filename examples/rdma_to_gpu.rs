//! RDMA into GPU memory, across hosts, through the transfer engine: the server registers a GPU
//! buffer with its engine (each NIC registers it the way the topology allows, printed with the
//! reason) and listens with rdma_cm; the client's engine connects to the server's address
//! (`Engine::connect_to`: the server's metadata is read over that connection, no other channel),
//! RDMA-WRITEs a pattern into the buffer in batches, over every rail that reaches both memories,
//! and sends its report as the last batch's notification, which the server gets only once every
//! byte landed; the server checks every byte through a Vulkan GPU copy. Each side prints its
//! topology's NIC ranking for its buffer.
//!
//! ```text
//! rdma_to_gpu                                   # both ends on this host, one command
//! rdma_to_gpu server [--port P] [--size BYTES] [--dev NAME] [--timeout SECS]
//! rdma_to_gpu client --host IP [--port P] [--msg BYTES] [--depth N] [--iters N] [--lat N] [--dev NAME] [--timeout SECS]
//! ```
//! Faults (each ends in a typed error, never a hang): `server --fault reject` refuses the
//! connection with a bare rdma_cm listener (the client exits 2, "refused it"); `server --fault
//! unregister` unregisters the buffer once the client's first batch landed (the client's next
//! batch fails with the peer's remote access error, and the server checks that nothing landed
//! after the unregister); `client --fault exit-mid` ends the client process halfway through its
//! batches (the server exits 2, "disconnected"). `--msg` is the engine's slice size, `--depth`
//! its work requests in flight per rail, `--iters` the passes over the buffer (one batch each,
//! all posted at once). `--lat N` adds N one-request batches of 8 bytes, each timed from post to
//! completion (a round trip through the engine), and prints their median and 99th percentile.
//!
//! Across two testbed guests (each with soft-RoCE rxe0 on its eth0, 10.77.0.1 and 10.77.0.2):
//! `testbed/run2 switch -- target/debug/examples/rdma_to_gpu server -- sh -c
//! 'target/debug/examples/rdma_to_gpu client --host $PEERMEM_PEER_IP'`. In one guest:
//! `testbed/run switch -- target/debug/examples/rdma_to_gpu`. Without `--dev` each engine uses
//! every RDMA device whose port is active; the server listens on each one's IPv4 address at
//! `--port`. When rxe0 is absent it is brought up on eth0 (and, with no address there,
//! 10.77.0.1/24 is added: the testbed's isolated NIC has none). Every wait is bounded by
//! `--timeout` (default 60 s). Exit: 0 when the data matched, 1 on a mismatch, 2 on an error
//! (unknown peer, refused connection, the peer gone).

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermem::nic::{devices, facts};
use peermem::{BarRegion, HostRegion, PeerMemory, Registry, Topology};
use peermem_engine::rails::RailOptions;
use peermem_engine::{Engine, EngineError, EngineOptions, Op, PeerId, RegionId, Report, Request};
use peermem_rdma::{nearest_nic, CmListener, ConnectOpts, NicPlace, NicRank};
use peermem_vulkan::{Device, Placement, Select};

const DEFAULT_PORT: u16 = 19875;
const DEFAULT_SIZE: u64 = 16 << 20;
const DEFAULT_MSG: u32 = 64 << 10;
/// The largest buffer a client writes (it allocates as much as the server's region).
const MAX_REMOTE: u64 = 1 << 30;
/// The notification that tells the server the client's first batch landed.
const STARTED: &[u8] = b"started";

/// The byte a client writes at offset `i` of the server's buffer.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

#[derive(Clone)]
struct Args {
    role: String,
    host: Option<IpAddr>,
    port: u16,
    size: u64,
    msg: u32,
    depth: usize,
    iters: usize,
    dev: Option<String>,
    timeout: Duration,
    lat: usize,
    fault: Option<String>,
}

const USAGE: &str = "usage: rdma_to_gpu                      (both ends on this host)\n       \
                     rdma_to_gpu server [--port P] [--size BYTES] [--dev NAME] [--timeout SECS]\n       \
                     rdma_to_gpu client --host IP [--port P] [--msg BYTES] [--depth N] [--iters N] [--lat N] \
                     [--dev NAME] [--timeout SECS]";

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1).peekable();
    let role = match it.peek().map(String::as_str) {
        None => "both".to_string(),
        Some(r @ ("server" | "client")) => {
            let r = r.to_string();
            it.next();
            r
        }
        Some(r) if r.starts_with("--") => "both".to_string(),
        Some(r) => bail!("unknown role {r:?}\n{USAGE}"),
    };
    let mut a = Args {
        role,
        host: None,
        port: DEFAULT_PORT,
        size: DEFAULT_SIZE,
        msg: DEFAULT_MSG,
        depth: 64,
        iters: 20,
        dev: None,
        timeout: Duration::from_secs(60),
        lat: 0,
        fault: None,
    };
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("bad value {val:?} for {flag}");
        match flag.as_str() {
            "--host" => a.host = Some(val.parse().with_context(|| format!("{} (an IP address)", bad()))?),
            "--port" => a.port = val.parse().with_context(bad)?,
            "--size" => a.size = val.parse().with_context(bad)?,
            "--msg" => a.msg = val.parse().with_context(bad)?,
            "--depth" => a.depth = val.parse().with_context(bad)?,
            "--iters" => a.iters = val.parse().with_context(bad)?,
            "--dev" => a.dev = Some(val.clone()),
            "--timeout" => a.timeout = Duration::from_secs(val.parse().with_context(bad)?),
            "--lat" => a.lat = val.parse().with_context(bad)?,
            "--fault" => a.fault = Some(val.clone()),
            _ => bail!("unknown option {flag:?}\n{USAGE}"),
        }
    }
    if a.size == 0 || a.size > MAX_REMOTE || a.msg == 0 || a.depth == 0 || a.iters == 0 || a.timeout.is_zero() {
        bail!("--msg, --depth, --iters and --timeout must be positive, --size 1 to {MAX_REMOTE}");
    }
    match (a.role.as_str(), a.fault.as_deref()) {
        (_, None) | ("server", Some("reject" | "unregister")) | ("client", Some("exit-mid")) => {}
        (r, Some(f)) => bail!("no fault {f:?} for the {r} (server: reject, unregister; client: exit-mid)"),
    }
    if a.role == "client" && a.host.is_none() {
        bail!("the client needs --host (the server's IP address)\n{USAGE}");
    }
    Ok(a)
}

fn sh(cmd: &str) -> String {
    match Command::new("sh").arg("-c").arg(cmd).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        Err(e) => format!("sh: {e}"),
    }
}

/// The first IPv4 address of `netdev`, if any.
fn ipv4_of(netdev: &str) -> Option<IpAddr> {
    let out = sh(&format!("ip -4 -o addr show dev {netdev}"));
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
    cidr.split('/').next()?.parse().ok()
}

/// The testbed's soft-RoCE: rxe0 on eth0, brought up when absent (with an address on eth0 when
/// it has none, for rdma_cm to resolve).
fn ensure_rxe(who: &str) {
    if sh("rdma link show").contains("rxe0") || !std::path::Path::new("/sys/class/net/eth0").exists() {
        return;
    }
    println!("{who}: bringing up rxe0 on eth0");
    sh("ip link set eth0 up; sleep 2; rdma link add rxe0 type rxe netdev eth0");
    if ipv4_of("eth0").is_none() {
        println!("{who}: eth0 has no IPv4 address: adding 10.77.0.1/24");
        sh("ip addr add 10.77.0.1/24 dev eth0");
    }
}

/// Prints the topology's ranking of the RDMA devices for `region` (registered for the ranking
/// only), best first.
fn print_ranking(who: &str, registry: &Registry, region: Arc<dyn PeerMemory>, what: &str) -> Result<Vec<NicRank>> {
    let reg = registry.register(region).context("registering the buffer for the NIC ranking")?;
    let ranks = nearest_nic(registry, reg.entry()).context("ranking the RDMA devices")?;
    print_ranks(who, what, &ranks);
    Ok(ranks)
}

fn print_ranks(who: &str, what: &str, ranks: &[NicRank]) {
    println!("{who}: RDMA devices for {what}, best first:");
    for r in ranks {
        println!(
            "{who}:   {} ({}, route {}): {}",
            r.device.name,
            r.tier.as_str(),
            r.route.name(),
            r.device.place.describe()
        );
    }
}

/// The GPU's own BAR (the testbed's ivshmem stand-in) as the registry sees it: which NIC could
/// write it peer-to-peer, and so why the buffer is the Vulkan one.
fn print_bar_choice(who: &str, topo: &Arc<Topology>, registry: &Registry) {
    let Some(dev) = topo.devices().iter().find(|d| d.vendor == 0x1af4 && d.device == 0x1110) else { return };
    let Some(bar) = dev.bar(2) else { return };
    let region = BarRegion { bdf: dev.bdf, bar: 2, offset: 0, len: bar.cpu.len().min(4096) };
    let Ok(reg) = registry.register(Arc::new(region)) else { return };
    let Ok(ranks) = nearest_nic(registry, reg.entry()) else { return };
    print_ranks(who, &format!("the GPU BAR {} BAR2", dev.bdf), &ranks);
    match ranks.iter().find(|r| matches!(r.device.place, NicPlace::Pci(_)) && !r.registration.bounces()) {
        Some(r) => println!(
            "{who}: {} could register the BAR directly ({}, route {}); this example uses the Vulkan buffer",
            r.device.name,
            r.registration.name(),
            r.route.name()
        ),
        None => println!(
            "{who}: no NIC can register the GPU BAR directly (a raw BAR mapping is no dma-buf and has no pages to \
             pin), so the buffer is the Vulkan host-visible one"
        ),
    }
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-9)
}

fn registry() -> Result<(Arc<Topology>, Registry)> {
    let topo = Arc::new(Topology::discover("/").context("discovering the PCI topology")?);
    Ok((topo.clone(), Registry::new(topo)))
}

/// An engine on `--dev` (every active RDMA device without it) listening at `port`, waiting at
/// most `--timeout` for a device that is still coming up.
fn engine(a: &Args, registry: &Registry, port: u16) -> Result<Engine> {
    let options = EngineOptions {
        nics: a.dev.clone().map(|d| vec![d]),
        port,
        depth: a.depth,
        timeout: a.timeout,
        connect: ConnectOpts { timeout: a.timeout, ..ConnectOpts::default() },
        rails: RailOptions { slice: u64::from(a.msg), ..RailOptions::default() },
        ..EngineOptions::default()
    };
    let deadline = Instant::now() + a.timeout;
    loop {
        match Engine::new(registry.clone(), options.clone()) {
            Ok(e) => return Ok(e),
            Err(e @ (EngineError::NoNic | EngineError::Rdma(_))) if Instant::now() < deadline => {
                eprintln!("waiting for an RDMA device: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).with_context(|| format!("starting the engine\n{}", sh("rdma link show"))),
        }
    }
}

/// The client's notifications, in the order they arrived.
struct Inbox<'e> {
    engine: &'e Engine,
    backlog: std::collections::VecDeque<Vec<u8>>,
}

impl Inbox<'_> {
    /// The next notification, within `timeout`. A client whose every connection closed before
    /// it is an error: it disconnected.
    fn next(&mut self, timeout: Duration, what: &str) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut connected = false;
        loop {
            self.backlog.extend(self.engine.notifications(Duration::from_millis(100))?.into_iter().map(|n| n.message));
            if let Some(n) = self.backlog.pop_front() {
                return Ok(n);
            }
            let hosts = self.engine.accepted()?;
            if connected && hosts.is_empty() {
                bail!("the client disconnected before {what} came");
            }
            connected |= !hosts.is_empty();
            if Instant::now() >= deadline {
                bail!("{what} did not come within {timeout:?}");
            }
        }
    }
}

/// Serves one client; sends the address it listens at on `ready`.
fn server(a: &Args, ready: Option<std::sync::mpsc::Sender<SocketAddr>>) -> Result<bool> {
    let who = "server";
    let gpu = Device::open(Select::Best).context("opening a Vulkan device")?;
    println!("{who}: vulkan device {}", gpu.info());
    gpu.set_copy_timeout(a.timeout);
    let region = Arc::new(gpu.allocate(a.size, Placement::Mappable).context("allocating the Vulkan buffer")?);
    region.write_at(0, &vec![0u8; a.size as usize]).context("clearing the Vulkan buffer")?;
    let (topo, registry) = registry()?;
    print_bar_choice(who, &topo, &registry);
    ensure_rxe(who);
    let ranks = print_ranking(who, &registry, region.clone(), "the buffer")?;
    if a.fault.as_deref() == Some("reject") {
        return refuse(a, &ranks, ready);
    }
    let engine = engine(a, &registry, a.port)?;
    let id = engine.register(region.clone()).context("registering the Vulkan buffer with the engine")?;
    println!("{who}: the buffer is {id}; how each NIC registered it:");
    for line in engine.routes(id)?.iter().chain(&region.notes()) {
        println!("{who}:   {line}");
    }
    let addrs = engine.listen_addrs()?;
    let first = addrs.first().context("no RDMA device of the engine has an IPv4 address to listen on")?.1;
    for (nic, addr) in &addrs {
        println!("{who}: listening on {addr} (rdma_cm, {nic}; {} bytes of Vulkan memory)", a.size);
    }
    if let Some(tx) = ready {
        let _ = tx.send(first);
    }
    if a.fault.as_deref() == Some("unregister") {
        return unregister_under_writes(a, &engine, id, region.as_ref());
    }
    let mut inbox = Inbox { engine: &engine, backlog: Default::default() };
    let report = loop {
        let note = inbox.next(a.timeout, "its report")?;
        if note != STARTED {
            break String::from_utf8_lossy(&note).into_owned();
        }
    };

    // Read back on the GPU: vkCmdCopyBuffer into a second host-visible buffer, then check it.
    let check = gpu.allocate(a.size, Placement::Mappable).context("allocating the check buffer")?;
    let t = Instant::now();
    gpu.copy(&region, 0, &check, 0, a.size).context("GPU copy of the written buffer")?;
    let copy_time = t.elapsed();
    let mut back = vec![0u8; a.size as usize];
    check.read_at(0, &mut back)?;
    let bad: Vec<u64> = (0..a.size).filter(|&i| back[i as usize] != pattern(i)).take(4).collect();
    println!("{who}: client reported: {report}");
    println!(
        "{who}: {} bytes verified through a Vulkan copy ({:.0} MiB/s on {}): {}",
        a.size,
        mib_s(a.size, copy_time),
        gpu.info().name,
        if bad.is_empty() { "data matched".to_string() } else { format!("MISMATCH at offsets {bad:?}") }
    );
    Ok(bad.is_empty())
}

/// The IPv4 address of RDMA device `name`, from sysfs (its GID table), waiting at most `timeout`
/// for a device still coming up.
fn nic_ipv4(name: &str, timeout: Duration) -> Result<IpAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        let dev = devices(std::path::Path::new("/")).ok().and_then(|d| d.into_iter().find(|d| d.name == name));
        let ip = dev.and_then(|d| {
            facts(std::path::Path::new("/"), &d).ok()?.ports.iter().find_map(|p| p.ipv4.first().copied())
        });
        match ip {
            Some(ip) => return Ok(IpAddr::V4(ip)),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            None => bail!("{name} has no IPv4 address in its GID table\n{}", sh("rdma link show")),
        }
    }
}

/// `--fault reject`: a bare rdma_cm listener on the chosen NIC's address refuses the client.
fn refuse(a: &Args, ranks: &[NicRank], ready: Option<std::sync::mpsc::Sender<SocketAddr>>) -> Result<bool> {
    let who = "server";
    let dev = match &a.dev {
        Some(d) => d.clone(),
        None => ranks.first().context("no RDMA device")?.device.name.clone(),
    };
    let listener = CmListener::bind(SocketAddr::new(nic_ipv4(&dev, a.timeout)?, a.port)).context("rdma_cm listen")?;
    println!("{who}: listening on {} (rdma_cm, {dev}) to refuse the client", listener.local_addr());
    if let Some(tx) = ready {
        let _ = tx.send(listener.local_addr());
    }
    listener.reject_next(a.timeout).context("refusing the client")?;
    println!("{who}: refused the client's connection (--fault reject)");
    Ok(true)
}

/// `--fault unregister`: once the client's first batch landed, unregisters the buffer, clears
/// it, and waits for the client to give up. Passes when nothing landed after the unregister.
fn unregister_under_writes(a: &Args, engine: &Engine, id: RegionId, region: &dyn PeerMemory) -> Result<bool> {
    let who = "server";
    let first = Inbox { engine, backlog: Default::default() }.next(a.timeout, "its first batch")?;
    if first != STARTED {
        bail!("the client's first notification was {:?}, not {:?}", String::from_utf8_lossy(&first), "started");
    }
    engine.unregister(id).context("unregistering the buffer")?;
    region.write_at(0, &vec![0u8; a.size as usize])?;
    println!("{who}: unregistered the buffer with the client connected (--fault unregister)");
    let deadline = Instant::now() + a.timeout;
    let gone = loop {
        if engine.accepted()?.is_empty() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut back = vec![0u8; a.size as usize];
    region.read_at(0, &mut back)?;
    let landed = back.iter().filter(|&&b| b != 0).count();
    println!(
        "{who}: the client {}; {landed} bytes changed after the unregister",
        if gone { "disconnected" } else { "was still connected at the timeout" }
    );
    Ok(landed == 0)
}

/// Connects to the server's engine, again while nothing listens there yet (the server may still
/// be starting: Vulkan, rxe), until `--timeout`.
fn connect(a: &Args, engine: &Engine, server: SocketAddr) -> Result<PeerId> {
    let deadline = Instant::now() + a.timeout;
    loop {
        match engine.connect_to(server) {
            Ok(p) => return Ok(p),
            Err(EngineError::Unreached { nothing_listens: true, .. })
                if Instant::now() + Duration::from_millis(300) < deadline =>
            {
                std::thread::sleep(Duration::from_millis(300))
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {server}")),
        }
    }
}

fn client(a: &Args, server: SocketAddr) -> Result<bool> {
    let who = "client";
    let (_topo, registry) = registry()?;
    ensure_rxe(who);
    // The source is host memory: rank the NICs for a page of it.
    print_ranking(who, &registry, Arc::new(HostRegion::new(4096)?), "host memory")?;
    let engine = engine(a, &registry, 0)?;
    let peer = connect(a, &engine, server)?;
    let regions = engine.remote_regions(peer)?;
    let &(remote, len) = regions.first().context("the server's engine lists no region")?;
    println!("{who}: connected to {server} (metadata read over rdma_cm); the server's {remote}: {len} bytes");
    if len > MAX_REMOTE {
        bail!("the server offers {len} bytes: expected at most {MAX_REMOTE}");
    }
    let mut src = HostRegion::new(len)?;
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = pattern(i as u64);
    }
    let local = engine.register(Arc::new(src)).context("registering the source")?;
    for line in engine.routes(local)? {
        println!("{who} (source):   {line}");
    }
    let reports = write_passes(a, &engine, peer, local, remote, len)?;
    let report = summary(a, len, &reports);
    println!("{who}: {report}");
    for r in reports.last().map_or(&[][..], |r| &r.rails[..]) {
        println!("{who}:   rail {} -> {}: {} bytes, {}", r.nic, r.remote_nic, r.bytes, r.state);
    }
    if a.lat > 0 {
        latency(a, &engine, peer, local, remote)?;
    }
    // The report is the notification of a batch of no request, posted once every pass landed.
    let end = engine.post(peer, &[], Some(report.as_bytes()))?.wait().context("sending the report")?;
    if !end.notified {
        bail!("the report was not sent: {end:?}");
    }
    Ok(true)
}

/// `--iters` batches, each writing the whole buffer, all posted at once; the first one's
/// notification tells the server that writes landed. `--fault exit-mid` ends the process once
/// half of them completed.
fn write_passes(
    a: &Args,
    engine: &Engine,
    peer: PeerId,
    local: RegionId,
    remote: RegionId,
    len: u64,
) -> Result<Vec<Report>> {
    let write = Request { op: Op::Write, local, local_offset: 0, remote, remote_offset: 0, len };
    let start = Instant::now();
    let tickets = (0..a.iters)
        .map(|i| engine.post(peer, &[write], (i == 0).then_some(STARTED)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reports = Vec::with_capacity(a.iters);
    for (i, t) in tickets.iter().enumerate() {
        if a.fault.as_deref() == Some("exit-mid") && i >= a.iters / 2 {
            println!("client: exiting halfway through the batches (--fault exit-mid)");
            std::process::exit(3);
        }
        let mut r = t.wait().with_context(|| format!("batch {} of {}", i + 1, a.iters))?;
        r.seconds = start.elapsed().as_secs_f64();
        reports.push(r);
    }
    Ok(reports)
}

/// One line: bytes, work requests, the time from the first post to the last completion.
fn summary(a: &Args, len: u64, reports: &[Report]) -> String {
    let bytes = len * reports.len() as u64;
    let writes: u64 = reports.iter().flat_map(|r| &r.rails).map(|r| r.slices).sum();
    let secs = reports.last().map_or(0.0, |r| r.seconds).max(1e-9);
    let msg = u64::from(a.msg).min(len);
    format!(
        "{bytes} bytes in {writes} RDMA WRITEs of {msg} bytes ({} in flight) in {secs:.3} s: {:.1} MiB/s ({:.3} Gb/s), \
         {} retried",
        a.depth,
        mib_s(bytes, Duration::from_secs_f64(secs)),
        bytes as f64 * 8.0 / 1e9 / secs,
        reports.iter().map(|r| r.retries).sum::<u64>()
    )
}

/// `--lat N`: N batches of one 8-byte write, each timed from post to completion.
fn latency(a: &Args, engine: &Engine, peer: PeerId, local: RegionId, remote: RegionId) -> Result<()> {
    let one = Request { op: Op::Write, local, local_offset: 0, remote, remote_offset: 0, len: 8 };
    let mut t: Vec<Duration> = Vec::with_capacity(a.lat);
    for _ in 0..a.lat {
        let s = Instant::now();
        engine.post(peer, &[one], None)?.wait()?;
        t.push(s.elapsed());
    }
    t.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "client: 8-byte RDMA WRITE, post to completion, {} writes: median {:.1} us, p99 {:.1} us",
        t.len(),
        us(t[t.len() / 2]),
        us(t[(t.len() * 99 / 100).min(t.len() - 1)])
    );
    Ok(())
}

fn run() -> Result<bool> {
    let a = parse_args()?;
    match a.role.as_str() {
        "server" => server(&a, None),
        "client" => client(&a, SocketAddr::new(a.host.expect("checked by parse_args"), a.port)),
        _ => {
            // Both ends on this host: the server in a thread, the client once it listens.
            let (tx, rx) = std::sync::mpsc::channel();
            let sa = a.clone();
            let srv = std::thread::spawn(move || server(&sa, Some(tx)));
            let addr = match rx.recv_timeout(a.timeout) {
                Ok(addr) => addr,
                Err(_) => {
                    return match srv.join() {
                        Ok(Err(e)) => Err(e.context("the server did not start")),
                        _ => bail!("the server did not listen within {:?}", a.timeout),
                    };
                }
            };
            let c = client(&a, addr);
            let s = srv.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
            Ok(c? && s?)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rdma_to_gpu: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
