//! The PCI topology of a sysroot: every function, its chain of upstream bridges, its host bridge,
//! BARs with CPU and bus addresses, ACS, IOMMU, links, p2pmem and the class devices on it.
//!
//! Owns: discovery (`Topology::discover`) from the kernel's own `sys/devices` hierarchy and the
//! `sys/bus/pci/devices` links, the per-device facts the verdict needs, and the cross-check of
//! BAR bus offsets against the platform's device-tree windows. Must not: decide P2P
//! (that is `verdict`), or guess a value a file does not give (unknowns stay `None`/`Unknown`,
//! are listed with their reason in `PciDevice::unknown`, and surface in the verdict's reasons).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::addr::{AddrRange, BarWindow, BusAddr, CpuPhys};
use crate::pci::bdf::Bdf;
use crate::pci::config::{Acs, BarReg, ConfigError, ConfigInfo, Pcie, PortType};
use crate::platform::{DeviceTree, Platform};
use crate::sysroot::{
    malformed_err, parse_bool, parse_dec, parse_hex, parse_hex_bits, Listing, SubDir, Sysroot, SysrootError,
};

/// IOMMU group, p2pmem pool and SR-IOV physical function of one device.
type Extras = (Option<IommuGroup>, Option<P2pmem>, Option<DevIdx>);

/// Dense index of a device in one `Topology`, tagged with that topology: a registry refuses an
/// index that another topology handed out (get one from `Topology::idx` or `Topology::indices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevIdx {
    topo: u32,
    i: u32,
}

impl DevIdx {
    pub(crate) fn of(topo: u32, i: usize) -> DevIdx {
        DevIdx { topo, i: i as u32 }
    }
    /// The position of the device in its topology's `devices()`.
    pub fn get(self) -> usize {
        self.i as usize
    }
    /// The id of the topology this index belongs to (see `Topology::id`).
    pub fn topology_id(self) -> u32 {
        self.topo
    }
}

/// Ids of topologies (never reused within a process).
static NEXT_TOPOLOGY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Sysroot(#[from] SysrootError),
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{root}: no sys/bus/pci/devices (not a Linux sysroot, or sysfs not mounted)")]
    NoPci { root: PathBuf },
    #[error("{path}: {why}")]
    Layout { path: PathBuf, why: String },
    #[error("unknown PCI device {0} (not in sys/bus/pci/devices)")]
    UnknownDevice(Bdf),
}

/// Where a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem,
}

/// One non-empty BAR (resource lines 0-5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    pub kind: BarKind,
    pub cpu: AddrRange<CpuPhys>,
    /// Bus start from the BAR register; `None` when the register reads 0 (SR-IOV VF, or
    /// unassigned) or disagrees with `resource` in kind.
    pub bus_start: Option<BusAddr>,
    pub is64: bool,
    pub prefetchable: bool,
    pub flags: u64,
}

impl Bar {
    /// The CPU<->bus window, when the bus start is known.
    pub fn window(&self) -> Option<BarWindow> {
        let bus = self.bus_start?;
        BarWindow::new(self.cpu.start(), bus, self.cpu.len()).ok()
    }
}

/// A PCIe link as sysfs reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    pub cur_gts: Option<f64>,
    pub cur_width: Option<u32>,
    pub max_gts: Option<f64>,
    pub max_width: Option<u32>,
}

impl Link {
    /// Usable bandwidth in GB/s of the current link (width x GT/s x line-code efficiency / 8).
    pub fn bandwidth_gbs(&self) -> Option<f64> {
        let (gts, w) = (self.cur_gts?, self.cur_width?);
        let enc = if gts <= 5.0 {
            8.0 / 10.0
        } else if gts <= 32.0 {
            128.0 / 130.0
        } else {
            242.0 / 256.0
        };
        Some(w as f64 * gts * enc / 8.0)
    }
}

/// The IOMMU group of a device and its default domain type (`DMA`, `DMA-FQ`, `identity`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuGroup {
    pub id: u32,
    pub domain_type: Option<String>,
}

impl IommuGroup {
    /// True when DMA from the device goes through IOMMU translation (DMA or DMA-FQ domain).
    pub fn translating(&self) -> bool {
        matches!(self.domain_type.as_deref(), Some("DMA") | Some("DMA-FQ"))
    }
}

/// `p2pmem/` attributes of a P2PDMA provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pmem {
    pub size: u64,
    pub available: u64,
    pub published: bool,
}

/// A class device (`nvme0`, `mlx5_0`, `eth0`, `card0`) that sits on a PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDevice {
    pub class: String,
    pub name: String,
}

