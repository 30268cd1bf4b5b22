//! `peermem export --ucx [DEVICE]... [--json]` and `peermem export --mooncake-topo FILE`: the NICs
//! core's `nic::pick` chooses for each GPU (or device, or NUMA node), written the way UCX (and
//! NIXL over it) and Mooncake's transfer engine read them: `UCX_NET_DEVICES` values
//! (`mlx5_0:1,...`) as shell assignments or JSON, and Mooncake's topology matrix
//! (`{"cpu:N"|"cuda:N": [[preferred], [available]]}`, what `MC_CUSTOM_TOPO_JSON` names).
//!
//! Owns: the targets named on the command line, the port suffix of each UCX device, both output
//! formats and their notes on stderr. Must not: rank NICs or say which reach a memory (core's
//! `nic::pick` over the registry does).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use peermem::nic::{cuda_order, facts, numa_nodes, pick, Memory, NicRank, Pick};
use peermem::pci::Labels;
use peermem::{Registry, Topology};
use serde_json::{json, Map, Value};

use crate::nics::{nic_json, targets, Target};
use crate::out::Out;
use crate::Root;

/// The UCX names of one NIC (`mlx5_0:1`): every active port, else the first port sysfs lists
/// (with a note), else port 1 (with a note: a capture without the port files).
fn ucx_names(root: &Path, r: &NicRank, notes: &mut Vec<String>) -> Result<Vec<String>> {
    let f = facts(root, &r.device)?;
    let active: Vec<u32> = f.ports.iter().filter(|p| p.active == Some(true)).map(|p| p.number).collect();
    let ports = match (active.is_empty(), f.port()) {
        (false, _) => active,
        (true, Some(p)) => {
            notes.push(format!("{}: no port is active; named with port {}", r.device.name, p.number));
            vec![p.number]
        }
        (true, None) => {
            notes.push(format!("{}: its ports are not in sysfs; named with port 1", r.device.name));
            vec![1]
        }
    };
    Ok(ports.iter().map(|p| format!("{}:{p}", r.device.name)).collect())
}

/// The NIC list a variable holds, joined as UCX reads it.
fn ucx_value(root: &Path, nics: &[NicRank], notes: &mut Vec<String>) -> Result<String> {
    let mut names = Vec::new();
    for r in nics {
        names.extend(ucx_names(root, r, notes)?);
    }
    Ok(names.join(","))
}

