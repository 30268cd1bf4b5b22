//! `peermem topo`'s NIC affinity: for each shown endpoint with a memory BAR, the RDMA devices
//! ranked for that BAR by `peermem::nic::nearest_nic` (direct first: below a common switch and
//! registered without a bounce; then the same host bridge, NUMA node, bandwidth), with the
//! reason for the best one.
//!
//! Owns: the affinity rows and their text/JSON. Must not: rank NICs itself (core does, from the
//! registry's routes and how a NIC registers the region) or open a device.

use std::sync::Arc;

use peermem::nic::{devices, nearest_nic, NicPlace, NicRank};
use peermem::pci::topology::BarKind;
use peermem::{BarRegion, Bdf, DevIdx, Registry, Topology};
use serde_json::{json, Value};

use crate::out::Out;
use crate::topo::Names;

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