/// One PCI function.
#[derive(Debug, Clone)]
pub struct PciDevice {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub subsystem_vendor: Option<u16>,
    pub subsystem_device: Option<u16>,
    pub revision: Option<u8>,
    /// `pci<dom>:<bus>` directory name of the host bridge.
    pub host_bridge: String,
    /// Root-relative sysfs directory (`sys/devices/.../<bdf>`).
    pub sysfs_dir: PathBuf,
    /// Directory parent: the kernel's `bus->self` (before the SR-IOV `physfn` redirect).
    pub parent: Option<DevIdx>,
    /// SR-IOV physical function, when this is a VF.
    pub physfn: Option<DevIdx>,
    pub config: ConfigInfo,
    pub link: Link,
    pub numa_node: Option<i32>,
    pub local_cpulist: Option<String>,
    pub iommu_group: Option<IommuGroup>,
    pub driver: Option<String>,
    pub bars: Vec<Bar>,
    pub p2pmem: Option<P2pmem>,
    pub class_devices: Vec<ClassDevice>,
    /// Has a `sys/bus/pci/devices` link (false: found only in the `sys/devices` tree).
    pub linked: bool,
    /// Facts that could not be read, with the reason.
    pub unknown: Vec<Unknown>,
}

/// A fact of one device that could not be read (file absent or unreadable), and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unknown {
    pub fact: &'static str,
    pub why: String,
}

impl PciDevice {
    pub fn acs(&self) -> Acs {
        self.config.acs
    }
    pub fn port_type(&self) -> Option<PortType> {
        self.config.port_type()
    }
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604 || self.class >> 8 == 0x0609 || self.config.header_type == 1
    }
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }
}

/// How the host bridge device for the allowlist check was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostBridgeDev {
    /// First device on the root bus is devfn 00.0.
    Devfn0(DevIdx),
    /// First device is a PCIe Root Port (from its PCIe capability).
    RootPort(DevIdx),
    /// First device is a PCI bridge whose port type is unknown (config truncated): assumed a
    /// Root Port because a bridge on a PCIe root bus is one.
    AssumedRootPort(DevIdx),
    /// First device is neither: the kernel's `pci_host_bridge_dev()` returns NULL.
    None,
    /// No device on the root bus.
    Empty,
}

impl HostBridgeDev {
    pub fn device(self) -> Option<DevIdx> {
        match self {
            HostBridgeDev::Devfn0(i) | HostBridgeDev::RootPort(i) | HostBridgeDev::AssumedRootPort(i) => Some(i),
            _ => None,
        }
    }
}

/// A PCI host bridge (`pci<dom>:<bus>`).
#[derive(Debug, Clone)]
pub struct HostBridge {
    pub name: String,
    /// Root-relative directory.
    pub dir: PathBuf,
    /// Devices on its root bus, in devfn order.
    pub root_bus: Vec<DevIdx>,
    pub dev: HostBridgeDev,
}

/// The PCI topology of one sysroot.
#[derive(Debug)]
pub struct Topology {
    id: u32,
    root: PathBuf,
    pub platform: Platform,
    devices: Vec<PciDevice>,
    index: HashMap<Bdf, DevIdx>,
    host_bridges: Vec<HostBridge>,
    /// Inconsistencies found while reading (e.g. a BAR offset that contradicts device-tree ranges).
    pub warnings: Vec<String>,
}

const RES_IO: u64 = 0x100;
const RES_MEM: u64 = 0x200;
const RES_PREFETCH: u64 = 0x2000;
const RES_MEM_64: u64 = 0x0010_0000;
const RES_DISABLED: u64 = 0x1000_0000;
const RES_UNSET: u64 = 0x2000_0000;

/// The class directories whose devices are attached to PCI functions.
pub const CLASSES: &[&str] = &["nvme", "infiniband", "net", "drm"];

pub(crate) fn parse_link_speed(rel: &Path, s: &str) -> Result<Option<f64>, SysrootError> {
    // Kernels before 5.2 write "Unknown speed"; later ones "Unknown".
    if s == "Unknown" || s == "Unknown speed" || s.is_empty() {
        return Ok(None);
    }
    let num = s.split_whitespace().next().unwrap_or("");
    let unit_ok = s.split_whitespace().nth(1) == Some("GT/s");
    match num.parse::<f64>() {
        Ok(v) if unit_ok && v.is_finite() && v > 0.0 && v < 1000.0 => Ok(Some(v)),
        _ => Err(malformed_err(rel, "expected '<N> GT/s [PCIe]' or 'Unknown'", s)),
    }
}

pub(crate) fn parse_resource(rel: &Path, text: &str) -> Result<Vec<(u64, u64, u64)>, SysrootError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 3 {
            return Err(malformed_err(rel, "expected 3 hex fields per line", line));
        }
        out.push((parse_hex(rel, f[0])?, parse_hex(rel, f[1])?, parse_hex(rel, f[2])?));
    }
    if out.len() < 6 {
        return Err(malformed_err(rel, format!("{} lines, need >= 6 (one per BAR)", out.len()), text));
    }
    Ok(out)
}

pub(crate) fn is_host_bridge_dir(name: &str) -> bool {
    // pci<domain>:<bus>, e.g. pci0000:00 or pci10000:e0
    name.strip_prefix("pci").and_then(|r| r.split_once(':')).is_some_and(|(d, b)| {
        (4..=8).contains(&d.len())
            && b.len() == 2
            && d.bytes().all(|c| c.is_ascii_hexdigit())
            && b.bytes().all(|c| c.is_ascii_hexdigit())
    })
}

