//! The P2P verdict for one (provider, client) pair, in two parts that never mix:
//!
//! 1. [`calc_map_type_and_dist`]: Linux 6.12 `drivers/pci/p2pdma.c` transcribed loop for loop
//!    (`calc_map_type_and_dist()`, `host_bridge_whitelist()`, `__host_bridge_whitelist()`,
//!    `pci_host_bridge_dev()`), returning facts only: map type, distance, common device, the ACS
//!    devices in the kernel's order and the allowlist findings.
//! 2. [`Topology::verdict`]: the explanation the kernel does not give: NCCL-style label,
//!    bottleneck bandwidth, IOMMU state, virtualization caveat, reasons in words and the fix.
//!
//! Owns: both parts and the host-bridge allowlist (as data tagged by kernel version). Must not:
//! compute addresses (that is `route`), or hide an unknown input: ACS that could not be read is
//! listed in `acs_unknown` and in the reasons.

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

/// NCCL-style path label (the names `nvidia-smi topo -m` and NCCL print).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PathLabel {
    /// Below one switch (or one device): at most one bridge hierarchy level.
    PIX,
    /// Below a common bridge, across several switch levels, without the host bridge.
    PXB,
    /// Through the host bridge (root complex) of one hierarchy.
    PHB,
    /// Across host bridges of one NUMA node.
    NODE,
    /// Across NUMA nodes, or across host bridges whose NUMA node is unknown.
    SYS,
}

impl PathLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            PathLabel::PIX => "PIX",
            PathLabel::PXB => "PXB",
            PathLabel::PHB => "PHB",
            PathLabel::NODE => "NODE",
            PathLabel::SYS => "SYS",
        }
    }
}

impl std::fmt::Display for PathLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// The kernel's allowlist, as it stands in the sysroot's kernel (all 6.12 entries if unknown).
fn allowlist_for(kernel: Option<KernelVersion>) -> impl Iterator<Item = &'static AllowEntry> {
    ALLOWLIST.iter().filter(move |e| kernel.is_none_or(|k| k >= e.since))
}

// ------------------------------------------------------------------------------------------
// Part 1: the kernel, loop for loop. Facts only; no words.
// ------------------------------------------------------------------------------------------

/// What `__host_bridge_whitelist()` decided for one host bridge, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowOutcome {
    /// The host bridge name has no devices in this topology.
    NoDevices,
    /// `pci_host_bridge_dev()` finds no device: the root bus is empty.
    EmptyRootBus,
    /// `pci_host_bridge_dev()` returns NULL: the first root-bus device is neither 00.0 nor a
    /// Root Port.
    NoHostBridgeDevice { first: Bdf },
    /// Listed (and, for a `REQ_SAME_HOST_BRIDGE` entry, provider and client share it).
    Listed(&'static AllowEntry),
    /// Listed with `REQ_SAME_HOST_BRIDGE`, but provider and client are on different ones.
    SameHostBridgeOnly(&'static AllowEntry),
    /// Not in the sysroot kernel's table; `later` is the entry of a newer kernel, if any.
    NotListed { later: Option<&'static AllowEntry> },
}

/// One `__host_bridge_whitelist()` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowFinding {
    pub host_bridge: String,
    /// The device checked, with its vendor and device ID.
    pub device: Option<(Bdf, u16, u16)>,
    /// The device was taken as a Root Port although its PCIe capability was not readable.
    pub assumed_root_port: bool,
    pub outcome: AllowOutcome,
}

impl AllowFinding {
    pub fn allowed(&self) -> bool {
        matches!(self.outcome, AllowOutcome::Listed(_))
    }
}

/// `host_bridge_whitelist()` and `cpu_supports_p2pdma()` for a pair that crosses the root complex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBridgeCalc {
    pub cpu_supports_p2pdma: bool,
    pub same_host_bridge: bool,
    pub provider_allowed: bool,
    pub client_allowed: bool,
    /// The `__host_bridge_whitelist()` calls made, in the kernel's order (none on AMD Zen).
    pub findings: Vec<AllowFinding>,
}

