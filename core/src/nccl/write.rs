//! The text of a topology file, as NCCL's own dumps write it: two-space indent, attributes in
//! its order, children sorted by bus id, `link_speed` and `link_width` on every `pci` by its
//! rule, CPU family and model both or neither, values escaped and within NCCL's length, and bus
//! ids and names as the guest shows them when a map is given.
//!
//! Owns: `write`, the link rule and the CPU attributes. Must not: choose what goes in (`tree`
//! does) or leave out a fact NCCL requires without saying so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::tree::{Net, Tree};
use super::{cpulist_to_mask, NcclError, Options, NCCL_MAX_VALUE_BYTES, XML_VERSION};
use crate::pci::topology::{DevIdx, Topology};
use crate::pci::Bdf;
use crate::platform::CpuArch;

/// The file's text and what it says about itself.
pub(super) struct Written {
    pub xml: String,
    pub rdma_names: Vec<String>,
    pub notes: Vec<String>,
}

/// An element's attributes, in order.
type Attrs = Vec<(&'static str, String)>;

/// A value as NCCL's tokenizer takes it: no quote, markup or control character.
fn esc(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, '"' | '<' | '>' | '&') && !c.is_control()).collect()
}

/// `s` cut to NCCL's value length in bytes, on a character boundary.
fn cut(mut s: String) -> String {
    let mut end = s.len().min(NCCL_MAX_VALUE_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn speed(gts: f64) -> String {
    format!("{gts:.1} GT/s PCIe")
}

/// `link_speed` and `link_width` as NCCL writes them for `i`. A GPU: its current link, what
/// NCCL reads for its own GPUs. Otherwise, and where a GPU's current link is unknown: the slower
/// of the function's and its upstream port's maximum speed (empty when neither gives one) and
/// the narrower maximum width, a side that gives none counting as 0, which NCCL reads as x16.
pub(super) fn link(t: &Topology, i: DevIdx, gpu: bool) -> (String, u32) {
    let d = t.device(i);
    let port = d.parent.map(|p| t.device(p).link);
    let max_speed = [d.link.max_gts, port.and_then(|l| l.max_gts)].into_iter().flatten().reduce(f64::min);
    let max_width = d.link.max_width.unwrap_or(0).min(port.and_then(|l| l.max_width).unwrap_or(0));
    let cur_speed = d.link.cur_gts.filter(|_| gpu);
    let cur_width = d.link.cur_width.filter(|w| gpu && *w > 0);
    (cur_speed.or(max_speed).map(speed).unwrap_or_default(), cur_width.unwrap_or(max_width))
}

/// The CPU attributes after `numaid` and `affinity`, and notes on what is left to NCCL. NCCL
/// fills the architecture, vendor, family and model only for the CPU above its own GPU, the
/// family and model together: with several CPU elements each needs them.
fn cpu_attrs(t: &Topology, cpus: usize) -> Result<(Attrs, Vec<String>), NcclError> {
    let cpu = &t.platform.cpu;
    let err = |what: &str| NcclError::CpuFacts { what: what.into(), file: t.root().join("proc/cpuinfo"), cpus };
    let (mut attrs, mut notes) = (Vec::new(), Vec::new());
    match cpu.arch {
        Some(a) => attrs.push(("arch", a.nccl_name().to_string())),
        None if cpus > 1 => return Err(err("no CPU architecture")),
        None => notes.push("cpuinfo names no CPU architecture: arch is left to NCCL".to_string()),
    }
    if cpu.arch != Some(CpuArch::X86_64) {
        return Ok((attrs, notes));
    }
    let vendor = cpu.vendor.clone().unwrap_or_default();
    // cpuinfo trims the padded vendor string CPUID returns (and NCCL matches).
    attrs.push(("vendor", if vendor == "Shanghai" { "  Shanghai  ".into() } else { esc(&vendor) }));
    let needs = matches!(vendor.as_str(), "GenuineIntel" | "AuthenticAMD" | "CentaurHauls" | "Shanghai");
    match (cpu.family, cpu.model) {
        (Some(f), Some(m)) => {
            attrs.push(("familyid", f.to_string()));
            attrs.push(("modelid", m.to_string()));
        }
        _ if needs && cpus > 1 => return Err(err("no CPU family and model")),
        _ => notes.push(
            "cpuinfo lacks the CPU family or model: familyid and modelid are both left to NCCL, which fills them \
             from its own CPU"
                .to_string(),
        ),
    }
    Ok((attrs, notes))
}

struct Writer<'a> {
    t: &'a Topology,
    tree: &'a Tree,
    opts: &'a Options,
    out: String,
    /// Guest bus id -> host function, to refuse two elements with one id.
    busids: BTreeMap<Bdf, Bdf>,
    /// Guest net name -> host name.
    names: BTreeMap<String, String>,
    /// Host net name -> NCCL's device index.
    devs: BTreeMap<String, usize>,
}

impl Writer<'_> {
    fn tag(&mut self, depth: usize, name: &str, attrs: &[(&str, String)], open: bool) {
        let _ = write!(self.out, "{:1$}<{name}", "", depth * 2);
        for (k, v) in attrs {
            let _ = write!(self.out, " {k}=\"{v}\"");
        }
        self.out.push_str(if open { ">\n" } else { "/>\n" });
    }

    fn close(&mut self, depth: usize, name: &str) {
        let _ = writeln!(self.out, "{:1$}</{name}>", "", depth * 2);
    }

    fn bus(&self, i: DevIdx) -> Bdf {
        self.opts.map.bus(self.t.device(i).bdf)
    }

    /// `pci` for `i` and its subtree.
    fn pci(&mut self, i: DevIdx, depth: usize) -> Result<(), NcclError> {
        let (d, bus) = (self.t.device(i), self.bus(i));
        if let Some(first) = self.busids.insert(bus, d.bdf) {
            let hint = if self.opts.map.is_empty() { String::new() } else { "; map the other one too".into() };
            return Err(NcclError::BusIdClash { busid: bus, first, second: d.bdf, hint });
        }
        let (link_speed, link_width) = link(self.t, i, self.tree.gpus.contains(&i));
        let mut attrs = vec![
            ("busid", bus.to_string()),
            ("class", format!("{:#08x}", d.class)),
            ("vendor", format!("{:#06x}", d.vendor)),
            ("device", format!("{:#06x}", d.device)),
        ];
        if let (Some(sv), Some(sd)) = (d.subsystem_vendor, d.subsystem_device) {
            attrs.push(("subsystem_vendor", format!("{sv:#06x}")));
            attrs.push(("subsystem_device", format!("{sd:#06x}")));
        }
        attrs.push(("link_speed", link_speed));
        attrs.push(("link_width", link_width.to_string()));
        let mut kids = self.tree.children.get(&i).cloned().unwrap_or_default();
        kids.sort_by_key(|&k| self.bus(k));
        let nets = self.tree.nics.get(&i).cloned();
        if kids.is_empty() && nets.is_none() {
            self.tag(depth, "pci", &attrs, false);
            return Ok(());
        }
        self.tag(depth, "pci", &attrs, true);
        if let Some(nets) = nets {
            self.nic(&nets, depth + 1)?;
        }
        for k in kids {
            self.pci(k, depth + 1)?;
        }
        self.close(depth, "pci");
        Ok(())
    }

    fn nic(&mut self, nets: &[Net], depth: usize) -> Result<(), NcclError> {
        if nets.is_empty() {
            self.tag(depth, "nic", &[], false);
            return Ok(());
        }
        self.tag(depth, "nic", &[], true);
        for n in nets {
            let name = self.opts.map.name(&n.name).to_string();
            if let Some(first) = self.names.insert(name.clone(), n.name.clone()) {
                return Err(NcclError::NetNameClash { name, first, second: n.name.clone() });
            }
            let mut attrs = vec![("name", esc(&name)), ("dev", self.devs[&n.name].to_string())];
            if let Some(s) = n.speed_mbps {
                attrs.push(("speed", s.to_string()));
            }
            if let Some(p) = n.port {
                attrs.push(("port", p.to_string()));
            }
            self.tag(depth + 1, "net", &attrs, false);
        }
        self.close(depth, "nic");
        Ok(())
    }
}

