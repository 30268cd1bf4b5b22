//! The P2P verdict for one (provider, client) pair: Linux 6.12 `calc_map_type_and_dist()` bit for
//! bit, then everything the kernel does not tell (ACS list and fix, NCCL-style label, bottleneck
//! bandwidth, IOMMU state, virtualization caveat, reasons in words).
//!
//! Owns: the verdict function and the host-bridge allowlist (as data tagged by kernel version).
//! Must not: compute addresses (that is `route`), or hide an unknown input: ACS that could not be
//! read is listed in `acs_unknown` and in the reasons.

use crate::pci::bdf::Bdf;
use crate::pci::topology::{DevIdx, HostBridgeDev, Topology};
use crate::platform::KernelVersion;

/// The kernel's `enum pci_p2pdma_map_type` (without UNKNOWN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapType {
    BusAddr,
    ThruHostBridge,
    NotSupported,
}

impl MapType {
    pub fn as_str(self) -> &'static str {
        match self {
            MapType::BusAddr => "bus_addr",
            MapType::ThruHostBridge => "thru_host_bridge",
            MapType::NotSupported => "not_supported",
        }
    }
}

/// NCCL-style path label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PathLabel {
    /// Below one switch (or one device): at most one bridge hierarchy level.
    PIX,
    /// Below a common bridge, across several switch levels, without the host bridge.
    PXB,
    /// Through the host bridge (root complex) of one hierarchy.
    PHB,
    /// Across host bridges (or NUMA nodes).
    SYS,
}

/// One entry of the kernel's `pci_p2pdma_whitelist[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry {
    pub vendor: u16,
    pub device: u16,
    /// `REQ_SAME_HOST_BRIDGE`: only allowed when provider and client share this host bridge.
    pub req_same_host_bridge: bool,
    /// First kernel release whose p2pdma.c lists the entry.
    pub since: KernelVersion,
    pub name: &'static str,
}

/// The Linux 6.12 allowlist. `since` records when each entry entered mainline
/// (v5.2: first Intel entries together with the table; v5.5: 0x2031-0x2033 Skylake-E root
/// ports B-D; v5.8: REQ_SAME_HOST_BRIDGE 0x3c01/0x2f01 and 0x2020; v5.16: 0x09a2 Ice Lake-SP).
/// A kernel older than `since` does not have the entry.
pub const ALLOWLIST: &[AllowEntry] = &[
    AllowEntry {
        vendor: 0x8086,
        device: 0x3c00,
        req_same_host_bridge: true,
        since: KernelVersion(5, 2, 0),
        name: "Xeon E5/Core i7 (Sandy Bridge-EP)",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x3c01,
        req_same_host_bridge: true,
        since: KernelVersion(5, 8, 0),
        name: "Xeon E5/Core i7 (Sandy Bridge-EP)",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2f00,
        req_same_host_bridge: true,
        since: KernelVersion(5, 2, 0),
        name: "Xeon E7 v3/E5 v3 (Haswell-EP)",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2f01,
        req_same_host_bridge: true,
        since: KernelVersion(5, 8, 0),
        name: "Xeon E7 v3/E5 v3 (Haswell-EP)",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2030,
        req_same_host_bridge: false,
        since: KernelVersion(5, 2, 0),
        name: "Skylake-E root port A",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2031,
        req_same_host_bridge: false,
        since: KernelVersion(5, 5, 0),
        name: "Skylake-E root port B",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2032,
        req_same_host_bridge: false,
        since: KernelVersion(5, 5, 0),
        name: "Skylake-E root port C",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2033,
        req_same_host_bridge: false,
        since: KernelVersion(5, 5, 0),
        name: "Skylake-E root port D",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x2020,
        req_same_host_bridge: false,
        since: KernelVersion(5, 8, 0),
        name: "Skylake-E host bridge",
    },
    AllowEntry {
        vendor: 0x8086,
        device: 0x09a2,
        req_same_host_bridge: false,
        since: KernelVersion(5, 16, 0),
        name: "Ice Lake-SP",
    },
];

/// The IOMMU state of one side.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IommuState {
    pub group: Option<u32>,
    pub domain_type: Option<String>,
    pub translating: bool,
}

