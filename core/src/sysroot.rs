//! Reading a sysroot: a directory laid out like `/` (live, or captured with `peermem capture`).
//!
//! Owns: path joining under the root, lexical symlink resolution that never escapes the root,
//! and attribute parsing with errors that name the file and what was wrong. Must not: interpret
//! what the attributes mean (that is `pci::topology` and `platform`).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

/// An error reading the sysroot. Each names the file (relative to the root) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum SysrootError {
    #[error("sysroot {root}: {why}")]
    BadRoot { root: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: malformed: {why} (content {content:?})")]
    Malformed { path: PathBuf, why: String, content: String },
    #[error("{path}: symlink target {target} escapes the sysroot")]
    Escapes { path: PathBuf, target: PathBuf },
}

/// A root directory to read sysfs/procfs from.
#[derive(Debug, Clone)]
pub struct Sysroot {
    root: PathBuf,
}

impl Sysroot {
    /// Opens `root`; it must be an existing directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Sysroot, SysrootError> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(Sysroot { root }),
            Ok(_) => Err(SysrootError::BadRoot { root, why: "not a directory".into() }),
            Err(e) => Err(SysrootError::BadRoot { root, why: e.to_string() }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute host path of `rel` (a root-relative path like `sys/bus/pci/devices`).
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    fn io_err(&self, rel: &Path, e: io::Error) -> SysrootError {
        SysrootError::Io { path: rel.to_path_buf(), source: e }
    }

    /// Reads a text attribute, trimmed. `Ok(None)` if the file does not exist.
    pub fn read_opt(&self, rel: impl AsRef<Path>) -> Result<Option<String>, SysrootError> {
        let rel = rel.as_ref();
        match read_file(&self.path(rel)) {
            Ok(b) => match String::from_utf8(b) {
                Ok(s) => Ok(Some(s.trim_end_matches(['\n', '\0']).trim().to_string())),
                Err(e) => Err(SysrootError::Malformed {
                    path: rel.to_path_buf(),
                    why: "not UTF-8 text".into(),
                    content: String::from_utf8_lossy(e.as_bytes()).chars().take(40).collect(),
                }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(rel, e)),
        }
    }

    /// Reads a text attribute that must exist.
    pub fn read(&self, rel: impl AsRef<Path>) -> Result<String, SysrootError> {
        let rel = rel.as_ref();
        self.read_opt(rel)?.ok_or_else(|| self.io_err(rel, io::Error::from(io::ErrorKind::NotFound)))
    }

    /// Reads a binary file. `Ok(None)` if it does not exist.
    pub fn read_bytes_opt(&self, rel: impl AsRef<Path>) -> Result<Option<Vec<u8>>, SysrootError> {
        let rel = rel.as_ref();
        match read_file(&self.path(rel)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(rel, e)),
        }
    }

    /// Names of the entries of a directory, sorted. `Ok(None)` if it does not exist.
    pub fn list_dir(&self, rel: impl AsRef<Path>) -> Result<Option<Vec<String>>, SysrootError> {
        let rel = rel.as_ref();
        let rd = match fs::read_dir(self.path(rel)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err(rel, e)),
        };
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| self.io_err(rel, e))?;
            names.push(ent.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(Some(names))
    }

    /// Resolves the symlink at `rel` lexically, relative to its directory, to a root-relative
    /// path. Absolute targets are taken as root-relative (a live `/` and a capture agree).
    /// `Ok(None)` if `rel` does not exist or is not a symlink.
    pub fn resolve_link(&self, rel: impl AsRef<Path>) -> Result<Option<PathBuf>, SysrootError> {
        let rel = rel.as_ref();
        let target = match fs::read_link(self.path(rel)) {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::InvalidInput) => return Ok(None),
            Err(e) => return Err(self.io_err(rel, e)),
        };
        let base = rel.parent().unwrap_or(Path::new(""));
        let joined = if target.is_absolute() { target.clone() } else { base.join(&target) };
        normalize(&joined).map(Some).ok_or(SysrootError::Escapes { path: rel.to_path_buf(), target })
    }

    /// The last path component of a symlink's target (e.g. a driver name), if the link exists.
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Result<Option<String>, SysrootError> {
        Ok(self.resolve_link(rel)?.and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())))
    }
}

