//! Vulkan backend benchmarks (lavapipe in CI): export+import latency, and GPU copy
//! (vkCmdCopyBuffer + fence) and CPU copy throughput for 64 MiB, as ratios to a plain memcpy
//! measured in the same run (printed as `ratio ...`; target >= 0.9: lavapipe copies are
//! memcpy-bound, so the ratio is the figure that travels between machines).
//!
//! No Vulkan loader or device: the run fails with what is missing, unless PEERMEM_SKIP_VULKAN=1.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use peermem::HostRegion;
use peermem::PeerMemory;
use peermem_vulkan::{Device, Placement, Select, VulkanRegion};

const COPY: u64 = 64 << 20;

fn open() -> Option<Device> {
    match Device::open(Select::Best) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("PEERMEM_SKIP_VULKAN").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (PEERMEM_SKIP_VULKAN=1): {e}");
            None
        }
        Err(e) => panic!("the Vulkan benchmarks need a loader and device (lavapipe); PEERMEM_SKIP_VULKAN=1 skips: {e}"),
    }
}

fn export_import(c: &mut Criterion) {
    let Some(a) = open() else { return };
    let b = Device::open(Select::Best).unwrap();
    let mut g = c.benchmark_group("vulkan_export_import");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    for len in [64u64 << 10, 16 << 20] {
        let r = a.allocate(len, Placement::DeviceLocal).unwrap();
        g.bench_with_input(BenchmarkId::new("export", len), &len, |bn, _| bn.iter(|| black_box(r.export().unwrap())));
        g.bench_with_input(BenchmarkId::new("export+import+drop", len), &len, |bn, _| {
            bn.iter(|| black_box(b.import(r.export().unwrap()).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("allocate+drop", len), &len, |bn, _| {
            bn.iter(|| black_box(a.allocate(len, Placement::DeviceLocal).unwrap()))
        });
    }
    g.finish();
}

struct Copies {
    dev: Device,
    src: VulkanRegion,
    dst: VulkanRegion,
    host: VulkanRegion,
    vsrc: Vec<u8>,
    vdst: Vec<u8>,
}

fn setup() -> Option<Copies> {
    let dev = open()?;
    let src = dev.allocate(COPY, Placement::DeviceLocal).unwrap();
    let dst = dev.allocate(COPY, Placement::DeviceLocal).unwrap();
    let h = Arc::new(HostRegion::new(COPY).unwrap());
    h.write_at(0, &vec![7u8; COPY as usize]).unwrap();
    let host = dev.import_host(h).unwrap();
    // Touch every page of every buffer once, so no measurement pays first-touch faults.
    let fill = vec![0x5au8; COPY as usize];
    src.write_at(0, &fill).unwrap();
    dst.write_at(0, &fill).unwrap();
    Some(Copies { dev, src, dst, host, vsrc: fill.clone(), vdst: fill })
}

/// Each copy timed `ROUNDS` times, interleaved so background load hits all alike, after a
/// warm-up (the driver's queue thread, page tables). Prints median and best-of ratios to memcpy.
fn ratios(s: &mut Copies) {
    const WARMUP: usize = 3;
    const ROUNDS: usize = 31;
    let mut t: [Vec<Duration>; 4] = Default::default();
    for round in 0..WARMUP + ROUNDS {
        let mut time = |i: usize, f: &mut dyn FnMut()| {
            let x = Instant::now();
            f();
            if round >= WARMUP {
                t[i].push(x.elapsed());
            }
        };
        time(0, &mut || {
            s.vdst.copy_from_slice(black_box(&s.vsrc));
            black_box(&s.vdst);
        });
        time(1, &mut || s.dev.copy(&s.src, 0, &s.dst, 0, COPY).unwrap());
        time(2, &mut || s.src.copy_to(0, &s.dst, 0, COPY).unwrap());
        time(3, &mut || s.dev.copy(&s.host, 0, &s.dst, 0, COPY).unwrap());
    }
    for v in &mut t {
        v.sort();
    }
    let (med, best): (Vec<f64>, Vec<f64>) =
        t.iter().map(|v| (v[v.len() / 2].as_secs_f64(), v[0].as_secs_f64())).unzip();
    let gbps = |secs: f64| COPY as f64 / secs / 1e9;
    println!("\nvulkan copies of 64 MiB on '{}' ({ROUNDS} interleaved rounds; median / best):", s.dev.info().name);
    println!("  {:<34}{:>6.2} / {:>6.2} GB/s", "memcpy (Vec -> Vec)", gbps(med[0]), gbps(best[0]));
    let names =
        ["gpu copy (vkCmdCopyBuffer+fence)", "cpu copy (mapped -> mapped)", "gpu copy from host-pointer import"];
    for (i, name) in names.iter().enumerate() {
        let (m, b) = (med[i + 1], best[i + 1]);
        println!(
            "  {name:<34}{:>6.2} / {:>6.2} GB/s  ratio to memcpy {:.3} / {:.3}",
            gbps(m),
            gbps(b),
            med[0] / m,
            best[0] / b
        );
    }
}

fn copies(c: &mut Criterion) {
    let Some(mut s) = setup() else { return };
    ratios(&mut s);
    let mut g = c.benchmark_group("vulkan_copy_64MiB");
    g.throughput(Throughput::Bytes(COPY)).sample_size(10).measurement_time(Duration::from_secs(4));
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            s.vdst.copy_from_slice(black_box(&s.vsrc));
            black_box(&s.vdst);
        })
    });
    g.bench_function("gpu_copy", |b| b.iter(|| s.dev.copy(&s.src, 0, &s.dst, 0, COPY).unwrap()));
    g.bench_function("cpu_copy", |b| b.iter(|| s.src.copy_to(0, &s.dst, 0, COPY).unwrap()));
    g.bench_function("gpu_copy_from_host_import", |b| b.iter(|| s.dev.copy(&s.host, 0, &s.dst, 0, COPY).unwrap()));
    g.finish();
    ratios(&mut s);
}

criterion_group!(benches, export_import, copies);
criterion_main!(benches);
