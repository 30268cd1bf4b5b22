//! Fuzz harnesses: one function per parser, taking arbitrary bytes. The `peermem-fuzz` crate
//! runs them under AFL++ and replays its committed corpus through them in `cargo test`.
//!
//! Owns: feeding untrusted bytes to every parser of the crate (sysfs attributes, config space,
//! `resource`, device-tree `ranges`, BDF strings, capture archives) and checking the properties
//! that must hold for any input (round trips, ranges inside what was parsed). A harness returns
//! normally for every input the parser answers, with a value or a typed error; a panic, a hang or
//! an unbounded allocation is a bug in the parser. Must not: touch the file system or the
//! machine.

use std::path::Path;

use crate::addr::CpuPhys;
use crate::pci::config::ConfigInfo;
use crate::pci::topology::{is_host_bridge_dir, parse_bars, parse_link_speed, parse_resource, BarKind};
use crate::pci::{Bdf, EndpointKind, Selection};
use crate::platform::{be_u32s, dt_strings, parse_cpuinfo, parse_pci_ranges, KernelVersion};
use crate::sysroot::{parse_bool, parse_dec, parse_hex, parse_hex_bits, Sysroot};

/// Every sysfs/procfs text parser on one attribute's bytes: hex, decimal, boolean, link speed,
/// kernel release, cpulist, `pci.ids` lines, `cpuinfo`, class selections; and the text parsers
/// of the NCCL export: host-to-guest map files and NCCL's topology-file rules.
pub fn sysfs_attr(data: &[u8]) {
    let rel = Path::new("fuzz/attr");
    let Ok(s) = Sysroot::text(rel, data.to_vec()) else { return };
    if let Ok(v) = parse_hex(rel, &s) {
        // Every value parse_hex accepts is written back the way sysfs writes it.
        assert_eq!(parse_hex(rel, &format!("{v:#x}")).ok(), Some(v));
    }
    for bits in [8, 16, 24, 32, 64] {
        if let Ok(v) = parse_hex_bits(rel, &s, bits) {
            assert!(bits == 64 || v >> bits == 0, "{v:#x} exceeds {bits} bits");
        }
    }
    let _ = parse_dec::<i32>(rel, &s);
    let _ = parse_dec::<u64>(rel, &s);
    let _ = parse_bool(rel, &s);
    if let Ok(Some(gts)) = parse_link_speed(rel, &s) {
        assert!(gts.is_finite() && gts > 0.0);
    }
    let _ = KernelVersion::parse(&s);
    if let Some(mask) = crate::nccl::cpulist_to_mask(&s) {
        assert!(mask.len() <= 8192 / 32 * 9, "cpumask of {} bytes", mask.len());
    }
    let ids = crate::pciids::PciIds::parse(&s, &[(0x8086, 0x1234), (0x1b36, 0x0010)]);
    let _ = ids.device(0x8086, 0x1234);
    let _ = parse_cpuinfo(Path::new("proc/cpuinfo"), &s);
    let _ = is_host_bridge_dir(&s);
    let _ = EndpointKind::parse(&s);
    let _ = crate::nccl::BusMap::default().add_file(rel, &s);
    let checked = crate::nccl::check(&s);
    assert!(checked.elements <= crate::nccl::NCCL_MAX_ELEMENTS);
    let _ = Selection::parse(&s.split(',').map(str::to_string).collect::<Vec<_>>());
}

/// The config-space decoder (capability walks, ACS, BAR registers). The first byte picks the
/// size the rest is padded or cut to (64, 128, 256, 4096: what sysfs gives), so the walks see
/// well-sized spaces; the raw bytes are decoded too.
pub fn config_space(data: &[u8]) {
    let _ = ConfigInfo::parse(data);
    let Some((&sel, rest)) = data.split_first() else { return };
    let len = [64, 128, 256, 4096][sel as usize % 4];
    let mut space = rest.to_vec();
    space.resize(len, 0);
    if let Ok(c) = ConfigInfo::parse(&space) {
        assert_eq!(c.len, len);
        assert!(c.bars.len() <= 6);
        let _ = c.port_type();
        let _ = c.acs.redirects();
        // The decoded BAR registers against an all-present resource file.
        let res: Vec<(u64, u64, u64)> =
            (0..6).map(|i| (0x1000_0000 * (i + 1), 0x1000_0000 * (i + 1) + 0xfff, 0x0014_0200)).collect();
        if let Ok(bars) = parse_bars(Path::new("fuzz/resource"), &res, &c) {
            for b in bars {
                let _ = b.window().map(|w| w.to_bus(w.cpu().start()));
            }
        }
    }
}

