//! Topology discovery and verdicts:
//! - discovery of the largest captured fixture (`discover/<n>_functions/<name>`) and of a
//!   synthetic machine with 1024 endpoints (`discover/<n>_functions/synthetic`);
//! - one uncached verdict (`verdict/uncached_pair`);
//! - every ordered pair of the synthetic machine's 1024 endpoints (about a million pairs): the
//!   kernel's map type and distance alone (`all_pairs/kernel_calc`), and the full verdict with
//!   labels, bandwidth and reasons (`all_pairs/verdict`), and every pair's facts (map type,
//!   distance, labels, ACS counts, bottleneck) from a `PairMatrix` built inside the timed loop
//!   (`all_pairs/matrix`).
//!
//! The synthetic machine is built from the `qemu-wide` capture's own function directories (root
//! port, switch upstream and downstream ports, NVMe endpoint): 8 root ports, each with a switch
//! of 16 downstream ports, each with an 8-function endpoint.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use peermem::Topology;
use peermem_bench::largest_fixture;

fn discovery(c: &mut Criterion) {
    let root = largest_fixture();
    let n = Topology::discover(&root).expect("fixture").len();
    let name = format!("discover/{}_functions/{}", n, root.file_name().unwrap().to_string_lossy());
    c.bench_function(&name, |b| b.iter(|| black_box(Topology::discover(black_box(&root)).unwrap().len())));
    let t = Topology::discover(&root).unwrap();
    let eps: Vec<_> = t.endpoints().collect();
    let (a, z) = (eps[0], *eps.last().unwrap());
    c.bench_function("verdict/uncached_pair", |b| b.iter(|| black_box(t.verdict(black_box(a), black_box(z)).distance)));

    let wide: PathBuf = std::env::temp_dir().join(format!("peermem-bench-wide-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&wide);
    peermem_bench::synthetic_wide(&wide);
    let t = Topology::discover(&wide).expect("synthetic sysroot");
    let eps: Vec<_> = t.endpoints().collect();
    assert_eq!(eps.len(), 1024, "synthetic endpoints");
    let mut g = c.benchmark_group("discover");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function(format!("{}_functions/synthetic", t.len()), |b| {
        b.iter(|| black_box(Topology::discover(black_box(&wide)).unwrap().len()))
    });
    g.finish();
    let mut g = c.benchmark_group("all_pairs");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("kernel_calc", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &p in &eps {
                for &q in &eps {
                    acc += peermem::verdict::calc_map_type_and_dist(&t, p, q).distance as u64;
                }
            }
            black_box(acc)
        })
    });
    g.bench_function("matrix", |b| {
        b.iter(|| {
            let m = peermem::PairMatrix::new(&t, eps.iter().copied());
            let mut acc = 0u64;
            for p in 0..eps.len() {
                for q in 0..eps.len() {
                    let f = m.facts(p, q);
                    acc += f.distance as u64 + f.path as u64 + f.bandwidth_gbs.map_or(0, f64::to_bits);
                }
            }
            black_box(acc)
        })
    });
    g.bench_function("verdict", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for &p in &eps {
                for &q in &eps {
                    acc += t.verdict(p, q).distance as u64;
                }
            }
            black_box(acc)
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&wide);
}

criterion_group!(benches, discovery);
criterion_main!(benches);
