//! A persistent (copy-on-write) radix index from addresses to non-overlapping spans: the read
//! side of the registry.
//!
//! Shape: like a page table with huge pages, after SPDK's `spdk_mem_map`. A small sorted top
//! vector keyed by `addr >> 39` points to a node of 512 slots of 1 GiB; each slot is empty, holds
//! the one span that overlaps it, or holds a child node of 512 slots of the next size (2 MiB, then
//! 4 KiB). Only a 4 KiB slot shared by several sub-page spans holds a sorted list. A lookup is
//! the top scan, one to three dependent node loads (only as deep as spans are dense) and a bounds
//! check: no search, no lock. Writers change a clone: nodes
//! are `Arc`s and `Arc::make_mut` copies only the path being edited, so readers of an older map
//! never see a change and never wait.
//!
//! Owns: the index only. Must not: check overlap (the registry does, before inserting) or hold
//! anything but `Arc`s to the caller's values.

use std::sync::Arc;

use crate::addr::Address;

const FANOUT_BITS: u32 = 9;
const FANOUT: usize = 1 << FANOUT_BITS;
const TOP_SHIFT: u32 = 39;
const MID_SHIFT: u32 = 30;
const LEAF_SHIFT: u32 = 12;

/// One indexed span `[start, last]` (inclusive) with the caller's value.
#[derive(Debug)]
pub(crate) struct Span<A: Address, V> {
    pub start: A,
    pub last: A,
    pub id: u64,
    pub val: V,
}

impl<A: Address, V> Span<A, V> {
    #[inline]
    fn contains(&self, a: A) -> bool {
        a >= self.start && a <= self.last
    }
}

#[derive(Debug)]
struct Many<A: Address, V> {
    starts: Vec<A>,
    spans: Vec<Arc<Span<A, V>>>,
}

impl<A: Address, V> Clone for Many<A, V> {
    fn clone(&self) -> Self {
        Many { starts: self.starts.clone(), spans: self.spans.clone() }
    }
}

#[derive(Debug)]
enum Slot<A: Address, V> {
    Empty,
    /// The one span overlapping this slot, its bounds copied inline so a lookup never has to
    /// load the span itself to check them.
    One {
        start: A,
        last: A,
        span: Arc<Span<A, V>>,
    },
    Many(Arc<Many<A, V>>),
    Node(Arc<Node<A, V>>),
}

impl<A: Address, V> Clone for Slot<A, V> {
    fn clone(&self) -> Self {
        match self {
            Slot::Empty => Slot::Empty,
            Slot::One { start, last, span } => Slot::One { start: *start, last: *last, span: span.clone() },
            Slot::Many(m) => Slot::Many(m.clone()),
            Slot::Node(n) => Slot::Node(n.clone()),
        }
    }
}

impl<A: Address, V> Slot<A, V> {
    fn one(span: &Arc<Span<A, V>>) -> Self {
        Slot::One { start: span.start, last: span.last, span: span.clone() }
    }
}

#[derive(Debug)]
struct Node<A: Address, V> {
    slots: [Slot<A, V>; FANOUT],
}

impl<A: Address, V> Clone for Node<A, V> {
    fn clone(&self) -> Self {
        Node { slots: self.slots.clone() }
    }
}

impl<A: Address, V> Node<A, V> {
    fn new() -> Self {
        Node { slots: std::array::from_fn(|_| Slot::Empty) }
    }
    fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Empty))
    }
    /// If every non-empty slot holds the same single span, that span (the node can collapse).
    fn sole_span(&self) -> Option<Arc<Span<A, V>>> {
        let mut found: Option<&Arc<Span<A, V>>> = None;
        for s in self.slots.iter() {
            match s {
                Slot::Empty => {}
                Slot::One { span: sp, .. } => match found {
                    None => found = Some(sp),
                    Some(f) if f.id == sp.id => {}
                    Some(_) => return None,
                },
                _ => return None,
            }
        }
        found.cloned()
    }
}

