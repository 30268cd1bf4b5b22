//! The NCCL topology export against NCCL's own reading of the file (`peermem::nccl::check`: its
//! tokenizer, element and value limits, the attributes its topology code requires), on every
//! fixture and on generated machines with many NICs and SR-IOV functions; then one test per rule
//! of the export: the element budget, value length, CPU family and model, link width and speed,
//! nets placed by name, and host-to-guest maps.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use peermem::nccl::{self, check, BusMap, Export, LeftOutWhy, NcclError, Options, NCCL_MAX_ELEMENTS};
use peermem::{PathLabel, Topology};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"))
}

fn export(root: &Path) -> Export {
    export_with(root, Options { name: "test".into(), map: BusMap::default() }).unwrap()
}

fn export_with(root: &Path, opts: Options) -> Result<Export, NcclError> {
    nccl::export(&Topology::discover(root).unwrap(), &opts)
}

fn copy(fixture: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("cp").arg("-a").arg(fixtures().join(fixture).join(".")).arg(d.path()).status().unwrap();
    assert!(st.success());
    d
}

/// An element of the file: name, attributes, children (indices).
struct El {
    name: String,
    attrs: HashMap<String, String>,
    parent: Option<usize>,
}

/// The file's elements, in order (the export's own regular layout: one tag a line).
fn elements(xml: &str) -> Vec<El> {
    let mut els: Vec<El> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    for line in xml.lines().map(str::trim) {
        if line.starts_with("</") {
            stack.pop();
            continue;
        }
        let body = line.trim_start_matches('<').trim_end_matches('>');
        let (body, single) = match body.strip_suffix('/') {
            Some(b) => (b, true),
            None => (body, false),
        };
        let (name, rest) = body.split_once(' ').unwrap_or((body, ""));
        let attrs = rest
            .split("\" ")
            .filter(|a| !a.is_empty())
            .map(|a| {
                let (k, v) = a.split_once("=\"").unwrap();
                (k.to_string(), v.trim_end_matches('"').to_string())
            })
            .collect();
        els.push(El { name: name.to_string(), attrs, parent: stack.last().copied() });
        if !single {
            stack.push(els.len() - 1);
        }
    }
    els
}

fn find(els: &[El], name: &str, key: &str, value: &str) -> Option<usize> {
    els.iter().position(|e| e.name == name && e.attrs.get(key).is_some_and(|v| v == value))
}

/// NCCL's path type between two elements of its XML: their common ancestor is a `pci` both
/// hang from directly (PIX) or from further down (PXB), a `cpu` (PHB), or the `system` (SYS).
/// A net stands where its NIC's `pci` element stands.
fn nccl_path(els: &[El], a: usize, b: usize) -> &'static str {
    let place = |i: usize| if els[i].name == "net" { els[els[i].parent.unwrap()].parent.unwrap() } else { i };
    let chain = |i: usize| std::iter::successors(Some(i), |&x| els[x].parent).collect::<Vec<_>>();
    let (ca, cb) = (chain(place(a)), chain(place(b)));
    let common = *ca.iter().find(|x| cb.contains(x)).unwrap();
    match els[common].name.as_str() {
        "system" => "SYS",
        "cpu" => "PHB",
        _ if ca[1] == common && cb[1] == common => "PIX",
        _ => "PXB",
    }
}

#[test]
fn every_fixtures_export_passes_nccls_reading_of_it() {
    let mut n = 0;
    for e in fs::read_dir(fixtures()).unwrap().flatten() {
        if !e.path().join("sys").is_dir() {
            continue;
        }
        let ex = export(&e.path());
        let c = check(&ex.xml);
        assert!(c.is_ok(), "{}: {:?}\n{}", e.path().display(), c.problems, ex.xml);
        assert_eq!(c.elements, ex.elements);
        assert!(ex.elements + ex.added_at_run_time <= NCCL_MAX_ELEMENTS);
        assert!(ex.left_out.is_empty(), "{}: {:?}", e.path().display(), ex.left_out);
        n += 1;
    }
    assert!(n >= 19, "{n} fixtures");
}

