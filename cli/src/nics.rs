//! The RDMA NICs ranked for a memory, as core ranks them:
//! - `peermem topo`'s NIC affinity: for each shown endpoint with a memory BAR, the RDMA devices
//!   ranked for that BAR by `peermem::nic::nearest_nic` (direct first: below a common switch and
//!   registered without a bounce; then the same host bridge, NUMA node, bandwidth), with the
//!   reason for the best one;
//! - `peermem nics [DEVICE]...`: for each GPU (or device, or NUMA node named), every NIC in
//!   `peermem::nic::pick`'s order (the best group, what an engine uses and weights by
//!   bandwidth; the others that reach the memory; those that cannot) with all its reasons.
//!
//! Owns: the targets named on a command line, the affinity rows, the ranking's text/JSON. Must
//! not: rank NICs itself (core does, from the registry's routes and how a NIC registers the
//! region) or open a device.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use peermem::nic::{devices, nearest_nic, numa_nodes, pick, Memory, NicPlace, NicRank, Pick};
use peermem::pci::topology::BarKind;
use peermem::pci::{EndpointKind, Labels};
use peermem::{BarRegion, Bdf, DevIdx, Registry, Topology};
use serde_json::{json, Value};

use crate::out::Out;
use crate::topo::Names;
use crate::Root;

/// One memory to answer for, with the name its variable carries.
pub struct Target {
    /// `GPU0`, `NVME1`, `NUMA0`: the label (a NUMA node's is `NUMA<N>`).
    pub label: String,
    pub memory: Memory,
}

/// Every GPU, or what `names` says: labels, addresses, files, `numa:N`.
pub fn targets(t: &Topology, labels: &Labels, root: &Root, names: &[String]) -> Result<Vec<Target>> {
    let dev = |i| Target { label: labels.label(i).to_string(), memory: Memory::Device(t.device(i).bdf) };
    if names.is_empty() {
        return Ok(t.indices().filter(|&i| labels.kind(i) == Some(EndpointKind::Gpu)).map(dev).collect());
    }
    let nodes = numa_nodes(t);
    let mut out = Vec::new();
    for n in names {
        if let Some(num) = n.strip_prefix("numa:") {
            let node: i32 = num.parse().with_context(|| format!("{n}: expected numa:N with N a node number"))?;
            // A machine that shows no NUMA node has one, node 0.
            let memory = match (nodes.is_empty(), nodes.contains(&node)) {
                (true, _) if node == 0 => Memory::Node(None),
                (_, true) => Memory::Node(Some(node)),
                _ => bail!("{n}: no PCI function of this machine is on NUMA node {node} (nodes: {nodes:?})"),
            };
            out.push(Target { label: format!("NUMA{node}"), memory });
        } else {
            out.push(dev(crate::resolve(t, labels, root, n)?));
        }
    }
    Ok(out)
}

/// One endpoint's ranking.
pub struct Affinity {
    pub label: String,
    pub bdf: Bdf,
    pub bar: u8,
    /// The ranking, or why there is none for this endpoint.
    pub ranks: Result<Vec<NicRank>, String>,
}

/// The endpoint's largest memory BAR (prefetchable first): where a GPU's or NVMe's memory is.
fn main_bar(t: &Topology, i: DevIdx) -> Option<(u8, u64)> {
    let d = t.device(i);
    (0..6u8)
        .filter_map(|n| d.bar(n))
        .filter(|b| b.kind == BarKind::Mem)
        .max_by_key(|b| (b.prefetchable, b.cpu.len()))
        .map(|b| (b.index, b.cpu.len()))
}

/// Rankings for `eps` (endpoints that are RDMA NICs themselves are left out). Empty when the
/// root has no RDMA device; `Err` when its RDMA devices cannot be read.
pub fn affinity(t: &Arc<Topology>, names: &Names, eps: &[DevIdx]) -> Result<Vec<Affinity>, String> {
    let nics = devices(t.root()).map_err(|e| e.to_string())?;
    if nics.is_empty() {
        return Ok(Vec::new());
    }
    let nic_bdfs: Vec<Bdf> = nics.iter().filter_map(|n| n.place.bdf()).collect();
    let registry = Registry::new(t.clone());
    let mut out = Vec::new();
    for &i in eps {
        let bdf = t.device(i).bdf;
        if nic_bdfs.contains(&bdf) {
            continue;
        }
        let Some((bar, len)) = main_bar(t, i) else { continue };
        let ranks = registry
            .register(Arc::new(BarRegion { bdf, bar, offset: 0, len: len.min(4096) }))
            .map_err(|e| e.to_string())
            .and_then(|reg| nearest_nic(&registry, reg.entry()).map_err(|e| e.to_string()));
        out.push(Affinity { label: names.labels.label(i).to_string(), bdf, bar, ranks });
    }
    Ok(out)
}

pub fn nic_json(r: &NicRank) -> Value {
    json!({
        "name": r.device.name,
        "bdf": r.device.place.bdf(),
        "virtual": matches!(r.device.place, NicPlace::Virtual { .. }),
        "tier": r.tier.as_str(),
        "route": r.route.name(),
        "registration": r.registration.name(),
        "map_type": r.map_type,
        "path": r.path,
        "distance": r.distance,
        "bandwidth_gbs": r.bandwidth_gbs,
        "reasons": r.reasons,
    })
}

