//! Registry benchmarks: address -> region lookup against the structures it competes with, in
//! one run, on two workloads:
//! - `big`: 100k regions of 2, 4, 6 or 8 MiB, 2 MiB-aligned, back to back (GPU/NIC buffers);
//! - `small`: 100k regions of 64 KiB back to back (pinned I/O buffers).
//!
//! Baselines, implemented here:
//! - `flat`: an SPDK-style direct-indexed table (`spdk_mem_map`): 2 MiB entries in 1 GiB leaves
//!   under a 2^18-entry root for `big`, plus a 4 KiB level for `small`; one `u64` per entry (the
//!   region's start), no bounds check, no publication, no reclamation: the floor;
//! - `rwlock_btreemap`: `RwLock<BTreeMap<start, (last, region)>>`;
//! - `sorted_vec`: a sorted `Vec` of starts searched by bisection (no lock).
//!
//! Each lookup is measured two ways, with the same loop around every variant:
//! - `thrpt`: independent probes (throughput: the CPU overlaps consecutive lookups);
//! - `chain`: each probe's address depends on the previous lookup's result (latency).
//!
//! and `harness` runs that very loop with an identity "lookup": its time is the loop's own
//! cost, to subtract from every variant (`bench/report.py` does, and prints the table). Every
//! variant folds its result (offset, plus the region's identity where it has one) into one
//! accumulator that is black-boxed once per batch, so nothing is boxed per probe.
//!
//! `probes`: 4096 random addresses inside the regions (hot in cache), or `1M` (beyond the
//! TLB's reach) for `big`.
//! Also: register + unregister with 100k live regions (`churn`), and aggregate lookups of one
//! and of two reader threads while a writer churns (`readers_with_writer`, printed).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use peermem::{BarRegion, HostRegion, HostSlice, PeerMemory, Registration, Registry, Topology, VirtAddr};
use peermem_bench::{largest_fixture, xorshift};

const N: usize = 100_000;
const MIB2: u64 = 2 << 20;
const SMALL: u64 = 64 << 10;

/// The SPDK-style table. `root[va >> 30]` -> 512 entries of 2 MiB; for 4 KiB granularity each
/// 2 MiB entry is instead an index into `pages` (512 entries of 4 KiB).
struct Flat {
    root: Vec<Option<Box<[u64; 512]>>>,
    pages: Vec<Box<[u64; 512]>>,
    four_k: bool,
}

impl Flat {
    fn new(four_k: bool) -> Flat {
        Flat { root: (0..1 << 18).map(|_| None).collect(), pages: Vec::new(), four_k }
    }
    fn insert(&mut self, start: u64, len: u64) {
        let step = if self.four_k { 4096 } else { MIB2 };
        let mut a = start;
        while a < start + len {
            let l2 = self.root[(a >> 30) as usize].get_or_insert_with(|| Box::new([0; 512]));
            let e = &mut l2[((a >> 21) & 511) as usize];
            if self.four_k {
                if *e == 0 {
                    self.pages.push(Box::new([0; 512]));
                    *e = self.pages.len() as u64;
                }
                self.pages[*e as usize - 1][((a >> 12) & 511) as usize] = start;
            } else {
                *e = start;
            }
            a += step;
        }
    }
    #[inline]
    fn lookup_2m(&self, va: u64) -> Option<u64> {
        let start = self.root[(va >> 30) as usize & ((1 << 18) - 1)].as_ref()?[((va >> 21) & 511) as usize];
        (start != 0).then(|| va - start)
    }
    #[inline]
    fn lookup_4k(&self, va: u64) -> Option<u64> {
        let page = self.root[(va >> 30) as usize & ((1 << 18) - 1)].as_ref()?[((va >> 21) & 511) as usize];
        let start = self.pages.get((page as usize).wrapping_sub(1))?[((va >> 12) & 511) as usize];
        (start != 0).then(|| va - start)
    }
}

/// The lock baseline: start -> (last byte, region).
type Locked = RwLock<BTreeMap<u64, (u64, Arc<dyn PeerMemory>)>>;

fn locked_lookup(map: &Locked, va: u64) -> Option<u64> {
    let m = map.read().unwrap();
    let (start, (last, _)) = m.range(..=va).next_back()?;
    (va <= *last).then(|| va - start)
}

fn sorted_lookup(starts: &[u64], lens: &[u64], va: u64) -> Option<u64> {
    let i = starts.partition_point(|s| *s <= va).checked_sub(1)?;
    let off = va - starts[i];
    (off < lens[i]).then_some(off)
}

