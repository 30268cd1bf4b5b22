//! Shared by the integration tests: the device under test (failing loudly when Vulkan is
//! missing, unless PEERMEM_SKIP_VULKAN=1), data patterns, the fixture registry, fd counting.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use peermem::{Registry, Topology};
use peermem_vulkan::{Device, Select};

/// Set to 1 to skip (visibly) the tests that need a Vulkan loader and device.
pub const SKIP_ENV: &str = "PEERMEM_SKIP_VULKAN";
/// Which device the tests open (`best`, an index or a PCI address); default `best`.
pub const DEVICE_ENV: &str = "PEERMEM_VULKAN_DEVICE";

pub fn selector() -> Select {
    match std::env::var(DEVICE_ENV) {
        Ok(s) => s.parse().unwrap_or_else(|e| panic!("{DEVICE_ENV}: {e}")),
        Err(_) => Select::Best,
    }
}

/// The device under test. Without a loader or device this panics with what is missing, unless
/// PEERMEM_SKIP_VULKAN=1, when it prints SKIPPED and returns `None`.
pub fn device() -> Option<Device> {
    match Device::open(selector()) {
        Ok(d) => Some(d),
        Err(e) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => {
            eprintln!("SKIPPED ({SKIP_ENV}=1): no usable Vulkan device: {e}");
            None
        }
        Err(e) => panic!(
            "this test needs a Vulkan loader and device (CI installs Mesa lavapipe: libvulkan1 and \
             mesa-vulkan-drivers from bookworm-backports); set {SKIP_ENV}=1 to skip it explicitly. Error: {e}"
        ),
    }
}

/// `len` bytes of a pattern seeded by `seed` (never all zero, differs per seed).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (seed as u64).wrapping_mul(0x1000_0001);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures")).join(name)
}

pub fn registry(name: &str) -> Registry {
    Registry::new(Arc::new(Topology::discover(fixture(name)).expect("fixture topology")))
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// memfd mappings of this process (lavapipe memory is memfd-backed).
pub fn memfd_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("/proc/self/maps")
        .lines()
        .filter(|l| l.contains("/memfd:"))
        .count()
}
