//! Telling a surprise removal apart from any other failure of a load.
//!
//! A device leaving the machine shows up first as the failure it causes (the block device's
//! reads fail with EIO or ENXIO or come back short as its capacity drops to 0, the VFIO driver ends its commands with `DeviceGone`), and only
//! then, once the kernel has finished removing it, as a uevent (the registry's watcher) and a
//! missing sysfs directory. So a failed batch asks, for a bounded time, whether its source or
//! destination device is going away, and if so says that, with the failure as the cause.
//!
//! Must not: retry anything, or wait on a load that succeeded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{Bdf, Entry, Provider, Registry, ResolveError};
use peermem_nvme::NvmeError;

use crate::error::LoadError;

/// How long a failed load waits for a removal to show (the kernel removes the function after
/// the driver has let go of it; under an emulated machine this takes seconds).
pub(crate) const SETTLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// Whether `bdf` has left the machine: the registry marked it, or its sysfs directory under the
/// registry's own root (not necessarily `/`: a registry may read a captured sysroot) is gone.
fn gone(reg: &Registry, bdf: Bdf) -> bool {
    if reg.is_device_gone(bdf) {
        return true;
    }
    let topo = reg.topology();
    topo.idx(bdf).is_ok_and(|d| !topo.root().join(&topo.device(d).sysfs_dir).is_dir())
}

/// Whether `e` is what a removal looks like from the inside (so waiting for one is worth it).
/// A short read counts only when the source is a block device that now reads as empty
/// (`source_emptied`): a regular file that shrank is not a removal.
fn removal_symptom(e: &LoadError, source_emptied: bool) -> bool {
    let io = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EIO | libc::ENXIO | libc::ENODEV));
    match e {
        LoadError::Io { source, .. } => io(source),
        LoadError::Nvme(NvmeError::Timeout { .. } | NvmeError::Fatal) => true,
        LoadError::Nvme(NvmeError::Vfio(_)) => true,
        // a removed namespace reads as empty: the read comes back short
        LoadError::ShortRead { .. } => source_emptied,
        _ => false,
    }
}

/// `e`, or `DeviceGone` naming the device that left when one of the batch's sources (the
/// devices that read its files, its VFIO-owned controllers) or destinations is gone, waiting up
/// to `SETTLE` for the removal to show when `e` looks like one. `source_emptied`: one of its
/// file sources is a block device that now reads as empty.
pub(crate) fn explain_batch(
    e: LoadError,
    sources: &[Bdf],
    source_emptied: bool,
    dests: &[Arc<Entry>],
    reg: &Registry,
) -> LoadError {
    let mut candidates: Vec<(Bdf, &'static str)> = sources.iter().map(|b| (*b, "source")).collect();
    candidates.extend(dests.iter().filter_map(|d| Some((pci_of(d)?, "destination"))));
    candidates.sort();
    candidates.dedup();
    explain_among(e, &candidates, source_emptied, reg)
}

fn pci_of(dest: &Entry) -> Option<Bdf> {
    match dest.provider() {
        Provider::Pci(b) => Some(b),
        Provider::Host { .. } => None,
    }
}

fn explain_among(e: LoadError, candidates: &[(Bdf, &'static str)], source_emptied: bool, reg: &Registry) -> LoadError {
    // The registry already knows: the resolve said so.
    match &e {
        LoadError::Resolve(ResolveError::DeviceGone { bdf, .. }) => {
            return LoadError::DeviceGone { bdf: *bdf, role: "destination", cause: Box::new(e) };
        }
        LoadError::Resolve(ResolveError::PeerGone(bdf)) => {
            return LoadError::DeviceGone { bdf: *bdf, role: "source", cause: Box::new(e) };
        }
        // The VFIO driver heard it from the kernel (the request to give the device back): the
        // removal waits for the controller to be closed, so there is nothing to wait for here.
        LoadError::Nvme(NvmeError::DeviceGone { bdf, .. }) => {
            return LoadError::DeviceGone { bdf: *bdf, role: "source", cause: Box::new(e) };
        }
        LoadError::DeviceGone { .. } => return e,
        _ => {}
    }
    if candidates.is_empty() {
        return e;
    }
    let deadline = Instant::now() + if removal_symptom(&e, source_emptied) { SETTLE } else { Duration::ZERO };
    loop {
        if let Some(&(bdf, role)) = candidates.iter().find(|(b, _)| gone(reg, *b)) {
            return LoadError::DeviceGone { bdf, role, cause: Box::new(e) };
        }
        if Instant::now() >= deadline {
            return e;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermem::Topology;
    use std::path::Path;

    fn registry() -> Registry {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    fn eio() -> LoadError {
        LoadError::Io { path: "/dev/nvme0n1".into(), source: std::io::Error::from_raw_os_error(libc::EIO) }
    }

    #[test]
    fn a_batch_error_names_the_device_the_registry_marked_gone() {
        let reg = registry();
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        reg.device_gone(bdf);
        match explain_batch(eio(), &[bdf], false, &[], &reg) {
            LoadError::DeviceGone { bdf: b, role: "source", cause } => {
                assert_eq!(b, bdf);
                assert!(matches!(*cause, LoadError::Io { .. }));
            }
            e => panic!("expected DeviceGone, got {e:?}"),
        }
    }

    #[test]
    fn presence_is_judged_under_the_registry_root_not_the_host_sysfs() {
        // The fixture's devices are not on this machine, but they are in the registry's root:
        // a failure that is no removal symptom stays what it was, at once.
        let reg = registry();
        let bdf: Bdf = "0000:03:00.0".parse().unwrap();
        let e = LoadError::BadRange { start: 0, end: 1, len: 0 };
        assert!(matches!(explain_batch(e, &[bdf], false, &[], &reg), LoadError::BadRange { .. }));
    }
}
