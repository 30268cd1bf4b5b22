//! `peermem`: topology, per-pair P2P verdicts, routes and sysroot captures from the command line.
//! A thin layer: every answer comes from the `peermem` crate; this file only parses and prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use peermem::pci::topology::{BarKind, PciDevice};
use peermem::{BarRegion, Bdf, PeerMemory, Registry, Topology, Verdict};
use serde_json::{json, Value};

mod load;

#[derive(Parser)]
#[command(name = "peermem", version, about = "PCIe peer-to-peer memory: topology, verdicts and routes")]
struct Cli {
    /// Read sysfs/procfs from this root instead of / (e.g. a `peermem capture` directory).
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Matrix of path labels between endpoints, like `nvidia-smi topo -m`.
    Topo {
        #[arg(long)]
        json: bool,
    },
    /// The kernel's P2P verdict for one (provider, client) pair, explained.
    Why {
        provider: Bdf,
        client: Bdf,
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
    /// Copy the files peermem reads from the root into DIR (attach it to a bug report).
    Capture { dir: PathBuf },
    /// Read files into host, Vulkan, p2pmem or BAR memory through the loader; report route and MB/s.
    Load(load::LoadArgs),
}

fn parse_offset(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    };
    r.map_err(|_| format!("{s:?} is not a decimal or 0x-hex byte offset"))
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn discover(root: &PathBuf) -> Result<Topology> {
    Topology::discover(root).map_err(|e| anyhow!("{e}"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PEERMEM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // Usage errors in one line too; `--help` has the details.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!("peermem: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain.
            eprintln!("peermem: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Load(args) => load::run(&cli.root, args)?,
        Cmd::Topo { json } => {
            let t = discover(&cli.root)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&topo_json(&t))?);
            } else {
                print_topo(&t);
            }
        }
        Cmd::Why { provider, client, json } => {
            let t = discover(&cli.root)?;
            let v = t.verdict(t.idx(provider)?, t.idx(client)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_verdict(&v);
            }
        }
        Cmd::Route { provider, bar, offset, client, json } => {
            if bar > 5 {
                bail!("BAR {bar} out of range: memory BARs are numbered 0-5");
            }
            let t = Arc::new(discover(&cli.root)?);
            let out = route_json(t, provider, bar, offset, client)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_route(&out);
            }
        }
        Cmd::Capture { dir } => {
            let r = peermem::capture::capture(&cli.root, &dir)
                .with_context(|| format!("capture into {}", dir.display()))?;
            println!(
                "captured {} PCI functions ({} files, {} links) from {} into {}",
                r.devices,
                r.files,
                r.links,
                cli.root.display(),
                dir.display()
            );
            for s in &r.skipped {
                eprintln!("peermem: skipped unreadable {s}");
            }
        }
    }
    Ok(())
}

fn device_json(t: &Topology, d: &PciDevice) -> Value {
    let i = t.idx(d.bdf).expect("device of this topology");
    let bars: Vec<Value> = d
        .bars
        .iter()
        .filter(|b| b.kind == BarKind::Mem)
        .map(|b| {
            json!({
                "index": b.index,
                "cpu_start": hex(b.cpu.start().raw()),
                "bus_start": b.bus_start.map(|a| hex(a.raw())),
                "bus_offset": b.window().map(|w| w.offset().to_string()),
                "len": hex(b.cpu.len()),
                "is64": b.is64,
                "prefetchable": b.prefetchable,
            })
        })
        .collect();
    json!({
        "bdf": d.bdf,
        "vendor": format!("{:#06x}", d.vendor),
        "device": format!("{:#06x}", d.device),
        "class": format!("{:#08x}", d.class),
        "upstream": t.upstream(i).map(|u| t.device(u).bdf),
        "host_bridge": d.host_bridge,
        "port_type": d.port_type(),
        "physfn": d.physfn.map(|p| t.device(p).bdf),
        "numa_node": d.numa_node,
        "local_cpulist": d.local_cpulist,
        "driver": d.driver,
        "iommu_group": d.iommu_group.as_ref().map(|g| g.id),
        "iommu_type": d.iommu_group.as_ref().and_then(|g| g.domain_type.clone()),
        "acs": d.acs().to_string(),
        "config_bytes": d.config.len,
        "link": {
            "current_gts": d.link.cur_gts, "current_width": d.link.cur_width,
            "max_gts": d.link.max_gts, "max_width": d.link.max_width,
            "bandwidth_gbs": d.link.bandwidth_gbs(),
        },
        "p2pmem": d.p2pmem.map(|p| json!({"size": p.size, "available": p.available, "published": p.published})),
        "class_devices": d.class_devices.iter().map(|c| format!("{}/{}", c.class, c.name)).collect::<Vec<_>>(),
        "bars": bars,
    })
}

