//! The registry's read side: direct-indexed tables from addresses to non-overlapping spans,
//! published as immutable snapshots whose memory is reclaimed only after every snapshot that
//! could reach it is gone.
//!
//! Shape (after SPDK's `spdk_mem_map`, a page table with huge pages): per table, 512 root slots
//! of 512 GiB, then nodes of 512 slots of 1 GiB, 2 MiB and 4 KiB. A slot is empty, holds one
//! span (its start inline, and a flag when the span covers the whole slot), points at a child
//! node (only where spans are denser than the slot), or, at 4 KiB, at a sorted list of the spans
//! sharing that page. A published table holds a window of 4 root slots inline (2 TiB: a
//! process's mappings, a host bridge's windows), so a lookup of an address in a span of 2 MiB or
//! more is two dependent node loads (the 1 GiB slot, the 2 MiB slot), like a flat two-level
//! table: no search, no lock, no reference count, no read of the span's record (its bounds are
//! read only at its ragged edges). Nodes sit in huge-page-backed chunks (see `sys`), so those
//! loads rarely miss the TLB. Addresses at or above 2^48 (rare bus windows) go to a sorted list
//! searched by bisection.
//!
//! Writes: one writer (the caller serialises them) edits copies: every node on an edited path
//! is copied once per publication (8 KiB) and untouched nodes are shared by address, so a copy
//! costs a `memcpy`, never a reference-count walk. The memory itself (allocation, copy-on-write,
//! reclamation by era) is `sys`, the only `unsafe` here; this module decides what goes where.
//!
//! Owns: the index. Must not: check overlap (the registry does, before inserting).

#[allow(unsafe_code)]
mod sys;

use sys::{Heap, Kind, Slot, TableMut, View, FANOUT, FANOUT_BITS};

const ROOT_SHIFT: u32 = 39;
const PAGE_SHIFT: u32 = 12;
/// Addresses from here up are looked up in a sorted list, not the radix.
const HIGH: u64 = 1 << 48;

#[inline(always)]
fn slot_index(a: u64, shift: u32) -> usize {
    ((a >> shift) as usize) & (FANOUT - 1)
}

/// An immutable view of several tables (the registry's: virtual addresses, then one table of
/// bus addresses per host-bridge hierarchy). Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct SpanSet<V> {
    set: sys::Set<V>,
}

impl<V> SpanSet<V> {
    /// The span of table `t` containing `a`: its start and value.
    #[inline(always)]
    pub fn get(&self, t: usize, a: u64) -> Option<(u64, &V)> {
        if let Some(hit) = self.set.covered(t, a) {
            return Some(hit);
        }
        if a >= HIGH {
            return in_rec(self.set.high(t)?.find(a)?, a);
        }
        // Everything `covered` leaves (a span's ragged edge, sub-page spans, empty slots, root
        // slots outside the inline window) is walked from the root slot down.
        walk(self.set.top(t, a >> ROOT_SHIFT)?, a, ROOT_SHIFT)
    }
}

/// Finishes a lookup at slot view `s` (of a slot of `1 << shift`).
#[inline(never)]
fn walk<V>(mut s: View<'_, V>, a: u64, mut shift: u32) -> Option<(u64, &V)> {
    loop {
        match s {
            View::Empty => return None,
            View::Span { start, full: true, rec } => return Some((start, &rec.val)),
            View::Span { rec, .. } => return in_rec(rec, a),
            View::Many(m) => return in_rec(m.find(a)?, a),
            View::Node(n) => {
                shift -= FANOUT_BITS;
                s = n.slot(slot_index(a, shift));
            }
        }
    }
}

#[inline]
fn in_rec<V>(r: &sys::Rec<V>, a: u64) -> Option<(u64, &V)> {
    (a >= r.start && a <= r.last).then_some((r.start, &r.val))
}

/// The one writer: edits the tables, then publishes them as a new set.
pub(crate) struct SpanWriter<V> {
    heap: Heap<V>,
    tables: Vec<TableMut<V>>,
    dirty: bool,
}

impl<V> SpanWriter<V> {
    /// A writer of `n >= 1` empty tables.
    pub fn new(n: usize) -> SpanWriter<V> {
        let n = n.max(1);
        SpanWriter { heap: Heap::new(n), tables: (0..n).map(|_| TableMut::default()).collect(), dirty: false }
    }

