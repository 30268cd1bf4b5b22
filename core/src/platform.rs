//! Facts about the machine a sysroot came from: kernel release, CPU (for the kernel's AMD Zen
//! rule), virtualization signals, and device-tree PCI host-bridge windows.
//!
//! Owns: parsing `proc/sys/kernel/osrelease`, `proc/cpuinfo`, DMI ids and `proc/device-tree`,
//! and the platform's answers about the devices found (paravirtual PCI vendors, the device-tree
//! window that holds a CPU address). Must not: read or name PCI devices (the topology does,
//! then asks here with plain facts).

use std::path::{Path, PathBuf};

use crate::addr::{BusAddr, BusOffset, CpuPhys};
use crate::sysroot::{malformed_err, Sysroot, SysrootError};

/// A kernel release as `major.minor.patch` (the rest of `osrelease` is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl KernelVersion {
    /// Parses the leading `X.Y[.Z]` of an osrelease string like `6.12.48+deb12-amd64`.
    pub fn parse(s: &str) -> Option<KernelVersion> {
        let head: String = s.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let mut it = head.split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u32>());
        let major = it.next()?.ok()?;
        let minor = it.next()?.ok()?;
        let patch = it.next().and_then(|r| r.ok()).unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The boot CPU as the kernel's `cpu_supports_p2pdma()` sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    /// `vendor_id` (x86 only), e.g. `AuthenticAMD`.
    pub vendor: Option<String>,
    /// `cpu family` (x86 only), decimal in cpuinfo.
    pub family: Option<u32>,
    /// `model` (x86 only), decimal in cpuinfo.
    pub model: Option<u32>,
    pub model_name: Option<String>,
    /// The x86 `hypervisor` flag.
    pub hypervisor_flag: bool,
    /// The instruction set, from the lines only that architecture's cpuinfo carries.
    pub arch: Option<CpuArch>,
}

/// A CPU architecture as `proc/cpuinfo` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuArch {
    /// A `vendor_id` line (x86 kernels only).
    X86_64,
    /// `CPU architecture : 8`.
    Arm64,
    /// `cpu : POWERn ...`.
    Ppc64,
}

impl CpuArch {
    /// The name NCCL's topology file uses for it.
    pub fn nccl_name(self) -> &'static str {
        match self {
            CpuArch::X86_64 => "x86_64",
            CpuArch::Arm64 => "arm64",
            CpuArch::Ppc64 => "ppc64",
        }
    }
}

impl Cpu {
    /// Linux 6.12 `cpu_supports_p2pdma()`: AMD (not Hygon) with family >= 0x17 (Zen).
    pub fn supports_p2pdma(&self) -> bool {
        self.vendor.as_deref() == Some("AuthenticAMD") && self.family.is_some_and(|f| f >= 0x17)
    }

    pub fn describe(&self) -> String {
        match (&self.vendor, self.family) {
            (Some(v), Some(f)) => format!("{v} family {f:#x}"),
            (Some(v), None) => v.clone(),
            _ => "non-x86 CPU".to_string(),
        }
    }
}

/// Whether the sysroot comes from a virtual machine, with every signal that says so.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Virtualization {
    pub virtualized: bool,
    pub signals: Vec<String>,
}

/// One PCI host-bridge window from a device-tree `ranges` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtRange {
    /// Space code from phys.hi bits 25:24: 1 I/O, 2 32-bit memory, 3 64-bit memory.
    pub space: u8,
    pub prefetchable: bool,
    pub pci: BusAddr,
    pub cpu: CpuPhys,
    pub size: u64,
}

impl DtRange {
    pub fn offset(&self) -> BusOffset {
        BusOffset::between(self.cpu, self.pci)
    }
    pub fn contains_cpu(&self, a: CpuPhys) -> bool {
        a >= self.cpu && a.raw() - self.cpu.raw() < self.size
    }
}