struct Workload {
    name: &'static str,
    reg: Registry,
    pool: Arc<HostRegion>,
    _guards: Vec<Registration>,
    flat: Flat,
    locked: Locked,
    starts: Vec<u64>,
    lens: Vec<u64>,
    /// Pool offset just past the last region (churn registers beyond it).
    end: u64,
}

fn workload(name: &'static str) -> Workload {
    let topo = Arc::new(Topology::discover(largest_fixture()).expect("fixture"));
    let reg = Registry::new(topo);
    let mut rng = xorshift(7);
    let big = name == "big";
    let lens: Vec<u64> = (0..N).map(|_| if big { MIB2 * (1 + rng() % 4) } else { SMALL }).collect();
    let total: u64 = lens.iter().sum();
    // Room to align the first region to 2 MiB, and 64 more slots for churn.
    let pool = Arc::new(HostRegion::new(total + MIB2 + 64 * 8 * MIB2).expect("pool (virtual only)"));
    let base = pool.cpu_range().unwrap().start().raw();
    let first = base.next_multiple_of(MIB2) - base;
    let mut flat = Flat::new(!big);
    let mut locked = BTreeMap::new();
    let mut guards = Vec::with_capacity(N);
    let mut starts = Vec::with_capacity(N);
    let mut off = first;
    for &len in &lens {
        let s: Arc<dyn PeerMemory> = Arc::new(HostSlice::new(pool.clone(), off, len).unwrap());
        let va = base + off;
        flat.insert(va, len);
        locked.insert(va, (va + len - 1, s.clone()));
        starts.push(va);
        guards.push(reg.register(s).unwrap());
        off += len;
    }
    Workload { name, reg, pool, _guards: guards, flat, locked: RwLock::new(locked), starts, lens, end: off }
}

impl Workload {
    fn probes(&self, n: usize, seed: u64) -> Vec<u64> {
        let mut rng = xorshift(seed);
        (0..n)
            .map(|_| {
                let i = (rng() % N as u64) as usize;
                self.starts[i] + rng() % self.lens[i]
            })
            .collect()
    }
}

/// Independent probes: `f` per probe, results folded into one accumulator.
#[inline(always)]
fn thrpt(probes: &[u64], iters: u64, mut f: impl FnMut(u64) -> u64) -> Duration {
    let mask = probes.len() - 1;
    let t = Instant::now();
    let mut acc = 0u64;
    for k in 0..iters as usize {
        acc = acc.wrapping_add(f(probes[k & mask]));
    }
    black_box(acc);
    t.elapsed()
}

/// Dependent probes: each address carries a data dependency on the previous result (`& zero`,
/// where the compiler cannot know `zero` is 0), so lookups cannot overlap.
#[inline(always)]
fn chain(probes: &[u64], iters: u64, mut f: impl FnMut(u64) -> u64) -> Duration {
    let mask = probes.len() - 1;
    let zero = black_box(0u64);
    let t = Instant::now();
    let mut prev = 0u64;
    for k in 0..iters as usize {
        prev = f(probes[k & mask] | (prev & zero));
    }
    black_box(prev);
    t.elapsed()
}

fn lookup_group(c: &mut Criterion, w: &Workload, nprobes: usize) {
    let label = if nprobes >= 1 << 20 { "1M" } else { "4096" };
    let mut g = c.benchmark_group(g_name(w, label));
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    let probes = w.probes(nprobes, 42);
    let probes = &probes[..];
    let snap = w.reg.snapshot();
    let mut reader = w.reg.reader();
    let (starts, lens) = (&w.starts[..], &w.lens[..]);
    let four_k = w.flat.four_k;
    // PEERMEM_BENCH_NO_INTERLEAVED=1 skips this part (when profiling one criterion bench).
    if std::env::var_os("PEERMEM_BENCH_NO_INTERLEAVED").is_none() {
        interleaved(&g_name(w, label), probes, w, &snap);
    }
    let mut suffix = "";
    macro_rules! both {
        ($name:expr, $f:expr) => {
            g.bench_function(BenchmarkId::new($name, format!("thrpt{suffix}")), |b| {
                b.iter_custom(|n| thrpt(probes, n, $f))
            });
            g.bench_function(BenchmarkId::new($name, format!("chain{suffix}")), |b| {
                b.iter_custom(|n| chain(probes, n, $f))
            });
        };
    }
    // Interleaved: every variant runs in this one process, one after the other, twice over
    // for the registry and the floor, so a load change on the machine shows as a spread.
    for round in 0..2 {
        if round == 1 {
            suffix = "_again";
        }
        both!("harness", |p| p);
        if four_k {
            both!("flat", |p| w.flat.lookup_4k(p).unwrap_or(0));
        } else {
            both!("flat", |p| w.flat.lookup_2m(p).unwrap_or(0));
        }
        both!("registry_reader", |p| reader
            .lookup_va(VirtAddr::new(p))
            .map_or(0, |h| h.offset ^ (h.entry as *const _ as u64)));
        if round == 0 {
            both!("registry_snapshot", |p| snap
                .lookup_va(VirtAddr::new(p))
                .map_or(0, |h| h.offset ^ (h.entry as *const _ as u64)));
            both!("sorted_vec", |p| sorted_lookup(starts, lens, p).unwrap_or(0));
            both!("rwlock_btreemap", |p| locked_lookup(&w.locked, p).unwrap_or(0));
        }
    }
    g.finish();
}