/// The result of `calc_map_type_and_dist()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCalc {
    pub map_type: MapType,
    pub distance: u32,
    /// The first common upstream device, when the chains meet.
    pub common: Option<DevIdx>,
    /// Devices with ACS redirect that the kernel counts, in its order (provider side first).
    pub acs_redirect: Vec<DevIdx>,
    /// Devices on the same walk whose ACS state is unknown (truncated config).
    pub acs_unknown: Vec<DevIdx>,
    /// Present when the map type was decided by the host-bridge rule.
    pub host_bridge: Option<HostBridgeCalc>,
}

/// Linux 6.12 `calc_map_type_and_dist()` for `provider` (a) and `client` (b).
pub fn calc_map_type_and_dist(t: &Topology, provider: DevIdx, client: DevIdx) -> KernelCalc {
    let mut acs = Vec::new();
    let mut unknown = Vec::new();
    let note_acs = |i: DevIdx, acs: &mut Vec<DevIdx>, unknown: &mut Vec<DevIdx>| match t.device(i).acs().redirects() {
        Some(true) => acs.push(i),
        Some(false) => {}
        None => unknown.push(i),
    };

    // a = provider; while (a) { dist_b = 0; if (pci_bridge_has_acs_redir(a)) acs_cnt++;
    //   b = client; while (b) { if (a == b) goto check_b_path_acs; b = pci_upstream_bridge(b);
    //   dist_b++; } a = pci_upstream_bridge(a); dist_a++; }
    let mut a = Some(provider);
    let (mut dist_a, mut dist_b) = (0u32, 0u32);
    let mut common = None;
    'outer: while let Some(ai) = a {
        dist_b = 0;
        note_acs(ai, &mut acs, &mut unknown);
        let mut b = Some(client);
        while let Some(bi) = b {
            if ai == bi {
                common = Some(ai);
                break 'outer;
            }
            b = t.upstream(bi);
            dist_b += 1;
        }
        a = t.upstream(ai);
        dist_a += 1;
    }
    let distance = dist_a + dist_b;
    let Some(c) = common else {
        // *dist = dist_a + dist_b; goto map_through_host_bridge: the a-side ACS count is unused.
        let host_bridge = host_bridge_whitelist(t, provider, client);
        let map_type = host_bridge_map_type(&host_bridge);
        return KernelCalc {
            map_type,
            distance,
            common,
            acs_redirect: Vec::new(),
            acs_unknown: Vec::new(),
            host_bridge: Some(host_bridge),
        };
    };
    // check_b_path_acs: bb = b; while (bb) { if (a == bb) break; if (acs_redir(bb)) acs_cnt++;
    //   bb = pci_upstream_bridge(bb); }
    let mut bb = Some(client);
    while let Some(bi) = bb {
        if bi == c {
            break;
        }
        note_acs(bi, &mut acs, &mut unknown);
        bb = t.upstream(bi);
    }
    if acs.is_empty() {
        return KernelCalc {
            map_type: MapType::BusAddr,
            distance,
            common,
            acs_redirect: acs,
            acs_unknown: unknown,
            host_bridge: None,
        };
    }
    let host_bridge = host_bridge_whitelist(t, provider, client);
    let map_type = host_bridge_map_type(&host_bridge);
    KernelCalc { map_type, distance, common, acs_redirect: acs, acs_unknown: unknown, host_bridge: Some(host_bridge) }
}

/// `map_through_host_bridge:` if (!cpu_supports_p2pdma() && !host_bridge_whitelist(...))
/// return PCI_P2PDMA_MAP_NOT_SUPPORTED; return PCI_P2PDMA_MAP_THRU_HOST_BRIDGE.
fn host_bridge_map_type(hb: &HostBridgeCalc) -> MapType {
    if hb.cpu_supports_p2pdma || (hb.provider_allowed && hb.client_allowed) {
        MapType::ThruHostBridge
    } else {
        MapType::NotSupported
    }
}

