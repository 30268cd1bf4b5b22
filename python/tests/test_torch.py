"""peermem.torch.ShardDataset: ranks from torch.distributed (spawned as torchrun would), batches
split across DataLoader workers in the order of num_workers=0, DistributedSampler's padding, the
same step count on every rank, set_epoch reaching persistent workers, exact bytes, zero copy in
the main process."""

import datetime
import json
import pathlib
import time

import numpy as np
import peermem
import pytest
from conftest import need_torch

torch = need_torch()
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402
from peermem.torch import ShardDataset  # noqa: E402

RS = 4096 + 128  # rows of a batch are strided in the ring (a zero-copy view keeps the stride)


def write_records(d: pathlib.Path, counts, seed=1):
    """Files of `counts[i]` records; returns the paths and all records, concatenated."""
    rng = np.random.default_rng(seed)
    files, data = [], []
    for i, n in enumerate(counts):
        recs = rng.integers(0, 256, size=(n, RS), dtype=np.uint8)
        p = d / f"part{i}.bin"
        recs.tofile(p)
        files.append(str(p))
        data.append(recs)
    return files, np.concatenate(data)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("torch"), [23, 1, 13])


def with_indices(x, batch):
    """The transform of these tests: the tensor and its record ids (module level, so spawned
    workers can unpickle it)."""
    return x, torch.tensor(batch.indices, dtype=torch.int64)


def epoch_of(loader, data):
    """One epoch through `loader`: the record ids in order, each batch's bytes checked."""
    seen, steps = [], 0
    for x, idx in loader:
        assert x.dtype == torch.uint8 and tuple(x.shape) == (len(idx), RS)
        assert np.array_equal(x.numpy(), data[idx.numpy()])
        seen += idx.tolist()
        steps += 1
    return seen, steps


def run_ranks(fn, world, args, timeout=240):
    """Starts `world` processes as torchrun would (spawned, one per rank) and waits at most
    `timeout` seconds for all of them; a failed rank's exception fails the test."""
    ctx = tmp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s")


def read_rank(files, batch_size, data, rank=None, world_size=None, step=lambda: None):
    """What one rank reads through ShardDatasets (rank and world size from torch.distributed
    unless given) and DataLoaders of two workers, `step()` after every batch: two epochs padded
    (persistent workers), then one with drop_last. Each run's record ids, steps and len(loader)."""
    runs = []
    for drop_last, epochs in ((False, 2), (True, 1)):
        ds = ShardDataset(files, record_size=RS, batch_size=batch_size, shuffle=True, seed=11, rank=rank,
                          world_size=world_size, drop_last=drop_last, transform=with_indices)
        loader = ds.dataloader(num_workers=2, persistent_workers=True)
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            seen, steps = [], 0
            for x, idx in loader:
                assert np.array_equal(x.numpy(), data[idx.numpy()])
                seen += idx.tolist()
                steps += 1
                step()
            runs.append({"seen": seen, "steps": steps, "len": len(loader)})
        del loader
    return runs


