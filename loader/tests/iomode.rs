//! How files are read: O_DIRECT, through the page cache (buffered), or as Auto judges from the
//! page cache and memory; and requests of one source that continue each other merged into one.
//! Files in a tempdir (on the build machine's disk), host memory as the destination.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use peermem::{Backing, HostRegion, PeerMemory, Provider};
use peermem_loader::{Batch, Engine, IoMode, LoadError, Loader, Options, Via};

mod common;
use common::{back, host, pattern, registry};

/// A file written through the page cache (its pages stay cached).
fn cached_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    let _ = std::fs::read(&p).unwrap();
    p
}

/// A file written with O_DIRECT (none of its pages in the page cache afterwards), or `None`
/// where the filesystem refuses O_DIRECT.
fn cold_file(dir: &Path, name: &str, data: &[u8]) -> Option<PathBuf> {
    assert!(data.len().is_multiple_of(4096));
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .ok()?;
    // O_DIRECT wants page-aligned memory: a page-aligned window of a larger vector.
    let mut v = vec![0u8; data.len() + 4096];
    let at = v.as_ptr().align_offset(4096);
    v[at..at + data.len()].copy_from_slice(data);
    f.write_all(&v[at..at + data.len()]).ok()?;
    Some(p)
}

fn opts(io: IoMode) -> Options {
    Options { io, chunk: 256 << 10, depth: 8, ..Options::default() }
}

#[test]
fn every_mode_lands_every_byte_in_host_memory_with_either_engine() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(1, (2 << 20) + 4096 * 3 + 77);
    let p = cached_file(d.path(), "src", &data);
    let reg = registry();
    for engine in [Engine::Uring, Engine::Pool] {
        for io in [IoMode::Direct, IoMode::Buffered, IoMode::Auto] {
            let loader = Loader::new(&reg, Options { engine, ..opts(io) }).unwrap();
            let f = loader.open(&p).unwrap();
            let (h, g) = host(&reg, 4 << 20);
            h.write_at(0, &vec![0xA5; 4 << 20]).unwrap();
            let mut b = Batch::new();
            b.read(&f, 0, data.len() as u64, &g, 0);
            b.read(&f, 12_345, 1_000_001, &g, 3 << 20);
            let r = loader.run(b).unwrap();
            let what = format!("{engine:?} {io:?}");
            assert!(back(&*h, 0, data.len()) == data, "{what}: whole file");
            assert!(back(&*h, 3 << 20, 1_000_001) == data[12_345..1_012_346], "{what}: unaligned range");
            assert!(back(&*h, data.len() as u64, 4096).iter().all(|&b| b == 0xA5), "{what}: past the file");
            assert_eq!(r.bytes, data.len() as u64 + 1_000_001, "{what}");
            assert_eq!(r.dests.len(), 1, "{what}");
            assert_eq!(r.dests[0].via, Via::Direct, "{what}: {r}");
            assert_eq!(r.io.len(), 1, "{what}: {r}");
            let buffered = io != IoMode::Direct;
            assert_eq!(!f.is_direct(), buffered, "{what}: a file read once is cached, Auto reads it buffered");
            assert_eq!(r.dests[0].io.starts_with("buffered:"), buffered, "{what}: {r}");
            let line = if buffered { "read through the page cache (buffered): " } else { "read with O_DIRECT: " };
            assert!(r.dests[0].reasons.iter().any(|s| s.starts_with(line)), "{what}: {r}");
        }
    }
}

