//! `ShardReader` on this machine: a generated dataset of many files, read batch by batch into
//! host memory and Vulkan buffers, every record checked.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use peermem::{Registry, Topology};
use peermem_loader::{Layout, LoadError, Loader, Options, RingBuffer, ShardOptions, ShardReader};
use peermem_vulkan::{Device, Placement, Select};

const RECORD: u64 = 8192 + 512;

fn registry() -> Registry {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    Registry::new(Arc::new(Topology::discover(root).unwrap()))
}

/// The bytes of global record `g`: its index repeated, then a position-dependent pattern.
fn record_bytes(g: usize, len: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len as usize).map(|i| (i as u8).wrapping_mul(31) ^ (g as u8)).collect();
    v[..8].copy_from_slice(&(g as u64).to_le_bytes());
    v
}

/// `files` files of `per` fixed-size records; record `g` is file g / per, slot g % per.
fn dataset(dir: &Path, files: usize, per: usize) -> Vec<std::path::PathBuf> {
    (0..files)
        .map(|f| {
            let p = dir.join(format!("shard-{f:04}.bin"));
            let data: Vec<u8> = (0..per).flat_map(|k| record_bytes(f * per + k, RECORD)).collect();
            std::fs::write(&p, data).unwrap();
            p
        })
        .collect()
}

fn check_epoch(reader: &mut ShardReader) -> Vec<usize> {
    let mut seen = Vec::new();
    while let Some(b) = reader.next_batch() {
        let b = b.unwrap();
        for (i, &g) in b.indices.iter().enumerate() {
            assert_eq!(b.read_record(i).unwrap(), record_bytes(g, RECORD), "record {g}");
        }
        seen.extend(&b.indices);
    }
    seen
}

#[test]
fn two_ranks_read_every_record_exactly_once_per_epoch_into_host_rings() {
    let d = tempfile::tempdir().unwrap();
    let paths = dataset(d.path(), 12, 10);
    let reg = registry();
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let files: Vec<_> = paths.iter().map(|p| loader.open(p).unwrap()).collect();
    let mut per_epoch = Vec::new();
    for epoch in 0..2 {
        let mut all = Vec::new();
        for rank in 0..2 {
            let opts =
                ShardOptions { batch_size: 16, shuffle: true, seed: 7, rank, world_size: 2, ..Default::default() };
            let mut r = ShardReader::new(
                loader.clone(),
                files.clone(),
                Layout::Fixed { record: RECORD },
                opts,
                RingBuffer::host,
            )
            .unwrap();
            r.set_epoch(epoch).unwrap();
            assert_eq!(r.batches_per_epoch(), 60usize.div_ceil(16));
            all.extend(check_epoch(&mut r));
        }
        per_epoch.push(all.clone());
        all.sort_unstable();
        assert_eq!(all, (0..120).collect::<Vec<_>>(), "epoch {epoch}");
    }
    assert_ne!(per_epoch[0], per_epoch[1], "epochs are shuffled differently");
}

#[test]
fn a_full_ring_is_an_error_and_a_dropped_batch_frees_its_buffer() {
    let d = tempfile::tempdir().unwrap();
    let paths = dataset(d.path(), 2, 20);
    let reg = registry();
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let files: Vec<_> = paths.iter().map(|p| loader.open(p).unwrap()).collect();
    let opts = ShardOptions { batch_size: 4, prefetch: 1, ring: 2, ..Default::default() };
    let mut r = ShardReader::new(loader, files, Layout::Fixed { record: RECORD }, opts, RingBuffer::host).unwrap();
    let a = r.next_batch().unwrap().unwrap();
    let b = r.next_batch().unwrap().unwrap();
    assert!(matches!(r.next_batch(), Some(Err(LoadError::RingFull { slots: 2 }))));
    drop(a);
    let c = r.next_batch().unwrap().unwrap();
    assert_eq!(c.indices, vec![8, 9, 10, 11]);
    assert_eq!(b.read_record(0).unwrap(), record_bytes(4, RECORD));
}

