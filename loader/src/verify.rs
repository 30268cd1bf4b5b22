//! The verify stage: the xxh3-64 of each read's destination bytes, compared with the hash the
//! caller expects and, when asked, with a second read of the source.
//!
//! Owns: the one checksum of the loader (xxh3-64) and the comparisons. Must not: move a
//! destination's bytes (it reads them through the CPU's view, or for CUDA memory through the
//! device's copies, in pieces: no reference over memory a device may write).

use peermem::{PeerMemory, Registry};

use crate::batch::Read;
use crate::error::LoadError;
use crate::options::Verify;
use crate::plan::DestRun;
use crate::source::xxh3_in_pieces;
use crate::stage::{Gpu, Pool};

/// What the verify stage found: per read, in batch order.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    pub checksums: Vec<u64>,
    pub source_checksums: Vec<u64>,
    pub verified: Option<bool>,
    pub fallbacks: Vec<String>,
}

/// xxh3-64 of `len` bytes of `w` at `off` (copied out in pieces).
fn hash_region(w: &dyn PeerMemory, off: u64, len: u64) -> Result<u64, peermem::AccessError> {
    xxh3_in_pieces(len, |o, buf| w.read_at(off + o, buf))
}

/// xxh3-64 of `len` bytes at `off` of a GPU destination read back through its device, where
/// the device can read back (CUDA); None otherwise.
fn gpu_hash(g: &Gpu, off: u64, len: u64) -> Option<Result<u64, LoadError>> {
    match g {
        Gpu::Vulkan { .. } => None,
        Gpu::Cuda { device, region } => {
            Some(xxh3_in_pieces(len, |o, buf| device.read(region, off + o, buf)).map_err(LoadError::from))
        }
    }
}

/// Checks every read of a batch as `how` says; the first that differs is a `HashMismatch`
/// naming the source, its range and both hashes.
pub(crate) fn verify(
    how: Verify,
    reg: &Registry,
    reads: &[Read],
    read_dest: &[usize],
    dests: &[DestRun],
    scratch: &mut Pool,
) -> Result<Checked, LoadError> {
    let mut c = Checked::default();
    if how == Verify::Off {
        return Ok(c);
    }
    let (mut all, mut any) = (true, false);
    for (i, r) in reads.iter().enumerate() {
        // The CPU's view of the destination; device-local memory may still have a mapping.
        let d = &dests[read_dest[i]];
        let own = || d.entry.region().cpu_mapping().is_some().then(|| d.entry.region().clone());
        let h = match (
            d.window.clone().or_else(own),
            d.gpu.as_ref().and_then(|g| gpu_hash(&g.gpu, r.dest_offset, r.len)),
        ) {
            (Some(w), _) => hash_region(&*w, r.dest_offset, r.len)?,
            // GPU memory the device reads back (CUDA).
            (None, Some(h)) => h?,
            (None, None) => {
                all = false;
                continue;
            }
        };
        c.checksums.push(h);
        let mismatch = |expected| LoadError::HashMismatch {
            what: r.source.describe(),
            offset: r.offset,
            len: r.len,
            dest: h,
            expected,
        };
        if let Some(x) = r.expect {
            any = true;
            if x != h {
                return Err(mismatch(x));
            }
        }
        if how == Verify::Reread {
            any = true;
            let s = r.source.hash(reg, scratch.first()?, r.offset, r.len)?;
            c.source_checksums.push(s);
            if s != h {
                return Err(mismatch(s));
            }
        }
    }
    c.verified = (any && all).then_some(true);
    if !all {
        c.fallbacks.push("verification: a destination has no CPU mapping to hash".into());
    }
    Ok(c)
}