/// How the host-bridge rule decided (only when the path crosses the root complex).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostBridgeCheck {
    pub cpu_supports_p2pdma: bool,
    pub cpu: String,
    pub same_host_bridge: bool,
    pub provider_host_bridge: String,
    pub client_host_bridge: String,
    pub provider_allowed: bool,
    pub client_allowed: bool,
}

/// The verdict for one (provider, client) pair.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub provider: Bdf,
    pub client: Bdf,
    pub map_type: MapType,
    pub distance: u32,
    pub common_upstream: Option<Bdf>,
    /// Devices with ACS redirect on the path, in the kernel's order (provider side first).
    pub acs_redirect: Vec<Bdf>,
    /// Devices on the path whose ACS state could not be read (truncated config).
    pub acs_unknown: Vec<Bdf>,
    /// The kernel parameter that removes the redirects: `pci=disable_acs_redir=a;b`.
    pub acs_fix: Option<String>,
    pub path: PathLabel,
    /// Narrowest link on the path, in GB/s, and the device whose upstream link it is.
    pub bandwidth_gbs: Option<f64>,
    pub bottleneck: Option<Bdf>,
    pub host_bridge: Option<HostBridgeCheck>,
    pub provider_iommu: IommuState,
    pub client_iommu: IommuState,
    pub virtualized: bool,
    pub reasons: Vec<String>,
}

fn iommu_state(t: &Topology, i: DevIdx) -> IommuState {
    match &t.device(i).iommu_group {
        Some(g) => IommuState { group: Some(g.id), domain_type: g.domain_type.clone(), translating: g.translating() },
        None => IommuState { group: None, domain_type: None, translating: false },
    }
}

/// The kernel's allowlist, as it stands in the sysroot's kernel (all 6.12 entries if unknown).
fn allowlist_for(kernel: Option<KernelVersion>) -> impl Iterator<Item = &'static AllowEntry> {
    ALLOWLIST.iter().filter(move |e| kernel.is_none_or(|k| k >= e.since))
}

/// `__host_bridge_whitelist()`: is the host bridge device of `hb` allowed.
fn host_bridge_allowed(t: &Topology, hb: &str, same: bool, reasons: &mut Vec<String>) -> bool {
    let Some(h) = t.host_bridge(hb) else {
        reasons.push(format!("host bridge {hb} has no devices"));
        return false;
    };
    let dev = match h.dev {
        HostBridgeDev::Empty => {
            reasons.push(format!("host bridge {hb}: root bus is empty"));
            return false;
        }
        HostBridgeDev::None => {
            let first = t.device(h.root_bus[0]).bdf;
            reasons.push(format!(
                "host bridge {hb}: first root-bus device {first} is neither 00.0 nor a Root Port, so the kernel finds no host bridge device to check"
            ));
            return false;
        }
        HostBridgeDev::AssumedRootPort(i) => {
            reasons.push(format!(
                "host bridge {hb}: {} is taken as a Root Port (a bridge on the root bus; its PCIe capability was not readable)",
                t.device(i).bdf
            ));
            i
        }
        HostBridgeDev::Devfn0(i) | HostBridgeDev::RootPort(i) => i,
    };
    let d = t.device(dev);
    let kernel = t.platform.kernel;
    match allowlist_for(kernel).find(|e| e.vendor == d.vendor && e.device == d.device) {
        Some(e) if e.req_same_host_bridge && !same => {
            reasons.push(format!(
                "host bridge {} [{:04x}:{:04x}] ({}) is allowlisted only when provider and client share it",
                d.bdf, d.vendor, d.device, e.name
            ));
            false
        }
        Some(e) => {
            reasons.push(format!(
                "host bridge {} [{:04x}:{:04x}] ({}) is in the P2PDMA allowlist",
                d.bdf, d.vendor, d.device, e.name
            ));
            true
        }
        None => {
            let k =
                kernel.map(|k| format!("Linux {k}")).unwrap_or_else(|| "Linux 6.12 (kernel release unknown)".into());
            let later = ALLOWLIST.iter().find(|e| e.vendor == d.vendor && e.device == d.device);
            match later {
                Some(e) => reasons.push(format!(
                    "host bridge {} [{:04x}:{:04x}] is allowlisted only since Linux {}; this sysroot runs {k}",
                    d.bdf, d.vendor, d.device, e.since
                )),
                None => reasons.push(format!(
                    "host bridge {} [{:04x}:{:04x}] is not in the {k} P2PDMA allowlist",
                    d.bdf, d.vendor, d.device
                )),
            }
            false
        }
    }
}