/// `host_bridge_whitelist()`, short-circuiting exactly like the kernel's `&&` chain (and not
/// called at all when `cpu_supports_p2pdma()` is true).
fn host_bridge_whitelist(t: &Topology, provider: DevIdx, client: DevIdx) -> HostBridgeCalc {
    let (pa, pb) = (t.device(provider), t.device(client));
    let zen = t.platform.cpu.supports_p2pdma();
    let same = pa.host_bridge == pb.host_bridge;
    let mut findings = Vec::new();
    let (pok, cok) = if zen {
        (false, false)
    } else if same {
        let f = host_bridge_allowed(t, &pa.host_bridge, true);
        let ok = f.allowed();
        findings.push(f);
        (ok, ok)
    } else {
        let f = host_bridge_allowed(t, &pa.host_bridge, false);
        let p = f.allowed();
        findings.push(f);
        let c = p && {
            let f = host_bridge_allowed(t, &pb.host_bridge, false);
            let ok = f.allowed();
            findings.push(f);
            ok
        };
        (p, c)
    };
    HostBridgeCalc {
        cpu_supports_p2pdma: zen,
        same_host_bridge: same,
        provider_allowed: pok,
        client_allowed: cok,
        findings,
    }
}

/// `__host_bridge_whitelist()`: is the host bridge device of `hb` allowed.
fn host_bridge_allowed(t: &Topology, hb: &str, same: bool) -> AllowFinding {
    let mut f = AllowFinding {
        host_bridge: hb.to_string(),
        device: None,
        assumed_root_port: false,
        outcome: AllowOutcome::NoDevices,
    };
    let Some(h) = t.host_bridge(hb) else {
        return f;
    };
    // pci_host_bridge_dev(): the first device on the root bus, if devfn 0 or a Root Port.
    let dev = match h.dev {
        HostBridgeDev::Empty => {
            f.outcome = AllowOutcome::EmptyRootBus;
            return f;
        }
        HostBridgeDev::None => {
            f.outcome = AllowOutcome::NoHostBridgeDevice { first: t.device(h.root_bus[0]).bdf };
            return f;
        }
        HostBridgeDev::AssumedRootPort(i) => {
            f.assumed_root_port = true;
            i
        }
        HostBridgeDev::Devfn0(i) | HostBridgeDev::RootPort(i) => i,
    };
    let d = t.device(dev);
    f.device = Some((d.bdf, d.vendor, d.device));
    f.outcome = match allowlist_for(t.platform.kernel).find(|e| e.vendor == d.vendor && e.device == d.device) {
        Some(e) if e.req_same_host_bridge && !same => AllowOutcome::SameHostBridgeOnly(e),
        Some(e) => AllowOutcome::Listed(e),
        None => {
            AllowOutcome::NotListed { later: ALLOWLIST.iter().find(|e| e.vendor == d.vendor && e.device == d.device) }
        }
    };
    f
}

// ------------------------------------------------------------------------------------------
// Part 2: the explanation. Everything below reads a `KernelCalc`; nothing changes it.
// ------------------------------------------------------------------------------------------

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

/// The smallest change that removes ACS redirects from a set of devices, in every form a user
/// can apply: both kernel command-line forms and the run-time register writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AcsFix {
    pub devices: Vec<Bdf>,
    /// `pci=disable_acs_redir=<bdf>;<bdf>` (Linux 4.20+).
    pub disable_acs_redir: String,
    /// `pci=config_acs=x0x00xx@<bdf>;...` (Linux 6.11+): clears RR, CR and EC, keeps the rest.
    pub config_acs: String,
    /// `setpci` lines clearing RR, CR and EC in each ACS control register now (until reboot).
    pub setpci: Vec<String>,
    pub trade_off: &'static str,
}

/// What disabling ACS redirect costs, in one sentence.
pub const ACS_TRADE_OFF: &str = "Without ACS redirect these devices reach each other's memory without the IOMMU checking it, so they are no longer isolated from one another (do not assign them to different VMs or untrusted users).";

