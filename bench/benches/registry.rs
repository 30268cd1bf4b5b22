//! Registry benchmarks: address -> region lookup against a `RwLock<BTreeMap>` baseline, lookups
//! under a concurrent writer, and resolve cached vs uncached.
//!
//! Regions are 64 KiB slices of one memfd pool (realistic registration size for pinned I/O
//! buffers), registered back to back; lookups cycle through 4096 random addresses inside them.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use peermem::{BarRegion, HostRegion, HostSlice, PeerMemory, Registration, Registry, Topology, VirtAddr};
use peermem_bench::{largest_fixture, xorshift};

const REGION: u64 = 64 * 1024;
const PROBES: usize = 4096;

/// The baseline: start -> (last byte, region) under a reader-writer lock.
type Baseline = RwLock<BTreeMap<u64, (u64, Arc<dyn PeerMemory>)>>;

struct Setup {
    reg: Registry,
    _pool: Arc<HostRegion>,
    _guards: Vec<Registration>,
    probes: Vec<VirtAddr>,
    baseline: Baseline,
}

fn setup(n: u64) -> Setup {
    let topo = Arc::new(Topology::discover(largest_fixture()).expect("fixture"));
    let reg = Registry::new(topo);
    let pool = Arc::new(HostRegion::new(n * REGION).expect("pool"));
    let base = pool.cpu_range().unwrap().start().raw();
    let mut guards = Vec::with_capacity(n as usize);
    let mut baseline = BTreeMap::new();
    for i in 0..n {
        let s: Arc<dyn PeerMemory> = Arc::new(HostSlice::new(pool.clone(), i * REGION, REGION).unwrap());
        baseline.insert(base + i * REGION, (base + (i + 1) * REGION - 1, s.clone()));
        guards.push(reg.register(s).unwrap());
    }
    let mut rng = xorshift(42);
    let probes = (0..PROBES).map(|_| VirtAddr::new(base + rng() % (n * REGION))).collect();
    Setup { reg, _pool: pool, _guards: guards, probes, baseline: RwLock::new(baseline) }
}

fn baseline_lookup(map: &Baseline, va: u64) -> Option<u64> {
    let m = map.read().unwrap();
    let (start, (last, _)) = m.range(..=va).next_back()?;
    (va <= *last).then(|| va - start)
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_va");
    for n in [1u64, 1_000, 100_000] {
        let s = setup(n);
        let mut reader = s.reg.reader();
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("registry_reader", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & (PROBES - 1);
                black_box(reader.lookup_va(black_box(s.probes[i])).map(|h| h.offset))
            })
        });
        // The loop's own cost (probe load + black_box), to read the others against.
        g.bench_with_input(BenchmarkId::new("harness_only", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & (PROBES - 1);
                black_box(black_box(s.probes[i]).raw())
            })
        });
        let snap = s.reg.snapshot();
        g.bench_with_input(BenchmarkId::new("registry_snapshot", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & (PROBES - 1);
                black_box(snap.lookup_va(black_box(s.probes[i])).map(|h| h.offset))
            })
        });
        drop(snap);
        g.bench_with_input(BenchmarkId::new("rwlock_btreemap", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & (PROBES - 1);
                black_box(baseline_lookup(&s.baseline, black_box(s.probes[i].raw())))
            })
        });
    }
    g.finish();
}

/// Lookups on this thread while `readers - 1` other threads look up and one writer thread
/// registers and unregisters regions continuously.
fn lookup_under_writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_va_with_writer");
    g.measurement_time(Duration::from_secs(3));
    let n = 100_000u64;
    let s = Arc::new(setup(n));
    let churn_pool = Arc::new(HostRegion::new(64 * REGION).unwrap());
    for readers in [1usize, 2] {
        for (name, use_baseline) in [("registry_reader", false), ("rwlock_btreemap", true)] {
            let stop = Arc::new(AtomicBool::new(false));
            let mut threads = Vec::new();
            {
                let (s, stop, pool) = (s.clone(), stop.clone(), churn_pool.clone());
                threads.push(std::thread::spawn(move || {
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let sl: Arc<dyn PeerMemory> =
                            Arc::new(HostSlice::new(pool.clone(), (k % 64) * REGION, REGION).unwrap());
                        if use_baseline {
                            let key = sl.cpu_range().unwrap().start().raw();
                            s.baseline.write().unwrap().insert(key, (key + REGION - 1, sl));
                            s.baseline.write().unwrap().remove(&key);
                        } else {
                            drop(s.reg.register(sl).unwrap());
                        }
                        k += 1;
                    }
                }));
            }
            for t in 1..readers {
                let (s, stop) = (s.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    let mut reader = s.reg.reader();
                    let mut i = t * 977;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 1) & (PROBES - 1);
                        if use_baseline {
                            black_box(baseline_lookup(&s.baseline, s.probes[i].raw()));
                        } else {
                            black_box(reader.lookup_va(s.probes[i]).map(|h| h.offset));
                        }
                    }
                }));
            }
            let mut reader = s.reg.reader();
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new(name, format!("{readers}_readers")), |b| {
                b.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        i = (i + 1) & (PROBES - 1);
                        if use_baseline {
                            black_box(baseline_lookup(&s.baseline, s.probes[i].raw()));
                        } else {
                            black_box(reader.lookup_va(s.probes[i]).map(|h| h.offset));
                        }
                    }
                    t0.elapsed()
                })
            });
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                t.join().unwrap();
            }
        }
    }
    g.finish();
}

fn resolve(c: &mut Criterion) {
    let topo = Arc::new(Topology::discover(largest_fixture()).expect("fixture"));
    // A provider with a memory BAR and a different client: the first such pair of the fixture.
    let (prov, bar) = topo
        .devices()
        .iter()
        .find_map(|d| d.bars.iter().find(|b| b.kind == peermem::pci::BarKind::Mem).map(|b| (d.bdf, b)))
        .expect("a device with a memory BAR");
    let client = topo.devices().iter().rev().find(|d| d.bdf != prov).expect("a second device").bdf;
    let reg = Registry::new(topo.clone());
    let region: Arc<dyn PeerMemory> = Arc::new(BarRegion { bdf: prov, bar: bar.index, offset: 0, len: bar.cpu.len() });
    let guard = reg.register(region).unwrap();
    let peer = reg.peer(client).unwrap();
    let mut g = c.benchmark_group("resolve");
    g.bench_function("cached", |b| b.iter(|| black_box(reg.resolve(black_box(&guard), peer).unwrap().kind)));
    g.bench_function("uncached", |b| b.iter(|| black_box(reg.resolve_uncached(black_box(&guard), peer).unwrap().kind)));
    g.finish();
}

criterion_group!(benches, lookup, lookup_under_writer, resolve);
criterion_main!(benches);
