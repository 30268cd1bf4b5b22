//! The engine's small vocabulary of memory: a region id and a span of byte offsets within one
//! region. Offsets, never addresses: what a NIC programs is the registry's business.
//!
//! Owns: `RegionId`, `Span`, `SpanError`. Must not: hold or compute an address.

use std::fmt;

/// One region the engine registered (unique within one engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RegionId(pub u32);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// Bytes `start..start + len` of one region: never empty, never past 2^64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    region: RegionId,
    start: u64,
    len: u64,
}

/// A span that cannot exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("empty span at offset {start} of {region}")]
    Empty { region: RegionId, start: u64 },
    #[error("span of {len} bytes at offset {start} of {region} runs past 2^64")]
    Wraps { region: RegionId, start: u64, len: u64 },
}

impl Span {
    pub fn new(region: RegionId, start: u64, len: u64) -> Result<Span, SpanError> {
        if len == 0 {
            return Err(SpanError::Empty { region, start });
        }
        if start.checked_add(len).is_none() {
            return Err(SpanError::Wraps { region, start, len });
        }
        Ok(Span { region, start, len })
    }

    pub fn region(&self) -> RegionId {
        self.region
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a span holds at least one byte (checked at construction).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One past the last byte (checked at construction).
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True when every byte of `other` lies in `self`.
    pub fn contains(&self, other: &Span) -> bool {
        self.region == other.region && self.start <= other.start && other.end() <= self.end()
    }

    /// True when the two share a byte or touch end to start (same region).
    pub fn meets(&self, other: &Span) -> bool {
        self.region == other.region && self.start <= other.end() && other.start <= self.end()
    }

    /// The smallest span covering both (same region).
    pub fn union(&self, other: &Span) -> Span {
        let start = self.start.min(other.start);
        Span { region: self.region, start, len: self.end().max(other.end()) - start }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes {}..{}", self.region, self.start, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_wrapping_spans_are_refused_with_their_input() {
        let r = RegionId(3);
        assert_eq!(Span::new(r, 5, 0), Err(SpanError::Empty { region: r, start: 5 }));
        let e = Span::new(r, u64::MAX, 2).unwrap_err();
        assert!(e.to_string().contains("region 3"), "{e}");
    }

    #[test]
    fn adjacent_spans_meet_and_their_union_covers_both() {
        let (a, b) = (Span::new(RegionId(1), 0, 10).unwrap(), Span::new(RegionId(1), 10, 5).unwrap());
        assert!(a.meets(&b) && !a.contains(&b));
        assert_eq!(a.union(&b), Span::new(RegionId(1), 0, 15).unwrap());
        assert!(!a.meets(&Span::new(RegionId(2), 0, 10).unwrap()), "other regions never meet");
    }
}
