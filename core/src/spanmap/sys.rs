//! The span tables' memory: table nodes, sorted span lists and span records as plain heap
//! allocations shared by address between snapshots, and their reclamation once no snapshot can
//! reach them. Owns every `unsafe` block of the span tables; the table logic (which slot holds
//! what, lookups, splits) is safe code in the parent module, built on this API:
//!
//! - Readers hold a [`Set`] (an immutable published view) and walk it through [`View`]s borrowed
//!   from it, so nothing they reach can outlive the set.
//! - The one writer ([`Heap`]) edits through owned [`Slot`] tokens (neither `Copy` nor `Clone`):
//!   a slot owns the node or list it points at, and counts as one reference to its span record.
//!   [`Heap::node_mut`] and [`Heap::many_mut`] copy a published node or list before handing out a
//!   `&mut` (a node made since the last publication is edited in place), so nothing a reader can
//!   reach is ever written. [`Heap::release`] hands a slot's allocations back.
//! - Reclamation: every set holds an `Arc` to its [`Era`]; an era holds what the next
//!   publication made unreachable, and an `Arc` to the next era. So what was retired when set
//!   k+1 replaced set k is freed exactly when no set <= k remains (each older set keeps every
//!   newer era alive). A set held for long (a `Snapshot` kept, a `Reader` left idle) therefore
//!   keeps everything retired after it, until it is dropped.
//!
//! Built with `--cfg loom`, the era chain runs on loom's `Arc` and `Mutex`, and retiring marks an
//! allocation dead (and leaks it) instead of freeing it, so that a model test sees any read of a
//! retired allocation.
//!
//! Must not: decide where a span goes, or hand a reader anything that outlives its set.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
use loom::sync::{Arc as EraArc, Mutex};
#[cfg(not(loom))]
use std::sync::{Arc as EraArc, Mutex};

pub(super) const FANOUT_BITS: u32 = 9;
pub(super) const FANOUT: usize = 1 << FANOUT_BITS;

const TAG_MASK: usize = 0b11;
const TAG_SPAN: usize = 0;
const TAG_NODE: usize = 1;
const TAG_MANY: usize = 2;
/// On a span slot: the span covers the whole slot (the table logic decides and says so).
const FULL: usize = 0b100;
const PTR_MASK: usize = !0b111;

/// A slot word pair: `p == 0` is empty; otherwise the low bits of `p` tag the allocation it
/// points at (8-byte aligned, so the bits are free). On a span slot `start` is the span's start.
#[derive(Clone, Copy)]
#[repr(C)]
struct Raw {
    start: u64,
    p: usize,
}

const EMPTY: Raw = Raw { start: 0, p: 0 };

/// A node: `FANOUT` slots, and the stamp of the writer's edit window it was made in (equal to
/// the heap's current stamp exactly while no reader can reach it).
#[repr(C)]
struct Node<V> {
    slots: [Slot<V>; FANOUT],
    stamp: u64,
    #[cfg(loom)]
    dead: loom::sync::atomic::AtomicBool,
}

/// The spans sharing one 4 KiB slot (or lying above the radix), sorted by start.
struct Many<V> {
    items: Vec<Slot<V>>,
    stamp: u64,
    #[cfg(loom)]
    dead: loom::sync::atomic::AtomicBool,
}

/// One indexed span `[start, last]` (inclusive) with the caller's value.
pub(super) struct Rec<V> {
    pub start: u64,
    pub last: u64,
    pub val: V,
    /// Writer-side count of the slots and [`RecTok`]s referring to this record.
    refs: AtomicU32,
    #[cfg(loom)]
    dead: loom::sync::atomic::AtomicBool,
}

/// What a slot holds, as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Empty,
    Span,
    Node,
    Many,
}

/// An owned slot of the writer's tables (see the module comment). Dropping one without
/// [`Heap::release`] leaks what it points at; it never frees anything.
#[repr(transparent)]
pub(super) struct Slot<V> {
    raw: Raw,
    _val: PhantomData<*const V>,
}

// SAFETY: a slot owns what it points at like a `Box` (its node or list) or an `Arc` (its span
// record, shared with the sets that reach it): moving it to another thread needs `V: Send +
// Sync`, as those would.
unsafe impl<V: Send + Sync> Send for Slot<V> {}

