//! The CLI contract, held on captured and derived fixtures: JSON shapes, exit codes and one-line
//! errors, labels and filters, check/fix, archives, partial captures and wide domains.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"))
}

fn peermem(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peermem")).arg("--root").arg(root).args(args).output().unwrap()
}

fn json_ok(root: &Path, args: &[&str]) -> Value {
    let o = peermem(root, args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn one_line_error(root: &Path, args: &[&str]) -> String {
    let o = peermem(root, args);
    assert_eq!(o.status.code(), Some(2), "{args:?} should fail with exit 2: {}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(e.trim_end().lines().count(), 1, "one line expected: {e:?}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn is_hex(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.starts_with("0x") && u64::from_str_radix(&s[2..], 16).is_ok())
}

/// Every committed fixture (captured or derived).
fn all_fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("sys/devices").is_dir())
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn topo_json_has_the_documented_shape_on_every_fixture() {
    for root in all_fixtures() {
        let t = json_ok(&root, &["topo", "--json"]);
        assert!(t["virtualized"].is_boolean());
        let devs = t["devices"].as_array().unwrap();
        assert!(!devs.is_empty());
        for d in devs {
            let bdf = d["bdf"].as_str().unwrap();
            assert!(bdf.len() >= 12 && bdf.parse::<peermem::Bdf>().is_ok(), "{bdf}");
            assert!(d["label"].is_string() && d["vendor_name"].is_string() | d["vendor_name"].is_null());
            assert!(d["device_name"].is_string() || d["device_name"].is_null());
            for k in ["vendor", "device", "class"] {
                assert!(is_hex(&d[k]), "{root:?} {bdf} {k}: {}", d[k]);
            }
            assert_eq!(d["class"].as_str().unwrap().len(), 8);
            assert!(d["upstream"].is_null() || d["upstream"].as_str().unwrap().len() >= 12);
            assert!(d["host_bridge"].as_str().unwrap().starts_with("pci"));
            for b in d["bars"].as_array().unwrap() {
                assert!(b["index"].as_u64().unwrap() <= 5);
                assert!(is_hex(&b["cpu_start"]) && is_hex(&b["len"]));
                assert!(b["bus_start"].is_null() || is_hex(&b["bus_start"]));
                assert!(b["is64"].is_boolean() && b["prefetchable"].is_boolean());
            }
        }
        // The text matrix answers too.
        let o = peermem(&root, &["topo"]);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Legend"));
    }
}

#[test]
fn why_and_route_answer_for_every_endpoint_pair_of_every_fixture() {
    for root in all_fixtures() {
        let t = json_ok(&root, &["topo", "--json"]);
        let devs = t["devices"].as_array().unwrap();
        let with_bar: Vec<&Value> = devs.iter().filter(|d| !d["bars"].as_array().unwrap().is_empty()).collect();
        for p in &with_bar {
            for c in devs.iter().take(8) {
                let (pb, cb) = (p["bdf"].as_str().unwrap(), c["bdf"].as_str().unwrap());
                let v = json_ok(&root, &["why", pb, cb, "--json"]);
                assert_eq!(v["provider"], pb);
                assert_eq!(v["client"], cb);
                assert!(["bus_addr", "thru_host_bridge", "not_supported"].contains(&v["map_type"].as_str().unwrap()));
                assert!(v["distance"].is_u64());
                assert!(v["acs_redirect"].is_array());
                assert!(["PIX", "PXB", "PHB", "NODE", "SYS"].contains(&v["path"].as_str().unwrap()));
                assert!(!v["reasons"].as_array().unwrap().is_empty());

                let bar = &p["bars"][0];
                let idx = bar["index"].as_u64().unwrap().to_string();
                let r = json_ok(&root, &["route", pb, &idx, "0x10", cb, "--json"]);
                let kind = r["route"].as_str().unwrap();
                let cpu = u64::from_str_radix(&bar["cpu_start"].as_str().unwrap()[2..], 16).unwrap() + 0x10;
                assert_eq!(r["cpu_address"], format!("{cpu:#x}"));
                assert_eq!(r["map_type"], v["map_type"]);
                match kind {
                    "bus_addr" => assert_eq!(r["dma_address"], r["bus_address"]),
                    "host_bridge" => assert_eq!(r["dma_address"], r["cpu_address"]),
                    "iommu" | "bounce" => assert!(r["dma_address"].is_null()),
                    other => panic!("unexpected route {other}"),
                }
            }
        }
    }
}

#[test]
fn host_fixture_routes_through_the_host_bridge_on_amd_zen() {
    let root = fixtures().join("host-fc-amd");
    let v = json_ok(&root, &["why", "0000:00:01.0", "0000:00:03.0", "--json"]);
    assert_eq!(v["map_type"], "thru_host_bridge");
    assert_eq!(v["distance"], 2);
    assert_eq!(v["path"], "PHB");
    assert_eq!(v["virtualized"], true);
    let r = json_ok(&root, &["route", "0000:00:01.0", "0", "4096", "0000:00:03.0", "--json"]);
    assert_eq!(r["route"], "host_bridge");
    assert_eq!(r["dma_address"], "0x4000001000");
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let root = fixtures().join("host-fc-amd");
    let e = one_line_error(&root, &["why", "0000:00:01.0", "0000:09:00.0"]);
    assert!(e.contains("0000:09:00.0"), "{e}");
    let e = one_line_error(&root, &["why", "0000:00:01.0", "garbage"]);
    assert!(e.contains("garbage"), "{e}");
    let e = one_line_error(Path::new("/nonexistent/peermem"), &["topo"]);
    assert!(e.contains("/nonexistent/peermem"), "{e}");
    let e = one_line_error(&root, &["route", "0000:00:01.0", "0", "0x80000", "0000:00:03.0"]);
    assert!(e.contains("past the end"), "{e}");
    let e = one_line_error(&root, &["route", "0000:00:01.0", "2", "0", "0000:00:03.0"]);
    assert!(e.contains("no BAR2"), "{e}");
    let e = one_line_error(&root, &["route", "0000:00:01.0", "6", "0", "0000:00:03.0"]);
    assert!(e.contains("0-5"), "{e}");
    let e = one_line_error(&root, &["route", "0000:00:01.0", "0", "12abc", "0000:00:03.0"]);
    assert!(e.contains("12abc"), "{e}");
}

#[test]
fn capture_of_a_capture_reads_the_same() {
    let root = fixtures().join("host-fc-amd");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("cap");
    let o = peermem(&root, &["capture", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut a = json_ok(&root, &["topo", "--json"]);
    let mut b = json_ok(&out, &["topo", "--json"]);
    a["root"] = Value::Null;
    b["root"] = Value::Null;
    assert_eq!(a, b);
    // Refuses to write into a non-empty directory.
    one_line_error(&root, &["capture", out.to_str().unwrap()]);
}

/// `qemu-switch` plus two RDMA devices: a PCI one on 0000:04:00.0 (below the switch, next to the
/// NVMe at 03:00.0) and rxe0 on eth0.
fn switch_with_nics() -> tempfile::TempDir {
    use std::os::unix::fs::symlink;
    let t = tempfile::tempdir().unwrap();
    let ok = Command::new("cp").arg("-a").arg(fixtures().join("qemu-switch/.")).arg(t.path()).status().unwrap();
    assert!(ok.success());
    let r = t.path();
    let pci = r.join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0");
    assert!(pci.is_dir(), "fixture layout: {}", pci.display());
    std::fs::create_dir_all(pci.join("infiniband/mlx5_0")).unwrap();
    symlink("../../../0000:04:00.0", pci.join("infiniband/mlx5_0/device")).unwrap();
    let virt = r.join("sys/devices/virtual/infiniband/rxe0");
    std::fs::create_dir_all(&virt).unwrap();
    std::fs::write(virt.join("parent"), "eth0\n").unwrap();
    let class = r.join("sys/class/infiniband");
    std::fs::create_dir_all(&class).unwrap();
    symlink(
        "../../devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0/infiniband/mlx5_0",
        class.join("mlx5_0"),
    )
    .unwrap();
    symlink("../../devices/virtual/infiniband/rxe0", class.join("rxe0")).unwrap();
    t
}

#[test]
fn topo_ranks_nics_by_what_registration_does_so_a_raw_bar_is_never_direct() {
    let t = switch_with_nics();
    let v = json_ok(t.path(), &["topo", "--json"]);
    let rows = v["nic_affinity"].as_array().expect("nic_affinity");
    let nvme = rows.iter().find(|r| r["bdf"] == "0000:03:00.0").expect("the NVMe below the switch");
    let nics = nvme["nics"].as_array().unwrap();
    // Below the same switch (route bus_addr), but a NIC cannot register a raw BAR: it bounces.
    assert_eq!(nics[0]["name"], "mlx5_0");
    assert_eq!(nics[0]["tier"], "host_bridge");
    assert_eq!(nics[0]["route"], "bus_addr");
    assert_eq!(nics[0]["registration"], "bounce");
    let why = nics[0]["reasons"].to_string();
    assert!(why.contains("registration bounces"), "{why}");
    assert_eq!(nics[1]["name"], "rxe0");
    assert_eq!(nics[1]["tier"], "software");
    assert!(rows.iter().all(|r| r["bdf"] != "0000:04:00.0"), "the NIC itself is not ranked for");
    assert!(rows.iter().flat_map(|r| r["nics"].as_array().unwrap()).all(|n| n["tier"] != "direct"));
    let far = rows.iter().find(|r| r["bdf"] == "0000:81:00.0").unwrap();
    assert_eq!(far["nics"][0]["tier"], "far");
    let o = peermem(t.path(), &["topo"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("NIC affinity"), "{text}");
    assert!(text.contains("mlx5_0 (host_bridge, route bus_addr, bounce)"), "{text}");
    assert!(text.contains("how: registration bounces"), "{text}");
}

#[test]
fn topo_without_rdma_devices_has_no_nic_section() {
    let v = json_ok(&fixtures().join("qemu-switch"), &["topo", "--json"]);
    assert_eq!(v["nic_affinity"], Value::Array(vec![]));
}