/// A device-tree PCI host-bridge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtPciHost {
    /// Node path relative to the sysroot.
    pub node: PathBuf,
    pub domain: Option<u32>,
    pub bus_range: Option<(u32, u32)>,
    pub ranges: Vec<DtRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTree {
    pub compatible: Vec<String>,
    pub model: Option<String>,
    pub hypervisor_compatible: Vec<String>,
    pub pci_hosts: Vec<DtPciHost>,
}

impl DeviceTree {
    /// The first memory window (a `ranges` entry of space 2 or 3) holding CPU address `cpu`,
    /// with the host-bridge node it belongs to.
    pub fn memory_window(&self, cpu: CpuPhys) -> Option<(&DtPciHost, &DtRange)> {
        self.pci_hosts
            .iter()
            .flat_map(|h| h.ranges.iter().map(move |r| (h, r)))
            .find(|(_, r)| r.space >= 2 && r.contains_cpu(cpu))
    }
}

/// Everything peermem reads about the platform.
#[derive(Debug, Clone, Default)]
pub struct Platform {
    pub osrelease: Option<String>,
    pub kernel: Option<KernelVersion>,
    pub cpu: Cpu,
    pub dmi_sys_vendor: Option<String>,
    pub dmi_product_name: Option<String>,
    pub device_tree: Option<DeviceTree>,
    pub virt: Virtualization,
}

/// DMI vendor/product strings systemd-detect-virt maps to a hypervisor (src/basic/virt.c).
const DMI_VIRT: &[&str] = &[
    "KVM",
    "OpenStack",
    "KubeVirt",
    "Amazon EC2",
    "QEMU",
    "VMware",
    "VMW",
    "innotek GmbH",
    "VirtualBox",
    "Oracle Corporation",
    "Xen",
    "Bochs",
    "Parallels",
    "BHYVE",
    "Hyper-V",
    "Apple Virtualization",
    "Google Compute Engine",
    "Firecracker",
];

/// PCI vendors that only exist as emulated or paravirtual devices.
pub const VIRT_PCI_VENDORS: &[(u16, &str)] =
    &[(0x1af4, "virtio (Red Hat)"), (0x1b36, "QEMU"), (0x15ad, "VMware"), (0x80ee, "VirtualBox"), (0x5853, "Xen")];

impl Platform {
    pub fn read(root: &Sysroot) -> Result<Platform, SysrootError> {
        let osrelease = root.read_lossy_opt("proc/sys/kernel/osrelease")?;
        let kernel = osrelease.as_deref().and_then(KernelVersion::parse);
        let cpu = read_cpuinfo(root)?;
        let dmi_sys_vendor = root.read_lossy_opt("sys/devices/virtual/dmi/id/sys_vendor")?;
        let dmi_product_name = root.read_lossy_opt("sys/devices/virtual/dmi/id/product_name")?;
        let device_tree = read_device_tree(root)?;
        let mut p = Platform {
            osrelease,
            kernel,
            cpu,
            dmi_sys_vendor,
            dmi_product_name,
            device_tree,
            virt: Default::default(),
        };
        p.virt = p.detect_virt();
        Ok(p)
    }

    fn detect_virt(&self) -> Virtualization {
        let mut signals = Vec::new();
        if self.cpu.hypervisor_flag {
            signals.push("cpuinfo: x86 'hypervisor' flag".to_string());
        }
        for (what, v) in [("sys_vendor", &self.dmi_sys_vendor), ("product_name", &self.dmi_product_name)] {
            if let Some(v) = v {
                let lower = v.to_ascii_lowercase();
                let hit = DMI_VIRT.iter().any(|k| lower.starts_with(&k.to_ascii_lowercase()))
                    || (what == "product_name" && lower.contains("virtual machine"));
                if hit {
                    signals.push(format!("dmi {what}: {v:?}"));
                }
            }
        }
        if let Some(m) = &self.cpu.model_name {
            if m.contains("QEMU") || m.contains("Virtual CPU") {
                signals.push(format!("cpuinfo model name: {m:?}"));
            }
        }
        if let Some(dt) = &self.device_tree {
            for c in &dt.compatible {
                if c == "linux,dummy-virt" || c.starts_with("qemu,") || c.contains("kvm") {
                    signals.push(format!("device-tree compatible: {c:?}"));
                }
            }
            if let Some(m) = &dt.model {
                if m.contains("QEMU") || m.contains("KVM") || m.contains("virt") {
                    signals.push(format!("device-tree model: {m:?}"));
                }
            }
            for c in &dt.hypervisor_compatible {
                signals.push(format!("device-tree hypervisor node: {c:?}"));
            }
        }
        Virtualization { virtualized: !signals.is_empty(), signals }
    }

