//! `peermem load FILE... --dest host|vulkan|vulkan-device|cuda[:N]|p2pmem:BDF|bar:BDF:N`: the
//! loader from the shell (what `gdsio` is for GPUDirect Storage). Prints the route, how each file
//! was read (O_DIRECT or through the page cache, and why), how the bytes moved (into CUDA memory:
//! through cuFile or pinned staging, and why), why, and MB/s; `--json` prints one object. A thin
//! layer over `peermem-loader`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use peermem::{BarRegion, Bdf, HostRegion, PeerMemory, Registration, Registry, Topology};
use peermem_loader::options::parse_size;
use peermem_loader::{Batch, Dest, IoMode, LoadError, Loader, Options, Report, Source, Verify};
use peermem_vulkan::{Device, Placement, Select};
use serde_json::json;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Files or block devices to read (each range lands after the previous one).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// host | vulkan | vulkan-device | cuda[:N] | p2pmem:BDF | bar:BDF:N
    #[arg(long, default_value = "host")]
    dest: String,
    /// Byte offset into each file (K/M/G suffixes allowed).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Bytes to read from each file (default: to its end).
    #[arg(long, value_parser = parse_size)]
    len: Option<u64>,
    /// Bytes per request (default: PEERMEM_CHUNK or the loader's default).
    #[arg(long, value_parser = parse_size)]
    chunk: Option<u64>,
    /// Requests in flight (default: PEERMEM_DEPTH or the loader's default).
    #[arg(long)]
    depth: Option<usize>,
    /// How files are read: auto (judged from the page cache and memory), direct (O_DIRECT) or
    /// buffered (through the page cache). Default: PEERMEM_IO or auto.
    #[arg(long, value_name = "auto|direct|buffered")]
    io: Option<IoMode>,
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
    Cuda(usize),
    P2pmem(Bdf),
    Bar(Bdf, u8),
}

