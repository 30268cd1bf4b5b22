//! KV-cache blocks between two hosts through the transfer engine. The server holds many
//! fixed-size blocks scattered in GPU memory (a Vulkan buffer); the client asks for a list of
//! them and reads them into its own GPU buffer in one batch (or, with `--op write`, writes its
//! own contents for them into the server's slots), over every rail the fabric allows; the
//! server gets the batch's notification once every byte landed. Every byte is checked: a read by
//! the client, a write by the server, which also checks that nothing outside the written blocks
//! changed.
//!
//! ```text
//! kv_transfer [--op read|write]                 both ends in this process
//! kv_transfer server [--blocks N] [--block-size B] [--port P] [--nics A,B] [--fault exit|unregister]
//! kv_transfer client --host IP [--port P] [--want K] [--op read|write] [--depth D] [--nics A,B]
//!                    [--fault link-down[=NETDEV]] [--timeout SECS] [--json]
//! ```
//! The control channel (metadata and the block table) is TCP on `--port` (default 18650).
//! `--nics` keeps the engine to the RDMA devices named; `--timeout` bounds a batch (default
//! 30 s). The client prints one JSON object: `op`, `bytes`, `verified`, `seconds`, `gbps`,
//! `rails` (each with `nic`, `remote_nic`, `bytes`, `state`), `retries`, `notified`, or `error`.
//!
//! Faults: `client --fault link-down` takes the netdev under the client's last rail down just
//! after the batch is posted (the batch must still complete, its report naming the failed
//! rail); `server --fault exit` ends the server process once the client connected;
//! `server --fault unregister` unregisters its buffer once the client connected (the client's
//! batch fails with the peer's access error and nothing lands after it).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peermem::{PeerMemory, Registry, Topology};
use peermem_engine::{Engine, EngineOptions, Op, RegionId, Request};
use peermem_vulkan::{Device, Placement, Select};
use serde_json::json;

#[derive(Debug, Clone)]
struct Args {
    role: String,
    host: Option<IpAddr>,
    port: u16,
    blocks: u64,
    block: u64,
    want: u64,
    fault: Option<String>,
    json: bool,
    depth: usize,
    op: Op,
    nics: Option<Vec<String>>,
    timeout: Duration,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        role: String::new(),
        host: None,
        port: 18650,
        blocks: 512,
        block: 256 << 10,
        want: 256,
        fault: None,
        json: false,
        depth: EngineOptions::default().depth,
        op: Op::Read,
        nics: None,
        timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "server" | "client" if a.role.is_empty() => a.role = arg,
            "--host" => a.host = Some(val("--host")?.parse().context("--host: an IP address")?),
            "--port" => a.port = val("--port")?.parse().context("--port: a number")?,
            "--blocks" => a.blocks = val("--blocks")?.parse().context("--blocks: a number")?,
            "--block-size" => a.block = val("--block-size")?.parse().context("--block-size: bytes")?,
            "--want" => a.want = val("--want")?.parse().context("--want: a number")?,
            "--fault" => a.fault = Some(val("--fault")?),
            "--json" => a.json = true,
            "--depth" => a.depth = val("--depth")?.parse().context("--depth: a number")?,
            "--op" => {
                a.op = match val("--op")?.as_str() {
                    "read" => Op::Read,
                    "write" => Op::Write,
                    o => bail!("--op: read or write, not {o:?}"),
                }
            }
            "--nics" => a.nics = Some(val("--nics")?.split(',').map(str::to_string).collect()),
            "--timeout" => {
                let secs: u64 = val("--timeout")?.parse().context("--timeout: seconds")?;
                if secs == 0 {
                    bail!("--timeout: at least 1 second");
                }
                a.timeout = Duration::from_secs(secs);
            }
            other => bail!("unknown argument {other:?} (see the example's header)"),
        }
    }
    if a.blocks == 0 || a.block == 0 || a.want == 0 || a.want > a.blocks || a.blocks > MAX_BLOCKS {
        bail!("need 0 < --want <= --blocks <= {MAX_BLOCKS} and --block-size > 0");
    }
    if a.role == "client" && a.host.is_none() {
        bail!("client needs --host IP");
    }
    Ok(a)
}

