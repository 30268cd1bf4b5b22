//! The asynchronous loader on this machine: files in a tempdir, host memory and lavapipe Vulkan
//! buffers as destinations, both I/O engines, each I/O mode (O_DIRECT, the page cache, Auto).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use peermem::{HostRegion, PeerMemory};
use peermem_loader::{Batch, Dest, Engine, IoMode, LoadError, Loader, Options, Verify, Via};
use peermem_vulkan::{Device, Placement, Select};

mod common;
use common::{back, host, pattern, registry};

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// O_DIRECT: the tests below that do not name a mode hold the O_DIRECT rules (alignment,
/// staging, strictness).
fn opts(engine: Engine) -> Options {
    Options { engine, chunk: 256 << 10, depth: 8, io: IoMode::Direct, ..Options::default() }
}

#[test]
fn a_batch_over_many_files_lands_every_byte_with_either_engine() {
    let d = tempfile::tempdir().unwrap();
    let files: Vec<(PathBuf, Vec<u8>)> = (0..5u32)
        .map(|i| {
            let data = pattern(i, (1 << 20) + 4096 * i as usize + 77 * i as usize);
            (write_file(d.path(), &format!("f{i}"), &data), data)
        })
        .collect();
    let reg = registry();
    for engine in [Engine::Uring, Engine::Pool] {
        let loader = Loader::new(&reg, opts(engine)).unwrap();
        let (h, g) = host(&reg, 8 << 20);
        let mut b = Batch::new();
        let mut expect = Vec::new();
        let mut doff = 0u64;
        for (i, (p, data)) in files.iter().enumerate() {
            let f = loader.open(p).unwrap();
            // Aligned whole files, and ranges starting and ending anywhere.
            let (off, len) = match i % 3 {
                0 => (0, data.len() as u64),
                1 => (4096, (512 << 10) + 3),
                _ => (777, 300_001),
            };
            b.read(&f, off, len, &g, doff);
            expect.push((doff, data[off as usize..(off + len) as usize].to_vec()));
            doff = (doff + len).div_ceil(4096) * 4096 + if i == 3 { 5 } else { 0 };
        }
        let r = loader.submit(b).unwrap().wait().unwrap();
        for (doff, want) in &expect {
            assert!(back(&*h, *doff, want.len()) == *want, "{engine:?}: bytes at {doff:#x} differ");
        }
        assert_eq!(r.bytes, expect.iter().map(|(_, w)| w.len() as u64).sum::<u64>());
        assert_eq!(r.dests.len(), 1);
        assert_eq!(r.dests[0].via, Via::Direct, "{r}");
        assert_eq!(r.dests[0].bytes_direct + r.dests[0].bytes_staged, r.bytes);
        assert!(r.dests[0].reasons.iter().any(|s| s.starts_with("plan: direct")), "{r}");
        assert!(r.fallbacks.iter().any(|f| f.contains("not aligned for a direct read")), "{r}");
        match engine {
            Engine::Uring => {
                assert_eq!(r.engine, "io_uring");
                assert!(r.dests[0].method.contains("fixed buffers"), "{r}");
            }
            _ => assert!(r.fallbacks.iter().any(|f| f.contains("pread thread pool")), "{r}"),
        }
    }
}

/// A destination read once and larger than the fixed-buffer bound (a fresh buffer the size of a
/// file) is read with plain reads, which pin each request's pages as it goes, not registered
/// (every page faulted and pinned) before the first read; anonymous memory lands every byte.
#[test]
fn a_large_fresh_destination_is_not_registered_as_a_fixed_buffer() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(5, (65 << 20) + 4096);
    let p = write_file(d.path(), "big", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Uring)).unwrap();
    let f = loader.open(&p).unwrap();
    let h = Arc::new(HostRegion::anonymous(data.len() as u64).unwrap());
    let g = reg.register(h.clone() as Arc<dyn PeerMemory>).unwrap();
    let r = loader.read(&f, 0, data.len() as u64, &g, 0).unwrap();
    assert_eq!(r.dests[0].via, Via::Direct, "{r}");
    assert!(r.dests[0].method.contains("O_DIRECT reads into the destination's pages"), "{r}");
    assert!(!r.dests[0].method.contains("fixed buffers"), "{r}");
    assert!(back(&*h, 0, data.len()) == data, "bytes differ");
}

