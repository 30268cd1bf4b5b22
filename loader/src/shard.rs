//! `ShardReader`: records of many files, in batches of N, into a ring of registered destination
//! buffers with K batches read ahead; shuffled per epoch with a seed, partitioned across ranks
//! exactly as PyTorch's `DistributedSampler` does, and a rank's batches split across its
//! DataLoader workers (worker `w` of `W` reads batches `w, w + W, ...`).
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
    /// This reader's share of the rank's batches: the rank's epoch is cut into batches of
    /// `batch_size` and this reader reads batches `worker, worker + workers, ...` of them, so
    /// taking one batch from each worker in turn (as a PyTorch DataLoader does) gives the order
    /// of a single reader (`workers: 1`). `worker` must be below `workers`.
    pub worker: usize,
    pub workers: usize,
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
            worker: 0,
            workers: 1,
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

/// The record indices one reader (rank `o.rank`, worker `o.worker` of `o.workers`) reads in
/// `epoch`, in order: the rank's [`partition`] cut into batches of `o.batch_size`, and of those
/// the batches `worker, worker + workers, ...`. Every batch is whole except the rank's last, so
/// cutting this list into batches again gives back exactly those batches.
pub fn worker_partition(n: usize, epoch: u64, o: &ShardOptions) -> Vec<usize> {
    worker_share(partition(n, epoch, o), o)
}

