//! What the loader's integration tests on this machine share: the fixture registry, a byte
//! pattern, registered host memory and reading it back.

use std::path::Path;
use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry, Topology};

pub fn registry() -> Registry {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    Registry::new(Arc::new(Topology::discover(root).unwrap()))
}

pub fn pattern(seed: u32, n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed as u8 ^ (i >> 12) as u8).collect()
}

pub fn host(reg: &Registry, len: u64) -> (Arc<HostRegion>, peermem::Registration) {
    let h = Arc::new(HostRegion::new(len).unwrap());
    let g = reg.register(h.clone() as Arc<dyn PeerMemory>).unwrap();
    (h, g)
}

pub fn back(r: &dyn PeerMemory, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.read_at(off, &mut v).unwrap();
    v
}