#[test]
fn misaligned_reads_write_nothing_outside_their_destination_range() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(9, 3 << 20);
    let p = write_file(d.path(), "src", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    let (h, g) = host(&reg, 4 << 20);
    for (off, len, doff) in [(1u64, 4095u64, 3u64), (4095, 2, 8190), (12_345, 1_000_000, 100_003), (0, 3 << 20, 1)] {
        h.write_at(0, &vec![0xA5; 4 << 20]).unwrap();
        loader.read(&f, off, len, &g, doff).unwrap();
        let all = back(&*h, 0, 4 << 20);
        let (s, e) = (doff as usize, (doff + len) as usize);
        assert!(all[..s].iter().all(|&b| b == 0xA5), "{off}+{len}: bytes before the range changed");
        assert!(all[e..].iter().all(|&b| b == 0xA5), "{off}+{len}: bytes after the range changed");
        assert!(all[s..e] == data[off as usize..(off + len) as usize], "{off}+{len}: wrong bytes");
    }
}

#[test]
fn strict_refuses_what_cannot_go_direct_and_names_why() {
    let d = tempfile::tempdir().unwrap();
    let p = write_file(d.path(), "src", &pattern(1, 1 << 20));
    let reg = registry();
    let loader = Loader::new(&reg, Options { strict: true, ..opts(Engine::Auto) }).unwrap();
    let f = loader.open(&p).unwrap();
    let (_h, g) = host(&reg, 1 << 20);
    let r = loader.read(&f, 0, 1 << 20, &g, 0).unwrap();
    assert!(r.direct() && r.bytes_staged() == 0, "{r}");
    match loader.read(&f, 100, 4096, &g, 0) {
        Err(LoadError::NotDirect { why, .. }) => assert!(why.contains("aligned"), "{why}"),
        other => panic!("expected NotDirect, got {other:?}"),
    }
}

#[test]
fn verification_hashes_each_read_and_catches_a_wrong_expectation() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(4, 600_000);
    let p = write_file(d.path(), "src", &data);
    let reg = registry();
    let (_h, g) = host(&reg, 1 << 20);
    let off = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = off.open(&p).unwrap();
    let r = off.read(&f, 0, 600_000, &g, 0).unwrap();
    assert_eq!((r.verified, r.checksums.len()), (None, 0), "verification is off by default");

    let want = xxhash_rust::xxh3::xxh3_64(&data[5..500_005]);
    let hash = Loader::new(&reg, Options { verify: Verify::Hash, ..opts(Engine::Auto) }).unwrap();
    let mut b = Batch::new();
    b.read_expect(&f, 5, 500_000, &g, 0, want);
    let r = hash.run(b).unwrap();
    assert_eq!((r.verified, r.checksums.clone()), (Some(true), vec![want]));
    let mut b = Batch::new();
    b.read_expect(&f, 5, 500_000, &g, 0, want ^ 1);
    assert!(matches!(hash.run(b), Err(LoadError::HashMismatch { .. })));

    let reread = Loader::new(&reg, Options { verify: Verify::Reread, ..opts(Engine::Auto) }).unwrap();
    let r = reread.read(&f, 4096, 300_000, &g, 0).unwrap();
    assert_eq!(r.verified, Some(true));
    let want = xxhash_rust::xxh3::xxh3_64(&data[4096..304_096]);
    assert_eq!((r.checksums.clone(), r.source_checksums.clone()), (vec![want], vec![want]));
}

