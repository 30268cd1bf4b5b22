//! `peermem load`: the loader from the shell, on files in a tempdir, into host memory and lavapipe
//! Vulkan buffers; JSON fields, exit codes and one-line errors.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn peermem(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    Command::new(env!("CARGO_BIN_EXE_peermem")).arg("--root").arg(root).arg("load").args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn vulkan_skipped() -> bool {
    std::env::var("PEERMEM_SKIP_VULKAN").as_deref() == Ok("1")
}

#[test]
fn load_reports_bytes_rate_route_method_and_verification_as_json() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.bin");
    std::fs::write(&p, (0..3_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let q = d.path().join("b.bin");
    std::fs::write(&q, vec![9u8; 1 << 20]).unwrap();
    let (ps, qs) = (p.to_str().unwrap(), q.to_str().unwrap());
    let v = json(&peermem(&[ps, qs, "--json", "--verify", "--chunk", "256K", "--depth", "4"]));
    assert_eq!(v["bytes"], 3_000_000 + (1 << 20));
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    assert!(v["mb_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["route"], "cpu_mapped");
    assert_eq!(v["method"], "direct");
    assert_eq!(v["verified"], true);
    assert_eq!((v["chunk"].as_u64(), v["depth"].as_u64()), (Some(256 << 10), Some(4)));
    let v = json(&peermem(&[ps, "--json", "--offset", "4096", "--len", "8192"]));
    assert_eq!((v["bytes"].as_u64(), v["verified"].is_null()), (Some(8192), true));
    if !vulkan_skipped() {
        let v = json(&peermem(&[ps, "--json", "--dest", "vulkan"]));
        assert_eq!(v["method"], "direct");
        let v = json(&peermem(&[ps, "--json", "--dest", "vulkan-device", "--verify"]));
        assert_eq!((v["method"].as_str(), v["verified"].as_bool()), (Some("staged-gpu-copy"), Some(true)));
    }
    // Text output names the route and the rate.
    let o = peermem(&[ps]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("route:") && text.contains("MB/s"), "{text}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.bin");
    std::fs::write(&p, vec![1u8; 10_000]).unwrap();
    let ps = p.to_str().unwrap();
    let missing = d.path().join("missing");
    for args in [
        vec![missing.to_str().unwrap()],
        vec![ps, "--dest", "gpu"],
        vec![ps, "--dest", "bar:0000:01:00.0:9"],
        vec![ps, "--dest", "p2pmem:zz"],
        vec![ps, "--dest", "cuda:x"],
        vec![ps, "--offset", "10000"],
        vec![ps, "--len", "10001"],
        vec![ps, "--depth", "0"],
        vec![ps, "--chunk", "lots"],
        vec![ps, "--io", "bogus"],
        vec!["/dev/zero"],
        vec![d.path().to_str().unwrap()],
    ] {
        let o = peermem(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
    // Strict: a misaligned range cannot go direct (exit 1: the machine's answer, not a typo).
    let o = peermem(&[ps, "--strict", "--offset", "5", "--len", "100"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("strict"), "{}", stderr(&o));
}

/// `--io` picks how files are read; the report says which mode ran, per file, and why. Through
/// the page cache an unaligned range lands direct (nothing staged), and strict allows it.
#[test]
fn load_reads_files_as_io_says_and_reports_the_mode_and_why() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.bin");
    std::fs::write(&p, (0..300_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>()).unwrap();
    let ps = p.to_str().unwrap();
    let v = json(&peermem(&[ps, "--json", "--io", "buffered", "--offset", "5", "--len", "100000", "--strict"]));
    assert_eq!((v["method"].as_str(), v["direct"].as_bool()), (Some("direct"), Some(true)));
    assert_eq!(v["dests"][0]["bytes_staged"], 0, "{v}");
    assert!(v["dests"][0]["io"].as_str().unwrap().starts_with("buffered: asked for"), "{v}");
    let io = v["io"].as_array().unwrap();
    assert!(io.len() == 1 && io[0].as_str().unwrap().starts_with(&format!("{ps}: buffered:")), "{v}");
    assert!(v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r.as_str().unwrap().starts_with("read through the page cache")));
    let v = json(&peermem(&[ps, "--json", "--io", "direct"]));
    assert!(v["dests"][0]["io"].as_str().unwrap().starts_with("O_DIRECT: asked for"), "{v}");
    assert!(v["requests"].as_u64().unwrap() >= 1, "{v}");
    // Auto on a file just written (cached): through the page cache, saying so.
    let v = json(&peermem(&[ps, "--json"]));
    assert!(v["dests"][0]["io"].as_str().unwrap().contains("already in the page cache"), "{v}");
    // The text report names the mode too.
    let o = peermem(&[ps, "--io", "buffered"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("io:       buffered: asked for"), "{text}");
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.bin");
    std::fs::write(&p, vec![1u8; 100_000]).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    let mut c = Command::new(env!("CARGO_BIN_EXE_peermem"))
        .arg("--root")
        .arg(root)
        .args(["load", p.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// `--dest cuda[:N]`: CUDA memory, filled through cuFile (GPUDirect Storage) or pinned staging,
/// the JSON's `cufile` saying which and why. Without a CUDA driver: exit 1, the driver's absence
/// in one line.
#[test]
fn load_into_cuda_memory_says_whether_cufile_read_it_or_why_the_driver_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.bin");
    std::fs::write(&p, (0..2_000_000u32).map(|i| (i % 247) as u8).collect::<Vec<u8>>()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_peermem"))
        .args(["load", p.to_str().unwrap(), "--dest", "cuda", "--json", "--verify"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if o.status.code() == Some(1) && stderr(&o).contains("libcuda.so.1 not found") {
        assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
        eprintln!("no CUDA driver: skipped the load ({})", stderr(&o).trim_end());
        return;
    }
    let v = json(&o);
    let cufile = v["cufile"].as_str().unwrap();
    match v["method"].as_str().unwrap() {
        "gds" => assert!(cufile.starts_with("cufile: taken"), "{v}"),
        "staged-gpu-copy" => assert!(cufile.starts_with("cufile: not taken: "), "{v}"),
        m => panic!("{m}: {v}"),
    }
    assert_eq!(v["verified"], true, "{v}");
    eprintln!("{}: {cufile}", v["method"]);
}