impl<V> Slot<V> {
    pub const fn empty() -> Slot<V> {
        Slot { raw: EMPTY, _val: PhantomData }
    }
    fn from_raw(raw: Raw) -> Slot<V> {
        Slot { raw, _val: PhantomData }
    }
    pub fn kind(&self) -> Kind {
        match self.raw.p & TAG_MASK {
            _ if self.raw.p == 0 => Kind::Empty,
            TAG_SPAN => Kind::Span,
            TAG_NODE => Kind::Node,
            _ => Kind::Many,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.raw.p == 0
    }
    /// The span's start (span slots; 0 otherwise).
    pub fn start(&self) -> u64 {
        self.raw.start
    }
}

/// An owned reference to a span record (one count), used to place its slots.
pub(super) struct RecTok<V> {
    rec: *const Rec<V>,
}

impl<V> RecTok<V> {
    pub fn start(&self) -> u64 {
        self.rec().start
    }
    pub fn last(&self) -> u64 {
        self.rec().last
    }
    fn rec(&self) -> &Rec<V> {
        // SAFETY: the token is one of the record's counted references: it is alive.
        unsafe { &*self.rec }
    }
}

/// An allocation made unreachable by a publication.
enum Retired<V> {
    Node(*mut Node<V>),
    Many(*mut Many<V>),
    Rec(*mut Rec<V>),
}

impl<V> Retired<V> {
    fn free(self, pool: &Pool<V>) {
        #[cfg(loom)]
        {
            // Marked dead and leaked: a model test then sees a read after retirement.
            let _ = pool;
            // SAFETY: as below; the allocation is never freed, only marked.
            let dead = unsafe {
                match self {
                    Retired::Node(p) => &(*p).dead,
                    Retired::Many(p) => &(*p).dead,
                    Retired::Rec(p) => &(*p).dead,
                }
            };
            dead.store(true, loom::sync::atomic::Ordering::Relaxed);
        }
        #[cfg(not(loom))]
        match self {
            // SAFETY (all arms): each pointer was made in this module (a node carved by the
            // pool, a list or a record by `Box::into_raw` of that type), is retired exactly once (the slot token that owned it was consumed, or the
            // record's count reached zero), and its era is dropped only when no set that could
            // reach it remains, so nothing reads it any more: it is ours to free or recycle.
            Retired::Node(p) => pool.put(p),
            Retired::Many(p) => drop(unsafe { Box::from_raw(p) }),
            Retired::Rec(p) => drop(unsafe { Box::from_raw(p) }),
        }
    }
}

/// Node memory. A node is 8 KiB and a lookup's cost is mostly its node loads missing the cache
/// and the TLB, so nodes are carved from 2 MiB chunks of anonymous memory that the kernel is
/// asked to back with transparent huge pages (one TLB entry per chunk instead of 512); nodes
/// no set can reach any more go to a free list and are reused (allocating and freeing two or
/// three per edit would cost more than copying them). The chunks stay until the pool goes (with
/// the writer and the last set): a registry keeps the node memory of its peak, and its first
/// node maps a whole chunk (2 MiB of address space, touched page by page or as one huge page).
/// Under loom, nodes are boxes (the model leaks retired ones).
struct Pool<V> {
    inner: std::sync::Mutex<PoolInner<V>>,
}

#[cfg_attr(loom, allow(dead_code))]
struct PoolInner<V> {
    free: Vec<*mut Node<V>>,
    /// Every chunk mapped: its address (2 MiB aligned) and length.
    chunks: Vec<(usize, usize)>,
    /// The unused rest of the newest chunk.
    carve: usize,
    left: usize,
}

#[cfg(not(loom))]
const CHUNK: usize = 2 << 20;
/// A node pointer no reader can follow (non-canonical on every 64-bit target), tagged node.
#[cfg(all(not(loom), debug_assertions))]
const POISON: usize = 0xdead_beef_0000_0000 | TAG_NODE;

// SAFETY: the pool exclusively owns the unreachable nodes it holds and its chunks (plain data,
// no `V` inside a node is ever read or dropped through it).
unsafe impl<V> Send for Pool<V> {}
// SAFETY: as for Send; everything is behind a mutex.
unsafe impl<V> Sync for Pool<V> {}

impl<V> Pool<V> {
    fn new() -> Pool<V> {
        Pool { inner: std::sync::Mutex::new(PoolInner { free: Vec::new(), chunks: Vec::new(), carve: 0, left: 0 }) }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner<V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Takes back an unreachable node (see `Retired::free`) for reuse. Debug builds first fill
    /// it with node pointers to a non-canonical address, so that a reader reaching a retired
    /// node crashes (and memcheck names the read) instead of reading stale slots unnoticed: the
    /// stress tests' evidence, now that nodes are not given back to the allocator.
    #[cfg(not(loom))]
    fn put(&self, p: *mut Node<V>) {
        #[cfg(debug_assertions)]
        // SAFETY: `p` is a node no set reaches any more, now the pool's alone (see
        // `Retired::free`); its slots are plain words.
        unsafe {
            let slots = std::ptr::addr_of_mut!((*p).slots).cast::<Slot<V>>();
            for i in 0..FANOUT {
                std::ptr::write(slots.add(i), Slot::from_raw(Raw { start: 0, p: POISON }));
            }
        }
        self.lock().free.push(p);
    }
    /// Memory for one node, uninitialised (a reused node's old contents are stale words).
    #[cfg(not(loom))]
    fn take(&self) -> *mut Node<V> {
        let mut inner = self.lock();
        if let Some(p) = inner.free.pop() {
            return p;
        }
        let size = std::mem::size_of::<Node<V>>();
        if inner.left < size {
            let (addr, len) = map_chunk();
            inner.chunks.push((addr, len));
            (inner.carve, inner.left) = (addr, len);
        }
        let p = inner.carve as *mut Node<V>;
        inner.carve += size;
        inner.left -= size;
        p
    }
    #[cfg(loom)]
    fn take(&self) -> *mut Node<V> {
        Box::into_raw(Box::<Node<V>>::new_uninit()).cast::<Node<V>>()
    }
}

/// A 2 MiB-aligned chunk of `CHUNK` bytes of zeroed anonymous memory, advised for huge pages
/// (advice the kernel may ignore: transparent huge pages off, or none free). Allocation failure
/// is the allocator's: `handle_alloc_error`.
#[cfg(not(loom))]
fn map_chunk() -> (usize, usize) {
    use rustix::mm::{madvise, mmap_anonymous, munmap, Advice, MapFlags, ProtFlags};
    let layout = std::alloc::Layout::from_size_align(CHUNK, CHUNK).expect("chunk layout");
    // Twice the size, then the unaligned ends unmapped: an aligned chunk whatever the kernel
    // placed.
    // SAFETY: a new private anonymous mapping; nothing else refers to its range.
    let p = unsafe {
        mmap_anonymous(std::ptr::null_mut(), 2 * CHUNK, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
    }
    .unwrap_or_else(|_| std::alloc::handle_alloc_error(layout));
    let start = p as usize;
    let aligned = start.next_multiple_of(CHUNK);
    let (head, tail) = (aligned - start, start + 2 * CHUNK - (aligned + CHUNK));
    // SAFETY: both ranges lie in the mapping just made and outside the chunk kept; unmapping a
    // part of one's own fresh mapping cannot fail but for a bad range, so errors are ignored
    // (at worst a few pages stay mapped).
    unsafe {
        if head > 0 {
            let _ = munmap(p, head);
        }
        if tail > 0 {
            let _ = munmap((aligned + CHUNK) as *mut std::ffi::c_void, tail);
        }
        let _ = madvise(aligned as *mut std::ffi::c_void, CHUNK, Advice::LinuxHugepage);
    }
    (aligned, CHUNK)
}

impl<V> Drop for Pool<V> {
    fn drop(&mut self) {
        let inner = self.lock();
        for &(addr, len) in &inner.chunks {
            // SAFETY: a chunk this pool mapped; every node carved from it is unreachable (the
            // pool goes with the writer and the last era, after every set).
            let _ = unsafe { rustix::mm::munmap(addr as *mut std::ffi::c_void, len) };
        }
    }
}

struct EraState<V> {
    retired: Vec<Retired<V>>,
    next: Option<EraArc<Era<V>>>,
}

/// One publication's share of the reclamation chain (see the module comment).
pub(super) struct Era<V> {
    state: Mutex<EraState<V>>,
    pool: std::sync::Arc<Pool<V>>,
}

impl<V> Era<V> {
    fn new(pool: std::sync::Arc<Pool<V>>) -> Era<V> {
        Era { state: Mutex::new(EraState { retired: Vec::new(), next: None }), pool }
    }
    fn state(&self) -> impl std::ops::DerefMut<Target = EraState<V>> + '_ {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<V> Drop for Era<V> {
    fn drop(&mut self) {
        let (retired, mut next) = {
            let mut s = self.state();
            (std::mem::take(&mut s.retired), s.next.take())
        };
        retired.into_iter().for_each(|r| r.free(&self.pool));
        // Unlink the chain iteratively: letting go of a very old set must not recurse once per
        // publication.
        while let Some(era) = next {
            match EraArc::try_unwrap(era) {
                Ok(e) => {
                    let (retired, n) = {
                        let mut s = e.state();
                        (std::mem::take(&mut s.retired), s.next.take())
                    };
                    retired.into_iter().for_each(|r| r.free(&e.pool));
                    next = n;
                }
                Err(_) => break,
            }
        }
    }
}

/// A published table, raw copies of the writer's slots, only ever read: a window of `TOPS`
/// consecutive 512 GiB root slots inline (`key0`, `tops`: a process's mappings and a host
/// bridge's windows lie within 2 TiB, so a lookup costs no root load and no branch on which
/// root slot it is), a root node for keys outside the window (`root`, made at publication only
/// when one is in use), and the list of spans above the radix (`high`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Table {
    key0: u64,
    /// Root slots `key0..key0 + TOPS`: each the address of its node, or 0 when empty.
    tops: [usize; TOPS],
    root: Raw,
    high: Raw,
}

/// Root slots held inline by a published table.
const TOPS: usize = 4;

impl PartialEq for Raw {
    fn eq(&self, o: &Raw) -> bool {
        self.start == o.start && self.p == o.p
    }
}
impl Eq for Raw {}

const EMPTY_TABLE: Table = Table { key0: 0, tops: [0; TOPS], root: EMPTY, high: EMPTY };

/// An immutable view of several tables, cheap to clone. Table 0 is inline (the hot one).
pub(super) struct Set<V> {
    head: Table,
    rest: std::sync::Arc<[Table]>,
    era: EraArc<Era<V>>,
}

// SAFETY: a set only reads nodes, lists and records, and hands out `&V`; dropping the last set
// of an era frees records (dropping `V`s) on whichever thread lets go: `V: Send + Sync` covers
// both.
unsafe impl<V: Send + Sync> Send for Set<V> {}
// SAFETY: as for Send; a shared set is only read.
unsafe impl<V: Send + Sync> Sync for Set<V> {}

impl<V> Clone for Set<V> {
    fn clone(&self) -> Self {
        Set { head: self.head, rest: self.rest.clone(), era: self.era.clone() }
    }
}

impl<V> std::fmt::Debug for Set<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanSet").field("tables", &(1 + self.rest.len())).finish()
    }
}

