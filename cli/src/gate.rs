//! `peermem check --gpu-nic [GPU]...`: the node-health gate before an RDMA job. For each GPU,
//! every RDMA device ranked for the GPU's memory as its driver exports it to a NIC (core's
//! `nic::rank_for_export`, over the mover's `reachable`); a GPU passes when a NIC is in the
//! direct tier. A GPU that fails is named with its best NIC, why no pair is direct and the fix
//! the verdict proposes (the ACS kernel parameter), or that only placement fixes it.
//!
//! Owns: the gate's rows, their text and JSON, the exit status. Must not: rank NICs or judge a
//! pair direct (core's ranking does) or compute a fix (the verdict does).

use std::sync::Arc;

use anyhow::{bail, Result};
use peermem::nic::{rank_for_export, NicRank, Tier};
use peermem::pci::{EndpointKind, Labels};
use peermem::{Bdf, DevIdx, Registry, Topology};
use serde_json::{json, Value};

use crate::nics::nic_json;
use crate::out::Out;
use crate::Root;

/// One GPU's answer.
struct Row {
    label: String,
    bdf: Bdf,
    ranks: Vec<NicRank>,
    /// Why no NIC is direct, and the fix (`None` when one is direct).
    blocked: Option<(String, Option<String>)>,
}

/// The GPUs named (labels, addresses, files), or every GPU.
fn gpus(t: &Topology, labels: &Labels, root: &Root, names: &[String]) -> Result<Vec<DevIdx>> {
    if names.is_empty() {
        return Ok(t.indices().filter(|&i| labels.kind(i) == Some(EndpointKind::Gpu)).collect());
    }
    let mut out = Vec::new();
    for n in names {
        let i = crate::resolve(t, labels, root, n)?;
        if labels.kind(i) != Some(EndpointKind::Gpu) {
            bail!("{n} ({}) is not a GPU (display or 3D controller)", t.device(i).bdf);
        }
        out.push(i);
    }
    Ok(out)
}

/// Why `gpu` has no direct NIC among `ranks`, and the fix. ACS redirect on a path below a
/// common switch is the one thing software changes; otherwise no NIC shares a switch with it.
fn blocked(t: &Topology, gpu: DevIdx, ranks: &[NicRank]) -> (String, Option<String>) {
    let pci: Vec<(&NicRank, DevIdx)> =
        ranks.iter().filter_map(|r| Some((r, t.idx(r.device.place.bdf()?).ok()?))).collect();
    for (r, nic) in &pci {
        let v = t.verdict(gpu, *nic);
        if v.common_upstream.is_some() && !v.acs_redirect.is_empty() {
            let on = v.acs_redirect.iter().map(Bdf::to_string).collect::<Vec<_>>().join(", ");
            let why = format!("{} shares a switch with it, but ACS redirects the pair on {on}", r.device.name);
            return (why, v.acs_fix.clone());
        }
    }
    let why = match ranks.first() {
        None => "no RDMA device on this machine".to_string(),
        Some(_) if pci.is_empty() => "only software RDMA devices, which reach memory through the CPU".to_string(),
        Some(_) => "no RDMA NIC shares a PCIe switch with it: only placing one below its switch makes a pair direct"
            .to_string(),
    };
    (why, None)
}

fn row_json(r: &Row) -> Value {
    let direct: Vec<&str> = r.ranks.iter().filter(|n| n.tier == Tier::Direct).map(|n| n.device.name.as_str()).collect();
    json!({
        "gpu": r.label,
        "bdf": r.bdf,
        "direct": r.blocked.is_none(),
        "direct_nics": direct,
        "best": r.ranks.first().map(nic_json),
        "why": r.blocked.as_ref().map(|b| b.0.clone()),
        "fix": r.blocked.as_ref().and_then(|b| b.1.clone()),
    })
}

fn print_row(r: &Row, o: &mut Out) {
    let best = match r.ranks.first() {
        Some(n) => format!(
            "{} ({}) {} {}",
            n.device.name,
            n.device.place.bdf().map_or("software".into(), |b| b.to_string()),
            n.tier.as_str(),
            n.path.map_or("-", |p| p.as_str())
        ),
        None => "no NIC".to_string(),
    };
    let status = if r.blocked.is_none() { "ok " } else { "NOT" };
    o.line(&format!("{status} {:>6} {}  -> {best}", r.label, r.bdf));
    if let Some((why, fix)) = &r.blocked {
        o.line(&format!("    {why}"));
        if let Some(f) = fix {
            o.line(&format!("    fix (kernel command line): {f}"));
        }
    }
}

/// Runs the gate: exit 0 when every GPU has a direct NIC, 1 when one has none.
pub fn gate(t: Arc<Topology>, root: &Root, names: &[String], as_json: bool, o: &mut Out) -> Result<u8> {
    let labels = Labels::new(&t);
    let list = gpus(&t, &labels, root, names)?;
    let registry = Registry::new(t.clone());
    let mut rows = Vec::new();
    for g in list {
        let bdf = t.device(g).bdf;
        let ranks = rank_for_export(&registry, bdf)?;
        let blocked = (!ranks.iter().any(|r| r.tier == Tier::Direct)).then(|| blocked(&t, g, &ranks));
        rows.push(Row { label: labels.label(g).to_string(), bdf, ranks, blocked });
    }
    let good = rows.iter().filter(|r| r.blocked.is_none()).count();
    if as_json {
        let v =
            json!({ "ok": good == rows.len(), "direct": good, "gpus": rows.iter().map(row_json).collect::<Vec<_>>() });
        o.line(&serde_json::to_string_pretty(&v)?);
    } else if rows.is_empty() {
        o.line("no GPU to check");
    } else {
        for r in &rows {
            print_row(r, o);
        }
        o.line(&format!("{good} of {} GPUs have a NIC that reaches their memory directly", rows.len()));
    }
    Ok(u8::from(good < rows.len()))
}
