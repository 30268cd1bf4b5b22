//! Which PCI function serves a file or a block device: the file's filesystem device (or the
//! block device itself), down through partitions and device-mapper/md stacks (`slaves/`) to the
//! disks, and up the sysfs path of each disk to its PCI function.
//!
//! Owns: that resolution, read through the sysroot (`sys/dev/block`, `sys/class/block`), and the
//! live `stat` and mount table it starts from. Must not: guess: a network or virtual filesystem,
//! a loop or RAM disk, or a stack over several functions is an error that says which.

use std::path::{Path, PathBuf};

use crate::pci::Bdf;
use crate::sysroot::{Sysroot, SysrootError};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
    #[error("{path} is on a {fstype} filesystem ({mount_source}): no PCI function serves it (network and virtual filesystems have no block device)")]
    Virtual { path: PathBuf, fstype: String, mount_source: String },
    #[error("{path}: device {major}:{minor} has no block device in {root}/sys/dev/block")]
    NoBlockDevice { path: PathBuf, major: u32, minor: u32, root: PathBuf },
    #[error("{path}: {device} is a virtual block device ({dir}): no PCI function serves it")]
    NotPci { path: PathBuf, device: String, dir: PathBuf },
    #[error("{path}: stacked over several PCI functions ({}): name one of them", .bdfs.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "))]
    Several { path: PathBuf, bdfs: Vec<Bdf> },
    #[error("{path}: not a regular file, directory or block device")]
    NotStorage { path: PathBuf },
    #[error(transparent)]
    Sysroot(#[from] SysrootError),
}

/// The PCI function under `path` (a file, a directory, or a block device node), with the chain
/// of block devices that led to it (e.g. `dm-0 -> nvme0n1p2 -> nvme0n1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub bdf: Bdf,
    pub chain: Vec<String>,
}

/// Resolves `path` to the one PCI function that serves it.
pub fn serving_function(sys: &Sysroot, path: &Path) -> Result<Served, StorageError> {
    let (major, minor) = device_of(path)?;
    let dir = block_dir(sys, path, major, minor)?;
    let mut found: Vec<Served> = Vec::new();
    leaves(sys, path, &dir, Vec::new(), 0, &mut found)?;
    found.sort_by_key(|s| s.bdf);
    found.dedup_by_key(|s| s.bdf);
    match found.len() {
        1 => Ok(found.remove(0)),
        _ => Err(StorageError::Several { path: path.to_path_buf(), bdfs: found.iter().map(|s| s.bdf).collect() }),
    }
}

/// The block device number behind `path`: its own for a block device node, else its
/// filesystem's; a filesystem without one (anonymous device, major 0) is resolved through the
/// mount table's source when that is a block device (btrfs), else it is an error naming it.
fn device_of(path: &Path) -> Result<(u32, u32), StorageError> {
    use rustix::fs::FileType;
    let st = rustix::fs::stat(path).map_err(|e| StorageError::Stat { path: path.to_path_buf(), source: e.into() })?;
    let ty = FileType::from_raw_mode(st.st_mode);
    let dev = match ty {
        FileType::BlockDevice => st.st_rdev,
        FileType::RegularFile | FileType::Directory => st.st_dev,
        _ => return Err(StorageError::NotStorage { path: path.to_path_buf() }),
    };
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    if major != 0 {
        return Ok((major, minor));
    }
    let (fstype, source) = mount_of(major, minor).unwrap_or_else(|| ("unknown".into(), "no mount table entry".into()));
    if source.starts_with("/dev/") && Path::new(&source) != path {
        if let Ok(st) = rustix::fs::stat(Path::new(&source)) {
            if FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice {
                return Ok((rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)));
            }
        }
    }
    Err(StorageError::Virtual { path: path.to_path_buf(), fstype, mount_source: source })
}

/// `(fstype, source)` of the mount with device `major:minor`, from `/proc/self/mountinfo`.
fn mount_of(major: u32, minor: u32) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("{major}:{minor}");
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        if f.get(2) != Some(&want.as_str()) {
            return None;
        }
        Some((f.get(sep + 1)?.to_string(), f.get(sep + 2)?.to_string()))
    })
}

fn block_dir(sys: &Sysroot, path: &Path, major: u32, minor: u32) -> Result<PathBuf, StorageError> {
    sys.resolve_link(format!("sys/dev/block/{major}:{minor}"))?.ok_or_else(|| StorageError::NoBlockDevice {
        path: path.to_path_buf(),
        major,
        minor,
        root: sys.root().to_path_buf(),
    })
}