    /// The last published set.
    pub fn latest(&self) -> SpanSet<V> {
        SpanSet { set: self.heap.latest().clone() }
    }

    /// Adds the span `[start, last]` to table `t`. The caller guarantees it overlaps no span
    /// of that table.
    pub fn insert(&mut self, t: usize, start: u64, last: u64, val: V) {
        let heap = &mut self.heap;
        let table = &mut self.tables[t];
        self.dirty = true;
        let rec = heap.new_rec(start, last, val);
        if last >= HIGH {
            let high = table.high_mut();
            if high.is_empty() {
                *high = heap.new_many(Vec::new());
            }
            let span = heap.span_slot(&rec, false);
            if let Some(items) = heap.many_mut(high) {
                let p = items.partition_point(|s| s.start() < start);
                items.insert(p, span);
            }
        }
        if start < HIGH {
            let hi = last.min(HIGH - 1);
            for key in (start >> ROOT_SHIFT)..=(hi >> ROOT_SHIFT) {
                let base = key << ROOT_SHIFT;
                let root = table.root_mut(key as usize);
                if root.is_empty() {
                    *root = heap.new_node();
                }
                if let Some(top) = heap.node_mut(root) {
                    let (lo, hi) = (start.max(base), hi.min(base | ((1 << ROOT_SHIFT) - 1)));
                    insert_in(heap, top, base, ROOT_SHIFT - FANOUT_BITS, lo, hi, &rec);
                }
            }
        }
        heap.drop_rec(rec);
    }

    /// Removes the span starting at `start` (inserted covering `[start, last]`) from table `t`.
    pub fn remove(&mut self, t: usize, start: u64, last: u64) {
        let heap = &mut self.heap;
        let table = &mut self.tables[t];
        self.dirty = true;
        if last >= HIGH {
            let high = table.high_mut();
            if let Some(items) = heap.many_mut(high) {
                if let Some(i) = items.iter().position(|s| s.start() == start) {
                    let gone = items.remove(i);
                    let now_empty = items.is_empty();
                    heap.release(gone);
                    if now_empty {
                        let list = std::mem::replace(high, Slot::empty());
                        heap.release(list);
                    }
                }
            }
        }
        if start < HIGH {
            let hi = last.min(HIGH - 1);
            for key in (start >> ROOT_SHIFT)..=(hi >> ROOT_SHIFT) {
                let base = key << ROOT_SHIFT;
                let root = table.root_mut(key as usize);
                let (lo, hi) = (start.max(base), hi.min(base | ((1 << ROOT_SHIFT) - 1)));
                let emptied = match heap.node_mut(root) {
                    Some(top) => remove_in(heap, top, base, ROOT_SHIFT - FANOUT_BITS, lo, hi, start),
                    None => false,
                };
                if emptied {
                    let top = std::mem::replace(root, Slot::empty());
                    heap.release(top);
                }
            }
        }
    }

    /// Publishes every edit since the last publication as a new set.
    pub fn publish(&mut self) -> SpanSet<V> {
        self.dirty = false;
        SpanSet { set: self.heap.publish(&mut self.tables) }
    }
}

impl<V> Drop for SpanWriter<V> {
    fn drop(&mut self) {
        // Everything still reachable goes to the last set's era: freed with the last set.
        if self.dirty {
            self.publish();
        }
        self.heap.close(&mut self.tables);
    }
}

