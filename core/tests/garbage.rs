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
fn a_missing_attribute_makes_that_fact_unknown_and_names_the_file() {
    for file in ["resource", "config", "numa_node"] {
        let d = copy_fixture();
        fs::remove_file(d.path().join(DEV).join(file)).unwrap();
        let t = Topology::discover(d.path()).unwrap_or_else(|e| panic!("without {file}: {e}"));
        let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
        assert!(
            dev.unknown.iter().any(|u| u.why.contains(&format!("0000:00:03.0/{file}"))),
            "{file}: {:?}",
            dev.unknown
        );
        // The other devices are untouched and the verdict still answers.
        assert!(t.by_bdf("0000:00:01.0".parse().unwrap()).unwrap().unknown.is_empty());
        let v =
            t.verdict(t.idx("0000:00:01.0".parse().unwrap()).unwrap(), t.idx("0000:00:03.0".parse().unwrap()).unwrap());
        assert!(!v.reasons.is_empty());
    }
    // A missing ID file is read from the config bytes instead: nothing is unknown.
    let want = Topology::discover(copy_fixture().path()).unwrap();
    let want = want.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
    for file in ["vendor", "device", "class"] {
        let d = copy_fixture();
        fs::remove_file(d.path().join(DEV).join(file)).unwrap();
        let t = Topology::discover(d.path()).unwrap();
        let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
        assert_eq!((dev.vendor, dev.device, dev.class), (want.vendor, want.device, want.class), "{file}");
        assert!(dev.unknown.is_empty(), "{file}: {:?}", dev.unknown);
    }
    // Without config the IDs come from the sysfs files; without both, vendor reads 0xffff and
    // both facts are listed.
    let d = copy_fixture();
    fs::remove_file(d.path().join(DEV).join("config")).unwrap();
    fs::remove_file(d.path().join(DEV).join("vendor")).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
    assert_eq!(dev.vendor, 0xffff);
    let facts: Vec<&str> = dev.unknown.iter().map(|u| u.fact).collect();
    assert!(facts.contains(&"config") && facts.contains(&"vendor"), "{facts:?}");
    assert_eq!(dev.acs().redirects(), None, "ACS unknown without config");
}

#[test]
fn hostile_files_end_in_a_named_error_in_bounded_time() {
    // A FIFO as config would block a plain open forever; a huge sparse file would exhaust memory.
    let d = copy_fixture();
    let cfg = d.path().join(DEV).join("config");
    fs::remove_file(&cfg).unwrap();
    assert!(Command::new("mkfifo").arg(&cfg).status().unwrap().success());
    let e = expect_error_naming(d.path(), "0000:00:03.0/config");
    assert!(e.contains("FIFO"), "{e}");

    let d = copy_fixture();
    let cfg = d.path().join(DEV).join("config");
    fs::File::create(&cfg).unwrap().set_len(1 << 40).unwrap();
    expect_error_naming(d.path(), "0000:00:03.0/config");

    let d = copy_fixture();
    let res = d.path().join(DEV).join("resource");
    fs::File::create(&res).unwrap().set_len(1 << 40).unwrap();
    let e = expect_error_naming(d.path(), "0000:00:03.0/resource");
    assert!(e.contains("more than"), "{e}");

    // A symlink loop as an attribute, and /dev/zero (inside the root: absent).
    let d = copy_fixture();
    let v = d.path().join(DEV).join("vendor");
    fs::remove_file(&v).unwrap();
    std::os::unix::fs::symlink("vendor", &v).unwrap();
    expect_error_naming(d.path(), "0000:00:03.0/vendor");
    let d = copy_fixture();
    let cfg = d.path().join(DEV).join("config");
    fs::remove_file(&cfg).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &cfg).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    assert!(t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap().unknown.iter().any(|u| u.fact == "config"));

    // A directory symlink loop in the sys/devices tree is not followed.
    let d = copy_fixture();
    std::os::unix::fs::symlink(".", d.path().join(DEV).join("0000:00:1f.0")).unwrap();
    assert!(Topology::discover(d.path()).is_ok());
}

#[test]
fn functions_without_a_bus_link_are_found_in_the_device_tree() {
    let d = copy_fixture();
    fs::remove_file(d.path().join("sys/bus/pci/devices/0000:00:03.0")).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
    assert!(!dev.linked);
    assert!(t.warnings.iter().any(|w| w.contains("partial capture") && w.contains("0000:00:03.0")), "{:?}", t.warnings);
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
