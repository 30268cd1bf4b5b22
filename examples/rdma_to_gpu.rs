//! RDMA into GPU memory, across hosts: the server registers a GPU buffer for the NIC its
//! topology ranks first for it, listens with rdma_cm and offers the buffer with its accept; the
//! client (on another host, or the same one) resolves the server's address with rdma_cm,
//! RDMA-WRITEs a pattern into the buffer, and SENDs its report; the server checks every byte
//! through a Vulkan GPU copy. Each side resolves and prints its own topology and NIC choice.
//!
//! ```text
//! rdma_to_gpu                                   # both ends on this host, one command
//! rdma_to_gpu server [--bind IP] [--port P] [--size BYTES] [--dev NAME] [--timeout SECS]
//! rdma_to_gpu client --host IP [--port P] [--msg BYTES] [--depth N] [--iters N] [--lat N] [--dev NAME] [--timeout SECS]
//! ```
//! Faults (each ends in a typed error, never a hang): `server --fault reject` refuses the
//! connection (the client exits 2, "rejected"); `server --fault unregister` unregisters the
//! buffer once the client is connected (the client's writes fail with a remote access error,
//! and the server checks that nothing landed after the unregister); `client --fault exit-mid`
//! ends the client process halfway through its writes (the server exits 2, "disconnected").
//! `--lat N` adds N 8-byte RDMA WRITEs, one at a time, each timed from post to completion (a
//! round trip: the responder's ACK ends it), and prints their median and 99th percentile.
//!
//! Across two testbed guests (each with soft-RoCE rxe0 on its eth0, 10.77.0.1 and 10.77.0.2):
//! `testbed/run2 switch -- target/debug/examples/rdma_to_gpu server -- sh -c
//! 'target/debug/examples/rdma_to_gpu client --host $PEERMEM_PEER_IP'`. In one guest:
//! `testbed/run switch -- target/debug/examples/rdma_to_gpu`. Without `--dev` each side takes
//! the NIC `peermem_rdma::nearest_nic` ranks first for its buffer; without `--bind` the server
//! listens on that NIC's netdev IPv4 address. When rxe0 is absent and the NIC would be it, it is
//! brought up on eth0 (and, with no address there, 10.77.0.1/24 is added: the testbed's isolated
//! NIC has none). Every wait is bounded by `--timeout` (default 60 s). Exit: 0 when the data
//! matched, 1 on a mismatch, 2 on an error (unknown peer, refused connection, the peer gone).

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermem::{BarRegion, HostRegion, PeerMemory, Registry, Topology};
use peermem_rdma::{
    nearest_nic, Access, CmListener, ConnectOpts, Connection, Local, Method, Nic, NicMr, NicPlace, NicRank, RdmaError,
};
use peermem_vulkan::{Device, Placement, Select};

const DEFAULT_PORT: u16 = 19875;
const DEFAULT_SIZE: u64 = 16 << 20;
const DEFAULT_MSG: u32 = 64 << 10;
const REPORT_MAX: u64 = 1024;
/// The largest buffer a client believes a server offers (it allocates as much as its source).
const MAX_REMOTE: u64 = 1 << 30;

/// The byte a client writes at offset `i` of the server's buffer.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