/// Single-quoted for the shell when a character outside the plain set needs it.
fn shell_word(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "_.,:-/".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What stderr says about a target without a direct NIC.
fn fallback_note(label: &str, p: &Pick) -> Option<String> {
    if !p.groups.is_empty() {
        return None;
    }
    let node = p.numa.map_or("(the machine shows one node)".to_string(), |n| n.to_string());
    Some(match (p.memory, p.fallback.is_empty()) {
        (Memory::Device(b), false) => {
            format!("{label} ({b}): no RDMA NIC reaches its memory directly; falling back to the NICs of its NUMA node {node}")
        }
        (Memory::Node(_), false) => return None,
        (Memory::Device(b), true) => {
            format!("{label} ({b}): no RDMA NIC reaches its memory directly and none is on its NUMA node: no value")
        }
        (Memory::Node(_), true) => format!("{label}: no RDMA NIC on NUMA node {node}: no value"),
    })
}

fn target_json(root: &Path, tg: &Target, t: &Topology, p: &Pick, notes: &mut Vec<String>) -> Result<Value> {
    let mut best = Vec::new();
    for r in p.best() {
        let mut v = nic_json(r);
        v["ucx"] = json!(ucx_names(root, r, notes)?);
        v["numa_node"] = json!(r.device.place.bdf().and_then(|b| t.by_bdf(b).ok()).and_then(|d| d.numa_node));
        best.push(v);
    }
    let (bdf, numa) = match tg.memory {
        Memory::Device(b) => (Some(b), p.numa),
        Memory::Node(n) => (None, n),
    };
    let fallback = (p.groups.is_empty() && !p.fallback.is_empty()).then_some("numa");
    Ok(json!({
        "target": tg.label,
        "bdf": bdf,
        "numa_node": numa,
        "variable": format!("{}_UCX_NET_DEVICES", tg.label),
        "ucx_net_devices": (!best.is_empty()).then(|| ucx_value(root, p.best(), &mut Vec::new())).transpose()?,
        "fallback": fallback,
        "nics": best,
        "reaching": p.rest().iter().map(|r| r.device.name.as_str()).collect::<Vec<_>>(),
        "unreachable": p.unreachable.iter().map(|r| r.device.name.as_str()).collect::<Vec<_>>(),
    }))
}

/// `export --ucx`: one `LABEL_UCX_NET_DEVICES=...` line per target (none for a target without
/// NICs), or one JSON object; what fell back or has no value goes to stderr.
pub fn ucx(t: Arc<Topology>, root: &Root, names: &[String], as_json: bool, o: &mut Out) -> Result<()> {
    let labels = Labels::new(&t);
    let list = targets(&t, &labels, root, names)?;
    let registry = Registry::new(t.clone());
    let (mut lines, mut rows, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    for tg in &list {
        let p = pick(&registry, tg.memory)?;
        notes.extend(fallback_note(&tg.label, &p));
        if as_json {
            rows.push(target_json(&root.path, tg, &t, &p, &mut notes)?);
        } else if !p.best().is_empty() {
            let v = ucx_value(&root.path, p.best(), &mut notes)?;
            lines.push(format!("{}_UCX_NET_DEVICES={}", tg.label, shell_word(&v)));
        }
    }
    if list.is_empty() {
        notes.push("no GPU on this machine: name devices or numa:N".into());
    }
    notes.dedup();
    for n in &notes {
        eprintln!("peermem: {n}");
    }
    if as_json {
        o.line(&serde_json::to_string_pretty(&json!({ "targets": rows, "notes": notes }))?);
    } else {
        lines.iter().for_each(|l| o.line(l));
    }
    Ok(())
}

/// Mooncake's matrix: `cpu:N` for each NUMA node (`cpu:0` alone when none is known) and `cuda:N`
/// for each NVIDIA GPU in bus order; each `[preferred, available]`. Notes for stderr.
fn mooncake_matrix(t: &Arc<Topology>) -> Result<(Map<String, Value>, Vec<String>)> {
    let registry = Registry::new(t.clone());
    let mut keys: Vec<(String, Memory)> = Vec::new();
    let mut notes = Vec::new();
    match numa_nodes(t).as_slice() {
        [] => {
            notes.push("no NUMA node is known: cpu:0 stands for all host memory, every NIC available".into());
            keys.push(("cpu:0".into(), Memory::Node(None)));
        }
        nodes => keys.extend(nodes.iter().map(|&n| (format!("cpu:{n}"), Memory::Node(Some(n))))),
    }
    for (n, i) in cuda_order(t).into_iter().enumerate() {
        keys.push((format!("cuda:{n}"), Memory::Device(t.device(i).bdf)));
    }
    let mut m = Map::new();
    for (key, memory) in keys {
        let p = pick(&registry, memory)?;
        let names = |rs: &[&NicRank]| rs.iter().map(|r| Value::from(r.device.name.clone())).collect::<Vec<_>>();
        let preferred: Vec<&NicRank> = p.groups.first().map(|g| g.iter().collect()).unwrap_or_default();
        let (preferred, available) = (names(&preferred), names(&p.rest()));
        if let (Memory::Device(b), true) = (memory, preferred.is_empty() && available.is_empty()) {
            notes.push(format!(
                "{key} ({b}): no RDMA NIC reaches its memory: both lists are empty (Mooncake then picks from every \
                 NIC in the file)"
            ));
        }
        if !p.unreachable.is_empty() && matches!(memory, Memory::Device(_)) {
            let out: Vec<&str> = p.unreachable.iter().map(|r| r.device.name.as_str()).collect();
            notes.push(format!("{key}: left out (cannot reach its memory): {}", out.join(", ")));
        }
        m.insert(key, json!([preferred, available]));
    }
    Ok((m, notes))
}

/// `export --mooncake-topo FILE` (`-`: stdout): the file, then its notes (stdout after `wrote`,
/// stderr when the file is stdout).
pub fn mooncake(t: Arc<Topology>, to: &Path, o: &mut Out) -> Result<()> {
    let (m, notes) = mooncake_matrix(&t)?;
    let text = serde_json::to_string_pretty(&Value::Object(m))? + "\n";
    if to == Path::new("-") {
        o.text(&text);
        notes.iter().for_each(|n| eprintln!("peermem: {n}"));
        return Ok(());
    }
    std::fs::write(to, &text).with_context(|| format!("--mooncake-topo {}", to.display()))?;
    o.line(&format!("wrote {} (use it with MC_CUSTOM_TOPO_JSON={})", to.display(), to.display()));
    notes.iter().for_each(|n| o.line(&format!("note: {n}")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_a_character_needs_it() {
        assert_eq!(shell_word("mlx5_0:1,mlx5_3:1"), "mlx5_0:1,mlx5_3:1");
        assert_eq!(shell_word("odd name:1"), "'odd name:1'");
        assert_eq!(shell_word("it's:1"), r"'it'\''s:1'");
        assert_eq!(shell_word("$(x):1"), "'$(x):1'");
    }
}