#[test]
fn each_gpu_reaches_each_nic_in_the_file_by_the_fabrics_path_label() {
    // NCCL placed every NIC on the first CPU when it could not resolve the NIC's sysfs path; the
    // nets, found by name, keep each NIC where the fabric has it.
    let root = fixtures().join("derived-gpu-nic");
    let t = Topology::discover(&root).unwrap();
    let els = elements(&export(&root).xml);
    let mut pairs = 0;
    for g in t.indices().filter(|&i| t.device(i).class >> 16 == 0x03) {
        let ge = find(&els, "pci", "busid", &t.device(g).bdf.to_string()).expect("every GPU is in the file");
        for (name, bdf) in [("mlx5_0", "0000:04:00.0"), ("mlx5_1", "0000:10:00.0"), ("mlx5_2", "0000:85:00.0")] {
            let ne = find(&els, "net", "name", name).unwrap();
            let v = t.verdict(g, t.idx(bdf.parse().unwrap()).unwrap());
            let fabric = v.switch_path.unwrap_or(v.path);
            let want = if fabric == PathLabel::NODE { "SYS" } else { fabric.as_str() };
            assert_eq!(nccl_path(&els, ge, ne), want, "{} -> {name}", t.device(g).bdf);
            pairs += 1;
        }
    }
    assert_eq!(pairs, 18);
}

#[test]
fn nets_carry_the_name_nccl_finds_them_by_the_device_index_and_the_port_facts() {
    let xml = export(&fixtures().join("derived-gpu-nic")).xml;
    assert!(xml.contains("<net name=\"mlx5_0\" dev=\"0\" speed=\"400000\" port=\"1\"/>"), "{xml}");
    assert!(xml.contains("<net name=\"mlx5_2\" dev=\"2\" speed=\"400000\" port=\"1\"/>"), "{xml}");
    // A NIC without an RDMA device is named by its netdev, what NCCL's socket plugin lists.
    let xml = export(&fixtures().join("qemu-switch")).xml;
    assert!(xml.contains("<net name=\"eth0\" dev=\"0\"/>"), "{xml}");
}

#[test]
fn a_capture_keeps_every_fact_the_export_reads() {
    let d = tempfile::tempdir().unwrap();
    let cap = d.path().join("cap");
    peermem::capture::capture(&fixtures().join("derived-gpu-nic"), &cap).unwrap();
    assert!(cap.join("sys/class/infiniband/mlx5_0/ports/1/rate").is_file());
    assert_eq!(export(&cap).xml, export(&fixtures().join("derived-gpu-nic")).xml);
}

#[test]
fn link_width_takes_the_narrower_side_with_a_missing_side_as_0_and_both_attributes_always() {
    let els = elements(&export(&fixtures().join("derived-gpu-nic")).xml);
    let link = |busid: &str| {
        let e = &els[find(&els, "pci", "busid", busid).unwrap()];
        (e.attrs["link_speed"].clone(), e.attrs["link_width"].clone())
    };
    // NIC x16 below a QEMU downstream port that reports width 0 and speed Unknown: width 0 (NCCL
    // reads x16), speed the NIC's own.
    assert_eq!(link("0000:04:00.0"), ("32.0 GT/s PCIe".into(), "0".into()));
    // The switch's upstream port: x1 2.5 GT/s below a root port of x32 16 GT/s.
    assert_eq!(link("0000:01:00.0"), ("2.5 GT/s PCIe".into(), "1".into()));
    // A function on the root bus has no port above it: width 0, and no speed when it has none.
    let els = elements(&export(&fixtures().join("host-fc-amd")).xml);
    let e = &els[find(&els, "pci", "busid", "0000:00:03.0").unwrap()];
    assert_eq!((e.attrs["link_speed"].as_str(), e.attrs["link_width"].as_str()), ("", "0"));
}

#[test]
fn a_gpu_gets_its_current_link_not_its_maximum() {
    let els = elements(&export(&fixtures().join("derived-gpu-nic")).xml);
    let e = &els[find(&els, "pci", "busid", "0000:03:00.0").unwrap()];
    // Trained to 16 GT/s x16 below a maximum of 32 GT/s.
    assert_eq!((e.attrs["link_speed"].as_str(), e.attrs["link_width"].as_str()), ("16.0 GT/s PCIe", "16"));
}

#[test]
fn values_are_cut_to_253_bytes_on_a_character_boundary() {
    let name = format!("peermem /captures/{}", "ü".repeat(200));
    let ex = export_with(&fixtures().join("qemu-switch"), Options { name, map: BusMap::default() }).unwrap();
    let els = elements(&ex.xml);
    let v = &els[0].attrs["name"];
    assert!(v.len() <= 253 && v.len() >= 252, "{} bytes", v.len());
    assert!(v.ends_with('ü'), "cut between characters: {v:?}");
    assert!(check(&ex.xml).is_ok());
}