    /// Adds the paravirtual PCI vendors among `vendors` (the IDs of every function found) as
    /// virtualization signals.
    pub fn add_pci_virt_signals(&mut self, vendors: impl Iterator<Item = u16> + Clone) {
        for (vid, what) in VIRT_PCI_VENDORS {
            let n = vendors.clone().filter(|v| v == vid).count();
            if n > 0 {
                self.virt.signals.push(format!("pci: {n} {what} device(s) (vendor {vid:#06x})"));
                self.virt.virtualized = true;
            }
        }
    }

    /// Platform facts that are unknown, as notes for the topology's warnings.
    pub fn unknown_notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        match (&self.osrelease, self.kernel) {
            (None, _) => v.push(
                "kernel release unknown (proc/sys/kernel/osrelease missing): the Linux 6.12 allowlist is applied"
                    .to_string(),
            ),
            (Some(r), None) => {
                v.push(format!("kernel release {r:?} not understood: the Linux 6.12 allowlist is applied"))
            }
            _ => {}
        }
        if self.cpu.vendor.is_none() && self.cpu.model_name.is_none() {
            v.push(
                "CPU unknown (proc/cpuinfo missing or without vendor_id): the AMD Zen rule cannot apply".to_string(),
            );
        }
        v
    }
}

fn read_cpuinfo(root: &Sysroot) -> Result<Cpu, SysrootError> {
    let rel = Path::new("proc/cpuinfo");
    let Some(text) = root.read_text_opt_max(rel, crate::sysroot::MAX_TEXT)? else {
        return Ok(Cpu::default());
    };
    parse_cpuinfo(rel, &text)
}