/// Inserts the span of `rec` into the slots (of `1 << shift`, the first at `base`) of a node
/// being edited that overlap `[lo, hi]`.
fn insert_in<V>(
    heap: &mut Heap<V>,
    slots: &mut [Slot<V>; FANOUT],
    base: u64,
    shift: u32,
    lo: u64,
    hi: u64,
    rec: &sys::RecTok<V>,
) {
    let (first, end) = (slot_index(lo, shift), slot_index(hi, shift) + 1);
    for (idx, slot) in slots.iter_mut().enumerate().take(end).skip(first) {
        let sbase = base | ((idx as u64) << shift);
        let slast = sbase | ((1u64 << shift) - 1);
        let (clo, chi) = (lo.max(sbase), hi.min(slast));
        let full = rec.start() <= sbase && rec.last() >= slast;
        match slot.kind() {
            Kind::Empty => *slot = heap.span_slot(rec, full),
            Kind::Span if shift == PAGE_SHIFT => {
                // Several spans share this page: a sorted list.
                let old = std::mem::replace(slot, Slot::empty());
                let new = heap.span_slot(rec, full);
                let items = if old.start() < new.start() { vec![old, new] } else { vec![new, old] };
                *slot = heap.new_many(items);
            }
            Kind::Span => {
                // Two spans share this slot: split it into a child node holding both.
                let old = std::mem::replace(slot, Slot::empty());
                let Some(other) = heap.rec_of(&old) else { continue };
                heap.release(old);
                *slot = heap.new_node();
                if let Some(child) = heap.node_mut(slot) {
                    let (olo, ohi) = (other.start().max(sbase), other.last().min(slast));
                    insert_in(heap, child, sbase, shift - FANOUT_BITS, olo, ohi, &other);
                    insert_in(heap, child, sbase, shift - FANOUT_BITS, clo, chi, rec);
                }
                heap.drop_rec(other);
            }
            Kind::Node => {
                if let Some(child) = heap.node_mut(slot) {
                    insert_in(heap, child, sbase, shift - FANOUT_BITS, clo, chi, rec);
                }
            }
            Kind::Many => {
                let span = heap.span_slot(rec, full);
                if let Some(items) = heap.many_mut(slot) {
                    let p = items.partition_point(|s| s.start() < rec.start());
                    items.insert(p, span);
                }
            }
        }
    }
}

