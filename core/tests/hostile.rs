//! Hostile sysroots: every case ends in bounded time and memory with a typed error that names
//! the file (or, for a file that is merely absent or unreadable, an unknown fact naming it).
//! Never a hang, a panic, an unbounded read or a read outside the root. Each case corrupts one
//! file of a copy of a captured fixture; the last test generates 1,000 and 10,000 devices and
//! reports discovery time and peak memory.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use peermem::{Peer, PeerMemory, Registry, Topology, TopologyError};

const HOST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/host-fc-amd");
const SWITCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/qemu-switch");
const DEV: &str = "sys/devices/pci0000:00/0000:00:03.0";

fn copy(fixture: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-a").arg(format!("{fixture}/.")).arg(d.path()).status().unwrap();
    assert!(st.success());
    d
}

/// Replaces `rel` (file, link or directory) of the copy with what `make` creates there.
fn replace(root: &Path, rel: &str, make: impl FnOnce(&Path)) {
    let p = root.join(rel);
    if p.is_dir() && !p.is_symlink() {
        fs::remove_dir_all(&p).unwrap();
    } else if p.symlink_metadata().is_ok() {
        fs::remove_file(&p).unwrap();
    }
    make(&p);
}

fn error_naming(root: &Path, file: &str) -> String {
    let e = Topology::discover(root).expect_err("a hostile file must be refused").to_string();
    assert!(e.contains(file), "error {e:?} should name {file}");
    e
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

#[test]
fn fifos_where_files_belong_are_refused_not_waited_on() {
    for rel in [format!("{DEV}/config"), format!("{DEV}/resource"), format!("{DEV}/vendor"), "proc/cpuinfo".into()] {
        let d = copy(HOST);
        replace(d.path(), &rel, mkfifo);
        let e = error_naming(d.path(), &rel);
        assert!(e.contains("FIFO"), "{e}");
    }
}

#[test]
fn directories_where_files_belong_are_refused() {
    for rel in [format!("{DEV}/config"), format!("{DEV}/resource"), format!("{DEV}/class"), "proc/cpuinfo".into()] {
        let d = copy(HOST);
        replace(d.path(), &rel, |p| fs::create_dir(p).unwrap());
        let e = error_naming(d.path(), &rel);
        assert!(e.contains("directory"), "{e}");
    }
}

#[test]
fn device_nodes_and_sockets_are_refused() {
    // /dev/zero's own device node, made inside the root (needs CAP_MKNOD: skipped without it).
    let d = copy(HOST);
    let rel = format!("{DEV}/config");
    replace(d.path(), &rel, |p| {
        let _ = Command::new("mknod").arg(p).args(["c", "1", "5"]).status();
    });
    if d.path().join(&rel).exists() {
        let e = error_naming(d.path(), &rel);
        assert!(e.contains("character device"), "{e}");
    }
    // A socket cannot be opened for reading at all: a named error, not an unknown fact.
    let d = copy(HOST);
    let rel = format!("{DEV}/numa_node");
    replace(d.path(), &rel, |p| drop(std::os::unix::net::UnixListener::bind(p).unwrap()));
    error_naming(d.path(), &rel);
}

#[test]
fn links_to_dev_zero_or_out_of_the_root_stay_inside_it() {
    // Absolute and climbing links resolve inside the root, where these files do not exist: the
    // fact becomes unknown (naming the file); nothing of the host is read.
    for target in ["/dev/zero", "../../../../../../../../../../../../etc/passwd", "/proc/self/mem"] {
        let d = copy(HOST);
        replace(d.path(), &format!("{DEV}/config"), |p| symlink(target, p).unwrap());
        let t = Topology::discover(d.path()).unwrap_or_else(|e| panic!("{target}: {e}"));
        let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
        assert!(dev.unknown.iter().any(|u| u.fact == "config" && u.why.contains("0000:00:03.0/config")), "{target}");
    }
    // A link loop and a link to a directory loop.
    let d = copy(HOST);
    replace(d.path(), &format!("{DEV}/resource"), |p| symlink("resource", p).unwrap());
    error_naming(d.path(), "0000:00:03.0/resource");
    let d = copy(HOST);
    replace(d.path(), &format!("{DEV}/class"), |p| symlink("../0000:00:03.0/class/x", p).unwrap());
    error_naming(d.path(), "0000:00:03.0/class");
}

#[test]
fn oversized_attributes_are_refused_at_the_cap() {
    // A huge sparse file (1 TiB: reading it would take hours) and a million-line resource.
    let d = copy(HOST);
    replace(d.path(), &format!("{DEV}/config"), |p| fs::File::create(p).unwrap().set_len(1 << 40).unwrap());
    error_naming(d.path(), "0000:00:03.0/config");
    let d = copy(HOST);
    replace(d.path(), &format!("{DEV}/resource"), |p| fs::write(p, "0x0 0x0 0x0\n".repeat(1_000_000)).unwrap());
    let e = error_naming(d.path(), "0000:00:03.0/resource");
    assert!(e.contains("more than"), "{e}");
    let d = copy(HOST);
    replace(d.path(), "proc/cpuinfo", |p| fs::File::create(p).unwrap().set_len(1 << 40).unwrap());
    error_naming(d.path(), "proc/cpuinfo");
}

#[test]
fn non_utf8_attributes_name_the_file() {
    for (rel, bytes) in [
        (format!("{DEV}/resource"), &b"0x0 0x0 0x0\n\xff\xfe\n"[..]),
        (format!("{DEV}/numa_node"), b"\xc3\x28\n"),
        ("proc/cpuinfo".to_string(), b"vendor_id\t: Authentic\xffAMD\n"),
    ] {
        let d = copy(HOST);
        replace(d.path(), &rel, |p| fs::write(p, bytes).unwrap());
        let e = error_naming(d.path(), &rel);
        assert!(e.contains("UTF-8"), "{e}");
    }
}

#[test]
fn unreadable_attributes_become_unknown_facts() {
    // Root reads mode-000 files (then the device reads as usual); any other user gets EACCES, and
    // the fact becomes unknown, naming the file. Sockets (unopenable even for root) are above.
    let want = Topology::discover(HOST).unwrap();
    let want = want.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
    let d = copy(HOST);
    let p = d.path().join(DEV).join("resource");
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    let dev = t.by_bdf("0000:00:03.0".parse().unwrap()).unwrap();
    if fs::read(&p).is_err() {
        assert!(dev.unknown.iter().any(|u| u.why.contains("0000:00:03.0/resource")), "{:?}", dev.unknown);
        assert!(dev.bars.is_empty());
    } else {
        assert_eq!(dev.bars, want.bars, "readable (as root): read as usual");
    }
}

#[test]
fn a_physfn_link_that_makes_the_upstream_walk_cycle_is_refused() {
    // The switch's upstream port 01:00.0 claims to be a VF of its own descendant 03:00.0: the
    // walk 03:00.0 -> 02:00.0 -> 01:00.0 -> (physfn 03:00.0) -> ... would never end.
    let d = copy(SWITCH);
    let port = "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";
    symlink("0000:02:00.0/0000:03:00.0", d.path().join(port).join("physfn")).unwrap();
    let e = Topology::discover(d.path()).unwrap_err();
    assert!(matches!(e, TopologyError::Layout { .. }), "{e}");
    assert!(e.to_string().contains("0000:01:00.0/physfn") && e.to_string().contains("cycle"), "{e}");
    // A device that names itself walks from its own parent, like the kernel's pci_physfn() of a
    // physical function: no cycle.
    let d = copy(SWITCH);
    symlink(".", d.path().join(port).join("physfn")).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    assert_eq!(t.chain(t.idx("0000:03:00.0".parse().unwrap()).unwrap()).len(), 4);
    // A sane VF -> PF link still works (the PF here is a sibling function's device).
    let d = copy(SWITCH);
    symlink("../0000:02:01.0", d.path().join(port).join("0000:02:00.0/physfn")).unwrap();
    let t = Topology::discover(d.path()).unwrap();
    let vf = t.idx("0000:02:00.0".parse().unwrap()).unwrap();
    assert_eq!(t.device(vf).physfn, Some(t.idx("0000:02:01.0".parse().unwrap()).unwrap()));
    assert_eq!(t.chain(vf).len(), 3);
}

#[test]
fn a_bar_ending_at_the_top_of_the_address_space_is_bounded() {
    // BAR0 in the last 4 KiB below 2^64: registering, looking up and resolving it must not
    // overflow or allocate by address.
    let d = copy(HOST);
    let mut lines: Vec<String> =
        fs::read_to_string(d.path().join(DEV).join("resource")).unwrap().lines().map(str::to_string).collect();
    lines[0] = "0xfffffffffffff000 0xffffffffffffffff 0x0000000000140204".into();
    fs::write(d.path().join(DEV).join("resource"), lines.join("\n") + "\n").unwrap();
    let t = Arc::new(Topology::discover(d.path()).unwrap());
    let bdf = "0000:00:03.0".parse().unwrap();
    let bar = t.by_bdf(bdf).unwrap().bar(0).unwrap().clone();
    assert_eq!(bar.cpu.len(), 0x1000);
    let reg = Registry::new(t.clone());
    let region: Arc<dyn PeerMemory> = Arc::new(peermem::BarRegion { bdf, bar: 0, offset: 0xf00, len: 0x100 });
    let g = reg.register(region).unwrap();
    let r = reg.resolve(&g, reg.peer("0000:00:01.0".parse().unwrap()).unwrap()).unwrap();
    assert_eq!(r.cpu_address.unwrap().raw(), 0xffff_ffff_ffff_ff00);
    assert!(r.at(0xff).is_ok() && r.at(0x100).is_err());
    assert!(reg.resolve(&g, Peer::Cpu).is_err(), "no CPU mapping");
    // Past the end of the BAR, and a BAR spanning the whole space.
    let past: Arc<dyn PeerMemory> = Arc::new(peermem::BarRegion { bdf, bar: 0, offset: 0xf00, len: 0x101 });
    assert!(reg.register(past).is_err());
    lines[0] = "0x0000000000000000 0xffffffffffffffff 0x0000000000140204".into();
    fs::write(d.path().join(DEV).join("resource"), lines.join("\n") + "\n").unwrap();
    error_naming(d.path(), "0000:00:03.0/resource");
}

/// Writes a sysroot of `n` endpoints below 8-port switches below root ports, each with the
/// attributes a real function has.
fn generate(root: &Path, n: usize) {
    let bus_links = root.join("sys/bus/pci/devices");
    fs::create_dir_all(&bus_links).unwrap();
    fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
    fs::write(root.join("proc/sys/kernel/osrelease"), "6.12.0\n").unwrap();
    let cfg = {
        let mut c = vec![0u8; 64];
        c[..4].copy_from_slice(&[0x86, 0x80, 0x34, 0x12]);
        c
    };
    let attrs = |dir: &Path, class: &str| {
        fs::create_dir_all(dir).unwrap();
        for (f, v) in [
            ("vendor", "0x8086\n"),
            ("device", "0x1234\n"),
            ("class", class),
            ("numa_node", "0\n"),
            ("current_link_speed", "16.0 GT/s PCIe\n"),
            ("current_link_width", "16\n"),
            ("resource", "0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0 0x0 0x0\n"),
        ] {
            fs::write(dir.join(f), v).unwrap();
        }
        fs::write(dir.join("config"), &cfg).unwrap();
    };
    let link = |bdf: &str, rel: &str| symlink(format!("../../../{rel}"), bus_links.join(bdf)).unwrap();
    // Domain d, root port 00:rp.0 with secondary bus rp + 1 holding 32 endpoints.
    let mut made = 0;
    'all: for domain in 0u32.. {
        let hb = format!("devices/pci{domain:04x}:00");
        for rp in 0..32u32 {
            let rp_bdf = format!("{domain:04x}:00:{rp:02x}.0");
            let rp_rel = format!("{hb}/{rp_bdf}");
            attrs(&root.join("sys").join(&rp_rel), "0x060400\n");
            link(&rp_bdf, &rp_rel);
            for ep in 0..32u32 {
                let bdf = format!("{domain:04x}:{:02x}:{ep:02x}.0", rp + 1);
                let rel = format!("{rp_rel}/{bdf}");
                attrs(&root.join("sys").join(&rel), "0x010802\n");
                link(&bdf, &rel);
                made += 1;
                if made == n {
                    break 'all;
                }
            }
        }
    }
}