impl AcsFix {
    /// The fix for `devices` (deduplicated, in the order given). `None` when empty.
    pub fn for_devices(devices: &[Bdf]) -> Option<AcsFix> {
        let mut devs: Vec<Bdf> = Vec::new();
        for d in devices {
            if !devs.contains(d) {
                devs.push(*d);
            }
        }
        if devs.is_empty() {
            return None;
        }
        let join = |f: &dyn Fn(&Bdf) -> String| devs.iter().map(f).collect::<Vec<_>>().join(";");
        // ACS control bits 6..0 = DT EC UF CR RR TB SV; '0' clears, 'x' keeps.
        Some(AcsFix {
            disable_acs_redir: format!("pci=disable_acs_redir={}", join(&|b| b.to_kernel_param())),
            config_acs: format!("pci=config_acs={}", join(&|b| format!("x0x00xx@{}", b.to_kernel_param()))),
            setpci: devs.iter().map(|b| format!("setpci -s {b} ECAP0d+6.w=0000:002c")).collect(),
            devices: devs,
            trade_off: ACS_TRADE_OFF,
        })
    }
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
    /// The label of the path the data takes (an ACS detour through the root complex is PHB).
    pub path: PathLabel,
    /// The label of the switch path below the common device when ACS detours the pair (PIX or
    /// PXB): both facts, the fabric and the detour.
    pub switch_path: Option<PathLabel>,
    /// Narrowest link on the path, in GB/s, and the device whose upstream link it is.
    pub bandwidth_gbs: Option<f64>,
    pub bottleneck: Option<Bdf>,
    pub host_bridge: Option<HostBridgeCheck>,
    pub provider_iommu: IommuState,
    pub client_iommu: IommuState,
    pub virtualized: bool,
    pub reasons: Vec<String>,
}

impl Verdict {
    /// Whether the kernel's verdict allows peer-to-peer DMA for this pair: `true` when the pair
    /// reaches by bus address below a common upstream bridge (`MapType::BusAddr`), and, only
    /// when `count_host_bridge` is set, also when it goes through the host bridge
    /// (`MapType::ThruHostBridge`); always `false` for `MapType::NotSupported`.
    pub fn allows_p2p(&self, count_host_bridge: bool) -> bool {
        self.map_type == MapType::BusAddr || (count_host_bridge && self.map_type == MapType::ThruHostBridge)
    }
}

fn iommu_state(t: &Topology, i: DevIdx) -> IommuState {
    match &t.device(i).iommu_group {
        Some(g) => IommuState { group: Some(g.id), domain_type: g.domain_type.clone(), translating: g.translating() },
        None => IommuState { group: None, domain_type: None, translating: false },
    }
}

fn bdf_list(t: &Topology, v: &[DevIdx]) -> String {
    v.iter().map(|&i| t.device(i).bdf.to_string()).collect::<Vec<_>>().join(", ")
}

/// The label of a path: the tree alone (`switch`), and the one the data takes (`path`).
fn labels(t: &Topology, provider: DevIdx, client: DevIdx, k: &KernelCalc) -> (PathLabel, Option<PathLabel>) {
    let (pa, pb) = (t.device(provider), t.device(client));
    let tree = match k.common {
        Some(_) if k.distance <= 4 => PathLabel::PIX,
        Some(_) => PathLabel::PXB,
        None if pa.host_bridge == pb.host_bridge => PathLabel::PHB,
        None => match (pa.numa_node, pb.numa_node) {
            (Some(x), Some(y)) if x == y => PathLabel::NODE,
            _ => PathLabel::SYS,
        },
    };
    match k.common {
        Some(_) if k.map_type != MapType::BusAddr => (PathLabel::PHB, Some(tree)),
        _ => (tree, None),
    }
}

