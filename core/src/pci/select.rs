//! Which PCI functions users pair (GPUs, NICs, NVMe and other storage, accelerators), their
//! short stable labels (`GPU0`, `NIC0`, `NVME0`, `STOR0`, `ACC0`, in PCI bus order, `PCI0`... for
//! any other function), and the `--class` filter.
//!
//! Owns: the classification by PCI class code and class devices. Must not: depend on which
//! functions a filter shows: a label names the same function whatever is listed.

use crate::pci::topology::{DevIdx, PciDevice, Topology};

/// The kinds of endpoint users pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// Display or 3D controller, or a function with a `drm` class device.
    Gpu,
    /// Network or InfiniBand controller, or a function with a `net`/`infiniband` class device.
    Nic,
    /// NVM Express controller, or a function with an `nvme` class device.
    Nvme,
    /// Any other mass-storage controller (SATA, SAS, virtio-blk).
    Storage,
    /// Processor (co-processor) or processing accelerator.
    Acc,
}

impl EndpointKind {
    pub const ALL: [EndpointKind; 5] =
        [EndpointKind::Gpu, EndpointKind::Nic, EndpointKind::Nvme, EndpointKind::Storage, EndpointKind::Acc];

    /// The label prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            EndpointKind::Gpu => "GPU",
            EndpointKind::Nic => "NIC",
            EndpointKind::Nvme => "NVME",
            EndpointKind::Storage => "STOR",
            EndpointKind::Acc => "ACC",
        }
    }

    /// The `--class` name.
    pub fn name(self) -> &'static str {
        match self {
            EndpointKind::Gpu => "gpu",
            EndpointKind::Nic => "nic",
            EndpointKind::Nvme => "nvme",
            EndpointKind::Storage => "storage",
            EndpointKind::Acc => "acc",
        }
    }

    /// Parses a `--class` name (case-insensitive).
    pub fn parse(s: &str) -> Option<EndpointKind> {
        Self::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The kind of `d`, if it is an endpoint users pair. Class devices win over class codes (a
    /// virtio-net function is a NIC because the kernel made it `eth0`).
    pub fn of(d: &PciDevice) -> Option<EndpointKind> {
        if d.is_bridge() || d.class >> 16 == 0x06 {
            return None;
        }
        for c in &d.class_devices {
            match c.class.as_str() {
                "nvme" => return Some(EndpointKind::Nvme),
                "drm" => return Some(EndpointKind::Gpu),
                "infiniband" | "net" => return Some(EndpointKind::Nic),
                _ => {}
            }
        }
        match (d.class >> 16, (d.class >> 8) & 0xff) {
            (0x03, _) => Some(EndpointKind::Gpu),
            (0x01, 0x08) => Some(EndpointKind::Nvme),
            (0x01, _) => Some(EndpointKind::Storage),
            (0x02, _) | (0x0c, 0x06) => Some(EndpointKind::Nic),
            (0x0b, _) | (0x12, _) => Some(EndpointKind::Acc),
            _ => None,
        }
    }
}

/// Which functions to list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selection {
    /// Every endpoint kind.
    #[default]
    Endpoints,
    /// Only these kinds.
    Kinds(Vec<EndpointKind>),
    /// Every function, bridges included.
    All,
}

impl Selection {
    /// Parses `--class` values (comma-separated lists allowed); `all` selects every function.
    pub fn parse(values: &[String]) -> Result<Selection, String> {
        let mut kinds = Vec::new();
        for v in values.iter().flat_map(|v| v.split(',')).filter(|v| !v.trim().is_empty()) {
            if v.trim().eq_ignore_ascii_case("all") {
                return Ok(Selection::All);
            }
            let k = EndpointKind::parse(v).ok_or_else(|| {
                format!(
                    "unknown class {v:?} (expected one of: {}, all)",
                    EndpointKind::ALL.map(|k| k.name()).join(", ")
                )
            })?;
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        Ok(if kinds.is_empty() { Selection::Endpoints } else { Selection::Kinds(kinds) })
    }

    fn admits(&self, kind: Option<EndpointKind>) -> bool {
        match self {
            Selection::All => true,
            Selection::Endpoints => kind.is_some(),
            Selection::Kinds(ks) => kind.is_some_and(|k| ks.contains(&k)),
        }
    }
}

/// The label of every function of one topology.
#[derive(Debug, Clone)]
pub struct Labels {
    topo: u32,
    labels: Vec<String>,
    kinds: Vec<Option<EndpointKind>>,
}

impl Labels {
    /// Numbers each kind in PCI bus order (devices are held sorted by BDF).
    pub fn new(t: &Topology) -> Labels {
        let mut next = std::collections::HashMap::new();
        let mut labels = Vec::with_capacity(t.len());
        let mut kinds = Vec::with_capacity(t.len());
        for d in t.devices() {
            let kind = EndpointKind::of(d);
            let prefix = kind.map_or("PCI", |k| k.prefix());
            let n = next.entry(prefix).or_insert(0usize);
            labels.push(format!("{prefix}{n}"));
            *n += 1;
            kinds.push(kind);
        }
        Labels { topo: t.id(), labels, kinds }
    }

    pub fn label(&self, i: DevIdx) -> &str {
        &self.labels[i.get()]
    }

    pub fn kind(&self, i: DevIdx) -> Option<EndpointKind> {
        self.kinds[i.get()]
    }

    /// The device with this label (case-insensitive).
    pub fn find(&self, label: &str) -> Option<DevIdx> {
        self.labels.iter().position(|l| l.eq_ignore_ascii_case(label)).map(|i| DevIdx::of(self.topo, i))
    }

    /// The functions `sel` admits, in PCI bus order.
    pub fn select(&self, sel: &Selection) -> Vec<DevIdx> {
        (0..self.labels.len()).filter(|&i| sel.admits(self.kinds[i])).map(|i| DevIdx::of(self.topo, i)).collect()
    }
}
