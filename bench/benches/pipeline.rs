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

use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use peermem::mover::Pipeline;
use peermem::PeerMemory;

const TOTAL: u64 = 64 << 20;

fn pipeline(c: &mut Criterion) {
    let src: Vec<u8> = (0..TOTAL).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0u8; TOTAL as usize];
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(TOTAL));
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.bench_function("copy_2threads", |b| {
        b.iter(|| {
            let (d0, d1) = dst.split_at_mut(TOTAL as usize / 2);
            let (s0, s1) = src.split_at(TOTAL as usize / 2);
            std::thread::scope(|s| {
                s.spawn(|| d1.copy_from_slice(black_box(s1)));
                d0.copy_from_slice(black_box(s0));
            });
        })
    });
    for chunk in [64u64 << 10, 256 << 10, 1 << 20] {
        for depth in [2usize, 4] {
            let p = Pipeline::new(chunk, depth).unwrap();
            let st = p.staging().to_vec();
            let id = format!("{}KiB/d{depth}", chunk >> 10);
            let out = Mutex::new(&mut dst);
            g.bench_function(BenchmarkId::new("pipeline", &id), |b| {
                b.iter(|| {
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
                })
            });
            g.bench_function(BenchmarkId::new("pipeline_empty", &id), |b| {
                b.iter(|| p.run(TOTAL, |_, _, _| Ok::<_, String>(()), |_, _, _| Ok(())).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
