//! Shared helpers for the benchmarks in `benches/`.

use std::path::PathBuf;

/// The fixture with the most PCI functions (override with `PEERMEM_BENCH_ROOT`).
pub fn largest_fixture() -> PathBuf {
    if let Some(p) = std::env::var_os("PEERMEM_BENCH_ROOT") {
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).expect("fixtures/").flatten() {
        let devs = e.path().join("sys/bus/pci/devices");
        if let Ok(rd) = std::fs::read_dir(&devs) {
            let n = rd.count();
            if best.as_ref().is_none_or(|(m, _)| n > *m) {
                best = Some((n, e.path()));
            }
        }
    }
    best.expect("at least one captured fixture").1
}

/// A deterministic xorshift64 generator.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