#[test]
fn cpu_family_and_model_come_both_or_neither() {
    // One CPU element: without a model, neither is written (NCCL fills both from its CPU).
    let d = copy("qemu-switch");
    let info = d.path().join("proc/cpuinfo");
    let text = fs::read_to_string(&info).unwrap();
    let no_model: String = text.lines().filter(|l| !l.starts_with("model\t")).map(|l| format!("{l}\n")).collect();
    fs::write(&info, &no_model).unwrap();
    let ex = export(d.path());
    assert!(!ex.xml.contains("familyid") && !ex.xml.contains("modelid"), "{}", ex.xml);
    assert!(ex.notes.iter().any(|n| n.contains("familyid and modelid")), "{:?}", ex.notes);
    // Two CPU elements: NCCL fills one only, so the file cannot be written without the model.
    let d = copy("derived-gpu-nic");
    fs::write(d.path().join("proc/cpuinfo"), &no_model).unwrap();
    let e = export_with(d.path(), Options::default()).unwrap_err();
    assert!(matches!(e, NcclError::CpuFacts { cpus: 2, .. }), "{e}");
    assert!(e.to_string().contains("proc/cpuinfo"), "{e}");
    // With both known, both are written.
    assert!(export(&fixtures().join("derived-gpu-nic")).xml.contains("familyid=\"6\" modelid=\"6\""));
}

#[test]
fn a_map_rewrites_bus_ids_and_net_names_for_the_guest_and_refuses_clashes() {
    let root = fixtures().join("derived-gpu-nic");
    let mut map = BusMap::default();
    map.add("0000:03:00.0=0000:00:05.0", "--map").unwrap();
    map.add("0000:04:00.0=0000:00:06.0", "--map").unwrap();
    map.add("mlx5_0=mlx5_7", "--map").unwrap();
    let ex = export_with(&root, Options { name: "vm".into(), map }).unwrap();
    assert!(check(&ex.xml).is_ok());
    let els = elements(&ex.xml);
    assert!(find(&els, "pci", "busid", "0000:03:00.0").is_none());
    let gpu = find(&els, "pci", "busid", "0000:00:05.0").expect("the guest's GPU id");
    let net = find(&els, "net", "name", "mlx5_7").expect("the guest's RDMA name");
    assert_eq!(nccl_path(&els, gpu, net), "PIX", "the host's fabric, under the guest's names");
    assert!(ex.rdma_names.contains(&"mlx5_7".to_string()));

    // Mapping onto an id the host's tree also holds would make NCCL find the wrong element.
    let mut map = BusMap::default();
    map.add("0000:03:00.0=0000:0c:00.0", "--map 0000:03:00.0=0000:0c:00.0").unwrap();
    let e = export_with(&root, Options { name: "vm".into(), map }).unwrap_err();
    assert!(matches!(e, NcclError::BusIdClash { .. }), "{e}");
    assert!(e.to_string().contains("0000:0c:00.0") && e.to_string().contains("map the other one"), "{e}");
    // A host side the machine lacks is an error naming the entry.
    for (entry, origin) in [("0000:42:00.0=0000:00:05.0", "vm.map:3"), ("mlx5_9=mlx5_0", "--map mlx5_9=mlx5_0")] {
        let mut map = BusMap::default();
        map.add(entry, origin).unwrap();
        let e = export_with(&root, Options { name: "vm".into(), map }).unwrap_err().to_string();
        assert!(e.starts_with(origin) && e.contains("derived-gpu-nic"), "{e}");
    }
}

/// One PCIe switch of a generated machine: on NUMA node `node`, with `gpus` GPUs and `nics` NIC
/// physical functions, each with `vfs` SR-IOV virtual functions beside it.
#[derive(Clone, Copy)]
struct Switch {
    node: u32,
    gpus: usize,
    nics: usize,
    vfs: usize,
}

