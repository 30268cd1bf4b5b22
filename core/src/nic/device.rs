//! RDMA devices as the topology sees them: each `sys/class/infiniband/<dev>` mapped to the PCI
//! function it sits on, or marked a software device (rxe, siw) with its netdev.
//!
//! Owns: `RdmaDevice`, `NicPlace`, `RdmaFacts` (port numbers, state and rate), and reading
//! them through the confined sysroot. Must not: open a device (the rdma backend does) or judge a
//! PCI pair (the registry does).

use std::path::{Path, PathBuf};

use super::NicError;
use crate::pci::Bdf;
use crate::sysroot::{malformed_err, Sysroot, SysrootError};

/// Where the class directory of RDMA devices lives below a sysroot.
const CLASS: &str = "sys/class/infiniband";

/// Where an RDMA device lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicPlace {
    /// A PCI function: the registry judges routes with it as the peer.
    Pci(Bdf),
    /// A software device (rxe, siw): no PCI function; its kernel driver moves data with the CPU,
    /// over `netdev` when known.
    Virtual { netdev: Option<String> },
}

impl NicPlace {
    pub fn bdf(&self) -> Option<Bdf> {
        match self {
            NicPlace::Pci(b) => Some(*b),
            NicPlace::Virtual { .. } => None,
        }
    }

    /// One line saying where the device is and what that means for routes.
    pub fn describe(&self) -> String {
        match self {
            NicPlace::Pci(b) => format!("PCI function {b}: routes are judged for this pair by the topology"),
            NicPlace::Virtual { netdev } => format!(
                "virtual device (no PCI function{}): its kernel driver reaches memory with the CPU, so it \
                 is judged as the CPU peer",
                netdev.as_ref().map(|n| format!("; over netdev {n}")).unwrap_or_default()
            ),
        }
    }
}

/// One RDMA device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDevice {
    pub name: String,
    pub place: NicPlace,
    /// `sys/class/infiniband/<name>` below the root it was read from.
    pub sysfs: PathBuf,
}

/// Every RDMA device under `root` (a live `/` or a captured sysroot), sorted by name. A root
/// without `sys/class/infiniband` has none.
pub fn devices(root: impl AsRef<Path>) -> Result<Vec<RdmaDevice>, NicError> {
    devices_in(&Sysroot::open(root.as_ref())?)
}

/// Every RDMA device of an opened sysroot, sorted by name.
pub fn devices_in(sys: &Sysroot) -> Result<Vec<RdmaDevice>, NicError> {
    let names = sys.list_dir(CLASS)?.unwrap_or_default();
    names.iter().map(|n| device_in(sys, n)).collect()
}

/// The device `name` under `root`.
pub fn device_at(root: &Path, name: &str) -> Result<RdmaDevice, NicError> {
    device_in(&Sysroot::open(root)?, name)
}

fn device_in(sys: &Sysroot, name: &str) -> Result<RdmaDevice, NicError> {
    if name.is_empty() || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(NicError::BadName(name.to_string()));
    }
    let class = Path::new(CLASS).join(name);
    // The class entry is a relative link into `sys/devices/...` (a directory in some captures).
    let dir = match sys.resolve_link(&class)? {
        Some(dir) => dir,
        None if sys.entries(&class)?.is_some() => class.clone(),
        None => return Err(NicError::NoDevice { wanted: Some(name.to_string()) }),
    };
    // `device` -> ../../../0000:07:00.0: the function itself, or for a device below one (an mlx5
    // sub-function) the nearest PCI function above it, which is what does its DMA.
    let bdf = sys
        .resolve_link(dir.join("device"))?
        .and_then(|target| target.components().filter_map(|c| c.as_os_str().to_str()?.parse::<Bdf>().ok()).next_back());
    let place = match bdf {
        Some(b) => NicPlace::Pci(b),
        None => NicPlace::Virtual { netdev: parent_netdev(sys, &dir)? },
    };
    Ok(RdmaDevice { name: name.to_string(), place, sysfs: sys.path(&class) })
}

/// What sysfs tells about an RDMA device's ports. Each fact is `None` (or the list empty) where
/// the files are absent or unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaFacts {
    /// Every port under `ports/`, by number.
    pub ports: Vec<RdmaPort>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPort {
    pub number: u32,
    /// `state` reads `4: ACTIVE`.
    pub active: Option<bool>,
    /// `rate` (`100 Gb/sec (4X EDR)`) in Mb/s.
    pub rate_mbps: Option<u64>,
    /// The IPv4 addresses in the port's GID table (RoCE: `::ffff:a.b.c.d` entries), in table
    /// order, each once: where rdma_cm reaches this port.
    pub ipv4: Vec<std::net::Ipv4Addr>,
}