fn g_name(w: &Workload, label: &str) -> String {
    format!("lookup_{}_{}probes", w.name, label)
}

/// The same loops as the criterion benches, but interleaved round by round (harness, flat,
/// registry, harness, ...) and keeping each variant's fastest round: on a machine shared with
/// other work, a round that was preempted or had its cache flushed only ever reads slower, so
/// the minimum is the least disturbed measurement, and all variants saw the same conditions.
/// Written to `target/criterion/<group>/interleaved.json` (ns per lookup, loop not subtracted).
fn interleaved(group: &str, probes: &[u64], w: &Workload, snap: &peermem::Snapshot) {
    const ROUNDS: usize = 21;
    let n = probes.len().max(1 << 18) as u64;
    let mut reader = w.reg.reader();
    let mut best = [[f64::MAX; 2]; 4];
    let per = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
    for _ in 0..ROUNDS {
        macro_rules! time {
            ($i:expr, $f:expr) => {
                best[$i][0] = best[$i][0].min(per(thrpt(probes, n, $f)));
                best[$i][1] = best[$i][1].min(per(chain(probes, n, $f)));
            };
        }
        time!(0, |p| p);
        if w.flat.four_k {
            time!(1, |p| w.flat.lookup_4k(p).unwrap_or(0));
        } else {
            time!(1, |p| w.flat.lookup_2m(p).unwrap_or(0));
        }
        time!(2, |p| reader.lookup_va(VirtAddr::new(p)).map_or(0, |h| h.offset ^ (h.entry as *const _ as u64)));
        time!(3, |p| snap.lookup_va(VirtAddr::new(p)).map_or(0, |h| h.offset ^ (h.entry as *const _ as u64)));
    }
    let names = ["harness", "flat", "registry_reader", "registry_snapshot"];
    let json: Vec<String> = names
        .iter()
        .zip(best)
        .map(|(k, [t, c])| format!("\"{k}\": {{\"thrpt\": {t:.4}, \"chain\": {c:.4}}}"))
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion").join(group);
    std::fs::create_dir_all(&dir).expect("criterion output directory");
    std::fs::write(dir.join("interleaved.json"), format!("{{{}}}\n", json.join(", "))).expect("interleaved.json");
    println!("{group} interleaved, fastest of {ROUNDS} rounds: {}", json.join(", "));
}

fn lookup(c: &mut Criterion) {
    let big = workload("big");
    lookup_group(c, &big, 4096);
    lookup_group(c, &big, 1 << 20);
    churn(c, &big);
    drop(big);
    let small = workload("small");
    lookup_group(c, &small, 4096);
    churn(c, &small);
    readers_with_writer(&small);
}

/// Register + unregister of one more region while 100k stay live, against the lock baseline
/// doing the same (insert with an overlap check, then remove).
fn churn(c: &mut Criterion, w: &Workload) {
    let mut g = c.benchmark_group(format!("churn_{}", w.name));
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    let len = w.lens[0];
    let slice = |k: u64| -> Arc<dyn PeerMemory> {
        Arc::new(HostSlice::new(w.pool.clone(), w.end + (k % 64) * len, len).unwrap())
    };
    let regions: Vec<_> = (0..64).map(slice).collect();
    let mut k = 0usize;
    g.bench_function("registry_register_unregister", |b| {
        b.iter(|| {
            k = (k + 1) % 64;
            drop(black_box(w.reg.register(regions[k].clone()).unwrap()))
        })
    });
    g.bench_function("rwlock_btreemap_insert_remove", |b| {
        b.iter(|| {
            k = (k + 1) % 64;
            let r = regions[k].clone();
            let start = r.cpu_range().unwrap().start().raw();
            let mut m = w.locked.write().unwrap();
            let clash = m.range(..=start + len - 1).next_back().is_some_and(|(_, (last, _))| *last >= start);
            assert!(!clash);
            m.insert(start, (start + len - 1, r));
            drop(m);
            black_box(w.locked.write().unwrap().remove(&start));
        })
    });
    g.finish();
}

