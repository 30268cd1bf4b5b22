//! The real-servers CLI: labels and the endpoint filter, NODE/SYS, the ACS detour cell, JSON
//! pairs against `why`, `check` exit codes, the `check --gpu-nic` gate, `fix` strings, capture
//! archives, partial captures, wide domains, pci.ids names, `why FILE`, the NCCL export (with
//! host-to-guest maps) and a closed output pipe.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(name)
}

fn cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peermem"));
    c.arg("--root").arg(root).args(args).env_remove("PEERMEM_PCI_IDS").env_remove("NO_COLOR");
    c
}

fn run(root: &Path, args: &[&str]) -> Output {
    cmd(root, args).output().unwrap()
}

fn stdout_ok(root: &Path, args: &[&str]) -> String {
    let o = run(root, args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn json(root: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&stdout_ok(root, args)).unwrap()
}

fn exit2(root: &Path, args: &[&str]) -> String {
    let o = run(root, args);
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn labels(t: &Value) -> Vec<String> {
    t["endpoints"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

#[test]
fn endpoints_are_filtered_and_labelled_in_bus_order() {
    let root = fixture("qemu-switch");
    let t = json(&root, &["topo", "--json"]);
    assert_eq!(labels(&t), ["STOR0", "NVME0", "NVME1", "NVME2", "NIC0", "NVME3"]);
    let by_label = |l: &str| t["devices"].as_array().unwrap().iter().find(|d| d["label"] == l).unwrap().clone();
    assert_eq!(by_label("NVME0")["bdf"], "0000:03:00.0");
    assert_eq!(by_label("NVME3")["bdf"], "0000:81:00.0");
    assert_eq!(by_label("NIC0")["bdf"], "0000:07:00.0");
    assert_eq!(by_label("NVME0")["vendor_name"].is_string(), Path::new("/usr/share/misc/pci.ids").exists());
    let n = json(&root, &["topo", "--json", "--class", "nvme"]);
    assert_eq!(labels(&n), ["NVME0", "NVME1", "NVME2", "NVME3"]);
    let n = json(&root, &["topo", "--json", "--class", "nic,storage"]);
    assert_eq!(labels(&n), ["STOR0", "NIC0"]);
    let all = json(&root, &["topo", "--json", "--all"]);
    assert_eq!(labels(&all).len(), t["devices"].as_array().unwrap().len());
    // Labels are stable whatever the filter.
    assert!(labels(&all).contains(&"NVME0".to_string()) && by_label("NVME0")["label"] == "NVME0");
    let text = stdout_ok(&root, &["topo", "--class", "nvme"]);
    assert!(text.lines().next().unwrap().contains("NVME0") && !text.lines().next().unwrap().contains("NIC0"), "{text}");
    assert!(text.contains("CPU Affinity") && text.contains("NUMA"));
    assert!(!text.contains('\x1b'), "no colour into a pipe");
    let e = exit2(&root, &["topo", "--class", "gpus"]);
    assert!(e.contains("gpus") && e.contains("nvme"), "{e}");
}

#[test]
fn path_labels_cover_node_and_sys() {
    let v = json(&fixture("derived-one-node"), &["why", "NVME0", "NVME3", "--json"]);
    assert_eq!(v["path"], "NODE", "different host bridges, one known NUMA node");
    let v = json(&fixture("derived-two-sockets"), &["why", "NVME0", "NVME3", "--json"]);
    assert_eq!(v["path"], "SYS", "NUMA 0 and 1");
    let v = json(&fixture("qemu-switch"), &["why", "NVME0", "NVME3", "--json"]);
    assert_eq!(v["path"], "SYS", "NUMA unknown");
    assert_eq!(json(&fixture("qemu-switch"), &["why", "NVME0", "NVME1", "--json"])["path"], "PIX");
    assert_eq!(json(&fixture("qemu-switch"), &["why", "NVME0", "NVME2", "--json"])["path"], "PHB");
    assert_eq!(json(&fixture("qemu-wide"), &["why", "0000:03:00.0", "0000:08:00.0", "--json"])["path"], "PXB");
    let t = json(&fixture("derived-one-node"), &["topo", "--json", "--class", "gpu"]);
    assert_eq!(labels(&t), ["GPU0"]);
}

#[test]
fn an_acs_detoured_switch_pair_shows_both_facts() {
    let root = fixture("derived-acs-switch-port");
    let v = json(&root, &["why", "NVME0", "NVME1", "--json"]);
    assert_eq!((v["path"].as_str(), v["switch_path"].as_str()), (Some("PHB"), Some("PIX")));
    let text = stdout_ok(&root, &["topo", "--class", "nvme"]);
    assert!(text.contains("PIX>PHB*"), "{text}");
}

#[test]
fn json_pairs_carry_the_numbers_why_gives_on_every_fixture() {
    for e in std::fs::read_dir(fixture("")).unwrap().flatten() {
        let root = e.path();
        if !root.join("sys/devices").is_dir() {
            continue;
        }
        let t = json(&root, &["topo", "--json"]);
        let pairs = t["pairs"].as_array().unwrap();
        let n = labels(&t).len();
        assert_eq!(pairs.len(), n * n.saturating_sub(1), "{root:?}");
        for p in pairs.iter().take(12) {
            let (pb, cb) = (p["provider"].as_str().unwrap(), p["client"].as_str().unwrap());
            let v = json(&root, &["why", pb, cb, "--json"]);
            for k in ["path", "map_type", "distance", "bandwidth_gbs", "acs_redirect"] {
                assert_eq!(p[k], v[k], "{root:?} {pb}->{cb} {k}");
            }
        }
    }
}

#[test]
fn check_exits_0_when_direct_1_when_not_2_on_bad_input() {
    let root = fixture("qemu-switch");
    let o = run(&root, &["check", "NVME0", "NVME1"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok "));
    let o = run(&root, &["check", "NVME0", "NVME1", "0000:03:00.0", "0000:05:00.0"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 3, "one line per pair and a summary: {out}");
    assert_eq!(run(&root, &["check", "--class", "nvme"]).status.code(), Some(1));
    exit2(&root, &["check", "NVME0"]);
    exit2(&root, &["check", "NVME0", "NVME9"]);
    exit2(Path::new("/nonexistent/peermem"), &["check"]);
    // AMD Zen: through the host bridge is allowed, so --allow-host-bridge accepts it.
    let zen = fixture("derived-amd-zen");
    assert_eq!(run(&zen, &["check", "NVME0", "NVME2"]).status.code(), Some(1));
    assert_eq!(run(&zen, &["check", "--allow-host-bridge", "NVME0", "NVME2"]).status.code(), Some(0));
}

#[test]
fn gpu_nic_gate_exits_1_naming_each_gpu_without_a_direct_nic_and_the_fix() {
    let root = fixture("derived-gpu-nic");
    let o = run(&root, &["check", "--gpu-nic"]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "{out}");
    // GPU3 has no NIC below its switch: only placement fixes it.
    assert!(out.contains("NOT   GPU3 0000:15:00.0"), "{out}");
    assert!(out.contains("no RDMA NIC shares a PCIe switch with it"), "{out}");
    // GPU4 shares a switch with mlx5_2, but ACS redirects the pair: the kernel parameter fixes it.
    assert!(out.contains("NOT   GPU4 0000:83:00.0  -> mlx5_2 (0000:85:00.0)"), "{out}");
    assert!(out.contains("ACS redirects the pair on 0000:82:00.0"), "{out}");
    assert!(out.contains("fix (kernel command line): pci=disable_acs_redir=0000:82:00.0"), "{out}");
    assert!(out.contains("ok    GPU5 0000:84:00.0  -> mlx5_2 (0000:85:00.0) direct PIX"), "{out}");
    assert!(out.ends_with("4 of 6 GPUs have a NIC that reaches their memory directly\n"), "{out}");

    let o = run(&root, &["check", "--gpu-nic", "--json", "GPU4"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let g = &v["gpus"][0];
    assert_eq!(
        (g["gpu"].as_str(), g["bdf"].as_str(), g["direct"].as_bool()),
        (Some("GPU4"), Some("0000:83:00.0"), Some(false))
    );
    assert_eq!(g["fix"], "pci=disable_acs_redir=0000:82:00.0");
    assert_eq!(g["best"]["name"], "mlx5_2");
    assert_eq!(g["best"]["tier"], "host_bridge");
    assert_eq!(g["direct_nics"], Value::Array(vec![]));
}

#[test]
fn gpu_nic_gate_exits_0_listing_each_gpus_best_nic() {
    let root = fixture("derived-gpu-nic");
    let o = run(&root, &["check", "--gpu-nic", "GPU0", "GPU1", "0000:0f:00.0", "GPU5"]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{out}");
    for line in ["ok    GPU0 0000:03:00.0  -> mlx5_0 (0000:04:00.0) direct PIX", "ok    GPU2 0000:0f:00.0  -> mlx5_1"] {
        assert!(out.contains(line), "{out}");
    }
    assert!(out.ends_with("4 of 4 GPUs have a NIC that reaches their memory directly\n"), "{out}");
    let v = json(&root, &["check", "--gpu-nic", "--json", "GPU1"]);
    assert_eq!(v["ok"], true);
    let g = &v["gpus"][0];
    assert_eq!(g["direct_nics"], serde_json::json!(["mlx5_1"]));
    assert_eq!(g["best"]["route"], "kernel_import");
    assert_eq!(g["best"]["registration"], "dma_buf_import");
    assert_eq!(g["best"]["path"], "PIX");
    assert!(g["fix"].is_null() && g["why"].is_null());
}

#[test]
fn gpu_nic_gate_refuses_what_is_not_a_gpu_and_flags_of_the_pair_check() {
    let root = fixture("derived-gpu-nic");
    assert!(exit2(&root, &["check", "--gpu-nic", "NVME0"]).contains("is not a GPU"));
    exit2(&root, &["check", "--gpu-nic", "--allow-host-bridge"]);
    exit2(&root, &["check", "--gpu-nic", "--class", "gpu"]);
    exit2(&root, &["check", "--json"]);
    // A GPU on a machine without RDMA devices has no direct NIC; no GPU is nothing to gate.
    let o = run(&fixture("derived-one-node"), &["check", "--gpu-nic"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no RDMA device on this machine"));
    let o = run(&fixture("qemu-switch"), &["check", "--gpu-nic"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "no GPU to check\n");
}

#[test]
fn fix_gives_both_command_lines_setpci_and_the_trade_off() {
    let root = fixture("derived-acs-switch-port");
    let out = stdout_ok(&root, &["fix", "NVME0", "NVME1", "NVME1", "NVME0"]);
    for want in [
        "pci=disable_acs_redir=0000:02:00.0\n",
        "pci=config_acs=x0x00xx@0000:02:00.0\n",
        "setpci -s 0000:02:00.0 ECAP0d+6.w=0000:002c\n",
        "trade-off: ",
    ] {
        assert!(out.contains(want), "{want:?} missing from {out}");
    }
    let out = stdout_ok(&root, &["fix", "NVME0", "NVME2"]);
    assert!(out.contains("refuses the host bridge path") && !out.contains("setpci"), "{out}");
    let out = stdout_ok(&fixture("qemu-switch"), &["fix", "NVME0", "NVME1"]);
    assert!(out.contains("nothing to fix"), "{out}");
}

#[test]
fn capture_archives_replay_like_the_directory_and_bad_ones_are_refused() {
    let root = fixture("qemu-switch");
    let d = tempfile::tempdir().unwrap();
    let mut want = json(&root, &["topo", "--json"]);
    want["root"] = Value::Null;
    for name in ["cap.tar", "cap.tar.gz", "cap.tar.bz2", "cap.tar.xz"] {
        let a = d.path().join(name);
        stdout_ok(&root, &["capture", "--archive", a.to_str().unwrap()]);
        let mut got = json(&a, &["topo", "--json"]);
        got["root"] = Value::Null;
        assert_eq!(got, want, "{name}");
        let e = exit2(&root, &["capture", "--archive", a.to_str().unwrap()]);
        assert!(e.contains("exists"), "{e}");
    }
    let e = exit2(&root, &["capture", "--archive", d.path().join("cap.zip").to_str().unwrap()]);
    assert!(e.contains(".tar.gz"), "{e}");
    let bad = d.path().join("bad.tar.gz");
    std::fs::write(&bad, b"\x1f\x8bnot gzip").unwrap();
    let e = exit2(&bad, &["topo"]);
    assert!(e.contains("bad.tar.gz"), "{e}");
    let text = d.path().join("notes.txt");
    std::fs::write(&text, "not a capture\n").unwrap();
    let e = exit2(&text, &["topo"]);
    assert!(e.contains("notes.txt") && e.contains("not a capture archive"), "{e}");
    let e = exit2(&root, &[]);
    assert!(e.contains("a command is needed"), "{e}");
}

#[test]
fn a_partial_capture_loads_with_unknowns_named() {
    let root = fixture("derived-partial");
    let t = json(&root, &["topo", "--json", "--all"]);
    let dev = |b: &str| t["devices"].as_array().unwrap().iter().find(|d| d["bdf"] == b).unwrap().clone();
    assert_eq!(dev("0000:01:00.0")["in_bus_pci_devices"], false);
    assert_eq!(dev("0000:03:00.0")["upstream"], "0000:02:00.0", "the chain comes from the sys/devices tree");
    let facts = |b: &str| -> Vec<String> {
        dev(b)["unknown"].as_array().unwrap().iter().map(|u| u["fact"].as_str().unwrap().to_string()).collect()
    };
    assert!(facts("0000:05:00.0").contains(&"config".to_string()));
    assert!(facts("0000:07:00.0").contains(&"resource".to_string()));
    assert!(facts("0000:04:00.0").contains(&"link".to_string()));
    assert!(t["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("osrelease")));
    assert_eq!(json(&root, &["why", "NVME0", "NVME1", "--json"])["map_type"], "bus_addr");
    let v = json(&root, &["why", "NVME2", "NVME2", "--json"]);
    assert!(v["acs_unknown"].as_array().unwrap().iter().any(|b| b == "0000:05:00.0"), "{v}");
}

#[test]
fn wide_domains_load_and_show_the_domain() {
    let root = fixture("derived-wide-domain");
    let t = json(&root, &["topo", "--json"]);
    assert!(t["devices"].as_array().unwrap().iter().any(|d| d["bdf"] == "10000:81:00.0"));
    let v = json(&root, &["why", "0000:03:00.0", "10000:81:00.0", "--json"]);
    assert_eq!((v["client"].as_str(), v["path"].as_str()), (Some("10000:81:00.0"), Some("SYS")));
    let text = stdout_ok(&root, &["topo"]);
    assert!(text.contains("10000:81:00.0") && text.contains("0000:03:00.0"), "two domains: full addresses\n{text}");
    let text = stdout_ok(&fixture("qemu-switch"), &["topo"]);
    assert!(!text.contains("0000:03:00.0") && text.contains("03:00.0"), "one domain: short addresses");
}

#[test]
fn names_come_from_the_pci_ids_named_by_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let ids = d.path().join("pci.ids");
    std::fs::write(&ids, "1b36  Test Vendor\n\t0010  Test NVMe\n").unwrap();
    let root = fixture("qemu-switch");
    let out = cmd(&root, &["topo", "--json"]).env("PEERMEM_PCI_IDS", &ids).output().unwrap();
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nvme = t["devices"].as_array().unwrap().iter().find(|d| d["label"] == "NVME0").unwrap();
    assert_eq!((nvme["vendor_name"].as_str(), nvme["device_name"].as_str()), (Some("Test Vendor"), Some("Test NVMe")));
    let nic = t["devices"].as_array().unwrap().iter().find(|d| d["label"] == "NIC0").unwrap();
    assert!(nic["vendor_name"].is_null(), "not in that file: hex only");
    let o = cmd(&root, &["topo"]).env("PEERMEM_PCI_IDS", "/nonexistent/pci.ids").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/pci.ids"));
}

#[test]
fn why_takes_files_and_block_devices() {
    // This machine: its root filesystem's function, or a one-line reason why not.
    let o = run(Path::new("/"), &["why", "/", "/"]);
    assert!(o.status.code() == Some(0) || o.status.code() == Some(2), "{o:?}");
    if o.status.success() {
        assert!(String::from_utf8_lossy(&o.stdout).contains("distance 0"));
    }
    let e = exit2(Path::new("/"), &["why", "/proc/self/status", "/"]);
    assert!(e.contains("proc filesystem"), "{e}");
    let e = exit2(Path::new("/"), &["why", "/nonexistent/file", "/"]);
    assert!(e.contains("/nonexistent/file"), "{e}");
}

#[test]
fn nccl_export_writes_a_topology_file() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("topo.xml");
    stdout_ok(&fixture("qemu-switch"), &["export", "--nccl-xml", f.to_str().unwrap()]);
    let xml = std::fs::read_to_string(&f).unwrap();
    assert!(xml.starts_with("<system version=\"1\""), "{xml}");
    assert!(xml.contains("busid=\"0000:07:00.0\""), "{xml}");
    let out = stdout_ok(&fixture("qemu-switch"), &["export", "--nccl-xml", "-"]);
    assert_eq!(out, xml);
    exit2(&fixture("qemu-switch"), &["export", "--nccl-xml", "/nonexistent/dir/topo.xml"]);
}

#[test]
fn nccl_export_maps_host_ids_for_a_guest_and_reports_on_stderr_when_the_xml_is_on_stdout() {
    let root = fixture("derived-gpu-nic");
    let d = tempfile::tempdir().unwrap();
    let map = d.path().join("vm.map");
    std::fs::write(&map, "# host guest\n0000:03:00.0 0000:00:05.0\n0000:04:00.0=0000:00:06.0\n").unwrap();
    let o = run(&root, &["export", "--nccl-xml", "-", "--map-file", map.to_str().unwrap(), "--map", "mlx5_0=mlx5_4"]);
    assert!(o.status.success());
    let xml = String::from_utf8(o.stdout).unwrap();
    assert!(xml.starts_with("<system version=\"1\"") && xml.ends_with("</system>\n"), "only XML on stdout");
    assert!(xml.contains("<pci busid=\"0000:00:05.0\" class=\"0x030200\""), "{xml}");
    assert!(xml.contains("<pci busid=\"0000:00:06.0\" class=\"0x020700\""), "{xml}");
    assert!(xml.contains("<net name=\"mlx5_4\""), "{xml}");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("elements of NCCL's 256, 20 kept free for what NCCL adds at run time"), "{err}");
    // Bad entries and unknown hosts: one line naming the entry.
    std::fs::write(&map, "0000:03:00.0 0000:00:05.0\n0000:42:00.0 0000:00:07.0\n").unwrap();
    let e = exit2(&root, &["export", "--nccl-xml", "-", "--map-file", map.to_str().unwrap()]);
    assert!(e.contains("vm.map:2: 0000:42:00.0 is not a PCI function"), "{e}");
    assert!(exit2(&root, &["export", "--nccl-xml", "-", "--map", "0000:03:00.0"]).contains("expected HOST=GUEST"));
    exit2(&root, &["export", "--nccl-xml", "-", "--map-file", d.path().to_str().unwrap()]);
}

#[test]
fn nccl_export_of_a_root_with_a_long_non_ascii_path_stays_within_nccls_value_length() {
    let d = tempfile::tempdir().unwrap();
    let deep = d.path().join("ü".repeat(60)).join("ø".repeat(60)).join("é".repeat(60));
    std::fs::create_dir_all(&deep).unwrap();
    let st = Command::new("cp").arg("-a").arg(fixture("qemu-switch").join(".")).arg(&deep).status().unwrap();
    assert!(st.success());
    let xml = stdout_ok(&deep, &["export", "--nccl-xml", "-"]);
    let name = xml.split("name=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(name.len() <= 253 && name.starts_with("peermem /"), "{} bytes: {name}", name.len());
}

#[test]
fn a_closed_output_pipe_ends_quietly() {
    let mut child =
        cmd(&fixture("qemu-wide"), &["topo", "--all"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?} {err}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn this_machine_answers() {
    let out = stdout_ok(Path::new("/"), &["topo"]);
    assert!(out.contains("Legend"));
    let t = json(Path::new("/"), &["topo", "--json", "--all"]);
    assert!(!t["devices"].as_array().unwrap().is_empty());
    let o = run(Path::new("/"), &["check"]);
    assert!(matches!(o.status.code(), Some(0) | Some(1)), "{o:?}");
}

#[test]
fn probe_refuses_a_capture() {
    let e = exit2(&fixture("qemu-switch"), &["probe", "NVME0", "NVME1"]);
    assert!(e.contains("live system"), "{e}");
}

#[test]
fn this_machine_replays_from_its_own_capture_archive() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("me.tar.xz");
    stdout_ok(Path::new("/"), &["capture", "--archive", a.to_str().unwrap()]);
    let live = json(Path::new("/"), &["topo", "--json", "--all"]);
    let replay = json(&a, &["topo", "--json", "--all"]);
    let ids = |t: &Value| -> Vec<(Value, Value, Value)> {
        t["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["bdf"].clone(), d["label"].clone(), d["upstream"].clone()))
            .collect()
    };
    assert_eq!(ids(&live), ids(&replay));
    assert_eq!(live["pairs"], replay["pairs"]);
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    // util-linux `script` gives the command a pseudo-terminal as stdout.
    let on_tty = |no_color: Option<&str>| -> String {
        let line =
            format!("{} --root {} topo --class nvme", env!("CARGO_BIN_EXE_peermem"), fixture("qemu-switch").display());
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"]).env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let o = c.output().expect("util-linux script");
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let tty = on_tty(None);
    assert!(tty.contains("\x1b[32m") && tty.contains("\x1b[31m"), "{tty}");
    assert!(!on_tty(Some("1")).contains('\x1b'));
    assert!(!stdout_ok(&fixture("qemu-switch"), &["topo", "--class", "nvme"]).contains('\x1b'));
}