impl RdmaFacts {
    /// The port a verbs consumer uses: the first active one, else the first known.
    pub fn port(&self) -> Option<&RdmaPort> {
        self.ports.iter().find(|p| p.active == Some(true)).or(self.ports.first())
    }
}

/// The ports of `dev`, read below `root`. A malformed file is an error naming it.
pub fn facts(root: &Path, dev: &RdmaDevice) -> Result<RdmaFacts, NicError> {
    let sys = Sysroot::open(root)?;
    let dir = Path::new(CLASS).join(&dev.name);
    let mut f = RdmaFacts::default();
    let mut numbers: Vec<u32> =
        sys.list_dir(dir.join("ports"))?.unwrap_or_default().iter().filter_map(|n| n.parse().ok()).collect();
    numbers.sort_unstable();
    for number in numbers {
        let p = dir.join("ports").join(number.to_string());
        let active = match read_soft(&sys, &p.join("state"))? {
            None => None,
            Some(s) => {
                Some(port_state(&s).ok_or_else(|| malformed_err(&p.join("state"), "expected 'N: NAME'", &s))? == 4)
            }
        };
        let rate_mbps = match read_soft(&sys, &p.join("rate"))? {
            None => None,
            Some(s) => {
                Some(rate_mbps(&s).ok_or_else(|| malformed_err(&p.join("rate"), "expected '<N> Gb/sec ...'", &s))?)
            }
        };
        let ipv4 = gid_ipv4(&sys, &p.join("gids"))?;
        f.ports.push(RdmaPort { number, active, rate_mbps, ipv4 });
    }
    Ok(f)
}

/// The most GID table entries read per port (a table is 16 to 256 entries long).
const MAX_GIDS: usize = 1024;

