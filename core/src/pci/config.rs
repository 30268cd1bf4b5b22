//! Decoding of a PCI function's configuration space as read from sysfs `config`.
//!
//! Owns: header type, BAR registers (bus addresses), the standard capability walk (PCI Express
//! port type) and the extended capability walk (ACS). Must not: read files or guess. Unprivileged
//! sysfs reads return only 64 bytes and a kernel without extended config access exposes 256: what
//! the bytes do not contain is reported as `Unknown`, never as "absent".

use std::fmt;

/// PCI capability IDs and register offsets used here (PCI Local Bus 3.0, PCIe Base 6.0).
const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_HEADER_TYPE: usize = 0x0e;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_CB_CAPABILITY_LIST: usize = 0x14;
const PCI_BASE_ADDRESS_0: usize = 0x10;
const PCI_CAP_ID_EXP: u8 = 0x10;
const PCI_EXP_FLAGS: usize = 2;
const PCI_EXT_CAP_START: usize = 0x100;
const PCI_EXT_CAP_ID_ACS: u16 = 0x000d;
const PCI_ACS_CAP: usize = 4;
const PCI_ACS_CTRL: usize = 6;

/// ACS control bits that make the kernel's `pci_bridge_has_acs_redir()` true.
pub const PCI_ACS_RR: u16 = 0x0004;
pub const PCI_ACS_CR: u16 = 0x0008;
pub const PCI_ACS_EC: u16 = 0x0020;
pub const ACS_REDIRECT_MASK: u16 = PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_EC;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{len} bytes, need >= 64")]
    TooShort { len: usize },
    #[error("{len} bytes: not 64, 128, 256 or 4096 (a config space is never this size)")]
    OddSize { len: usize },
    #[error("BAR{index} is the upper half of a 64-bit BAR at the last BAR slot")]
    TruncatedBar64 { index: usize },
}

/// One BAR register as programmed (bus side). Addresses have the flag bits masked off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarReg {
    /// Register reads 0: unassigned, or not readable (e.g. an SR-IOV VF).
    Unset,
    Io {
        addr: u32,
    },
    Mem {
        bus_start: u64,
        is64: bool,
        prefetchable: bool,
    },
    /// Upper dword of the preceding 64-bit BAR.
    Upper,
}

/// The PCI Express device/port type (PCI_EXP_FLAGS_TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortType {
    Endpoint,
    LegacyEndpoint,
    RootPort,
    UpstreamPort,
    DownstreamPort,
    PcieToPciBridge,
    PciToPcieBridge,
    RcIntegratedEndpoint,
    RcEventCollector,
    Reserved(u8),
}

impl PortType {
    fn from_flags(flags: u16) -> PortType {
        match ((flags >> 4) & 0xf) as u8 {
            0 => PortType::Endpoint,
            1 => PortType::LegacyEndpoint,
            4 => PortType::RootPort,
            5 => PortType::UpstreamPort,
            6 => PortType::DownstreamPort,
            7 => PortType::PcieToPciBridge,
            8 => PortType::PciToPcieBridge,
            9 => PortType::RcIntegratedEndpoint,
            10 => PortType::RcEventCollector,
            t => PortType::Reserved(t),
        }
    }
}

/// Is the function PCI Express, and of which type. `Unknown` when the capability list lies beyond
/// the bytes we could read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pcie {
    Unknown,
    /// Conventional PCI (no PCI Express capability in a complete standard config space).
    No,
    Yes(PortType),
}

/// The ACS extended capability as far as the config bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acs {
    /// Extended config space not in the bytes (64 or 256 bytes read).
    Unknown,
    Absent,
    Present {
        cap: u16,
        ctrl: u16,
    },
}