fn explain_allow(f: &AllowFinding, kernel: Option<KernelVersion>, reasons: &mut Vec<String>) {
    let hb = &f.host_bridge;
    if let (true, Some((bdf, _, _))) = (f.assumed_root_port, f.device) {
        reasons.push(format!(
            "host bridge {hb}: {bdf} is taken as a Root Port (a bridge on the root bus; its PCIe capability was not readable)"
        ));
    }
    let id = f.device.map(|(b, v, d)| format!("{b} [{v:04x}:{d:04x}]")).unwrap_or_default();
    reasons.push(match &f.outcome {
        AllowOutcome::NoDevices => format!("host bridge {hb} has no devices"),
        AllowOutcome::EmptyRootBus => format!("host bridge {hb}: root bus is empty"),
        AllowOutcome::NoHostBridgeDevice { first } => format!(
            "host bridge {hb}: first root-bus device {first} is neither 00.0 nor a Root Port, so the kernel finds no host bridge device to check"
        ),
        AllowOutcome::Listed(e) => format!("host bridge {id} ({}) is in the P2PDMA allowlist", e.name),
        AllowOutcome::SameHostBridgeOnly(e) => {
            format!("host bridge {id} ({}) is allowlisted only when provider and client share it", e.name)
        }
        AllowOutcome::NotListed { later } => {
            let k = kernel.map(|k| format!("Linux {k}")).unwrap_or_else(|| "Linux 6.12 (kernel release unknown)".into());
            match later {
                Some(e) => format!("host bridge {id} is allowlisted only since Linux {}; this sysroot runs {k}", e.since),
                None => format!("host bridge {id} is not in the {k} P2PDMA allowlist"),
            }
        }
    });
}

/// Reasons for the kernel's part: the common device, ACS, the host-bridge rule.
fn explain_kernel(t: &Topology, provider: DevIdx, client: DevIdx, k: &KernelCalc, reasons: &mut Vec<String>) {
    let (pa, pb) = (t.device(provider), t.device(client));
    match k.common {
        Some(c) if k.acs_redirect.is_empty() => reasons.push(if provider == client {
            format!("provider and client are the same function {} (distance 0)", pa.bdf)
        } else {
            format!(
                "{} and {} share upstream bridge {} (distance {}): peer-to-peer TLPs turn around below it",
                pa.bdf,
                pb.bdf,
                t.device(c).bdf,
                k.distance
            )
        }),
        Some(c) => reasons.push(format!(
            "{} and {} share upstream bridge {} (distance {}), but ACS redirect is set on {}: requests are forced up to the root complex",
            pa.bdf,
            pb.bdf,
            t.device(c).bdf,
            k.distance,
            bdf_list(t, &k.acs_redirect)
        )),
        None => reasons.push(format!(
            "{} ({}) and {} ({}) share no upstream bridge (distance {}): traffic must cross the root complex",
            pa.bdf, pa.host_bridge, pb.bdf, pb.host_bridge, k.distance
        )),
    }
    let Some(hb) = &k.host_bridge else { return };
    let cpu = t.platform.cpu.describe();
    if hb.cpu_supports_p2pdma {
        reasons.push(format!("CPU {cpu} is AMD Zen or newer: the kernel allows P2P through the host bridge"));
        return;
    }
    reasons.push(format!("CPU {cpu} is not AMD Zen: the host bridge must be allowlisted"));
    for f in &hb.findings {
        explain_allow(f, t.platform.kernel, reasons);
    }
    if k.map_type == MapType::NotSupported {
        reasons.push(format!(
            "not supported: the client and provider ({}) do not share an upstream bridge or allowlisted host bridge (the kernel fails such I/O with EREMOTEIO)",
            pa.bdf
        ));
    }
}