/// The IPv4-mapped entries of a port's GID table (`gids/N`); empty entries, IPv6 ones and
/// unreadable files are skipped.
fn gid_ipv4(sys: &Sysroot, dir: &Path) -> Result<Vec<std::net::Ipv4Addr>, SysrootError> {
    let mut idx: Vec<u32> = sys.list_dir(dir)?.unwrap_or_default().iter().filter_map(|n| n.parse().ok()).collect();
    idx.sort_unstable();
    let mut out = Vec::new();
    for i in idx.into_iter().take(MAX_GIDS) {
        let Some(text) = read_soft(sys, &dir.join(i.to_string()))? else { continue };
        let ip = text.trim().parse::<std::net::Ipv6Addr>().ok().and_then(|g| g.to_ipv4_mapped());
        if let Some(ip) = ip.filter(|ip| !ip.is_unspecified() && !out.contains(ip)) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// An attribute that may be absent or unreadable (then unknown); anything hostile is an error.
fn read_soft(sys: &Sysroot, rel: &Path) -> Result<Option<String>, SysrootError> {
    match sys.read_opt(rel) {
        Ok(v) => Ok(v.filter(|s| !s.is_empty())),
        Err(e) if e.is_unreadable() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `4: ACTIVE` -> 4.
fn port_state(s: &str) -> Option<u32> {
    s.split_once(':')?.0.trim().parse().ok()
}

/// `100 Gb/sec (4X EDR)` -> 100000; `2.5 Gb/sec (1X SDR)` -> 2500.
fn rate_mbps(s: &str) -> Option<u64> {
    let (n, rest) = s.split_once(' ')?;
    let gbps: f64 = n.parse().ok().filter(|g: &f64| g.is_finite() && *g >= 0.0 && *g < 1e6)?;
    rest.starts_with("Gb/sec").then(|| (gbps * 1000.0).round() as u64)
}

/// rxe and siw name their netdev in `parent`; otherwise port 1's first GID's netdev.
fn parent_netdev(sys: &Sysroot, dir: &Path) -> Result<Option<String>, NicError> {
    for f in ["parent", "ports/1/gid_attrs/ndevs/0"] {
        match sys.read_opt(dir.join(f)) {
            Ok(Some(s)) if !s.trim().is_empty() => return Ok(Some(s.trim().to_string())),
            Ok(_) => {}
            // An unreadable attribute leaves the netdev unknown; a hostile one is an error.
            Err(e) if e.is_unreadable() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysroot with one PCI NIC (mlx5_0 on 0000:3b:00.0, laid out as the kernel does) and one
    /// rxe device on eth0.
    fn sysroot() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let pci = r.join("sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0");
        std::fs::create_dir_all(pci.join("infiniband/mlx5_0")).unwrap();
        symlink("../../../0000:3b:00.0", pci.join("infiniband/mlx5_0/device")).unwrap();
        let virt = r.join("sys/devices/virtual/infiniband/rxe0");
        std::fs::create_dir_all(&virt).unwrap();
        std::fs::write(virt.join("parent"), "eth0\n").unwrap();
        let class = r.join(CLASS);
        std::fs::create_dir_all(&class).unwrap();
        symlink("../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0", class.join("mlx5_0")).unwrap();
        symlink("../../devices/virtual/infiniband/rxe0", class.join("rxe0")).unwrap();
        t
    }

    #[test]
    fn pci_nic_maps_to_its_function_and_rxe_is_virtual() {
        let t = sysroot();
        let devs = devices(t.path()).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].name, "mlx5_0");
        assert_eq!(devs[0].place, NicPlace::Pci("0000:3b:00.0".parse().unwrap()));
        assert_eq!(devs[0].sysfs, t.path().join("sys/class/infiniband/mlx5_0"));
        assert_eq!(devs[1].name, "rxe0");
        assert_eq!(devs[1].place, NicPlace::Virtual { netdev: Some("eth0".into()) });
        assert!(devs[1].place.describe().contains("no PCI function"));
    }

    #[test]
    fn a_sub_function_nic_sits_on_the_pci_function_above_it() {
        let t = sysroot();
        let r = t.path();
        let sf = r.join("sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/mlx5_core.sf.2");
        std::fs::create_dir_all(sf.join("infiniband/mlx5_2")).unwrap();
        symlink("../../../mlx5_core.sf.2", sf.join("infiniband/mlx5_2/device")).unwrap();
        symlink(
            "../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/mlx5_core.sf.2/infiniband/mlx5_2",
            r.join(CLASS).join("mlx5_2"),
        )
        .unwrap();
        assert_eq!(device_at(r, "mlx5_2").unwrap().place, NicPlace::Pci("0000:3b:00.0".parse().unwrap()));
    }

    #[test]
    fn ports_are_read_with_state_and_rate_and_garbage_names_its_file() {
        let t = sysroot();
        let dev = r"sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0/infiniband/mlx5_0";
        let d = t.path().join(dev);
        for (n, state, rate) in [("1", "1: DOWN", "10 Gb/sec (4X SDR)"), ("2", "4: ACTIVE", "100 Gb/sec (4X EDR)")] {
            std::fs::create_dir_all(d.join("ports").join(n)).unwrap();
            std::fs::write(d.join("ports").join(n).join("state"), format!("{state}\n")).unwrap();
            std::fs::write(d.join("ports").join(n).join("rate"), format!("{rate}\n")).unwrap();
        }
        let mlx = device_at(t.path(), "mlx5_0").unwrap();
        let f = facts(t.path(), &mlx).unwrap();
        assert_eq!(f.ports.len(), 2);
        let p = f.port().unwrap();
        assert_eq!((p.number, p.active, p.rate_mbps), (2, Some(true), Some(100_000)), "the active port");
        // A software device without these files has no facts, not an error.
        let rxe = device_at(t.path(), "rxe0").unwrap();
        assert_eq!(facts(t.path(), &rxe).unwrap(), RdmaFacts::default());
        std::fs::write(d.join("ports/2/rate"), "fast\n").unwrap();
        let e = facts(t.path(), &mlx).unwrap_err().to_string();
        assert!(e.contains("ports/2/rate"), "{e}");
        std::fs::write(d.join("ports/2/rate"), "100 Gb/sec (4X EDR)\n").unwrap();
        std::fs::write(d.join("ports/1/state"), "DOWN\n").unwrap();
        assert!(facts(t.path(), &mlx).unwrap_err().to_string().contains("ports/1/state"));
    }

    #[test]
    fn a_class_link_that_leaves_the_root_is_refused() {
        let t = sysroot();
        symlink("../../../../../etc", t.path().join(CLASS).join("evil")).unwrap();
        assert!(matches!(device_at(t.path(), "evil"), Err(NicError::Sysroot(_))));
    }

    #[test]
    fn root_without_infiniband_class_has_no_devices() {
        let t = tempfile::tempdir().unwrap();
        assert!(devices(t.path()).unwrap().is_empty());
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        assert!(devices(fixture).unwrap().is_empty());
    }

    #[test]
    fn unknown_or_malformed_names_are_errors_not_panics() {
        let t = sysroot();
        assert!(matches!(device_at(t.path(), "mlx5_9"), Err(NicError::NoDevice { .. })));
        for bad in ["", "..", ".", "a/b"] {
            assert!(matches!(device_at(t.path(), bad), Err(NicError::BadName(_))), "{bad:?}");
        }
    }

    #[test]
    fn live_sysfs_lists_whatever_is_there() {
        // On the host there are none; in the guest rxe0 appears (the rdma guest tests check it).
        for d in devices("/").unwrap() {
            assert!(!d.name.is_empty());
        }
    }
}
