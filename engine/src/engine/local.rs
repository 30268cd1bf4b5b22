//! The engine's own NICs: each opened RDMA device, the IPv4 address rdma_cm reaches it at (from
//! its GID table, as the core reads sysfs), and its listener.
//!
//! Owns: `LocalNic`, `open_nics`. Must not: judge what a NIC reaches (the core ranks NICs).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use peermem::nic::{devices, facts};
use peermem_rdma::{CmListener, Nic};

use super::EngineError;

/// A listener and the index of its NIC.
pub type Listener = (usize, CmListener);

/// One NIC of the engine.
pub struct LocalNic {
    pub nic: Arc<Nic>,
    /// Where peers connect to it (rdma_cm), when it has an IPv4 address.
    pub addr: Option<SocketAddr>,
}

/// The IPv4 address of `name`'s first port with one, read from sysfs under `root`.
fn ipv4_of(root: &Path, name: &str) -> Option<std::net::Ipv4Addr> {
    let dev = devices(root).ok()?.into_iter().find(|d| d.name == name)?;
    let f = facts(root, &dev).ok()?;
    f.ports.iter().find_map(|p| p.ipv4.first().copied())
}

/// Opens `names` (every RDMA device when `None`), each with a listener on its IPv4 address at
/// `port` (0: any), each listener with its NIC's index. A device named but absent, or with its port down, is an error; unnamed ones
/// that cannot open are skipped with a log line.
pub fn open_nics(
    root: &Path,
    names: Option<&[String]>,
    port: u16,
) -> Result<(Vec<LocalNic>, Vec<Listener>), EngineError> {
    let all: Vec<String> =
        devices(root).map_err(|e| EngineError::Nic(e.to_string()))?.into_iter().map(|d| d.name).collect();
    let (wanted, strict) = match names {
        Some(n) => (n.to_vec(), true),
        None => (all, false),
    };
    let mut nics = Vec::new();
    let mut listeners = Vec::new();
    for name in wanted {
        let nic = match Nic::open_in(root, Some(&name)) {
            Ok(n) => Arc::new(n),
            Err(e) if strict => return Err(EngineError::Rdma(e)),
            Err(e) => {
                tracing::info!(%name, "left out: {e}");
                continue;
            }
        };
        let addr = match ipv4_of(root, &name) {
            Some(ip) => {
                let l = CmListener::bind(SocketAddr::new(IpAddr::V4(ip), port)).map_err(EngineError::Rdma)?;
                let addr = l.local_addr();
                listeners.push((nics.len(), l));
                Some(addr)
            }
            None => {
                tracing::info!(%name, "no IPv4 address in its GID table: it connects out but takes no connection");
                None
            }
        };
        nics.push(LocalNic { nic, addr });
    }
    if nics.is_empty() {
        return Err(EngineError::NoNic);
    }
    Ok((nics, listeners))
}
