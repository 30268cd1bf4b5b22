//! Bounce pipeline benchmarks: `mover::Pipeline` moving host memory to host memory through its
//! staging buffers, swept over chunk size x depth, beside the copies it competes with.
//!
//! Every variant moves the same `TOTAL` bytes (throughput in bytes/s):
//! - `memcpy`: one thread, source to destination directly (what a bounce must approach);
//! - `copy_2threads`: two threads, each copying half directly (what two cores can do at best);
//! - `pipeline/CHUNK/dDEPTH`: fill copies source -> staging on the calling thread, drain copies
//!   staging -> destination on the second (two copies, overlapped);
//! - `pipeline_empty/CHUNK/dDEPTH`: the same hand-offs with no copy at all: its time per chunk
//!   (bytes/s turned back into chunks) is the pipeline's own per-chunk overhead.
//!
//! Memory bandwidth on a shared machine moves by 20-40% from one minute to the next, which
//! criterion's one-variant-at-a-time medians turn into ratios that move as much. So first every
//! variant runs once per round, `ROUNDS` rounds interleaved, keeping each variant's fastest:
//! `target/criterion/pipeline/interleaved.json` (ns per move of `TOTAL`), the ratios to read.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use peermem::mover::Pipeline;
use peermem::PeerMemory;

const TOTAL: u64 = 64 << 20;

const CHUNKS: [u64; 3] = [64 << 10, 256 << 10, 1 << 20];
const DEPTHS: [usize; 3] = [2, 4, 16];
const ROUNDS: usize = 15;

fn copy_2threads(src: &[u8], dst: &mut [u8]) {
    let (d0, d1) = dst.split_at_mut(src.len() / 2);
    let (s0, s1) = src.split_at(src.len() / 2);
    std::thread::scope(|s| {
        s.spawn(|| d1.copy_from_slice(black_box(s1)));
        d0.copy_from_slice(black_box(s0));
    });
}

/// One move of `TOTAL` bytes from `src` to `dst` through `p`'s staging buffers.
fn bounce(
    p: &Pipeline,
    st: &[std::sync::Arc<peermem::HostRegion>],
    src: &[u8],
    dst: &mut [u8],
) -> peermem::mover::CopyStats {
    let out = Mutex::new(dst);
    p.run(
        TOTAL,
        |slot, off, n| st[slot].write_at(0, &src[off as usize..(off + n) as usize]),
        |slot, off, n| {
            // The lock is uncontended (only the drain thread takes it).
            let mut d = out.lock().unwrap();
            st[slot].read_at(0, &mut d[off as usize..(off + n) as usize])
        },
    )
    .unwrap()
}

/// Every variant once per round, `ROUNDS` rounds; the fastest of each (see the module comment).
fn interleaved(src: &[u8], dst: &mut [u8]) {
    let pipes: Vec<_> = CHUNKS
        .iter()
        .flat_map(|&c| DEPTHS.iter().map(move |&d| (c, d)))
        .map(|(c, d)| {
            let p = Pipeline::new(c, d).unwrap();
            let st = p.staging().to_vec();
            (format!("{}KiB_d{d}", c >> 10), p, st)
        })
        .collect();
    let mut best = vec![f64::MAX; 2 + pipes.len()];
    let time = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e9
    };
    for _ in 0..ROUNDS {
        best[0] = best[0].min(time(&mut || dst.copy_from_slice(black_box(src))));
        best[1] = best[1].min(time(&mut || copy_2threads(src, dst)));
        for (i, (_, p, st)) in pipes.iter().enumerate() {
            best[2 + i] = best[2 + i].min(time(&mut || {
                black_box(bounce(p, st, src, dst));
            }));
        }
    }
    let names =
        ["memcpy".to_string(), "copy_2threads".to_string()].into_iter().chain(pipes.iter().map(|p| p.0.clone()));
    let json: Vec<String> = names.zip(&best).map(|(k, ns)| format!("\"{k}\": {ns:.0}")).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion/pipeline");
    std::fs::create_dir_all(&dir).expect("criterion output directory");
    std::fs::write(dir.join("interleaved.json"), format!("{{{}}}\n", json.join(", "))).expect("interleaved.json");
    println!("pipeline interleaved, fastest of {ROUNDS} rounds (ns per 64 MiB): {}", json.join(", "));
}

fn pipeline(c: &mut Criterion) {
    let src: Vec<u8> = (0..TOTAL).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0u8; TOTAL as usize];
    // PEERMEM_BENCH_NO_INTERLEAVED=1 skips this part (when profiling one criterion bench).
    if std::env::var_os("PEERMEM_BENCH_NO_INTERLEAVED").is_none() {
        interleaved(&src, &mut dst);
    }
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(TOTAL));
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.bench_function("copy_2threads", |b| b.iter(|| copy_2threads(&src, &mut dst)));
    for chunk in CHUNKS {
        for depth in DEPTHS {
            let p = Pipeline::new(chunk, depth).unwrap();
            let st = p.staging().to_vec();
            let id = format!("{}KiB/d{depth}", chunk >> 10);
            g.bench_function(BenchmarkId::new("pipeline", &id), |b| b.iter(|| bounce(&p, &st, &src, &mut dst)));
            g.bench_function(BenchmarkId::new("pipeline_empty", &id), |b| {
                b.iter(|| p.run(TOTAL, |_, _, _| Ok::<_, String>(()), |_, _, _| Ok(())).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