#[test]
fn bad_input_gets_typed_errors() {
    let d = tempfile::tempdir().unwrap();
    let p = write_file(d.path(), "src", &pattern(2, 10_000));
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let e = loader.open(d.path().join("missing")).unwrap_err();
    assert!(matches!(&e, LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{e}");
    assert!(matches!(loader.open(d.path()), Err(LoadError::NotAFile { kind: "a directory", .. })));
    assert!(matches!(loader.open("/dev/zero"), Err(LoadError::NotAFile { kind: "a character device", .. })));
    let fifo = d.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert!(matches!(loader.open(&fifo), Err(LoadError::NotAFile { kind: "a FIFO", .. })));

    let f = loader.open(&p).unwrap();
    let (_h, g) = host(&reg, 8192);
    assert!(matches!(loader.read(&f, 0, 10_001, &g, 0), Err(LoadError::BadRange { .. })));
    assert!(matches!(loader.read(&f, 9_999, 2, &g, 0), Err(LoadError::BadRange { .. })));
    assert!(matches!(loader.read(&f, u64::MAX, 2, &g, 0), Err(LoadError::BadRange { .. })));
    assert!(matches!(loader.read(&f, 0, 0, &g, 0), Err(LoadError::BadRange { .. })));
    assert!(matches!(loader.read(&f, 0, 8193, &g, 0), Err(LoadError::TooSmall { .. })));
    assert!(matches!(loader.read(&f, 0, 100, &g, 8100), Err(LoadError::TooSmall { .. })));
    assert!(matches!(loader.read(&f, 0, 100, &g, u64::MAX), Err(LoadError::TooSmall { .. })));
    // A file that shrank after it was opened: a short read, not a hang or garbage.
    let q = write_file(d.path(), "shrinks", &pattern(3, 1 << 20));
    let s = loader.open(&q).unwrap();
    std::fs::OpenOptions::new().write(true).open(&q).unwrap().set_len(4096).unwrap();
    let (_h2, g2) = host(&reg, 1 << 20);
    assert!(matches!(loader.read(&s, 0, 1 << 20, &g2, 0), Err(LoadError::ShortRead { .. })));
    // The loader still works after every error.
    loader.read(&f, 0, 8192, &g, 0).unwrap();
}

#[test]
fn a_region_unregistered_while_its_reads_are_in_flight_is_an_error_and_stays_valid() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(5, 8 << 20);
    let p = write_file(d.path(), "src", &data);
    let reg = registry();
    let before = reg.len();
    // One reader, small requests: the batch takes long enough that the registration is dropped
    // while it runs (or before it starts: the same error).
    let loader =
        Loader::new(&reg, Options { engine: Engine::Pool, depth: 1, chunk: 4096, ..Options::default() }).unwrap();
    let f = loader.open(&p).unwrap();
    let (h, g) = host(&reg, 8 << 20);
    let mut b = Batch::new();
    b.read(&f, 0, 8 << 20, &g, 0);
    let t = loader.submit(b).unwrap();
    drop(g);
    assert!(matches!(t.wait(), Err(LoadError::Unregistered { .. })));
    assert_eq!(reg.len(), before);
    // The memory was held throughout and is intact now.
    assert_eq!(Arc::strong_count(&h), 1);
    let _ = back(&*h, 0, 4096);
}

#[test]
fn ticket_waits_are_bounded_and_report_once() {
    let d = tempfile::tempdir().unwrap();
    let p = write_file(d.path(), "src", &pattern(6, 1 << 20));
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    let (_h, g) = host(&reg, 1 << 20);
    let mut b = Batch::new();
    b.read(&f, 0, 1 << 20, &g, 0);
    let mut t = loader.submit(b).unwrap();
    let r = t.wait_timeout(Duration::from_secs(60)).expect("done").unwrap();
    assert_eq!(r.bytes, 1 << 20);
    assert!(t.try_wait().is_none());
    assert!(t.wait_timeout(Duration::from_millis(1)).is_none());
}

fn vulkan() -> Option<Device> {
    match Device::open(Select::Best) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("PEERMEM_SKIP_VULKAN").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (PEERMEM_SKIP_VULKAN=1): {e}");
            None
        }
        Err(e) => panic!("needs a Vulkan device (lavapipe in CI); PEERMEM_SKIP_VULKAN=1 skips: {e}"),
    }
}