/// A reader's view of one slot, borrowed from the set it was reached through.
pub(super) enum View<'s, V> {
    Empty,
    Span { start: u64, full: bool, rec: &'s Rec<V> },
    Node(NodeRef<'s, V>),
    Many(ManyRef<'s, V>),
}

/// A published node, borrowed from a set.
pub(super) struct NodeRef<'s, V> {
    node: &'s Node<V>,
}

/// A published list of spans, borrowed from a set.
pub(super) struct ManyRef<'s, V> {
    many: &'s Many<V>,
}

#[inline(always)]
fn view<'s, V>(raw: Raw) -> View<'s, V> {
    let p = raw.p & PTR_MASK;
    // SAFETY (all three arms): `raw` was read from a set (or a node or list reached from one)
    // that the caller borrows for 's. Everything reachable from a set was published with or
    // before it and is retired into an era no older than the set's own, which the set keeps
    // alive (see `Era`); published allocations are never written. So the pointee is alive and
    // immutable for 's.
    match raw.p & TAG_MASK {
        _ if raw.p == 0 => View::Empty,
        TAG_SPAN => {
            View::Span { start: raw.start, full: raw.p & FULL != 0, rec: live(unsafe { &*(p as *const Rec<V>) }) }
        }
        TAG_NODE => View::Node(NodeRef { node: live(unsafe { &*(p as *const Node<V>) }) }),
        _ => View::Many(ManyRef { many: live(unsafe { &*(p as *const Many<V>) }) }),
    }
}

