//! shard_loader: an ML-style dataset read into Vulkan memory batch by batch with
//! `peermem_loader::ShardReader`, every record checked.
//!
//! Generates `--files` shard files of `--per-file` fixed-size records (`--record` bytes, default
//! 128 KiB) in a temporary directory, then reads `--epochs` shuffled epochs of `--batch` records
//! into a ring of device-local Vulkan buffers (`--host-visible`: host-visible ones) with
//! `--prefetch` batches in flight, as rank `--rank` of `--world`. Each record carries its own
//! index and a pattern derived from it; every record of every batch is compared, and each epoch
//! must deliver this rank's share exactly (with `--world 1`: every record once). Prints the
//! route, how the bytes moved and MB/s per epoch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use peermem::{Registry, Topology};
use peermem_examples::size;
use peermem_loader::{partition, Layout, Loader, Options, RingBuffer, ShardOptions, ShardReader};
use peermem_vulkan::{Device, Placement, Select};

struct Args {
    files: usize,
    per_file: usize,
    record: u64,
    batch: usize,
    prefetch: usize,
    epochs: u64,
    rank: usize,
    world: usize,
    placement: Placement,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        files: 64,
        per_file: 16,
        record: 128 << 10,
        batch: 32,
        prefetch: 2,
        epochs: 2,
        rank: 0,
        world: 1,
        placement: Placement::DeviceLocal,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--files" => a.files = v()?.parse()?,
            "--per-file" => a.per_file = v()?.parse()?,
            "--record" => a.record = size(&v()?).map_err(anyhow::Error::msg)?,
            "--batch" => a.batch = v()?.parse()?,
            "--prefetch" => a.prefetch = v()?.parse()?,
            "--epochs" => a.epochs = v()?.parse()?,
            "--rank" => a.rank = v()?.parse()?,
            "--world" => a.world = v()?.parse()?,
            "--host-visible" => a.placement = Placement::Mappable,
            _ => bail!("unknown argument '{k}' (see the header of examples/shard_loader.rs)"),
        }
    }
    if a.files == 0 || a.per_file == 0 || a.record < 8 {
        bail!("need at least one file, one record per file and 8-byte records");
    }
    Ok(a)
}

/// Record `g`: its index, then bytes derived from it and their position.
fn record_bytes(g: usize, len: u64) -> Vec<u8> {
    let mut v: Vec<u8> =
        (0..len as usize).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 11) as u8 ^ g as u8).collect();
    v[..8].copy_from_slice(&(g as u64).to_le_bytes());
    v
}

/// A directory removed on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(a: Args) -> Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("peermem-shards-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let paths: Vec<PathBuf> = (0..a.files)
        .map(|f| {
            let p = dir.0.join(format!("shard-{f:05}.bin"));
            let data: Vec<u8> = (0..a.per_file).flat_map(|k| record_bytes(f * a.per_file + k, a.record)).collect();
            std::fs::write(&p, data).map(|_| p)
        })
        .collect::<Result<_, _>>()?;
    let n = a.files * a.per_file;
    println!("shard_loader: {} files x {} records of {} bytes in {}", a.files, a.per_file, a.record, dir.0.display());

    let topo = Arc::new(Topology::discover("/").map_err(|e| anyhow::anyhow!("{e}"))?);
    let reg = Registry::new(topo);
    let dev = Device::open(Select::Best).context("a Vulkan device")?;
    let loader = Arc::new(Loader::new(&reg, Options::from_env()?)?);
    // One data set: the I/O mode (PEERMEM_IO, Auto by default) judges the files together.
    let files = loader.open_many(&paths)?;
    let opts = ShardOptions {
        batch_size: a.batch,
        prefetch: a.prefetch,
        ring: a.prefetch + 2,
        shuffle: true,
        seed: 2026,
        rank: a.rank,
        world_size: a.world,
        drop_last: false,
        uneven: false,
        ..ShardOptions::default()
    };
    let placement = a.placement;
    let mut reader =
        ShardReader::new(loader.clone(), files, Layout::Fixed { record: a.record }, opts.clone(), |l, len| {
            RingBuffer::vulkan(l, &dev, len, placement)
        })?;
    println!("device {} ({:?} ring buffers), engine {}", dev.info().name, placement, loader.engine());
    for epoch in 0..a.epochs {
        reader.set_epoch(epoch)?;
        let t = Instant::now();
        let (mut seen, mut bytes, mut batches) = (Vec::new(), 0u64, 0);
        while let Some(b) = reader.next_batch() {
            let b = b?;
            if batches == 0 && epoch == 0 {
                let d = &b.report.dests[0];
                println!("route {}, {} ({})", d.route_name(), d.via.name(), d.method);
                for r in &d.reasons {
                    println!("  why: {r}");
                }
            }
            for (i, &g) in b.indices.iter().enumerate() {
                let got = b.read_record(i).context("reading a record back through the buffer's CPU mapping")?;
                if got != record_bytes(g, a.record) {
                    bail!("epoch {epoch}: record {g} (batch position {i}) differs");
                }
            }
            bytes += b.report.bytes;
            batches += 1;
            seen.extend(b.indices.iter().copied());
        }
        let secs = t.elapsed().as_secs_f64();
        if seen != partition(n, epoch, &opts) {
            bail!("epoch {epoch}: this rank's records are not its DistributedSampler share");
        }
        if a.world == 1 {
            let mut s = seen.clone();
            s.sort_unstable();
            if s != (0..n).collect::<Vec<_>>() {
                bail!("epoch {epoch}: not every record exactly once");
            }
        }
        println!(
            "epoch {epoch}: {batches} batches, {} records checked, {bytes} bytes in {secs:.3} s = {:.1} MB/s",
            seen.len(),
            bytes as f64 / secs / 1e6
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shard_loader: {e:#}");
            ExitCode::FAILURE
        }
    }
}
