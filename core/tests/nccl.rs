//! The NCCL topology export, checked on every fixture against what NCCL's own parser
//! (`src/graph/xml.cc`) accepts: its tokenizer rules (double-quoted values, single spaces
//! between attributes, names and values under 256 bytes), its handler table (which element may
//! sit in which) and the attributes its loaders read.

use std::collections::HashMap;
use std::path::PathBuf;

use peermem::Topology;

/// Element -> (allowed children, allowed attributes), as NCCL's handlers and loaders define them.
fn nccl_schema() -> HashMap<&'static str, (&'static [&'static str], &'static [&'static str])> {
    HashMap::from([
        ("system", (&["cpu"][..], &["version", "name"][..])),
        (
            "cpu",
            (&["pci", "nic"][..], &["numaid", "affinity", "arch", "vendor", "familyid", "modelid", "host_hash"][..]),
        ),
        (
            "pci",
            (
                &["pci", "gpu", "nic", "pcilink"][..],
                &[
                    "busid",
                    "class",
                    "vendor",
                    "device",
                    "subsystem_vendor",
                    "subsystem_device",
                    "link_speed",
                    "link_width",
                ][..],
            ),
        ),
        ("nic", (&["net"][..], &[][..])),
        ("net", (&[][..], &["name", "dev", "speed", "port", "latency", "guid", "maxconn", "gdr", "coll"][..])),
        ("gpu", (&["nvlink", "c2c"][..], &["dev", "sm", "rank", "gdr"][..])),
    ])
}

/// A tag as NCCL's `xmlGetNode` reads it.
#[derive(Debug)]
enum Tag {
    Open(String, Vec<(String, String)>, bool),
    Close(String),
}

fn tokenize(xml: &str) -> Vec<Tag> {
    let mut tags = Vec::new();
    let mut rest = xml;
    loop {
        rest = rest.trim_start_matches([' ', '\n', '\r']);
        if rest.is_empty() {
            return tags;
        }
        assert!(rest.starts_with('<'), "NCCL expects '<' at {:?}", &rest[..rest.len().min(40)]);
        let end = rest.find('>').expect("unterminated tag");
        let body = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = body.strip_prefix('/') {
            tags.push(Tag::Close(name.to_string()));
            continue;
        }
        let (body, single) = match body.strip_suffix('/') {
            Some(b) => (b, true),
            None => (body, false),
        };
        let mut parts = body.splitn(2, ' ');
        let name = parts.next().unwrap().to_string();
        let mut attrs = Vec::new();
        let mut a = parts.next().unwrap_or("");
        while !a.is_empty() {
            let (k, v) = a.split_once("=\"").unwrap_or_else(|| panic!("{name}: attribute without =\": {a:?}"));
            let close = v.find('"').expect("unterminated value");
            let value = &v[..close];
            assert!(k.len() < 256 && value.len() < 256, "{k}: too long for NCCL's MAX_STR_LEN");
            assert!(!k.contains(' ') && !k.is_empty(), "{name}: bad attribute name {k:?}");
            attrs.push((k.to_string(), value.to_string()));
            a = &v[close + 1..];
            if !a.is_empty() {
                a = a.strip_prefix(' ').unwrap_or_else(|| panic!("{name}: attributes must be separated by one space"));
            }
        }
        tags.push(Tag::Open(name, attrs, single));
    }
}

fn check(xml: &str) {
    let schema = nccl_schema();
    let mut stack: Vec<String> = Vec::new();
    let mut busids = Vec::new();
    for tag in tokenize(xml) {
        match tag {
            Tag::Open(name, attrs, single) => {
                let (_, allowed_attrs) =
                    schema.get(name.as_str()).unwrap_or_else(|| panic!("NCCL ignores element {name}"));
                match stack.last() {
                    None => assert_eq!(name, "system", "top element"),
                    Some(parent) => {
                        assert!(schema[parent.as_str()].0.contains(&name.as_str()), "{name} inside {parent}")
                    }
                }
                for (k, v) in &attrs {
                    assert!(allowed_attrs.contains(&k.as_str()), "{name}: attribute {k} not read by NCCL");
                    if k == "busid" {
                        assert!(v.parse::<peermem::Bdf>().is_ok() && *v == v.to_lowercase(), "busid {v}");
                        busids.push(v.clone());
                    }
                    if k == "link_speed" {
                        assert!(v.ends_with(" GT/s PCIe"), "{v}");
                    }
                }
                if name == "system" {
                    assert!(attrs.iter().any(|(k, v)| k == "version" && v == "1"), "NCCL_TOPO_XML_VERSION");
                }
                if name == "pci" {
                    assert!(attrs.iter().any(|(k, _)| k == "busid"), "pci without busid");
                }
                if !single {
                    stack.push(name);
                }
            }
            Tag::Close(name) => assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "mismatched close"),
        }
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    let n = busids.len();
    busids.sort();
    busids.dedup();
    assert_eq!(busids.len(), n, "a pci node appears twice");
}

#[test]
fn export_is_accepted_by_nccls_parser_rules_on_every_fixture() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"));
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if !e.path().join("sys").is_dir() {
            continue;
        }
        let t = Topology::discover(e.path()).unwrap();
        let xml = peermem::nccl::topology_xml(&t, "test");
        check(&xml);
        n += 1;
    }
    assert!(n >= 10);
}

#[test]
fn the_switch_fixture_nests_like_nccl_and_marks_the_nic() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/qemu-switch"));
    let xml = peermem::nccl::topology_xml(&Topology::discover(root).unwrap(), "qemu-switch");
    check(&xml);
    // virtio-net 07:00.0 is on root port 00:05.0: NCCL hangs it straight below the CPU, as a NIC.
    assert!(xml.contains("<pci busid=\"0000:07:00.0\" class=\"0x020000\""), "{xml}");
    assert!(xml.contains("<nic/>"), "{xml}");
    assert!(xml.contains("numaid=\"-1\" affinity=\"00000003\""), "{xml}");
}