#[derive(Clone)]
struct Args {
    role: String,
    host: Option<IpAddr>,
    bind: Option<IpAddr>,
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
                     rdma_to_gpu server [--bind IP] [--port P] [--size BYTES] [--dev NAME] [--timeout SECS]\n       \
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
        bind: None,
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
            "--bind" => a.bind = Some(val.parse().with_context(|| format!("{} (an IP address)", bad()))?),
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
    if a.size == 0 || a.msg == 0 || a.depth == 0 || a.iters == 0 || a.timeout.is_zero() {
        bail!("--size, --msg, --depth, --iters and --timeout must be positive");
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

/// Opens `dev`, waiting at most `timeout` for its port.
fn open_nic(dev: &str, timeout: Duration) -> Result<Nic> {
    let deadline = Instant::now() + timeout;
    loop {
        match Nic::open(Some(dev)) {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for {dev}: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).with_context(|| format!("{dev} did not come up\n{}", sh("rdma link show"))),
        }
    }
}

/// Ranks the NICs for `region` (registered for the ranking only), prints the ranking, and
/// returns the chosen NIC's name: `--dev`, else the first.
fn choose_nic(who: &str, registry: &Registry, region: Arc<dyn PeerMemory>, dev: Option<&str>) -> Result<String> {
    ensure_rxe(who);
    let reg = registry.register(region).context("registering the buffer for the NIC ranking")?;
    let ranks = nearest_nic(registry, reg.entry()).context("ranking the RDMA devices")?;
    drop(reg);
    print_ranks(who, "the buffer", &ranks);
    let name = match dev {
        Some(d) => {
            println!("{who}: NIC {d} (given with --dev)");
            d.to_string()
        }
        None => {
            let best = ranks.first().context("no RDMA device: load a NIC driver or add soft-RoCE (rdma link add)")?;
            println!("{who}: NIC {} chosen by topology: {}", best.device.name, best.reasons[0]);
            best.device.name.clone()
        }
    };
    Ok(name)
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

/// The route of a registration and why, one line each.
fn describe(who: &str, mr: &NicMr, notes: &[String]) {
    println!("{who}: route {} via {} on {}", mr.route().name(), mr.method(), mr.nic_name());
    for r in mr.reasons() {
        println!("{who}:   {r}");
    }
    for n in notes {
        println!("{who}:   {n}");
    }
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-9)
}

fn opts(a: &Args) -> ConnectOpts {
    ConnectOpts { timeout: a.timeout, ..Default::default() }
}

fn registry() -> Result<(Arc<Topology>, Registry)> {
    let topo = Arc::new(Topology::discover("/").context("discovering the PCI topology")?);
    Ok((topo.clone(), Registry::new(topo)))
}

/// Serves one client; sends the bound address on `ready` once listening.
fn server(a: &Args, ready: Option<std::sync::mpsc::Sender<SocketAddr>>) -> Result<bool> {
    let who = "server";
    let gpu = Device::open(Select::Best).context("opening a Vulkan device")?;
    println!("{who}: vulkan device {}", gpu.info());
    gpu.set_copy_timeout(a.timeout);
    let region = Arc::new(gpu.allocate(a.size, Placement::Mappable).context("allocating the Vulkan buffer")?);
    region.write_at(0, &vec![0u8; a.size as usize]).context("clearing the Vulkan buffer")?;
    let (topo, registry) = registry()?;
    print_bar_choice(who, &topo, &registry);
    let dev = choose_nic(who, &registry, region.clone(), a.dev.as_deref())?;
    let nic = open_nic(&dev, a.timeout)?;
    let mr = nic
        .register(&registry, region.clone() as Arc<dyn PeerMemory>, Access::REMOTE_WRITE)
        .context("registering the Vulkan buffer for the NIC")?;
    describe(who, &mr, &region.notes());

    let ip = match a.bind {
        Some(ip) => ip,
        None => {
            let netdev = match &nic.place() {
                NicPlace::Virtual { netdev: Some(n) } => n.clone(),
                _ => bail!("cannot tell {dev}'s netdev: give --bind IP"),
            };
            ipv4_of(&netdev).with_context(|| format!("{netdev} has no IPv4 address: give --bind IP"))?
        }
    };
    let listener = CmListener::bind(SocketAddr::new(ip, a.port)).context("rdma_cm listen")?;
    println!("{who}: listening on {} (rdma_cm, {dev}; {} bytes of Vulkan memory)", listener.local_addr(), a.size);
    if let Some(tx) = ready {
        let _ = tx.send(listener.local_addr());
    }
    if a.fault.as_deref() == Some("reject") {
        listener.reject_next(a.timeout).context("refusing the client")?;
        println!("{who}: refused the client's connection (--fault reject)");
        return Ok(true);
    }
    let mut conn = listener.accept(&nic, opts(a), Some(mr.remote())).context("accepting the client")?;
    println!("{who}: connected to {}", conn.peer());
    if a.fault.as_deref() == Some("unregister") {
        return unregister_under_writes(a, mr, region.as_ref(), &mut conn);
    }
    // The client's report arrives as a SEND once its writes completed.
    let inbox = Arc::new(HostRegion::new(REPORT_MAX)?);
    let imr = nic.register(&registry, inbox.clone(), Access::LOCAL_WRITE).context("registering the inbox")?;
    conn.post_recv(Local::all(&imr)?)?;
    let n = conn.wait_recv().context("waiting for the client's report")?;
    let mut report = vec![0u8; n as usize];
    inbox.read_at(0, &mut report)?;
    let report = String::from_utf8_lossy(&report).into_owned();
    drop(conn);
    if mr.method() == Method::Bounce {
        mr.bounce_to_region(0, a.size)?;
    }

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

/// `--fault unregister`: ends the buffer's registration while the client writes, clears it, and
/// waits for the client to give up (its rkey no longer works). Passes when nothing landed after
/// the unregister.
fn unregister_under_writes(a: &Args, mr: NicMr, region: &dyn PeerMemory, conn: &mut Connection) -> Result<bool> {
    let who = "server";
    let rkey = mr.rkey();
    drop(mr);
    region.write_at(0, &vec![0u8; a.size as usize])?;
    println!("{who}: unregistered the buffer (rkey {rkey:#x}) with the client connected (--fault unregister)");
    let deadline = Instant::now() + a.timeout;
    let gone = loop {
        match conn.check_peer() {
            Err(RdmaError::PeerDisconnected { .. }) => break true,
            Err(e) => return Err(e.into()),
            Ok(()) if Instant::now() >= deadline => break false,
            Ok(()) => std::thread::sleep(Duration::from_millis(20)),
        }
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

fn client(a: &Args, server: SocketAddr) -> Result<bool> {
    let who = "client";
    let (_topo, registry) = registry()?;
    // The source is host memory: rank the NICs for a page of it.
    let dev = choose_nic(who, &registry, Arc::new(HostRegion::new(4096)?), a.dev.as_deref())?;
    let nic = open_nic(&dev, a.timeout)?;
    // The server may still be starting (Vulkan, rxe): retry while nobody listens, until the
    // timeout.
    let deadline = Instant::now() + a.timeout;
    let mut conn = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match Connection::connect_cm(&nic, server, ConnectOpts { timeout: left, ..opts(a) }) {
            Ok(c) => break c,
            Err(RdmaError::Rejected { status: 8, .. }) if Instant::now() + Duration::from_millis(300) < deadline => {
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {server}")),
        }
    };
    let remote = conn.expect_remote()?;
    println!(
        "{who}: connected to {server} with rdma_cm; server buffer of {} bytes, rkey {:#x}",
        remote.len, remote.rkey
    );
    if remote.len == 0 || remote.len > MAX_REMOTE {
        bail!("the server offers {} bytes: expected 1 byte to {MAX_REMOTE}", remote.len);
    }
    let mut src = HostRegion::new(remote.len)?;
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = pattern(i as u64);
    }
    let smr = nic.register(&registry, Arc::new(src), Access::LOCAL_READ).context("registering the source")?;
    describe("client (source)", &smr, &[]);

    // RDMA WRITEs of `msg` bytes, `depth` in flight, `iters` passes over the whole buffer.
    let msg = u64::from(a.msg).min(remote.len);
    let per_pass = remote.len.div_ceil(msg);
    let total = per_pass as usize * a.iters;
    let depth = a.depth.min(opts(a).max_send_wr as usize);
    let (mut posted, mut done) = (0usize, 0usize);
    let start = Instant::now();
    while done < total {
        while posted < total && posted - done < depth {
            let off = (posted as u64 % per_pass) * msg;
            let len = msg.min(remote.len - off) as u32;
            let dst = remote.slice(off, len as u64).context("slice of the remote buffer")?;
            conn.post_write(Local::new(&smr, off, len)?, dst)?;
            posted += 1;
        }
        if a.fault.as_deref() == Some("exit-mid") && done >= total / 2 {
            println!("{who}: exiting halfway through the writes (--fault exit-mid)");
            std::process::exit(3);
        }
        done += conn.wait_send(1)?.len();
    }
    let elapsed = start.elapsed();
    let bytes = remote.len * a.iters as u64;
    let report = format!(
        "{bytes} bytes in {total} RDMA WRITEs of {msg} bytes ({depth} in flight) in {:.3} s: {:.1} MiB/s ({:.3} Gb/s)",
        elapsed.as_secs_f64(),
        mib_s(bytes, elapsed),
        bytes as f64 * 8.0 / 1e9 / elapsed.as_secs_f64().max(1e-9)
    );
    println!("{who}: {report}");
    if a.lat > 0 {
        let mut t: Vec<Duration> = Vec::with_capacity(a.lat);
        let one = Local::new(&smr, 0, 8)?;
        let dst = remote.slice(0, 8).context("8 bytes of the remote buffer")?;
        for _ in 0..a.lat {
            let s = Instant::now();
            conn.write(one, dst)?;
            t.push(s.elapsed());
        }
        t.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{who}: 8-byte RDMA WRITE, post to completion, {} writes: median {:.1} us, p99 {:.1} us",
            t.len(),
            us(t[t.len() / 2]),
            us(t[(t.len() * 99 / 100).min(t.len() - 1)])
        );
    }
    // The report goes as a SEND from a registered buffer (the pattern is no longer needed).
    let text = report.as_bytes();
    let rep = Arc::new(HostRegion::new(REPORT_MAX)?);
    rep.write_at(0, &text[..text.len().min(REPORT_MAX as usize)])?;
    let rmr = nic.register(&registry, rep, Access::LOCAL_READ).context("registering the report")?;
    conn.send(Local::new(&rmr, 0, text.len().min(REPORT_MAX as usize) as u32)?)?;
    conn.disconnect()?;
    Ok(true)
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