/// Reasons beyond the kernel: NUMA, IOMMU, virtualization.
fn explain_platform(t: &Topology, v: &Verdict, reasons: &mut Vec<String>) {
    let (pa, pb) = (t.by_bdf(v.provider).ok(), t.by_bdf(v.client).ok());
    if let (PathLabel::SYS, Some(pa), Some(pb)) = (v.path, pa, pb) {
        if pa.numa_node.is_some() && pa.numa_node != pb.numa_node {
            reasons.push(format!(
                "provider is on NUMA node {}, client on {}: the path crosses the CPU interconnect",
                pa.numa_node.map_or("?".into(), |n| n.to_string()),
                pb.numa_node.map_or("?".into(), |n| n.to_string())
            ));
        } else if pa.numa_node.is_none() || pb.numa_node.is_none() {
            reasons.push("NUMA node unknown on at least one side: different host bridges are taken as SYS".into());
        }
    }
    for (who, bdf, st) in [("provider", v.provider, &v.provider_iommu), ("client", v.client, &v.client_iommu)] {
        if let Some(g) = st.group {
            let ty = st.domain_type.as_deref().unwrap_or("unknown");
            reasons.push(if st.translating {
                format!("{who} {bdf} is in IOMMU group {g} (type {ty}): its DMA through the root complex is translated (program an IOVA)")
            } else {
                format!("{who} {bdf} is in IOMMU group {g} (type {ty}): no translation")
            });
        }
    }
    if v.virtualized {
        reasons.push(format!(
            "virtualized platform ({}): this is the hypervisor's emulated topology; real P2P depends on the host fabric, and an emulated IOMMU may translate even bus-address traffic: verify a direct route with a canary before trusting it",
            t.platform.virt.signals.join("; ")
        ));
    }
}

impl Topology {
    /// The kernel's facts for `provider` -> `client`, explained.
    pub fn verdict(&self, provider: DevIdx, client: DevIdx) -> Verdict {
        let k = calc_map_type_and_dist(self, provider, client);
        let mut reasons = Vec::new();
        explain_kernel(self, provider, client, &k, &mut reasons);
        let acs_redirect: Vec<Bdf> = k.acs_redirect.iter().map(|&i| self.device(i).bdf).collect();
        let acs_fix = AcsFix::for_devices(&acs_redirect).map(|f| f.disable_acs_redir);
        if let Some(fix) = &acs_fix {
            reasons.push(format!("to disable ACS redirect for this path, boot with: {fix}"));
        }
        if !k.acs_unknown.is_empty() {
            reasons.push(format!(
                "ACS state unknown for {} (config space read without root shows 64 bytes, or the kernel exposes no extended config): the verdict assumes no ACS redirect there; if one is set the real map type is thru_host_bridge or not_supported",
                bdf_list(self, &k.acs_unknown)
            ));
        }
        let (path, switch_path) = labels(self, provider, client, &k);
        let (bandwidth_gbs, bottleneck) = self.bottleneck(provider, client, k.common);
        let host_bridge = k.host_bridge.as_ref().map(|h| HostBridgeCheck {
            cpu_supports_p2pdma: h.cpu_supports_p2pdma,
            cpu: self.platform.cpu.describe(),
            same_host_bridge: h.same_host_bridge,
            provider_host_bridge: self.device(provider).host_bridge.clone(),
            client_host_bridge: self.device(client).host_bridge.clone(),
            provider_allowed: h.provider_allowed,
            client_allowed: h.client_allowed,
        });
        let mut v = Verdict {
            provider: self.device(provider).bdf,
            client: self.device(client).bdf,
            map_type: k.map_type,
            distance: k.distance,
            common_upstream: k.common.map(|c| self.device(c).bdf),
            acs_redirect,
            acs_unknown: k.acs_unknown.iter().map(|&i| self.device(i).bdf).collect(),
            acs_fix,
            path,
            switch_path,
            bandwidth_gbs,
            bottleneck,
            host_bridge,
            provider_iommu: iommu_state(self, provider),
            client_iommu: iommu_state(self, client),
            virtualized: self.platform.virt.virtualized,
            reasons: Vec::new(),
        };
        explain_platform(self, &v, &mut reasons);
        v.reasons = reasons;
        v
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

// ------------------------------------------------------------------------------------------
// Many pairs at once: the per-device part computed once, each pair in O(depth), no allocation.
// ------------------------------------------------------------------------------------------

/// The facts of one device that every pair it is part of reuses: its chain of upstream bridges
/// (nearest first), and running totals along that chain.
#[derive(Debug, Clone)]
struct ChainFacts {
    chain: Vec<DevIdx>,
    /// `acs[k]`: devices with ACS redirect among `chain[..k]`.
    acs: Vec<u32>,
    /// `unknown[k]`: devices with unknown ACS state among `chain[..k]`.
    unknown: Vec<u32>,
    /// `narrowest[k]`: the first narrowest link among `chain[..k]` (the order `verdict` scans in).
    narrowest: Vec<Option<(f64, Bdf)>>,
    /// Index of the device's host bridge in `PairMatrix::host_bridges`.
    host_bridge: usize,
    numa_node: Option<i32>,
}

/// The summary of one pair's verdict: every field of [`Verdict`] that is not text, computed
/// without building the reasons. Equal to the same fields of [`Topology::verdict`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairFacts {
    pub map_type: MapType,
    pub distance: u32,
    pub common_upstream: Option<DevIdx>,
    /// How many devices on the path have ACS redirect (`Verdict::acs_redirect.len()`).
    pub acs_redirects: u32,
    /// How many devices on the path have unknown ACS state (`Verdict::acs_unknown.len()`).
    pub acs_unknowns: u32,
    pub path: PathLabel,
    pub switch_path: Option<PathLabel>,
    pub bandwidth_gbs: Option<f64>,
    pub bottleneck: Option<Bdf>,
}

/// Verdicts for every pair of a set of devices (e.g. a topology's endpoints): chains, ACS and
/// link totals are computed once per device and the host-bridge rule once per pair of host
/// bridges, so one pair's [`PairFacts`] costs a walk of the two chains' common part and no
/// allocation. The full explained [`Verdict`] is built on demand with [`PairMatrix::verdict`].
#[derive(Debug, Clone)]
pub struct PairMatrix<'t> {
    t: &'t Topology,
    devices: Vec<DevIdx>,
    facts: Vec<ChainFacts>,
    /// How many distinct host bridges the devices are on.
    host_bridges: usize,
    /// Host-bridge rule outcome, `[provider_hb * host_bridges + client_hb]`.
    host_bridge_map: Vec<MapType>,
}