/// The CPU's copy out of the page cache takes any byte to any address: records that O_DIRECT
/// would stage (unaligned in the file or in memory) land straight in the destination.
#[test]
fn buffered_unaligned_records_go_direct_without_staging() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(2, 1 << 20);
    let p = cached_file(d.path(), "src", &data);
    let reg = registry();
    let (h, g) = host(&reg, 2 << 20);
    let ranges: Vec<(u64, u64, u64)> = (0..64u64).map(|i| (i * 16_001 + 3, 1000 + i * 7, i * 20_011 + 1)).collect();
    let mut staged = Vec::new();
    for io in [IoMode::Buffered, IoMode::Direct] {
        let loader = Loader::new(&reg, opts(io)).unwrap();
        let f = loader.open(&p).unwrap();
        let mut b = Batch::new();
        for &(off, len, doff) in &ranges {
            b.read(&f, off, len, &g, doff);
        }
        let r = loader.run(b).unwrap();
        for &(off, len, doff) in &ranges {
            assert!(back(&*h, doff, len as usize) == data[off as usize..(off + len) as usize], "{io:?} {off}+{len}");
        }
        assert_eq!(r.bytes_direct() + r.bytes_staged(), r.bytes, "{io:?}");
        staged.push(r.bytes_staged());
        if io == IoMode::Buffered {
            assert!(r.fallbacks.iter().all(|f| !f.contains("not aligned")), "{r}");
            // Strict holds too: nothing is staged.
            let strict = Loader::new(&reg, Options { strict: true, ..opts(io) }).unwrap();
            let f = strict.open(&p).unwrap();
            assert_eq!(strict.read(&f, 5, 3, &g, 7).unwrap().bytes_staged(), 0);
        }
    }
    assert_eq!(staged[0], 0, "buffered: every record direct");
    assert!(staged[1] > 0, "O_DIRECT stages what its alignment rules out");
}

#[test]
fn a_malformed_peermem_io_is_a_bad_setting_naming_the_variable() {
    let get = |k: &str| (k == "PEERMEM_IO").then(|| "bogus".to_string());
    match Options::from_vars(get) {
        Err(LoadError::BadSetting { var, value, why }) => {
            assert_eq!((var, value.as_str()), ("PEERMEM_IO", "bogus"));
            assert!(why.contains("auto, direct or buffered"), "{why}");
        }
        other => panic!("expected BadSetting, got {other:?}"),
    }
    let get = |k: &str| (k == "PEERMEM_IO").then(|| "buffered".to_string());
    assert_eq!(Options::from_vars(get).unwrap().io, IoMode::Buffered);
}

