//! Shared helpers for the benchmarks in `benches/`.

use std::path::{Path, PathBuf};

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

/// Builds a synthetic 1024-endpoint sysroot under `root` from the `qemu-wide` capture's own
/// function directories: 8 root ports, each with a switch of 16 downstream ports, each with an
/// 8-function NVMe endpoint (1169 functions with the host bridge's 00.0).
pub fn synthetic_wide(root: &Path) {
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
