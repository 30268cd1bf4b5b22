//! Bookkeeping of the DMA mappings a long-lived VFIO device keeps between transfers, and of
//! where each one sits in the IOMMU domain. Pure data: no system call, no lock, no clock.
//!
//! Owns: `MapCache` (kept mappings by key, with their order of last use, and the rule that says
//! which to let go: every one whose registration ended, then the least recently used beyond a
//! bound, never the one the transfer being prepared uses) and `IovaSpace` (IOVA ranges handed
//! out first fit, each followed by a guard page no mapping covers; freed ranges coalesce and are
//! handed out again).
//! Must not: release anything itself. What `MapCache::sweep` evicts is handed back to `vfio`,
//! which unmaps it (and only then frees its IOVA range) at a point the driver knows no command
//! is in flight.

use std::collections::BTreeMap;

use peermem::Iova;

/// Values by key, each with the tick of its last use. A linear table: it holds a bounded
/// handful of mappings, and every lookup is one scan.
#[derive(Debug)]
pub struct MapCache<K, V> {
    slots: Vec<Slot<K, V>>,
    clock: u64,
}

#[derive(Debug)]
struct Slot<K, V> {
    key: K,
    value: V,
    used: u64,
}

impl<K: PartialEq, V> Default for MapCache<K, V> {
    fn default() -> Self {
        MapCache { slots: Vec::new(), clock: 0 }
    }
}

impl<K: PartialEq, V> MapCache<K, V> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value kept under `key`, now the most recently used.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let now = self.tick();
        let slot = self.slots.iter_mut().find(|s| s.key == *key)?;
        slot.used = now;
        Some(&mut slot.value)
    }

    /// Keeps `value` under `key` as the most recently used; returns what was kept under the same
    /// key before (for the caller to release).
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let used = self.tick();
        let old = self.slots.iter().position(|s| s.key == key).map(|i| self.slots.swap_remove(i).value);
        self.slots.push(Slot { key, value, used });
        old
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().map(|s| &s.value)
    }

    /// Takes out every value `ended` says is done with, then the least recently used ones until
    /// at most `bound` are left; `current` (the key a transfer is about to use) is never taken.
    /// Returns what was taken, ended ones first, then oldest first.
    pub fn sweep(&mut self, bound: usize, current: Option<&K>, mut ended: impl FnMut(&V) -> bool) -> Vec<V> {
        let spared = |s: &Slot<K, V>| current.is_some_and(|k| s.key == *k);
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.slots.len() {
            if !spared(&self.slots[i]) && ended(&self.slots[i].value) {
                out.push(self.slots.swap_remove(i).value);
            } else {
                i += 1;
            }
        }
        while self.slots.len() > bound {
            let oldest = self.slots.iter().enumerate().filter(|(_, s)| !spared(s)).min_by_key(|(_, s)| s.used);
            let Some((i, _)) = oldest else { break };
            out.push(self.slots.swap_remove(i).value);
        }
        out
    }
}

/// A range of IOVA space, `[base, limit)`, handed out in whole pages. Every range handed out is
/// followed by one guard page that stays reserved (and unmapped) with it, so a device that runs
/// past the end of one mapping faults instead of reaching the next.
#[derive(Debug)]
pub struct IovaSpace {
    /// Free ranges, start -> end (exclusive): disjoint, and never two that touch (coalesced).
    free: BTreeMap<u64, u64>,
    base: u64,
    limit: u64,
    page: u64,
    reserved: u64,
    high: u64,
}

impl IovaSpace {
    /// All of `[base, limit)` free. `base` and `limit` must be multiples of `page` (a power of
    /// two), with `base < limit`.
    pub fn new(base: Iova, limit: Iova, page: u64) -> IovaSpace {
        let (base, limit) = (base.raw(), limit.raw());
        assert!(page.is_power_of_two() && base % page == 0 && limit % page == 0 && base < limit);
        IovaSpace { free: BTreeMap::from([(base, limit)]), base, limit, page, reserved: 0, high: base }
    }

    /// What reserving `len` bytes takes: whole pages plus the guard page.
    fn span(&self, len: u64) -> Option<u64> {
        len.checked_next_multiple_of(self.page)?.checked_add(self.page)
    }

