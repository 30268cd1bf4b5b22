//! `peermem`: topology, per-pair P2P verdicts, routes, checks, fixes, probes and sysroot captures
//! from the command line. A thin layer: every answer comes from the `peermem` crate; these files
//! only parse arguments and print.
//!
//! Exit status: 0 answered (for `check`: every pair direct), 1 `check` found a pair that is not
//! direct (or `probe` found the route broken or refused), 2 bad input (one line on stderr). A
//! closed output pipe (`peermem topo | head -1`) ends the command quietly.

// The AFL++ driver (feature `afl`) replaces `main`: the command's code is then unused.
#![cfg_attr(feature = "afl", allow(dead_code, unused_imports))]

mod engines;
mod gate;
mod nccl;
mod nics;
mod out;
mod pairs;
mod probe;
mod topo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use peermem::pci::topology::BarKind;
use peermem::pci::{Labels, Selection};
use peermem::{BarRegion, Bdf, DevIdx, PeerMemory, Registry, Topology};
use serde_json::{json, Value};

mod load;
use out::Out;

#[derive(Parser)]
#[command(name = "peermem", version, about = "PCIe peer-to-peer memory: topology, verdicts, routes, checks and fixes")]
struct Cli {
    /// Read sysfs/procfs from this root instead of /: a `peermem capture` directory, or a capture
    /// archive (.tar, .tar.gz, .tar.bz2, .tar.xz) whose single top directory is one.
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Default)]
struct Filter {
    /// List every PCI function, bridges included.
    #[arg(long)]
    all: bool,
    /// Only these endpoint classes: gpu, nic, nvme, storage, acc (repeat or comma-separate).
    #[arg(long = "class", value_name = "CLASS")]
    class: Vec<String>,
}

