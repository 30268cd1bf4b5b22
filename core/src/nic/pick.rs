//! Which NICs to name to an engine (UCX and NIXL through `UCX_NET_DEVICES`, Mooncake through its
//! topology file) for one memory: `rank`'s ranking cut into what a device list needs. For a
//! device's memory as its driver exports it (a GPU's), the NICs that take it directly, in groups
//! of equal rank (same tier and bottleneck bandwidth: a tie is one group), then the NICs that
//! reach it another way, then those that cannot reach it at all (their registration bounces
//! through host memory); when none takes it directly, the NICs on the memory's NUMA node, marked
//! as a fallback (every NIC, on a machine that shows no NUMA node: it has one). For a NUMA node's host memory, the node's own NICs come first.
//!
//! Owns: `Memory`, `Pick`, `pick`, the CUDA ordinal order (`cuda_order`) and the NUMA nodes a
//! machine shows (`numa_nodes`). Must not: rank NICs or judge a pair (`rank` and the registry do),
//! or write any engine's format (the CLI does).

use super::rank::{rank_for_export, rank_for_node, NicRank, Tier};
use super::NicError;
use crate::pci::{Bdf, DevIdx};
use crate::registry::Registry;
use crate::Topology;

/// The memory an engine moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// PCI function `bdf`'s memory as its driver exports it to a NIC (a GPU's: a dma-buf).
    Device(Bdf),
    /// Host memory on a NUMA node (`None`: the machine shows no NUMA node).
    Node(Option<i32>),
}

/// The NICs for one memory, each list best first.
#[derive(Debug, Clone)]
pub struct Pick {
    pub memory: Memory,
    /// The memory's NUMA node, when known.
    pub numa: Option<i32>,
    /// The NICs that reach the memory the preferred way (device memory: the direct tier; host
    /// memory: on its node), in groups of equal rank. The first group is what to hand an engine.
    pub groups: Vec<Vec<NicRank>>,
    /// Every other NIC that reaches the memory (its registration takes it without a bounce).
    pub other: Vec<NicRank>,
    /// The NICs that cannot reach the memory: their registration bounces through host memory.
    pub unreachable: Vec<NicRank>,
    /// Memory that no NIC reaches the preferred way: the NICs on its NUMA node (reaching it or
    /// not), what a NUMA-aware engine would use anyway; every NIC on a machine that shows no NUMA
    /// node. Empty when a group exists, or the node is unknown on a machine that shows some.
    pub fallback: Vec<NicRank>,
}

impl Pick {
    /// The NICs to hand an engine: the first group, else the fallback.
    pub fn best(&self) -> &[NicRank] {
        self.groups.first().map_or(&self.fallback[..], |g| &g[..])
    }

    /// Every NIC that reaches the memory after the first group, best first (the groups after the
    /// first, then the others).
    pub fn rest(&self) -> Vec<&NicRank> {
        self.groups.iter().skip(1).flatten().chain(&self.other).collect()
    }
}

/// Two ranks are tied when tier, registration and bottleneck bandwidth agree: what is left
/// (path length, name) orders them but does not make one a better NIC for the memory.
fn tied(a: &NicRank, b: &NicRank) -> bool {
    let bw = |r: &NicRank| r.bandwidth_gbs.map(|g| (g * 1000.0).round() as i64);
    a.tier == b.tier && a.registration.bounces() == b.registration.bounces() && bw(a) == bw(b)
}

/// Consecutive tied ranks as groups (the ranking sorts by the same keys, so ties are adjacent).
fn groups(ranks: Vec<NicRank>) -> Vec<Vec<NicRank>> {
    let mut out: Vec<Vec<NicRank>> = Vec::new();
    for r in ranks {
        match out.last_mut() {
            Some(g) if tied(&g[0], &r) => g.push(r),
            _ => out.push(vec![r]),
        }
    }
    out
}

/// The NICs of the registry's root for `memory`. A device missing from the topology is an error.
pub fn pick(registry: &Registry, memory: Memory) -> Result<Pick, NicError> {
    let t = registry.topology();
    let (ranks, numa, preferred) = match memory {
        Memory::Device(bdf) => {
            let numa = t.by_bdf(bdf).map_err(|_| NicError::ProviderUnknown(bdf))?.numa_node;
            (rank_for_export(registry, bdf)?, numa, Some(Tier::Direct))
        }
        // Without a known node no NIC is "on" it: every one is merely available.
        Memory::Node(numa) => (rank_for_node(registry, numa)?, numa, numa.map(|_| Tier::Numa)),
    };
    let (mut best, mut other, mut unreachable) = (Vec::new(), Vec::new(), Vec::new());
    for r in ranks.iter().cloned() {
        if r.registration.bounces() {
            unreachable.push(r);
        } else if Some(r.tier) == preferred {
            best.push(r);
        } else {
            other.push(r);
        }
    }
    let groups = groups(best);
    // A machine that shows no NUMA node at all has one: every NIC is on it.
    let one_node = numa_nodes(t).is_empty();
    let fallback = match (memory, numa) {
        _ if !groups.is_empty() => Vec::new(),
        (Memory::Device(_), Some(node)) => ranks
            .into_iter()
            .filter(|r| r.device.place.bdf().and_then(|b| t.by_bdf(b).ok()).and_then(|d| d.numa_node) == Some(node))
            .collect(),
        (_, None) if one_node => ranks,
        _ => Vec::new(),
    };
    Ok(Pick { memory, numa, groups, other, unreachable, fallback })
}