/// The `resource` parser and the BARs derived from it: every BAR's CPU range lies inside the
/// address space and every offset query inside it answers (or errors) without overflow.
pub fn resource(data: &[u8]) {
    let rel = Path::new("fuzz/resource");
    let Ok(s) = Sysroot::text(rel, data.to_vec()) else { return };
    let Ok(lines) = parse_resource(rel, &s) else { return };
    let Ok(bars) = parse_bars(rel, &lines, &ConfigInfo::unknown()) else { return };
    assert!(bars.len() <= 6);
    for b in &bars {
        let r = b.cpu;
        assert!(!r.is_empty());
        assert!(r.start().raw().checked_add(r.len() - 1).is_some(), "range {r:?} wraps");
        assert!(r.at(r.len() - 1).is_ok());
        assert!(r.at(r.len()).is_err());
        assert!(r.offset_of(CpuPhys::new(r.start().raw().wrapping_sub(1))).is_err() || r.start().raw() == 0);
        if b.kind == BarKind::Mem {
            assert!(b.window().is_none(), "no bus address without config space");
        }
    }
}

/// The device-tree `ranges` parser: the first byte picks the parent and size cell counts
/// (0-3 each, so unsupported sizes are exercised), the rest is the property.
pub fn dt_ranges(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    let rel = Path::new("proc/device-tree/pci/ranges");
    let (parent, size) = ((sel & 3) as u32, ((sel >> 2) & 3) as u32);
    if let Ok(ranges) = parse_pci_ranges(rel, rest, parent, size) {
        assert_eq!(ranges.len() * (3 + parent + size) as usize * 4, rest.len());
        for r in ranges {
            let _ = r.offset();
            let _ = r.contains_cpu(CpuPhys::new(r.cpu.raw().wrapping_add(r.size)));
        }
    }
    let _ = be_u32s(rel, rest);
    let _ = dt_strings(rest);
}

/// BDF strings: whatever parses prints back to a form that parses to the same function.
pub fn bdf(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(b) = s.parse::<Bdf>() {
        let printed = b.to_string();
        assert_eq!(printed.parse::<Bdf>().ok(), Some(b), "{s:?} -> {printed}");
        assert!(b.dev() < 32 && b.func() < 8);
        let _ = b.to_kernel_param();
        let _ = b.map_types_idx();
    }
}

/// Capture archives: streaming decompression and the member checks made before anything is
/// written. A member list that passes has one top directory and no name that leaves it.
pub fn archive(data: &[u8]) {
    let name = Path::new("fuzz.tar");
    if let Ok((members, top)) = crate::archive::check_members(name, data) {
        assert!(!top.as_os_str().is_empty());
        for m in members {
            let p = match &m {
                crate::archive::Member::Dir(p) | crate::archive::Member::File(p, _) => p,
                crate::archive::Member::Link(p, _) => p,
            };
            assert!(p.starts_with(&top), "{} outside {}", p.display(), top.display());
            assert!(crate::sysroot::normalize(p).as_deref() == Some(p.as_path()), "{} is not normal", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harnesses_accept_empty_and_fixture_like_inputs() {
        for f in [sysfs_attr, config_space, resource, dt_ranges, bdf, archive] {
            f(b"");
            f(b"0x8086\n");
            f(&[0xff; 300]);
        }
        bdf(b"0000:03:00.0");
        resource("0x1000 0x1fff 0x40200\n".repeat(6).as_bytes());
    }
}