/// Removes the span starting at `start` from the slots of a node being edited that overlap
/// `[lo, hi]`; true when the node is left empty (the caller releases it).
fn remove_in<V>(
    heap: &mut Heap<V>,
    slots: &mut [Slot<V>; FANOUT],
    base: u64,
    shift: u32,
    lo: u64,
    hi: u64,
    start: u64,
) -> bool {
    let (first, end) = (slot_index(lo, shift), slot_index(hi, shift) + 1);
    let mut emptied = false;
    for (idx, slot) in slots.iter_mut().enumerate().take(end).skip(first) {
        let sbase = base | ((idx as u64) << shift);
        let slast = sbase | ((1u64 << shift) - 1);
        match slot.kind() {
            Kind::Empty => {}
            Kind::Span => {
                if slot.start() == start {
                    let gone = std::mem::replace(slot, Slot::empty());
                    heap.release(gone);
                    emptied = true;
                }
            }
            Kind::Node => {
                let child_emptied = match heap.node_mut(slot) {
                    Some(child) => {
                        remove_in(heap, child, sbase, shift - FANOUT_BITS, lo.max(sbase), hi.min(slast), start)
                    }
                    None => false,
                };
                if child_emptied {
                    let child = std::mem::replace(slot, Slot::empty());
                    heap.release(child);
                    emptied = true;
                }
            }
            Kind::Many => {
                let Some(items) = heap.many_mut(slot) else { continue };
                let gone = items.iter().position(|s| s.start() == start).map(|i| items.remove(i));
                let left = if items.len() <= 1 { Some(items.pop()) } else { None };
                if let Some(g) = gone {
                    heap.release(g);
                }
                if let Some(left) = left {
                    // One span or none left: the slot holds it directly.
                    let list = std::mem::replace(slot, left.unwrap_or_else(Slot::empty));
                    heap.release(list);
                    emptied |= slot.is_empty();
                }
            }
        }
    }
    // Only a slot emptied here can have left the node empty.
    emptied && slots.iter().all(Slot::is_empty)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A value that counts its drops, to check that every span record is freed exactly once.
    struct Counted(u64, Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn brute(spans: &[(u64, u64, u64)], a: u64) -> Option<u64> {
        spans.iter().find(|s| a >= s.0 && a <= s.1).map(|s| s.2)
    }

    fn get(set: &SpanSet<Counted>, a: u64) -> Option<u64> {
        set.get(0, a).map(|(start, v)| {
            assert!(start <= a);
            v.0
        })
    }

    #[test]
    fn finds_spans_of_any_alignment_and_size() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut w = SpanWriter::new(1);
        let spans = [
            (0x1000, 0x1fff, 1),                              // one page
            (0x3000, 0x4fff, 2),                              // shares a 2 MiB slot with 1
            (0x4000_0000, 0xbfff_ffff, 3),                    // 2 GiB, 1 GiB aligned
            (0x7fff_0000_0000 - 0x1000, 0x7fff_0000_0fff, 4), // crosses a root boundary
            (0x20_0000 - 0x800, 0x20_07ff, 5),                // crosses a 2 MiB boundary
            (0x5000, 0x5010, 6),                              // sub-page spans sharing a page
            (0x5011, 0x5011, 7),
            (0x5fff, 0x6000, 8),
            (HIGH - 0x10, HIGH + 0x10, 9),    // straddles the radix's top
            (u64::MAX - 0xfff, u64::MAX, 10), // the very top
        ];
        for &(s, l, id) in &spans {
            w.insert(0, s, l, Counted(id, drops.clone()));
        }
        let set = w.publish();
        let mut probes = vec![0, u64::MAX, HIGH, HIGH - 1, HIGH - 0x11, HIGH + 0x11, 0x3fff_ffff, 0xc000_0000];
        for &(s, l, _) in &spans {
            probes.extend([s.wrapping_sub(1), s, s + (l - s) / 2, l, l.wrapping_add(1)]);
        }
        for a in probes {
            assert_eq!(get(&set, a), brute(&spans, a), "address {a:#x}");
        }
        drop(set);
        drop(w);
        assert_eq!(drops.load(Ordering::SeqCst), spans.len(), "every span freed exactly once");
    }

    #[test]
    fn root_slots_inside_and_outside_the_inline_window() {
        // Root keys (512 GiB each) k, k+1, k+3 sit in the window of inline root slots that
        // starts at the first key in use; k+4 and 511 lie past it (a root node is published).
        let drops = Arc::new(AtomicUsize::new(0));
        let mut w = SpanWriter::new(1);
        let at = |key: u64| key << ROOT_SHIFT;
        let mut live = Vec::new();
        for (id, key) in [(1, 7), (2, 8), (3, 10), (4, 11), (5, 511)] {
            let s = at(key) + 0x20_0000;
            w.insert(0, s, s + 0x3f_ffff, Counted(id, drops.clone()));
            live.push((s, s + 0x3f_ffff, id));
            let set = w.publish();
            for key in [0, 6, 7, 8, 9, 10, 11, 12, 510, 511] {
                for a in [at(key), at(key) + 0x20_0000, at(key) + 0x3f_ffff, at(key) + 0x60_0000] {
                    assert_eq!(get(&set, a), brute(&live, a), "address {a:#x} with {} spans", live.len());
                }
            }
        }
        // The window moves up when its first key empties.
        w.remove(0, live[0].0, live[0].1);
        live.remove(0);
        let set = w.publish();
        for &(s, l, id) in &live {
            assert_eq!((get(&set, s), get(&set, l), get(&set, s - 1)), (Some(id), Some(id), None));
        }
        assert_eq!(get(&set, at(7) + 0x20_0000), None);
    }

    #[test]
    fn old_sets_keep_seeing_removed_spans_until_dropped() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut w = SpanWriter::new(2);
        w.insert(0, 0x1000, 0x1fff, Counted(1, drops.clone()));
        w.insert(1, 0x1000, 0x1fff, Counted(2, drops.clone()));
        let old = w.publish();
        w.remove(0, 0x1000, 0x1fff);
        let new = w.publish();
        assert_eq!(get(&new, 0x1800), None);
        assert_eq!(new.get(1, 0x1800).map(|(_, v)| v.0), Some(2), "other tables are untouched");
        assert_eq!(get(&old, 0x1800), Some(1), "an older set never changes");
        assert_eq!(drops.load(Ordering::SeqCst), 0, "a set that reaches it keeps it alive");
        drop(old);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "freed with the last set that reached it");
        drop(w);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the live span outlives the writer while a set holds it");
        drop(new);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_long_era_chain_is_freed_when_the_oldest_set_goes() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut w = SpanWriter::new(1);
        let first = w.publish();
        for i in 0..3000u64 {
            w.insert(0, 0x4000_0000, 0x7fff_ffff, Counted(i, drops.clone()));
            w.publish();
            w.remove(0, 0x4000_0000, 0x7fff_ffff);
            w.publish();
        }
        drop(w);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(first);
        assert_eq!(drops.load(Ordering::SeqCst), 3000);
    }

    #[test]
    fn randomized_against_brute_force() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let drops = Arc::new(AtomicUsize::new(0));
        let mut w = SpanWriter::new(1);
        let mut live: Vec<(u64, u64, u64)> = Vec::new();
        let mut sets = Vec::new();
        let mut made = 0;
        // Cells of 4 MiB, one span per cell at most, of 1 byte up to 2 MiB at any offset: spans
        // share pages, cross 2 MiB slots, and sit anywhere in a slot.
        let cell = 1u64 << 22;
        for round in 0..6000u64 {
            if live.len() > 60 && next() % 3 == 0 || live.len() > 400 {
                let i = (next() % live.len() as u64) as usize;
                let (s, l, _) = live.swap_remove(i);
                w.remove(0, s, l);
            } else {
                // Mostly within one root slot; some in any of the 512 (inside and outside the
                // published window of inline root slots); some above the radix.
                let c = next() % 2048
                    + match next() % 8 {
                        0 => 1 << 26,
                        1 => (next() % 512) << 17,
                        _ => 0,
                    };
                if live.iter().any(|s| s.0 / cell == c) {
                    continue;
                }
                let len = if next() % 2 == 0 { 1 + next() % 64 } else { 1 + next() % (cell / 2) };
                let s = c * cell + next() % (cell / 2);
                w.insert(0, s, s + len - 1, Counted(round, drops.clone()));
                made += 1;
                live.push((s, s + len - 1, round));
            }
            let set = w.publish();
            for _ in 0..8 {
                let c = match live.len() {
                    0 => next() % 2048,
                    n if next() % 2 == 0 => live[(next() % n as u64) as usize].0 / cell,
                    _ if next() % 4 == 0 => ((next() % 512) << 17) | (next() % 2048),
                    _ => next() % 2048,
                };
                let a = c * cell + next() % cell;
                assert_eq!(get(&set, a), brute(&live, a), "address {a:#x}");
            }
            if round % 500 == 0 {
                sets.push((set, live.clone()));
            }
        }
        let now = w.publish();
        for (s, l, id) in &live {
            assert_eq!(get(&now, *s), Some(*id));
            assert_eq!(get(&now, *l), Some(*id));
        }
        drop(now);
        // Old sets still answer as they did when they were published.
        for (set, spans) in &sets {
            for &(s, l, id) in spans {
                assert_eq!(get(set, s), Some(id));
                assert_eq!(get(set, l), Some(id));
            }
        }
        drop(sets);
        drop(w);
        assert_eq!(drops.load(Ordering::SeqCst), made);
    }
}