/// Follows `dir` (a block device's sysfs directory) down to the disks it is made of and records
/// the PCI function of each.
fn leaves(
    sys: &Sysroot,
    path: &Path,
    dir: &Path,
    mut chain: Vec<String>,
    depth: usize,
    out: &mut Vec<Served>,
) -> Result<(), StorageError> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    chain.push(name.clone());
    if depth > 16 {
        return Err(StorageError::NotPci { path: path.to_path_buf(), device: name, dir: dir.to_path_buf() });
    }
    // A partition's directory sits inside its disk's.
    if sys.read_opt(dir.join("partition"))?.is_some() {
        if let Some(disk) = dir.parent() {
            return leaves(sys, path, disk, chain, depth + 1, out);
        }
    }
    let slaves = sys.list_dir(dir.join("slaves"))?.unwrap_or_default();
    if !slaves.is_empty() {
        for s in slaves {
            let sdir = sys.resolve_link(dir.join("slaves").join(&s))?.ok_or_else(|| StorageError::NotPci {
                path: path.to_path_buf(),
                device: s.clone(),
                dir: dir.join("slaves").join(&s),
            })?;
            leaves(sys, path, &sdir, chain.clone(), depth + 1, out)?;
        }
        return Ok(());
    }
    let bdf = dir.components().filter_map(|c| c.as_os_str().to_str().and_then(|s| s.parse::<Bdf>().ok())).next_back();
    match bdf {
        Some(bdf) => {
            out.push(Served { bdf, chain });
            Ok(())
        }
        None => Err(StorageError::NotPci { path: path.to_path_buf(), device: name, dir: dir.to_path_buf() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A sysroot with nvme0n1 (two partitions) on 0000:05:00.0, nvme1n1 on 0000:81:00.0, a dm
    /// device over one partition of each and a loop device.
    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let n0 = "sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0/nvme/nvme0/nvme0n1";
        let n1 = "sys/devices/pci0000:80/0000:80:00.0/0000:81:00.0/nvme/nvme1/nvme1n1";
        for p in [format!("{n0}/nvme0n1p1"), format!("{n0}/nvme0n1p2"), format!("{n1}/nvme1n1p1")] {
            fs::create_dir_all(r.join(&p)).unwrap();
            fs::write(r.join(&p).join("partition"), "1\n").unwrap();
        }
        fs::create_dir_all(r.join("sys/devices/virtual/block/dm-0/slaves")).unwrap();
        fs::create_dir_all(r.join("sys/devices/virtual/block/dm-1/slaves")).unwrap();
        fs::create_dir_all(r.join("sys/devices/virtual/block/loop0")).unwrap();
        fs::create_dir_all(r.join("sys/dev/block")).unwrap();
        symlink(format!("../../../../../../{n0}/nvme0n1p2"), r.join("sys/devices/virtual/block/dm-0/slaves/nvme0n1p2"))
            .unwrap();
        symlink(format!("../../../../../../{n0}/nvme0n1p1"), r.join("sys/devices/virtual/block/dm-1/slaves/nvme0n1p1"))
            .unwrap();
        symlink(format!("../../../../../../{n1}/nvme1n1p1"), r.join("sys/devices/virtual/block/dm-1/slaves/nvme1n1p1"))
            .unwrap();
        d
    }

    #[test]
    fn partitions_and_dm_stacks_resolve_to_their_nvme_function() {
        let d = tree();
        let sys = Sysroot::open(d.path()).unwrap();
        let p = Path::new("f");
        let mut out = Vec::new();
        leaves(&sys, p, Path::new("sys/devices/virtual/block/dm-0"), Vec::new(), 0, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Served {
                bdf: "0000:05:00.0".parse().unwrap(),
                chain: ["dm-0", "nvme0n1p2", "nvme0n1"].map(String::from).to_vec()
            }]
        );
        let mut out = Vec::new();
        leaves(&sys, p, Path::new("sys/devices/virtual/block/dm-1"), Vec::new(), 0, &mut out).unwrap();
        let bdfs: Vec<String> = out.iter().map(|s| s.bdf.to_string()).collect();
        assert_eq!(bdfs, ["0000:05:00.0", "0000:81:00.0"]);
        let e =
            leaves(&sys, p, Path::new("sys/devices/virtual/block/loop0"), Vec::new(), 0, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("loop0 is a virtual block device"), "{e}");
    }

    #[test]
    fn this_machine_answers_for_its_root_or_names_why_not() {
        let sys = Sysroot::open("/").unwrap();
        match serving_function(&sys, Path::new("/")) {
            Ok(s) => assert!(!s.chain.is_empty()),
            Err(e) => assert!(e.to_string().starts_with('/'), "{e}"),
        }
        let e = serving_function(&sys, Path::new("/proc/self/status")).unwrap_err().to_string();
        assert!(e.contains("proc filesystem"), "{e}");
        let e = serving_function(&sys, Path::new("/nonexistent/file")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/file"), "{e}");
    }
}