/// NVIDIA display and 3D controllers in PCI bus order: CUDA's device ordinals under
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID` (entry N is `cuda:N`), before `CUDA_VISIBLE_DEVICES` narrows
/// or reorders them. CUDA's default order (fastest first) may differ.
pub fn cuda_order(t: &Topology) -> Vec<DevIdx> {
    let mut gpus: Vec<DevIdx> = t
        .indices()
        .filter(|&i| {
            let d = t.device(i);
            d.vendor == 0x10de && d.class >> 16 == 0x03
        })
        .collect();
    gpus.sort_by_key(|&i| t.device(i).bdf);
    gpus
}

/// The NUMA nodes the machine's PCI functions sit on, ascending (empty when none is known).
pub fn numa_nodes(t: &Topology) -> Vec<i32> {
    let mut nodes: Vec<i32> = t.indices().filter_map(|i| t.device(i).numa_node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// `fixtures/derived-gpu-nic`: GPU 03 + mlx5_0 below one switch, GPUs 0e/0f + mlx5_1 below
    /// another, GPU 15 alone (node 0); GPUs 83/84 + mlx5_2 below one switch with ACS redirect
    /// above GPU 83 (node 1).
    fn registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/derived-gpu-nic");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    fn names(rs: &[NicRank]) -> Vec<&str> {
        rs.iter().map(|r| r.device.name.as_str()).collect()
    }

    fn device(reg: &Registry, bdf: &str) -> Pick {
        pick(reg, Memory::Device(bdf.parse().unwrap())).unwrap()
    }

    #[test]
    fn a_gpus_best_nics_are_the_direct_ones_and_nics_that_cannot_reach_it_are_unreachable() {
        let reg = registry();
        let p = device(&reg, "0000:03:00.0");
        assert_eq!(p.groups.len(), 1);
        assert_eq!(names(p.best()), ["mlx5_0"]);
        assert!(p.fallback.is_empty() && p.other.is_empty(), "{p:#?}");
        // mlx5_1 and mlx5_2 sit across a host bridge the kernel refuses: they bounce.
        assert_eq!(names(&p.unreachable), ["mlx5_1", "mlx5_2"]);
        assert!(p.unreachable.iter().all(|r| r.registration.bounces()));
        assert_eq!(p.numa, Some(0));
    }

    #[test]
    fn a_gpu_without_a_direct_nic_falls_back_to_its_numa_nodes_nics_marked_as_such() {
        let reg = registry();
        let p = device(&reg, "0000:15:00.0");
        assert!(p.groups.is_empty());
        assert_eq!(names(&p.fallback), ["mlx5_0", "mlx5_1"], "node 0's NICs, in rank order");
        assert_eq!(names(p.best()), ["mlx5_0", "mlx5_1"]);
        // GPU4: its switch has mlx5_2, but ACS redirects the pair: the fallback is node 1's NIC.
        let p = device(&reg, "0000:83:00.0");
        assert!(p.groups.is_empty());
        assert_eq!(names(&p.fallback), ["mlx5_2"]);
    }

    #[test]
    fn host_memory_prefers_its_nodes_nics_and_every_nic_reaches_it() {
        let reg = registry();
        let p = pick(&reg, Memory::Node(Some(1))).unwrap();
        assert_eq!(names(p.best()), ["mlx5_2"]);
        assert_eq!(names(&p.other), ["mlx5_0", "mlx5_1"]);
        assert!(p.unreachable.is_empty() && p.fallback.is_empty());
        let p = pick(&reg, Memory::Node(Some(0))).unwrap();
        assert_eq!(p.groups.len(), 1, "no bandwidth tells node 0's two NICs apart: one tie");
        assert_eq!(names(p.best()), ["mlx5_0", "mlx5_1"]);
        // An unknown node prefers nothing.
        let p = pick(&reg, Memory::Node(None)).unwrap();
        assert!(p.groups.is_empty() && p.best().is_empty());
        assert_eq!(p.other.len(), 3);
    }

    #[test]
    fn ties_group_adjacent_equal_ranks_and_a_narrower_path_starts_a_new_group() {
        let reg = registry();
        let base = device(&reg, "0000:03:00.0").groups[0][0].clone();
        let with = |name: &str, bw: f64| {
            let mut r = base.clone();
            r.device.name = name.into();
            r.bandwidth_gbs = Some(bw);
            r
        };
        let g = groups(vec![with("a", 31.5), with("b", 31.5), with("c", 0.25)]);
        let g: Vec<Vec<&str>> = g.iter().map(|g| names(g)).collect();
        assert_eq!(g, [vec!["a", "b"], vec!["c"]]);
    }

    #[test]
    fn cuda_ordinals_are_nvidia_gpus_in_bus_order_and_nodes_are_the_known_ones() {
        let reg = registry();
        let t = reg.topology();
        let bdfs: Vec<String> = cuda_order(t).iter().map(|&i| t.device(i).bdf.to_string()).collect();
        assert_eq!(
            bdfs,
            ["0000:03:00.0", "0000:0e:00.0", "0000:0f:00.0", "0000:15:00.0", "0000:83:00.0", "0000:84:00.0"]
        );
        assert_eq!(numa_nodes(t), [0, 1]);
    }

    #[test]
    fn a_device_outside_the_topology_is_an_error() {
        let reg = registry();
        let e = pick(&reg, Memory::Device("0000:42:00.0".parse().unwrap())).unwrap_err();
        assert!(matches!(e, NicError::ProviderUnknown(_)), "{e}");
    }
}