/// Writes a two-socket machine (Intel family 6 model 143) of `switches` below root ports, one
/// PCI domain per NUMA node; each NIC function carries an RDMA device `mlx5_N`.
fn generate(root: &Path, switches: &[Switch]) {
    fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
    fs::write(root.join("proc/sys/kernel/osrelease"), "6.12.0\n").unwrap();
    fs::write(
        root.join("proc/cpuinfo"),
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n\n",
    )
    .unwrap();
    fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
    fs::create_dir_all(root.join("sys/class/infiniband")).unwrap();
    let mut next_bus = [1u32, 1u32];
    let mut rdma = 0;
    for (n, sw) in switches.iter().enumerate() {
        let dom = sw.node;
        let hb = format!("sys/devices/pci{dom:04x}:00");
        let bus = &mut next_bus[dom as usize];
        let rp = format!("{hb}/{dom:04x}:00:{:02x}.0", n % 32);
        function(root, &rp, 0x060400, dom, None);
        let up = format!("{rp}/{dom:04x}:{:02x}:00.0", *bus);
        function(root, &up, 0x060400, dom, None);
        let dsp_bus = *bus + 1;
        *bus += 2;
        let kinds = std::iter::repeat_n(true, sw.gpus).chain(std::iter::repeat_n(false, sw.nics));
        for (k, gpu) in kinds.enumerate() {
            let dsp = format!("{up}/{dom:04x}:{dsp_bus:02x}:{k:02x}.0");
            function(root, &dsp, 0x060400, dom, None);
            let b = *bus;
            *bus += 1;
            let pf = format!("{dom:04x}:{b:02x}:00.0");
            if gpu {
                function(root, &format!("{dsp}/{pf}"), 0x030200, dom, None);
                continue;
            }
            function(root, &format!("{dsp}/{pf}"), 0x020000, dom, None);
            add_rdma(root, &format!("{dsp}/{pf}"), &mut rdma);
            for v in 1..=sw.vfs {
                let vf = format!("{dsp}/{dom:04x}:{b:02x}:{:02x}.{}", v / 8, v % 8);
                function(root, &vf, 0x020000, dom, Some(&pf));
                add_rdma(root, &vf, &mut rdma);
            }
        }
    }
}

/// One function's directory, attributes and bus link; a VF gets its `physfn` link.
fn function(root: &Path, rel: &str, class: u32, node: u32, physfn: Option<&str>) {
    let dir = root.join(rel);
    fs::create_dir_all(&dir).unwrap();
    let (vendor, device) = match class >> 16 {
        0x03 => (0x10de, 0x2330),
        0x02 => (0x15b3, if physfn.is_some() { 0x101e } else { 0x101d }),
        _ => (0x10b5, 0x9797),
    };
    let mut cfg = vec![0u8; 64];
    cfg[..4].copy_from_slice(&[(vendor & 0xff) as u8, (vendor >> 8) as u8, (device & 0xff) as u8, (device >> 8) as u8]);
    cfg[9..12].copy_from_slice(&[(class & 0xff) as u8, (class >> 8 & 0xff) as u8, (class >> 16) as u8]);
    cfg[0x0e] = u8::from(class >> 8 == 0x0604);
    for (f, v) in [
        ("vendor", format!("{vendor:#06x}")),
        ("device", format!("{device:#06x}")),
        ("class", format!("{class:#08x}")),
        ("numa_node", node.to_string()),
        ("local_cpulist", node.to_string()),
        ("current_link_speed", "32.0 GT/s PCIe".into()),
        ("current_link_width", "16".into()),
        ("max_link_speed", "32.0 GT/s PCIe".into()),
        ("max_link_width", "16".into()),
        ("resource", "0x0 0x0 0x0\n".repeat(6)),
    ] {
        fs::write(dir.join(f), format!("{v}\n")).unwrap();
    }
    fs::write(dir.join("config"), &cfg).unwrap();
    let bdf = rel.rsplit('/').next().unwrap();
    symlink(format!("../../../{}", rel.trim_start_matches("sys/")), root.join("sys/bus/pci/devices").join(bdf))
        .unwrap();
    if let Some(pf) = physfn {
        symlink(format!("../{pf}"), dir.join("physfn")).unwrap();
    }
}

fn add_rdma(root: &Path, rel: &str, next: &mut usize) {
    let name = format!("mlx5_{next}");
    *next += 1;
    let d = root.join(rel).join("infiniband").join(&name);
    fs::create_dir_all(&d).unwrap();
    symlink(format!("../../../{}", rel.rsplit('/').next().unwrap()), d.join("device")).unwrap();
    let target = format!("../../{}/infiniband/{name}", rel.trim_start_matches("sys/"));
    symlink(target, root.join("sys/class/infiniband").join(&name)).unwrap();
}