fn topo_json(t: &Topology) -> Value {
    let p = &t.platform;
    json!({
        "root": t.root(),
        "kernel": p.osrelease,
        "cpu": p.cpu.describe(),
        "cpu_supports_p2pdma": p.cpu.supports_p2pdma(),
        "virtualized": p.virt.virtualized,
        "virtualization_signals": p.virt.signals,
        "host_bridges": t.host_bridges().iter().map(|h| json!({
            "name": h.name,
            "device": h.dev.device().map(|i| t.device(i).bdf),
        })).collect::<Vec<_>>(),
        "devices": t.devices().iter().map(|d| device_json(t, d)).collect::<Vec<_>>(),
        "warnings": t.warnings,
    })
}

fn short_name(d: &PciDevice) -> String {
    match d.class_devices.first() {
        Some(c) => c.name.clone(),
        None => format!("{:02x}:{:02x}.{}", d.bdf.bus(), d.bdf.dev(), d.bdf.func()),
    }
}

fn print_topo(t: &Topology) {
    let eps: Vec<_> = t.endpoints().collect();
    let names: Vec<String> = eps.iter().map(|&i| short_name(t.device(i))).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(5) + 1;
    print!("{:w$}", "");
    for n in &names {
        print!("{n:>w$}");
    }
    println!("  NUMA  host bridge");
    for (ri, &a) in eps.iter().enumerate() {
        print!("{:w$}", names[ri]);
        for &b in &eps {
            let cell = if a == b {
                "X".to_string()
            } else {
                let v = t.verdict(a, b);
                let mark = match v.map_type {
                    peermem::MapType::NotSupported => "*",
                    _ => "",
                };
                format!("{:?}{mark}", v.path)
            };
            print!("{cell:>w$}");
        }
        let d = t.device(a);
        println!("  {:>4}  {}", d.numa_node.map_or("-".into(), |n| n.to_string()), d.host_bridge);
    }
    println!();
    println!("Legend: X self; PIX one switch; PXB several switches; PHB through the host bridge;");
    println!("        SYS across host bridges; * the kernel refuses P2P (not_supported: bounce via host memory)");
    println!();
    for &i in &eps {
        let d = t.device(i);
        let cls: Vec<String> = d.class_devices.iter().map(|c| format!("{}/{}", c.class, c.name)).collect();
        println!(
            "{}  [{:04x}:{:04x}] class {:06x}  {}{}",
            d.bdf,
            d.vendor,
            d.device,
            d.class,
            d.driver.as_deref().unwrap_or("(no driver)"),
            if cls.is_empty() { String::new() } else { format!("  {}", cls.join(" ")) }
        );
    }
    let p = &t.platform;
    println!();
    println!("kernel {}  cpu {}", p.osrelease.as_deref().unwrap_or("unknown"), p.cpu.describe());
    if p.virt.virtualized {
        println!("virtualized: {}", p.virt.signals.join("; "));
    }
    for w in &t.warnings {
        println!("warning: {w}");
    }
}

fn print_verdict(v: &Verdict) {
    println!("provider {}  client {}", v.provider, v.client);
    println!("map_type {}  distance {}  path {:?}", v.map_type.as_str(), v.distance, v.path);
    if let Some(bw) = v.bandwidth_gbs {
        println!("bottleneck {:.2} GB/s at {}", bw, v.bottleneck.map(|b| b.to_string()).unwrap_or_default());
    }
    if let Some(fix) = &v.acs_fix {
        println!("fix: {fix}");
    }
    for r in &v.reasons {
        println!("- {r}");
    }
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
        "path": v.map(|v| format!("{:?}", v.path)),
        "cpu_address": cpu.map(hex),
        "bus_address": bus.map(hex),
        "bus_offset": b.window().map(|w| w.offset().to_string()),
        "reasons": route.reasons(),
    }))
}

fn print_route(v: &Value) {
    let s = |k: &str| v[k].as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    println!("{} BAR{} +{} -> {}", s("provider"), v["bar"], s("offset"), s("client"));
    println!("route {}  dma_address {}  (map_type {})", s("route"), s("dma_address"), s("map_type"));
    println!("cpu_address {}  bus_address {}  bus_offset {}", s("cpu_address"), s("bus_address"), s("bus_offset"));
    for r in v["reasons"].as_array().into_iter().flatten() {
        println!("- {}", r.as_str().unwrap_or_default());
    }
}