/// Under loom, the check that a reader never reaches a retired allocation.
#[inline(always)]
fn live<T: Dead>(t: &T) -> &T {
    #[cfg(loom)]
    assert!(!t.dead(), "a reader reached a retired allocation");
    t
}

trait Dead {
    #[cfg(loom)]
    fn dead(&self) -> bool;
}

macro_rules! dead {
    ($($t:ident),*) => {$(
        impl<V> Dead for $t<V> {
            #[cfg(loom)]
            fn dead(&self) -> bool {
                self.dead.load(loom::sync::atomic::Ordering::Relaxed)
            }
        }
    )*};
}
dead!(Node, Many, Rec);

impl<'s, V> NodeRef<'s, V> {
    #[inline(always)]
    pub fn slot(&self, i: usize) -> View<'s, V> {
        view(self.node.slots[i & (FANOUT - 1)].raw)
    }
}

impl<'s, V> ManyRef<'s, V> {
    /// The record of the last span starting at or below `a` (the only one that can hold it).
    #[inline]
    pub fn find(&self, a: u64) -> Option<&'s Rec<V>> {
        let items = &self.many.items;
        let i = items.partition_point(|s| s.raw.start <= a).checked_sub(1)?;
        match view(items[i].raw) {
            View::Span { rec, .. } => Some(rec),
            _ => None,
        }
    }
}