struct RawDev {
    bdf: Bdf,
    dir: PathBuf,
    host_bridge: String,
    host_dir: PathBuf,
    parent_bdf: Option<Bdf>,
    /// Has a `sys/bus/pci/devices` link.
    linked: bool,
    /// Its directory was found in the `sys/devices` tree.
    in_tree: bool,
    /// Its directory's listing from the walk, so that reading it does not list it again.
    listing: Option<Listing>,
}

/// How deep PCI bridges may nest below a host bridge (a bus number is 8 bits).
const MAX_PCI_DEPTH: usize = 256;

/// The devices found by enumeration, in BDF order, with what was odd about the tree.
struct Enumeration {
    raws: Vec<RawDev>,
    warnings: Vec<String>,
}

fn enumerate(sys: &Sysroot) -> Result<Enumeration, TopologyError> {
    let mut raws: BTreeMap<Bdf, RawDev> = BTreeMap::new();
    let mut warnings = Vec::new();
    let bus_links = sys.list_dir("sys/bus/pci/devices")?;
    for name in bus_links.iter().flatten() {
        let link = PathBuf::from("sys/bus/pci/devices").join(name);
        let bdf: Bdf = name.parse().map_err(|e: crate::pci::bdf::BdfParseError| TopologyError::Layout {
            path: link.clone(),
            why: e.to_string(),
        })?;
        let dir = sys.resolve_link(&link)?.ok_or_else(|| TopologyError::Layout {
            path: link.clone(),
            why: "not a symlink into sys/devices".into(),
        })?;
        raws.insert(bdf, Topology::chain_of(bdf, &link, dir)?);
    }
    let mut hosts: BTreeSet<PathBuf> = raws.values().map(|r| r.host_dir.clone()).collect();
    hosts.extend(host_bridge_dirs(sys)?);
    for h in &hosts {
        let name = h.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        walk_tree(sys, h, &name, h, None, 0, &mut raws, &mut warnings)?;
    }
    if bus_links.is_none() && raws.is_empty() {
        return Err(TopologyError::NoPci { root: sys.root().to_path_buf() });
    }
    let unlinked: Vec<String> = raws.values().filter(|r| !r.linked).map(|r| r.bdf.to_string()).collect();
    if !unlinked.is_empty() {
        warnings.push(format!(
            "{} function(s) found in the sys/devices tree have no sys/bus/pci/devices link (a partial capture): {}",
            unlinked.len(),
            unlinked.join(", ")
        ));
    }
    let dangling: Vec<Bdf> = raws.values().filter(|r| !r.in_tree).map(|r| r.bdf).collect();
    for b in dangling {
        let r = raws.remove(&b).expect("listed above");
        warnings.push(format!("sys/bus/pci/devices/{b} points to {}, which does not exist: skipped", r.dir.display()));
    }
    Ok(Enumeration { raws: raws.into_values().collect(), warnings })
}