/// Block `b`'s contents: each 8-byte word a mix of the block and the word's index.
fn pattern(b: u64, len: u64) -> Vec<u8> {
    (0..len.div_ceil(8))
        .flat_map(|k| (b << 40 ^ k).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes())
        .take(len as usize)
        .collect()
}

/// At most this many blocks: `written` must differ from every block's `pattern`.
const MAX_BLOCKS: u64 = 1 << 20;

/// What the client writes for block `b` (`--op write`): unlike any block's first contents.
fn written(b: u64, len: u64) -> Vec<u8> {
    pattern(b + MAX_BLOCKS, len)
}

/// What the server fills a slot that holds no block with.
const FILL: u8 = 0x5a;

/// Where block `b` of `n` lies in a buffer of `2n` block slots: scattered, never adjacent to its
/// neighbour.
fn slot(b: u64, n: u64) -> u64 {
    (b * 7919 + 3) % (2 * n)
}

fn registry() -> Result<Registry> {
    Ok(Registry::new(Arc::new(Topology::discover("/").context("discovering the PCI topology")?)))
}

fn gpu(len: u64) -> Result<Arc<dyn PeerMemory>> {
    let dev = Device::open(Select::Best).context("opening a Vulkan device")?;
    let region = dev.allocate(len, Placement::Mappable).context("allocating the Vulkan buffer")?;
    Ok(Arc::new(region))
}

fn send_msg(s: &mut TcpStream, b: &[u8]) -> Result<()> {
    s.write_all(&(b.len() as u32).to_le_bytes())?;
    s.write_all(b)?;
    Ok(())
}

fn recv_msg(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > 8 << 20 {
        bail!("a control message of {n} bytes");
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Serves one client: its blocks, its metadata, then the batch's notification.
fn server(a: &Args, ready: Option<std::sync::mpsc::Sender<u16>>) -> Result<()> {
    let region = gpu(2 * a.blocks * a.block)?;
    for (s, want) in slots(a.blocks, a.block, &[]) {
        region.write_at(s * a.block, &want).context("filling the blocks")?;
    }
    let engine = engine(a)?;
    let id = engine.register(region.clone()).context("registering the blocks")?;
    for r in engine.routes(id)? {
        eprintln!("server: {r}");
    }
    let listener = TcpListener::bind(("0.0.0.0", if ready.is_some() { 0 } else { a.port }))?;
    eprintln!("server: {} blocks of {} bytes; control on {}", a.blocks, a.block, listener.local_addr()?);
    if let Some(tx) = ready {
        let _ = tx.send(listener.local_addr()?.port());
    }
    let (mut s, peer) = accept(&listener, Duration::from_secs(300))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let table: Vec<u64> = (0..a.blocks).map(|b| slot(b, a.blocks) * a.block).collect();
    let head = json!({"region": id.0, "blocks": a.blocks, "block": a.block, "offsets": table});
    send_msg(&mut s, &engine.metadata()?)?;
    send_msg(&mut s, head.to_string().as_bytes())?;
    eprintln!("server: sent the metadata to {peer}");
    match a.fault.as_deref() {
        Some("exit") => {
            let _ = recv_msg(&mut s);
            std::thread::sleep(Duration::from_millis(30));
            eprintln!("server: exiting mid-batch (--fault exit)");
            std::process::exit(0);
        }
        Some("unregister") => {
            let _ = recv_msg(&mut s);
            std::thread::sleep(Duration::from_millis(30));
            engine.unregister(id).context("unregistering")?;
            eprintln!("server: unregistered the blocks mid-batch (--fault unregister)");
            let _ = recv_msg(&mut s);
            return Ok(());
        }
        _ => {}
    }
    let notes = engine.notifications(Duration::from_secs(120))?;
    let Some(n) = notes.first() else { bail!("no notification within 120 s") };
    eprintln!("server: notified by {}: {}", n.from, String::from_utf8_lossy(&n.message));
    // "posted", then what the client did.
    let _ = recv_msg(&mut s)?;
    let done: serde_json::Value = serde_json::from_slice(&recv_msg(&mut s)?).context("the client's done message")?;
    if done["op"] == "write" {
        let wrote: Vec<u64> = done["blocks"].as_array().context("blocks")?.iter().filter_map(|v| v.as_u64()).collect();
        let check = check_written(&*region, a, &wrote)?;
        eprintln!("server: checked the written blocks: {check}");
        send_msg(&mut s, check.to_string().as_bytes())?;
    }
    Ok(())
}

/// Every slot of the server's buffer and what it holds: block `b`'s `pattern`, or `written(b)`
/// for the blocks in `wrote`, or `FILL` where no block lies.
fn slots(blocks: u64, block: u64, wrote: &[u64]) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
    let mut of = vec![None; 2 * blocks as usize];
    for b in 0..blocks {
        of[slot(b, blocks) as usize] = Some(b);
    }
    of.into_iter().enumerate().map(move |(s, b)| {
        let bytes = match b {
            Some(b) if wrote.contains(&b) => written(b, block),
            Some(b) => pattern(b, block),
            None => vec![FILL; block as usize],
        };
        (s as u64, bytes)
    })
}

/// After a write batch: the bytes of the written blocks that hold what the client wrote, and
/// whether every other byte of the buffer is as it was.
fn check_written(region: &dyn PeerMemory, a: &Args, wrote: &[u64]) -> Result<serde_json::Value> {
    let (mut verified, mut untouched) = (0u64, true);
    let mut buf = vec![0u8; a.block as usize];
    for (s, want) in slots(a.blocks, a.block, wrote) {
        region.read_at(s * a.block, &mut buf)?;
        let is_written = wrote.iter().any(|&b| slot(b, a.blocks) == s);
        match (buf == want, is_written) {
            (true, true) => verified += a.block,
            (false, false) => untouched = false,
            _ => {}
        }
    }
    Ok(json!({"verified_bytes": verified, "untouched": untouched}))
}

fn engine(a: &Args) -> Result<Engine> {
    let options =
        EngineOptions { depth: a.depth, timeout: a.timeout, nics: a.nics.clone(), ..EngineOptions::default() };
    Engine::new(registry()?, options).context("starting the engine")
}

/// The first client within `wait`.
fn accept(listener: &TcpListener, wait: Duration) -> Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).context("waiting for a client"),
        }
    }
}