impl<V> Set<V> {
    #[inline(always)]
    fn table(&self, t: usize) -> Option<&Table> {
        if t == 0 {
            Some(&self.head)
        } else {
            self.rest.get(t - 1)
        }
    }
    /// The lookup's common case, with the fewest instructions (a lookup of independent addresses
    /// is bound by them, and a cache-missing one by how many lookups fit in flight): `a` in a
    /// root slot of the inline window (never true above the radix), whose 2 MiB slot, or 4 KiB
    /// slot one level down, one span covers whole. The span's start and value; `None` when the
    /// path is anything else (the caller then walks the table).
    #[inline(always)]
    pub fn covered(&self, t: usize, a: u64) -> Option<(u64, &V)> {
        const FULL_SPAN: usize = FULL | TAG_SPAN;
        let table = self.table(t)?;
        let top = *table.tops.get(((a >> super::ROOT_SHIFT).wrapping_sub(table.key0)) as usize)?;
        let index = |shift: u32| ((a >> shift) as usize) & (FANOUT - 1);
        if top == 0 {
            return None;
        }
        // SAFETY (each dereference below): the pointer was read from a node tag of a slot of
        // this set, or of a node reached from it (an inline root slot is one such, untagged);
        // see `view` for why the node is alive and immutable while `self` is borrowed.
        let mid = live(unsafe { &*(top as *const Node<V>) }).slots[index(super::ROOT_SHIFT - FANOUT_BITS)].raw;
        if mid.p & TAG_MASK != TAG_NODE {
            return None;
        }
        let mut s = live(unsafe { &*((mid.p & PTR_MASK) as *const Node<V>) }).slots
            [index(super::ROOT_SHIFT - 2 * FANOUT_BITS)]
        .raw;
        if s.p & (TAG_MASK | FULL) != FULL_SPAN {
            if s.p & TAG_MASK != TAG_NODE {
                return None;
            }
            s = live(unsafe { &*((s.p & PTR_MASK) as *const Node<V>) }).slots[index(super::PAGE_SHIFT)].raw;
            if s.p & (TAG_MASK | FULL) != FULL_SPAN {
                return None;
            }
        }
        // SAFETY: a span slot's pointer is its record, alive like the nodes (see `view`).
        let rec = live(unsafe { &*((s.p & PTR_MASK) as *const Rec<V>) });
        Some((s.start, &rec.val))
    }
    /// Root slot `key` (`addr >> 39`) of table `t`: the node of 1 GiB slots under it, or empty.
    #[inline(always)]
    pub fn top(&self, t: usize, key: u64) -> Option<View<'_, V>> {
        let table = self.table(t)?;
        if let Some(&top) = table.tops.get(key.wrapping_sub(table.key0) as usize) {
            return Some(view(Raw { start: 0, p: if top == 0 { 0 } else { top | TAG_NODE } }));
        }
        match view(table.root) {
            View::Node(root) => Some(root.slot(key as usize)),
            _ => None,
        }
    }
    /// The spans of table `t` above the radix.
    #[inline]
    pub fn high(&self, t: usize) -> Option<ManyRef<'_, V>> {
        match view(self.table(t)?.high) {
            View::Many(m) => Some(m),
            _ => None,
        }
    }
}