/// The boot CPU's facts from the text of `proc/cpuinfo` (`rel` names the file in errors).
pub(crate) fn parse_cpuinfo(rel: &Path, text: &str) -> Result<Cpu, SysrootError> {
    let mut cpu = Cpu::default();
    // The boot CPU is the first stanza.
    for line in text.lines() {
        if line.trim().is_empty() {
            if cpu.vendor.is_some() || cpu.model_name.is_some() {
                break;
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "vendor_id" => {
                cpu.vendor = Some(v.to_string());
                cpu.arch = Some(CpuArch::X86_64);
            }
            "CPU architecture" if v == "8" || v.eq_ignore_ascii_case("AArch64") => cpu.arch = Some(CpuArch::Arm64),
            "cpu" if v.starts_with("POWER") => cpu.arch = Some(CpuArch::Ppc64),
            "cpu family" => {
                cpu.family = Some(v.parse().map_err(|_| malformed_err(rel, "cpu family is not a number", v))?)
            }
            "model" => cpu.model = v.parse().ok(),
            "model name" | "Hardware" | "machine" => cpu.model_name = Some(v.to_string()),
            "flags" => cpu.hypervisor_flag = v.split_whitespace().any(|f| f == "hypervisor"),
            _ => {}
        }
    }
    Ok(cpu)
}

pub(crate) fn be_u32s(rel: &Path, b: &[u8]) -> Result<Vec<u32>, SysrootError> {
    if !b.len().is_multiple_of(4) {
        return Err(malformed_err(rel, format!("{} bytes, not a multiple of 4 (big-endian cells)", b.len()), ""));
    }
    Ok(b.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

pub(crate) fn dt_strings(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn read_device_tree(root: &Sysroot) -> Result<Option<DeviceTree>, SysrootError> {
    let base = PathBuf::from("proc/device-tree");
    if root.list_dir(&base)?.is_none() {
        return Ok(None);
    }
    let mut dt = DeviceTree {
        compatible: root.read_bytes_opt(base.join("compatible"))?.map(|b| dt_strings(&b)).unwrap_or_default(),
        model: root.read_bytes_opt(base.join("model"))?.map(|b| dt_strings(&b).join(" ")),
        hypervisor_compatible: root
            .read_bytes_opt(base.join("hypervisor/compatible"))?
            .map(|b| dt_strings(&b))
            .unwrap_or_default(),
        pci_hosts: Vec::new(),
    };
    find_pci_hosts(root, &base, 2, 0, &mut dt.pci_hosts)?;
    Ok(Some(dt))
}

fn cells(root: &Sysroot, node: &Path, name: &str, default: u32) -> Result<u32, SysrootError> {
    let rel = node.join(name);
    match root.read_bytes_opt(&rel)? {
        Some(b) => be_u32s(&rel, &b)?.first().copied().ok_or_else(|| malformed_err(&rel, "empty", "")),
        None => Ok(default),
    }
}

/// Recursively finds nodes with `device_type = "pci"` and parses their `ranges`.
fn find_pci_hosts(
    root: &Sysroot,
    node: &Path,
    parent_addr_cells: u32,
    depth: usize,
    out: &mut Vec<DtPciHost>,
) -> Result<(), SysrootError> {
    if depth > 8 {
        return Ok(());
    }
    let my_addr_cells = cells(root, node, "#address-cells", 2)?;
    let is_pci = root.read_bytes_opt(node.join("device_type"))?.is_some_and(|b| dt_strings(&b) == ["pci"]);
    if is_pci && depth > 0 {
        out.push(parse_pci_host(root, node, parent_addr_cells)?);
        return Ok(()); // PCI-PCI bridge nodes below a host are not host bridges
    }
    for child in root.list_dir(node)?.unwrap_or_default() {
        let p = node.join(&child);
        if std::fs::symlink_metadata(root.path(&p)).map(|m| m.is_dir()).unwrap_or(false) {
            find_pci_hosts(root, &p, my_addr_cells, depth + 1, out)?;
        }
    }
    Ok(())
}

fn parse_pci_host(root: &Sysroot, node: &Path, parent_addr_cells: u32) -> Result<DtPciHost, SysrootError> {
    let domain = match root.read_bytes_opt(node.join("linux,pci-domain"))? {
        Some(b) => be_u32s(&node.join("linux,pci-domain"), &b)?.first().copied(),
        None => None,
    };
    let bus_range = match root.read_bytes_opt(node.join("bus-range"))? {
        Some(b) => match be_u32s(&node.join("bus-range"), &b)?.as_slice() {
            [a, z] => Some((*a, *z)),
            _ => return Err(malformed_err(&node.join("bus-range"), "expected 2 cells", "")),
        },
        None => None,
    };
    let rel = node.join("ranges");
    let ranges = match root.read_bytes_opt(&rel)? {
        Some(b) => parse_pci_ranges(&rel, &b, parent_addr_cells, cells(root, node, "#size-cells", 2)?)?,
        None => Vec::new(),
    };
    Ok(DtPciHost { node: node.to_path_buf(), domain, bus_range, ranges })
}

/// Parses a PCI host bridge `ranges` property: (3 child cells, `parent_cells` parent cells,
/// `size_cells` size cells) per entry, big-endian (IEEE 1275 PCI binding).
pub fn parse_pci_ranges(
    rel: &Path,
    bytes: &[u8],
    parent_cells: u32,
    size_cells: u32,
) -> Result<Vec<DtRange>, SysrootError> {
    let c = be_u32s(rel, bytes)?;
    if !(1..=2).contains(&parent_cells) || !(1..=2).contains(&size_cells) {
        return Err(malformed_err(rel, format!("unsupported cell sizes {parent_cells}/{size_cells}"), ""));
    }
    let stride = 3 + parent_cells as usize + size_cells as usize;
    if !c.len().is_multiple_of(stride) {
        return Err(malformed_err(rel, format!("{} cells is not a multiple of the entry size {stride}", c.len()), ""));
    }
    let num = |s: &[u32]| s.iter().fold(0u64, |acc, &x| (acc << 32) | x as u64);
    Ok(c.chunks_exact(stride)
        .map(|e| {
            let hi = e[0];
            let p = 3 + parent_cells as usize;
            DtRange {
                space: ((hi >> 24) & 3) as u8,
                prefetchable: hi & (1 << 30) != 0,
                pci: BusAddr::new(num(&e[1..3])),
                cpu: CpuPhys::new(num(&e[3..p])),
                size: num(&e[p..]),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_parses_distribution_suffixes() {
        assert_eq!(KernelVersion::parse("6.12.48+deb12-amd64"), Some(KernelVersion(6, 12, 48)));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v657"), Some(KernelVersion(6, 18, 44)));
        assert_eq!(KernelVersion::parse("5.4-rc1"), Some(KernelVersion(5, 4, 0)));
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion(5, 15, 0) < KernelVersion(6, 1, 0));
    }

    #[test]
    fn zen_rule_needs_amd_and_family_0x17() {
        let mut c = Cpu { vendor: Some("AuthenticAMD".into()), family: Some(0x17), ..Default::default() };
        assert!(c.supports_p2pdma());
        c.family = Some(0x16);
        assert!(!c.supports_p2pdma());
        c = Cpu { vendor: Some("HygonGenuine".into()), family: Some(0x18), ..Default::default() };
        assert!(!c.supports_p2pdma(), "Hygon is X86_VENDOR_HYGON, not AMD");
        c = Cpu { vendor: Some("GenuineIntel".into()), family: Some(6), ..Default::default() };
        assert!(!c.supports_p2pdma());
        assert!(!Cpu::default().supports_p2pdma());
    }

    #[test]
    fn cpuinfo_names_the_architecture_by_lines_only_it_carries() {
        let arch = |text: &str| parse_cpuinfo(Path::new("proc/cpuinfo"), text).unwrap().arch;
        assert_eq!(arch("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"), Some(CpuArch::X86_64));
        assert_eq!(arch("processor\t: 0\nCPU implementer\t: 0x41\nCPU architecture: 8\n"), Some(CpuArch::Arm64));
        assert_eq!(arch("processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n"), Some(CpuArch::Ppc64));
        assert_eq!(arch("processor\t: 0\nCPU architecture: 7\n"), None, "32-bit Arm is none of NCCL's");
        assert_eq!(arch(""), None);
    }

    #[test]
    fn pci_ranges_decode_power_style_offset() {
        // One 64-bit prefetchable window: PCI 0x8000_0000 at CPU 0x6000_0000_0000, 1 GiB.
        let mut b = Vec::new();
        for cell in [0x4300_0000u32, 0, 0x8000_0000, 0x6000, 0, 0, 0x4000_0000] {
            b.extend_from_slice(&cell.to_be_bytes());
        }
        let r = parse_pci_ranges(Path::new("ranges"), &b, 2, 2).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].space, 3);
        assert!(r[0].prefetchable);
        assert_eq!(r[0].pci, BusAddr::new(0x8000_0000));
        assert_eq!(r[0].cpu, CpuPhys::new(0x6000_0000_0000));
        assert!(r[0].offset().get() < 0);
        assert!(r[0].contains_cpu(CpuPhys::new(0x6000_3fff_ffff)));
        assert!(!r[0].contains_cpu(CpuPhys::new(0x6000_4000_0000)));
        assert!(parse_pci_ranges(Path::new("ranges"), &b[..27], 2, 2).is_err());
        assert!(parse_pci_ranges(Path::new("ranges"), &b[..24], 2, 2).is_err());
    }
}