/// Aggregate lookups per second of 1 and then 2 reader threads, each looping over its own
/// random probes for `WINDOW`, while one writer registers and unregisters continuously, pausing
/// `PACE` between pairs (a busy loader, not a writer owning a core: this machine has two); and
/// the same without the writer, the machine's own scaling of two threads (two vCPUs of a VM may
/// share a physical core). Counted per thread over a fixed window (not criterion: criterion's
/// own pauses would count against one thread only), alternating the four cases `ROUNDS` times
/// and keeping each count's best round. Written to
/// `target/criterion/readers_with_writer/scaling.json`.
fn readers_with_writer(w: &Workload) {
    const PACE: Duration = Duration::from_micros(20);
    const WINDOW: Duration = Duration::from_millis(500);
    const ROUNDS: usize = 5;
    let probes = w.probes(4096, 9);
    // [writer?][readers - 1]
    let mut best = [[0f64; 2]; 2];
    let mut churn = [0f64; 2];
    for _ in 0..ROUNDS {
        for (writing, readers) in [(true, 1usize), (true, 2), (false, 1), (false, 2)] {
            let stop = AtomicBool::new(false);
            let (churned, looked) = (AtomicU64::new(0), AtomicU64::new(0));
            std::thread::scope(|s| {
                if writing {
                    s.spawn(|| {
                        let len = w.lens[0];
                        let mut k = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let r = Arc::new(HostSlice::new(w.pool.clone(), w.end + (k % 64) * len, len).unwrap());
                            drop(w.reg.register(r).unwrap());
                            churned.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                            std::thread::sleep(PACE);
                        }
                    });
                }
                for t in 0..readers {
                    let (probes, stop, looked) = (&probes, &stop, &looked);
                    s.spawn(move || {
                        let mut reader = w.reg.reader();
                        let (mut n, mut acc, mut i) = (0u64, 0u64, t * 977);
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..1024 {
                                i = (i + 1) & 4095;
                                acc = acc
                                    .wrapping_add(reader.lookup_va(VirtAddr::new(probes[i])).map_or(0, |h| h.offset));
                            }
                            n += 1024;
                        }
                        black_box(acc);
                        looked.fetch_add(n, Ordering::Relaxed);
                    });
                }
                std::thread::sleep(WINDOW);
                stop.store(true, Ordering::Relaxed);
            });
            let secs = WINDOW.as_secs_f64();
            let rate = looked.load(Ordering::Relaxed) as f64 / secs;
            let cell = &mut best[usize::from(!writing)][readers - 1];
            if rate > *cell {
                *cell = rate;
                if writing {
                    churn[readers - 1] = churned.load(Ordering::Relaxed) as f64 / secs;
                }
            }
        }
    }
    let json = format!(
        "{{\"one_reader\": {:.0}, \"two_readers\": {:.0}, \"churn_one\": {:.0}, \"churn_two\": {:.0}, \
         \"one_reader_alone\": {:.0}, \"two_readers_alone\": {:.0}}}",
        best[0][0], best[0][1], churn[0], churn[1], best[1][0], best[1][1]
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion/readers_with_writer");
    std::fs::create_dir_all(&dir).expect("criterion output directory");
    std::fs::write(dir.join("scaling.json"), &json).expect("scaling.json");
    println!(
        "readers_with_writer: 1 reader {:.1} M lookups/s, 2 readers {:.1} M lookups/s together ({:.2}x); \
         writer {:.0} / {:.0} register+unregister/s; no writer: 1 reader {:.1} M/s, 2 readers {:.1} M/s ({:.2}x)",
        best[0][0] / 1e6,
        best[0][1] / 1e6,
        best[0][1] / best[0][0],
        churn[0],
        churn[1],
        best[1][0] / 1e6,
        best[1][1] / 1e6,
        best[1][1] / best[1][0],
    );
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

criterion_group!(benches, lookup, resolve);
criterion_main!(benches);