/// Stamps of edit windows, unique across heaps: a node of another heap never looks fresh.
static STAMPS: AtomicU64 = AtomicU64::new(1);

/// The writer's side: allocation, copy-on-write and retirement. One per writer, never shared.
pub(super) struct Heap<V> {
    stamp: u64,
    retired: Vec<Retired<V>>,
    latest: Set<V>,
    pool: std::sync::Arc<Pool<V>>,
}

// SAFETY: the heap owns its fresh allocations and the slot tokens' targets like a `Box` owns
// its contents; moving it to another thread moves that ownership (`V: Send`), and the sets it
// published are shared only as `Set`s (`V: Sync`).
unsafe impl<V: Send + Sync> Send for Heap<V> {}

/// One table of the writer: its 512 root slots (each a node of 1 GiB slots, or empty) and the
/// list of spans above the radix (a list slot or empty).
pub(super) struct TableMut<V> {
    roots: Box<[Slot<V>; FANOUT]>,
    /// Root keys that may be in use (pruned at publication).
    keys: std::collections::BTreeSet<usize>,
    high: Slot<V>,
    dirty: bool,
    /// What the last publication made of this table.
    published: Table,
}

impl<V> Default for TableMut<V> {
    fn default() -> Self {
        TableMut {
            roots: Box::new(std::array::from_fn(|_| Slot::empty())),
            keys: Default::default(),
            high: Slot::empty(),
            dirty: false,
            published: EMPTY_TABLE,
        }
    }
}

impl<V> TableMut<V> {
    /// Root slot `key` (`< FANOUT`), for editing.
    pub fn root_mut(&mut self, key: usize) -> &mut Slot<V> {
        self.dirty = true;
        self.keys.insert(key);
        &mut self.roots[key]
    }
    /// The list of spans above the radix, for editing.
    pub fn high_mut(&mut self) -> &mut Slot<V> {
        self.dirty = true;
        &mut self.high
    }
}

impl<V> Heap<V> {
    /// A heap whose first set has `n >= 1` empty tables.
    pub fn new(n: usize) -> Heap<V> {
        let rest = vec![EMPTY_TABLE; n.max(1) - 1].into();
        let pool = std::sync::Arc::new(Pool::new());
        Heap {
            stamp: STAMPS.fetch_add(1, Ordering::Relaxed),
            retired: Vec::new(),
            latest: Set { head: EMPTY_TABLE, rest, era: EraArc::new(Era::new(pool.clone())) },
            pool,
        }
    }

    /// The last published set.
    pub fn latest(&self) -> &Set<V> {
        &self.latest
    }

    /// A new empty node (editable until the next publication).
    pub fn new_node(&mut self) -> Slot<V> {
        let p = self.alloc_node(None);
        Slot::from_raw(Raw { start: 0, p: p as usize | TAG_NODE })
    }

    /// A node of this edit window: a recycled or new allocation, filled with `from`'s slots
    /// (which pass to it) or with empty ones.
    fn alloc_node(&mut self, from: Option<*const Node<V>>) -> *mut Node<V> {
        let p = self.pool.take();
        // SAFETY: `p` is an allocation for a `Node` that nothing else reaches (fresh, or taken
        // from the pool of unreachable nodes). A node is plain data (slot words, a stamp, under
        // loom a flag written next), so writing every field initialises it; `from` is a live
        // node (its owner's token was handed to the caller) and a distinct allocation.
        unsafe {
            match from {
                Some(src) => std::ptr::copy_nonoverlapping(
                    std::ptr::addr_of!((*src).slots),
                    std::ptr::addr_of_mut!((*p).slots),
                    1,
                ),
                None => {
                    // Slot by slot (a memset): an 8 KiB array built on the stack would overflow
                    // a small one (loom's threads).
                    let slots = std::ptr::addr_of_mut!((*p).slots).cast::<Slot<V>>();
                    for i in 0..FANOUT {
                        std::ptr::write(slots.add(i), Slot::empty());
                    }
                }
            }
            std::ptr::write(std::ptr::addr_of_mut!((*p).stamp), self.stamp);
            #[cfg(loom)]
            std::ptr::write(std::ptr::addr_of_mut!((*p).dead), loom::sync::atomic::AtomicBool::new(false));
        }
        p
    }