#[test]
fn vulkan_buffers_fill_directly_when_host_visible_and_through_gpu_copies_when_device_local() {
    let Some(dev) = vulkan() else { return };
    let d = tempfile::tempdir().unwrap();
    let data = pattern(8, (3 << 20) + 12_345);
    let p = write_file(d.path(), "src", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = loader.open(&p).unwrap();

    let vis = Arc::new(dev.allocate(4 << 20, Placement::Mappable).unwrap());
    let gv = reg.register(vis.clone() as Arc<dyn PeerMemory>).unwrap();
    let r = loader.read(&f, 0, data.len() as u64, &gv, 0).unwrap();
    assert_eq!(r.dests[0].via, Via::Direct, "{r}");
    assert!(back(&*vis, 0, data.len()) == data);

    let local = Arc::new(dev.allocate(4 << 20, Placement::DeviceLocal).unwrap());
    let gl = reg.register(local.clone() as Arc<dyn PeerMemory>).unwrap();
    let dest: Dest = loader.vulkan_device_dest(&gl, &dev, local.clone()).unwrap();
    let mut b = Batch::new();
    b.read(&f, 0, 2 << 20, &dest, 0).read(&f, 777, 1_000_000, &dest, (2 << 20) + 1);
    let r = loader.run(b).unwrap();
    assert_eq!(r.dests[0].via, Via::GpuStaged, "{r}");
    assert_eq!(r.dests[0].bytes_staged, r.bytes);
    // Read back through the GPU into a host-visible buffer (a device-local buffer may have no
    // CPU mapping on a discrete GPU).
    dev.copy(&local, 0, &vis, 0, 4 << 20).unwrap();
    assert!(back(&*vis, 0, 2 << 20) == data[..2 << 20]);
    assert!(back(&*vis, (2 << 20) + 1, 1_000_000) == data[777..1_000_777]);

    let strict = Loader::new(&reg, Options { strict: true, ..opts(Engine::Auto) }).unwrap();
    let sd = strict.vulkan_device_dest(&gl, &dev, local.clone()).unwrap();
    assert!(matches!(strict.read(&f, 0, 4096, &sd, 0), Err(LoadError::NotDirect { .. })));
}

/// A destination whose memory is not page aligned (a slice of a pool at an odd offset, as a
/// caller's buffer can be) is not handed to O_DIRECT (EINVAL): it is staged, correctly.
#[test]
fn a_destination_not_page_aligned_in_memory_is_staged_not_refused() {
    let d = tempfile::tempdir().unwrap();
    let data = pattern(10, 1 << 20);
    let p = write_file(d.path(), "src", &data);
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    let pool = Arc::new(HostRegion::new(2 << 20).unwrap());
    let slice = Arc::new(peermem::HostSlice::new(pool.clone(), 100, 1 << 20).unwrap());
    let g = reg.register(slice.clone() as Arc<dyn PeerMemory>).unwrap();
    let r = loader.read(&f, 0, 1 << 20, &g, 0).unwrap();
    assert!(back(&*slice, 0, 1 << 20) == data);
    if f.is_direct() {
        assert_eq!((r.dests[0].bytes_direct, r.dests[0].bytes_staged), (0, 1 << 20), "{r}");
    }
}

/// The loader asks `peermem::storage`, under the registry's own root, which device serves a
/// file: a file of this machine has no device in a captured sysroot, so the CPU reads it, and
/// the report says why.
#[test]
fn a_file_is_mapped_to_its_device_under_the_registry_root() {
    let d = tempfile::tempdir().unwrap();
    let p = write_file(d.path(), "src", &pattern(11, 8192));
    let reg = registry();
    let loader = Loader::new(&reg, opts(Engine::Auto)).unwrap();
    let f = loader.open(&p).unwrap();
    let live = peermem::sysroot::Sysroot::open("/").unwrap();
    let here = peermem::storage::serving_function(&live, &p).ok().map(|s| s.bdf);
    let fixture = peermem::sysroot::Sysroot::open(reg.topology().root()).unwrap();
    let there = peermem::storage::serving_function(&fixture, &p).ok().map(|s| s.bdf);
    assert_eq!(f.device(), there, "the device comes from the registry's root, not from {here:?} of the live /sys");
    let (_h, g) = host(&reg, 8192);
    let r = loader.read(&f, 0, 8192, &g, 0).unwrap();
    assert!(r.dests[0].source.contains("src"), "{r}");
    if there.is_none() {
        assert!(r.dests[0].source.contains("read by the CPU"), "{r}");
    }
}
