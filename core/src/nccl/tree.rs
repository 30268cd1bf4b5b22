//! What a topology file holds, and where. NCCL places GPUs and NICs in the PCI tree it builds
//! from sysfs: a function hangs below the bridge two directory levels up (a switch's upstream
//! port), or below the CPU of its NUMA node at the root complex; a NIC carries one `net` per
//! device NCCL's network plugin lists (RDMA devices, else netdevs), found again by name. When
//! the file would pass NCCL's element limit, NICs are left out: SR-IOV virtual functions first,
//! then the NICs farthest from any GPU (software RDMA devices, with no PCI place, farthest).
//!
//! Owns: `Candidates`, `Tree`, `Net`, `LeftOut` and the element arithmetic. Must not: write the
//! text (`write` does) or judge a pair direct (closeness is the verdict's path label only).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{NcclError, NCCL_MAX_ELEMENTS, RESERVED_AT_RUN_TIME};
use crate::nic::{self, NicPlace, RdmaDevice};
use crate::pci::select::EndpointKind;
use crate::pci::topology::{DevIdx, Topology};
use crate::pci::Bdf;
use crate::verdict::PathLabel;

/// One device NCCL's network plugin lists, as the file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    /// The host's name: an RDMA device (`mlx5_0`), else a netdev (`eth0`).
    pub name: String,
    pub rdma: bool,
    /// The port's rate in Mb/s, where sysfs shows it.
    pub speed_mbps: Option<u64>,
    /// The port NCCL's plugin uses (the first active one), where sysfs shows it.
    pub port: Option<u32>,
}

/// Why a NIC was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeftOutWhy {
    /// An SR-IOV virtual function of `physfn`: these go first.
    VirtualFunction { physfn: Bdf },
    /// The farthest from any GPU: its best path to one (`None`: the machine has no GPU).
    Far { path: Option<(PathLabel, Bdf)> },
    /// A software RDMA device (rxe, siw): no PCI place, the farthest of all.
    Software,
}

/// A NIC the file leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// Its PCI function (`None` for a software device).
    pub bdf: Option<Bdf>,
    /// Its nets' host names.
    pub names: Vec<String>,
    pub why: LeftOutWhy,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.bdf, self.names.is_empty()) {
            (Some(b), true) => write!(f, "{b}")?,
            (Some(b), false) => write!(f, "{b} ({})", self.names.join(", "))?,
            (None, _) => write!(f, "{}", self.names.join(", "))?,
        }
        match &self.why {
            LeftOutWhy::VirtualFunction { physfn } => write!(f, ": an SR-IOV virtual function of {physfn}"),
            LeftOutWhy::Far { path: Some((p, gpu)) } => {
                write!(f, ": among the NICs farthest from any GPU ({p} to {gpu})")
            }
            LeftOutWhy::Far { path: None } => write!(f, ": the machine has no GPU, so the last NICs in PCI order go"),
            LeftOutWhy::Software => write!(f, ": a software RDMA device, with no PCI place"),
        }
    }
}

/// Everything that may go into the file.
#[derive(Debug, Clone)]
pub struct Candidates {
    gpus: Vec<DevIdx>,
    nics: Vec<(DevIdx, Vec<Net>)>,
    soft: Vec<Net>,
}

/// The file's content, nested as NCCL nests it.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// NUMA node -> the functions hanging below that CPU.
    pub cpus: BTreeMap<i32, Vec<DevIdx>>,
    /// Bridge -> the functions hanging below it.
    pub children: BTreeMap<DevIdx, Vec<DevIdx>>,
    pub gpus: BTreeSet<DevIdx>,
    /// NIC function -> its nets (empty: a `nic` NCCL fills at run time).
    pub nics: BTreeMap<DevIdx, Vec<Net>>,
    /// Software RDMA devices: one `nic` below the first CPU, as NCCL attaches them.
    pub soft: Vec<Net>,
    pci: usize,
}

impl Tree {
    /// Elements of the file as NCCL's parser counts them.
    pub fn elements(&self) -> usize {
        let nics: usize = self.nics.values().map(|n| 1 + n.len()).sum();
        let soft = if self.soft.is_empty() { 0 } else { 1 + self.soft.len() };
        1 + self.cpus.len() + self.pci + nics + soft
    }