    /// A new list of the span slots `items` (sorted by start).
    pub fn new_many(&mut self, items: Vec<Slot<V>>) -> Slot<V> {
        let many = Box::new(Many {
            items,
            stamp: self.stamp,
            #[cfg(loom)]
            dead: loom::sync::atomic::AtomicBool::new(false),
        });
        Slot::from_raw(Raw { start: 0, p: Box::into_raw(many) as usize | TAG_MANY })
    }

    /// A new span record, and the token that holds it until [`Heap::drop_rec`].
    pub fn new_rec(&mut self, start: u64, last: u64, val: V) -> RecTok<V> {
        let rec = Box::new(Rec {
            start,
            last,
            val,
            refs: AtomicU32::new(1),
            #[cfg(loom)]
            dead: loom::sync::atomic::AtomicBool::new(false),
        });
        RecTok { rec: Box::into_raw(rec) }
    }

    /// A token for the record of span slot `s`.
    pub fn rec_of(&mut self, s: &Slot<V>) -> Option<RecTok<V>> {
        if s.kind() != Kind::Span {
            return None;
        }
        let rec = (s.raw.p & PTR_MASK) as *const Rec<V>;
        // SAFETY: the slot is a counted reference to the record: it is alive.
        unsafe { &*rec }.refs.fetch_add(1, Ordering::Relaxed);
        Some(RecTok { rec })
    }

    /// A slot holding the span of `rec`; `full` says it covers the whole slot it goes into.
    pub fn span_slot(&mut self, rec: &RecTok<V>, full: bool) -> Slot<V> {
        rec.rec().refs.fetch_add(1, Ordering::Relaxed);
        let tag = if full { TAG_SPAN | FULL } else { TAG_SPAN };
        Slot::from_raw(Raw { start: rec.start(), p: rec.rec as usize | tag })
    }

    /// Gives a record token back; the record is retired with its last reference.
    pub fn drop_rec(&mut self, rec: RecTok<V>) {
        self.unref(rec.rec as *mut Rec<V>);
    }