/// The index. Cloning is cheap (the top vector of `Arc`s); edits copy only their path.
#[derive(Debug)]
pub(crate) struct SpanMap<A: Address, V> {
    top: Vec<(u64, Arc<Node<A, V>>)>,
    /// Copy of `top[0]`, kept inline so the common case (one top key: every user-space virtual
    /// address below 512 GiB, or one bus window) skips the vector's extra pointer load.
    first: Option<(u64, Arc<Node<A, V>>)>,
    len: usize,
}

impl<A: Address, V> Clone for SpanMap<A, V> {
    fn clone(&self) -> Self {
        SpanMap { top: self.top.clone(), first: self.first.clone(), len: self.len }
    }
}

impl<A: Address, V> Default for SpanMap<A, V> {
    fn default() -> Self {
        SpanMap { top: Vec::new(), first: None, len: 0 }
    }
}

#[inline]
fn slot_index(a: u64, shift: u32) -> usize {
    ((a >> shift) as usize) & (FANOUT - 1)
}

impl<A: Address, V> SpanMap<A, V> {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The span containing `a`, with its start.
    #[inline]
    pub fn get(&self, a: A) -> Option<(A, &Arc<Span<A, V>>)> {
        let raw = a.raw();
        let key = raw >> TOP_SHIFT;
        let node = if let Some((k, n)) = &self.first {
            if *k == key {
                n
            } else {
                &self.top[self.top.binary_search_by_key(&key, |(k, _)| *k).ok()?].1
            }
        } else if self.top.len() <= 8 {
            &self.top.iter().find(|(k, _)| *k == key)?.1
        } else {
            &self.top[self.top.binary_search_by_key(&key, |(k, _)| *k).ok()?].1
        };
        let mut node: &Node<A, V> = node;
        let mut shift = MID_SHIFT;
        loop {
            match &node.slots[slot_index(raw, shift)] {
                Slot::Empty => return None,
                Slot::One { start, last, span } => return (a >= *start && a <= *last).then_some((*start, span)),
                Slot::Many(m) => {
                    let i = match m.starts.binary_search(&a) {
                        Ok(i) => i,
                        Err(0) => return None,
                        Err(i) => i - 1,
                    };
                    let s = &m.spans[i];
                    return s.contains(a).then_some((m.starts[i], s));
                }
                Slot::Node(n) => {
                    node = n;
                    shift -= FANOUT_BITS;
                }
            }
        }
    }

    /// Inserts a span. The caller guarantees it overlaps no span already in the map.
    pub fn insert(&mut self, span: Arc<Span<A, V>>) {
        self.first = None; // drop the extra reference so make_mut copies only shared nodes
        let (lo, hi) = (span.start.raw(), span.last.raw());
        for key in (lo >> TOP_SHIFT)..=(hi >> TOP_SHIFT) {
            let base = key << TOP_SHIFT;
            let top_last = base | ((1u64 << TOP_SHIFT) - 1);
            let pos = match self.top.binary_search_by_key(&key, |(k, _)| *k) {
                Ok(p) => p,
                Err(p) => {
                    self.top.insert(p, (key, Arc::new(Node::new())));
                    p
                }
            };
            let node = Arc::make_mut(&mut self.top[pos].1);
            insert_in(node, base, MID_SHIFT, lo.max(base), hi.min(top_last), &span);
        }
        self.len += 1;
        self.first = self.top.first().cloned();
    }

    /// Removes the span `id` that was inserted covering `[start, last]`.
    pub fn remove(&mut self, start: A, last: A, id: u64) {
        self.first = None;
        let (lo, hi) = (start.raw(), last.raw());
        for key in (lo >> TOP_SHIFT)..=(hi >> TOP_SHIFT) {
            let Ok(pos) = self.top.binary_search_by_key(&key, |(k, _)| *k) else {
                continue;
            };
            let base = key << TOP_SHIFT;
            let top_last = base | ((1u64 << TOP_SHIFT) - 1);
            let node = Arc::make_mut(&mut self.top[pos].1);
            remove_in(node, base, MID_SHIFT, lo.max(base), hi.min(top_last), id);
            if node.is_empty() {
                self.top.remove(pos);
            }
        }
        self.len = self.len.saturating_sub(1);
        self.first = self.top.first().cloned();
    }
}