    /// The lowest free range that holds `len` bytes (rounded up to whole pages) and its guard
    /// page; None when none does (or `len` is 0).
    pub fn alloc(&mut self, len: u64) -> Option<Iova> {
        if len == 0 {
            return None;
        }
        let need = self.span(len)?;
        let (start, end) = self.free.iter().map(|(&s, &e)| (s, e)).find(|&(s, e)| e - s >= need)?;
        self.free.remove(&start);
        if end - start > need {
            self.free.insert(start + need, end);
        }
        self.reserved += need;
        self.high = self.high.max(start + need);
        Some(Iova::new(start))
    }

    /// Gives back what `alloc(len)` returned as `iova` (and its guard page). Refused, with
    /// nothing changed, when the range was not handed out whole (it lies outside the space or
    /// overlaps a free range): a range freed twice is never handed out twice.
    pub fn free(&mut self, iova: Iova, len: u64) -> Result<(), String> {
        let start = iova.raw();
        let end = self.span(len).and_then(|n| start.checked_add(n));
        let bad = |why: &str| Err(format!("IOVA {iova} + {len:#x}: {why}"));
        let Some(mut end) = end.filter(|&e| len > 0 && start >= self.base && e <= self.limit) else {
            return bad("not a range of this space");
        };
        if !start.is_multiple_of(self.page) {
            return bad("not page aligned");
        }
        let before = self.free.range(..end).next_back().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > start) {
            return bad("overlaps a free range (freed twice?)");
        }
        let mut start = start;
        if let Some((s, _)) = before.filter(|&(_, e)| e == start) {
            self.free.remove(&s);
            start = s;
        }
        if let Some(e) = self.free.remove(&end) {
            end = e;
        }
        self.reserved -= self.span(len).expect("checked above");
        self.free.insert(start, end);
        Ok(())
    }

    /// Bytes handed out now (guard pages included).
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// How far above the base the highest range ever handed out reached: with freed ranges
    /// reused, it stays near the most ever reserved at once.
    pub fn high_water(&self) -> u64 {
        self.high - self.base
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use peermem::Address;

    use super::*;

    const PAGE: u64 = 4096;

    fn space(pages: u64) -> IovaSpace {
        IovaSpace::new(Iova::new(1 << 32), Iova::new((1 << 32) + pages * PAGE), PAGE)
    }

    #[test]
    fn every_range_is_followed_by_a_guard_page_and_ranges_round_up_to_pages() {
        let mut s = space(16);
        let a = s.alloc(PAGE).unwrap();
        let b = s.alloc(100).unwrap();
        let c = s.alloc(3 * PAGE).unwrap();
        assert_eq!(a.raw(), 1 << 32);
        assert_eq!(b.raw() - a.raw(), 2 * PAGE, "one page plus its guard");
        assert_eq!(c.raw() - b.raw(), 2 * PAGE, "100 bytes take a whole page plus its guard");
        assert_eq!(s.reserved(), 8 * PAGE);
        assert_eq!(s.alloc(0), None);
    }

    #[test]
    fn freed_ranges_are_handed_out_again_and_neighbours_coalesce() {
        let mut s = space(8);
        let a = s.alloc(PAGE).unwrap();
        let b = s.alloc(PAGE).unwrap();
        let c = s.alloc(PAGE).unwrap();
        assert_eq!(s.alloc(2 * PAGE), None, "2 pages left, 3 needed with the guard");
        s.free(b, PAGE).unwrap();
        // The hole of b (2 pages) takes a one-page range, not a larger one.
        assert_eq!(s.alloc(2 * PAGE), None);
        s.free(a, PAGE).unwrap();
        // a and b coalesced: 4 pages at the base hold 3 pages and a guard.
        assert_eq!(s.alloc(3 * PAGE), Some(a));
        s.free(a, 3 * PAGE).unwrap();
        s.free(c, PAGE).unwrap();
        assert_eq!(s.reserved(), 0);
        // Everything coalesced back into one range: the whole space but its last page (guard).
        assert_eq!(s.alloc(7 * PAGE), Some(a));
        assert_eq!(s.high_water(), 8 * PAGE);
    }

    #[test]
    fn a_range_freed_twice_or_not_handed_out_is_refused_and_changes_nothing() {
        let mut s = space(8);
        let a = s.alloc(PAGE).unwrap();
        let b = s.alloc(PAGE).unwrap();
        s.free(a, PAGE).unwrap();
        assert!(s.free(a, PAGE).unwrap_err().contains("freed twice"));
        assert!(s.free(Iova::new(0x1000), PAGE).unwrap_err().contains("not a range"));
        assert!(s.free(b.checked_add(8).unwrap(), PAGE).unwrap_err().contains("aligned"));
        assert!(s.free(b, 0).is_err());
        assert_eq!(s.reserved(), 2 * PAGE);
        // a's range is handed out once more, and only once.
        assert_eq!(s.alloc(PAGE), Some(a));
        assert_ne!(s.alloc(PAGE), Some(a));
    }

    #[test]
    fn exhaustion_is_none_and_large_lengths_do_not_overflow() {
        let mut s = space(4);
        assert_eq!(s.alloc(4 * PAGE), None, "no room for the guard");
        assert_eq!(s.alloc(u64::MAX), None);
        assert!(s.alloc(3 * PAGE).is_some());
        assert_eq!(s.alloc(1), None);
    }

    #[test]
    fn a_hit_makes_an_entry_the_most_recently_used() {
        let mut c = MapCache::default();
        for k in 0..4 {
            assert!(c.insert(k, k * 10).is_none());
        }
        assert_eq!(c.get_mut(&0), Some(&mut 0));
        assert_eq!(c.get_mut(&9), None);
        // 1 and 2 are now the least recently used.
        assert_eq!(c.sweep(2, None, |_| false), [10, 20]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.sweep(0, None, |_| false), [30, 0]);
    }

    #[test]
    fn a_sweep_takes_ended_entries_first_then_the_oldest_beyond_the_bound_but_never_current() {
        let mut c = MapCache::default();
        for k in 0..6 {
            c.insert(k, k);
        }
        // Odd values have ended; 1 is the key of the transfer being prepared: it stays.
        assert_eq!(c.sweep(2, Some(&1), |v| v % 2 == 1), [3, 5, 0, 2]);
        let left: BTreeSet<_> = c.values().copied().collect();
        assert_eq!(left, [1, 4].into());
        assert_eq!(c.sweep(1, Some(&1), |_| false), [4]);
        // With only the current key left, a bound of 0 takes nothing more.
        assert!(c.sweep(0, Some(&1), |_| false).is_empty());
        assert_eq!(c.sweep(0, None, |_| false), [1]);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn inserting_a_kept_key_hands_back_the_old_value() {
        let mut c = MapCache::default();
        c.insert("a", 1);
        assert_eq!(c.insert("a", 2), Some(1));
        assert_eq!(c.len(), 1);
    }

    /// The guest test's pattern without VFIO: every transfer maps a fresh registration's pages
    /// and the previous registration has ended, so the kept set and the IOVA space stay bounded;
    /// registrations that all stay live are held to the bound, oldest out first.
    #[test]
    fn fresh_registrations_keep_the_kept_set_and_the_iova_high_water_bounded() {
        const BOUND: usize = 4;
        let mut s = space(1 << 20);
        let mut c: MapCache<u64, (u64, Iova, u64)> = MapCache::default();
        let mut live = BTreeSet::new();
        let transfer = |id: u64, len: u64, live: &BTreeSet<u64>, s: &mut IovaSpace, c: &mut MapCache<_, _>| {
            if c.get_mut(&id).is_none() {
                c.insert(id, (id, s.alloc(len).expect("IOVA space reused"), len));
            }
            for (_, iova, len) in c.sweep(BOUND, Some(&id), |v| !live.contains(&v.0)) {
                s.free(iova, len).unwrap();
            }
            c.len()
        };
        let mut peak = 0;
        for id in 0..10_000u64 {
            live.insert(id);
            peak = peak.max(transfer(id, (1 + id % 3) * PAGE, &live, &mut s, &mut c));
            live.remove(&id);
        }
        assert_eq!(peak, 1, "after each sweep only the live registration's mapping stays");
        // Two ranges of up to 4 pages (guard included) at once, and what first fit leaves between.
        assert!(s.high_water() <= 3 * 4 * PAGE, "high water {:#x}", s.high_water());
        for id in 10_000..10_010u64 {
            live.insert(id);
            assert!(transfer(id, PAGE, &live, &mut s, &mut c) <= BOUND);
        }
        let kept: BTreeSet<_> = c.values().map(|v| v.0).collect();
        assert_eq!(kept, (10_006..10_010).collect());
        // A repeated transfer into a kept registration maps nothing new.
        let before = s.reserved();
        transfer(10_007, PAGE, &live, &mut s, &mut c);
        assert_eq!(s.reserved(), before);
    }
}
