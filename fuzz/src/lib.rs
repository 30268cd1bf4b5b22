//! The fuzz targets: one harness per parser, by name. The AFL++ driver (`src/bin/afl.rs`, built
//! with `--features afl`) runs one of them on AFL's inputs; `tests/corpus.rs` replays every file
//! of `corpus/<target>/` through it in a plain `cargo test`. The CLI's argument parser is fuzzed
//! from the `peermem-cli` crate (its `fuzz-cli-args` binary), which only it can reach.
//!
//! Must not: catch a panic. A harness that panics on an input is a bug in the parser, and the
//! input belongs in the corpus once fixed.

use peermem::harness;
use peermem_nvme::regs::{self, Registers};

/// NVMe register decoding: the image, the CMB it describes and the check against a BAR length
/// (taken from the bytes after the image), plus each register decoder on its own.
pub fn nvme_regs(data: &[u8]) {
    let le = |o: usize, n: usize| data.get(o..o + n).map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64));
    if let Ok(r) = Registers::decode(data) {
        if let Ok(regs::CmbState::Present(cmb)) = r.cmb() {
            let bar_len = le(regs::IMAGE_LEN, 8).unwrap_or(u64::MAX);
            if cmb.check_within(bar_len).is_ok() {
                assert!(cmb.offset.checked_add(cmb.size).is_some_and(|end| end <= bar_len));
            }
        }
    }
    if let Some(v) = le(0, 8) {
        let _ = regs::Cap::decode(v);
        let _ = regs::Cmbmsc::decode(v);
        let w = v as u32;
        let _ = regs::Version::decode(w);
        let cc = regs::Cc::decode(w);
        let _ = cc.encode();
        let _ = regs::Csts::decode(w);
        let aqa = regs::Aqa::decode(w);
        let _ = aqa.encode();
        let _ = regs::Cmbloc::decode(w);
        if let Ok(sz) = regs::Cmbsz::decode(w) {
            let _ = sz.bytes();
        }
        let _ = regs::Cmbsts::decode(w);
    }
}

/// A fuzz target: its name (the corpus directory) and its harness.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of this crate, by name.
pub const TARGETS: &[Target] = &[
    ("sysfs_attr", harness::sysfs_attr),
    ("config_space", harness::config_space),
    ("resource", harness::resource),
    ("dt_ranges", harness::dt_ranges),
    ("bdf", harness::bdf),
    ("archive", harness::archive),
    ("nvme_regs", nvme_regs),
];

/// The harness called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
