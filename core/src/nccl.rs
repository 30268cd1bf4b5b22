//! The topology as the XML NCCL reads from `NCCL_TOPO_FILE`, so a VM or container user can hand
//! NCCL the host's real fabric.
//!
//! The element and attribute set is the one NCCL's parser accepts (`src/graph/xml.cc`:
//! `system(version, name) > cpu(numaid, affinity, arch, vendor, familyid, modelid) > pci(busid,
//! class, vendor, device, subsystem_vendor, subsystem_device, link_speed, link_width) > pci | nic |
//! gpu`), and the PCI nesting is the one NCCL builds from sysfs itself: a function hangs below the
//! bridge two levels up (the switch's upstream port), or below its CPU when that is the root
//! complex. GPU and NIC functions are emitted as `pci` nodes (a NIC with an empty `nic` child);
//! NCCL attaches its own GPU (`sm`, `dev`) and network (`dev`, `speed`) facts to them by bus ID,
//! since sysfs does not carry them.
//!
//! Owns: the XML text. Must not: invent facts sysfs does not give (an unknown link is omitted).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::pci::select::EndpointKind;
use crate::pci::topology::{DevIdx, Topology};

/// NCCL's `NCCL_TOPO_XML_VERSION`.
pub const XML_VERSION: u32 = 1;

/// A cpulist (`0-3,8`) as a sysfs cpumap (`0000010f`: 32-bit hex words, most significant first).
pub fn cpulist_to_mask(list: &str) -> Option<String> {
    let mut bits: Vec<u32> = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?),
            None => {
                let a = part.trim().parse::<usize>().ok()?;
                (a, a)
            }
        };
        if b < a || b >= 8192 {
            return None;
        }
        for c in a..=b {
            if bits.len() <= c / 32 {
                bits.resize(c / 32 + 1, 0);
            }
            bits[c / 32] |= 1 << (c % 32);
        }
    }
    if bits.is_empty() {
        return None;
    }
    Some(bits.iter().rev().map(|w| format!("{w:08x}")).collect::<Vec<_>>().join(","))
}

fn esc(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, '"' | '<' | '>' | '&' | '\n' | '\r')).take(250).collect()
}

/// The NCCL parent of `i`: the function two levels up, or `None` for the CPU.
fn nccl_parent(t: &Topology, i: DevIdx) -> Option<DevIdx> {
    let p1 = t.upstream(i)?;
    t.upstream(p1)
}

struct Node {
    dev: DevIdx,
    children: Vec<DevIdx>,
    nic: bool,
}

