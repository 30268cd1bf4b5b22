//! Topology discovery of the largest captured fixture, and one uncached verdict.

use std::hint::black_box;

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
}

criterion_group!(benches, discovery);
criterion_main!(benches);