fn max_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Run as a child process (see `discovery_scales_linearly`): discovers PEERMEM_SCALE_ROOT and
/// prints devices, milliseconds and peak RSS.
#[test]
fn scale_child() {
    let Ok(root) = std::env::var("PEERMEM_SCALE_ROOT") else { return };
    let before = max_rss_kib();
    let t0 = std::time::Instant::now();
    let t = Topology::discover(&root).unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    println!("SCALE devices={} ms={ms:.0} rss_kib={} base_kib={before}", t.len(), max_rss_kib());
}

#[test]
fn discovery_scales_linearly() {
    let mut rows = Vec::new();
    for n in [1_000usize, 10_000] {
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), n);
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "scale_child", "--nocapture", "--test-threads=1"])
            .env("PEERMEM_SCALE_ROOT", d.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find_map(|l| l.split_once("SCALE ")).unwrap_or_else(|| panic!("no result: {text}")).1;
        let field = |k: &str| -> f64 {
            line.split_whitespace().find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse().ok()).unwrap()
        };
        let (devices, ms, rss, base) = (field("devices"), field("ms"), field("rss_kib"), field("base_kib"));
        println!("{n} endpoints: {devices} functions, {ms} ms, peak RSS {rss} KiB ({base} KiB before)");
        assert!(devices as usize > n, "{line}");
        rows.push((devices, rss - base));
    }
    // Memory grows with the device count, not faster: 10x the devices may cost at most 20x the
    // memory the 1,000-device discovery added (with 4 MiB of slack for allocator arenas).
    let ((d1, m1), (d10, m10)) = (rows[0], rows[1]);
    assert!(d10 / d1 > 9.0);
    assert!(m10 <= 20.0 * m1 + 4096.0, "peak memory grew from {m1} KiB to {m10} KiB");
}
