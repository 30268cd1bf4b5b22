//! `ShardReader`: records of many files, in batches of N, into a ring of registered destination
//! buffers with K batches read ahead; shuffled per epoch with a seed, and partitioned across
//! ranks exactly as PyTorch's `DistributedSampler` does.
//!
//! Owns: the record layout, the sampler, the ring and its slots. Must not: move bytes itself (the
//! `Loader` does) or release a ring buffer while a read into it may be in flight (a slot is
//! free again only when its batch's ticket was reaped and its `ShardBatch` dropped).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use peermem::{HostRegion, PeerMemory, Registration};
use peermem_vulkan::{Device, Placement};

use crate::batch::Batch;
use crate::dest::Dest;
use crate::error::LoadError;
use crate::loader::{Loader, Ticket};
use crate::report::Report;
use crate::source::Source;
use crate::source::ALIGN;

/// Where records are in the files.
#[derive(Debug, Clone)]
pub enum Layout {
    /// Every file is a sequence of records of this many bytes (file lengths must be multiples).
    Fixed { record: u64 },
    /// Records as `(file index, offset, length)`.
    Index(Vec<(usize, u64, u64)>),
}

/// How records are sampled and batched.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub batch_size: usize,
    /// Batches read ahead (in flight) while the caller works on earlier ones.
    pub prefetch: usize,
    /// Ring buffers: `prefetch` plus how many batches the caller may hold at once.
    pub ring: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// As `DistributedSampler(drop_last=True)`: drop the tail instead of padding it by wrapping.
    pub drop_last: bool,
    /// Neither pad nor drop: rank `r` reads records `r, r + world_size, ...` of the epoch order,
    /// so every record is read exactly once per epoch over all ranks and the first
    /// `n % world_size` ranks read one record more. Overrides `drop_last`.
    pub uneven: bool,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            batch_size: 32,
            prefetch: 2,
            ring: 4,
            shuffle: false,
            seed: 0,
            rank: 0,
            world_size: 1,
            drop_last: false,
            uneven: false,
        }
    }
}

/// The record indices `rank` reads in `epoch`, in order: PyTorch's `DistributedSampler`
/// (shuffle with `seed + epoch`, the same permutation on every rank; pad to a multiple of
/// `world_size` by wrapping around, or drop the tail; then rank takes `rank::world_size`).
/// With `n` divisible by `world_size`, every record appears exactly once across ranks; with
/// `uneven`, always (no padding, no drop).
pub fn partition(n: usize, epoch: u64, o: &ShardOptions) -> Vec<usize> {
    let ws = o.world_size.max(1);
    let mut idx: Vec<usize> = (0..n).collect();
    if o.shuffle {
        let mut x = o.seed.wrapping_add(epoch) ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for i in (1..n).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
    }
    if o.uneven {
        return idx.into_iter().skip(o.rank).step_by(ws).collect();
    }
    let (num_samples, total) = if o.drop_last && !n.is_multiple_of(ws) {
        let s = (n - ws.min(n)).div_ceil(ws);
        (s, s * ws)
    } else {
        let s = n.div_ceil(ws);
        (s, s * ws)
    };
    if n > 0 && total > n {
        let pad = total - n;
        let extra: Vec<usize> = idx.iter().copied().cycle().take(pad).collect();
        idx.extend(extra);
    }
    idx.truncate(total);
    let mine: Vec<usize> = idx.into_iter().skip(o.rank).step_by(ws).collect();
    debug_assert_eq!(mine.len(), num_samples);
    mine
}

/// One buffer of the ring: the region, its registration and the loader's destination for it.
pub struct RingBuffer {
    pub region: Arc<dyn PeerMemory>,
    pub dest: Dest,
    /// Dropped last: the region stays registered while the ring holds it.
    _registration: Registration,
}