pub fn affinity_json(rows: &Result<Vec<Affinity>, String>) -> Value {
    match rows {
        Err(e) => json!({ "error": e }),
        Ok(rows) => Value::Array(
            rows.iter()
                .map(|a| match &a.ranks {
                    Ok(r) => json!({ "endpoint": a.label, "bdf": a.bdf, "bar": a.bar,
                                     "nics": r.iter().map(nic_json).collect::<Vec<_>>() }),
                    Err(e) => json!({ "endpoint": a.label, "bdf": a.bdf, "bar": a.bar, "error": e }),
                })
                .collect(),
        ),
    }
}

pub fn print_affinity(rows: &Result<Vec<Affinity>, String>, o: &mut Out) {
    let rows = match rows {
        Ok(r) if r.is_empty() => return,
        Ok(r) => r,
        Err(e) => {
            o.line("");
            o.line(&format!("NIC affinity: cannot read the RDMA devices: {e}"));
            return;
        }
    };
    o.line("");
    o.line("NIC affinity (RDMA devices for each endpoint's main BAR, best first):");
    for a in rows {
        match &a.ranks {
            Err(e) => o.line(&format!("  {:<7} BAR{}: {e}", a.label, a.bar)),
            Ok(r) => {
                let list: Vec<String> = r
                    .iter()
                    .map(|n| {
                        format!(
                            "{} ({}, route {}, {})",
                            n.device.name,
                            n.tier.as_str(),
                            n.route.name(),
                            n.registration.name()
                        )
                    })
                    .collect();
                o.line(&format!("  {:<7} BAR{}: {}", a.label, a.bar, list.join(", ")));
                // The tier's reason, then how the NIC registers the region.
                for (what, line) in ["why", "how"].iter().zip(r.first().map(|n| &n.reasons[..]).unwrap_or_default()) {
                    o.line(&format!("  {:<7}   {what}: {line}", ""));
                }
            }
        }
    }
}

/// One NIC of a ranking, with where it stands: `best`, `reaching`, `fallback` or `cannot`.
fn ranked_json(r: &NicRank, standing: &str) -> Value {
    let mut v = nic_json(r);
    v["standing"] = json!(standing);
    v
}

/// Every NIC for one target, in `pick`'s order, each with its standing.
fn ranking_rows(p: &Pick) -> Vec<(&'static str, &NicRank)> {
    let mut rows: Vec<(&'static str, &NicRank)> = Vec::new();
    rows.extend(p.groups.first().into_iter().flatten().map(|r| ("best", r)));
    rows.extend(p.rest().into_iter().map(|r| ("reaching", r)));
    rows.extend(p.fallback.iter().map(|r| ("fallback", r)));
    // A fallback NIC that bounces is listed once, as a fallback.
    let listed: Vec<&str> = rows.iter().map(|(_, r)| r.device.name.as_str()).collect();
    let cannot: Vec<&NicRank> = p.unreachable.iter().filter(|r| !listed.contains(&r.device.name.as_str())).collect();
    rows.extend(cannot.into_iter().map(|r| ("cannot", r)));
    rows
}

/// `peermem nics [DEVICE]... [--json]`: the ranking of every NIC for each target, with reasons.
pub fn ranking(t: Arc<Topology>, root: &Root, names: &[String], as_json: bool, o: &mut Out) -> Result<()> {
    let labels = Labels::new(&t);
    let list = targets(&t, &labels, root, names)?;
    if list.is_empty() {
        bail!("no GPU on this machine: name a device (label, PCI address, file) or numa:N");
    }
    let registry = Registry::new(t.clone());
    let mut out = Vec::new();
    for tg in &list {
        let p = pick(&registry, tg.memory).with_context(|| format!("ranking the NICs for {}", tg.label))?;
        let rows = ranking_rows(&p);
        if as_json {
            let (bdf, numa) = match tg.memory {
                Memory::Device(b) => (Some(b), p.numa),
                Memory::Node(n) => (None, n),
            };
            let nics: Vec<Value> = rows.iter().map(|(s, r)| ranked_json(r, s)).collect();
            out.push(json!({ "target": tg.label, "bdf": bdf, "numa_node": numa, "nics": nics }));
        } else {
            print_ranking(tg, &p, &rows, o);
        }
    }
    if as_json {
        o.line(&serde_json::to_string_pretty(&json!({ "targets": out }))?);
    }
    Ok(())
}

fn print_ranking(tg: &Target, p: &Pick, rows: &[(&str, &NicRank)], o: &mut Out) {
    let what = match tg.memory {
        Memory::Device(b) => format!("{b}, memory as its driver exports it to a NIC"),
        Memory::Node(_) => "host memory".to_string(),
    };
    let node = p.numa.map_or("unknown".to_string(), |n| n.to_string());
    o.line(&format!("{} ({what}; NUMA node {node}):", tg.label));
    if rows.is_empty() {
        o.line("  no RDMA NIC on this machine");
    }
    for (k, (standing, r)) in rows.iter().enumerate() {
        let bw = r.bandwidth_gbs.map_or("bandwidth unknown".to_string(), |g| format!("{g:.1} GB/s"));
        let bdf = r.device.place.bdf().map_or("virtual".to_string(), |b| b.to_string());
        o.line(&format!(
            "  {}. {:<9} {:<10} {bdf}  {}, route {}, {}, {bw}",
            k + 1,
            standing,
            r.device.name,
            r.tier.as_str(),
            r.route.name(),
            r.registration.name()
        ));
        for line in &r.reasons {
            o.line(&format!("       {line}"));
        }
    }
    if p.best().len() > 1 {
        o.line("  The engine splits a request over the best group in proportion to bandwidth.");
    }
}