impl Filter {
    fn selection(&self) -> Result<Selection> {
        if self.all {
            return Ok(Selection::All);
        }
        Selection::parse(&self.class).map_err(|e| anyhow!("--class: {e}"))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Matrix of path labels between endpoints, like `nvidia-smi topo -m`.
    Topo {
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// The kernel's P2P verdict for one (provider, client) pair, explained. Either side may be a
    /// PCI address, a label (NVME0), or a file or block device (the function that serves it).
    Why {
        provider: String,
        client: String,
        #[arg(long)]
        json: bool,
    },
    /// What CLIENT must program to reach byte OFFSET of PROVIDER's memory BAR.
    Route {
        provider: Bdf,
        /// BAR number, 0-5.
        bar: u8,
        /// Byte offset into the BAR, decimal or 0x-hex.
        #[arg(value_parser = parse_offset)]
        offset: u64,
        client: Bdf,
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when every named pair (default: every pair of the listed endpoints) is direct, 1 if
    /// not, 2 on bad input: a node-health gate. One line per pair.
    Check {
        /// Also accept pairs that go through an allowed host bridge (thru_host_bridge).
        #[arg(long, conflicts_with = "gpu_nic")]
        allow_host_bridge: bool,
        /// Gate GPU-NIC pairs instead: exit 1 when a GPU (every GPU, or the GPUs named) has no
        /// RDMA NIC that reaches its memory directly, naming the pair and the fix.
        #[arg(long)]
        gpu_nic: bool,
        /// With --gpu-nic: one JSON object.
        #[arg(long, requires = "gpu_nic")]
        json: bool,
        #[command(flatten)]
        filter: Filter,
        /// PROVIDER CLIENT [PROVIDER CLIENT]... (with --gpu-nic: GPUs)
        pairs: Vec<String>,
    },
    /// The smallest change that makes the named pairs (default: all listed endpoints) direct.
    Fix {
        #[command(flatten)]
        filter: Filter,
        /// PROVIDER CLIENT [PROVIDER CLIENT]...
        pairs: Vec<String>,
    },
    /// Prove the route on the live system (root): a canary through the kernel P2PDMA path,
    /// PROVIDER's p2pmem <-> CLIENT's NVMe namespace, both directions.
    Probe {
        provider: String,
        client: String,
        /// Canary bytes per direction.
        #[arg(long, default_value = "65536", value_parser = parse_offset)]
        len: u64,
        /// Byte offset of the scratch range on CLIENT's namespace (default: its last MiB); its
        /// content is read first and written back afterwards.
        #[arg(long, value_parser = parse_offset)]
        offset: Option<u64>,
    },
    /// Every RDMA NIC ranked for each GPU's memory (or each DEVICE: label, PCI address, file,
    /// or numa:N), best first, with the reasons: what the transfer engine's rails start from.
    Nics {
        #[arg(value_name = "DEVICE")]
        devices: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Export the topology for other tools: NCCL's topology file, UCX's device list, Mooncake's
    /// topology matrix.
    #[command(group(clap::ArgGroup::new("format").args(["nccl_xml", "ucx", "mooncake_topo"])))]
    Export {
        /// Write the XML NCCL reads from NCCL_TOPO_FILE ("-" for stdout).
        #[arg(long, value_name = "FILE")]
        nccl_xml: Option<PathBuf>,
        /// For a file used inside a VM: a host PCI address (or RDMA device name) and the guest's
        /// (repeatable). NCCL finds its GPUs and NICs by bus id and its nets by name.
        #[arg(long = "map", value_name = "HOST=GUEST")]
        map: Vec<String>,
        /// HOST=GUEST (or HOST GUEST) entries, one a line; `#` starts a comment.
        #[arg(long, value_name = "FILE")]
        map_file: Option<PathBuf>,
        /// Print LABEL_UCX_NET_DEVICES=mlx5_0:1,... for each GPU (or each DEVICE named): the NICs
        /// that reach its memory best, ties together.
        #[arg(long)]
        ucx: bool,
        /// With --ucx: the devices to answer for (label, PCI address, file, or numa:N); default
        /// every GPU.
        #[arg(value_name = "DEVICE")]
        devices: Vec<String>,
        /// With --ucx: one JSON object.
        #[arg(long)]
        json: bool,
        /// Write the topology JSON Mooncake's transfer engine reads from MC_CUSTOM_TOPO_JSON
        /// ("-" for stdout).
        #[arg(long, value_name = "FILE")]
        mooncake_topo: Option<PathBuf>,
    },
    /// Copy the files peermem reads from the root into DIR, or into one archive (attach it to a
    /// bug report; replay it with --root).
    Capture {
        dir: Option<PathBuf>,
        /// Write a .tar, .tar.gz, .tar.bz2 or .tar.xz archive instead of a directory.
        #[arg(long, value_name = "FILE", conflicts_with = "dir")]
        archive: Option<PathBuf>,
    },
    /// Read files into host, Vulkan, p2pmem or BAR memory through the loader; report route and MB/s.
    Load(load::LoadArgs),
}

fn parse_offset(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    };
    r.map_err(|_| format!("{s:?} is not a decimal or 0x-hex number"))
}

/// Fuzz harness for the argument parser: `data` is the arguments, NUL-separated. Every input is
/// parsed (or refused with a clap error) without a panic; parsed `--class` and `load --dest`
/// values go through their own parsers too. Run by the AFL++ driver (`main` with the `afl` feature) and replayed
/// from `fuzz/corpus/cli_args` by this crate's tests.
#[cfg(any(test, feature = "afl"))]
pub(crate) fn fuzz_args(data: &[u8]) {
    let args = std::iter::once(std::ffi::OsString::from("peermem")).chain(
        data.split(|&b| b == 0)
            .map(|a| <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a).to_os_string()),
    );
    let Ok(cli) = Cli::try_parse_from(args) else { return };
    match cli.cmd {
        Cmd::Topo { filter, .. } | Cmd::Check { filter, .. } | Cmd::Fix { filter, .. } => {
            let _ = filter.selection();
        }
        Cmd::Route { offset, .. } => {
            let _ = parse_offset(&format!("{offset:#x}"));
        }
        Cmd::Load(args) => load::fuzz_dest(&args),
        _ => {}
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// The sysroot to read: the directory, or a capture archive unpacked into a temporary one.
struct Root {
    path: PathBuf,
    _unpacked: Option<tempfile::TempDir>,
}

impl Root {
    fn open(p: &Path) -> Result<Root> {
        let meta = std::fs::metadata(p).map_err(|e| anyhow!("--root {}: {e}", p.display()))?;
        if meta.is_dir() {
            return Ok(Root { path: p.to_path_buf(), _unpacked: None });
        }
        let tmp = tempfile::Builder::new().prefix("peermem-root-").tempdir().context("temporary directory")?;
        let path = peermem::archive::unpack(p, tmp.path()).map_err(|e| anyhow!("--root {e}"))?;
        Ok(Root { path, _unpacked: Some(tmp) })
    }

    fn discover(&self) -> Result<Topology> {
        Topology::discover(&self.path).map_err(|e| anyhow!("{e}"))
    }

    fn is_live(&self) -> bool {
        self.path == Path::new("/")
    }
}

/// Built with the `afl` feature, the binary is the AFL++ driver of the argument parser.
#[cfg(feature = "afl")]
fn main() {
    afl::fuzz_nohook!(|data: &[u8]| fuzz_args(data));
}

#[cfg(not(feature = "afl"))]
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PEERMEM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version: printed quietly even into a closed pipe.
            let mut o = Out::new();
            o.line(e.render().to_string().trim_end());
            o.flush();
            return ExitCode::SUCCESS;
        }
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    | clap::error::ErrorKind::MissingSubcommand
            ) =>
        {
            eprintln!("peermem: a command is needed (topo, why, route, check, fix, probe, export, capture); see peermem --help");
            return ExitCode::from(2);
        }
        Err(e) => {
            // Usage errors in one line too; `--help` has the details.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!("peermem: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let mut o = Out::new();
    let code = match run(cli, &mut o) {
        Ok(code) => code,
        Err(e) => {
            o.flush();
            // One line: the whole cause chain.
            eprintln!("peermem: {}", format!("{e:#}").replace('\n', " "));
            return ExitCode::from(2);
        }
    };
    o.flush();
    ExitCode::from(code)
}

fn run(cli: Cli, o: &mut Out) -> Result<u8> {
    let root = Root::open(&cli.root)?;
    match cli.cmd {
        Cmd::Load(args) => load::run(&root.path, args)?,
        Cmd::Topo { filter, json } => {
            let t = Arc::new(root.discover()?);
            let sel = filter.selection()?;
            let names = topo::Names::load(&t)?;
            let nics = nics::affinity(&t, &names, &names.labels.select(&sel));
            if json {
                let mut v = topo::topo_json(&t, &names, &sel);
                v["nic_affinity"] = nics::affinity_json(&nics);
                o.line(&serde_json::to_string_pretty(&v)?);
            } else {
                topo::print_topo(&t, &names, &sel, o);
                nics::print_affinity(&nics, o);
            }
        }
        Cmd::Nics { devices, json } => nics::ranking(Arc::new(root.discover()?), &root, &devices, json, o)?,
        Cmd::Why { provider, client, json } => {
            let t = root.discover()?;
            let labels = Labels::new(&t);
            let p = resolve(&t, &labels, &root, &provider)?;
            let c = resolve(&t, &labels, &root, &client)?;
            let v = t.verdict(p, c);
            if json {
                o.line(&serde_json::to_string_pretty(&v)?);
            } else {
                topo::print_verdict(&v, o);
            }
        }
        Cmd::Route { provider, bar, offset, client, json } => {
            if bar > 5 {
                bail!("BAR {bar} out of range: memory BARs are numbered 0-5");
            }
            let t = Arc::new(root.discover()?);
            let out = route_json(t, provider, bar, offset, client)?;
            if json {
                o.line(&serde_json::to_string_pretty(&out)?);
            } else {
                print_route(&out, o);
            }
        }
        Cmd::Check { gpu_nic: true, json, filter, pairs, .. } => {
            if filter.all || !filter.class.is_empty() {
                bail!("check --gpu-nic checks GPUs: --all and --class do not apply");
            }
            return gate::gate(Arc::new(root.discover()?), &root, &pairs, json, o);
        }
        Cmd::Check { allow_host_bridge, filter, pairs, .. } => {
            let t = root.discover()?;
            let ps = pairs::pairs(&t, &root, &filter.selection()?, &pairs)?;
            return Ok(pairs::check(&t, &ps, allow_host_bridge, o));
        }
        Cmd::Fix { filter, pairs } => {
            let t = root.discover()?;
            let ps = pairs::pairs(&t, &root, &filter.selection()?, &pairs)?;
            pairs::fix(&t, &ps, o);
        }
        Cmd::Probe { provider, client, len, offset } => {
            if !root.is_live() {
                bail!("probe moves data on the live system: it cannot run on --root {}", cli.root.display());
            }
            let t = root.discover()?;
            let labels = Labels::new(&t);
            let p = resolve(&t, &labels, &root, &provider)?;
            let c = resolve(&t, &labels, &root, &client)?;
            return probe::probe(&t, p, c, len, offset, o);
        }
        Cmd::Export { json: true, ucx: false, .. } => bail!("export --json goes with --ucx"),
        Cmd::Export { ucx: false, devices, .. } if !devices.is_empty() => {
            bail!("export {}: devices go with --ucx", devices.join(" "))
        }
        Cmd::Export { nccl_xml: None, map, map_file, .. } if !map.is_empty() || map_file.is_some() => {
            bail!("--map and --map-file go with --nccl-xml")
        }
        Cmd::Export { nccl_xml: Some(to), map, map_file, .. } => {
            let map = nccl::bus_map(&map, map_file.as_deref())?;
            let t = root.discover()?;
            nccl::export(&t, format!("peermem {}", cli.root.display()), map, &to, o)?;
        }
        Cmd::Export { ucx: true, devices, json, .. } => {
            engines::ucx(Arc::new(root.discover()?), &root, &devices, json, o)?
        }
        Cmd::Export { mooncake_topo: Some(to), .. } => engines::mooncake(Arc::new(root.discover()?), &to, o)?,
        Cmd::Export { .. } => bail!("export needs --nccl-xml FILE, --ucx or --mooncake-topo FILE"),
        Cmd::Capture { dir, archive } => capture(&root, &cli.root, dir, archive, o)?,
    }
    Ok(0)
}

fn capture(root: &Root, from: &Path, dir: Option<PathBuf>, archive: Option<PathBuf>, o: &mut Out) -> Result<()> {
    let (dir, tmp) = match (dir, &archive) {
        (Some(d), None) => (d, None),
        (None, Some(a)) => {
            let (_, stem) = peermem::archive::Compression::from_name(a).ok_or_else(|| {
                anyhow!("--archive {}: name must end in .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz", a.display())
            })?;
            if a.exists() {
                bail!("--archive {}: exists: refusing to overwrite it", a.display());
            }
            let tmp = tempfile::Builder::new().prefix("peermem-capture-").tempdir().context("temporary directory")?;
            (tmp.path().join(stem), Some(tmp))
        }
        _ => bail!("capture needs DIR or --archive FILE"),
    };
    let r = peermem::capture::capture(&root.path, &dir).with_context(|| format!("capture into {}", dir.display()))?;
    let into = match &archive {
        Some(a) => {
            peermem::archive::pack(&dir, a).map_err(|e| anyhow!("{e}"))?;
            a.clone()
        }
        None => dir.clone(),
    };
    drop(tmp);
    o.line(&format!(
        "captured {} PCI functions ({} files, {} links) from {} into {}",
        r.devices,
        r.files,
        r.links,
        from.display(),
        into.display()
    ));
    for s in &r.skipped {
        eprintln!("peermem: skipped unreadable {s}");
    }
    Ok(())
}

/// A device named on the command line: a PCI address, a label (`NVME0`), or a file or block
/// device (the function that serves it).
pub(crate) fn resolve(t: &Topology, labels: &Labels, root: &Root, s: &str) -> Result<DevIdx> {
    if let Ok(b) = s.parse::<Bdf>() {
        return Ok(t.idx(b)?);
    }
    if let Some(i) = labels.find(s) {
        return Ok(i);
    }
    let p = Path::new(s);
    if s.contains('/') || p.exists() {
        let sys = peermem::sysroot::Sysroot::open(&root.path).map_err(|e| anyhow!("{e}"))?;
        let served = peermem::storage::serving_function(&sys, p).map_err(|e| anyhow!("{e}"))?;
        return t.idx(served.bdf).map_err(|e| anyhow!("{s} is served by {}: {e}", served.bdf));
    }
    bail!("{s:?} is not a PCI address (dddd:bb:dd.f), a label of this topology (e.g. NVME0) or an existing file")
}

fn route_json(t: Arc<Topology>, provider: Bdf, bar: u8, offset: u64, client: Bdf) -> Result<Value> {
    let d = t.by_bdf(provider)?;
    let b = d.bar(bar).ok_or_else(|| anyhow!("{provider} has no BAR{bar} (empty)"))?;
    if b.kind == BarKind::Io {
        bail!("{provider} BAR{bar} is an I/O port BAR: peers cannot DMA to it");
    }
    if offset >= b.cpu.len() {
        bail!("offset {offset:#x} is past the end of {provider} BAR{bar} ({:#x} bytes)", b.cpu.len());
    }
    // The region is the BAR from OFFSET to its end, so the route's addresses are OFFSET's.
    let reg = Registry::new(t.clone());
    let peer = reg.peer(client)?;
    let region: Arc<dyn PeerMemory> = Arc::new(BarRegion { bdf: provider, bar, offset, len: b.cpu.len() - offset });
    let guard = reg.register(region)?;
    let route = reg.resolve(&guard, peer)?;
    let cpu = route.cpu_address.map(|a| a.raw());
    let bus = route.bus_address.map(|a| a.raw());
    let dma = route.dma_address().map(|d| d.device_bits());
    let kind = route.kind;
    let v = route.verdict.as_deref();
    Ok(json!({
        "provider": provider,
        "client": client,
        "bar": bar,
        "offset": hex(offset),
        "route": kind.name(),
        "dma_address": dma.map(hex),
        "map_type": route.map_type().map(|m| m.as_str()),
        "distance": v.map(|v| v.distance),
        "path": v.map(|v| v.path.as_str()),
        "cpu_address": cpu.map(hex),
        "bus_address": bus.map(hex),
        "bus_offset": b.window().map(|w| w.offset().to_string()),
        "reasons": route.reasons(),
    }))
}

fn print_route(v: &Value, o: &mut Out) {
    let s = |k: &str| v[k].as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    o.line(&format!("{} BAR{} +{} -> {}", s("provider"), v["bar"], s("offset"), s("client")));
    o.line(&format!("route {}  dma_address {}  (map_type {})", s("route"), s("dma_address"), s("map_type")));
    o.line(&format!(
        "cpu_address {}  bus_address {}  bus_offset {}",
        s("cpu_address"),
        s("bus_address"),
        s("bus_offset")
    ));
    for r in v["reasons"].as_array().into_iter().flatten() {
        o.line(&format!("- {}", r.as_str().unwrap_or_default()));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_corpus_replays_through_the_argument_parser() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cli_args");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            if std::panic::catch_unwind(|| super::fuzz_args(&data)).is_err() {
                panic!("input {} panicked", p.display());
            }
            n += 1;
        }
        assert!(n > 0, "{}: empty corpus", dir.display());
    }
}