impl RingBuffer {
    /// Host memory.
    pub fn host(loader: &Loader, len: u64) -> Result<RingBuffer, LoadError> {
        let region: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(len)?);
        let reg = loader.registry().register(region.clone())?;
        Ok(RingBuffer { region, dest: Dest::region(&reg), _registration: reg })
    }

    /// A Vulkan buffer of `device`: host-visible ones are filled directly through their mapping,
    /// device-local ones through pinned staging buffers and GPU copies.
    pub fn vulkan(loader: &Loader, device: &Device, len: u64, placement: Placement) -> Result<RingBuffer, LoadError> {
        let v = Arc::new(device.allocate(len, placement)?);
        let region: Arc<dyn PeerMemory> = v.clone();
        let reg = loader.registry().register(region.clone())?;
        let dest = match placement {
            Placement::Mappable => Dest::region(&reg),
            Placement::DeviceLocal => loader.vulkan_device_dest(&reg, device, v)?,
        };
        Ok(RingBuffer { region, dest, _registration: reg })
    }
}

/// A batch of records in one ring buffer. Dropping it returns the buffer to the ring.
pub struct ShardBatch {
    ring: Arc<Vec<RingBuffer>>,
    free: Arc<Mutex<Vec<usize>>>,
    slot: usize,
    stride: u64,
    /// Global record indices, in batch order.
    pub indices: Vec<usize>,
    lens: Vec<u64>,
    pub epoch: u64,
    pub report: Report,
}

impl std::fmt::Debug for ShardBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardBatch").field("slot", &self.slot).field("indices", &self.indices).finish()
    }
}

impl ShardBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
    /// The ring buffer holding the batch.
    pub fn buffer(&self) -> &RingBuffer {
        &self.ring[self.slot]
    }
    /// Bytes from the start of one record to the next in the buffer (the largest record rounded
    /// up to 4096, so every record starts aligned).
    pub fn stride(&self) -> u64 {
        self.stride
    }
    /// Where record `i` of the batch lies in the buffer: (offset, length).
    pub fn record(&self, i: usize) -> (u64, u64) {
        (i as u64 * self.stride, self.lens[i])
    }
    /// Copies record `i` out (through the buffer's CPU mapping).
    pub fn read_record(&self, i: usize) -> Result<Vec<u8>, LoadError> {
        let (off, len) = self.record(i);
        let mut v = vec![0u8; len as usize];
        self.buffer().region.read_at(off, &mut v)?;
        Ok(v)
    }
}

impl Drop for ShardBatch {
    fn drop(&mut self) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(self.slot);
    }
}

struct Pending {
    ticket: Ticket,
    slot: usize,
    indices: Vec<usize>,
}

/// Reads records of a list of files, batch by batch, into a ring of registered buffers.
pub struct ShardReader {
    loader: Arc<Loader>,
    files: Vec<Source>,
    records: Vec<(usize, u64, u64)>,
    opts: ShardOptions,
    stride: u64,
    ring: Arc<Vec<RingBuffer>>,
    free: Arc<Mutex<Vec<usize>>>,
    pending: VecDeque<Pending>,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("records", &self.records.len())
            .field("epoch", &self.epoch)
            .field("ring", &self.ring.len())
            .finish()
    }
}