impl<'t> PairMatrix<'t> {
    /// The matrix over `devices` (in the order given; row and column `i` are `devices[i]`).
    pub fn new(t: &'t Topology, devices: impl IntoIterator<Item = DevIdx>) -> PairMatrix<'t> {
        let devices: Vec<DevIdx> = devices.into_iter().collect();
        let mut hb_names: Vec<&str> = Vec::new();
        let mut hb_rep: Vec<DevIdx> = Vec::new();
        let facts: Vec<ChainFacts> = devices
            .iter()
            .map(|&i| {
                let d = t.device(i);
                let host_bridge = match hb_names.iter().position(|&n| n == d.host_bridge) {
                    Some(h) => h,
                    None => {
                        hb_names.push(&d.host_bridge);
                        hb_rep.push(i);
                        hb_names.len() - 1
                    }
                };
                let chain = t.chain(i);
                let (mut acs, mut unknown, mut narrowest) = (vec![0], vec![0], vec![None]);
                for &c in &chain {
                    let dev = t.device(c);
                    let state = dev.acs().redirects();
                    acs.push(acs.last().copied().unwrap_or(0) + u32::from(state == Some(true)));
                    unknown.push(unknown.last().copied().unwrap_or(0) + u32::from(state.is_none()));
                    let best: Option<(f64, Bdf)> = narrowest.last().copied().flatten();
                    narrowest.push(match dev.link.bandwidth_gbs() {
                        Some(bw) if best.is_none_or(|(x, _)| bw < x) => Some((bw, dev.bdf)),
                        _ => best,
                    });
                }
                ChainFacts { chain, acs, unknown, narrowest, host_bridge, numa_node: d.numa_node }
            })
            .collect();
        // The host-bridge rule reads only the two host bridges (and the platform), so any
        // device of each stands for all of them.
        let n = hb_rep.len();
        let mut host_bridge_map = Vec::with_capacity(n * n);
        for &p in &hb_rep {
            for &c in &hb_rep {
                host_bridge_map.push(host_bridge_map_type(&host_bridge_whitelist(t, p, c)));
            }
        }
        PairMatrix { t, devices, facts, host_bridges: n, host_bridge_map }
    }

    /// The devices of the rows and columns.
    pub fn devices(&self) -> &[DevIdx] {
        &self.devices
    }

    /// The facts for `devices()[p]` as provider and `devices()[c]` as client.
    ///
    /// # Panics
    /// If `p` or `c` is not below `devices().len()`.
    pub fn facts(&self, p: usize, c: usize) -> PairFacts {
        let (a, b) = (&self.facts[p], &self.facts[c]);
        // The kernel's nested walk stops at the first provider-side device on the client's
        // chain; chains are paths to a root, so that is where their common tail begins.
        let (mut ia, mut ib) = (a.chain.len(), b.chain.len());
        while ia > 0 && ib > 0 && a.chain[ia - 1] == b.chain[ib - 1] {
            ia -= 1;
            ib -= 1;
        }
        let common = (ia < a.chain.len()).then(|| a.chain[ia]);
        let distance = (ia + ib) as u32;
        let hb_map = self.host_bridge_map[a.host_bridge * self.host_bridges + b.host_bridge];
        let (map_type, acs_redirects, acs_unknowns) = match common {
            None => (hb_map, 0, 0),
            Some(_) => {
                // Provider side up to and including the common device, client side below it.
                let acs = a.acs[ia + 1] + b.acs[ib];
                let unknown = a.unknown[ia + 1] + b.unknown[ib];
                (if acs == 0 { MapType::BusAddr } else { hb_map }, acs, unknown)
            }
        };
        let tree = match common {
            Some(_) if distance <= 4 => PathLabel::PIX,
            Some(_) => PathLabel::PXB,
            None if a.host_bridge == b.host_bridge => PathLabel::PHB,
            None => match (a.numa_node, b.numa_node) {
                (Some(x), Some(y)) if x == y => PathLabel::NODE,
                _ => PathLabel::SYS,
            },
        };
        let (path, switch_path) = match common {
            Some(_) if map_type != MapType::BusAddr => (PathLabel::PHB, Some(tree)),
            _ => (tree, None),
        };
        let narrowest = match (a.narrowest[ia], b.narrowest[ib]) {
            (Some(x), Some(y)) if y.0 < x.0 => Some(y),
            (Some(x), _) => Some(x),
            (None, y) => y,
        };
        PairFacts {
            map_type,
            distance,
            common_upstream: common,
            acs_redirects,
            acs_unknowns,
            path,
            switch_path,
            bandwidth_gbs: narrowest.map(|n| n.0),
            bottleneck: narrowest.map(|n| n.1),
        }
    }

    /// The full explained verdict for `devices()[p]` -> `devices()[c]` (as [`Topology::verdict`]).
    pub fn verdict(&self, p: usize, c: usize) -> Verdict {
        self.t.verdict(self.devices[p], self.devices[c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_fix_has_both_command_line_forms_and_setpci_lines() {
        let a: Bdf = "0000:02:00.0".parse().unwrap();
        let b: Bdf = "10000:e1:00.0".parse().unwrap();
        let f = AcsFix::for_devices(&[a, b, a]).unwrap();
        assert_eq!(f.devices, vec![a, b]);
        assert_eq!(f.disable_acs_redir, "pci=disable_acs_redir=0000:02:00.0;10000:e1:00.0");
        assert_eq!(f.config_acs, "pci=config_acs=x0x00xx@0000:02:00.0;x0x00xx@10000:e1:00.0");
        assert_eq!(f.setpci[0], "setpci -s 0000:02:00.0 ECAP0d+6.w=0000:002c");
        // The mask clears exactly the bits the kernel's redirect test reads.
        assert_eq!(0x002c, crate::pci::config::ACS_REDIRECT_MASK);
        assert!(AcsFix::for_devices(&[]).is_none());
    }
}