    /// Elements NCCL adds in each process: its GPU's, and a `net` in each `nic` without one.
    pub fn added_at_run_time(&self) -> usize {
        RESERVED_AT_RUN_TIME + self.nics.values().filter(|n| n.is_empty()).count()
    }
}

/// The bridge NCCL hangs `i` below: two directory levels up, when both are PCI functions.
fn nccl_parent(t: &Topology, i: DevIdx) -> Option<DevIdx> {
    t.device(t.device(i).parent?).parent
}

/// The GPUs, the NICs with their nets, and the software RDMA devices of `t`.
pub fn candidates(t: &Topology) -> Result<Candidates, NcclError> {
    let rdma = nic::devices(t.root())?;
    let (mut gpus, mut nics) = (Vec::new(), Vec::new());
    for i in t.indices() {
        match EndpointKind::of(t.device(i)) {
            Some(EndpointKind::Gpu) => gpus.push(i),
            Some(EndpointKind::Nic) => nics.push((i, nets_of(t, i, &rdma)?)),
            _ => {}
        }
    }
    let soft = rdma
        .iter()
        .filter(|d| matches!(d.place, NicPlace::Virtual { .. }))
        .map(|d| rdma_net(t, d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Candidates { gpus, nics, soft })
}

/// A NIC function's nets: its RDMA devices, else its netdevs.
fn nets_of(t: &Topology, i: DevIdx, rdma: &[RdmaDevice]) -> Result<Vec<Net>, NcclError> {
    let bdf = t.device(i).bdf;
    let mut nets =
        rdma.iter().filter(|d| d.place == NicPlace::Pci(bdf)).map(|d| rdma_net(t, d)).collect::<Result<Vec<_>, _>>()?;
    if nets.is_empty() {
        let netdevs = t.device(i).class_devices.iter().filter(|c| c.class == "net");
        nets = netdevs.map(|c| Net { name: c.name.clone(), rdma: false, speed_mbps: None, port: None }).collect();
    }
    nets.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nets)
}

fn rdma_net(t: &Topology, d: &RdmaDevice) -> Result<Net, NcclError> {
    let f = nic::facts(t.root(), d)?;
    let port = f.port();
    Ok(Net {
        name: d.name.clone(),
        rdma: true,
        speed_mbps: port.and_then(|p| p.rate_mbps),
        port: port.map(|p| p.number),
    })
}

/// The tree of the candidates not in `drop_nics` / `drop_soft`.
fn build(t: &Topology, c: &Candidates, drop_nics: &BTreeSet<usize>, drop_soft: &BTreeSet<usize>) -> Tree {
    let mut tree = Tree::default();
    let mut seen = BTreeSet::new();
    let nics = c.nics.iter().enumerate().filter(|(k, _)| !drop_nics.contains(k)).map(|(_, n)| n);
    let leaves: Vec<DevIdx> = c.gpus.iter().copied().chain(nics.clone().map(|(d, _)| *d)).collect();
    for leaf in leaves {
        if !seen.insert(leaf) {
            continue;
        }
        let mut cur = leaf;
        loop {
            match nccl_parent(t, cur) {
                Some(p) => {
                    tree.children.entry(p).or_default().push(cur);
                    if !seen.insert(p) {
                        break;
                    }
                    cur = p;
                }
                None => {
                    tree.cpus.entry(t.device(cur).numa_node.unwrap_or(-1)).or_default().push(cur);
                    break;
                }
            }
        }
    }
    tree.pci = seen.len();
    tree.gpus = c.gpus.iter().copied().collect();
    tree.nics = nics.cloned().collect();
    tree.soft = c.soft.iter().enumerate().filter(|(k, _)| !drop_soft.contains(k)).map(|(_, n)| n.clone()).collect();
    if tree.cpus.is_empty() && !tree.soft.is_empty() {
        tree.cpus.insert(-1, Vec::new());
    }
    tree
}