impl Topology {
    /// ACS redirect of one device as `pci_bridge_has_acs_redir()` computes it; `None` if unknown.
    fn acs_redir(&self, i: DevIdx) -> Option<bool> {
        self.device(i).acs().redirects()
    }

    /// Computes the verdict for `provider` -> `client`.
    pub fn verdict(&self, provider: DevIdx, client: DevIdx) -> Verdict {
        let (pa, pb) = (self.device(provider), self.device(client));
        let mut reasons = Vec::new();
        let mut acs = Vec::new();
        let mut unknown = Vec::new();
        let note_acs = |t: &Topology, i: DevIdx, acs: &mut Vec<Bdf>, unknown: &mut Vec<Bdf>| match t.acs_redir(i) {
            Some(true) => acs.push(t.device(i).bdf),
            Some(false) => {}
            None => unknown.push(t.device(i).bdf),
        };

        // --- calc_map_type_and_dist(), loop for loop ---
        let mut a = Some(provider);
        let (mut dist_a, mut dist_b) = (0u32, 0u32);
        let mut common = None;
        'outer: while let Some(ai) = a {
            dist_b = 0;
            note_acs(self, ai, &mut acs, &mut unknown);
            let mut bb = Some(client);
            while let Some(bi) = bb {
                if ai == bi {
                    common = Some(ai);
                    break 'outer;
                }
                bb = self.upstream(bi);
                dist_b += 1;
            }
            a = self.upstream(ai);
            dist_a += 1;
        }
        let distance = dist_a + dist_b;
        let mut map_type = MapType::ThruHostBridge;
        if let Some(c) = common {
            let mut bb = Some(client);
            while let Some(bi) = bb {
                if bi == c {
                    break;
                }
                note_acs(self, bi, &mut acs, &mut unknown);
                bb = self.upstream(bi);
            }
            let cb = self.device(c).bdf;
            if acs.is_empty() {
                map_type = MapType::BusAddr;
                reasons.push(if provider == client {
                    format!("provider and client are the same function {cb} (distance 0)")
                } else {
                    format!("{} and {} share upstream bridge {cb} (distance {distance}): peer-to-peer TLPs turn around below it", pa.bdf, pb.bdf)
                });
            } else {
                reasons.push(format!(
                    "{} and {} share upstream bridge {cb} (distance {distance}), but ACS redirect is set on {}: requests are forced up to the root complex",
                    pa.bdf,
                    pb.bdf,
                    acs.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
        } else {
            // The kernel ignores the a-side ACS list when there is no common upstream device.
            acs.clear();
            unknown.clear();
            reasons.push(format!(
                "{} ({}) and {} ({}) share no upstream bridge (distance {distance}): traffic must cross the root complex",
                pa.bdf, pa.host_bridge, pb.bdf, pb.host_bridge
            ));
        }

        let mut host_bridge = None;
        if map_type == MapType::ThruHostBridge {
            let cpu = &self.platform.cpu;
            let zen = cpu.supports_p2pdma();
            let same = pa.host_bridge == pb.host_bridge;
            let mut hb_reasons = Vec::new();
            // host_bridge_whitelist(): short-circuits exactly like the kernel's && chain.
            let (pok, cok) = if zen {
                (false, false)
            } else if same {
                let ok = host_bridge_allowed(self, &pa.host_bridge, true, &mut hb_reasons);
                (ok, ok)
            } else {
                let p = host_bridge_allowed(self, &pa.host_bridge, false, &mut hb_reasons);
                let c = p && host_bridge_allowed(self, &pb.host_bridge, false, &mut hb_reasons);
                (p, c)
            };
            if zen {
                reasons.push(format!(
                    "CPU {} is AMD Zen or newer: the kernel allows P2P through the host bridge",
                    cpu.describe()
                ));
            } else {
                reasons.push(format!("CPU {} is not AMD Zen: the host bridge must be allowlisted", cpu.describe()));
                reasons.extend(hb_reasons);
                if !(pok && cok) {
                    map_type = MapType::NotSupported;
                    reasons.push(format!(
                        "not supported: the client and provider ({}) do not share an upstream bridge or allowlisted host bridge (the kernel fails such I/O with EREMOTEIO)",
                        pa.bdf
                    ));
                }
            }
            host_bridge = Some(HostBridgeCheck {
                cpu_supports_p2pdma: zen,
                cpu: cpu.describe(),
                same_host_bridge: same,
                provider_host_bridge: pa.host_bridge.clone(),
                client_host_bridge: pb.host_bridge.clone(),
                provider_allowed: pok,
                client_allowed: cok,
            });
        }

        let acs_fix = (!acs.is_empty()).then(|| {
            format!("pci=disable_acs_redir={}", acs.iter().map(|b| b.to_kernel_param()).collect::<Vec<_>>().join(";"))
        });
        if let Some(fix) = &acs_fix {
            reasons.push(format!("to disable ACS redirect for this path, boot with: {fix}"));
        }
        if !unknown.is_empty() {
            reasons.push(format!(
                "ACS state unknown for {} (config space read without root shows 64 bytes, or the kernel exposes no extended config): the verdict assumes no ACS redirect there; if one is set the real map type is thru_host_bridge or not_supported",
                unknown.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
            ));
        }

        // --- beyond the kernel ---
        let path = match common {
            Some(_) if map_type != MapType::BusAddr => PathLabel::PHB,
            Some(_) if distance <= 4 => PathLabel::PIX,
            Some(_) => PathLabel::PXB,
            None if pa.host_bridge == pb.host_bridge => PathLabel::PHB,
            None => PathLabel::SYS,
        };
        if path == PathLabel::SYS && pa.numa_node.is_some() && pa.numa_node != pb.numa_node {
            reasons.push(format!(
                "provider is on NUMA node {}, client on {}: the path crosses the CPU interconnect",
                pa.numa_node.map_or("?".into(), |n| n.to_string()),
                pb.numa_node.map_or("?".into(), |n| n.to_string())
            ));
        }
        let (bandwidth_gbs, bottleneck) = self.bottleneck(provider, client, common);
        let provider_iommu = iommu_state(self, provider);
        let client_iommu = iommu_state(self, client);
        for (who, bdf, st) in [("provider", pa.bdf, &provider_iommu), ("client", pb.bdf, &client_iommu)] {
            if let Some(g) = st.group {
                let ty = st.domain_type.as_deref().unwrap_or("unknown");
                reasons.push(if st.translating {
                    format!("{who} {bdf} is in IOMMU group {g} (type {ty}): its DMA through the root complex is translated (program an IOVA)")
                } else {
                    format!("{who} {bdf} is in IOMMU group {g} (type {ty}): no translation")
                });
            }
        }
        let virtualized = self.platform.virt.virtualized;
        if virtualized {
            reasons.push(format!(
                "virtualized platform ({}): this is the hypervisor's emulated topology; real P2P depends on the host fabric, and an emulated IOMMU may translate even bus-address traffic: verify a direct route with a canary before trusting it",
                self.platform.virt.signals.join("; ")
            ));
        }
        Verdict {
            provider: pa.bdf,
            client: pb.bdf,
            map_type,
            distance,
            common_upstream: common.map(|c| self.device(c).bdf),
            acs_redirect: acs,
            acs_unknown: unknown,
            acs_fix,
            path,
            bandwidth_gbs,
            bottleneck,
            host_bridge,
            provider_iommu,
            client_iommu,
            virtualized,
            reasons,
        }
    }

    /// The narrowest current link on the path (each device's own link is its upstream link).
    fn bottleneck(&self, a: DevIdx, b: DevIdx, common: Option<DevIdx>) -> (Option<f64>, Option<Bdf>) {
        let mut best: Option<(f64, Bdf)> = None;
        for start in [a, b] {
            for i in self.chain(start) {
                if Some(i) == common {
                    break;
                }
                let d = self.device(i);
                if let Some(bw) = d.link.bandwidth_gbs() {
                    if best.is_none_or(|(x, _)| bw < x) {
                        best = Some((bw, d.bdf));
                    }
                }
            }
        }
        (best.map(|b| b.0), best.map(|b| b.1))
    }
}