/// Inserts `span` into the slots of `node` (whose range starts at `base`, slots of `1 << shift`)
/// overlapping `[lo, hi]`.
fn insert_in<A: Address, V>(node: &mut Node<A, V>, base: u64, shift: u32, lo: u64, hi: u64, span: &Arc<Span<A, V>>) {
    for idx in slot_index(lo, shift)..=slot_index(hi, shift) {
        let sbase = base | ((idx as u64) << shift);
        let slast = sbase | ((1u64 << shift) - 1);
        let (clo, chi) = (lo.max(sbase), hi.min(slast));
        let slot = &mut node.slots[idx];
        match slot {
            Slot::Empty => *slot = Slot::one(span),
            Slot::One { span: existing, .. } if shift == LEAF_SHIFT => {
                let mut spans = vec![existing.clone(), span.clone()];
                spans.sort_by_key(|s| s.start);
                *slot = Slot::Many(Arc::new(Many { starts: spans.iter().map(|s| s.start).collect(), spans }));
            }
            Slot::One { span: existing, .. } => {
                let existing = existing.clone();
                let mut child = Node::new();
                let (elo, ehi) = (existing.start.raw().max(sbase), existing.last.raw().min(slast));
                insert_in(&mut child, sbase, shift - FANOUT_BITS, elo, ehi, &existing);
                insert_in(&mut child, sbase, shift - FANOUT_BITS, clo, chi, span);
                *slot = Slot::Node(Arc::new(child));
            }
            Slot::Many(m) => {
                let m = Arc::make_mut(m);
                let p = m.starts.partition_point(|s| *s < span.start);
                m.starts.insert(p, span.start);
                m.spans.insert(p, span.clone());
            }
            Slot::Node(child) => insert_in(Arc::make_mut(child), sbase, shift - FANOUT_BITS, clo, chi, span),
        }
    }
}