#[test]
fn an_index_layout_reads_records_of_any_size_and_bad_layouts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let paths = dataset(d.path(), 3, 4);
    let reg = registry();
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let files: Vec<_> = paths.iter().map(|p| loader.open(p).unwrap()).collect();
    let raw: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let index = vec![(0, 0, 100), (1, 5, 9000), (2, RECORD * 3, RECORD), (0, 4096, 1)];
    let opts = ShardOptions { batch_size: 3, ..Default::default() };
    let mut r =
        ShardReader::new(loader.clone(), files.clone(), Layout::Index(index.clone()), opts.clone(), RingBuffer::host)
            .unwrap();
    let mut seen = HashSet::new();
    while let Some(b) = r.next_batch() {
        let b = b.unwrap();
        for (i, &g) in b.indices.iter().enumerate() {
            let (f, off, len) = index[g];
            assert_eq!(b.read_record(i).unwrap(), raw[f][off as usize..(off + len) as usize]);
            seen.insert(g);
        }
    }
    assert_eq!(seen.len(), 4);
    for bad in [vec![(3, 0, 1)], vec![(0, 0, 0)], vec![(0, RECORD * 4 - 1, 2)], vec![]] {
        let e = ShardReader::new(loader.clone(), files.clone(), Layout::Index(bad), opts.clone(), RingBuffer::host);
        assert!(matches!(e, Err(LoadError::Layout(_))));
    }
    let e =
        ShardReader::new(loader.clone(), files.clone(), Layout::Fixed { record: 1000 }, opts.clone(), RingBuffer::host);
    assert!(matches!(e, Err(LoadError::Layout(_))), "file lengths not a multiple of the record");
    let bad_rank = ShardOptions { rank: 2, world_size: 2, ..opts };
    let e = ShardReader::new(loader, files, Layout::Fixed { record: RECORD }, bad_rank, RingBuffer::host);
    assert!(matches!(e, Err(LoadError::Layout(_))));
}

#[test]
fn records_land_in_vulkan_rings_host_visible_and_device_local() {
    let dev = match Device::open(Select::Best) {
        Ok(d) => d,
        Err(e) if std::env::var("PEERMEM_SKIP_VULKAN").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (PEERMEM_SKIP_VULKAN=1): {e}");
            return;
        }
        Err(e) => panic!("needs a Vulkan device (lavapipe in CI); PEERMEM_SKIP_VULKAN=1 skips: {e}"),
    };
    let d = tempfile::tempdir().unwrap();
    let paths = dataset(d.path(), 4, 8);
    let reg = registry();
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let files: Vec<_> = paths.iter().map(|p| loader.open(p).unwrap()).collect();
    for placement in [Placement::Mappable, Placement::DeviceLocal] {
        let opts = ShardOptions { batch_size: 5, shuffle: true, seed: 1, ..Default::default() };
        let dv = dev.clone();
        let mut r = ShardReader::new(loader.clone(), files.clone(), Layout::Fixed { record: RECORD }, opts, |l, n| {
            RingBuffer::vulkan(l, &dv, n, placement)
        })
        .unwrap();
        let mut seen = Vec::new();
        while let Some(b) = r.next_batch() {
            let b = b.unwrap();
            let via = b.report.dests[0].via;
            assert_eq!(via.name(), if placement == Placement::Mappable { "direct" } else { "staged-gpu-copy" });
            // lavapipe maps device-local memory too, so the CPU can check every record.
            for (i, &g) in b.indices.iter().enumerate() {
                assert_eq!(b.read_record(i).unwrap(), record_bytes(g, RECORD), "{placement:?} record {g}");
            }
            seen.extend(b.indices.iter().copied());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..32).collect::<Vec<_>>());
    }
}

#[test]
fn records_land_in_cuda_rings_through_pinned_staging() {
    let dev = match peermem_cuda::Cuda::open(0) {
        Ok(d) => d,
        Err(e) => {
            assert!(e.is_unavailable(), "{e}");
            eprintln!("cuda rings: no CUDA driver: skipped ({e})");
            return;
        }
    };
    let d = tempfile::tempdir().unwrap();
    let paths = dataset(d.path(), 4, 8);
    let reg = Registry::new(Arc::new(Topology::discover("/").unwrap()));
    let loader = Arc::new(Loader::new(&reg, Options::default()).unwrap());
    let files: Vec<_> = paths.iter().map(|p| loader.open(p).unwrap()).collect();
    let opts = ShardOptions { batch_size: 5, shuffle: true, seed: 3, ..Default::default() };
    let mut r = ShardReader::new(loader.clone(), files, Layout::Fixed { record: RECORD }, opts, |l, n| {
        RingBuffer::cuda(l, &dev, n)
    })
    .unwrap();
    let mut seen = Vec::new();
    while let Some(b) = r.next_batch() {
        let b = b.unwrap();
        assert_eq!(b.report.dests[0].via.name(), "staged-gpu-copy");
        assert!(b.buffer().cuda_region().is_some());
        for (i, &g) in b.indices.iter().enumerate() {
            assert_eq!(b.read_record(i).unwrap(), record_bytes(g, RECORD), "record {g}");
        }
        seen.extend(b.indices.iter().copied());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..32).collect::<Vec<_>>());
}