impl Acs {
    /// `Some(true)` when RR, CR or EC is set in the control register, as the kernel checks;
    /// `None` when unknown.
    pub fn redirects(self) -> Option<bool> {
        match self {
            Acs::Unknown => None,
            Acs::Absent => Some(false),
            Acs::Present { ctrl, .. } => Some(ctrl & ACS_REDIRECT_MASK != 0),
        }
    }
}

impl fmt::Display for Acs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Acs::Unknown => f.write_str("unknown"),
            Acs::Absent => f.write_str("absent"),
            Acs::Present { cap, ctrl } => {
                let bits =
                    [(0x1, "SV"), (0x2, "TB"), (0x4, "RR"), (0x8, "CR"), (0x10, "UF"), (0x20, "EC"), (0x40, "DT")];
                let on: Vec<&str> = bits.iter().filter(|(b, _)| ctrl & b != 0).map(|(_, n)| *n).collect();
                write!(f, "cap={cap:#06x} ctrl={ctrl:#06x} [{}]", on.join(" "))
            }
        }
    }
}

/// Everything peermem uses from one config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigInfo {
    pub len: usize,
    pub header_type: u8,
    pub multifunction: bool,
    pub bars: Vec<BarReg>,
    pub pcie: Pcie,
    pub acs: Acs,
}

fn rd16(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn rd32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl ConfigInfo {
    /// Decodes `bytes` (the whole content of sysfs `config`).
    pub fn parse(bytes: &[u8]) -> Result<ConfigInfo, ConfigError> {
        let len = bytes.len();
        if len < 64 {
            return Err(ConfigError::TooShort { len });
        }
        if ![64, 128, 256, 4096].contains(&len) {
            return Err(ConfigError::OddSize { len });
        }
        let ht = bytes[PCI_HEADER_TYPE];
        let header_type = ht & 0x7f;
        let nbars = match header_type {
            0 => 6,
            1 => 2,
            2 => 1,
            _ => 0,
        };
        let bars = parse_bars(bytes, nbars)?;
        let pcie = walk_std_caps(bytes, header_type);
        let acs = walk_ext_caps(bytes, pcie);
        Ok(ConfigInfo { len, header_type, multifunction: ht & 0x80 != 0, bars, pcie, acs })
    }

    /// A config space that could not be read: no BAR registers, PCIe and ACS unknown.
    pub fn unknown() -> ConfigInfo {
        ConfigInfo {
            len: 0,
            header_type: 0,
            multifunction: false,
            bars: Vec::new(),
            pcie: Pcie::Unknown,
            acs: Acs::Unknown,
        }
    }

    pub fn port_type(&self) -> Option<PortType> {
        match self.pcie {
            Pcie::Yes(t) => Some(t),
            _ => None,
        }
    }
}

fn parse_bars(b: &[u8], nbars: usize) -> Result<Vec<BarReg>, ConfigError> {
    let mut bars = Vec::with_capacity(nbars);
    let mut i = 0;
    while i < nbars {
        let lo = rd32(b, PCI_BASE_ADDRESS_0 + 4 * i).unwrap_or(0);
        if lo & 1 == 1 {
            bars.push(BarReg::Io { addr: lo & !0x3 });
            i += 1;
            continue;
        }
        let prefetchable = lo & 0x8 != 0;
        let is64 = (lo >> 1) & 0x3 == 0x2;
        if is64 {
            if i + 1 >= nbars {
                return Err(ConfigError::TruncatedBar64 { index: i });
            }
            let hi = rd32(b, PCI_BASE_ADDRESS_0 + 4 * (i + 1)).unwrap_or(0);
            let addr = ((hi as u64) << 32) | (lo & !0xf) as u64;
            bars.push(if addr == 0 { BarReg::Unset } else { BarReg::Mem { bus_start: addr, is64, prefetchable } });
            bars.push(BarReg::Upper);
            i += 2;
        } else {
            let addr = (lo & !0xf) as u64;
            bars.push(if addr == 0 { BarReg::Unset } else { BarReg::Mem { bus_start: addr, is64, prefetchable } });
            i += 1;
        }
    }
    Ok(bars)
}

/// Walks the standard capability list for the PCI Express capability.
fn walk_std_caps(b: &[u8], header_type: u8) -> Pcie {
    let status = rd16(b, PCI_STATUS).unwrap_or(0);
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Pcie::No;
    }
    let ptr_off = if header_type == 2 { PCI_CB_CAPABILITY_LIST } else { PCI_CAPABILITY_LIST };
    let mut pos = (b[ptr_off] & 0xfc) as usize;
    // The kernel's __pci_find_next_cap_ttl bounds the walk at 48 entries.
    for _ in 0..48 {
        if pos < 0x40 {
            return Pcie::No;
        }
        let Some(hdr) = rd16(b, pos) else {
            return Pcie::Unknown;
        };
        let id = (hdr & 0xff) as u8;
        if id == 0xff {
            return Pcie::No;
        }
        if id == PCI_CAP_ID_EXP {
            return match rd16(b, pos + PCI_EXP_FLAGS) {
                Some(flags) => Pcie::Yes(PortType::from_flags(flags)),
                None => Pcie::Unknown,
            };
        }
        pos = ((hdr >> 8) & 0xfc) as usize;
    }
    Pcie::No
}

