//! RDMA into GPU memory: a server exports a Vulkan buffer, registers it for
//! the NIC through the peermem registry, and a client RDMA-writes a pattern into it; the server
//! checks the bytes through a Vulkan GPU copy. Both print the route, why, and the bandwidth.
//!
//! ```text
//! rdma_to_gpu server [--port P] [--size BYTES] [--dev rxe0] [--timeout SECS]
//! rdma_to_gpu client [--host H] [--port P] [--msg BYTES] [--depth N] [--iters N] [--dev rxe0] [--timeout SECS]
//! ```
//!
//! In the testbed guest (soft-RoCE rxe0 on eth0, lavapipe through the host root):
//! `testbed/run switch -- sh -c 'target/debug/examples/rdma_to_gpu server & sleep 2;
//! target/debug/examples/rdma_to_gpu client; wait'`. The server brings rxe0 up when it is absent
//! (as the guest tests do) and prints `listening on ...` once it accepts connections. Every wait
//! is bounded by `--timeout` (default 60 s). The server exits 1 when the data does not match.

use std::net::TcpListener;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermem::{HostRegion, PeerMemory, Registry, Topology};
use peermem_rdma::{Access, ConnectOpts, Connection, Local, Method, Nic, NicMr, RdmaError};
use peermem_vulkan::{Device, Placement, Select};

const DEFAULT_PORT: u16 = 19875;
const DEFAULT_SIZE: u64 = 16 << 20;
const DEFAULT_MSG: u32 = 64 << 10;
const DONE: &[u8; 4] = b"done";

/// The byte a client writes at offset `i` of the server's buffer.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

struct Args {
    role: String,
    host: String,
    port: u16,
    size: u64,
    msg: u32,
    depth: usize,
    iters: usize,
    dev: String,
    timeout: Duration,
}

const USAGE: &str = "usage: rdma_to_gpu server [--port P] [--size BYTES] [--dev NAME] [--timeout SECS]\n       \
                     rdma_to_gpu client [--host H] [--port P] [--msg BYTES] [--depth N] [--iters N] [--dev NAME] \
                     [--timeout SECS]";

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let role = it.next().context(USAGE)?;
    if role != "server" && role != "client" {
        bail!("unknown role {role:?}\n{USAGE}");
    }
    let mut a = Args {
        role,
        host: "127.0.0.1".into(),
        port: DEFAULT_PORT,
        size: DEFAULT_SIZE,
        msg: DEFAULT_MSG,
        depth: 64,
        iters: 20,
        dev: "rxe0".into(),
        timeout: Duration::from_secs(60),
    };
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("bad value {val:?} for {flag}");
        match flag.as_str() {
            "--host" => a.host = val.clone(),
            "--port" => a.port = val.parse().with_context(bad)?,
            "--size" => a.size = val.parse().with_context(bad)?,
            "--msg" => a.msg = val.parse().with_context(bad)?,
            "--depth" => a.depth = val.parse().with_context(bad)?,
            "--iters" => a.iters = val.parse().with_context(bad)?,
            "--dev" => a.dev = val.clone(),
            "--timeout" => a.timeout = Duration::from_secs(val.parse().with_context(bad)?),
            _ => bail!("unknown option {flag:?}\n{USAGE}"),
        }
    }
    if a.size == 0 || a.msg == 0 || a.depth == 0 || a.iters == 0 {
        bail!("--size, --msg, --depth and --iters must be positive");
    }
    Ok(a)
}

fn sh(cmd: &str) -> String {
    match Command::new("sh").arg("-c").arg(cmd).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        Err(e) => format!("sh: {e}"),
    }
}