/// Reads a whole file without the size query `fs::read` makes first: sysfs attributes report a
/// size of 4096 whatever they hold, so the query buys nothing, and discovery is syscall-bound.
fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut buf = Vec::with_capacity(4096);
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Lexically normalizes a root-relative path: drops `.` and the root, applies `..`. `None` if
/// `..` would climb above the root.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out.iter().collect())
}

fn malformed(rel: &Path, why: impl Into<String>, content: &str) -> SysrootError {
    SysrootError::Malformed { path: rel.to_path_buf(), why: why.into(), content: content.chars().take(60).collect() }
}

/// Parses `0x`-prefixed (or bare) hex, as sysfs writes `vendor`, `class`, `resource`.
pub fn parse_hex(rel: &Path, s: &str) -> Result<u64, SysrootError> {
    let t = s.trim();
    let h = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    if h.is_empty() || h.len() > 16 {
        return Err(malformed(rel, "expected a hex number", s));
    }
    u64::from_str_radix(h, 16).map_err(|_| malformed(rel, "expected a hex number", s))
}

/// Parses a hex attribute that must fit `bits` bits.
pub fn parse_hex_bits(rel: &Path, s: &str, bits: u32) -> Result<u64, SysrootError> {
    let v = parse_hex(rel, s)?;
    if bits < 64 && v >> bits != 0 {
        return Err(malformed(rel, format!("value exceeds {bits} bits"), s));
    }
    Ok(v)
}

/// Parses a decimal integer attribute.
pub fn parse_dec<T: std::str::FromStr>(rel: &Path, s: &str) -> Result<T, SysrootError> {
    s.trim().parse::<T>().map_err(|_| malformed(rel, "expected a decimal integer", s))
}

/// Parses a `0`/`1` boolean attribute.
pub fn parse_bool(rel: &Path, s: &str) -> Result<bool, SysrootError> {
    match s.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(malformed(rel, "expected 0 or 1", s)),
    }
}

/// Reports a malformed value (for parsers outside this module).
pub fn malformed_err(rel: &Path, why: impl Into<String>, content: &str) -> SysrootError {
    malformed(rel, why, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_applies_parent_and_refuses_escape() {
        assert_eq!(
            normalize(Path::new("sys/bus/pci/devices/../../../devices/pci0000:00/0000:00:01.0")).unwrap(),
            PathBuf::from("sys/devices/pci0000:00/0000:00:01.0")
        );
        assert!(normalize(Path::new("sys/../../etc")).is_none());
        assert_eq!(normalize(Path::new("/sys/./x")).unwrap(), PathBuf::from("sys/x"));
    }

    #[test]
    fn hex_and_dec_parsers_name_the_file() {
        let p = Path::new("sys/bus/pci/devices/0000:00:00.0/vendor");
        assert_eq!(parse_hex_bits(p, "0x8086", 16).unwrap(), 0x8086);
        let e = parse_hex_bits(p, "0x18086", 16).unwrap_err().to_string();
        assert!(e.contains("vendor") && e.contains("16 bits"), "{e}");
        assert!(parse_hex(p, "").is_err());
        assert!(parse_hex(p, "0xzz").is_err());
        assert!(parse_hex(p, "0x11112222333344445").is_err());
        assert_eq!(parse_dec::<i32>(p, "-1").unwrap(), -1);
        assert!(parse_dec::<i32>(p, "one").is_err());
        assert!(parse_bool(p, "2").is_err());
    }

    #[test]
    fn open_rejects_missing_root() {
        let e = Sysroot::open("/nonexistent/peermem-root").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/peermem-root"), "{e}");
    }

    #[test]
    fn links_resolve_within_root() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sys/devices/pci0000:00/0000:00:01.0")).unwrap();
        fs::create_dir_all(d.path().join("sys/bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:01.0",
            d.path().join("sys/bus/pci/devices/0000:00:01.0"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../../../../../..", d.path().join("sys/bus/pci/devices/evil")).unwrap();
        let r = Sysroot::open(d.path()).unwrap();
        assert_eq!(
            r.resolve_link("sys/bus/pci/devices/0000:00:01.0").unwrap().unwrap(),
            PathBuf::from("sys/devices/pci0000:00/0000:00:01.0")
        );
        assert!(matches!(r.resolve_link("sys/bus/pci/devices/evil"), Err(SysrootError::Escapes { .. })));
        assert!(r.resolve_link("sys/bus/pci/devices/none").unwrap().is_none());
    }
}
