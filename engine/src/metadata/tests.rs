use super::*;

fn sample() -> Metadata {
    let key = |nic: &str, rkey| RemoteKey {
        nic: nic.into(),
        rkey,
        addr: 0x7f00_0000_0000,
        direct: true,
        bandwidth_gbs: Some(200.0),
    };
    Metadata {
        version: VERSION,
        host: "a".into(),
        nics: vec![
            NicAddr { nic: "mlx5_0".into(), address: "fe80::1".into() },
            NicAddr { nic: "mlx5_1".into(), address: "10.0.0.2:18515".into() },
        ],
        regions: vec![
            RegionMeta { id: RegionId(1), len: 1 << 30, keys: vec![key("mlx5_0", 7), key("mlx5_1", 9)] },
            RegionMeta { id: RegionId(2), len: 4096, keys: vec![] },
        ],
    }
}

#[test]
fn metadata_round_trips_and_names_its_format_and_version() {
    let m = sample();
    let bytes = m.encode();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.contains(r#""format":"peermem-engine-metadata""#) && text.contains(r#""version":3"#), "{text}");
    assert_eq!(Metadata::decode(&bytes).unwrap(), m);
    assert_eq!(m.region(RegionId(2)).unwrap().len, 4096);
}

#[test]
fn every_truncation_of_valid_metadata_is_a_typed_error() {
    let bytes = sample().encode();
    for n in 0..bytes.len() {
        let e = Metadata::decode(&bytes[..n]).unwrap_err();
        assert!(matches!(e, MetadataError::Syntax(_)), "{n}: {e}");
    }
}

#[test]
fn garbage_is_refused_without_a_panic() {
    // A fixed pseudo-random sequence (xorshift), so the test is the same every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..2000 {
        let len = (round % 300) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(Metadata::decode(&bytes).is_err(), "round {round}");
    }
    // Garbage that parses: every field of a good encoding replaced in turn.
    let good = sample().encode();
    let text = String::from_utf8(good).unwrap();
    for (from, to) in
        [("\"len\":4096", "\"len\":-1"), ("\"rkey\":7", "\"rkey\":4294967296"), ("\"host\":\"a\"", "\"host\":7")]
    {
        let e = Metadata::decode(text.replace(from, to).as_bytes()).unwrap_err();
        assert!(matches!(e, MetadataError::Syntax(_)), "{from}: {e}");
    }
}

#[test]
fn a_wrong_format_or_version_is_named_before_the_fields() {
    let text = String::from_utf8(sample().encode()).unwrap();
    let e = Metadata::decode(text.replace("\"version\":3", "\"version\":2").as_bytes()).unwrap_err();
    assert_eq!(e, MetadataError::Version { found: Some(2) });
    let e = Metadata::decode(br#"{"format":"peermem-engine-metadata","regions":"x"}"#).unwrap_err();
    assert_eq!(e, MetadataError::Version { found: None });
    let e = Metadata::decode(br#"{"format":"nixl","version":1}"#).unwrap_err();
    assert_eq!(e, MetadataError::Format(Some("nixl".into())));
    assert!(matches!(Metadata::decode(b"[1,2]").unwrap_err(), MetadataError::Syntax(_)));
}

#[test]
fn oversized_input_is_refused_before_it_is_parsed() {
    let big = vec![b' '; MAX_BYTES + 1];
    assert_eq!(Metadata::decode(&big).unwrap_err(), MetadataError::TooLarge { len: MAX_BYTES + 1, max: MAX_BYTES });
    // Deep nesting within the size bound is refused by the parser's depth limit, not the stack.
    let deep = "[".repeat(100_000);
    assert!(matches!(Metadata::decode(deep.as_bytes()).unwrap_err(), MetadataError::Syntax(_)));
}

#[test]
fn fields_that_contradict_each_other_are_invalid_and_named() {
    let field = |m: Metadata| match Metadata::decode(&m.encode()).unwrap_err() {
        MetadataError::Invalid { field, .. } => field,
        e => panic!("{e}"),
    };
    let mut m = sample();
    m.regions[0].keys[1].nic = "mlx5_9".into();
    assert_eq!(field(m), "regions[0].keys[1]");
    let mut m = sample();
    m.regions[1].id = RegionId(1);
    assert_eq!(field(m), "regions[1]");
    let mut m = sample();
    m.regions[1].len = 0;
    assert_eq!(field(m), "regions[1].len");
    let mut m = sample();
    m.nics.push(m.nics[0].clone());
    assert_eq!(field(m), "nics[2]");
    let mut m = sample();
    m.regions[0].keys[0].bandwidth_gbs = Some(-1.0);
    assert_eq!(field(m), "regions[0].keys[0]");
    let mut m = sample();
    m.host.clear();
    assert_eq!(field(m), "host");
}