/// The worker's batches of the rank's records `rank` (see [`worker_partition`]).
fn worker_share(rank: Vec<usize>, o: &ShardOptions) -> Vec<usize> {
    let workers = o.workers.max(1);
    if workers == 1 {
        return rank;
    }
    rank.chunks(o.batch_size.max(1)).skip(o.worker).step_by(workers).flatten().copied().collect()
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

    /// CUDA device memory of `device`, filled through pinned staging buffers and the device's
    /// copies. `cuda()` gives the region (its device pointer, for a zero-copy tensor).
    pub fn cuda(loader: &Loader, device: &peermem_cuda::Device, len: u64) -> Result<RingBuffer, LoadError> {
        let c = Arc::new(device.allocate(len)?);
        let region: Arc<dyn PeerMemory> = c.clone();
        let reg = loader.registry().register(region.clone())?;
        let dest = loader.cuda_dest(&reg, device, c)?;
        Ok(RingBuffer { region, dest, _registration: reg })
    }

    /// The CUDA region of a buffer made by `cuda`.
    pub fn cuda_region(&self) -> Option<&Arc<peermem_cuda::CudaRegion>> {
        self.dest.cuda_target().map(|(_, r)| r)
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
        match self.buffer().dest.cuda_target() {
            // CUDA memory: read back through the device.
            Some((device, region)) => device.read(region, off, &mut v)?,
            None => self.buffer().region.read_at(off, &mut v)?,
        }
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
    /// This reader's records of the epoch, in order (its worker's share of the rank's).
    order: Vec<usize>,
    /// Records the rank reads per epoch over all its workers.
    rank_records: usize,
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
    /// `RingBuffer::host`, `RingBuffer::vulkan` or `RingBuffer::cuda` with a device). Starts at
    /// epoch 0.
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
        if opts.workers == 0 || opts.worker >= opts.workers {
            return bad(format!("worker {} must be below workers {}", opts.worker, opts.workers));
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
            rank_records: 0,
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

    /// Batches this reader (its rank's share for its worker) reads per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.opts.batch_size)
    }

    /// Batches the rank reads per epoch over all its workers: the same on every rank unless
    /// `uneven` (what a DataLoader over the rank's workers yields).
    pub fn rank_batches_per_epoch(&self) -> usize {
        self.rank_records.div_ceil(self.opts.batch_size)
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
        let rank = partition(self.records.len(), epoch, &self.opts);
        self.rank_records = rank.len();
        self.order = worker_share(rank, &self.opts);
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
    fn ow(ws: usize, rank: usize, batch: usize, workers: usize, worker: usize) -> ShardOptions {
        ShardOptions { batch_size: batch, worker, workers, ..o(ws, rank, true, false) }
    }

    /// Takes one batch from each worker in turn, skipping workers that ran out (a DataLoader's
    /// round-robin over its workers).
    fn round_robin(shares: &[Vec<usize>], batch: usize) -> Vec<usize> {
        let mut batches: Vec<std::collections::VecDeque<&[usize]>> =
            shares.iter().map(|s| s.chunks(batch).collect()).collect();
        let mut out = Vec::new();
        while batches.iter().any(|b| !b.is_empty()) {
            for b in batches.iter_mut() {
                if let Some(x) = b.pop_front() {
                    out.extend_from_slice(x);
                }
            }
        }
        out
    }

    #[test]
    fn workers_read_whole_batches_that_round_robin_back_into_the_single_reader_order() {
        for (n, ws, batch, workers) in [(100, 1, 8, 2), (37, 2, 4, 3), (10, 4, 1, 2), (1000, 3, 32, 4), (5, 1, 8, 2)] {
            for rank in 0..ws {
                for epoch in 0..2 {
                    let single = partition(n, epoch, &ow(ws, rank, batch, 1, 0));
                    let shares: Vec<Vec<usize>> =
                        (0..workers).map(|w| worker_partition(n, epoch, &ow(ws, rank, batch, workers, w))).collect();
                    assert_eq!(round_robin(&shares, batch), single, "n {n} world {ws} batch {batch} workers {workers}");
                    // Worker w reads batches w, w + W, ... of the rank's batches.
                    let rank_batches: Vec<&[usize]> = single.chunks(batch).collect();
                    for (w, share) in shares.iter().enumerate() {
                        let want: Vec<usize> =
                            rank_batches.iter().skip(w).step_by(workers).flat_map(|b| b.iter().copied()).collect();
                        assert_eq!(share, &want, "worker {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn workers_beyond_the_ranks_batches_read_nothing_and_the_rest_differ_by_one_batch() {
        // 10 batches of one record over 4 workers: 3, 3, 2, 2 batches.
        let counts: Vec<usize> = (0..4).map(|w| worker_partition(10, 0, &ow(1, 0, 1, 4, w)).len()).collect();
        assert_eq!(counts, vec![3, 3, 2, 2]);
        // 5 records in batches of 8: one batch, read by worker 0 alone.
        assert_eq!(worker_partition(5, 0, &ow(1, 0, 8, 2, 0)).len(), 5);
        assert!(worker_partition(5, 0, &ow(1, 0, 8, 2, 1)).is_empty());
    }

    #[test]
    fn every_rank_reads_the_same_number_of_batches_unless_uneven() {
        for (n, ws, batch) in [(10, 4, 1), (10, 4, 2), (37, 3, 4), (2, 5, 1), (1001, 8, 16)] {
            for drop_last in [false, true] {
                let counts: Vec<usize> =
                    (0..ws).map(|r| partition(n, 0, &o(ws, r, true, drop_last)).len().div_ceil(batch)).collect();
                assert!(counts.iter().all(|&c| c == counts[0]), "n {n} world {ws} drop_last {drop_last}: {counts:?}");
            }
        }
        // Without padding, 10 records over 4 ranks in batches of one: 3, 3, 2, 2 steps.
        let uneven: Vec<usize> =
            (0..4).map(|r| partition(10, 0, &ShardOptions { uneven: true, ..o(4, r, false, false) }).len()).collect();
        assert_eq!(uneven, vec![3, 3, 2, 2]);
    }

    #[test]
    fn a_reader_refuses_a_worker_outside_its_workers() {
        use peermem::Topology;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        let reg = peermem::Registry::new(Arc::new(Topology::discover(root).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.bin");
        std::fs::write(&path, vec![7u8; 4 * 4096]).unwrap();
        let loader = Arc::new(Loader::new(&reg, crate::Options::default()).unwrap());
        for (worker, workers) in [(2, 2), (0, 0)] {
            let files = vec![loader.open(&path).unwrap()];
            let opts = ShardOptions { worker, workers, ..ShardOptions::default() };
            let e = ShardReader::new(loader.clone(), files, Layout::Fixed { record: 4096 }, opts, RingBuffer::host)
                .unwrap_err();
            assert!(matches!(&e, LoadError::Layout(m) if m.contains("worker")), "{e}");
        }
        let files = vec![loader.open(&path).unwrap()];
        let opts = ShardOptions { batch_size: 1, worker: 1, workers: 2, ..ShardOptions::default() };
        let mut r =
            ShardReader::new(loader.clone(), files, Layout::Fixed { record: 4096 }, opts, RingBuffer::host).unwrap();
        assert_eq!((r.batches_per_epoch(), r.rank_batches_per_epoch()), (2, 4));
        let mut seen = Vec::new();
        while let Some(b) = r.next_batch() {
            seen.extend(b.unwrap().indices.iter().copied());
        }
        assert_eq!(seen, vec![1, 3]);
    }
}