#[test]
fn auto_reads_a_file_already_in_the_page_cache_through_it() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(3, 3 << 20);
    let p = cached_file(d.path(), "src", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(IoMode::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    assert!(!f.is_direct(), "{f:?}");
    assert!(f.io().starts_with("buffered: 3 MiB of this 3 MiB file already in the page cache"), "{}", f.io());
    let (h, g) = host(&reg, 3 << 20);
    let r = loader.read(&f, 0, 3 << 20, &g, 0).unwrap();
    assert!(back(&*h, 0, 3 << 20) == data);
    assert!(r.dests[0].reasons.iter().any(|s| s.contains("already in the page cache")), "{r}");
}

/// A cold data set that fits in memory is read through the page cache and read ahead; its files
/// are judged together (the set's bytes are named); strict loads read with O_DIRECT. (Where the
/// tempdir refuses O_DIRECT no file can be written cold: the files are cached ones then, and
/// Auto says so.)
#[test]
fn auto_reads_a_cold_data_set_that_fits_through_the_page_cache_and_reads_it_ahead() {
    let d = tempfile::tempdir().unwrap();
    let datas: Vec<Vec<u8>> = (0..3u32).map(|i| pattern(10 + i, 1 << 20)).collect();
    let name = |i| format!("f{i}");
    let cold: Option<Vec<PathBuf>> = datas.iter().enumerate().map(|(i, v)| cold_file(d.path(), &name(i), v)).collect();
    let (paths, want) = match cold {
        Some(p) => (p, "buffered: the 3 MiB data set fits in half of the "),
        None => {
            let p = datas.iter().enumerate().map(|(i, v)| cached_file(d.path(), &name(i), v)).collect();
            (p, "buffered: 1 MiB of this 1 MiB file already in the page cache")
        }
    };
    let reg = registry();
    let loader = Loader::new(&reg, opts(IoMode::Auto)).unwrap();
    let files = loader.open_many(&paths).unwrap();
    assert_eq!(files.len(), 3);
    let (h, g) = host(&reg, 3 << 20);
    let mut b = Batch::new();
    for (i, f) in files.iter().enumerate() {
        assert!(!f.is_direct(), "{f:?}");
        let io = f.io();
        assert!(io.starts_with(want), "{io}");
        assert!(!want.contains("fits") || io.contains("read ahead"), "{io}");
        b.read(f, 0, 1 << 20, &g, i as u64 * (1 << 20));
    }
    let r = loader.run(b).unwrap();
    assert_eq!(r.io.len(), 3, "{r}");
    for (i, v) in datas.iter().enumerate() {
        assert!(back(&*h, i as u64 * (1 << 20), 1 << 20) == *v, "file {i}");
    }
    let strict = Loader::new(&reg, Options { strict: true, ..opts(IoMode::Auto) }).unwrap();
    let f = strict.open(&paths[0]).unwrap();
    let io = f.io();
    assert!(io.starts_with("O_DIRECT: a strict load") || io.contains("refused O_DIRECT"), "{io}");
}

/// Device memory the CPU maps (here host pages standing in for a P2PDMA region of the fixture's
/// switch NVMe): an Auto source read through the page cache reads it with O_DIRECT, so the device
/// writes it itself; host memory it reads through the page cache.
#[test]
fn auto_reads_device_memory_with_o_direct_and_host_memory_through_the_page_cache() {
    struct P2p(HostRegion);
    impl PeerMemory for P2p {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn provider(&self) -> Provider {
            Provider::Pci("0000:03:00.0".parse().unwrap())
        }
        fn backing(&self) -> Backing<'_> {
            Backing::P2pmem { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 1 << 20 }
        }
        fn cpu_mapping(&self) -> Option<peermem::mem::MappedSpan<'_>> {
            self.0.cpu_mapping()
        }
    }
    let d = tempfile::tempdir().unwrap();
    let data = pattern(4, 1 << 20);
    let p = cached_file(d.path(), "src", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(IoMode::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    assert!(!f.is_direct());
    let dev = Arc::new(P2p(HostRegion::new(1 << 20).unwrap()));
    let gd = reg.register(dev.clone() as Arc<dyn PeerMemory>).unwrap();
    let (h, gh) = host(&reg, 1 << 20);
    let mut b = Batch::new();
    b.read(&f, 0, 1 << 20, &gd, 0);
    b.read(&f, 0, 1 << 20, &gh, 0);
    let r = loader.run(b).unwrap();
    assert!(back(&*dev, 0, 1 << 20) == data && back(&*h, 0, 1 << 20) == data);
    let on = |id| r.dests.iter().find(|x| x.region == id).unwrap();
    assert!(on(gd.id()).io.starts_with("O_DIRECT: the destination is device memory"), "{r}");
    assert!(on(gh.id()).io.starts_with("buffered:"), "{r}");
}

/// Unshuffled 4 KiB records, one after another in the file and in the destination: their
/// requests merge up to the chunk size (fewer requests, the same bytes); shuffled ones do not.
#[test]
fn contiguous_records_merge_into_chunk_sized_requests() {
    const REC: u64 = 4096;
    const N: u64 = 256;
    let d = tempfile::tempdir().unwrap();
    let data = pattern(5, (REC * N) as usize);
    let p = cached_file(d.path(), "src", &data);
    let reg = registry();
    let (h, g) = host(&reg, REC * N);
    for io in [IoMode::Direct, IoMode::Buffered] {
        let loader = Loader::new(&reg, opts(io)).unwrap();
        let f = loader.open(&p).unwrap();
        let run = |order: &[u64]| {
            h.write_at(0, &vec![0u8; (REC * N) as usize]).unwrap();
            let mut b = Batch::new();
            for (k, &i) in order.iter().enumerate() {
                b.read(&f, i * REC, REC, &g, k as u64 * REC);
            }
            let r = loader.run(b).unwrap();
            for (k, &i) in order.iter().enumerate() {
                let s = (i * REC) as usize;
                assert!(back(&*h, k as u64 * REC, REC as usize) == data[s..s + REC as usize], "{io:?} record {i}");
            }
            assert_eq!((r.bytes, r.bytes_direct()), (REC * N, REC * N), "{io:?}");
            r.requests
        };
        let in_order: Vec<u64> = (0..N).collect();
        let requests = run(&in_order);
        assert_eq!(requests as u64, REC * N / (256 << 10), "{io:?}: one request per 256 KiB chunk");
        // Every other record reversed: no two neighbours continue each other.
        let scattered: Vec<u64> = (0..N).map(|i| if i % 2 == 0 { i } else { N - i }).collect();
        assert_eq!(run(&scattered) as u64, N, "{io:?}");
    }
}
