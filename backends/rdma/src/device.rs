//! RDMA devices as peers: each verbs device mapped to the PCI function it sits on (sysfs
//! `class/infiniband/<dev>/device`), and an opened NIC (context, protection domain, port).
//!
//! Owns: `RdmaDevice`, `NicPlace`, `Nic`. Must not: judge a PCI pair (the registry does) or
//! touch raw verbs (that is `sys`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peermem::{Bdf, Peer, Registry};

use crate::error::RdmaError;
use crate::event::AsyncEvent;
use crate::sys;

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

fn sysfs_err(path: &Path, source: std::io::Error) -> RdmaError {
    RdmaError::Sysfs { path: path.display().to_string(), source }
}

/// Every RDMA device under `root` (a live `/` or a captured sysroot), sorted by name. A root
/// without `sys/class/infiniband` has none.
pub fn devices(root: impl AsRef<Path>) -> Result<Vec<RdmaDevice>, RdmaError> {
    let root = root.as_ref();
    let class = root.join("sys/class/infiniband");
    let rd = match std::fs::read_dir(&class) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(sysfs_err(&class, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| sysfs_err(&class, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        out.push(device_at(root, &name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The device `name` under `root`.
pub fn device_at(root: &Path, name: &str) -> Result<RdmaDevice, RdmaError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(RdmaError::Invalid(format!("bad RDMA device name {name:?}")));
    }
    let dir = root.join("sys/class/infiniband").join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Err(RdmaError::NoDevice { wanted: Some(name.to_string()) });
    }
    let place = match std::fs::read_link(dir.join("device")) {
        // `device` -> ../../../0000:07:00.0 (relative): the last path component that parses
        // as a BDF is the function.
        Ok(target) => {
            let bdf = target.components().filter_map(|c| c.as_os_str().to_str()?.parse::<Bdf>().ok()).next_back();
            match bdf {
                Some(b) => NicPlace::Pci(b),
                None => NicPlace::Virtual { netdev: parent_netdev(&dir) },
            }
        }
        Err(_) => NicPlace::Virtual { netdev: parent_netdev(&dir) },
    };
    Ok(RdmaDevice { name: name.to_string(), place, sysfs: dir })
}

/// rxe and siw name their netdev in `parent`; otherwise port 1's first GID's netdev.
fn parent_netdev(dir: &Path) -> Option<String> {
    for f in ["parent", "ports/1/gid_attrs/ndevs/0"] {
        if let Ok(s) = std::fs::read_to_string(dir.join(f)) {
            let s = s.trim();
            if !s.is_empty() {
                return Some(s.to_string());
            }
        }
    }
    None
}

/// Bytes of the RoCE/IB port state we keep.
#[derive(Debug, Clone, Copy)]
pub struct PortInfo {
    pub port: u8,
    pub active_mtu: u32,
    pub lid: u16,
    pub link_layer: u8,
}

/// An opened RDMA device: context, one protection domain, one active port.
#[derive(Debug)]
pub struct Nic {
    pub(crate) dev: RdmaDevice,
    pub(crate) pd: Arc<sys::Pd>,
    pub(crate) port: PortInfo,
}

impl Nic {
    /// Opens `name` (or the first device when `None`) on the live system, port 1.
    pub fn open(name: Option<&str>) -> Result<Nic, RdmaError> {
        Self::open_in("/", name)
    }

    /// Like `open`, reading the device's place from sysfs under `root`.
    pub fn open_in(root: impl AsRef<Path>, name: Option<&str>) -> Result<Nic, RdmaError> {
        if !sys::library_present() {
            return Err(RdmaError::NoLibrary);
        }
        let names = match sys::device_names() {
            Ok(n) => n,
            // libibverbs reports "no devices" as ENOSYS.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Vec::new(),
            Err(source) => return Err(RdmaError::Verbs { dev: "*".into(), what: "ibv_get_device_list", source }),
        };
        let name = match name {
            Some(n) if names.iter().any(|d| d == n) => n.to_string(),
            Some(n) => return Err(RdmaError::NoDevice { wanted: Some(n.to_string()) }),
            None => names.first().cloned().ok_or(RdmaError::NoDevice { wanted: None })?,
        };
        let dev = match device_at(root.as_ref(), &name) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%name, "no sysfs entry ({e}); treating it as virtual");
                RdmaDevice { name: name.clone(), place: NicPlace::Virtual { netdev: None }, sysfs: PathBuf::new() }
            }
        };
        let verbs = |what: &'static str| {
            let dev = name.clone();
            move |source| RdmaError::Verbs { dev, what, source }
        };
        let ctx = sys::Context::open(&name).map_err(verbs("ibv_open_device"))?;
        let pd = sys::Pd::alloc(&ctx).map_err(verbs("ibv_alloc_pd"))?;
        let port = 1u8;
        let pa = ctx.query_port(port).map_err(verbs("ibv_query_port"))?;
        if !pa.active {
            return Err(RdmaError::PortDown { dev: name, port, state: pa.state });
        }
        tracing::debug!(dev = %name, place = ?dev.place, "opened RDMA device");
        Ok(Nic { dev, pd, port: PortInfo { port, active_mtu: pa.active_mtu, lid: pa.lid, link_layer: pa.link_layer } })
    }

    pub fn name(&self) -> &str {
        &self.dev.name
    }

    pub fn device(&self) -> &RdmaDevice {
        &self.dev
    }

    pub fn place(&self) -> &NicPlace {
        &self.dev.place
    }

    pub fn port(&self) -> PortInfo {
        self.port
    }

    /// GID `index` of the port.
    pub fn gid(&self, index: i32) -> Result<[u8; 16], RdmaError> {
        self.pd.context().query_gid(self.port.port, index).map_err(|source| RdmaError::Verbs {
            dev: self.name().into(),
            what: "ibv_query_gid",
            source,
        })
    }

    /// The peer the registry judges routes for, and why. A PCI NIC missing from the registry's
    /// topology is an error; a virtual NIC is the CPU peer.
    pub fn peer(&self, registry: &Registry) -> Result<Peer, RdmaError> {
        match &self.dev.place {
            NicPlace::Pci(b) => Ok(registry.peer(*b)?),
            NicPlace::Virtual { .. } => Ok(Peer::Cpu),
        }
    }

    /// The next asynchronous event of the device, if one is pending (never blocks).
    pub fn poll_async_event(&self) -> Result<Option<AsyncEvent>, RdmaError> {
        self.pd.context().poll_async_event().map_err(|source| RdmaError::Verbs {
            dev: self.name().into(),
            what: "ibv_get_async_event",
            source,
        })
    }

    pub(crate) fn verbs_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> RdmaError + '_ {
        move |source| RdmaError::Verbs { dev: self.name().into(), what, source }
    }
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
        let class = r.join("sys/class/infiniband");
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
        assert_eq!(devs[1].name, "rxe0");
        assert_eq!(devs[1].place, NicPlace::Virtual { netdev: Some("eth0".into()) });
        assert!(devs[1].place.describe().contains("no PCI function"));
    }

    #[test]
    fn root_without_infiniband_class_has_no_devices() {
        let t = tempfile::tempdir().unwrap();
        assert!(devices(t.path()).unwrap().is_empty());
        assert!(devices("../../fixtures/qemu-switch").unwrap().is_empty());
    }

    #[test]
    fn unknown_or_malformed_names_are_errors_not_panics() {
        let t = sysroot();
        assert!(matches!(device_at(t.path(), "mlx5_9"), Err(RdmaError::NoDevice { .. })));
        for bad in ["", "..", "a/b"] {
            assert!(matches!(device_at(t.path(), bad), Err(RdmaError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn opening_without_any_device_is_a_typed_error() {
        // The host has no RDMA device (the guest has rxe0; its tests cover opening it).
        if devices("/").unwrap().is_empty() {
            match Nic::open(None) {
                Err(RdmaError::NoDevice { wanted: None }) | Err(RdmaError::NoLibrary) => {}
                other => panic!("expected NoDevice, got {other:?}"),
            }
            assert!(matches!(Nic::open(Some("mlx5_0")), Err(RdmaError::NoDevice { .. })));
        }
    }

    #[test]
    fn live_sysfs_lists_whatever_is_there() {
        // On the host there are none; in the guest rxe0 appears (the guest tests check it).
        for d in devices("/").unwrap() {
            assert!(!d.name.is_empty());
        }
    }
}