impl ShardReader {
    /// A reader over `files` with `layout`; `alloc(loader, bytes)` makes each ring buffer (e.g.
    /// `RingBuffer::host`, or `RingBuffer::vulkan` with a device). Starts at epoch 0.
    pub fn new(
        loader: Arc<Loader>,
        files: Vec<Source>,
        layout: Layout,
        opts: ShardOptions,
        mut alloc: impl FnMut(&Loader, u64) -> Result<RingBuffer, LoadError>,
    ) -> Result<ShardReader, LoadError> {
        let bad = |s: String| Err(LoadError::Layout(s));
        if opts.batch_size == 0 || opts.prefetch == 0 || opts.ring < opts.prefetch {
            return bad(format!(
                "batch_size {} and prefetch {} must be positive, ring {} at least prefetch",
                opts.batch_size, opts.prefetch, opts.ring
            ));
        }
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return bad(format!("rank {} must be below world_size {}", opts.rank, opts.world_size));
        }
        let records: Vec<(usize, u64, u64)> = match layout {
            Layout::Fixed { record } => {
                if record == 0 {
                    return bad("a record size of 0".into());
                }
                let mut v = Vec::new();
                for (i, f) in files.iter().enumerate() {
                    if !f.len().is_multiple_of(record) {
                        return bad(format!(
                            "{}: {} bytes is not a multiple of the {record}-byte record",
                            f.describe(),
                            f.len()
                        ));
                    }
                    v.extend((0..f.len() / record).map(|k| (i, k * record, record)));
                }
                v
            }
            Layout::Index(ix) => {
                for &(i, off, len) in &ix {
                    let Some(f) = files.get(i) else {
                        return bad(format!("record names file {i} of {}", files.len()));
                    };
                    if len == 0 || off.checked_add(len).is_none_or(|e| e > f.len()) {
                        return bad(format!(
                            "record {off:#x}+{len:#x} of {} runs past its {} bytes",
                            f.describe(),
                            f.len()
                        ));
                    }
                }
                ix
            }
        };
        if records.is_empty() {
            return bad("no records".into());
        }
        let max = records.iter().map(|r| r.2).max().unwrap_or(1);
        // Every record starts on a 4096-byte boundary of the buffer, so aligned records go direct.
        let stride = max.div_ceil(ALIGN) * ALIGN;
        let bytes = stride
            .checked_mul(opts.batch_size as u64)
            .ok_or_else(|| LoadError::Layout("batch buffer size overflows".into()))?;
        let ring = (0..opts.ring).map(|_| alloc(&loader, bytes)).collect::<Result<Vec<_>, _>>()?;
        if let Some(r) = ring.iter().find(|r| r.dest.len() < bytes) {
            return bad(format!("a ring buffer of {} bytes is smaller than a batch ({bytes})", r.dest.len()));
        }
        let free = Arc::new(Mutex::new((0..opts.ring).rev().collect()));
        let mut r = ShardReader {
            loader,
            files,
            records,
            opts,
            stride,
            ring: Arc::new(ring),
            free,
            pending: VecDeque::new(),
            order: Vec::new(),
            cursor: 0,
            epoch: 0,
        };
        r.set_epoch(0)?;
        Ok(r)
    }

    /// Records in the dataset (all ranks).
    pub fn records(&self) -> usize {
        self.records.len()
    }

    /// Batches this rank reads per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.opts.batch_size)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Starts `epoch` (a new permutation when shuffling): batches read ahead for the previous
    /// one are waited for (bounded) and dropped.
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), LoadError> {
        let mut first_err = None;
        while let Some(p) = self.pending.pop_front() {
            if let Err(e) = p.ticket.wait() {
                first_err.get_or_insert(e);
            }
            self.free.lock().unwrap_or_else(|p| p.into_inner()).push(p.slot);
        }
        self.epoch = epoch;
        self.order = partition(self.records.len(), epoch, &self.opts);
        self.cursor = 0;
        first_err.map_or(Ok(()), Err)
    }

    fn submit_ahead(&mut self) -> Result<(), LoadError> {
        while self.pending.len() < self.opts.prefetch && self.cursor < self.order.len() {
            let Some(slot) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() else { break };
            let end = (self.cursor + self.opts.batch_size).min(self.order.len());
            let indices = self.order[self.cursor..end].to_vec();
            let dest = &self.ring[slot].dest;
            let mut b = Batch::new();
            for (k, &i) in indices.iter().enumerate() {
                let (f, off, len) = self.records[i];
                b.read(&self.files[f], off, len, dest, k as u64 * self.stride);
            }
            match self.loader.submit(b) {
                Ok(ticket) => {
                    self.cursor = end;
                    self.pending.push_back(Pending { ticket, slot, indices });
                }
                Err(e) => {
                    self.free.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The next batch of this epoch (`None` at its end). `LoadError::RingFull` when every ring
    /// buffer is held by a batch the caller has not dropped.
    pub fn next_batch(&mut self) -> Option<Result<ShardBatch, LoadError>> {
        if let Err(e) = self.submit_ahead() {
            return Some(Err(e));
        }
        let Some(p) = self.pending.pop_front() else {
            return (self.cursor < self.order.len()).then_some(Err(LoadError::RingFull { slots: self.ring.len() }));
        };
        let r = p.ticket.wait();
        // Keep the ring busy while the caller works on this batch.
        let ahead = self.submit_ahead();
        let report = match r {
            Ok(rep) => rep,
            Err(e) => {
                self.free.lock().unwrap_or_else(|p| p.into_inner()).push(p.slot);
                return Some(Err(e));
            }
        };
        if let Err(e) = ahead {
            tracing::debug!(%e, "read-ahead failed; the next call reports it");
        }
        let lens = p.indices.iter().map(|&i| self.records[i].2).collect();
        Some(Ok(ShardBatch {
            ring: self.ring.clone(),
            free: self.free.clone(),
            slot: p.slot,
            stride: self.stride,
            indices: p.indices,
            lens,
            epoch: self.epoch,
            report,
        }))
    }
}

impl Drop for ShardReader {
    fn drop(&mut self) {
        // Batches read ahead are waited for (bounded), so no ring buffer is released under a read.
        let _ = self.set_epoch(self.epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(ws: usize, rank: usize, shuffle: bool, drop_last: bool) -> ShardOptions {
        ShardOptions { world_size: ws, rank, shuffle, drop_last, seed: 42, ..ShardOptions::default() }
    }

    #[test]
    fn ranks_partition_like_distributed_sampler() {
        // n=10, world 4: pad to 12 by wrapping (0, 1), rank r takes r::4.
        let got: Vec<Vec<usize>> = (0..4).map(|r| partition(10, 0, &o(4, r, false, false))).collect();
        assert_eq!(got, vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]);
        // drop_last: 10 records, world 4 -> 2 each, the tail dropped.
        let got: Vec<Vec<usize>> = (0..4).map(|r| partition(10, 0, &o(4, r, false, true))).collect();
        assert_eq!(got, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        // Fewer records than ranks: padding wraps more than once.
        let got: Vec<Vec<usize>> = (0..5).map(|r| partition(2, 0, &o(5, r, false, false))).collect();
        assert_eq!(got, vec![vec![0], vec![1], vec![0], vec![1], vec![0]]);
    }

    #[test]
    fn every_record_exactly_once_per_epoch_across_ranks_when_divisible() {
        for (n, ws) in [(12, 4), (1000, 8), (7, 1), (64, 2)] {
            for epoch in 0..3 {
                let mut all: Vec<usize> = (0..ws).flat_map(|r| partition(n, epoch, &o(ws, r, true, false))).collect();
                all.sort_unstable();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {ws} epoch {epoch}");
            }
        }
    }

    #[test]
    fn uneven_ranks_read_every_record_exactly_once_without_padding() {
        let uneven = |ws: usize, r: usize| ShardOptions { uneven: true, drop_last: true, ..o(ws, r, false, false) };
        let got: Vec<Vec<usize>> = (0..4).map(|r| partition(10, 0, &uneven(4, r))).collect();
        assert_eq!(got, vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6], vec![3, 7]]);
        for (n, ws) in [(102, 4), (2, 5), (7, 3)] {
            for epoch in 0..2 {
                let mut all: Vec<usize> = (0..ws)
                    .flat_map(|r| partition(n, epoch, &ShardOptions { uneven: true, ..o(ws, r, true, false) }))
                    .collect();
                all.sort_unstable();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {ws} epoch {epoch}");
            }
        }
    }

    #[test]
    fn shuffles_depend_on_seed_and_epoch_and_agree_across_ranks() {
        let a0 = partition(100, 0, &o(1, 0, true, false));
        let a1 = partition(100, 1, &o(1, 0, true, false));
        assert_ne!(a0, a1);
        assert_ne!(a0, (0..100).collect::<Vec<_>>());
        assert_eq!(a0, partition(100, 0, &o(1, 0, true, false)));
        let other_seed = partition(100, 0, &ShardOptions { seed: 43, ..o(1, 0, true, false) });
        assert_ne!(a0, other_seed);
        // Rank r of world 2 takes every other element of the one permutation.
        let r1 = partition(100, 0, &o(2, 1, true, false));
        assert_eq!(r1, a0.iter().copied().skip(1).step_by(2).collect::<Vec<_>>());
    }
}