/// Model checks of publication and reclamation, run with
/// `RUSTFLAGS="--cfg loom" cargo test -p peermem --lib spanmap::loom_tests --release`.
/// The registry publishes through `arc_swap`; here a mutex stands in for it (a reader sees a
/// publication or not, and its clone of the set pins that set's era), and the model explores
/// every interleaving of one reader with a writer that removes a span and edits again.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::{Arc, Mutex};

    #[test]
    fn readers_never_reach_retired_nodes_and_miss_after_remove_returned() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let mut w = SpanWriter::new(1);
            w.insert(0, 0x1000, 0x1fff, 1u64);
            w.insert(0, 0x40_0000, 0x5f_ffff, 2u64);
            let current = Arc::new(Mutex::new(w.publish()));
            let gone = Arc::new(AtomicBool::new(false));
            let reader = {
                let (current, gone) = (current.clone(), gone.clone());
                loom::thread::spawn(move || {
                    let removed = gone.load(Ordering::Acquire);
                    let set = current.lock().unwrap().clone();
                    let hit = set.get(0, 0x1800).map(|(_, v)| *v);
                    if removed {
                        assert_eq!(hit, None, "found after its removal was published");
                    } else {
                        assert!(matches!(hit, None | Some(1)));
                    }
                    // Every node on the path, reached again after the writer moved on.
                    assert_eq!(set.get(0, 0x40_0000).map(|(_, v)| *v), Some(2));
                })
            };
            w.remove(0, 0x1000, 0x1fff);
            let next = w.publish();
            drop(std::mem::replace(&mut *current.lock().unwrap(), next));
            gone.store(true, Ordering::Release);
            // A second edit retires the nodes the first one made; the writer then goes away.
            w.insert(0, 0x2000, 0x2fff, 3);
            let next = w.publish();
            drop(std::mem::replace(&mut *current.lock().unwrap(), next));
            drop(w);
            reader.join().unwrap();
        });
    }
}
