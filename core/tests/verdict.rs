//! The P2P verdict against Linux 6.12 `calc_map_type_and_dist()`, on fixtures captured in the
//! testbed guest (qemu-switch: nvme 03:00.0 and 04:00.0 under one x3130 switch, nvme 05:00.0 on
//! its own root port, nvme 81:00.0 behind a second host bridge) and fixtures derived from them by
//! fixtures/derive.py (each edit documented there).

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use peermem::{Bdf, MapType, PathLabel, Topology, Verdict};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

fn topo(name: &str) -> Topology {
    Topology::discover(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn why(t: &Topology, p: &str, c: &str) -> Verdict {
    t.verdict(t.idx(bdf(p)).unwrap(), t.idx(bdf(c)).unwrap())
}

const A: &str = "0000:03:00.0"; // nvme, switch downstream port 02:00.0
const B: &str = "0000:04:00.0"; // nvme, switch downstream port 02:01.0
const RP: &str = "0000:05:00.0"; // nvme on root port 00:02.0
const PXB: &str = "0000:81:00.0"; // nvme behind the pxb host bridge pci0000:80

#[test]
fn same_function_is_distance_0_bus_addr() {
    let v = why(&topo("qemu-switch"), A, A);
    assert_eq!((v.map_type, v.distance, v.path), (MapType::BusAddr, 0, PathLabel::PIX));
    assert_eq!(v.common_upstream, Some(bdf(A)));
}

#[test]
fn devices_under_one_switch_are_distance_4_bus_addr() {
    let t = topo("qemu-switch");
    for (p, c) in [(A, B), (B, A)] {
        let v = why(&t, p, c);
        assert_eq!((v.map_type, v.distance, v.path), (MapType::BusAddr, 4, PathLabel::PIX), "{p}->{c}");
        assert_eq!(v.common_upstream, Some(bdf("0000:01:00.0")));
        assert!(v.acs_redirect.is_empty() && v.acs_fix.is_none());
    }
}

#[test]
fn two_functions_of_one_device_are_distance_2_bus_addr() {
    // qemu-wide: one NVMe device with functions 0 and 1 below root port 00:03.0.
    let v = why(&topo("qemu-wide"), "0000:12:00.0", "0000:12:00.1");
    assert_eq!((v.map_type, v.distance, v.path), (MapType::BusAddr, 2, PathLabel::PIX));
    assert_eq!(v.common_upstream, Some(bdf("0000:00:03.0")));
}

#[test]
fn nested_switches_are_bus_addr_pxb_with_full_distance() {
    // qemu-wide: 03:00.0 below switch u1; 08:00.0 below switch u2, itself below u1's port 02:03.0.
    let t = topo("qemu-wide");
    let v = why(&t, "0000:03:00.0", "0000:08:00.0");
    assert_eq!((v.map_type, v.distance, v.path), (MapType::BusAddr, 2 + 4, PathLabel::PXB));
    assert_eq!(v.common_upstream, Some(bdf("0000:01:00.0")));
    assert_eq!(t.len(), 66);
}

#[test]
fn no_common_bridge_on_q35_intel_host_bridge_is_not_supported() {
    let t = topo("qemu-switch");
    // q35's 8086:29c0 is not allowlisted and TCG's CPU is not AMD Zen: the kernel refuses (EREMOTEIO).
    let v = why(&t, A, RP);
    assert_eq!(v.map_type, MapType::NotSupported);
    assert_eq!(v.distance, 4 + 2, "full chains: 03,02:00,01:00,00:01 and 05,00:02");
    assert_eq!(v.path, PathLabel::PHB);
    assert!(
        v.reasons.iter().any(|r| r.contains("8086:29c0") && r.contains("not in the Linux 6.12.95")),
        "{:?}",
        v.reasons
    );
    let hb = v.host_bridge.unwrap();
    assert!(!hb.cpu_supports_p2pdma && hb.same_host_bridge);
    let v = why(&t, A, PXB);
    assert_eq!((v.map_type, v.path, v.distance), (MapType::NotSupported, PathLabel::SYS, 4 + 2));
    assert!(!v.host_bridge.unwrap().same_host_bridge);
}

#[test]
fn acs_redirect_on_the_provider_side_forces_the_host_bridge() {
    let v = why(&topo("derived-acs-switch-port"), A, B);
    assert_eq!(v.acs_redirect, vec![bdf("0000:02:00.0")]);
    assert_eq!(v.map_type, MapType::NotSupported, "through an un-allowlisted host bridge");
    assert_eq!(v.distance, 4, "distance is still counted to the common device");
    assert_eq!(v.acs_fix.as_deref(), Some("pci=disable_acs_redir=0000:02:00.0"));
    assert_eq!(v.path, PathLabel::PHB);
}

#[test]
fn acs_redirect_on_the_client_side_forces_the_host_bridge() {
    let v = why(&topo("derived-acs-switch-port"), B, A);
    assert_eq!(v.acs_redirect, vec![bdf("0000:02:00.0")]);
    assert_eq!(v.map_type, MapType::NotSupported);
}

#[test]
fn acs_at_the_common_upstream_counts_once_and_sv_alone_does_not_redirect() {
    let t = topo("derived-acs-common-upstream");
    for (p, c) in [(A, B), (B, A)] {
        let v = why(&t, p, c);
        assert_eq!(v.acs_redirect, vec![bdf("0000:01:00.0")], "{p}->{c}: common device once, a-side only");
        assert_eq!(v.map_type, MapType::NotSupported);
    }
    // 03:00.0 carries ACS with only SV set: not a redirect.
    assert_eq!(t.by_bdf(bdf(A)).unwrap().acs().redirects(), Some(false));
}

#[test]
fn acs_on_the_endpoint_redirects_even_the_same_function() {
    let t = topo("derived-acs-endpoint");
    let v = why(&t, A, A);
    assert_eq!((v.map_type, v.distance), (MapType::NotSupported, 0));
    assert_eq!(v.acs_redirect, vec![bdf(A)]);
    // As client, 03:00.0 is on the b-side below the common device: it counts there too.
    assert_eq!(why(&t, B, A).acs_redirect, vec![bdf(A)]);
}

#[test]
fn allowlisted_host_bridges_allow_the_host_bridge_path() {
    let t = topo("derived-allow-skylake");
    let v = why(&t, A, RP);
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert!(v.reasons.iter().any(|r| r.contains("8086:2020") && r.contains("in the P2PDMA allowlist")));
    // Different host bridges: both must pass (00:00.0 = 8086:2020, 80:00.0 = 8086:2031).
    let v = why(&t, A, PXB);
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    let hb = v.host_bridge.unwrap();
    assert!(hb.provider_allowed && hb.client_allowed && !hb.same_host_bridge);
    // Below the common switch nothing changes.
    assert_eq!(why(&t, A, B).map_type, MapType::BusAddr);
}

#[test]
fn req_same_host_bridge_entries_refuse_different_host_bridges() {
    let t = topo("derived-allow-sandybridge");
    assert_eq!(why(&t, A, RP).map_type, MapType::ThruHostBridge, "same host bridge: allowed");
    let v = why(&t, A, PXB);
    assert_eq!(v.map_type, MapType::NotSupported, "different host bridges: refused");
    assert!(v.reasons.iter().any(|r| r.contains("only when provider and client share it")), "{:?}", v.reasons);
}

#[test]
fn allowlist_follows_the_sysroot_kernel_version() {
    // The same Skylake host bridge on a 5.4 kernel: 0x2020 entered the table later.
    let d = tempfile::tempdir().unwrap();
    let st =
        Command::new("cp").arg("-a").arg(fixture("derived-allow-skylake").join(".")).arg(d.path()).status().unwrap();
    assert!(st.success());
    fs::write(d.path().join("proc/sys/kernel/osrelease"), "5.4.0-150-generic\n").unwrap();
    let t = Topology::discover(d.path()).unwrap();
    let v = why(&t, A, RP);
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v.reasons.iter().any(|r| r.contains("allowlisted only since Linux")), "{:?}", v.reasons);
}

#[test]
fn amd_zen_cpu_allows_every_host_bridge_path() {
    let t = topo("derived-amd-zen");
    for c in [RP, PXB, "0000:00:1f.2"] {
        let v = why(&t, A, c);
        assert_eq!(v.map_type, MapType::ThruHostBridge, "{c}");
        assert!(v.host_bridge.unwrap().cpu_supports_p2pdma);
    }
    assert_eq!(why(&t, A, B).map_type, MapType::BusAddr);
}

#[test]
fn truncated_config_makes_acs_unknown_and_says_so() {
    let t = topo("derived-unprivileged");
    let v = why(&t, A, B);
    assert_eq!(v.map_type, MapType::BusAddr, "assumes no ACS, like a kernel that cannot see it");
    assert_eq!(
        v.acs_unknown,
        ["0000:03:00.0", "0000:02:00.0", "0000:01:00.0", "0000:04:00.0", "0000:02:01.0"].map(bdf).to_vec()
    );
    assert!(v.reasons.iter().any(|r| r.contains("ACS state unknown")), "{:?}", v.reasons);
    // The allowlist check still finds each host bridge device: both are devfn 00.0, which needs
    // no capability read (provider behind the pxb, so the kernel checks that host bridge first).
    let v = why(&t, PXB, A);
    assert!(v.reasons.iter().any(|r| r.contains("0000:80:00.0 [1b36:000c]")), "{:?}", v.reasons);
}

#[test]
fn iommu_fixture_keeps_switch_peers_direct_and_reports_translation() {
    let t = topo("qemu-switch-iommu");
    let v = why(&t, A, B);
    assert_eq!(v.map_type, MapType::BusAddr, "xio3130 ports have no ACS: peers stay below the switch");
    assert!(v.client_iommu.translating && v.provider_iommu.translating);
    // The root ports have ACS redirect (the kernel enables it with an IOMMU), but with no common
    // device the kernel ignores it: the host bridge rule decides.
    let v = why(&t, A, RP);
    assert!(v.acs_redirect.is_empty());
    assert_eq!(v.map_type, MapType::NotSupported);
    let rp = t.by_bdf(bdf("0000:00:01.0")).unwrap();
    assert_eq!(rp.acs().redirects(), Some(true));
}

#[test]
fn virtualization_is_detected_from_every_signal() {
    let t = topo("qemu-switch");
    let s = &t.platform.virt.signals;
    assert!(t.platform.virt.virtualized);
    for needle in ["hypervisor", "dmi sys_vendor", "QEMU TCG", "virtio", "QEMU device"] {
        assert!(s.iter().any(|x| x.contains(needle)), "{needle} missing from {s:?}");
    }
    assert!(why(&t, A, B).virtualized);
}

#[test]
fn device_tree_ranges_agree_with_bar_offsets_in_derived_offset_fixtures() {
    for name in ["derived-bus-offset-negative", "derived-bus-offset-positive"] {
        let t = topo(name);
        assert!(t.warnings.is_empty(), "{name}: {:?}", t.warnings);
        assert_eq!(t.platform.device_tree.as_ref().unwrap().pci_hosts.len(), 2);
    }
    // A ranges window that disagrees with the BARs is reported.
    let d = tempfile::tempdir().unwrap();
    let src = fixture("derived-bus-offset-negative");
    assert!(Command::new("cp").arg("-a").arg(src.join(".")).arg(d.path()).status().unwrap().success());
    let ranges = d.path().join("proc/device-tree/pci@600000000000/ranges");
    let mut b = fs::read(&ranges).unwrap();
    b[8] ^= 0x10; // pci address low cell: shift the bus side by 0x1000_0000
    fs::write(&ranges, b).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    assert!(t.warnings.iter().any(|w| w.contains("device-tree") && w.contains("ranges say")), "{:?}", t.warnings);
}

#[test]
fn committed_derived_fixtures_match_the_script() {
    let out = Command::new("python3").arg(fixture("derive.py")).arg("--check").output().expect("python3");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn node_label_needs_one_known_numa_node_across_host_bridges() {
    assert_eq!(why(&topo("derived-one-node"), A, PXB).path, PathLabel::NODE);
    assert_eq!(why(&topo("derived-two-sockets"), A, PXB).path, PathLabel::SYS);
    assert_eq!(why(&topo("qemu-switch"), A, PXB).path, PathLabel::SYS, "NUMA unknown");
    assert_eq!(why(&topo("derived-one-node"), A, RP).path, PathLabel::PHB, "one host bridge");
}

#[test]
fn an_acs_detour_keeps_the_switch_label_beside_the_path() {
    let v = why(&topo("derived-acs-switch-port"), A, B);
    assert_eq!((v.path, v.switch_path), (PathLabel::PHB, Some(PathLabel::PIX)));
    assert_eq!(why(&topo("qemu-switch"), A, B).switch_path, None);
}

#[test]
fn the_kernel_transcription_returns_facts_in_the_kernels_order() {
    let t = topo("derived-acs-common-upstream");
    let k = peermem::verdict::calc_map_type_and_dist(&t, t.idx(bdf(A)).unwrap(), t.idx(bdf(B)).unwrap());
    assert_eq!(k.map_type, MapType::NotSupported);
    assert_eq!(k.distance, 4);
    assert_eq!(k.acs_redirect.iter().map(|&i| t.device(i).bdf).collect::<Vec<_>>(), vec![bdf("0000:01:00.0")]);
    let hb = k.host_bridge.unwrap();
    assert!(!hb.cpu_supports_p2pdma && hb.same_host_bridge && hb.findings.len() == 1);
    // Bus-address pairs never reach the host-bridge rule.
    let t = topo("qemu-switch");
    let k = peermem::verdict::calc_map_type_and_dist(&t, t.idx(bdf(A)).unwrap(), t.idx(bdf(B)).unwrap());
    assert!(k.host_bridge.is_none() && k.map_type == MapType::BusAddr);
}

#[test]
fn a_partial_capture_still_gives_the_kernel_verdict() {
    let t = topo("derived-partial");
    assert_eq!(why(&t, A, B).map_type, MapType::BusAddr, "the switch ports come from the sys/devices tree");
    assert!(!t.by_bdf(bdf("0000:01:00.0")).unwrap().linked);
    assert_eq!(t.platform.kernel, None);
    assert!(t.platform.dmi_product_name.as_deref().unwrap().contains('\u{fffd}'));
    assert_eq!(t.by_bdf(bdf("0000:02:01.0")).unwrap().link.max_gts, None, "Unknown speed");
}

/// Every pair of every device (bridges included) of every fixture: the matrix's facts equal the
/// per-pair verdict's, field by field, and its on-demand verdict is the per-pair one.
#[test]
fn pair_matrix_matches_per_pair_verdicts_on_every_fixture() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"));
    let (mut fixtures, mut pairs, mut kinds) = (0, 0, std::collections::BTreeSet::new());
    for e in fs::read_dir(&dir).unwrap().flatten() {
        if !e.path().join("sys").is_dir() {
            continue;
        }
        let t = Topology::discover(e.path()).unwrap();
        let all: Vec<_> = t.indices().collect();
        let m = peermem::PairMatrix::new(&t, all.iter().copied());
        assert_eq!(m.devices(), &all[..]);
        for (i, &p) in all.iter().enumerate() {
            for (j, &c) in all.iter().enumerate() {
                let v = t.verdict(p, c);
                let f = m.facts(i, j);
                let at = format!("{}: {} -> {}", e.path().display(), v.provider, v.client);
                assert_eq!(f.map_type, v.map_type, "{at}");
                assert_eq!(f.distance, v.distance, "{at}");
                assert_eq!(f.common_upstream.map(|x| t.device(x).bdf), v.common_upstream, "{at}");
                assert_eq!(f.acs_redirects as usize, v.acs_redirect.len(), "{at}");
                assert_eq!(f.acs_unknowns as usize, v.acs_unknown.len(), "{at}");
                assert_eq!((f.path, f.switch_path), (v.path, v.switch_path), "{at}");
                assert_eq!(f.bandwidth_gbs.map(f64::to_bits), v.bandwidth_gbs.map(f64::to_bits), "{at}");
                assert_eq!(f.bottleneck, v.bottleneck, "{at}");
                kinds.insert((f.map_type.as_str(), f.path.as_str(), f.acs_redirects > 0, f.acs_unknowns > 0));
                pairs += 1;
            }
        }
        let (p, c) = (all.len() / 3, all.len() - 1);
        assert_eq!(m.verdict(p, c), t.verdict(all[p], all[c]));
        fixtures += 1;
    }
    assert!(fixtures >= 10, "{fixtures} fixtures");
    // The fixtures exercise every map type, every label and both ACS findings, so each branch
    // of the fast path was compared.
    for mt in ["bus_addr", "thru_host_bridge", "not_supported"] {
        assert!(kinds.iter().any(|k| k.0 == mt), "no {mt} pair among {pairs}");
    }
    for l in ["PIX", "PXB", "PHB", "NODE", "SYS"] {
        assert!(kinds.iter().any(|k| k.1 == l), "no {l} pair among {pairs}");
    }
    assert!(kinds.iter().any(|k| k.2) && kinds.iter().any(|k| k.3), "{kinds:?}");
}
