//! Host-to-guest names for a topology file used inside a VM: NCCL finds its GPUs and NICs in the
//! file by PCI bus id and its nets by RDMA device name, so a guest whose passed-through
//! functions sit at other addresses (or got other names) needs the host's rewritten.
//!
//! Owns: `BusMap`, its parsing (`HOST=GUEST` arguments and map files) and `MapError`. Must not:
//! check the host side against a topology (the export does, naming the entry at fault).

use std::collections::BTreeMap;
use std::path::Path;

use crate::pci::Bdf;

/// Why a mapping entry was refused. Each names where the entry came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("{origin}: {text:?}: {why}")]
    Malformed { origin: String, text: String, why: String },
    #[error("{origin}: {host} is already mapped by {first}")]
    DuplicateHost { origin: String, host: String, first: String },
    #[error("{origin}: {guest} is already the guest name of {other} ({first})")]
    DuplicateGuest { origin: String, guest: String, other: String, first: String },
}

/// One side of an entry: a PCI bus id, or an RDMA device name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Pci(Bdf),
    Name(String),
}

fn key(s: &str) -> Result<Key, String> {
    if let Ok(b) = s.parse::<Bdf>() {
        return Ok(Key::Pci(b));
    }
    // Anything with a PCI address's punctuation that did not parse is a mistyped address.
    if s.contains(':') || s.contains('.') {
        return Err(format!("{s:?} is not a PCI address (dddd:bb:dd.f)"));
    }
    let ok = !s.is_empty() && s.len() < 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(format!("{s:?} is neither a PCI address nor an RDMA device name"));
    }
    Ok(Key::Name(s.to_string()))
}

/// Host bus ids mapped to guest bus ids, and host RDMA device names to guest names. Each entry
/// remembers where it came from (`--map ...` or `FILE:LINE`) for the errors that name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusMap {
    pci: BTreeMap<Bdf, (Bdf, String)>,
    names: BTreeMap<String, (String, String)>,
}

impl BusMap {
    /// Adds one `HOST=GUEST` entry: two PCI addresses, or two RDMA device names.
    pub fn add(&mut self, entry: &str, origin: &str) -> Result<(), MapError> {
        let bad = |why: String| MapError::Malformed { origin: origin.to_string(), text: entry.to_string(), why };
        let (h, g) = entry.split_once('=').ok_or_else(|| bad("expected HOST=GUEST".into()))?;
        let (host, guest) = (key(h.trim()).map_err(bad)?, key(g.trim()).map_err(bad)?);
        match (host, guest) {
            (Key::Pci(h), Key::Pci(g)) => {
                if let Some((_, first)) = self.pci.get(&h) {
                    return Err(self.dup_host(origin, h.to_string(), first));
                }
                if let Some((other, (_, first))) = self.pci.iter().find(|(_, (v, _))| *v == g) {
                    return Err(dup_guest(origin, g.to_string(), other.to_string(), first));
                }
                self.pci.insert(h, (g, origin.to_string()));
            }
            (Key::Name(h), Key::Name(g)) => {
                if let Some((_, first)) = self.names.get(&h) {
                    return Err(self.dup_host(origin, h, first));
                }
                if let Some((other, (_, first))) = self.names.iter().find(|(_, (v, _))| *v == g) {
                    return Err(dup_guest(origin, g, other.clone(), first));
                }
                self.names.insert(h, (g, origin.to_string()));
            }
            _ => return Err(bad("both sides must be PCI addresses, or both RDMA device names".into())),
        }
        Ok(())
    }

    fn dup_host(&self, origin: &str, host: String, first: &str) -> MapError {
        MapError::DuplicateHost { origin: origin.to_string(), host, first: first.to_string() }
    }

