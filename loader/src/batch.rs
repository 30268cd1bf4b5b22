//! A batch: reads submitted together, one report for all. Each read is `(source, offset, len,
//! destination, destination offset)`, optionally with the xxh3-64 its bytes must have.
//!
//! Owns: collecting reads. Must not: check them (the plan stage does, before any read starts).

use crate::dest::Dest;
use crate::source::Source;

/// One read of a batch.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub source: Source,
    pub offset: u64,
    pub len: u64,
    pub dest: Dest,
    pub dest_offset: u64,
    pub expect: Option<u64>,
}

/// Reads submitted together; one report for all.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub(crate) reads: Vec<Read>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    /// Adds a read of `len` bytes of `source` at `offset` into `dest` at `dest_offset` (through
    /// the source's O_DIRECT twin when an Auto source read through the page cache meets device
    /// memory: `Source::for_dest`).
    pub fn read(
        &mut self,
        source: &Source,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
    ) -> &mut Self {
        let dest = dest.into();
        let source = source.for_dest(&dest.entry);
        self.reads.push(Read { source, offset, len, dest, dest_offset, expect: None });
        self
    }
    /// As `read`, with the xxh3-64 the bytes must have (checked when verification is on).
    pub fn read_expect(
        &mut self,
        source: &Source,
        offset: u64,
        len: u64,
        dest: impl Into<Dest>,
        dest_offset: u64,
        xxh3: u64,
    ) -> &mut Self {
        self.read(source, offset, len, dest, dest_offset);
        self.reads.last_mut().expect("just pushed").expect = Some(xxh3);
        self
    }
    /// Reads in the batch.
    pub fn len(&self) -> usize {
        self.reads.len()
    }
    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }
    /// Total bytes the batch moves.
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.len).sum()
    }
}
