//! Surprise removal: learns from the kernel that a PCI function left the machine (or came back)
//! and tells the registry (`Registry::device_gone` / `device_back`).
//!
//! Source: the kernel's uevents on a netlink socket (`sys::UeventSocket`), not a sysfs poll. A
//! uevent arrives as the kernel removes the device, costs nothing while nothing happens, and
//! needs no privilege; a poll would either lag by its period or spin. The poll survives as a
//! sweep (does every device of the topology still have its sysfs directory?) run once after the
//! socket is bound (a removal before that sent its event to nobody) and whenever the kernel
//! reports that events were dropped (`ENOBUFS`).
//!
//! Must not: touch a device or its memory (after removal a p2pmem mapping is revoked, a touch is
//! SIGBUS; a `resourceN` mapping reads whatever the fabric answers), or decide anything about
//! routes. Every wait here is bounded by `POLL`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pci::{Bdf, Topology};
use crate::registry::{Registry, RegistryError};
use crate::sys::{UeventSocket, UEVENT_MAX};

/// The longest the watcher thread blocks before it checks whether it should stop.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a device that came back may take to show BARs that match the registry's topology
/// (the kernel announces the function before its resources are all in sysfs).
pub const BACK_GRACE: Duration = Duration::from_secs(10);

/// What happened to a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciAction {
    /// The function was added (hot-plug, rescan).
    Add,
    /// A driver was bound to it (the function is fully set up).
    Bind,
    /// The function was removed.
    Remove,
}

/// A uevent about a PCI function (`SUBSYSTEM=pci`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciEvent {
    pub action: PciAction,
    pub bdf: Bdf,
}

/// Parses one kernel uevent datagram: `ACTION@DEVPATH\0` then `KEY=VALUE\0` pairs. `None` for
/// anything that is not an add, bind or remove of a PCI function with a valid `PCI_SLOT_NAME`
/// (other subsystems, class devices, malformed or truncated datagrams).
pub fn parse_uevent(msg: &[u8]) -> Option<PciEvent> {
    let mut fields = msg.split(|&b| b == 0);
    let header = fields.next()?;
    if !header.contains(&b'@') {
        return None;
    }
    let (mut action, mut subsystem, mut slot) = (None, None, None);
    for f in fields {
        if let Some(v) = f.strip_prefix(b"ACTION=") {
            action = Some(v);
        } else if let Some(v) = f.strip_prefix(b"SUBSYSTEM=") {
            subsystem = Some(v);
        } else if let Some(v) = f.strip_prefix(b"PCI_SLOT_NAME=") {
            slot = Some(v);
        }
    }
    if subsystem? != b"pci" {
        return None;
    }
    let action = match action? {
        b"add" => PciAction::Add,
        b"bind" => PciAction::Bind,
        b"remove" => PciAction::Remove,
        _ => return None,
    };
    let bdf = std::str::from_utf8(slot?).ok()?.parse().ok()?;
    Some(PciEvent { action, bdf })
}

/// Watches the kernel's uevents on a thread and keeps `registry` told about removed and
/// returning devices. Stops (within `POLL`) when dropped.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching the live machine for `registry`, whose topology was read from `root`
    /// (`/`, or where the live sysfs is mounted). After the socket is bound, one sweep marks
    /// every device whose sysfs directory is already gone.
    pub fn spawn(registry: Registry, root: impl Into<PathBuf>) -> io::Result<Watcher> {
        let sock = UeventSocket::open(POLL)?;
        let root = root.into();
        sweep(&registry, &root);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("peermem-hotplug".into())
            .spawn(move || run(&sock, &registry, &root, &flag))?;
        Ok(Watcher { stop, thread: Some(thread) })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks gone every device of the registry's topology whose sysfs directory is missing under
/// `root`. Returns how many devices it marked.
pub fn sweep(registry: &Registry, root: &Path) -> usize {
    let topo = registry.topology().clone();
    let mut marked = 0;
    for d in topo.devices() {
        if !registry.is_device_gone(d.bdf) && !root.join(&d.sysfs_dir).is_dir() {
            registry.device_gone(d.bdf);
            marked += 1;
        }
    }
    marked
}

/// Devices that came back but whose BARs did not match yet, with the time they came back.
struct Pending(Vec<(Bdf, Instant)>);

impl Pending {
    /// Tries `device_back` for each pending device against a fresh read of `root`; keeps those
    /// that may still settle, drops those past `BACK_GRACE` (they stay gone, with a warning).
    fn retry(&mut self, registry: &Registry, root: &Path) {
        if self.0.is_empty() {
            return;
        }
        let now = match Topology::discover(root) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "hotplug: cannot re-read the topology");
                return;
            }
        };
        self.0.retain(|&(bdf, since)| match registry.device_back(bdf, &now) {
            Ok(()) => false,
            Err(e @ (RegistryError::DeviceMoved { .. } | RegistryError::DeviceGone(_))) => {
                if since.elapsed() < BACK_GRACE {
                    true
                } else {
                    tracing::warn!(%bdf, error = %e, "hotplug: device came back but stays gone");
                    false
                }
            }
            Err(e) => {
                tracing::warn!(%bdf, error = %e, "hotplug: device came back but stays gone");
                false
            }
        });
    }

    fn add(&mut self, bdf: Bdf) {
        if !self.0.iter().any(|&(b, _)| b == bdf) {
            self.0.push((bdf, Instant::now()));
        }
    }
}

