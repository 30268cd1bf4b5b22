//! Vendor and device names from the system's `pci.ids` database, read at run time.
//!
//! Owns: finding the file (`PEERMEM_PCI_IDS`, then the usual distribution locations), reading
//! it with a size cap, and looking names up. Must not: ship a copy of the database or guess a
//! name: an ID that is not listed has no name (`None`), and the caller prints the hex ID.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Where distributions install `pci.ids` (pciutils, hwdata).
pub const LOCATIONS: &[&str] =
    &["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids", "/usr/local/share/pci.ids"];

/// The environment variable that names another `pci.ids`.
pub const ENV: &str = "PEERMEM_PCI_IDS";

/// The largest `pci.ids` read (today's file is about 1.4 MB).
const MAX_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PciIdsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}: larger than {MAX_SIZE} bytes")]
    TooLarge { path: PathBuf },
}

/// Names for the (vendor, device) pairs asked for, from one `pci.ids`.
#[derive(Debug, Default, Clone)]
pub struct PciIds {
    /// The file read, if any.
    pub source: Option<PathBuf>,
    vendors: HashMap<u16, String>,
    devices: HashMap<(u16, u16), String>,
}

impl PciIds {
    /// Loads names for `wanted` (vendor, device) pairs from `PEERMEM_PCI_IDS` if set (an error
    /// if it cannot be read), else from the first of [`LOCATIONS`] that exists; none found is
    /// an empty database, not an error.
    pub fn load(wanted: &[(u16, u16)]) -> Result<PciIds, PciIdsError> {
        if let Some(p) = std::env::var_os(ENV) {
            return Self::from_file(Path::new(&p), wanted);
        }
        for loc in LOCATIONS {
            if Path::new(loc).is_file() {
                return Self::from_file(Path::new(loc), wanted);
            }
        }
        Ok(PciIds::default())
    }

    /// Reads `path` (bounded in size, a regular file) and keeps the names of `wanted`.
    pub fn from_file(path: &Path, wanted: &[(u16, u16)]) -> Result<PciIds, PciIdsError> {
        use std::io::Read;
        let io = |source| PciIdsError::Io { path: path.to_path_buf(), source };
        let f = std::fs::File::open(path).map_err(io)?;
        let m = f.metadata().map_err(io)?;
        if !m.is_file() {
            return Err(PciIdsError::NotRegular { path: path.to_path_buf() });
        }
        let mut bytes = Vec::new();
        f.take(MAX_SIZE + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() as u64 > MAX_SIZE {
            return Err(PciIdsError::TooLarge { path: path.to_path_buf() });
        }
        let mut ids = Self::parse(&String::from_utf8_lossy(&bytes), wanted);
        ids.source = Some(path.to_path_buf());
        Ok(ids)
    }

    /// Parses `pci.ids` text: `vvvv  Vendor` lines, tab-indented `dddd  Device` lines below
    /// them, two-tab subsystem lines (ignored), and the `C` class section at the end (ignored).
    pub fn parse(text: &str, wanted: &[(u16, u16)]) -> PciIds {
        let want_v: HashSet<u16> = wanted.iter().map(|w| w.0).collect();
        let want_d: HashSet<(u16, u16)> = wanted.iter().copied().collect();
        let mut ids = PciIds::default();
        let mut vendor: Option<u16> = None;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() || line.starts_with("\t\t") {
                continue;
            }
            if line.starts_with("C ") {
                break;
            }
            let (tab, rest) = match line.strip_prefix('\t') {
                Some(r) => (true, r),
                None => (false, line),
            };
            let Some((id, name)) = rest.split_once("  ") else { continue };
            let Ok(id) = u16::from_str_radix(id.trim(), 16) else {
                vendor = None;
                continue;
            };
            let name = name.trim().to_string();
            if !tab {
                vendor = Some(id);
                if want_v.contains(&id) {
                    ids.vendors.insert(id, name);
                }
            } else if let Some(v) = vendor.filter(|v| want_d.contains(&(*v, id))) {
                ids.devices.insert((v, id), name);
            }
        }
        ids
    }

    pub fn vendor(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(String::as_str)
    }

    pub fn device(&self, vendor: u16, device: u16) -> Option<&str> {
        self.devices.get(&(vendor, device)).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# comment\n1b36  Red Hat, Inc.\n\t0010  QEMU NVM Express Controller\n\t\t1af4 1100  QEMU Virtual Machine\n8086  Intel Corporation\n\t29c0  82G33/G31/P35/P31 Express DRAM Controller\n\nC 01  Mass storage controller\n\t08  Non-Volatile memory controller\n";

    #[test]
    fn names_come_from_the_vendor_and_device_lines_only() {
        let ids = PciIds::parse(SAMPLE, &[(0x1b36, 0x0010), (0x8086, 0x1234)]);
        assert_eq!(ids.vendor(0x1b36), Some("Red Hat, Inc."));
        assert_eq!(ids.device(0x1b36, 0x0010), Some("QEMU NVM Express Controller"));
        assert_eq!(ids.vendor(0x8086), Some("Intel Corporation"));
        assert_eq!(ids.device(0x8086, 0x1234), None, "unlisted device: no name");
        assert_eq!(ids.device(0x8086, 0x29c0), None, "not asked for");
        assert_eq!(PciIds::parse("C 01  x\n1b36  y\n", &[(0x1b36, 0)]).vendor(0x1b36), None, "class section ends it");
    }

    #[test]
    fn unreadable_files_are_named_errors() {
        let e = PciIds::from_file(Path::new("/nonexistent/pci.ids"), &[]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/pci.ids"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = PciIds::from_file(d.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("not a regular file") || e.contains("directory"), "{e}");
    }
}