fn remove_in<A: Address, V>(node: &mut Node<A, V>, base: u64, shift: u32, lo: u64, hi: u64, id: u64) {
    for idx in slot_index(lo, shift)..=slot_index(hi, shift) {
        let sbase = base | ((idx as u64) << shift);
        let slast = sbase | ((1u64 << shift) - 1);
        let slot = &mut node.slots[idx];
        match slot {
            Slot::Empty => {}
            Slot::One { span: s, .. } => {
                if s.id == id {
                    *slot = Slot::Empty;
                }
            }
            Slot::Many(m) => {
                let mm = Arc::make_mut(m);
                if let Some(p) = mm.spans.iter().position(|s| s.id == id) {
                    mm.spans.remove(p);
                    mm.starts.remove(p);
                }
                match mm.spans.len() {
                    0 => *slot = Slot::Empty,
                    1 => *slot = Slot::one(&mm.spans[0]),
                    _ => {}
                }
            }
            Slot::Node(child) => {
                let c = Arc::make_mut(child);
                remove_in(c, sbase, shift - FANOUT_BITS, lo.max(sbase), hi.min(slast), id);
                if c.is_empty() {
                    *slot = Slot::Empty;
                } else if let Some(sole) = c.sole_span() {
                    *slot = Slot::one(&sole);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::VirtAddr;

    fn span(start: u64, len: u64, id: u64) -> Arc<Span<VirtAddr, u64>> {
        Arc::new(Span { start: VirtAddr::new(start), last: VirtAddr::new(start + (len - 1)), id, val: id })
    }

    fn brute(spans: &[Arc<Span<VirtAddr, u64>>], a: u64) -> Option<u64> {
        spans.iter().find(|s| s.contains(VirtAddr::new(a))).map(|s| s.id)
    }

    #[test]
    fn finds_spans_at_every_granularity() {
        let mut m = SpanMap::default();
        let spans = vec![
            span(0x1000, 0x1000, 1),                    // small, leaf level
            span(0x3000, 0x2000, 2),                    // shares the 2 MiB granule with 1
            span(0x4000_0000, 0x8000_0000, 3),          // 2 GiB, 1 GiB aligned
            span(0x7fff_0000_0000 - 0x1000, 0x2000, 4), // crosses a top-key boundary
            span(0x20_0000 - 0x800, 0x1000, 5),         // crosses a 2 MiB boundary
            span(u64::MAX - 0xfff, 0x1000, 6),          // the very top
        ];
        for s in &spans {
            m.insert(s.clone());
        }
        let probes = [
            0,
            0xfff,
            0x1000,
            0x1fff,
            0x2000,
            0x2fff,
            0x3000,
            0x4fff,
            0x5000,
            0x3fff_ffff,
            0x4000_0000,
            0xbfff_ffff,
            0xc000_0000,
            0x7fff_0000_0000 - 0x1001,
            0x7fff_0000_0000 - 0x1000,
            0x7fff_0000_0000,
            0x7fff_0000_0fff,
            0x7fff_0000_1000,
            0x1f_f800,
            0x20_07ff,
            0x20_0800,
            u64::MAX,
            u64::MAX - 0x1000,
        ];
        for a in probes {
            assert_eq!(m.get(VirtAddr::new(a)).map(|(_, s)| s.id), brute(&spans, a), "address {a:#x}");
        }
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn remove_restores_emptiness_and_keeps_old_clones_intact() {
        let mut m = SpanMap::default();
        let a = span(0x1000, 0x1000, 1);
        let b = span(0x3000, 0x1000, 2);
        let c = span(0x4000_0000, 0x4000_0000, 3);
        for s in [&a, &b, &c] {
            m.insert(s.clone());
        }
        let old = m.clone();
        m.remove(a.start, a.last, 1);
        assert!(m.get(VirtAddr::new(0x1000)).is_none());
        assert_eq!(m.get(VirtAddr::new(0x3000)).unwrap().1.id, 2);
        // The clone taken before the removal still sees the span: readers are never disturbed.
        assert_eq!(old.get(VirtAddr::new(0x1000)).unwrap().1.id, 1);
        m.remove(b.start, b.last, 2);
        m.remove(c.start, c.last, 3);
        assert!(m.top.is_empty(), "all nodes collapse away");
        assert_eq!(old.get(VirtAddr::new(0x4000_0000)).unwrap().1.id, 3);
    }

    #[test]
    fn randomized_against_brute_force() {
        // Deterministic xorshift; spans placed in disjoint cells so they never overlap.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut m = SpanMap::default();
        let mut live: Vec<Arc<Span<VirtAddr, u64>>> = Vec::new();
        let cell = 1u64 << 22; // 4 MiB cells: spans may cross a 2 MiB granule
        for round in 0..4000u64 {
            if live.len() > 50 && next() % 3 == 0 {
                let i = (next() % live.len() as u64) as usize;
                let s = live.swap_remove(i);
                m.remove(s.start, s.last, s.id);
            } else {
                let c = next() % 4096;
                if live.iter().any(|s| s.start.raw() / cell == c) {
                    continue;
                }
                let off = next() % (cell / 2);
                let len = 1 + next() % (cell / 2);
                let s = span(c * cell + off, len, round);
                m.insert(s.clone());
                live.push(s);
            }
            for _ in 0..4 {
                let a = (next() % 4096) * cell + next() % cell;
                assert_eq!(m.get(VirtAddr::new(a)).map(|(_, s)| s.id), brute(&live, a));
            }
        }
        for s in &live {
            assert_eq!(m.get(s.start).unwrap().1.id, s.id);
            assert_eq!(m.get(s.last).unwrap().1.id, s.id);
        }
    }
}
