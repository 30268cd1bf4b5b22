//! Drop-order stress: devices dropped before their regions, regions before their imports, host
//! sources before their imports, registrations last; repeated, with the process's fds and memfd
//! mappings counted before and after (nothing may leak, nothing may crash).
//!
//! One test in this binary on purpose: fd counts are per process, and tests of one binary run
//! in parallel threads.

mod common;

use std::sync::Arc;

use common::{device, memfd_mappings, open_fds, pattern, registry};
use peermem::{HostRegion, PeerMemory};
use peermem_vulkan::{Device, Placement, VulkanRegion};

const LEN: u64 = 256 * 1024;
const ROUNDS: usize = 25;

fn check(r: &VulkanRegion, seed: u8) {
    let mut b = vec![0u8; LEN as usize];
    r.read_at(0, &mut b).unwrap();
    assert!(b == pattern(seed, LEN as usize), "data of seed {seed} lost");
}

fn round(i: usize) {
    let reg = registry("qemu-switch");
    let a = device().unwrap();
    let b = Device::open(common::selector()).unwrap();

    // 1. The device goes before its region; the region still works, exports and copies.
    let ra = Arc::new(a.allocate(LEN, Placement::Mappable).unwrap());
    let guard = reg.register(ra.clone()).unwrap();
    ra.write_at(0, &pattern(1, LEN as usize)).unwrap();
    drop(a);
    check(&ra, 1);

    // 2. The region goes before its import (and its registration goes last).
    let rb = b.import(ra.export().unwrap()).unwrap();
    let ra_weak = Arc::downgrade(&ra);
    drop(ra);
    assert!(ra_weak.upgrade().is_some(), "the registration still holds the region");
    drop(guard);
    assert!(ra_weak.upgrade().is_none(), "unregistering released it");
    check(&rb, 1);

    // 3. A host source goes before its import; the GPU still writes its pages.
    let host = Arc::new(HostRegion::new(LEN).unwrap());
    host.write_at(0, &pattern(2, LEN as usize)).unwrap();
    let hi = b.import_host(host.clone()).unwrap();
    drop(host);
    b.copy(&hi, 0, &rb, 0, LEN).unwrap();
    check(&rb, 2);

    // 4. The device goes right after a copy, before everything it copied.
    let scratch = b.allocate(LEN, Placement::DeviceLocal).unwrap();
    b.copy(&rb, 0, &scratch, 0, LEN).unwrap();
    let b2 = b.clone();
    drop(b);
    b2.copy(&scratch, 0, &hi, 0, LEN).unwrap();
    drop(b2);
    if i & 1 == 0 {
        drop(rb);
        drop(hi);
        drop(scratch);
    } else {
        drop(scratch);
        drop(hi);
        drop(rb);
    }
}

#[test]
fn any_drop_order_is_safe_and_leaks_no_fd_or_mapping() {
    if device().is_none() {
        return;
    }
    // Warm-up: the driver may open files once per process (shader cache, device nodes).
    round(0);
    let (fds, maps) = (open_fds(), memfd_mappings());
    for i in 0..ROUNDS {
        round(i);
    }
    assert_eq!(open_fds(), fds, "fds leaked over {ROUNDS} rounds");
    assert_eq!(memfd_mappings(), maps, "memfd mappings leaked over {ROUNDS} rounds");
}
