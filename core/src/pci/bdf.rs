//! PCI function addresses (`dddd:bb:dd.f`). Owns parsing and printing; nothing else.

use std::fmt;
use std::str::FromStr;

/// Domain (segment), bus, device and function of one PCI function.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Bdf {
    domain: u32,
    bus: u8,
    dev: u8,
    func: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad PCI address {input:?}: {why} (expected dddd:bb:dd.f, e.g. 0000:03:00.0)")]
pub struct BdfParseError {
    pub input: String,
    pub why: &'static str,
}

impl Bdf {
    /// Builds a BDF; `dev` must be < 32 and `func` < 8.
    pub fn new(domain: u32, bus: u8, dev: u8, func: u8) -> Option<Bdf> {
        (dev < 32 && func < 8).then_some(Bdf { domain, bus, dev, func })
    }
    pub fn domain(self) -> u32 {
        self.domain
    }
    pub fn bus(self) -> u8 {
        self.bus
    }
    pub fn dev(self) -> u8 {
        self.dev
    }
    pub fn func(self) -> u8 {
        self.func
    }
    /// devfn as the kernel packs it: `dev << 3 | func`.
    pub fn devfn(self) -> u8 {
        (self.dev << 3) | self.func
    }
    /// The key the kernel's p2pdma `map_types` xarray uses: `(domain << 16) | bus << 8 | devfn`.
    pub fn map_types_idx(self) -> u64 {
        ((self.domain as u64) << 16) | ((self.bus as u64) << 8) | self.devfn() as u64
    }
    /// The kernel's short form used in `pci=disable_acs_redir=`: `dddd:bb:dd.f`.
    pub fn to_kernel_param(self) -> String {
        self.to_string()
    }
}

impl FromStr for Bdf {
    type Err = BdfParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| BdfParseError { input: s.to_string(), why };
        let hex = |p: &str, max_len: usize, what| {
            if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                Err(err(what))
            } else {
                u32::from_str_radix(p, 16).map_err(|_| err(what))
            }
        };
        let (rest, func) = s.rsplit_once('.').ok_or_else(|| err("missing '.function'"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [d, b, v] => (hex(d, 8, "bad domain")?, hex(b, 2, "bad bus")?, hex(v, 2, "bad device")?),
            [b, v] => (0, hex(b, 2, "bad bus")?, hex(v, 2, "bad device")?),
            _ => return Err(err("wrong number of ':' parts")),
        };
        if func.len() != 1 {
            return Err(err("bad function"));
        }
        let func = hex(func, 1, "bad function")?;
        if dev >= 32 {
            return Err(err("device number above 0x1f"));
        }
        if func >= 8 {
            return Err(err("function number above 7"));
        }
        Ok(Bdf { domain, bus: bus as u8, dev: dev as u8, func: func as u8 })
    }
}

impl TryFrom<String> for Bdf {
    type Error = BdfParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Bdf> for String {
    fn from(b: Bdf) -> String {
        b.to_string()
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.dev, self.func)
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let b: Bdf = "0000:03:00.0".parse().unwrap();
        assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (0, 3, 0, 0));
        let b: Bdf = "81:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:81:1f.7");
        let b: Bdf = "10000:e1:00.1".parse().unwrap();
        assert_eq!(b.to_string(), "10000:e1:00.1");
        assert_eq!(b.devfn(), 1);
    }

    #[test]
    fn rejects_garbage() {
        for bad in
            ["", "0000:03:00", "0000:03:20.0", "0000:03:00.8", "zz:00.0", "0000:003:00.0", "1:2:3:4.0", "00:00.00"]
        {
            assert!(bad.parse::<Bdf>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn map_types_idx_matches_kernel_layout() {
        let b: Bdf = "0001:02:03.4".parse().unwrap();
        assert_eq!(b.map_types_idx(), (1 << 16) | (2 << 8) | (3 << 3 | 4));
    }
}