    /// Adds every entry of a map file: one `HOST=GUEST` (or `HOST GUEST`) per line; blank lines
    /// and `#` comments are skipped. Errors name `path:line`.
    pub fn add_file(&mut self, path: &Path, text: &str) -> Result<(), MapError> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let entry = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                [one] => one.to_string(),
                [h, g] => format!("{h}={g}"),
                _ => line.to_string(),
            };
            self.add(&entry, &format!("{}:{}", path.display(), n + 1))?;
        }
        Ok(())
    }

    /// The bus id NCCL will see for host function `host`.
    pub fn bus(&self, host: Bdf) -> Bdf {
        self.pci.get(&host).map_or(host, |(g, _)| *g)
    }

    /// The RDMA device name NCCL will see for host device `host`.
    pub fn name<'a>(&'a self, host: &'a str) -> &'a str {
        self.names.get(host).map_or(host, |(g, _)| g.as_str())
    }

    /// Each mapped host function with the entry's origin.
    pub fn pci_hosts(&self) -> impl Iterator<Item = (Bdf, &str)> + '_ {
        self.pci.iter().map(|(h, (_, o))| (*h, o.as_str()))
    }

    /// Each mapped host RDMA device name with the entry's origin.
    pub fn name_hosts(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.names.iter().map(|(h, (_, o))| (h.as_str(), o.as_str()))
    }

    /// The origin of the entry that maps `host`, if one does.
    pub fn origin(&self, host: Bdf) -> Option<&str> {
        self.pci.get(&host).map(|(_, o)| o.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.pci.is_empty() && self.names.is_empty()
    }
}

fn dup_guest(origin: &str, guest: String, other: String, first: &str) -> MapError {
    MapError::DuplicateGuest { origin: origin.to_string(), guest, other, first: first.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn entries_map_bus_ids_and_rdma_names_and_leave_the_rest() {
        let mut m = BusMap::default();
        m.add("0000:3b:00.0=0000:00:05.0", "--map").unwrap();
        m.add("mlx5_4 = mlx5_0", "--map").unwrap();
        assert_eq!(m.bus(bdf("0000:3b:00.0")), bdf("0000:00:05.0"));
        assert_eq!(m.bus(bdf("0000:3c:00.0")), bdf("0000:3c:00.0"));
        assert_eq!(m.name("mlx5_4"), "mlx5_0");
        assert_eq!(m.name("mlx5_1"), "mlx5_1");
        assert_eq!(m.origin(bdf("0000:3b:00.0")), Some("--map"));
    }

    #[test]
    fn a_map_file_takes_both_forms_comments_and_names_its_lines_in_errors() {
        let mut m = BusMap::default();
        let p = Path::new("vm.map");
        m.add_file(p, "# host guest\n0000:18:00.0 0000:00:04.0\n\n0000:19:00.0=0000:00:05.0  # NIC\n").unwrap();
        assert_eq!(m.bus(bdf("0000:19:00.0")), bdf("0000:00:05.0"));
        let e = m.add_file(p, "0000:1a:00.0 0000:00:04.0\n").unwrap_err();
        assert!(matches!(e, MapError::DuplicateGuest { .. }), "{e}");
        assert!(e.to_string().starts_with("vm.map:1:") && e.to_string().contains("vm.map:2"), "{e}");
        let e = m.add_file(p, "\n\n0000:18:00.0 0000:00:09.0\n").unwrap_err();
        assert!(matches!(e, MapError::DuplicateHost { .. }) && e.to_string().starts_with("vm.map:3:"), "{e}");
    }

    #[test]
    fn malformed_entries_are_refused_with_the_reason() {
        let mut m = BusMap::default();
        for (entry, why) in [
            ("0000:3b:00.0", "HOST=GUEST"),
            ("0000:3b:00.0=mlx5_0", "both sides"),
            ("0000:3b:00.9=0000:00:05.0", "not a PCI address"),
            ("0000:3b:00.0=", "neither"),
            ("mlx5 0=mlx5_1", "neither"),
        ] {
            let e = m.add(entry, "--map").unwrap_err().to_string();
            assert!(e.contains(why) && e.starts_with("--map:"), "{entry}: {e}");
        }
        assert!(m.is_empty());
    }
}