#[test]
fn three_hundred_network_functions_fit_by_leaving_out_vfs_first_then_the_farthest_nics() {
    // 100 NIC PFs with 2 VFs each: 4 switches hold 2 GPUs and 4 PFs, the other PFs sit on
    // switches without a GPU, on both NUMA nodes.
    let mut sw = vec![Switch { node: 0, gpus: 2, nics: 4, vfs: 2 }; 2];
    sw.extend([Switch { node: 1, gpus: 2, nics: 4, vfs: 2 }; 2]);
    sw.extend([Switch { node: 0, gpus: 0, nics: 14, vfs: 2 }; 3]);
    sw.extend([Switch { node: 1, gpus: 0, nics: 14, vfs: 2 }; 3]);
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), &sw);
    let t = Topology::discover(d.path()).unwrap();
    let nics = t.indices().filter(|&i| t.device(i).class >> 16 == 0x02).count();
    assert_eq!(nics, 300);

    let ex = nccl::export(&t, &Options::default()).unwrap();
    let c = check(&ex.xml);
    assert!(c.is_ok(), "{:?}", c.problems);
    assert!(c.elements + c.added_at_run_time <= NCCL_MAX_ELEMENTS, "{} + {}", c.elements, c.added_at_run_time);
    // Every VF went first, then PFs, the farthest from any GPU first; no GPU went.
    let vfs = ex.left_out.iter().take_while(|l| matches!(l.why, LeftOutWhy::VirtualFunction { .. })).count();
    assert_eq!(vfs, 200);
    let pfs: Vec<PathLabel> = ex.left_out[vfs..]
        .iter()
        .map(|l| match l.why {
            LeftOutWhy::Far { path: Some((p, _)) } => p,
            ref w => panic!("{w:?}"),
        })
        .collect();
    assert!(!pfs.is_empty(), "300 functions do not fit without leaving out PFs too");
    assert!(pfs.iter().all(|p| *p != PathLabel::PIX), "a NIC below a GPU's switch went: {pfs:?}");
    assert!(ex.left_out[0].to_string().contains("an SR-IOV virtual function of"), "{}", ex.left_out[0]);
    assert!(ex.left_out[vfs].to_string().contains("farthest from any GPU"), "{}", ex.left_out[vfs]);
    let els = elements(&ex.xml);
    for i in t.indices().filter(|&i| t.device(i).class >> 16 == 0x03) {
        assert!(find(&els, "pci", "busid", &t.device(i).bdf.to_string()).is_some(), "GPU {}", t.device(i).bdf);
    }
    // The names in the file are the ones a NCCL_IB_HCA list keeps NCCL to.
    let nets = els.iter().filter(|e| e.name == "net").count();
    assert_eq!(ex.rdma_names.len(), nets);
}

#[test]
fn generated_machines_of_every_size_stay_within_nccls_limits() {
    for (nics, vfs) in [(8, 0), (40, 0), (70, 0), (20, 7), (60, 3)] {
        let per = nics / 4;
        let sw: Vec<Switch> = (0..4)
            .map(|k| Switch { node: k % 2, gpus: 2, nics: per + usize::from(k == 0) * (nics % 4), vfs })
            .collect();
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), &sw);
        let ex = export(d.path());
        let c = check(&ex.xml);
        assert!(c.is_ok(), "{nics}x{vfs}: {:?}", c.problems);
        let fits = 3 + 4 + 8 + nics * (1 + vfs) * 3 + RESERVED <= NCCL_MAX_ELEMENTS;
        assert_eq!(ex.left_out.is_empty(), fits, "{nics} NICs with {vfs} VFs: {} left out", ex.left_out.len());
    }
}

const RESERVED: usize = nccl::RESERVED_AT_RUN_TIME;

#[test]
fn gpus_alone_over_the_limit_are_an_error_not_a_truncated_file() {
    let sw: Vec<Switch> = (0..8).map(|k| Switch { node: k % 2, gpus: 30, nics: 1, vfs: 0 }).collect();
    let d = tempfile::tempdir().unwrap();
    generate(d.path(), &sw);
    let e = export_with(d.path(), Options::default()).unwrap_err();
    assert!(matches!(e, NcclError::TooBig { .. }), "{e}");
    assert!(e.to_string().contains("GPUs alone"), "{e}");
}
