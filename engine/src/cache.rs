//! A registration range cache for one NIC: asking for a span that a registration already covers
//! costs no call. A span that overlaps or touches registered ones is registered as their union
//! (one call), so a contiguous span always has one key and a slice never splits at a
//! registration boundary; the entries it covers are retired, not deregistered, because posted
//! work may still use their keys: `release_retired` deregisters them once the caller knows none
//! is in flight. Unregistering a region drops every entry of it.
//!
//! Owns: `Registrar`, `RangeCache`, `CacheError`, `CacheCounts`. Must not: decide how a NIC
//! registers memory (the registrar, over the core's plan, does) or hold an address.

use std::collections::BTreeMap;

use crate::span::{RegionId, Span};

/// What registers memory with one NIC (`ibv_reg_mr` and kin in the RDMA layer).
pub trait Registrar {
    type Key: Clone;
    type Error: std::error::Error + 'static;
    fn register(&mut self, span: Span) -> Result<Self::Key, Self::Error>;
    fn deregister(&mut self, key: Self::Key);
}

/// A registration that failed, with the span asked for.
#[derive(Debug, thiserror::Error)]
#[error("registering {span} (for {asked}): {source}")]
pub struct CacheError<E: std::error::Error + 'static> {
    /// The span sent to the registrar (the union with the registrations it meets).
    pub span: Span,
    /// The span the caller asked for.
    pub asked: Span,
    #[source]
    pub source: E,
}

/// How often the registrar was called, and how often it was not needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub registers: u64,
    pub deregisters: u64,
    pub hits: u64,
}

#[derive(Debug)]
struct Entry<K> {
    span: Span,
    key: K,
}

/// The registrations of one NIC, disjoint and not touching, by (region, start).
#[derive(Debug)]
pub struct RangeCache<R: Registrar> {
    registrar: R,
    entries: BTreeMap<(RegionId, u64), Entry<R::Key>>,
    retired: Vec<(RegionId, R::Key)>,
    counts: CacheCounts,
}

impl<R: Registrar> RangeCache<R> {
    pub fn new(registrar: R) -> Self {
        RangeCache { registrar, entries: BTreeMap::new(), retired: Vec::new(), counts: CacheCounts::default() }
    }

    pub fn counts(&self) -> CacheCounts {
        self.counts
    }

    pub fn registrar(&self) -> &R {
        &self.registrar
    }

    /// The registrations held (retired ones aside).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The keys of the entries that share a byte with `span` or touch it, in order.
    fn meeting(&self, span: &Span) -> Vec<(RegionId, u64)> {
        let from = self
            .entries
            .range(..=(span.region(), span.start()))
            .next_back()
            .filter(|(k, _)| k.0 == span.region())
            .map_or(span.start(), |(k, _)| k.1);
        self.entries
            .range((span.region(), from)..=(span.region(), span.end()))
            .filter(|(_, e)| e.span.meets(span))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The key of a registration covering `span`, if one does (no call).
    pub fn lookup(&self, span: &Span) -> Option<R::Key> {
        let (_, e) = self.entries.range(..=(span.region(), span.start())).next_back()?;
        e.span.contains(span).then(|| e.key.clone())
    }

    /// A key covering `span`: the cached one, or a new registration of `span`'s union with the
    /// registrations it meets (those are retired).
    pub fn register(&mut self, span: Span) -> Result<R::Key, CacheError<R::Error>> {
        if let Some(key) = self.lookup(&span) {
            self.counts.hits += 1;
            return Ok(key);
        }
        let meeting = self.meeting(&span);
        let union = meeting.iter().fold(span, |u, k| u.union(&self.entries[k].span));
        self.counts.registers += 1;
        let key = self.registrar.register(union).map_err(|source| CacheError { span: union, asked: span, source })?;
        for k in meeting {
            if let Some(old) = self.entries.remove(&k) {
                self.retired.push((k.0, old.key));
            }
        }
        self.entries.insert((union.region(), union.start()), Entry { span: union, key: key.clone() });
        Ok(key)
    }

    /// Whether merges retired entries that `release_retired` would deregister.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Deregister the entries that merges retired (no posted work may use their keys now).
    pub fn release_retired(&mut self) {
        for (_, key) in std::mem::take(&mut self.retired) {
            self.deregister(key);
        }
    }

    /// The region is unregistered: every registration of it, retired or not, is deregistered,
    /// and no lookup finds it again.
    pub fn invalidate(&mut self, region: RegionId) {
        let keys: Vec<(RegionId, u64)> =
            self.entries.range((region, 0)..=(region, u64::MAX)).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(e) = self.entries.remove(&k) {
                self.deregister(e.key);
            }
        }
        let (gone, kept) = std::mem::take(&mut self.retired).into_iter().partition(|(r, _)| *r == region);
        self.retired = kept;
        for (_, key) in gone {
            self.deregister(key);
        }
    }

