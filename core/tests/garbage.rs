//! Garbage in every file the topology parses gives a typed error naming that file: never a
//! panic, never a silent default. Each case corrupts one file of a copy of a captured fixture.

use std::fs;
use std::path::Path;
use std::process::Command;

use peermem::Topology;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/host-fc-amd");
const DEV: &str = "sys/devices/pci0000:00/0000:00:03.0";

fn copy_fixture() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-a").arg(format!("{FIXTURE}/.")).arg(d.path()).status().unwrap();
    assert!(st.success());
    d
}

fn expect_error_naming(root: &Path, file: &str) -> String {
    let e = Topology::discover(root).expect_err("garbage must be rejected").to_string();
    assert!(e.contains(file), "error {e:?} should name {file}");
    e
}

#[test]
fn the_untouched_copy_parses() {
    let d = copy_fixture();
    assert!(Topology::discover(d.path()).unwrap().len() >= 6);
}

#[test]
fn garbage_in_each_device_attribute_names_the_file() {
    let cases: &[(&str, &[u8])] = &[
        ("vendor", b"0xzzzz\n"),
        ("vendor", b"0x18086\n"),
        ("device", b"\n"),
        ("class", b"0x1000000\n"),
        ("subsystem_vendor", b"nope\n"),
        ("subsystem_device", b"0x\n"),
        ("revision", b"0x100\n"),
        ("resource", b"0x0 0x0\n"),
        ("resource", b"0x1000 0x0fff 0x200\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n"),
        ("resource", b"0x1000 0x1fff 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n"),
        ("config", b"\x86\x80\x00"),
        ("config", &[0u8; 100]),
        ("numa_node", b"zero\n"),
        ("current_link_speed", b"fast\n"),
        ("current_link_width", b"x16\n"),
        ("max_link_speed", b"8.0 MB/s\n"),
        ("max_link_width", b"-1\n"),
        ("p2pmem/size", b"lots\n"),
        ("p2pmem/published", b"yes\n"),
        ("vendor", b"\xff\xfe\n"),
    ];
    for (file, content) in cases {
        let d = copy_fixture();
        let p = d.path().join(DEV).join(file);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        if file.starts_with("p2pmem/") {
            fs::write(d.path().join(DEV).join("p2pmem/size"), "4096\n").unwrap();
        }
        fs::write(&p, content).unwrap();
        expect_error_naming(d.path(), &format!("0000:00:03.0/{file}"));
    }
}

#[test]
fn missing_required_files_name_the_file() {
    for file in ["vendor", "device", "class", "resource", "config"] {
        let d = copy_fixture();
        fs::remove_file(d.path().join(DEV).join(file)).unwrap();
        expect_error_naming(d.path(), &format!("0000:00:03.0/{file}"));
    }
}

#[test]
fn garbage_in_platform_files_names_the_file() {
    let d = copy_fixture();
    let cpuinfo = d.path().join("proc/cpuinfo");
    let text = fs::read_to_string(&cpuinfo).unwrap().replacen("cpu family\t: 26", "cpu family\t: twenty-six", 1);
    fs::write(&cpuinfo, text).unwrap();
    expect_error_naming(d.path(), "proc/cpuinfo");

    // An unparseable kernel release is not an error: the verdict then uses the 6.12 table and says so.
    let d = copy_fixture();
    fs::write(d.path().join("proc/sys/kernel/osrelease"), "garbage\n").unwrap();
    let t = Topology::discover(d.path()).unwrap();
    assert_eq!(t.platform.kernel, None);
}

#[test]
fn bad_links_and_names_are_layout_errors() {
    let d = copy_fixture();
    std::os::unix::fs::symlink(
        "../../../devices/pci0000:00/0000:00:09.0",
        d.path().join("sys/bus/pci/devices/not-a-bdf"),
    )
    .unwrap();
    expect_error_naming(d.path(), "not-a-bdf");

    let d = copy_fixture();
    let l = d.path().join("sys/bus/pci/devices/0000:00:03.0");
    fs::remove_file(&l).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc", &l).unwrap();
    expect_error_naming(d.path(), "0000:00:03.0");

    let d = copy_fixture();
    let l = d.path().join("sys/bus/pci/devices/0000:00:03.0");
    fs::remove_file(&l).unwrap();
    std::os::unix::fs::symlink("../../../devices/pci0000:00/0000:00:04.0", &l).unwrap();
    expect_error_naming(d.path(), "does not end in 0000:00:03.0");
}

#[test]
fn missing_root_and_non_sysroot_are_errors() {
    let e = Topology::discover("/nonexistent/peermem").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/peermem"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let e = Topology::discover(d.path()).unwrap_err().to_string();
    assert!(e.contains("sys/bus/pci/devices"), "{e}");
}
