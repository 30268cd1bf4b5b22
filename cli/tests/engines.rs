//! `export --ucx` and `export --mooncake-topo` on `fixtures/derived-gpu-nic` (GPUs and RDMA NICs
//! below switches on two NUMA nodes): rank order, ties listed together, NICs that cannot reach a
//! GPU left out, the NUMA fallback, the shell and JSON forms, Mooncake's `[preferred, available]`
//! shape; and, on a copy of the fixture with more NICs below GPU0's switch, ties and a narrower
//! path ranked after them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peermem")).arg("--root").arg(root).args(args).output().unwrap()
}

/// stdout and stderr of a run that must succeed.
fn ok(root: &Path, args: &[&str]) -> (String, String) {
    let o = run(root, args);
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(o.status.success(), "{args:?}: {err}");
    (String::from_utf8(o.stdout).unwrap(), err)
}

fn exit2(root: &Path, args: &[&str]) -> String {
    let o = run(root, args);
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    e
}

/// `NAME=VALUE` lines as pairs; every line must be one.
fn assignments(out: &str) -> Vec<(String, String)> {
    out.lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not an assignment: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn ucx_names_each_gpus_direct_nic_with_its_active_port_as_shell_assignments() {
    let root = fixture("derived-gpu-nic");
    let (out, err) = ok(&root, &["export", "--ucx"]);
    let got = assignments(&out);
    let want = [
        ("GPU0", "mlx5_0:1"),
        ("GPU1", "mlx5_1:1"),
        ("GPU2", "mlx5_1:1"),
        ("GPU3", "mlx5_0:1,mlx5_1:1"),
        ("GPU4", "mlx5_2:1"),
        ("GPU5", "mlx5_2:1"),
    ];
    let want: Vec<(String, String)> =
        want.iter().map(|(k, v)| (format!("{k}_UCX_NET_DEVICES"), v.to_string())).collect();
    assert_eq!(got, want);
    // GPU3 has no NIC below its switch, GPU4's pair is redirected by ACS: both fall back to
    // their NUMA node's NICs, and stderr says so.
    assert!(err.contains("GPU3 (0000:15:00.0): no RDMA NIC reaches its memory directly"), "{err}");
    assert!(err.contains("GPU4 (0000:83:00.0)") && err.contains("NUMA node 1"), "{err}");
    assert!(!err.contains("GPU0") && !err.contains("GPU5"), "{err}");
}

#[test]
fn ucx_output_is_what_a_shell_eval_defines() {
    let root = fixture("derived-gpu-nic");
    let (out, _) = ok(&root, &["export", "--ucx", "GPU1", "numa:0"]);
    let script = format!("{out}\nprintf '%s|%s' \"$GPU1_UCX_NET_DEVICES\" \"$NUMA0_UCX_NET_DEVICES\"");
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert_eq!(String::from_utf8(o.stdout).unwrap(), "mlx5_1:1|mlx5_0:1,mlx5_1:1");
}

#[test]
fn ucx_json_lists_the_best_nics_the_others_that_reach_and_the_unreachable_and_marks_fallbacks() {
    let root = fixture("derived-gpu-nic");
    let (out, _) = ok(&root, &["export", "--ucx", "--json", "GPU0", "0000:15:00.0", "numa:1"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let t = v["targets"].as_array().unwrap();
    assert_eq!(t.len(), 3);
    assert_eq!(t[0]["target"], "GPU0");
    assert_eq!(t[0]["bdf"], "0000:03:00.0");
    assert_eq!(t[0]["variable"], "GPU0_UCX_NET_DEVICES");
    assert_eq!(t[0]["ucx_net_devices"], "mlx5_0:1");
    assert_eq!(t[0]["fallback"], Value::Null);
    assert_eq!(t[0]["nics"][0]["name"], "mlx5_0");
    assert_eq!(t[0]["nics"][0]["tier"], "direct");
    assert_eq!(t[0]["nics"][0]["ucx"], serde_json::json!(["mlx5_0:1"]));
    assert_eq!(t[0]["nics"][0]["numa_node"], 0);
    // The NICs across the host bridge cannot take GPU0's memory: not listed, named unreachable.
    assert_eq!(t[0]["unreachable"], serde_json::json!(["mlx5_1", "mlx5_2"]));
    assert_eq!(t[0]["reaching"], serde_json::json!([]));
    assert_eq!(t[1]["target"], "GPU3");
    assert_eq!(t[1]["fallback"], "numa");
    assert_eq!(t[1]["ucx_net_devices"], "mlx5_0:1,mlx5_1:1");
    assert!(t[1]["nics"].as_array().unwrap().iter().all(|n| n["tier"] != "direct"));
    assert_eq!(t[2]["target"], "NUMA1");
    assert_eq!(t[2]["bdf"], Value::Null);
    assert_eq!(t[2]["numa_node"], 1);
    assert_eq!(t[2]["ucx_net_devices"], "mlx5_2:1");
    assert_eq!(t[2]["reaching"], serde_json::json!(["mlx5_0", "mlx5_1"]), "host memory: every NIC reaches it");
    assert!(v["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("GPU3")));
}

#[test]
fn mooncake_topo_has_cpu_and_cuda_keys_each_a_preferred_and_an_available_list() {
    let root = fixture("derived-gpu-nic");
    let (out, err) = ok(&root, &["export", "--mooncake-topo", "-"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let m = v.as_object().unwrap();
    let keys: Vec<&str> = m.keys().map(String::as_str).collect();
    assert_eq!(keys, ["cpu:0", "cpu:1", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:4", "cuda:5"]);
    for (k, e) in m {
        let e = e.as_array().unwrap_or_else(|| panic!("{k}: not an array"));
        assert_eq!(e.len(), 2, "{k}: [preferred, available]");
        assert!(e.iter().all(|l| l.as_array().unwrap().iter().all(Value::is_string)), "{k}: {e:?}");
    }
    let j = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    assert_eq!(v["cpu:0"], j(r#"[["mlx5_0", "mlx5_1"], ["mlx5_2"]]"#));
    assert_eq!(v["cpu:1"], j(r#"[["mlx5_2"], ["mlx5_0", "mlx5_1"]]"#));
    // cuda:N in bus order; NICs that cannot reach the GPU are in neither list.
    assert_eq!(v["cuda:0"], j(r#"[["mlx5_0"], []]"#));
    assert_eq!(v["cuda:1"], j(r#"[["mlx5_1"], []]"#));
    assert_eq!(v["cuda:2"], j(r#"[["mlx5_1"], []]"#));
    assert_eq!(v["cuda:3"], j("[[], []]"), "GPU3: no NIC reaches it");
    assert_eq!(v["cuda:4"], j("[[], []]"), "GPU4: ACS redirect, the kernel refuses the detour");
    assert_eq!(v["cuda:5"], j(r#"[["mlx5_2"], []]"#));
    assert!(err.contains("cuda:3 (0000:15:00.0): no RDMA NIC reaches its memory"), "{err}");
    assert!(err.contains("cuda:0: left out (cannot reach its memory): mlx5_1, mlx5_2"), "{err}");
}

#[test]
fn mooncake_topo_writes_the_file_and_reports_on_stdout() {
    let root = fixture("derived-gpu-nic");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("topo.json");
    let (out, _) = ok(&root, &["export", "--mooncake-topo", f.to_str().unwrap()]);
    assert!(out.starts_with(&format!("wrote {} (use it with MC_CUSTOM_TOPO_JSON=", f.display())), "{out}");
    assert!(out.contains("note: cuda:4"), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 8);
}

#[test]
fn a_machine_without_numa_or_nics_exports_cpu_0_with_empty_lists() {
    let root = fixture("qemu-switch");
    let (out, err) = ok(&root, &["export", "--mooncake-topo", "-"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, serde_json::json!({ "cpu:0": [[], []] }));
    assert!(err.contains("no NUMA node is known"), "{err}");
    let (out, err) = ok(&root, &["export", "--ucx"]);
    assert_eq!(out, "");
    assert!(err.contains("no GPU on this machine"), "{err}");
}

#[test]
fn bad_export_arguments_exit_2_with_one_line() {
    let root = fixture("derived-gpu-nic");
    assert!(exit2(&root, &["export"]).contains("--ucx"));
    assert!(exit2(&root, &["export", "--ucx", "numa:7"]).contains("NUMA node 7"));
    assert!(exit2(&root, &["export", "--ucx", "numa:x"]).contains("numa:x"));
    assert!(exit2(&root, &["export", "--ucx", "GPU9"]).contains("GPU9"));
    assert!(exit2(&root, &["export", "--json", "--mooncake-topo", "-"]).contains("--json goes with --ucx"));
    exit2(&root, &["export", "--ucx", "--mooncake-topo", "-"]);
    assert!(exit2(&root, &["export", "--ucx", "--map", "a=b"]).contains("go with --nccl-xml"));
    assert!(exit2(&root, &["export", "--mooncake-topo", "-", "GPU0"]).contains("devices go with --ucx"));
}

/// Copies `from` into `to`, symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

const U1: &str = "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";

fn set_link(root: &Path, dev: &str, gts: &str, width: u32) {
    std::fs::write(root.join(dev).join("current_link_speed"), format!("{gts} GT/s PCIe\n")).unwrap();
    std::fs::write(root.join(dev).join("current_link_width"), format!("{width}\n")).unwrap();
}

/// An RDMA device `name` on function `dev`, laid out as `fixtures/derive.py`'s `add_rdma` does.
fn add_rdma(root: &Path, dev: &str, name: &str) {
    let d = root.join(dev).join("infiniband").join(name);
    std::fs::create_dir_all(d.join("ports/1")).unwrap();
    let func = Path::new(dev).file_name().unwrap().to_str().unwrap();
    std::os::unix::fs::symlink(format!("../../../{func}"), d.join("device")).unwrap();
    std::fs::write(d.join("ports/1/state"), "4: ACTIVE\n").unwrap();
    std::fs::write(d.join("ports/1/rate"), "400 Gb/sec (4X NDR)\n").unwrap();
    let target = format!("../../{}/infiniband/{name}", &dev["sys/".len()..]);
    std::os::unix::fs::symlink(target, root.join("sys/class/infiniband").join(name)).unwrap();
}

/// `fixtures/derived-gpu-nic` with two more NICs below GPU0's switch: mlx5_3 on 05:00.0 as wide
/// as mlx5_0's path (every link 16 GT/s x16), mlx5_4 on 08:00.0 behind the nested switch, whose
/// links stay 2.5 GT/s x1. The directory lives as long as the guard.
fn gpu0_with_more_nics() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    copy_tree(&fixture("derived-gpu-nic"), &root);
    for dev in ["0000:02:00.0", "0000:02:01.0", "0000:02:02.0", "0000:02:02.0/0000:05:00.0"] {
        set_link(&root, &format!("{U1}/{dev}"), "16.0", 16);
    }
    add_rdma(&root, &format!("{U1}/0000:02:02.0/0000:05:00.0"), "mlx5_3");
    add_rdma(&root, &format!("{U1}/0000:02:03.0/0000:06:00.0/0000:07:00.0/0000:08:00.0"), "mlx5_4");
    (dir, root)
}

#[test]
fn equal_nics_are_listed_together_and_a_narrower_path_ranks_after_them() {
    let (_dir, root) = gpu0_with_more_nics();
    let (out, _) = ok(&root, &["export", "--ucx", "GPU0"]);
    assert_eq!(out, "GPU0_UCX_NET_DEVICES=mlx5_0:1,mlx5_3:1\n", "the tie, without the narrower NIC");
    let (out, _) = ok(&root, &["export", "--ucx", "--json", "GPU0"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let t = &v["targets"][0];
    let bw: Vec<f64> = t["nics"].as_array().unwrap().iter().map(|n| n["bandwidth_gbs"].as_f64().unwrap()).collect();
    assert!(bw.len() == 2 && bw[0] == bw[1] && bw[0] > 1.0, "{bw:?}");
    assert_eq!(t["reaching"], serde_json::json!(["mlx5_4"]), "direct, but ranked after the tie");
    let (out, _) = ok(&root, &["export", "--mooncake-topo", "-"]);
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["cuda:0"], serde_json::json!([["mlx5_0", "mlx5_3"], ["mlx5_4"]]));
}

#[test]
fn nics_ranks_every_nic_for_a_gpu_with_its_standing_and_reasons() {
    let (_dir, root) = gpu0_with_more_nics();
    let (out, _) = ok(&root, &["nics", "--json", "GPU0"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let t = &v["targets"][0];
    assert_eq!(t["target"], "GPU0");
    let nics = t["nics"].as_array().unwrap();
    let row = |n: &Value| (n["name"].as_str().unwrap().to_string(), n["standing"].as_str().unwrap().to_string());
    let rows: Vec<(String, String)> = nics.iter().map(row).collect();
    let want =
        [("mlx5_0", "best"), ("mlx5_3", "best"), ("mlx5_4", "reaching"), ("mlx5_1", "cannot"), ("mlx5_2", "cannot")];
    let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(rows, want, "every NIC once, best first, the narrower path after the tie, the far ones last");
    assert!(nics.iter().all(|n| !n["reasons"].as_array().unwrap().is_empty()), "each NIC says why");
    // The narrower NIC's bottleneck is below the tie's: the engine gives it the smaller share.
    let bw = |i: usize| nics[i]["bandwidth_gbs"].as_f64().unwrap();
    assert!(bw(2) < bw(0) && bw(0) == bw(1), "{} {} {}", bw(0), bw(1), bw(2));
    let (text, _) = ok(&root, &["nics", "GPU0"]);
    assert!(text.starts_with("GPU0 (0000:03:00.0"), "{text}");
    assert!(text.contains("1. best      mlx5_0") && text.contains("3. reaching  mlx5_4"), "{text}");
    assert!(text.contains("in proportion to bandwidth"), "{text}");
}

#[test]
fn nics_answers_for_every_gpu_by_default_and_for_a_numa_node_and_refuses_the_unknown() {
    let root = fixture("derived-gpu-nic");
    let (out, _) = ok(&root, &["nics", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let gpus: Vec<&str> = v["targets"].as_array().unwrap().iter().map(|t| t["target"].as_str().unwrap()).collect();
    assert_eq!(gpus.len(), 6, "{gpus:?}");
    // Host memory on node 1: the NIC on that node ranks first.
    let (out, _) = ok(&root, &["nics", "--json", "numa:1"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["targets"][0]["target"], "NUMA1");
    assert_eq!(v["targets"][0]["nics"][0]["name"], "mlx5_2", "the NIC on node 1 first");
    assert!(exit2(&root, &["nics", "GPU9"]).contains("GPU9"));
    assert!(exit2(&fixture("qemu-switch"), &["nics"]).contains("no GPU"));
}