    fn unref(&mut self, rec: *mut Rec<V>) {
        // SAFETY: the caller gives up one counted reference, so the record is alive here.
        if unsafe { &*rec }.refs.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.retired.push(Retired::Rec(rec));
        }
    }

    /// The slots of the node `s` points at, for editing: a node published since it was made is
    /// first copied (and the original retired), and `s` then points at the copy.
    pub fn node_mut<'a>(&mut self, s: &'a mut Slot<V>) -> Option<&'a mut [Slot<V>; FANOUT]> {
        if s.kind() != Kind::Node {
            return None;
        }
        let mut p = (s.raw.p & PTR_MASK) as *mut Node<V>;
        // SAFETY: `s` owns the node (slots are never duplicated outside this module), so it is
        // alive, and this `&mut` to the slot is the only way to it from the writer.
        if unsafe { (*p).stamp } != self.stamp {
            // The copy takes over the original's slot tokens; the original is only retired
            // (never released), so no token is used twice.
            let copy = self.alloc_node(Some(p as *const Node<V>));
            self.retired.push(Retired::Node(p));
            p = copy;
            s.raw.p = p as usize | TAG_NODE;
        }
        // SAFETY: the node was made in this edit window, so no published set reaches it, and
        // `s` (borrowed mutably for 'a) is its only owner.
        Some(unsafe { &mut (*p).slots })
    }

    /// The items of the list `s` points at, for editing (copied first if published, as in
    /// [`Heap::node_mut`]).
    pub fn many_mut<'a>(&mut self, s: &'a mut Slot<V>) -> Option<&'a mut Vec<Slot<V>>> {
        if s.kind() != Kind::Many {
            return None;
        }
        let mut p = (s.raw.p & PTR_MASK) as *mut Many<V>;
        // SAFETY: as in `node_mut`.
        let old = unsafe { &*p };
        if old.stamp != self.stamp {
            let items = old.items.iter().map(|i| Slot::from_raw(i.raw)).collect();
            let Slot { raw, .. } = self.new_many(items);
            self.retired.push(Retired::Many(p));
            p = (raw.p & PTR_MASK) as *mut Many<V>;
            s.raw.p = raw.p;
        }
        // SAFETY: as in `node_mut`.
        Some(unsafe { &mut (*p).items })
    }

    /// Gives a slot back: its node or list (with everything below it) is retired, its span
    /// record loses a reference.
    pub fn release(&mut self, s: Slot<V>) {
        let p = s.raw.p & PTR_MASK;
        match s.kind() {
            Kind::Empty => {}
            Kind::Span => self.unref(p as *mut Rec<V>),
            Kind::Node => {
                // SAFETY: `s` owned the node (alive); its slot tokens pass to this loop, and the
                // node itself is only retired.
                let slots = unsafe { &(*(p as *const Node<V>)).slots };
                for c in slots.iter().filter(|c| !c.is_empty()) {
                    self.release(Slot::from_raw(c.raw));
                }
                self.retired.push(Retired::Node(p as *mut Node<V>));
            }
            Kind::Many => {
                // SAFETY: as for a node.
                let items = unsafe { &(*(p as *const Many<V>)).items };
                for c in items.iter() {
                    self.release(Slot::from_raw(c.raw));
                }
                self.retired.push(Retired::Many(p as *mut Many<V>));
            }
        }
    }

    /// Publishes `tables` (the writer's, all of them) as a new set; what the edits since the
    /// last publication retired goes to the era of the set they replace.
    pub fn publish(&mut self, tables: &mut [TableMut<V>]) -> Set<V> {
        for t in tables.iter_mut().filter(|t| t.dirty) {
            t.dirty = false;
            let roots = &t.roots;
            t.keys.retain(|&k| !roots[k].is_empty());
            if let View::<V>::Node(_) = view(t.published.root) {
                // The last publication's root node: only the set being replaced reaches it.
                self.retired.push(Retired::Node((t.published.root.p & PTR_MASK) as *mut Node<V>));
            }
            let mut table = Table { key0: 0, tops: [0; TOPS], root: EMPTY, high: t.high.raw };
            let (first, last) = (t.keys.first().copied().unwrap_or(0), t.keys.last().copied().unwrap_or(0));
            // The window ends at the last root slot at most, so an address above the radix
            // (key >= FANOUT) never falls in it.
            let key0 = first.min(FANOUT - TOPS);
            table.key0 = key0 as u64;
            for (i, top) in table.tops.iter_mut().enumerate() {
                let raw = t.roots[key0 + i].raw;
                // Root slots hold nodes or nothing (`view` of the slot says so).
                *top = if let View::<V>::Node(_) = view(raw) { raw.p & PTR_MASK } else { 0 };
            }
            if first < key0 || last >= key0 + TOPS {
                // A read-only copy of the root slots (the writer keeps the tokens).
                let root = self.alloc_node(None);
                // SAFETY: `root` was just made here and nothing else reaches it yet.
                let slots = unsafe { &mut (*root).slots };
                for &k in t.keys.iter() {
                    slots[k].raw = t.roots[k].raw;
                }
                table.root = Raw { start: 0, p: root as usize | TAG_NODE };
            }
            t.published = table;
        }
        let head = tables.first().map_or(EMPTY_TABLE, |t| t.published);
        let rest = if tables.len() == 1 + self.latest.rest.len()
            && tables.iter().skip(1).zip(self.latest.rest.iter()).all(|(a, b)| a.published == *b)
        {
            self.latest.rest.clone()
        } else {
            tables.iter().skip(1).map(|t| t.published).collect()
        };
        let era = EraArc::new(Era::new(self.pool.clone()));
        {
            let mut old = self.latest.era.state();
            old.retired.append(&mut self.retired);
            old.next = Some(era.clone());
        }
        self.latest = Set { head, rest, era };
        self.stamp = STAMPS.fetch_add(1, Ordering::Relaxed);
        self.latest.clone()
    }

    /// Releases every table and hands all of it to the last era: freed with the last set.
    pub fn close(&mut self, tables: &mut [TableMut<V>]) {
        for t in tables.iter_mut() {
            for k in std::mem::take(&mut t.keys) {
                let top = std::mem::replace(&mut t.roots[k], Slot::empty());
                self.release(top);
            }
            let high = std::mem::replace(&mut t.high, Slot::empty());
            self.release(high);
            if let View::<V>::Node(_) = view(t.published.root) {
                self.retired.push(Retired::Node((t.published.root.p & PTR_MASK) as *mut Node<V>));
            }
            t.published = EMPTY_TABLE;
        }
        self.latest.era.state().retired.append(&mut self.retired);
    }
}

// Slots are two plain words: the node copy in `node_mut` and the 16-byte layout rely on it.
const _: () = assert!(std::mem::size_of::<Slot<()>>() == 16);