/// Walks the extended capability list for ACS.
fn walk_ext_caps(b: &[u8], pcie: Pcie) -> Acs {
    if b.len() <= PCI_EXT_CAP_START {
        // A conventional PCI function has no extended config space at all.
        return if pcie == Pcie::No { Acs::Absent } else { Acs::Unknown };
    }
    let mut pos = PCI_EXT_CAP_START;
    // Each capability is >= 4 bytes: the kernel's bound is (4096 - 256) / 8.
    for _ in 0..(4096 - 256) / 8 {
        let Some(hdr) = rd32(b, pos) else {
            return Acs::Absent;
        };
        if hdr == 0 || hdr == 0xffff_ffff {
            return Acs::Absent;
        }
        if (hdr & 0xffff) as u16 == PCI_EXT_CAP_ID_ACS {
            return match (rd16(b, pos + PCI_ACS_CAP), rd16(b, pos + PCI_ACS_CTRL)) {
                (Some(cap), Some(ctrl)) => Acs::Present { cap, ctrl },
                _ => Acs::Absent,
            };
        }
        let next = (hdr >> 20) as usize & !0x3;
        if next < PCI_EXT_CAP_START {
            return Acs::Absent;
        }
        pos = next;
    }
    Acs::Absent
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A type-0 PCIe endpoint config space with one 64-bit prefetchable BAR at `bar0`.
    pub(crate) fn endpoint_config(len: usize, bar0: u64, acs_ctrl: Option<u16>, port: u8) -> Vec<u8> {
        let mut c = vec![0u8; len];
        c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        c[PCI_STATUS..PCI_STATUS + 2].copy_from_slice(&PCI_STATUS_CAP_LIST.to_le_bytes());
        c[PCI_BASE_ADDRESS_0..PCI_BASE_ADDRESS_0 + 4].copy_from_slice(&((bar0 as u32 & !0xf) | 0xc).to_le_bytes());
        c[0x14..0x18].copy_from_slice(&((bar0 >> 32) as u32).to_le_bytes());
        c[PCI_CAPABILITY_LIST] = 0x40;
        if len > 0x44 {
            c[0x40] = PCI_CAP_ID_EXP;
            c[0x41] = 0;
            c[0x42..0x44].copy_from_slice(&(((port as u16) << 4) | 2).to_le_bytes());
        }
        if len == 4096 {
            // A dummy AER capability first, then ACS, to exercise the walk.
            c[0x100..0x104].copy_from_slice(&(0x0001u32 | (1 << 16) | (0x148 << 20)).to_le_bytes());
            if let Some(ctrl) = acs_ctrl {
                c[0x148..0x14c].copy_from_slice(&(0x000du32 | (1 << 16)).to_le_bytes());
                c[0x14c..0x14e].copy_from_slice(&0x5fu16.to_le_bytes());
                c[0x14e..0x150].copy_from_slice(&ctrl.to_le_bytes());
            }
        }
        c
    }

    #[test]
    fn decodes_64bit_prefetchable_bar_and_port_type() {
        let c = endpoint_config(4096, 0x38_0000_0000, None, 0);
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.bars[0], BarReg::Mem { bus_start: 0x38_0000_0000, is64: true, prefetchable: true });
        assert_eq!(info.bars[1], BarReg::Upper);
        assert_eq!(info.pcie, Pcie::Yes(PortType::Endpoint));
        assert_eq!(info.acs, Acs::Absent);
    }

    #[test]
    fn acs_redirect_bits_match_kernel_mask() {
        for (ctrl, redir) in [(0x0001u16, false), (0x0004, true), (0x0008, true), (0x0020, true), (0x0053, false)] {
            let c = endpoint_config(4096, 0x1000_0000, Some(ctrl), 4);
            let info = ConfigInfo::parse(&c).unwrap();
            assert_eq!(info.acs.redirects(), Some(redir), "ctrl {ctrl:#x}");
            assert_eq!(info.pcie, Pcie::Yes(PortType::RootPort));
        }
    }

    #[test]
    fn truncated_config_makes_acs_and_port_unknown() {
        let c = endpoint_config(64, 0x1000_0000, Some(0x1d), 4);
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.acs, Acs::Unknown);
        assert_eq!(info.pcie, Pcie::Unknown);
        assert_eq!(info.acs.redirects(), None);
        // BARs are in the first 64 bytes: still readable.
        assert!(matches!(info.bars[0], BarReg::Mem { bus_start: 0x1000_0000, .. }));
        let c = endpoint_config(256, 0x1000_0000, Some(0x1d), 4);
        assert_eq!(ConfigInfo::parse(&c).unwrap().acs, Acs::Unknown);
    }

    #[test]
    fn conventional_pci_with_256_bytes_has_no_acs() {
        let mut c = vec![0u8; 256];
        c[PCI_HEADER_TYPE] = 0;
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.pcie, Pcie::No);
        assert_eq!(info.acs, Acs::Absent);
    }

    #[test]
    fn garbage_config_is_an_error_or_bounded() {
        assert_eq!(ConfigInfo::parse(&[0u8; 3]), Err(ConfigError::TooShort { len: 3 }));
        assert_eq!(ConfigInfo::parse(&[0u8; 100]), Err(ConfigError::OddSize { len: 100 }));
        // All 0xff (a device that fell off the bus): the walks terminate.
        let c = vec![0xffu8; 4096];
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.acs, Acs::Absent);
        // A capability list that loops on itself terminates.
        let mut c = vec![0u8; 4096];
        c[PCI_STATUS] = PCI_STATUS_CAP_LIST as u8;
        c[PCI_CAPABILITY_LIST] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x40;
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | (0x100 << 20)).to_le_bytes());
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.pcie, Pcie::No);
        assert_eq!(info.acs, Acs::Absent);
        // A 64-bit BAR flagged in the last slot.
        let mut c = vec![0u8; 64];
        c[PCI_BASE_ADDRESS_0 + 20] = 0x4;
        assert_eq!(ConfigInfo::parse(&c), Err(ConfigError::TruncatedBar64 { index: 5 }));
    }

    #[test]
    fn bridge_header_has_two_bars() {
        let mut c = vec![0u8; 256];
        c[PCI_HEADER_TYPE] = 0x81;
        let info = ConfigInfo::parse(&c).unwrap();
        assert_eq!(info.header_type, 1);
        assert!(info.multifunction);
        assert_eq!(info.bars.len(), 2);
    }
}
