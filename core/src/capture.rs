//! `peermem capture`: copies exactly the files peermem reads (PCI functions and their attributes,
//! class devices, IOMMU groups, platform and device-tree files) from a live root into a
//! directory, so a topology can be replayed anywhere with `--root`.
//!
//! Owns: which files are copied and how symlinks are reproduced (same relative targets as the
//! live system). Must not: interpret the files (the topology reader does) or invent any.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::pci::topology::CLASSES;
use crate::sysroot::{normalize, Sysroot, SysrootError};

/// Per-device attribute files copied verbatim.
pub const DEVICE_FILES: &[&str] = &[
    "vendor",
    "device",
    "class",
    "subsystem_vendor",
    "subsystem_device",
    "revision",
    "resource",
    "config",
    "numa_node",
    "local_cpulist",
    "current_link_speed",
    "current_link_width",
    "max_link_speed",
    "max_link_width",
    "p2pmem/size",
    "p2pmem/available",
    "p2pmem/published",
];

/// Per-device symlinks reproduced with their live targets.
pub const DEVICE_LINKS: &[&str] = &["driver", "iommu_group", "physfn"];

/// Files of each RDMA device (`sys/class/infiniband/<dev>/...`) copied verbatim; `PORT_FILES`
/// for each of its ports.
pub const RDMA_FILES: &[&str] = &["parent"];
pub const RDMA_PORT_FILES: &[&str] = &["state", "rate", "gid_attrs/ndevs/0"];

/// Platform files copied verbatim.
pub const PLATFORM_FILES: &[&str] = &[
    "proc/cpuinfo",
    "proc/sys/kernel/osrelease",
    "sys/devices/virtual/dmi/id/sys_vendor",
    "sys/devices/virtual/dmi/id/product_name",
];

/// Device-tree properties copied for the root, the hypervisor node and every PCI host node.
const DT_PROPS: &[&str] = &[
    "compatible",
    "model",
    "device_type",
    "ranges",
    "reg",
    "bus-range",
    "#address-cells",
    "#size-cells",
    "linux,pci-domain",
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Sysroot(#[from] SysrootError),
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{0}: destination exists and is not empty")]
    NotEmpty(PathBuf),
}

/// What a capture wrote.
#[derive(Debug, Default)]
pub struct CaptureReport {
    pub devices: usize,
    pub files: usize,
    pub links: usize,
    /// Files that exist but could not be read (e.g. permissions), skipped.
    pub skipped: Vec<String>,
}

struct Out<'a> {
    src: &'a Sysroot,
    dst: &'a Path,
    report: CaptureReport,
}

impl Out<'_> {
    fn werr(&self, rel: &Path, source: io::Error) -> CaptureError {
        CaptureError::Write { path: self.dst.join(rel), source }
    }

    fn copy_file(&mut self, rel: &Path) -> Result<(), CaptureError> {
        let bytes = match self.src.read_bytes_opt_max(rel, crate::sysroot::MAX_TEXT) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.report.skipped.push(e.to_string());
                return Ok(());
            }
        };
        let to = self.dst.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(|e| self.werr(rel, e))?;
        }
        fs::write(&to, bytes).map_err(|e| self.werr(rel, e))?;
        self.report.files += 1;
        Ok(())
    }

    fn copy_link(&mut self, rel: &Path) -> Result<Option<PathBuf>, CaptureError> {
        let target = match fs::read_link(self.src.path(rel)) {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::InvalidInput) => return Ok(None),
            Err(e) => return Err(SysrootError::Io { path: rel.to_path_buf(), source: e }.into()),
        };
        let to = self.dst.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(|e| self.werr(rel, e))?;
        }
        if fs::symlink_metadata(&to).is_err() {
            std::os::unix::fs::symlink(&target, &to).map_err(|e| self.werr(rel, e))?;
            self.report.links += 1;
        }
        Ok(self.src.resolve_link(rel)?)
    }

    fn mkdir(&self, rel: &Path) -> Result<(), CaptureError> {
        fs::create_dir_all(self.dst.join(rel)).map_err(|e| self.werr(rel, e))
    }
}