/// NCCL's device index of each net: its plugin lists devices in PCI order (devices without a
/// PCI place last), RDMA devices and netdevs each in their own plugin.
fn dev_numbers(t: &Topology, tree: &Tree, opts: &Options) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut rdma: Vec<(Option<Bdf>, &str)> = Vec::new();
    let mut sock: Vec<(Option<Bdf>, &str)> = Vec::new();
    for (i, nets) in &tree.nics {
        for n in nets {
            let list = if n.rdma { &mut rdma } else { &mut sock };
            list.push((Some(opts.map.bus(t.device(*i).bdf)), &n.name));
        }
    }
    rdma.extend(tree.soft.iter().map(|n| (None, n.name.as_str())));
    let key = |(b, n): &(Option<Bdf>, &str)| (b.is_none(), *b, opts.map.name(n).to_string());
    rdma.sort_by_key(key);
    sock.sort_by_key(key);
    let mut devs = BTreeMap::new();
    for list in [&rdma, &sock] {
        for (k, (_, n)) in list.iter().enumerate() {
            devs.insert(n.to_string(), k);
        }
    }
    (devs, rdma.iter().map(|(_, n)| opts.map.name(n).to_string()).collect())
}

/// The file for `tree`.
pub(super) fn write(t: &Topology, tree: &Tree, opts: &Options) -> Result<Written, NcclError> {
    let (cpu, mut notes) = cpu_attrs(t, tree.cpus.len())?;
    let (devs, rdma_names) = dev_numbers(t, tree, opts);
    let mut w = Writer { t, tree, opts, out: String::new(), busids: BTreeMap::new(), names: BTreeMap::new(), devs };
    let top = [("version", XML_VERSION.to_string()), ("name", cut(esc(&opts.name)))];
    w.tag(0, "system", &top, true);
    for (n, (numa, tops)) in tree.cpus.iter().enumerate() {
        let mut attrs = vec![("numaid", numa.to_string())];
        if let Some(m) = tops.iter().find_map(|&d| t.device(d).local_cpulist.as_deref().and_then(cpulist_to_mask)) {
            attrs.push(("affinity", m));
        }
        attrs.extend(cpu.iter().cloned());
        w.tag(1, "cpu", &attrs, true);
        let mut tops = tops.clone();
        tops.sort_by_key(|&d| w.bus(d));
        for d in tops {
            w.pci(d, 2)?;
        }
        if n == 0 && !tree.soft.is_empty() {
            w.nic(&tree.soft, 2)?;
        }
        w.close(1, "cpu");
    }
    w.close(0, "system");
    let unnamed = tree.nics.values().filter(|n| n.is_empty()).count();
    if unnamed > 0 {
        notes.push(format!(
            "{unnamed} NIC(s) show no RDMA device or netdev: NCCL adds their nets by its own sysfs reading"
        ));
    }
    Ok(Written { xml: w.out, rdma_names, notes })
}
