//! Which rails exist between a local and a remote memory. Each side brings its NICs as the core
//! ranks them for its memory (`peermem::nic`): whether the NIC's registration takes the memory
//! itself (the ranking's `registration`, decided by the mover's `reachable`) and the bottleneck
//! bandwidth of its path. A rail is a pair of NICs that each reach their memory so; its bandwidth
//! is the narrower side's. When no pair exists, the request stages through registered host
//! memory, and the choice says why.
//!
//! Owns: `NicReach`, `RailSpec`, `Choice`, `choose`. Must not: judge whether a NIC reaches a
//! memory (it copies the core's answer) or open a device.

use peermem::nic::NicRank;

/// One NIC as one side's memory sees it: a copy of the core's answer, small enough to travel in
/// the metadata to the peer.
#[derive(Debug, Clone, PartialEq)]
pub struct NicReach {
    pub nic: String,
    /// The NIC's registration takes the memory itself (dma-buf import or pinned pages).
    pub direct: bool,
    /// The bottleneck bandwidth between the NIC and the memory, Gb/s, when the fabric knows it.
    pub bandwidth_gbs: Option<f64>,
    /// How the NIC registers the memory, and why (the ranking's own words).
    pub why: String,
}

impl NicReach {
    /// The core's ranking of one NIC, as the engine keeps it.
    pub fn from_rank(rank: &NicRank) -> NicReach {
        NicReach {
            nic: rank.device.name.clone(),
            direct: !rank.registration.bounces(),
            bandwidth_gbs: rank.bandwidth_gbs,
            why: rank.registration.describe(),
        }
    }
}

/// A rail as the fabric offers it.
#[derive(Debug, Clone, PartialEq)]
pub struct RailSpec {
    pub local: String,
    pub remote: String,
    /// The narrower of the two sides' bottleneck bandwidths (Gb/s), when either is known.
    pub bandwidth_gbs: Option<f64>,
}

/// The fabric's answer for a pair of memories.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Every usable pair, widest first.
    Rails(Vec<RailSpec>),
    /// No pair of NICs reaches both memories: stage through registered host memory.
    Stage { reasons: Vec<String> },
}

/// The narrower of two bandwidths, either of which may be unknown.
fn narrower(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The side's NICs that cannot be used, one reason each.
fn refusals(side: &str, nics: &[NicReach]) -> Vec<String> {
    let mut out: Vec<String> = nics
        .iter()
        .filter(|n| !n.direct)
        .map(|n| format!("{side} {} does not reach the {side} memory directly: {}", n.nic, n.why))
        .collect();
    if nics.is_empty() {
        out.push(format!("the {side} side has no NIC"));
    }
    out
}

/// The rails between the `local` and `remote` memories, given each side's NICs.
pub fn choose(local: &[NicReach], remote: &[NicReach]) -> Choice {
    let mut rails: Vec<RailSpec> = local
        .iter()
        .filter(|l| l.direct)
        .flat_map(|l| {
            remote.iter().filter(|r| r.direct).map(move |r| RailSpec {
                local: l.nic.clone(),
                remote: r.nic.clone(),
                bandwidth_gbs: narrower(l.bandwidth_gbs, r.bandwidth_gbs),
            })
        })
        .collect();
    if rails.is_empty() {
        let mut reasons = refusals("local", local);
        reasons.extend(refusals("remote", remote));
        return Choice::Stage { reasons };
    }
    rails.sort_by(|a, b| b.bandwidth_gbs.unwrap_or(0.0).total_cmp(&a.bandwidth_gbs.unwrap_or(0.0)));
    Choice::Rails(rails)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use peermem::nic::rank_for_export;
    use peermem::{Registry, Topology};

    /// `fixtures/derived-gpu-nic`: GPU 03 + mlx5_0 below one switch, GPUs 0e/0f + mlx5_1 below
    /// another, GPU 15 alone (node 0); GPUs 83/84 + mlx5_2 below one switch, ACS redirect above
    /// GPU 83 (node 1). Both hosts of a test have this machine.
    fn reach(gpu: &str) -> Vec<NicReach> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/derived-gpu-nic");
        let reg = Registry::new(Arc::new(Topology::discover(root).unwrap()));
        rank_for_export(&reg, gpu.parse().unwrap()).unwrap().iter().map(NicReach::from_rank).collect()
    }

    fn nic(name: &str, direct: bool, gbs: Option<f64>) -> NicReach {
        NicReach { nic: name.into(), direct, bandwidth_gbs: gbs, why: "test".into() }
    }

    #[test]
    fn a_gpu_that_one_nic_reaches_is_never_sent_over_the_others() {
        let local = reach("0000:03:00.0");
        let remote = reach("0000:0e:00.0");
        let Choice::Rails(rails) = choose(&local, &remote) else { panic!("{local:#?} {remote:#?}") };
        let pairs: Vec<(&str, &str)> = rails.iter().map(|r| (r.local.as_str(), r.remote.as_str())).collect();
        assert_eq!(pairs, [("mlx5_0", "mlx5_1")]);
    }

    #[test]
    fn memory_no_nic_reaches_stages_through_host_memory_with_the_reasons() {
        // GPU 15 is alone on its root port: every NIC's registration bounces.
        let local = reach("0000:15:00.0");
        assert!(local.iter().all(|n| !n.direct), "{local:#?}");
        let Choice::Stage { reasons } = choose(&local, &reach("0000:03:00.0")) else { panic!() };
        let mine: Vec<&String> = reasons.iter().filter(|r| r.starts_with("local ")).collect();
        assert_eq!(mine.len(), local.len(), "one reason per local NIC: {reasons:#?}");
        assert!(mine.iter().all(|r| r.contains("bounces")), "{reasons:#?}");
    }

    #[test]
    fn a_rails_bandwidth_is_the_narrower_side_and_rails_come_widest_first() {
        let local = [nic("a", true, Some(400.0)), nic("b", true, Some(100.0)), nic("c", false, Some(800.0))];
        let remote = [nic("x", true, Some(200.0)), nic("y", true, None)];
        let Choice::Rails(rails) = choose(&local, &remote) else { panic!() };
        let got: Vec<(&str, &str, Option<f64>)> =
            rails.iter().map(|r| (r.local.as_str(), r.remote.as_str(), r.bandwidth_gbs)).collect();
        assert_eq!(
            got,
            [("a", "y", Some(400.0)), ("a", "x", Some(200.0)), ("b", "x", Some(100.0)), ("b", "y", Some(100.0))]
        );
    }

    #[test]
    fn a_side_without_nics_stages_and_says_so() {
        let Choice::Stage { reasons } = choose(&[nic("a", true, None)], &[]) else { panic!() };
        assert_eq!(reasons, ["the remote side has no NIC"]);
    }
}
