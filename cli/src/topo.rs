//! `peermem topo` (the matrix, its legend and `--json`) and the text form of one verdict.

use std::io::IsTerminal;

use anyhow::{anyhow, Result};
use peermem::pci::topology::{BarKind, PciDevice};
use peermem::pci::{Labels, Selection};
use peermem::pciids::PciIds;
use peermem::{DevIdx, MapType, PairFacts, PairMatrix, Topology, Verdict};
use serde_json::{json, Value};

use crate::out::Out;

/// Labels and pci.ids names of one topology.
pub struct Names {
    pub labels: Labels,
    pub ids: PciIds,
}

impl Names {
    pub fn load(t: &Topology) -> Result<Names> {
        let wanted: Vec<(u16, u16)> = t.devices().iter().map(|d| (d.vendor, d.device)).collect();
        let ids = PciIds::load(&wanted).map_err(|e| anyhow!("{}: {e}", peermem::pciids::ENV))?;
        Ok(Names { labels: Labels::new(t), ids })
    }

    pub fn vendor(&self, d: &PciDevice) -> Option<&str> {
        self.ids.vendor(d.vendor)
    }

    pub fn device(&self, d: &PciDevice) -> Option<&str> {
        self.ids.device(d.vendor, d.device)
    }

    /// `Vendor Device [vvvv:dddd]`, or only the IDs without a database entry.
    pub fn describe(&self, d: &PciDevice) -> String {
        let ids = format!("[{:04x}:{:04x}]", d.vendor, d.device);
        match (self.vendor(d), self.device(d)) {
            (Some(v), Some(n)) => format!("{v} {n} {ids}"),
            (Some(v), None) => format!("{v} device {ids}"),
            _ => ids,
        }
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn device_json(t: &Topology, names: &Names, i: DevIdx) -> Value {
    let d = t.device(i);
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
        "label": names.labels.label(i),
        "kind": names.labels.kind(i),
        "vendor": format!("{:#06x}", d.vendor),
        "device": format!("{:#06x}", d.device),
        "vendor_name": names.vendor(d),
        "device_name": names.device(d),
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
        "in_bus_pci_devices": d.linked,
        "unknown": d.unknown,
    })
}

/// One ordered pair as `topo --json` lists it: the same numbers `why --json` gives.
pub fn pair_json(t: &Topology, names: &Names, p: DevIdx, c: DevIdx, v: &Verdict) -> Value {
    json!({
        "provider": v.provider,
        "client": v.client,
        "provider_label": names.labels.label(p),
        "client_label": names.labels.label(c),
        "path": v.path,
        "switch_path": v.switch_path,
        "map_type": v.map_type,
        "distance": v.distance,
        "bandwidth_gbs": v.bandwidth_gbs,
        "acs_redirect": v.acs_redirect,
        "common_upstream": v.common_upstream,
        "host_bridges": [t.device(p).host_bridge.clone(), t.device(c).host_bridge.clone()],
    })
}

pub fn topo_json(t: &Topology, names: &Names, sel: &Selection) -> Value {
    let p = &t.platform;
    let eps = names.labels.select(sel);
    let mut pairs = Vec::new();
    for &a in &eps {
        for &b in &eps {
            if a != b {
                pairs.push(pair_json(t, names, a, b, &t.verdict(a, b)));
            }
        }
    }
    json!({
        "root": t.root(),
        "kernel": p.osrelease,
        "cpu": p.cpu.describe(),
        "cpu_supports_p2pdma": p.cpu.supports_p2pdma(),
        "virtualized": p.virt.virtualized,
        "virtualization_signals": p.virt.signals,
        "pci_ids": names.ids.source,
        "host_bridges": t.host_bridges().iter().map(|h| json!({
            "name": h.name,
            "device": h.dev.device().map(|i| t.device(i).bdf),
        })).collect::<Vec<_>>(),
        "devices": t.indices().map(|i| device_json(t, names, i)).collect::<Vec<_>>(),
        "endpoints": eps.iter().map(|&i| names.labels.label(i)).collect::<Vec<_>>(),
        "pairs": pairs,
        "warnings": t.warnings,
    })
}

/// ANSI colours, only on a terminal and without NO_COLOR.
struct Paint(bool);

impl Paint {
    fn detect() -> Paint {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Paint(!no_color && std::io::stdout().is_terminal())
    }

    fn cell(&self, text: &str, width: usize, map_type: Option<MapType>) -> String {
        let padded = format!("{text:>width$}");
        let code = match map_type {
            _ if !self.0 => return padded,
            None => return padded,
            Some(MapType::BusAddr) => "32",
            Some(MapType::ThruHostBridge) => "33",
            Some(MapType::NotSupported) => "31",
        };
        format!("\x1b[{code}m{padded}\x1b[0m")
    }
}

/// The matrix cell: the path label, `A>B` when ACS detours a switch pair, `*` when refused.
pub fn cell_text(v: &PairFacts) -> String {
    let mark = if v.map_type == MapType::NotSupported { "*" } else { "" };
    match v.switch_path {
        Some(s) => format!("{s}>{}{mark}", v.path),
        None => format!("{}{mark}", v.path),
    }
}

fn short_bdf(t: &Topology, d: &PciDevice) -> String {
    let many_domains = t.devices().iter().any(|x| x.bdf.domain() != t.devices()[0].bdf.domain());
    if many_domains {
        d.bdf.to_string()
    } else {
        format!("{:02x}:{:02x}.{}", d.bdf.bus(), d.bdf.dev(), d.bdf.func())
    }
}