/// Writes the XML for the GPU and NIC functions of `t`.
pub fn topology_xml(t: &Topology, name: &str) -> String {
    let mut nodes: BTreeMap<DevIdx, Node> = BTreeMap::new();
    let mut tops: BTreeMap<i32, Vec<DevIdx>> = BTreeMap::new();
    let want = t.indices().filter_map(|i| {
        let k = EndpointKind::of(t.device(i))?;
        matches!(k, EndpointKind::Gpu | EndpointKind::Nic).then_some((i, k == EndpointKind::Nic))
    });
    for (leaf, nic) in want {
        nodes.entry(leaf).or_insert(Node { dev: leaf, children: Vec::new(), nic: false }).nic = nic;
        let mut cur = leaf;
        loop {
            match nccl_parent(t, cur) {
                Some(p) => {
                    let n = nodes.entry(p).or_insert(Node { dev: p, children: Vec::new(), nic: false });
                    if n.children.contains(&cur) {
                        break;
                    }
                    n.children.push(cur);
                    cur = p;
                }
                None => {
                    let numa = t.device(cur).numa_node.unwrap_or(-1);
                    let v = tops.entry(numa).or_default();
                    if !v.contains(&cur) {
                        v.push(cur);
                    }
                    break;
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "<system version=\"{XML_VERSION}\" name=\"{}\">", esc(name));
    let cpu = &t.platform.cpu;
    for (numa, devs) in &tops {
        let mut attrs = format!(" numaid=\"{numa}\"");
        if let Some(m) = devs.iter().find_map(|&d| t.device(d).local_cpulist.as_deref().and_then(cpulist_to_mask)) {
            let _ = write!(attrs, " affinity=\"{m}\"");
        }
        let x86 =
            matches!(cpu.vendor.as_deref(), Some("GenuineIntel" | "AuthenticAMD" | "HygonGenuine" | "CentaurHauls"));
        if x86 {
            let _ = write!(attrs, " arch=\"x86_64\" vendor=\"{}\"", esc(cpu.vendor.as_deref().unwrap_or("")));
            if let Some(f) = cpu.family {
                let _ = write!(attrs, " familyid=\"{f}\"");
            }
            if let Some(m) = cpu.model {
                let _ = write!(attrs, " modelid=\"{m}\"");
            }
        }
        let _ = writeln!(out, "  <cpu{attrs}>");
        let mut devs = devs.clone();
        devs.sort_by_key(|d| t.device(*d).bdf);
        for d in devs {
            write_pci(t, &nodes, d, 4, &mut out);
        }
        let _ = writeln!(out, "  </cpu>");
    }
    out.push_str("</system>\n");
    out
}

fn write_pci(t: &Topology, nodes: &BTreeMap<DevIdx, Node>, i: DevIdx, indent: usize, out: &mut String) {
    let d = t.device(i);
    let pad = " ".repeat(indent);
    let mut attrs = format!(
        " busid=\"{}\" class=\"{:#08x}\" vendor=\"{:#06x}\" device=\"{:#06x}\"",
        d.bdf, d.class, d.vendor, d.device
    );
    if let (Some(sv), Some(sd)) = (d.subsystem_vendor, d.subsystem_device) {
        let _ = write!(attrs, " subsystem_vendor=\"{sv:#06x}\" subsystem_device=\"{sd:#06x}\"");
    }
    // NCCL takes the slower of the function's and its upstream port's maximum link.
    let up = t.upstream(i).map(|u| t.device(u).link);
    let speed = [Some(d.link.max_gts), up.map(|l| l.max_gts)].into_iter().flatten().flatten().reduce(f64::min);
    let width = [Some(d.link.max_width), up.map(|l| l.max_width)].into_iter().flatten().flatten().min();
    if let Some(s) = speed {
        let _ = write!(attrs, " link_speed=\"{s:.1} GT/s PCIe\"");
    }
    if let Some(w) = width {
        let _ = write!(attrs, " link_width=\"{w}\"");
    }
    let node = nodes.get(&i);
    let children: Vec<DevIdx> = node.map(|n| n.children.clone()).unwrap_or_default();
    let nic = node.is_some_and(|n| n.nic && n.dev == i);
    if children.is_empty() && !nic {
        let _ = writeln!(out, "{pad}<pci{attrs}/>");
        return;
    }
    let _ = writeln!(out, "{pad}<pci{attrs}>");
    if nic {
        let _ = writeln!(out, "{pad}  <nic/>");
    }
    let mut children = children;
    children.sort_by_key(|c| t.device(*c).bdf);
    for c in children {
        write_pci(t, nodes, c, indent + 2, out);
    }
    let _ = writeln!(out, "{pad}</pci>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_become_sysfs_cpumaps() {
        assert_eq!(cpulist_to_mask("0-1").as_deref(), Some("00000003"));
        assert_eq!(cpulist_to_mask("0-3,8").as_deref(), Some("0000010f"));
        assert_eq!(cpulist_to_mask("32").as_deref(), Some("00000001,00000000"));
        assert_eq!(cpulist_to_mask("3-1"), None);
        assert_eq!(cpulist_to_mask(""), None);
        assert_eq!(cpulist_to_mask("x"), None);
    }
}