fn parse_dest(s: &str) -> Result<DestKind> {
    let bdf = |b: &str| b.parse::<Bdf>().map_err(|e| BadInput(format!("--dest {s}: {e}")));
    Ok(match s.split_once(':') {
        None if s == "host" => DestKind::Host,
        None if s == "vulkan" => DestKind::Vulkan(Placement::Mappable),
        None if s == "vulkan-device" => DestKind::Vulkan(Placement::DeviceLocal),
        None if s == "cuda" => DestKind::Cuda(0),
        Some(("cuda", n)) => {
            DestKind::Cuda(n.parse().map_err(|_| BadInput(format!("--dest {s}: {n:?} is not a CUDA device ordinal")))?)
        }
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
                "--dest {s:?}: expected host, vulkan, vulkan-device, cuda[:N], p2pmem:BDF or bar:BDF:N"
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

/// The loader's options: `PEERMEM_*` first, then the command line.
fn options(a: &LoadArgs) -> Result<Options> {
    let mut opts = Options::from_env()?;
    if let Some(c) = a.chunk {
        opts.chunk = c;
    }
    if let Some(d) = a.depth {
        opts.depth = d;
    }
    if let Some(io) = a.io {
        opts.io = io;
    }
    opts.strict |= a.strict;
    if a.verify {
        opts.verify = Verify::Reread;
    }
    opts.check()?;
    Ok(opts)
}

/// One range to read: (source, offset, length, destination offset).
type Range = (Source, u64, u64, u64);

/// The ranges to read, each placed at a 4096-byte boundary of the destination, and the bytes
/// the destination needs.
fn ranges(loader: &Loader, a: &LoadArgs) -> Result<(Vec<Range>, u64)> {
    let mut ranges = Vec::new();
    let mut total = 0u64;
    // One data set: Auto judges the files together against memory.
    for f in loader.open_stream(&a.files)? {
        let len = a.len.unwrap_or(f.len().saturating_sub(a.offset));
        if a.offset >= f.len() || len == 0 || a.offset.checked_add(len).is_none_or(|e| e > f.len()) {
            bail!(LoadError::BadRange { start: a.offset, end: a.offset.saturating_add(len), len: f.len() });
        }
        let at = total.div_ceil(4096) * 4096;
        total = at + len;
        ranges.push((f, a.offset, len, at));
    }
    Ok((ranges, total))
}

/// A registered destination of `len` bytes and what holds it.
struct Target {
    region: Arc<dyn PeerMemory>,
    guard: Registration,
    dest: Dest,
    name: String,
    _vk: Option<Device>,
}

/// `len` bytes of CUDA memory on device `ordinal`, as a destination the loader fills through
/// cuFile or pinned staging.
fn cuda_target(ordinal: usize, len: u64, reg: &Registry, loader: &Loader) -> Result<Target> {
    let dev = peermem_cuda::Cuda::open(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
    let c = Arc::new(dev.allocate(len)?);
    let region: Arc<dyn PeerMemory> = c.clone();
    let guard = reg.register(region.clone())?;
    let dest = loader.cuda_dest(&guard, &dev, c)?;
    let name = format!("CUDA memory of device {ordinal} ({}, PCI {})", dev.info().name, dev.info().pci_text);
    Ok(Target { region, guard, dest, name, _vk: None })
}

fn target(kind: DestKind, len: u64, reg: &Registry, loader: &Loader) -> Result<Target> {
    let plain = |region: Arc<dyn PeerMemory>, name: String| -> Result<Target> {
        let guard = reg.register(region.clone())?;
        Ok(Target { region, dest: Dest::region(&guard), guard, name, _vk: None })
    };
    match kind {
        DestKind::Host => plain(Arc::new(HostRegion::anonymous(len)?), "host memory".into()),
        DestKind::Vulkan(p) => {
            let vk = Device::open(Select::Best).context("opening a Vulkan device")?;
            let v = Arc::new(vk.allocate(len, p)?);
            let region: Arc<dyn PeerMemory> = v.clone();
            let guard = reg.register(region.clone())?;
            let (dest, what) = match p {
                Placement::Mappable => (Dest::region(&guard), "host-visible"),
                Placement::DeviceLocal => (loader.vulkan_device_dest(&guard, &vk, v)?, "device-local"),
            };
            let name = format!("{what} Vulkan buffer on {}", vk.info().name);
            Ok(Target { region, guard, dest, name, _vk: Some(vk) })
        }
        DestKind::Cuda(n) => cuda_target(n, len, reg, loader),
        DestKind::P2pmem(b) => {
            let r = peermem_nvme::P2pmemRegion::allocate(reg.topology(), b, len)?;
            plain(Arc::new(r), format!("p2pmem of {b}"))
        }
        DestKind::Bar(b, n) => plain(Arc::new(BarRegion { bdf: b, bar: n, offset: 0, len }), format!("BAR{n} of {b}")),
    }
}

fn load(root: &Path, a: LoadArgs) -> Result<()> {
    let kind = parse_dest(&a.dest)?;
    let opts = options(&a)?;
    let topo = Arc::new(Topology::discover(root).map_err(|e| anyhow!("{e}"))?);
    let reg = Registry::new(topo);
    let loader = Loader::new(&reg, opts.clone())?;
    let (ranges, total) = ranges(&loader, &a)?;
    let t = target(kind, total, &reg, &loader)?;

    // One batch; a progress line follows long loads.
    let mut batch = Batch::new();
    for (f, off, len, at) in &ranges {
        batch.read(f, *off, *len, &t.dest, *at);
    }
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal() && !a.json;
    let start = loader.moved();
    let mut shown = false;
    let report = loader.submit(batch)?.wait_reporting(Duration::from_millis(250), |moved| {
        let (done, el) = (moved - start, t0.elapsed().as_secs_f64());
        if tty && el > 1.0 {
            let pct = 100.0 * done as f64 / total as f64;
            eprint!("\r{pct:>6.1}% {done:>10} of {total} bytes  {:.1} MB/s   ", done as f64 / el / 1e6);
            shown = true;
        }
    })?;
    if shown {
        eprintln!();
    }
    let cpu = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let Target { region, guard, name, .. } = t;
    drop((guard, region));
    print(&a, &opts, &name, &report, cpu)
}

/// The report, as text or one JSON object; a closed pipe (`| head`) is the reader's choice.
fn print(a: &LoadArgs, opts: &Options, dest_name: &str, report: &Report, cpu: Option<f64>) -> Result<()> {
    let cpu_per_gib = cpu.map(|c| c / (report.bytes as f64 / (1u64 << 30) as f64));
    let out = json!({
        "files": a.files,
        "dest": dest_name,
        "bytes": report.bytes,
        "seconds": report.seconds,
        "mb_per_s": report.mb_per_s(),
        "route": report.route(),
        "method": report.via(),
        "direct": report.direct(),
        "engine": report.engine,
        "requests": report.requests,
        "io": report.io,
        "reasons": report.reasons(),
        // Into CUDA memory: whether cuFile (GPUDirect Storage) read it, and why (not).
        "cufile": report.dests.first().and_then(|d| d.reasons.iter().find(|r| r.starts_with("cufile: taken")
            || r.starts_with("cufile: not taken"))),
        "dests": report.dests.iter().map(|d| json!({
            "region": d.region.to_string(),
            "source": d.source,
            "io": d.io,
            "route": d.route_name(),
            "method": d.via.name(),
            "how": d.method,
            "reasons": d.reasons,
            "bytes_direct": d.bytes_direct,
            "bytes_staged": d.bytes_staged,
        })).collect::<Vec<_>>(),
        "fallbacks": report.fallbacks,
        "verified": report.verified,
        "checksums": report.checksums,
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
            writeln!(o, "dest:       {dest_name}")?;
            writeln!(o, "{report}")?;
            if let Some(c) = cpu_per_gib {
                writeln!(o, "cpu:        {c:.3} s per GiB")?;
            }
            Ok(())
        })()
    };
    match w {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