def rank_main(rank, world, files, out, batch_size):
    """One rank as torchrun starts it: a gloo group over a file store, the datasets' rank and
    world size taken from it, an all-reduce per step (a DDP step: a rank with fewer steps would
    leave the others waiting until the group's timeout). What it read goes to out/rank<r>.json."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    data = np.concatenate([np.fromfile(f, dtype=np.uint8).reshape(-1, RS) for f in files])
    ds = ShardDataset(files, record_size=RS)
    assert (ds.rank, ds.world_size) == (rank, world)
    runs = read_rank(files, batch_size, data, step=lambda: dist.all_reduce(torch.ones(1)))
    dist.barrier()
    (pathlib.Path(out) / f"rank{rank}.json").write_text(json.dumps(runs))
    dist.destroy_process_group()


def check_ranks(ranks, n, batch_size):
    """Every rank took the same steps (as len(loader) said) and together they read
    DistributedSampler's padded order; set_epoch changed the order in the persistent workers;
    drop_last read the same steps everywhere and no record twice."""
    world = len(ranks)
    per_rank = -(-n // world)
    for epoch in range(2):
        assert {r[epoch]["steps"] for r in ranks} == {-(-per_rank // batch_size)} == {r[epoch]["len"] for r in ranks}
        seen = [r[epoch]["seen"] for r in ranks]
        assert all(len(s) == per_rank for s in seen)
        padded = [seen[i % world][i // world] for i in range(per_rank * world)]
        assert sorted(padded[:n]) == list(range(n))
        assert padded[n:] == padded[: per_rank * world - n]
    assert ranks[0][0]["seen"] != ranks[0][1]["seen"]
    kept = n // world
    assert {r[2]["steps"] for r in ranks} == {-(-kept // batch_size)}
    dropped = [i for r in ranks for i in r[2]["seen"]]
    assert len(dropped) == len(set(dropped)) == kept * world


def test_two_ranks_from_torch_distributed_take_the_same_steps_and_read_every_record(tmp_path):
    # 37 records over 2 ranks: unpadded, one rank would take one step more than the other.
    files, data = write_records(tmp_path, [23, 1, 13])
    run_ranks(rank_main, 2, (files, str(tmp_path), 4))
    check_ranks([json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)], len(data), 4)


def test_ten_records_over_four_ranks_take_three_steps_on_every_rank(tmp_path):
    files, data = write_records(tmp_path, [10])
    ranks = [read_rank(files, 1, data, rank=r, world_size=4) for r in range(4)]
    assert [r[0]["steps"] for r in ranks] == [3, 3, 3, 3]
    assert [r[2]["steps"] for r in ranks] == [2, 2, 2, 2]
    check_ranks(ranks, 10, 1)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_yield_the_order_of_num_workers_0_and_follow_set_epoch(records, context):
    files, data = records
    ds = ShardDataset(files, record_size=RS, batch_size=3, shuffle=True, seed=5, rank=1, world_size=2,
                      transform=with_indices)
    # The main process reads first (its reader then exists when fork copies the dataset).
    inline = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        inline.append(epoch_of(ds.dataloader(num_workers=0), data))
    assert inline[0][0] != inline[1][0]
    loader = ds.dataloader(num_workers=2, persistent_workers=True, multiprocessing_context=context)
    for epoch in (0, 2, 1):
        ds.set_epoch(epoch)
        assert epoch_of(loader, data) == inline[epoch]
        assert len(loader) == inline[epoch][1] == len(ds)


def test_batches_in_the_main_process_are_zero_copy_views_of_the_ring(records):
    files, data = records
    ptrs = set()

    def view(x, batch):
        a = np.asarray(batch)
        assert x.data_ptr() == a.__array_interface__["data"][0]
        assert x.stride() == (batch.stride, 1)
        return x

    ds = ShardDataset(files, record_size=RS, batch_size=4, prefetch=2, transform=view)
    n = 0
    for x in ds.dataloader():
        ptrs.add(x.data_ptr())
        n += len(x)
    assert n == len(data)
    # Ten batches through a ring of prefetch + 2 buffers.
    assert len(ptrs) <= 4


def test_a_worker_hands_over_one_contiguous_copy(records):
    files, data = records
    ds = ShardDataset(files, record_size=RS, batch_size=8, transform=with_indices)
    for x, idx in ds.dataloader(num_workers=1):
        assert x.is_contiguous()
        assert np.array_equal(x.numpy(), data[idx.numpy()])


def test_without_a_transform_batches_are_tensors(records):
    files, data = records
    ds = ShardDataset(files, record_size=RS, batch_size=16)
    got = torch.cat([x for x in ds.dataloader()])
    assert np.array_equal(got.numpy(), data)


def test_holding_more_batches_than_the_ring_allows_says_how_to_size_it(records):
    files, _ = records
    ds = ShardDataset(files, record_size=RS, batch_size=2, prefetch=1, ring=3)
    held = []
    with pytest.raises(peermem.PeerMemError, match=r"ring >= prefetch \+ N \(prefetch is 1\)"):
        for x in ds.dataloader():
            held.append(x)  # gradient accumulation over many steps, keeping every batch
    assert len(held) == 3
    held.clear()
    # A ring of prefetch + N holds N batches.
    ds = ShardDataset(files, record_size=RS, batch_size=2, prefetch=1, ring=1 + 4)
    it = iter(ds.dataloader())
    held = [next(it) for _ in range(4)]
    assert len(held) == 4


@pytest.mark.parametrize("kw, err, msg", [
    ({"rank": -1, "world_size": 2}, ValueError, r"^rank must be >= 0 and < world_size \(got -1\)$"),
    ({"world_size": 0}, ValueError, r"^world_size must be >= 1 \(got 0\)$"),
    ({"batch_size": 0}, ValueError, r"^batch_size must be >= 1 \(got 0\)$"),
])
def test_dataset_errors_name_the_argument(records, kw, err, msg):
    files, _ = records
    with pytest.raises(err, match=msg):
        ShardDataset(files, record_size=RS, **kw)


def test_dataset_files_and_epochs_are_checked(records):
    files, _ = records
    with pytest.raises(TypeError, match=r"^files must be a list of paths, not a str$"):
        ShardDataset(files[0], record_size=RS)
    ds = ShardDataset(iter(files), record_size=RS)
    assert len(ds) == -(-37 // 32)
    with pytest.raises(ValueError, match=r"^epoch must be >= 0"):
        ds.set_epoch(-1)
    with pytest.raises(TypeError, match=r"^epoch must be an int, not str$"):
        ds.set_epoch("1")
    ds.set_epoch(7)
    assert ds.epoch == 7


def test_without_a_process_group_the_dataset_is_rank_0_of_1(records):
    files, data = records
    assert not dist.is_initialized()
    ds = ShardDataset(files, record_size=RS, batch_size=5)
    assert (ds.rank, ds.world_size, len(ds)) == (0, 1, -(-len(data) // 5))


@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_the_io_mode_reaches_the_dataset_s_readers(records, io):
    files, data = records
    ds = ShardDataset(files, record_size=RS, batch_size=4, transform=with_indices, io=io)
    seen, steps = epoch_of(ds.dataloader(num_workers=0), data)
    assert sorted(seen) == list(range(len(data))) and steps == len(ds)
    with pytest.raises(ValueError, match="io must be"):
        ShardDataset(files, record_size=RS, io="sometimes")