/// The netdev under RDMA device `nic` (rxe, or a RoCE function), from sysfs.
fn netdev_of(nic: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/infiniband/{nic}/ports/1/gid_attrs/ndevs/0"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Asks for `want` blocks and reads them in one batch; returns the JSON report.
fn client(a: &Args, host: IpAddr, port: u16) -> Result<serde_json::Value> {
    // The server may still be starting (Vulkan, filling its blocks): retry for five minutes.
    let addr = SocketAddr::new(host, port);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(e).context("connecting to the server's control port"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let meta = recv_msg(&mut s)?;
    let head: serde_json::Value = serde_json::from_slice(&recv_msg(&mut s)?)?;
    let (remote, blocks, block) = (
        RegionId(head["region"].as_u64().context("region")? as u32),
        head["blocks"].as_u64().context("blocks")?,
        head["block"].as_u64().context("block")?,
    );
    let offsets: Vec<u64> = head["offsets"].as_array().context("offsets")?.iter().filter_map(|v| v.as_u64()).collect();
    // Every other block when there are enough, else consecutive ones: never a block twice.
    let step = if 2 * a.want <= blocks { 2 } else { 1 };
    let want: Vec<u64> = (0..a.want.min(blocks)).map(|k| (k * step + 1) % blocks).collect();
    let region = gpu(want.len() as u64 * block)?;
    if a.op == Op::Write {
        for (j, &b) in want.iter().enumerate() {
            region.write_at(j as u64 * block, &written(b, block)).context("filling the blocks to write")?;
        }
    }
    let engine = engine(a)?;
    let local = engine.register(region.clone())?;
    let peer = engine.connect(&meta).context("connecting to the server's NICs")?;
    let batch: Vec<Request> = want
        .iter()
        .enumerate()
        .map(|(j, &b)| Request {
            op: a.op,
            local,
            local_offset: j as u64 * block,
            remote,
            remote_offset: offsets[b as usize],
            len: block,
        })
        .collect();
    let down = fault_netdev(a, &engine, peer)?;
    let start = Instant::now();
    let note = format!("kv_transfer: {} blocks {}", want.len(), if a.op == Op::Read { "read" } else { "written" });
    let ticket = engine.post(peer, &batch, Some(note.as_bytes()))?;
    send_msg(&mut s, b"posted")?;
    // The link goes down while this thread waits on the batch.
    let cut = down.map(|dev| std::thread::spawn(move || link_down(&dev)));
    let result = ticket.wait();
    let fault = match cut.map(|h| h.join()) {
        Some(Ok(Ok(dev))) => Some(dev),
        Some(Ok(Err(e))) => return Err(e),
        Some(Err(_)) => bail!("the fault thread panicked"),
        None => None,
    };
    let seconds = start.elapsed().as_secs_f64();
    if let Some(f) = &fault {
        let _ = std::process::Command::new("ip").args(["link", "set", f, "up"]).status();
    }
    let op = if a.op == Op::Read { "read" } else { "write" };
    let _ = send_msg(&mut s, json!({"op": op, "blocks": want}).to_string().as_bytes());
    let report = match result {
        Ok(r) => r,
        Err(e) => return Ok(json!({"op": op, "error": e.to_string(), "seconds": seconds, "fault": fault})),
    };
    let (verified, untouched) = if a.op == Op::Read {
        let mut verified = 0u64;
        let mut buf = vec![0u8; block as usize];
        for (j, &b) in want.iter().enumerate() {
            region.read_at(j as u64 * block, &mut buf)?;
            if buf == pattern(b, block) {
                verified += block;
            }
        }
        (verified, true)
    } else {
        let check: serde_json::Value = serde_json::from_slice(&recv_msg(&mut s)?).context("the server's check")?;
        (check["verified_bytes"].as_u64().unwrap_or(0), check["untouched"] == json!(true))
    };
    Ok(json!({
        "op": op, "bytes": report.bytes, "verified": verified == report.bytes && untouched,
        "verified_bytes": verified, "untouched": untouched,
        "seconds": seconds, "gbps": report.bytes as f64 * 8.0 / seconds / 1e9,
        "rails": report.rails, "retries": report.retries, "notified": report.notified,
        "routes": report.routes, "fault": fault,
    }))
}

/// `--fault link-down[=NETDEV]`: the netdev to take down (the last rail's, or the one named).
fn fault_netdev(a: &Args, engine: &Engine, peer: peermem_engine::PeerId) -> Result<Option<String>> {
    let Some(f) = a.fault.as_deref() else { return Ok(None) };
    let Some(rest) = f.strip_prefix("link-down") else { bail!("unknown client fault {f:?}") };
    let dev = match rest.strip_prefix('=') {
        Some(d) => d.to_string(),
        None => {
            let rails = engine.rails(peer)?;
            let nic = rails.last().context("no rail")?.nic.clone();
            netdev_of(&nic).with_context(|| format!("no netdev under {nic}"))?
        }
    };
    Ok(Some(dev))
}

fn link_down(dev: &str) -> Result<String> {
    let ok = std::process::Command::new("ip").args(["link", "set", dev, "down"]).status()?.success();
    if !ok {
        bail!("ip link set {dev} down failed");
    }
    eprintln!("client: took {dev} down mid-batch");
    Ok(dev.to_string())
}

fn run() -> Result<bool> {
    let a = parse()?;
    let out = match a.role.as_str() {
        "server" => return server(&a, None).map(|_| true),
        "client" => client(&a, a.host.context("--host")?, a.port)?,
        _ => {
            let (tx, rx) = std::sync::mpsc::channel();
            let sa = a.clone();
            let srv = std::thread::spawn(move || server(&sa, Some(tx)));
            let port = rx.recv_timeout(Duration::from_secs(120)).context("the server did not start")?;
            let out = client(&a, IpAddr::from([127, 0, 0, 1]), port)?;
            srv.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
            out
        }
    };
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(out["verified"] == json!(true))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kv_transfer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