/// Copies the sysroot contract's files from `src` (usually `/`) into `dst`.
pub fn capture(src: &Path, dst: &Path) -> Result<CaptureReport, CaptureError> {
    let src = Sysroot::open(src)?;
    if let Ok(mut rd) = fs::read_dir(dst) {
        if rd.next().is_some() {
            return Err(CaptureError::NotEmpty(dst.to_path_buf()));
        }
    }
    fs::create_dir_all(dst).map_err(|source| CaptureError::Write { path: dst.to_path_buf(), source })?;
    let mut out = Out { src: &src, dst, report: CaptureReport::default() };

    let devs = PathBuf::from("sys/bus/pci/devices");
    out.mkdir(&devs)?;
    let mut groups = Vec::new();
    for name in src.list_dir(&devs)?.unwrap_or_default() {
        let Some(dir) = out.copy_link(&devs.join(&name))? else { continue };
        out.mkdir(&dir)?;
        out.report.devices += 1;
        for f in DEVICE_FILES {
            out.copy_file(&dir.join(f))?;
        }
        for l in DEVICE_LINKS {
            if let Some(t) = out.copy_link(&dir.join(l))? {
                if *l == "iommu_group" {
                    groups.push(t);
                }
            }
        }
    }
    groups.sort();
    groups.dedup();
    for g in groups {
        out.copy_file(&g.join("type"))?;
    }
    for class in CLASSES {
        let cdir = PathBuf::from("sys/class").join(class);
        for name in src.list_dir(&cdir)?.unwrap_or_default() {
            if let Some(target) = out.copy_link(&cdir.join(&name))? {
                out.mkdir(&target)?;
                out.copy_link(&target.join("device"))?;
                if *class == "infiniband" {
                    capture_rdma(&mut out, &target)?;
                }
            }
        }
    }
    for f in PLATFORM_FILES {
        out.copy_file(Path::new(f))?;
    }
    capture_device_tree(&mut out)?;
    Ok(out.report)
}

/// An RDMA device's netdev and ports (what `nic::facts` and the netdev lookup read).
fn capture_rdma(out: &mut Out<'_>, dir: &Path) -> Result<(), CaptureError> {
    for f in RDMA_FILES {
        out.copy_file(&dir.join(f))?;
    }
    for port in out.src.list_dir(dir.join("ports"))?.unwrap_or_default() {
        for f in RDMA_PORT_FILES {
            out.copy_file(&dir.join("ports").join(&port).join(f))?;
        }
    }
    Ok(())
}

fn capture_device_tree(out: &mut Out<'_>) -> Result<(), CaptureError> {
    // /proc/device-tree is a link to /sys/firmware/devicetree/base; the capture stores a
    // directory at proc/device-tree holding only the properties peermem reads.
    let live = match out.src.resolve_link("proc/device-tree")? {
        Some(t) => t,
        None => PathBuf::from("proc/device-tree"),
    };
    if out.src.list_dir(&live)?.is_none() {
        return Ok(());
    }
    let mut stack = vec![(PathBuf::new(), 0usize)];
    while let Some((node, depth)) = stack.pop() {
        let src_node = normalize(&live.join(&node)).unwrap_or_else(|| live.clone());
        let is_pci = out.src.read_bytes_opt(src_node.join("device_type"))?.is_some_and(|b| b.starts_with(b"pci"));
        if depth == 0 || is_pci || node.as_os_str() == "hypervisor" || out.src.list_dir(&src_node)?.is_some() {
            for p in DT_PROPS {
                if depth == 0 || is_pci || node.as_os_str() == "hypervisor" || p.starts_with('#') {
                    if let Some(b) = out.src.read_bytes_opt(src_node.join(p))? {
                        let rel = PathBuf::from("proc/device-tree").join(&node).join(p);
                        let to = out.dst.join(&rel);
                        if let Some(parent) = to.parent() {
                            fs::create_dir_all(parent).map_err(|e| out.werr(&rel, e))?;
                        }
                        fs::write(&to, b).map_err(|e| out.werr(&rel, e))?;
                        out.report.files += 1;
                    }
                }
            }
        }
        if is_pci || depth > 8 {
            continue;
        }
        for child in out.src.list_dir(&src_node)?.unwrap_or_default() {
            let c = src_node.join(&child);
            if fs::symlink_metadata(out.src.path(&c)).map(|m| m.is_dir()).unwrap_or(false) {
                stack.push((node.join(&child), depth + 1));
            }
        }
    }
    Ok(())
}
