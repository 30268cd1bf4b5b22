//! The topology as the XML NCCL reads from `NCCL_TOPO_FILE`, within the limits NCCL's parser
//! and topology code keep, so a VM or container user can hand NCCL the host's fabric.
//!
//! - [`tree`]: what the file holds: GPUs and NICs below the bridges NCCL nests them in, each
//!   NIC with its nets, and what is left out to stay within NCCL's element limit, and why.
//! - [`write`]: the text: attributes as NCCL's own dumps write them (link speed and width by
//!   its rule), values within its length, bus ids and names mapped for a guest.
//! - [`map`]: host-to-guest bus ids and RDMA device names for a file used inside a VM.
//! - [`check`]: NCCL's reading of a file replayed (tokenizer, limits, required attributes).
//!   Every export passes it before it is returned.
//!
//! Owns: `export`, `Export`, `NcclError` and NCCL's limits as constants. Must not: judge whether
//! a pair is direct (the registry and the mover do) or invent a fact sysfs does not give.

pub mod check;
pub mod map;
pub mod tree;
mod write;

use std::path::PathBuf;

use crate::nic::NicError;
use crate::pci::topology::Topology;
use crate::pci::Bdf;

pub use check::{check, Checked, Problem, Rule};
pub use map::{BusMap, MapError};
pub use tree::{LeftOut, LeftOutWhy};

/// NCCL's `NCCL_TOPO_XML_VERSION`.
pub const XML_VERSION: u32 = 1;
/// The elements NCCL's XML holds for a topology (its parser refuses a file that reaches it:
/// it checks for room before every read, closing tags and the end of the file included).
pub const NCCL_MAX_ELEMENTS: usize = 256;
/// The longest attribute value NCCL's tokenizer takes, in bytes.
pub const NCCL_MAX_VALUE_BYTES: usize = 253;
/// The attributes NCCL keeps per element (it drops the rest).
pub const NCCL_MAX_ATTRS: usize = 16;
/// The children NCCL holds per element.
pub const NCCL_MAX_CHILDREN: usize = 640;
/// The elements NCCL adds to the file's tree in each process, for its own GPU: one `gpu`, one
/// `nvlink` per distinct NVLink peer (a GPU has at most 18 links), one `c2c`. Its network
/// plugin's devices add none when the file names them all (each `net` is found by name); a
/// `nic` without a `net` gets one more (counted by the tree).
pub const RESERVED_AT_RUN_TIME: usize = 1 + 18 + 1;

/// How to export.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The `system` element's name (cut to NCCL's value length on a UTF-8 boundary).
    pub name: String,
    /// Host-to-guest bus ids and RDMA device names.
    pub map: BusMap,
}

/// A topology file and what it says about itself.
#[derive(Debug, Clone)]
pub struct Export {
    pub xml: String,
    /// Elements in the file, as NCCL's parser counts them.
    pub elements: usize,
    /// Elements NCCL adds at run time in each process (kept free below its limit).
    pub added_at_run_time: usize,
    /// NICs (and software RDMA devices) left out to stay within NCCL's limit, in drop order.
    pub left_out: Vec<LeftOut>,
    /// The RDMA device names the file holds (as NCCL will see them), PCI order.
    pub rdma_names: Vec<String>,
    /// Facts the file leaves to NCCL, one line each.
    pub notes: Vec<String>,
}

/// Why no file was written. Each names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error(
        "the GPUs alone need {elements} elements, and NCCL's limit is {NCCL_MAX_ELEMENTS} with {reserved} kept \
         for what it adds at run time: no file NCCL reads holds this machine"
    )]
    TooBig { elements: usize, reserved: usize },
    #[error("{origin}: {host} is not a PCI function of {root}")]
    MapUnknownFunction { origin: String, host: Bdf, root: PathBuf },
    #[error("{origin}: {host} is not an RDMA device of {root}")]
    MapUnknownName { origin: String, host: String, root: PathBuf },
    #[error("bus id {busid} would name both {first} and {second}: NCCL finds the first only{hint}")]
    BusIdClash { busid: Bdf, first: Bdf, second: Bdf, hint: String },
    #[error("net name {name} would name both {first} and {second}: NCCL finds the first only")]
    NetNameClash { name: String, first: String, second: String },
    #[error(
        "{what} (from {file}): NCCL fills it from the machine it runs on only for the CPU above its own \
         GPU, and this file has {cpus} CPU elements"
    )]
    CpuFacts { what: String, file: PathBuf, cpus: usize },
    #[error("the export breaks NCCL's rules, a peermem bug: {0}")]
    Refused(String),
    #[error(transparent)]
    Nic(#[from] NicError),
}

/// The topology file for `t`, checked against NCCL's rules.
pub fn export(t: &Topology, opts: &Options) -> Result<Export, NcclError> {
    check_map(t, &opts.map)?;
    let cands = tree::candidates(t)?;
    let (tree, left_out) = tree::fit(t, cands)?;
    let out = write::write(t, &tree, opts)?;
    let checked = check(&out.xml);
    if !checked.is_ok() {
        let list: Vec<String> = checked.problems.iter().map(|p| p.to_string()).collect();
        return Err(NcclError::Refused(list.join("; ")));
    }
    if checked.elements != tree.elements() {
        let counts = format!("{} elements planned, {} written", tree.elements(), checked.elements);
        return Err(NcclError::Refused(counts));
    }
    Ok(Export {
        xml: out.xml,
        elements: checked.elements,
        added_at_run_time: checked.added_at_run_time,
        left_out,
        rdma_names: out.rdma_names,
        notes: out.notes,
    })
}

/// Every mapped host function must be one of `t`, every mapped name one of its RDMA devices.
fn check_map(t: &Topology, map: &BusMap) -> Result<(), NcclError> {
    for (host, origin) in map.pci_hosts() {
        if t.idx(host).is_err() {
            return Err(NcclError::MapUnknownFunction { origin: origin.into(), host, root: t.root().to_path_buf() });
        }
    }
    if map.name_hosts().next().is_none() {
        return Ok(());
    }
    let names: Vec<String> = crate::nic::devices(t.root())?.into_iter().map(|d| d.name).collect();
    for (host, origin) in map.name_hosts() {
        if !names.iter().any(|n| n == host) {
            return Err(NcclError::MapUnknownName {
                origin: origin.into(),
                host: host.into(),
                root: t.root().to_path_buf(),
            });
        }
    }
    Ok(())
}

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