    fn deregister(&mut self, key: R::Key) {
        self.counts.deregisters += 1;
        self.registrar.deregister(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Records what it was asked, like a NIC would see it.
    #[derive(Default)]
    struct Nic {
        live: BTreeMap<u32, Span>,
        next: u32,
        refuse_past: Option<u64>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    impl Registrar for Nic {
        type Key = u32;
        type Error = Refused;
        fn register(&mut self, span: Span) -> Result<u32, Refused> {
            if self.refuse_past.is_some_and(|p| span.end() > p) {
                return Err(Refused);
            }
            self.next += 1;
            self.live.insert(self.next, span);
            Ok(self.next)
        }
        fn deregister(&mut self, key: u32) {
            assert!(self.live.remove(&key).is_some(), "key {key} deregistered twice");
        }
    }

    fn span(region: u32, start: u64, len: u64) -> Span {
        Span::new(RegionId(region), start, len).unwrap()
    }

    #[test]
    fn a_thousand_sub_ranges_of_a_registered_buffer_cost_no_call() {
        let mut c = RangeCache::new(Nic::default());
        let whole = c.register(span(1, 0, GIB)).unwrap();
        for i in 0..1000u64 {
            let len = 4096 + (i % 7) * 4096;
            assert_eq!(c.register(span(1, i * (GIB / 1000), len)).unwrap(), whole);
        }
        assert_eq!(c.counts(), CacheCounts { registers: 1, deregisters: 0, hits: 1000 });
        // Without the cache, each sub-range is one registration.
        let mut nic = Nic::default();
        for i in 0..1000u64 {
            nic.register(span(1, i * (GIB / 1000), 4096)).unwrap();
        }
        assert_eq!(nic.next, 1000);
    }

    #[test]
    fn overlapping_and_adjacent_spans_register_their_union_once() {
        let mut c = RangeCache::new(Nic::default());
        let a = c.register(span(1, 0, 100)).unwrap();
        let b = c.register(span(1, 200, 100)).unwrap();
        assert_ne!(a, b);
        // 100..200 touches both: one registration of 0..300 replaces them.
        let u = c.register(span(1, 100, 100)).unwrap();
        assert_eq!(c.registrar().live[&u], span(1, 0, 300));
        assert_eq!(c.len(), 1);
        assert_eq!(c.lookup(&span(1, 50, 200)), Some(u));
        // Posted work may hold the old keys: they stay registered until released.
        assert_eq!(c.registrar().live.len(), 3);
        c.release_retired();
        assert_eq!(c.registrar().live.keys().copied().collect::<Vec<_>>(), [u]);
        assert_eq!(c.counts(), CacheCounts { registers: 3, deregisters: 2, hits: 0 });
    }

    #[test]
    fn spans_of_other_regions_never_share_a_registration() {
        let mut c = RangeCache::new(Nic::default());
        c.register(span(1, 0, 100)).unwrap();
        assert_eq!(c.lookup(&span(2, 0, 10)), None);
        c.register(span(2, 0, 10)).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.counts().registers, 2);
    }

    #[test]
    fn unregistering_a_region_deregisters_it_and_lookups_miss() {
        let mut c = RangeCache::new(Nic::default());
        c.register(span(1, 0, 100)).unwrap();
        c.register(span(1, 50, 100)).unwrap();
        let other = c.register(span(2, 0, 100)).unwrap();
        c.invalidate(RegionId(1));
        assert_eq!(c.lookup(&span(1, 0, 10)), None);
        assert_eq!(c.registrar().live.keys().copied().collect::<Vec<_>>(), [other]);
        assert_eq!(c.counts().deregisters, 2, "the merged entry and the one it retired");
    }

    #[test]
    fn a_refused_registration_names_the_span_and_leaves_the_cache_as_it_was() {
        let mut c = RangeCache::new(Nic { refuse_past: Some(150), ..Nic::default() });
        let a = c.register(span(1, 0, 100)).unwrap();
        let e = c.register(span(1, 100, 100)).unwrap_err();
        assert_eq!(e.span, span(1, 0, 200));
        assert!(e.to_string().contains("region 1 bytes 0..200"), "{e}");
        assert_eq!(c.lookup(&span(1, 0, 100)), Some(a));
    }
}
