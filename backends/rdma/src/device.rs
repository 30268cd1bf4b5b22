//! An opened NIC (context, protection domain, port). Where each verbs device sits (its PCI
//! function, or a software device) is core's `peermem::nic`, read from sysfs.
//!
//! Owns: `Nic`, `PortInfo`. Must not: judge a PCI pair (the registry does), read sysfs itself
//! (core does) or touch raw verbs (that is `sys`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peermem::nic::{device_at, NicPlace, RdmaDevice};
use peermem::{Peer, Registry};

use crate::error::RdmaError;
use crate::event::AsyncEvent;
use crate::sys;

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

    /// Whether the port is ACTIVE now (asked of the device, not the state at `open`).
    pub fn port_active(&self) -> Result<bool, RdmaError> {
        let pa = self.pd.context().query_port(self.port.port).map_err(self.verbs_err("ibv_query_port"))?;
        Ok(pa.active)
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
    use peermem::nic::devices;

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
}
