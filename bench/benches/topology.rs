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
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use peermem::Topology;
use peermem_bench::largest_fixture;

/// Copies the plain files and symlinks of `from` (not its subdirectories) into a new `to`.
fn copy_function(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let ty = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), dest).unwrap();
        } else if ty.is_file() {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if !from.exists() {
        return;
    }
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let ty = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if ty.is_dir() {
            copy_tree(&e.path(), &dest);
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), dest).unwrap();
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Builds the synthetic 1024-endpoint sysroot under `root` (see the module comment).
fn synthetic(root: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-wide");
    for dir in ["proc", "sys/devices/virtual", "sys/kernel"] {
        copy_tree(&src.join(dir), &root.join(dir));
    }
    let hb = src.join("sys/devices/pci0000:00");
    let (rp, up) = (hb.join("0000:00:01.0"), hb.join("0000:00:01.0/0000:01:00.0"));
    let (down, ep) = (up.join("0000:02:00.0"), up.join("0000:02:00.0/0000:03:00.0"));
    let out = root.join("sys/devices/pci0000:00");
    copy_function(&hb.join("0000:00:00.0"), &out.join("0000:00:00.0"));
    for r in 0..8u32 {
        let upbus = 1 + r * 18;
        let rp_dir = out.join(format!("0000:00:{:02x}.0", r + 1));
        copy_function(&rp, &rp_dir);
        let up_dir = rp_dir.join(format!("0000:{upbus:02x}:00.0"));
        copy_function(&up, &up_dir);
        for d in 0..16u32 {
            let down_dir = up_dir.join(format!("0000:{:02x}:{d:02x}.0", upbus + 1));
            copy_function(&down, &down_dir);
            for f in 0..8u32 {
                copy_function(&ep, &down_dir.join(format!("0000:{:02x}:00.{f}", upbus + 2 + d)));
            }
        }
    }
}

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
    synthetic(&wide);
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