/// Opens `dev`; brings rxe0 up on eth0 first when it is absent (as the guest tests do), and
/// waits at most `timeout` for its port.
fn open_nic(dev: &str, timeout: Duration) -> Result<Nic> {
    if dev == "rxe0" && !sh("rdma link show").contains(dev) {
        println!("bringing up {dev} on eth0");
        sh("ip link set eth0 up; sleep 2; rdma link add rxe0 type rxe netdev eth0");
    }
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

fn opts(a: &Args) -> ConnectOpts {
    ConnectOpts { timeout: a.timeout, ..Default::default() }
}

/// The route of a registration and why, one line each.
fn describe(who: &str, mr: &NicMr, notes: &[String]) -> String {
    let mut s = format!("{who}: route {} via {} on {}\n", mr.route().name(), mr.method(), mr.nic_name());
    s += &format!("{who}: why:\n");
    for r in mr.reasons() {
        s += &format!("{who}:   {r}\n");
    }
    if mr.refusals().is_empty() {
        s += &format!("{who}:   no refusals\n");
    }
    for n in notes {
        s += &format!("{who}:   {n}\n");
    }
    s
}

fn send_text(conn: &mut Connection, text: &str) -> Result<()> {
    conn.send_oob(&(text.len() as u32).to_le_bytes())?;
    conn.send_oob(text.as_bytes())?;
    Ok(())
}

fn recv_text(conn: &mut Connection) -> Result<String> {
    let mut len = [0u8; 4];
    conn.recv_oob(&mut len)?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    conn.recv_oob(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-9)
}

fn server(a: &Args) -> Result<bool> {
    let gpu = Device::open(Select::Best).context("opening a Vulkan device")?;
    println!("server: vulkan device {}", gpu.info());
    gpu.set_copy_timeout(a.timeout);
    let region = Arc::new(gpu.allocate(a.size, Placement::Mappable).context("allocating the Vulkan buffer")?);
    region.write_at(0, &vec![0u8; a.size as usize]).context("clearing the Vulkan buffer")?;
    let registry = Registry::new(Arc::new(Topology::discover("/").context("discovering the PCI topology")?));
    let nic = open_nic(&a.dev, a.timeout)?;
    let mr = nic
        .register(&registry, region.clone() as Arc<dyn PeerMemory>, Access::REMOTE_WRITE)
        .context("registering the Vulkan buffer for the NIC")?;
    let why = describe("server", &mr, &region.notes());
    print!("{why}");

    let listener = TcpListener::bind(("127.0.0.1", a.port)).with_context(|| format!("binding port {}", a.port))?;
    println!("server: listening on 127.0.0.1:{} ({} bytes of Vulkan memory)", a.port, a.size);
    let mut conn = Connection::accept(&nic, &listener, opts(a)).context("accepting the client")?;
    conn.advertise(mr.remote())?;
    send_text(&mut conn, &why)?;
    let mut done = [0u8; 4];
    conn.recv_oob(&mut done).context("waiting for the client's \"done\"")?;
    if &done != DONE {
        bail!("client sent {done:?} instead of \"done\"");
    }
    let report = recv_text(&mut conn).unwrap_or_default();
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
    println!("server: client reported: {report}");
    println!("server: route {} ({})", mr.route().name(), mr.method());
    println!(
        "server: {} bytes verified through a Vulkan copy ({:.0} MiB/s on {}): {}",
        a.size,
        mib_s(a.size, copy_time),
        gpu.info().name,
        if bad.is_empty() { "data matched".to_string() } else { format!("MISMATCH at offsets {bad:?}") }
    );
    Ok(bad.is_empty())
}

fn client(a: &Args) -> Result<bool> {
    let nic = open_nic(&a.dev, a.timeout)?;
    let registry = Registry::new(Arc::new(Topology::discover("/").context("discovering the PCI topology")?));
    // The server may still be starting (Vulkan, rxe): retry refused connections until the timeout.
    let deadline = Instant::now() + a.timeout;
    let mut conn = loop {
        match Connection::connect(&nic, (a.host.as_str(), a.port), opts(a)) {
            Ok(c) => break c,
            Err(RdmaError::Exchange { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).context("connecting to the server"),
        }
    };
    let remote = conn.expect_remote()?;
    let server_why = recv_text(&mut conn)?;
    for line in server_why.lines() {
        println!("client <- {line}");
    }
    println!("client: server buffer of {} bytes, rkey {:#x}", remote.len, remote.rkey);

    let mut src = HostRegion::new(remote.len)?;
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = pattern(i as u64);
    }
    let smr = nic.register(&registry, Arc::new(src), Access::LOCAL_READ).context("registering the source")?;
    print!("{}", describe("client (source)", &smr, &[]));

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
        done += conn.wait_send(1)?.len();
    }
    let elapsed = start.elapsed();
    let bytes = remote.len * a.iters as u64;
    let report = format!(
        "{bytes} bytes in {} RDMA WRITEs of {msg} bytes ({depth} in flight) in {:.3} s: {:.1} MiB/s ({:.3} Gb/s)",
        total,
        elapsed.as_secs_f64(),
        mib_s(bytes, elapsed),
        bytes as f64 * 8.0 / 1e9 / elapsed.as_secs_f64().max(1e-9)
    );
    println!("client: {report}");
    conn.send_oob(DONE)?;
    send_text(&mut conn, &report)?;
    Ok(true)
}

fn main() -> ExitCode {
    let run = || -> Result<bool> {
        let a = parse_args()?;
        if a.role == "server" {
            server(&a)
        } else {
            client(&a)
        }
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rdma_to_gpu: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