pub fn print_topo(t: &Topology, names: &Names, sel: &Selection, o: &mut Out) {
    let paint = Paint::detect();
    let eps = names.labels.select(sel);
    if eps.is_empty() {
        o.line("no endpoints match (try --all)");
    } else {
        print_matrix(t, names, &eps, &paint, o);
    }
    o.line("");
    o.line("Legend:");
    for (k, what) in [
        ("X", "self"),
        ("PIX", "below one PCIe switch (peer-to-peer turns around in it)"),
        ("PXB", "below a common bridge, across several switches, not through the host bridge"),
        ("PHB", "through a host bridge (root complex) of one hierarchy"),
        ("NODE", "across host bridges within one NUMA node"),
        ("SYS", "across NUMA nodes (or host bridges whose NUMA node is unknown)"),
        ("A>B", "the fabric joins the pair below a switch (A) but ACS redirect sends it through the root complex (B)"),
        ("*", "the kernel refuses P2P for the pair (not_supported: I/O fails with EREMOTEIO; bounce via host memory)"),
    ] {
        o.line(&format!("  {k:<4} = {what}"));
    }
    o.line("");
    for &i in &eps {
        let d = t.device(i);
        let cls: Vec<String> = d.class_devices.iter().map(|c| format!("{}/{}", c.class, c.name)).collect();
        o.line(&format!(
            "  {:<7} {}  {}  {}{}",
            names.labels.label(i),
            short_bdf(t, d),
            names.describe(d),
            d.driver.as_deref().unwrap_or("(no driver)"),
            if cls.is_empty() { String::new() } else { format!("  {}", cls.join(" ")) }
        ));
    }
    let p = &t.platform;
    o.line("");
    o.line(&format!(
        "kernel {}  cpu {}  pci.ids {}",
        p.osrelease.as_deref().unwrap_or("unknown"),
        p.cpu.describe(),
        names.ids.source.as_ref().map_or("not found (hex IDs)".to_string(), |s| s.display().to_string())
    ));
    if p.virt.virtualized {
        o.line(&format!("virtualized: {}", p.virt.signals.join("; ")));
    }
    for w in &t.warnings {
        o.line(&format!("warning: {w}"));
    }
    let unknown = t.devices().iter().filter(|d| !d.unknown.is_empty()).count();
    if unknown > 0 {
        o.line(&format!("note: {unknown} function(s) have unknown facts (see `topo --json`, \"unknown\")"));
    }
}

fn print_matrix(t: &Topology, names: &Names, eps: &[DevIdx], paint: &Paint, o: &mut Out) {
    let m = PairMatrix::new(t, eps.iter().copied());
    let verdicts: Vec<Vec<Option<PairFacts>>> =
        (0..eps.len()).map(|a| (0..eps.len()).map(|b| (a != b).then(|| m.facts(a, b))).collect()).collect();
    let labels: Vec<&str> = eps.iter().map(|&i| names.labels.label(i)).collect();
    let cells: Vec<Vec<String>> =
        verdicts.iter().map(|row| row.iter().map(|v| v.as_ref().map_or("X".into(), cell_text)).collect()).collect();
    let w = labels.iter().map(|l| l.len()).chain(cells.iter().flatten().map(|c| c.len())).max().unwrap_or(4) + 1;
    let lw = labels.iter().map(|l| l.len()).max().unwrap_or(4) + 1;
    let affinity: Vec<String> =
        eps.iter().map(|&i| t.device(i).local_cpulist.clone().unwrap_or("N/A".into())).collect();
    let aw = affinity.iter().map(|a| a.len()).max().unwrap_or(0).max("CPU Affinity".len());
    let mut head = format!("{:lw$}", "");
    for l in &labels {
        head.push_str(&format!("{l:>w$}"));
    }
    head.push_str(&format!("  {:<aw$}  NUMA", "CPU Affinity"));
    o.line(&head);
    for (ri, &a) in eps.iter().enumerate() {
        let mut row = format!("{:lw$}", labels[ri]);
        for (ci, c) in cells[ri].iter().enumerate() {
            row.push_str(&paint.cell(c, w, verdicts[ri][ci].map(|v| v.map_type)));
        }
        let numa = t.device(a).numa_node.map_or("N/A".into(), |n| n.to_string());
        row.push_str(&format!("  {:<aw$}  {numa}", affinity[ri]));
        o.line(&row);
    }
}

pub fn print_verdict(v: &Verdict, o: &mut Out) {
    o.line(&format!("provider {}  client {}", v.provider, v.client));
    let sw = v.switch_path.map(|s| format!(" (fabric {s}, detoured by ACS)")).unwrap_or_default();
    o.line(&format!("map_type {}  distance {}  path {}{sw}", v.map_type.as_str(), v.distance, v.path));
    if let Some(bw) = v.bandwidth_gbs {
        o.line(&format!("bottleneck {:.2} GB/s at {}", bw, v.bottleneck.map(|b| b.to_string()).unwrap_or_default()));
    }
    if let Some(fix) = &v.acs_fix {
        o.line(&format!("fix: {fix}"));
    }
    for r in &v.reasons {
        o.line(&format!("- {r}"));
    }
}