fn run(sock: &UeventSocket, registry: &Registry, root: &Path, stop: &AtomicBool) {
    let mut buf = [0u8; UEVENT_MAX];
    let mut pending = Pending(Vec::new());
    while !stop.load(Ordering::Acquire) {
        match sock.recv(&mut buf) {
            Ok(Some(n)) => match parse_uevent(&buf[..n]) {
                Some(PciEvent { action: PciAction::Remove, bdf }) => {
                    pending.0.retain(|&(b, _)| b != bdf);
                    let n = registry.device_gone(bdf);
                    tracing::info!(%bdf, regions = n, "hotplug: device removed");
                }
                Some(PciEvent { action: PciAction::Add | PciAction::Bind, bdf }) if registry.is_device_gone(bdf) => {
                    pending.add(bdf)
                }
                _ => {}
            },
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("hotplug: the kernel dropped uevents: checking every device");
                sweep(registry, root);
            }
            Err(e) => {
                tracing::error!(error = %e, "hotplug: uevent socket failed: checking every device each period");
                sweep(registry, root);
                std::thread::sleep(POLL);
            }
        }
        pending.retry(registry, root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> Vec<u8> {
        s.replace('|', "\0").into_bytes()
    }

    #[test]
    fn remove_of_a_pci_function_is_recognised() {
        let m = ev("remove@/devices/pci0000:00/0000:00:01.0/0000:01:00.0|ACTION=remove|DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0|SUBSYSTEM=pci|PCI_CLASS=10802|PCI_SLOT_NAME=0000:01:00.0|SEQNUM=1234|");
        assert_eq!(
            parse_uevent(&m),
            Some(PciEvent { action: PciAction::Remove, bdf: "0000:01:00.0".parse().unwrap() })
        );
    }

    #[test]
    fn add_and_bind_are_recognised() {
        let m = ev("add@/devices/x|ACTION=add|SUBSYSTEM=pci|PCI_SLOT_NAME=0000:81:00.1");
        assert_eq!(parse_uevent(&m).unwrap().action, PciAction::Add);
        let m = ev("bind@/devices/x|ACTION=bind|SUBSYSTEM=pci|DRIVER=nvme|PCI_SLOT_NAME=0000:81:00.1");
        assert_eq!(parse_uevent(&m).unwrap().action, PciAction::Bind);
    }

    #[test]
    fn class_devices_and_other_actions_are_ignored() {
        // the nvme controller's class device goes first when a driver unbinds: not a removal
        let m = ev("remove@/devices/pci0000:00/0000:00:01.0/0000:01:00.0/nvme/nvme0|ACTION=remove|SUBSYSTEM=nvme|");
        assert_eq!(parse_uevent(&m), None);
        let m = ev("change@/devices/x|ACTION=change|SUBSYSTEM=pci|PCI_SLOT_NAME=0000:01:00.0");
        assert_eq!(parse_uevent(&m), None);
        let m = ev("unbind@/devices/x|ACTION=unbind|SUBSYSTEM=pci|PCI_SLOT_NAME=0000:01:00.0");
        assert_eq!(parse_uevent(&m), None);
    }

    #[test]
    fn malformed_datagrams_are_ignored() {
        for m in [
            &b""[..],
            b"\0\0\0",
            b"libudev\0\xfe\xed\xca\xfe",
            b"remove@x\0ACTION=remove\0SUBSYSTEM=pci\0",
            b"remove@x\0ACTION=remove\0SUBSYSTEM=pci\0PCI_SLOT_NAME=zz:00.0",
            b"remove@x\0ACTION=remove\0SUBSYSTEM=pci\0PCI_SLOT_NAME=\xff\xfe",
            b"ACTION=remove\0SUBSYSTEM=pci\0PCI_SLOT_NAME=0000:01:00.0",
        ] {
            assert_eq!(parse_uevent(m), None, "{m:?}");
        }
    }
}