/// Host-bridge directories (`pci<dom>:<bus>`) the kernel's tree shows: directly below
/// `sys/devices` (x86, ACPI arm64), below platform devices (device-tree SoCs), and wherever a
/// `sys/class/pci_bus` link leads (any other parent, e.g. Hyper-V's VMBus).
fn host_bridge_dirs(sys: &Sysroot) -> Result<Vec<PathBuf>, TopologyError> {
    let mut out = Vec::new();
    let mut stack = vec![(PathBuf::from("sys/devices"), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        for e in sys.entries(&dir)?.unwrap_or_default().into_iter().filter(|e| e.is_dir) {
            let p = dir.join(&e.name);
            if is_host_bridge_dir(&e.name) {
                out.push(p);
            } else if (depth == 0 && e.name == "platform")
                || ((1..4).contains(&depth) && dir.starts_with("sys/devices/platform"))
            {
                stack.push((p, depth + 1));
            }
        }
    }
    for name in sys.list_dir("sys/class/pci_bus")?.unwrap_or_default() {
        let Some(target) = sys.resolve_link(PathBuf::from("sys/class/pci_bus").join(&name))? else { continue };
        let comps: Vec<_> = target.components().collect();
        if let Some(i) = comps.iter().rposition(|c| c.as_os_str().to_str().is_some_and(is_host_bridge_dir)) {
            out.push(comps[..=i].iter().collect());
        }
    }
    Ok(out)
}

/// Walks one host bridge's directory tree: every subdirectory named like a PCI function is one,
/// and its parent directory's function is its upstream bridge. Returns `dir`'s listing, kept for
/// reading the function's attributes.
#[allow(clippy::too_many_arguments)]
fn walk_tree(
    sys: &Sysroot,
    host_dir: &Path,
    host_name: &str,
    dir: &Path,
    parent: Option<Bdf>,
    depth: usize,
    raws: &mut BTreeMap<Bdf, RawDev>,
    warnings: &mut Vec<String>,
) -> Result<Option<Listing>, TopologyError> {
    if depth > MAX_PCI_DEPTH {
        warnings.push(format!("{}: PCI hierarchy deeper than {MAX_PCI_DEPTH} levels: not followed", dir.display()));
        return Ok(None);
    }
    // The directory is closed before the walk goes deeper: open directories do not pile up.
    let sub = sys.subdir(dir);
    let subdirs = sub.subdirs()?.unwrap_or_default();
    let listing = sub.into_listing();
    for name in subdirs {
        let Ok(bdf) = name.parse::<Bdf>() else { continue };
        let p = dir.join(&name);
        match raws.get_mut(&bdf) {
            Some(r) if r.dir == p => r.in_tree = true,
            Some(r) => {
                warnings.push(format!(
                    "{bdf} appears at {} and at {}: the first is used",
                    r.dir.display(),
                    p.display()
                ));
                continue;
            }
            None => {
                raws.insert(
                    bdf,
                    RawDev {
                        bdf,
                        dir: p.clone(),
                        host_bridge: host_name.to_string(),
                        host_dir: host_dir.to_path_buf(),
                        parent_bdf: parent,
                        linked: false,
                        in_tree: true,
                        listing: None,
                    },
                );
            }
        }
        let listing = walk_tree(sys, host_dir, host_name, &p, Some(bdf), depth + 1, raws, warnings)?;
        if let Some(r) = raws.get_mut(&bdf) {
            r.listing = listing;
        }
    }
    Ok(listing)
}

/// Reads an attribute whose absence or unreadability makes one fact unknown (noted with the
/// reason); malformed or hostile content is still an error naming the file.
fn attr(
    dir: &SubDir,
    name: &str,
    fact: &'static str,
    unknown: &mut Vec<Unknown>,
) -> Result<Option<String>, TopologyError> {
    match dir.read_opt(name) {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) => {
            unknown.push(Unknown { fact, why: format!("{} is missing", dir.join(name).display()) });
            Ok(None)
        }
        Err(e) if e.is_unreadable() => {
            unknown.push(Unknown { fact, why: e.to_string() });
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// One of vendor/device/class: the sysfs file, else the config bytes (offset `off`, `len` bytes).
fn id_attr(
    d: &SubDir,
    name: &'static str,
    bits: u32,
    cfg: Option<&[u8]>,
    off: usize,
    unknown: &mut Vec<Unknown>,
) -> Result<u64, TopologyError> {
    if let Some(s) = attr(d, name, name, unknown)? {
        return Ok(parse_hex_bits(&d.join(name), &s, bits)?);
    }
    let len = bits.div_ceil(8) as usize;
    match cfg.and_then(|c| c.get(off..off + len)) {
        Some(b) => {
            unknown.pop();
            Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
        }
        None => Ok((1u64 << bits) - 1),
    }
}

pub(crate) fn parse_bars(
    res_rel: &Path,
    res: &[(u64, u64, u64)],
    config: &ConfigInfo,
) -> Result<Vec<Bar>, TopologyError> {
    let mut bars = Vec::new();
    for (i, &(start, end, flags)) in res.iter().take(6).enumerate() {
        if start == 0 && end == 0 {
            continue;
        }
        if end < start {
            return Err(malformed_err(res_rel, format!("line {i}: end {end:#x} < start {start:#x}"), "").into());
        }
        if flags & (RES_DISABLED | RES_UNSET) != 0 {
            continue;
        }
        let kind = if flags & RES_IO != 0 {
            BarKind::Io
        } else if flags & RES_MEM != 0 {
            BarKind::Mem
        } else {
            return Err(malformed_err(res_rel, format!("line {i}: flags {flags:#x} are neither IO nor MEM"), "").into());
        };
        let len = (end - start).checked_add(1).ok_or_else(|| malformed_err(res_rel, "BAR spans 2^64", ""))?;
        let cpu = AddrRange::new(CpuPhys::new(start), len).map_err(|e| malformed_err(res_rel, e.to_string(), ""))?;
        let reg = config.bars.get(i).copied().unwrap_or(BarReg::Unset);
        let (bus_start, is64, prefetchable) = match (kind, reg) {
            (BarKind::Mem, BarReg::Mem { bus_start, is64, prefetchable }) => {
                (Some(BusAddr::new(bus_start)), is64, prefetchable)
            }
            (BarKind::Io, BarReg::Io { addr }) => (Some(BusAddr::new(addr as u64)), false, false),
            _ => (None, flags & RES_MEM_64 != 0, flags & RES_PREFETCH != 0),
        };
        bars.push(Bar { index: i as u8, kind, cpu, bus_start, is64, prefetchable, flags });
    }
    Ok(bars)
}

impl Topology {
    /// Reads the topology of the sysroot at `root` (`/` for the live system).
    ///
    /// Functions come from the kernel's own hierarchy (the `sys/devices` tree below each
    /// `pci<dom>:<bus>`) and from the `sys/bus/pci/devices` links; a missing or unreadable
    /// attribute makes that fact unknown (listed in the device's `unknown`), not the machine.
    pub fn discover(root: impl AsRef<Path>) -> Result<Topology, TopologyError> {
        let sys = Sysroot::open(root.as_ref())?;
        let mut platform = Platform::read(&sys)?;
        let Enumeration { raws, mut warnings } = enumerate(&sys)?;
        let id = NEXT_TOPOLOGY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let index: HashMap<Bdf, DevIdx> = raws.iter().enumerate().map(|(i, r)| (r.bdf, DevIdx::of(id, i))).collect();
        let mut devices = Self::read_devices(&sys, &raws, &index)?;
        Self::check_upstream_walks(&devices)?;
        Self::attach_class_devices(&sys, &mut devices, &index)?;
        let host_bridges = Self::host_bridges_of(id, &raws, &devices);
        platform.add_pci_virt_signals(devices.iter().map(|d| d.vendor));
        warnings.extend(platform.unknown_notes());
        if let Some(dt) = &platform.device_tree {
            warnings.extend(dt_range_warnings(dt, &devices));
        }
        Ok(Topology { id, root: sys.root().to_path_buf(), platform, devices, index, host_bridges, warnings })
    }

    /// Reads every device's attributes. Reading is syscall-bound, so large trees are read by a
    /// few threads.
    fn read_devices(
        sys: &Sysroot,
        raws: &[RawDev],
        index: &HashMap<Bdf, DevIdx>,
    ) -> Result<Vec<PciDevice>, TopologyError> {
        let parents: Vec<Option<DevIdx>> =
            raws.iter().map(|r| r.parent_bdf.and_then(|p| index.get(&p).copied())).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        let chunk = raws.len().div_ceil(threads).max(16);
        let read_all = |rs: &[RawDev], ps: &[Option<DevIdx>]| {
            rs.iter().zip(ps).map(|(r, &p)| Self::read_device(sys, r, p, index)).collect::<Result<Vec<_>, _>>()
        };
        if raws.len() <= chunk {
            return read_all(raws, &parents);
        }
        let mut devices = Vec::with_capacity(raws.len());
        std::thread::scope(|scope| -> Result<(), TopologyError> {
            let workers: Vec<_> = raws
                .chunks(chunk)
                .zip(parents.chunks(chunk))
                .map(|(rs, ps)| scope.spawn(|| read_all(rs, ps)))
                .collect();
            for w in workers {
                devices.extend(w.join().expect("device reader thread panicked")?);
            }
            Ok(())
        })?;
        Ok(devices)
    }

    /// Refuses a tree whose upstream walk (`upstream`: the parent, or the parent of the SR-IOV
    /// `physfn`) would not end: a `physfn` link to the device itself, to one of its descendants,
    /// or to a function whose own walk leads back. The error names the first `physfn` link met.
    fn check_upstream_walks(devices: &[PciDevice]) -> Result<(), TopologyError> {
        let next = |c: &PciDevice| c.physfn.map_or(c, |p| &devices[p.get()]).parent.map(|p| &devices[p.get()]);
        for d in devices {
            // A walk that ends visits each device at most once.
            let walk = std::iter::successors(Some(d), |c| next(c)).take(devices.len() + 1);
            if walk.clone().count() > devices.len() {
                let culprit = walk.clone().find(|c| c.physfn.is_some()).unwrap_or(d);
                let pf = culprit.physfn.map(|p| devices[p.get()].bdf.to_string()).unwrap_or_default();
                return Err(TopologyError::Layout {
                    path: culprit.sysfs_dir.join("physfn"),
                    why: format!("points to {pf}, whose upstream walk leads back to {}: refusing a cycle", culprit.bdf),
                });
            }
        }
        Ok(())
    }

    /// Class devices (nvme0, eth0, ...) onto their PCI function.
    fn attach_class_devices(
        sys: &Sysroot,
        devices: &mut [PciDevice],
        index: &HashMap<Bdf, DevIdx>,
    ) -> Result<(), TopologyError> {
        for class in CLASSES {
            let cdir = PathBuf::from("sys/class").join(class);
            for name in sys.list_dir(&cdir)?.unwrap_or_default() {
                let Some(target) = sys.resolve_link(cdir.join(&name))? else {
                    continue;
                };
                let owner = target
                    .components()
                    .filter_map(|c| c.as_os_str().to_str().and_then(|s| s.parse::<Bdf>().ok()))
                    .filter_map(|b| index.get(&b).copied())
                    .next_back();
                if let Some(i) = owner {
                    devices[i.get()].class_devices.push(ClassDevice { class: class.to_string(), name: name.clone() });
                }
            }
        }
        Ok(())
    }

    /// Host bridges, their root buses and the device `pci_host_bridge_dev()` would return.
    fn host_bridges_of(id: u32, raws: &[RawDev], devices: &[PciDevice]) -> Vec<HostBridge> {
        let mut host_bridges: Vec<HostBridge> = Vec::new();
        for (i, r) in raws.iter().enumerate() {
            if !host_bridges.iter().any(|h| h.name == r.host_bridge) {
                host_bridges.push(HostBridge {
                    name: r.host_bridge.clone(),
                    dir: r.host_dir.clone(),
                    root_bus: Vec::new(),
                    dev: HostBridgeDev::Empty,
                });
            }
            if r.parent_bdf.is_none() {
                let hb = host_bridges.iter_mut().find(|h| h.name == r.host_bridge).expect("inserted above");
                hb.root_bus.push(DevIdx::of(id, i));
            }
        }
        for hb in &mut host_bridges {
            hb.root_bus.sort_by_key(|i| devices[i.get()].bdf.devfn());
            hb.dev = match hb.root_bus.first() {
                None => HostBridgeDev::Empty,
                Some(&i) => {
                    let d = &devices[i.get()];
                    if d.bdf.devfn() == 0 {
                        HostBridgeDev::Devfn0(i)
                    } else if d.port_type() == Some(PortType::RootPort) {
                        HostBridgeDev::RootPort(i)
                    } else if d.port_type().is_none()
                        && d.config.pcie == crate::pci::config::Pcie::Unknown
                        && d.is_bridge()
                    {
                        HostBridgeDev::AssumedRootPort(i)
                    } else {
                        HostBridgeDev::None
                    }
                }
            };
        }
        host_bridges.sort_by(|a, b| a.name.cmp(&b.name));
        host_bridges
    }

    /// Splits a device's sysfs directory into host bridge and chain of upstream BDFs.
    fn chain_of(bdf: Bdf, link: &Path, dir: PathBuf) -> Result<RawDev, TopologyError> {
        let comps: Vec<String> = dir.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let layout = |why: String| TopologyError::Layout { path: link.to_path_buf(), why };
        if comps.first().map(String::as_str) != Some("sys") || comps.get(1).map(String::as_str) != Some("devices") {
            return Err(layout(format!("target {} is not under sys/devices", dir.display())));
        }
        let hb = comps
            .iter()
            .rposition(|c| is_host_bridge_dir(c))
            .ok_or_else(|| layout(format!("no pci<domain>:<bus> host bridge directory in {}", dir.display())))?;
        let mut chain = Vec::new();
        for c in &comps[hb + 1..] {
            chain.push(c.parse::<Bdf>().map_err(|_| {
                layout(format!("{c:?} in {} is not a PCI function below the host bridge", dir.display()))
            })?);
        }
        if chain.last() != Some(&bdf) {
            return Err(layout(format!("target {} does not end in {bdf}", dir.display())));
        }
        let parent_bdf = chain.len().checked_sub(2).map(|i| chain[i]);
        let host_dir: PathBuf = comps[..=hb].iter().collect();
        Ok(RawDev {
            bdf,
            dir,
            host_bridge: comps[hb].clone(),
            host_dir,
            parent_bdf,
            linked: true,
            in_tree: false,
            listing: None,
        })
    }

    /// The config space, or an unknown one (with the reason) when the file is absent or unreadable.
    fn read_config(d: &SubDir, unknown: &mut Vec<Unknown>) -> Result<(Option<Vec<u8>>, ConfigInfo), TopologyError> {
        let rel = d.join("config");
        let bytes = match d.read_bytes_opt_max("config", 4096) {
            Ok(Some(b)) => b,
            Ok(None) => {
                unknown.push(Unknown {
                    fact: "config",
                    why: format!("{} is missing: BAR bus addresses, PCIe port type and ACS are unknown", rel.display()),
                });
                return Ok((None, ConfigInfo::unknown()));
            }
            Err(e) if e.is_unreadable() => {
                unknown.push(Unknown {
                    fact: "config",
                    why: format!("{e}: BAR bus addresses, PCIe port type and ACS are unknown"),
                });
                return Ok((None, ConfigInfo::unknown()));
            }
            Err(crate::sysroot::SysrootError::TooLarge { path, .. }) => {
                return Err(TopologyError::Config { path, source: ConfigError::OddSize { len: 4097 } })
            }
            Err(e) => return Err(e.into()),
        };
        let config = ConfigInfo::parse(&bytes).map_err(|source| TopologyError::Config { path: rel, source })?;
        Ok((Some(bytes), config))
    }

    fn read_device(
        sys: &Sysroot,
        r: &RawDev,
        parent: Option<DevIdx>,
        index: &HashMap<Bdf, DevIdx>,
    ) -> Result<PciDevice, TopologyError> {
        let dir = sys.subdir_listed(&r.dir, r.listing.as_ref());
        let d = &dir;
        let mut unknown = Vec::new();
        let opt_hex = |name: &str, bits: u32| -> Result<Option<u64>, TopologyError> {
            Ok(match d.read_opt(name)? {
                Some(s) => Some(parse_hex_bits(&d.join(name), &s, bits)?),
                None => None,
            })
        };
        let (cfg, mut config) = Self::read_config(d, &mut unknown)?;
        let vendor = id_attr(d, "vendor", 16, cfg.as_deref(), 0, &mut unknown)? as u16;
        let device = id_attr(d, "device", 16, cfg.as_deref(), 2, &mut unknown)? as u16;
        let class = id_attr(d, "class", 24, cfg.as_deref(), 9, &mut unknown)? as u32;
        if cfg.is_none() && (class >> 8 == 0x0604 || class >> 8 == 0x0609) {
            config.header_type = 1;
        }
        let res_rel = d.join("resource");
        let bars = match attr(d, "resource", "resource", &mut unknown)? {
            Some(text) => parse_bars(&res_rel, &parse_resource(&res_rel, &text)?, &config)?,
            None => Vec::new(),
        };
        let link = Self::read_link(d, &config, &mut unknown)?;
        let numa_node = match attr(d, "numa_node", "numa_node", &mut unknown)? {
            Some(s) => Some(parse_dec::<i32>(&d.join("numa_node"), &s)?).filter(|n| *n >= 0),
            None => None,
        };
        let local_cpulist = d.read_opt("local_cpulist")?;
        let driver = d.link_name("driver")?;
        let (iommu_group, p2pmem, physfn) = Self::read_extras(sys, d, index)?;
        Ok(PciDevice {
            bdf: r.bdf,
            vendor,
            device,
            class,
            subsystem_vendor: opt_hex("subsystem_vendor", 16)?.map(|v| v as u16),
            subsystem_device: opt_hex("subsystem_device", 16)?.map(|v| v as u16),
            revision: opt_hex("revision", 8)?.map(|v| v as u8),
            host_bridge: r.host_bridge.clone(),
            sysfs_dir: r.dir.clone(),
            parent,
            physfn,
            config,
            link,
            numa_node,
            local_cpulist,
            iommu_group,
            driver,
            bars,
            p2pmem,
            class_devices: Vec::new(),
            linked: r.linked,
            unknown,
        })
    }

    /// IOMMU group (and its domain type), p2pmem pool and SR-IOV physical function.
    fn read_extras(sys: &Sysroot, d: &SubDir, index: &HashMap<Bdf, DevIdx>) -> Result<Extras, TopologyError> {
        let iommu_group = match d.link_name("iommu_group")? {
            Some(g) => {
                let rel = d.join("iommu_group");
                let id = parse_dec::<u32>(&rel, &g)?;
                let domain_type = sys.read_opt(format!("sys/kernel/iommu_groups/{id}/type"))?;
                Some(IommuGroup { id, domain_type })
            }
            None => None,
        };
        let p2pmem = match d.read_opt("p2pmem/size")? {
            Some(size) => Some(P2pmem {
                size: parse_dec(&d.join("p2pmem/size"), &size)?,
                available: Self::opt_attr(d, "p2pmem/available", parse_dec::<u64>)?.unwrap_or(0),
                published: Self::opt_attr(d, "p2pmem/published", parse_bool)?.unwrap_or(false),
            }),
            None => None,
        };
        let physfn = match d.resolve_link("physfn")? {
            Some(p) => p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Bdf>().ok())
                .and_then(|b| index.get(&b).copied()),
            None => None,
        };
        Ok((iommu_group, p2pmem, physfn))
    }

    /// The link attributes; their absence is noted only for a PCI Express function (or one whose
    /// capability list is unknown): conventional PCI has no link.
    fn read_link(d: &SubDir, config: &ConfigInfo, unknown: &mut Vec<Unknown>) -> Result<Link, TopologyError> {
        let link = Link {
            cur_gts: Self::opt_attr(d, "current_link_speed", parse_link_speed)?.flatten(),
            cur_width: Self::opt_attr(d, "current_link_width", parse_dec::<u32>)?.filter(|w| *w > 0),
            max_gts: Self::opt_attr(d, "max_link_speed", parse_link_speed)?.flatten(),
            max_width: Self::opt_attr(d, "max_link_width", parse_dec::<u32>)?.filter(|w| *w > 0),
        };
        if config.pcie != Pcie::No && (link.cur_gts.is_none() || link.cur_width.is_none()) {
            unknown.push(Unknown {
                fact: "link",
                why: format!(
                    "{}/current_link_speed or current_link_width is missing or reads Unknown",
                    d.rel().display()
                ),
            });
        }
        Ok(link)
    }

    fn opt_attr<T>(
        dir: &SubDir,
        name: &str,
        parse: impl Fn(&Path, &str) -> Result<T, SysrootError>,
    ) -> Result<Option<T>, TopologyError> {
        Ok(match dir.read_opt(name)? {
            Some(s) => Some(parse(&dir.join(name), &s)?),
            None => None,
        })
    }

    /// This topology's id (unique within the process): every `DevIdx` it hands out carries it.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// Whether `i` is an index of this topology.
    pub fn owns(&self, i: DevIdx) -> bool {
        i.topo == self.id && i.get() < self.devices.len()
    }
    /// The index of every device, in `devices()` order.
    pub fn indices(&self) -> impl Iterator<Item = DevIdx> + '_ {
        (0..self.devices.len()).map(|i| DevIdx::of(self.id, i))
    }
    /// The sysroot this topology was read from.
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn devices(&self) -> &[PciDevice] {
        &self.devices
    }
    pub fn len(&self) -> usize {
        self.devices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
    pub fn idx(&self, bdf: Bdf) -> Result<DevIdx, TopologyError> {
        self.index.get(&bdf).copied().ok_or(TopologyError::UnknownDevice(bdf))
    }
    pub fn device(&self, i: DevIdx) -> &PciDevice {
        &self.devices[i.get()]
    }
    pub fn by_bdf(&self, bdf: Bdf) -> Result<&PciDevice, TopologyError> {
        Ok(self.device(self.idx(bdf)?))
    }
    pub fn host_bridges(&self) -> &[HostBridge] {
        &self.host_bridges
    }
    pub fn host_bridge(&self, name: &str) -> Option<&HostBridge> {
        self.host_bridges.iter().find(|h| h.name == name)
    }

    /// The kernel's `pci_upstream_bridge()`: the bridge above the device, or above its PF for a VF.
    pub fn upstream(&self, i: DevIdx) -> Option<DevIdx> {
        let d = self.device(i);
        let base = d.physfn.unwrap_or(i);
        self.device(base).parent
    }

    /// The device and every upstream bridge up to the root bus, nearest first.
    pub fn chain(&self, i: DevIdx) -> Vec<DevIdx> {
        let mut v = vec![i];
        let mut cur = i;
        while let Some(u) = self.upstream(cur) {
            v.push(u);
            cur = u;
        }
        v
    }

    /// Endpoints: functions that are not bridges (what `topo` shows in its matrix).
    pub fn endpoints(&self) -> impl Iterator<Item = DevIdx> + '_ {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.is_bridge() && d.class >> 16 != 0x06)
            .map(|(i, _)| DevIdx::of(self.id, i))
    }
}

/// Cross-checks every memory BAR's bus offset against the device-tree PCI `ranges` that hold
/// it; each disagreement (or a BAR in no window) is one warning.
fn dt_range_warnings(dt: &DeviceTree, devices: &[PciDevice]) -> Vec<String> {
    let mut warnings = Vec::new();
    for d in devices {
        for b in d.bars.iter().filter(|b| b.kind == BarKind::Mem) {
            let Some(w) = b.window() else { continue };
            match dt.memory_window(b.cpu.start()) {
                Some((h, r)) if r.offset() != w.offset() => warnings.push(format!(
                    "{} BAR{}: config says bus offset {} but device-tree {} ranges say {}",
                    d.bdf,
                    b.index,
                    w.offset(),
                    h.node.display(),
                    r.offset()
                )),
                None => warnings.push(format!(
                    "{} BAR{} at CPU {:#x} lies in no device-tree PCI ranges window",
                    d.bdf,
                    b.index,
                    b.cpu.start()
                )),
                _ => {}
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_speed_formats() {
        let p = Path::new("x/current_link_speed");
        assert_eq!(parse_link_speed(p, "8.0 GT/s PCIe").unwrap(), Some(8.0));
        assert_eq!(parse_link_speed(p, "2.5 GT/s").unwrap(), Some(2.5));
        assert_eq!(parse_link_speed(p, "Unknown").unwrap(), None);
        assert_eq!(parse_link_speed(p, "Unknown speed").unwrap(), None);
        assert!(parse_link_speed(p, "fast").is_err());
        assert!(parse_link_speed(p, "8.0 MB/s").is_err());
    }

    #[test]
    fn link_bandwidth_uses_line_code() {
        let gen3x16 = Link { cur_gts: Some(8.0), cur_width: Some(16), ..Default::default() };
        assert!((gen3x16.bandwidth_gbs().unwrap() - 15.75).abs() < 0.01);
        let gen1x1 = Link { cur_gts: Some(2.5), cur_width: Some(1), ..Default::default() };
        assert!((gen1x1.bandwidth_gbs().unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(Link::default().bandwidth_gbs(), None);
    }

    #[test]
    fn host_bridge_dir_names() {
        assert!(is_host_bridge_dir("pci0000:00"));
        assert!(is_host_bridge_dir("pci10000:e0"));
        assert!(!is_host_bridge_dir("pci_bus"));
        assert!(!is_host_bridge_dir("0000:00:00.0"));
    }

    #[test]
    fn resource_needs_six_well_formed_lines() {
        let p = Path::new("x/resource");
        assert!(parse_resource(p, "0x0 0x0 0x0\n").is_err());
        assert!(parse_resource(p, &"0x0 0x0\n".repeat(6)).is_err());
        assert!(parse_resource(p, &"0x0 0x0 0xzz\n".repeat(6)).is_err());
        assert_eq!(parse_resource(p, &"0x0 0x0 0x0\n".repeat(7)).unwrap().len(), 7);
    }
}