/// How close a NIC is to the nearest GPU: (path rank, distance, path, GPU), smallest first.
fn closeness(t: &Topology, nic: DevIdx, gpus: &[DevIdx]) -> Option<(u8, u32, PathLabel, Bdf)> {
    gpus.iter()
        .map(|&g| {
            let v = t.verdict(g, nic);
            let p = v.switch_path.unwrap_or(v.path);
            let rank = match p {
                PathLabel::PIX => 0,
                PathLabel::PXB => 1,
                PathLabel::PHB => 2,
                PathLabel::NODE => 3,
                PathLabel::SYS => 4,
            };
            (rank, v.distance, p, t.device(g).bdf)
        })
        .min_by_key(|(rank, distance, _, gpu)| (*rank, *distance, *gpu))
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Nic(usize),
    Soft(usize),
}

/// Where a NIC stands in the drop order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DropKey {
    /// 0: an SR-IOV virtual function; 1: any other.
    group: u8,
    /// How far from the nearest GPU: 0 PIX ... 4 SYS, 5 no GPU at all, 6 a software device.
    rank: u8,
    distance: u32,
    bdf: Option<Bdf>,
    name: String,
}

impl DropKey {
    /// Group ascending; within it the farthest, then the highest address (or name), first.
    fn order(a: &DropKey, b: &DropKey) -> std::cmp::Ordering {
        a.group
            .cmp(&b.group)
            .then_with(|| (b.rank, b.distance, b.bdf, &b.name).cmp(&(a.rank, a.distance, a.bdf, &a.name)))
    }
}

/// Every NIC in the order it is left out: virtual functions, then by distance from the nearest
/// GPU (software devices, then SYS ... PIX), the farthest and then the highest address first.
fn drop_order(t: &Topology, c: &Candidates) -> Vec<(Unit, LeftOut)> {
    let mut keyed: Vec<(DropKey, Unit, LeftOut)> = Vec::new();
    for (k, (dev, nets)) in c.nics.iter().enumerate() {
        let d = t.device(*dev);
        let close = closeness(t, *dev, &c.gpus);
        let (group, why) = match d.physfn {
            Some(pf) => (0, LeftOutWhy::VirtualFunction { physfn: t.device(pf).bdf }),
            None => (1, LeftOutWhy::Far { path: close.map(|(_, _, p, g)| (p, g)) }),
        };
        let (rank, distance) = close.map_or((5, u32::MAX), |(r, dist, _, _)| (r, dist));
        let names = nets.iter().map(|n| n.name.clone()).collect();
        let key = DropKey { group, rank, distance, bdf: Some(d.bdf), name: String::new() };
        keyed.push((key, Unit::Nic(k), LeftOut { bdf: Some(d.bdf), names, why }));
    }
    for (k, net) in c.soft.iter().enumerate() {
        let key = DropKey { group: 1, rank: 6, distance: u32::MAX, bdf: None, name: net.name.clone() };
        let left = LeftOut { bdf: None, names: vec![net.name.clone()], why: LeftOutWhy::Software };
        keyed.push((key, Unit::Soft(k), left));
    }
    keyed.sort_by(|(a, ..), (b, ..)| DropKey::order(a, b));
    keyed.into_iter().map(|(_, u, l)| (u, l)).collect()
}

/// The largest tree of `c` that leaves NCCL room for what it adds at run time, and what was
/// left out for it, in order.
pub fn fit(t: &Topology, c: Candidates) -> Result<(Tree, Vec<LeftOut>), NcclError> {
    let (mut drop_nics, mut drop_soft) = (BTreeSet::new(), BTreeSet::new());
    let mut left = Vec::new();
    let mut order = drop_order(t, &c).into_iter();
    loop {
        let tree = build(t, &c, &drop_nics, &drop_soft);
        if tree.elements() + tree.added_at_run_time() <= NCCL_MAX_ELEMENTS {
            return Ok((tree, left));
        }
        match order.next() {
            Some((Unit::Nic(k), l)) => {
                drop_nics.insert(k);
                left.push(l);
            }
            Some((Unit::Soft(k), l)) => {
                drop_soft.insert(k);
                left.push(l);
            }
            None => return Err(NcclError::TooBig { elements: tree.elements(), reserved: tree.added_at_run_time() }),
        }
    }
}
