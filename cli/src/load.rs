//! `peermem load FILE... --dest host|vulkan|vulkan-device|p2pmem:BDF|bar:BDF:N`: the loader from
//! the shell (what `gdsio` is for GPUDirect Storage). Prints the route, how the bytes moved, why,
//! and MB/s; `--json` prints one object. A thin layer over `peermem-loader`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use peermem::{BarRegion, Bdf, HostRegion, PeerMemory, Registration, Registry, Topology};
use peermem_loader::options::parse_size;
use peermem_loader::{Batch, BatchReport, Dest, FileHandle, LoadError, Loader, Options, Verify};
use peermem_vulkan::{Device, Placement, Select};
use serde_json::json;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Files or block devices to read (each range lands after the previous one).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// host | vulkan | vulkan-device | p2pmem:BDF | bar:BDF:N
    #[arg(long, default_value = "host")]
    dest: String,
    /// Byte offset into each file (K/M/G suffixes allowed).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Bytes to read from each file (default: to its end).
    #[arg(long, value_parser = parse_size)]
    len: Option<u64>,
    /// Bytes per request (default: PEERMEM_CHUNK or the measured default).
    #[arg(long, value_parser = parse_size)]
    chunk: Option<u64>,
    /// Requests in flight (default: PEERMEM_DEPTH or the measured default).
    #[arg(long)]
    depth: Option<usize>,
    /// Fail unless every byte goes direct.
    #[arg(long)]
    strict: bool,
    /// Check the destination against a second read of the source (xxh3).
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    json: bool,
}

/// Errors the user caused (exit 2) rather than the machine.
fn bad_input(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<BadInput>().is_some()
            || matches!(
                c.downcast_ref::<LoadError>(),
                Some(
                    LoadError::BadRange { .. }
                        | LoadError::TooSmall { .. }
                        | LoadError::NotAFile { .. }
                        | LoadError::BadSetting { .. }
                        | LoadError::Layout(_)
                )
            )
            || matches!(c.downcast_ref::<LoadError>(), Some(LoadError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound)
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// Runs the subcommand. A failure is one line on stderr (each cause once) and exit 2 for bad
/// input, 1 otherwise.
pub fn run(root: &Path, args: LoadArgs) -> Result<()> {
    match load(root, args) {
        Err(e) => {
            let mut line = String::new();
            for c in e.chain() {
                let t = c.to_string().replace('\n', " ");
                if !line.contains(&t) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&t);
                }
            }
            eprintln!("peermem: {line}");
            std::process::exit(if bad_input(&e) { 2 } else { 1 });
        }
        Ok(()) => Ok(()),
    }
}

enum DestKind {
    Host,
    Vulkan(Placement),
    P2pmem(Bdf),
    Bar(Bdf, u8),
}

fn parse_dest(s: &str) -> Result<DestKind> {
    let bdf = |b: &str| b.parse::<Bdf>().map_err(|e| BadInput(format!("--dest {s}: {e}")));
    Ok(match s.split_once(':') {
        None if s == "host" => DestKind::Host,
        None if s == "vulkan" => DestKind::Vulkan(Placement::Mappable),
        None if s == "vulkan-device" => DestKind::Vulkan(Placement::DeviceLocal),
        Some(("p2pmem", b)) => DestKind::P2pmem(bdf(b)?),
        Some(("bar", rest)) => {
            let (b, n) = rest
                .rsplit_once(':')
                .ok_or_else(|| BadInput(format!("--dest {s}: expected bar:BDF:N (N = BAR number 0-5)")))?;
            let n: u8 = n
                .parse()
                .ok()
                .filter(|n| *n <= 5)
                .ok_or_else(|| BadInput(format!("--dest {s}: BAR {n:?} is not 0-5")))?;
            DestKind::Bar(bdf(b)?, n)
        }
        _ => {
            return Err(BadInput(format!(
                "--dest {s:?}: expected host, vulkan, vulkan-device, p2pmem:BDF or bar:BDF:N"
            ))
            .into())
        }
    })
}

/// The `--dest` parser on parsed arguments (for the argument fuzzer): a value or a typed error.
#[cfg(any(test, feature = "afl"))]
pub(crate) fn fuzz_dest(args: &LoadArgs) {
    let _ = parse_dest(&args.dest);
}

