//! The rail scheduler beyond this machine: a deterministic model of rails with given bandwidths
//! and latencies behind one shared upstream link, running `peermem_engine::rails`' weighted split
//! against an equal split and against the best attainable aggregate, min(sum of rails, upstream).
//!
//! The model is a fluid one: each rail starts delivering after its latency; while several rails
//! are active they share the upstream link max-min fairly (water-filling), each capped by its
//! own bandwidth; a rail finishes when its bytes are through. The scheduler is fed each rail's
//! delivered throughput after every request, as the engine feeds it completions.
//!
//! Run: `cargo run --release -p peermem-bench --example rails_sim [UPSTREAM_GBPS...]`.

use std::time::Duration;

use peermem_engine::rails::{RailId, RailOptions, RailSpec, Rails};

/// One rail of the model.
struct Link {
    gbs: f64,
    latency_s: f64,
}

const LINKS: [Link; 4] = [
    Link { gbs: 400.0, latency_s: 2e-6 },
    Link { gbs: 400.0, latency_s: 2e-6 },
    Link { gbs: 200.0, latency_s: 3e-6 },
    Link { gbs: 100.0, latency_s: 5e-6 },
];

fn bps(gbs: f64) -> f64 {
    gbs * 1e9 / 8.0
}

/// Max-min fair rates (bytes/s) for the rails with caps `caps` sharing `upstream` bytes/s.
fn waterfill(caps: &[f64], upstream: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| caps[a].total_cmp(&caps[b]));
    let (mut left, mut rates) = (upstream, vec![0.0; caps.len()]);
    for (k, &i) in order.iter().enumerate() {
        rates[i] = caps[i].min(left / (caps.len() - k) as f64);
        left -= rates[i];
    }
    rates
}

/// When each rail finishes its `bytes` (seconds; 0 for a rail given nothing).
fn finish_times(bytes: &[u64], upstream: f64) -> Vec<f64> {
    let mut left: Vec<f64> = bytes.iter().map(|&b| b as f64).collect();
    let mut done = vec![0.0; bytes.len()];
    let mut t = 0.0;
    // Each pass ends at a start or a finish: at most two per rail.
    for _ in 0..2 * bytes.len() + 1 {
        let active: Vec<usize> = (0..left.len()).filter(|&i| left[i] > 0.0 && LINKS[i].latency_s <= t).collect();
        let pending = (0..left.len()).filter(|&i| left[i] > 0.0 && LINKS[i].latency_s > t);
        let next_start = pending.map(|i| LINKS[i].latency_s).fold(f64::INFINITY, f64::min);
        let caps: Vec<f64> = active.iter().map(|&i| bps(LINKS[i].gbs)).collect();
        let rates = waterfill(&caps, upstream);
        let next_end = active.iter().zip(&rates).map(|(&i, r)| t + left[i] / r).fold(f64::INFINITY, f64::min);
        let step = next_start.min(next_end);
        if !step.is_finite() {
            break;
        }
        for (&i, r) in active.iter().zip(&rates) {
            left[i] = (left[i] - r * (step - t)).max(0.0);
            if left[i] <= 1e-6 {
                left[i] = 0.0;
                done[i] = step;
            }
        }
        t = step;
    }
    done
}

/// Aggregate bytes/s of one request of `len` bytes split as `bytes`.
fn aggregate(bytes: &[u64], upstream: f64) -> (f64, Vec<f64>) {
    let done = finish_times(bytes, upstream);
    let total: u64 = bytes.iter().sum();
    (total as f64 / done.iter().copied().fold(0.0, f64::max), done)
}

/// The weighted split over `requests` requests of `len` bytes, fed back after each; the last
/// request's ratio to `best` and the lowest.
fn weighted(len: u64, requests: usize, upstream: f64, best: f64) -> (f64, f64) {
    let specs = LINKS
        .iter()
        .enumerate()
        .map(|(i, l)| RailSpec { local: format!("nic{i}"), remote: format!("peer{i}"), bandwidth_gbs: Some(l.gbs) })
        .collect();
    let mut rails = Rails::new(specs, RailOptions::default()).expect("rails");
    let (mut last, mut worst) = (0.0, f64::INFINITY);
    for _ in 0..requests {
        let plan = rails.split(len, Duration::ZERO).expect("split");
        let bytes: Vec<u64> = (0..LINKS.len()).map(|i| plan.bytes_on(RailId(i))).collect();
        let (agg, done) = aggregate(&bytes, upstream);
        for (i, (&b, &d)) in bytes.iter().zip(&done).enumerate() {
            let busy = Duration::from_secs_f64((d - LINKS[i].latency_s).max(1e-9));
            rails.delivered(RailId(i), b, busy).expect("feed");
        }
        last = agg / best;
        worst = worst.min(last);
    }
    (last, worst)
}

/// Equal split: slices dealt in turn.
fn equal(len: u64, slice: u64, upstream: f64, best: f64) -> f64 {
    let mut bytes = vec![0u64; LINKS.len()];
    for (k, off) in (0..len).step_by(slice as usize).enumerate() {
        bytes[k % LINKS.len()] += slice.min(len - off);
    }
    aggregate(&bytes, upstream).0 / best
}

fn main() {
    let sum: f64 = LINKS.iter().map(|l| l.gbs).sum();
    let args: Vec<f64> = std::env::args().skip(1).map(|a| a.parse().expect("upstream Gb/s")).collect();
    let upstreams = if args.is_empty() { vec![sum, 1000.0, 800.0, 400.0] } else { args };
    let len = 1u64 << 30;
    let slice = RailOptions::default().slice;
    println!("rails 400/400/200/100 Gb/s, latencies 2/2/3/5 us, requests of {len} bytes, slices of {slice}");
    println!("upstream_gbps best_gbps weighted_first weighted_after_8 weighted_min equal");
    for up in upstreams {
        let best = bps(sum.min(up));
        let (last, worst) = weighted(len, 8, bps(up), best);
        let (first, _) = weighted(len, 1, bps(up), best);
        let eq = equal(len, slice, bps(up), best);
        println!("{up:.0} {:.0} {first:.4} {last:.4} {worst:.4} {eq:.4}", sum.min(up));
    }
}