/// Seconds of CPU time this process used (user + system), from /proc/self/stat (USER_HZ = 100).
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn load(root: &Path, a: LoadArgs) -> Result<()> {
    let kind = parse_dest(&a.dest)?;
    let mut opts = Options::from_env()?;
    if let Some(c) = a.chunk {
        opts.chunk = c;
    }
    if let Some(d) = a.depth {
        opts.depth = d;
    }
    opts.strict |= a.strict;
    if a.verify {
        opts.verify = Verify::Reread;
    }
    opts.check()?;
    let topo = Arc::new(Topology::discover(root).map_err(|e| anyhow!("{e}"))?);
    let reg = Registry::new(topo.clone());
    let loader = Loader::new(&reg, opts.clone())?;

    // The ranges, each placed at a 4096-byte boundary of the destination.
    let mut ranges: Vec<(FileHandle, u64, u64, u64)> = Vec::new();
    let mut total = 0u64;
    for p in &a.files {
        let f = loader.open(p)?;
        if a.offset >= f.len() {
            bail!(LoadError::BadRange {
                start: a.offset,
                end: a.offset.saturating_add(a.len.unwrap_or(0)),
                len: f.len()
            });
        }
        let len = a.len.unwrap_or(f.len() - a.offset);
        if len == 0 || a.offset.checked_add(len).is_none_or(|e| e > f.len()) {
            bail!(LoadError::BadRange { start: a.offset, end: a.offset.saturating_add(len), len: f.len() });
        }
        let at = total.div_ceil(4096) * 4096;
        total = at + len;
        ranges.push((f, a.offset, len, at));
    }

    // The destination, registered.
    let vk;
    let (region, guard, dest, dest_name): (Arc<dyn PeerMemory>, Registration, Dest, String) = match kind {
        DestKind::Host => {
            let r: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(total)?);
            let g = reg.register(r.clone())?;
            let d = Dest::region(&g);
            (r, g, d, "host memory".into())
        }
        DestKind::Vulkan(p) => {
            vk = Device::open(Select::Best).context("opening a Vulkan device")?;
            let v = Arc::new(vk.allocate(total, p)?);
            let r: Arc<dyn PeerMemory> = v.clone();
            let g = reg.register(r.clone())?;
            let (d, what) = match p {
                Placement::Mappable => (Dest::region(&g), "host-visible"),
                Placement::DeviceLocal => (loader.vulkan_device_dest(&g, &vk, v)?, "device-local"),
            };
            (r, g, d, format!("{what} Vulkan buffer on {}", vk.info().name))
        }
        DestKind::P2pmem(b) => {
            let r: Arc<dyn PeerMemory> = Arc::new(peermem_nvme::P2pmemRegion::allocate(&topo, b, total)?);
            let g = reg.register(r.clone())?;
            let d = Dest::region(&g);
            (r, g, d, format!("p2pmem of {b}"))
        }
        DestKind::Bar(b, n) => {
            let r: Arc<dyn PeerMemory> = Arc::new(BarRegion { bdf: b, bar: n, offset: 0, len: total });
            let g = reg.register(r.clone())?;
            let d = Dest::region(&g);
            (r, g, d, format!("BAR{n} of {b}"))
        }
    };

    // Batches of at least 64 MiB, two in flight, so a progress line can follow long loads.
    let piece = opts.chunk.saturating_mul(opts.depth as u64).max(64 << 20);
    let mut batches = Vec::new();
    for (f, off, len, at) in &ranges {
        let mut o = 0;
        while o < *len {
            let n = piece.min(len - o);
            let mut b = Batch::new();
            b.read(f, off + o, n, &dest, at + o);
            batches.push(b);
            o += n;
        }
    }
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal() && !a.json;
    let mut reports: Vec<BatchReport> = Vec::new();
    let mut inflight = std::collections::VecDeque::new();
    let mut done = 0u64;
    let mut it = batches.into_iter();
    let mut shown = false;
    loop {
        while inflight.len() < 2 {
            let Some(b) = it.next() else { break };
            inflight.push_back(loader.submit(b)?);
        }
        let Some(t) = inflight.pop_front() else { break };
        let r = t.wait()?;
        done += r.bytes;
        reports.push(r);
        let el = t0.elapsed().as_secs_f64();
        if tty && el > 1.0 {
            eprint!(
                "\r{:>6.1}% {:>10} of {} bytes  {:.1} MB/s   ",
                100.0 * done as f64 / total as f64,
                done,
                total,
                done as f64 / el / 1e6
            );
            shown = true;
        }
    }
    if shown {
        eprintln!();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    drop(guard);
    drop(region);
    let first = reports.first().ok_or_else(|| anyhow!("nothing was loaded"))?;
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let d0 = &first.dests[0];
    let direct = reports.iter().all(|r| r.all_direct());
    let mut fallbacks: Vec<String> = reports.iter().flat_map(|r| r.fallbacks.clone()).collect();
    fallbacks.dedup();
    let verified = if reports.iter().all(|r| r.verified == Some(true)) {
        Some(true)
    } else if opts.verify == Verify::Reread {
        Some(false)
    } else {
        None
    };
    let mb_per_s = bytes as f64 / seconds.max(1e-9) / 1e6;
    let cpu_per_gib = cpu.map(|c| c / (bytes as f64 / (1u64 << 30) as f64));
    let out = json!({
        "files": a.files,
        "dest": dest_name,
        "bytes": bytes,
        "seconds": seconds,
        "mb_per_s": mb_per_s,
        "route": d0.route,
        "method": d0.via.name(),
        "how": d0.method,
        "direct": direct,
        "engine": first.engine,
        "reasons": d0.reasons,
        "fallbacks": fallbacks,
        "verified": verified,
        "cpu_seconds": cpu,
        "cpu_seconds_per_gib": cpu_per_gib,
        "chunk": opts.chunk,
        "depth": opts.depth,
    });
    let mut o = std::io::stdout().lock();
    let w = if a.json {
        writeln!(o, "{}", serde_json::to_string_pretty(&out)?)
    } else {
        (|| {
            writeln!(o, "dest:    {dest_name}")?;
            writeln!(o, "route:   {}", d0.route)?;
            writeln!(o, "method:  {} ({})", d0.via.name(), d0.method)?;
            writeln!(o, "engine:  {}", first.engine)?;
            for r in &d0.reasons {
                writeln!(o, "why:     {r}")?;
            }
            for f in &fallbacks {
                writeln!(o, "fallback: {f}")?;
            }
            let v = match verified {
                Some(true) => "verified (xxh3 of a second read)",
                Some(false) => "NOT verified",
                None => "not verified",
            };
            writeln!(o, "moved:   {bytes} bytes in {seconds:.3} s = {mb_per_s:.1} MB/s, {v}")?;
            if let Some(c) = cpu_per_gib {
                writeln!(o, "cpu:     {c:.3} s per GiB")?;
            }
            Ok(())
        })()
    };
    match w {
        // A closed pipe (`| head`) is the reader's choice, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
