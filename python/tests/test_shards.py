"""ShardReader: batches of fixed-size records, every record exactly once per epoch across ranks,
a reproducible shuffle, zero-copy batches that go back to the ring."""

import numpy as np
import peermem
import pytest
from conftest import need_torch

RS = 4096 + 512  # not a multiple of the page: rows start at unaligned offsets too


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    files, data = [], []
    for i, n in enumerate([37, 1, 64]):
        recs = rng.integers(0, 256, size=(n, RS), dtype=np.uint8)
        p = d / f"shard{i}.bin"
        recs.tofile(p)
        files.append(str(p))
        data.append(recs)
    return files, np.concatenate(data)


def epoch_rows(reader):
    seen = []
    for b in reader:
        a = np.asarray(b)
        assert a.shape == b.shape == (len(b.indices), RS) and a.dtype == np.uint8
        seen.append((list(b.indices), a.copy()))
    return seen


@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_without_padding_ranks_cover_every_record_exactly_once_per_epoch(shards, world, shuffle):
    files, data = shards
    for epoch in (0, 1):
        got = []
        for rank in range(world):
            r = peermem.ShardReader(files, record_size=RS, batch_size=8, shuffle=shuffle, seed=5,
                                    rank=rank, world_size=world, epoch=epoch, pad=False)
            rows = epoch_rows(r)
            n = sum(len(i) for i, _ in rows)
            assert n == len(r)
            for idx, arr in rows:
                for k, g in enumerate(idx):
                    assert np.array_equal(arr[k], data[g]), (rank, g)
                got += idx
        assert sorted(got) == list(range(len(data)))


def test_the_shuffle_is_reproducible_and_changes_with_the_epoch(shards):
    files, _ = shards
    order = lambda **kw: [i for b in peermem.ShardReader(files, record_size=RS, batch_size=16, shuffle=True, **kw) for i in b.indices]
    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    r = peermem.ShardReader(files, record_size=RS, batch_size=16, shuffle=True, seed=1)
    r.set_epoch(1)
    assert [i for b in r for i in b.indices] == order(seed=1, epoch=1)


def test_batches_are_zero_copy_and_their_buffers_are_reused(shards):
    files, data = shards
    r = peermem.ShardReader(files, record_size=RS, batch_size=4, prefetch=2)
    regs = peermem.registered_buffers()
    ptrs = set()
    for b in r:
        d = np.from_dlpack(b)
        assert d.shape == (len(b), RS)
        assert d.__array_interface__["data"][0] == np.asarray(b).__array_interface__["data"][0]
        assert np.array_equal(d, data[b.indices])
        ptrs.add(d.__array_interface__["data"][0])
        del b, d
    # 26 batches through a ring of a few buffers.
    assert len(ptrs) <= 2 + 2
    assert peermem.registered_buffers() - regs <= 4


def test_torch_from_dlpack_of_a_batch(shards):
    torch = need_torch()
    files, data = shards
    b = next(iter(peermem.ShardReader(files, record_size=RS, batch_size=4)))
    t = torch.from_dlpack(b)
    assert tuple(t.shape) == (4, RS)
    assert np.array_equal(t.numpy(), data[b.indices])


def test_bad_shard_arguments_raise(shards, tmp_path):
    files, _ = shards
    with pytest.raises(FileNotFoundError):
        peermem.ShardReader([str(tmp_path / "nope.bin")], record_size=RS)
    with pytest.raises(ValueError, match="whole number"):
        peermem.ShardReader(files, record_size=RS + 1)
    for kw in ({"record_size": None}, {"record_size": RS, "rank": 2, "world_size": 2},
               {"record_size": RS, "batch_size": 0}, {"record_size": RS, "index": [1]}):
        with pytest.raises(ValueError):
            peermem.ShardReader(files, **kw)


def test_batches_are_strided_views_of_aligned_rows(shards):
    files, data = shards
    b = next(iter(peermem.ShardReader(files, record_size=RS, batch_size=4)))
    assert b.stride == 8192 and b.stride % 4096 == 0
    a = np.asarray(b)
    assert a.strides == (b.stride, 1)
    assert np.array_equal(memoryview(b).tobytes(), data[b.indices].tobytes())
    with pytest.raises((BufferError, TypeError)):
        memoryview(b).cast("B")  # a flat view of a strided batch does not exist


def test_asking_for_a_batch_while_holding_the_whole_ring_raises_until_one_is_dropped(shards):
    files, data = shards
    r = peermem.ShardReader(files, record_size=RS, batch_size=4, prefetch=1, ring=2)
    it = iter(r)
    held = [next(it), next(it)]
    with pytest.raises(peermem.PeerMemError, match=r"all 2 batch buffers.*ring >= prefetch \+ N \(prefetch is 1\)"):
        next(it)
    del held[0]
    b = next(it)
    assert np.array_equal(np.asarray(b), data[b.indices])
    # A bigger ring lets the caller keep every batch of the epoch.
    r = peermem.ShardReader(files, record_size=RS, batch_size=16, ring=9)
    kept = list(r)
    assert sorted(i for b in kept for i in b.indices) == list(range(len(data)))


def test_variable_size_records_from_an_index_arrive_intact_as_flat_batches(shards):
    files, data = shards
    flat = [np.fromfile(f, dtype=np.uint8) for f in files]
    rng = np.random.default_rng(11)
    index = []
    for k in range(60):
        f = int(rng.integers(0, len(files)))
        n = int(rng.integers(1, min(3 * 4096, len(flat[f]))))
        off = int(rng.integers(0, len(flat[f]) - n + 1))
        index.append((f, off, n))
    for world in (1, 3):
        got = []
        for rank in range(world):
            r = peermem.ShardReader(files, index=index, batch_size=7, shuffle=True, seed=2, rank=rank, world_size=world,
                                    pad=False)
            assert len(r) == len(range(rank, len(index), world))
            for b in r:
                a = np.asarray(b)
                assert a.ndim == 1 and b.shape == a.shape
                d = np.from_dlpack(b)
                assert d.__array_interface__["data"][0] == a.__array_interface__["data"][0]
                for i, off, n in zip(b.indices, b.offsets, b.lengths):
                    f, foff, fn = index[i]
                    assert n == fn and off % 4096 == 0
                    assert np.array_equal(a[off : off + n], flat[f][foff : foff + n]), (i, f, foff)
                got += b.indices
        assert sorted(got) == list(range(len(index)))


def test_bad_indexes_raise_value_error(shards):
    files, _ = shards
    for index in ([(3, 0, 10)], [(0, 0, 0)], [(0, 0, 10**9)], [], [("a", 0, 1)]):
        with pytest.raises(ValueError):
            peermem.ShardReader(files, index=index)
    with pytest.raises(ValueError, match="not both"):
        peermem.ShardReader(files, record_size=RS, index=[(0, 0, 1)])


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """10 records of 4096 bytes (record i filled with byte i) in one file."""
    p = tmp_path_factory.mktemp("ten") / "ten.bin"
    np.repeat(np.arange(10, dtype=np.uint8), 4096).tofile(p)
    return [str(p)]


def rank_orders(files, world, **kw):
    return [[i for b in peermem.ShardReader(files, record_size=4096, batch_size=1, rank=r, world_size=world, **kw)
             for i in b.indices] for r in range(world)]


def test_ranks_are_padded_by_wrapping_so_every_rank_takes_the_same_steps(ten):
    for shuffle in (False, True):
        orders = rank_orders(ten, 4, shuffle=shuffle, seed=9)
        assert [len(o) for o in orders] == [3, 3, 3, 3]
        assert [peermem.ShardReader(ten, record_size=4096, batch_size=1, rank=r, world_size=4).num_batches
                for r in range(4)] == [3, 3, 3, 3]
        # DistributedSampler: the padded order is the epoch order plus its first records again.
        padded = [orders[i % 4][i // 4] for i in range(12)]
        assert sorted(padded[:10]) == list(range(10))
        assert padded[10:] == padded[:2]


def test_drop_last_drops_the_tail_instead_of_padding(ten):
    orders = rank_orders(ten, 4, drop_last=True)
    assert orders == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # Dropping leaves nothing to pad: pad=False changes nothing.
    assert rank_orders(ten, 4, drop_last=True, pad=False) == orders


def test_pad_false_reads_every_record_once_and_ranks_may_differ_by_one(ten):
    orders = rank_orders(ten, 4, pad=False)
    assert [len(o) for o in orders] == [3, 3, 2, 2]
    assert sorted(i for o in orders for i in o) == list(range(10))


def test_bytes_of_padded_batches_are_the_records_they_name(ten):
    for r in range(4):
        for b in peermem.ShardReader(ten, record_size=4096, batch_size=2, rank=r, world_size=4):
            a = np.asarray(b)
            for k, g in enumerate(b.indices):
                assert (a[k] == g).all()


def test_workers_read_every_workers_th_batch_of_their_rank(shards):
    files, data = shards
    kw = dict(record_size=RS, batch_size=5, shuffle=True, seed=4, rank=1, world_size=3)
    single = [b.indices for b in peermem.ShardReader(files, **kw)]
    shares = [[(b.indices, np.asarray(b).copy()) for b in peermem.ShardReader(files, worker=w, workers=3, **kw)]
              for w in range(3)]
    for w, share in enumerate(shares):
        assert [i for i, _ in share] == single[w::3]
        for idx, arr in share:
            assert np.array_equal(arr, data[idx])
    r = peermem.ShardReader(files, worker=2, workers=3, **kw)
    assert r.num_batches == len(single[2::3]) and len(r) == sum(len(i) for i in single[2::3])


def test_an_empty_shard_is_refused_by_name(shards, tmp_path):
    files, _ = shards
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin: an empty file \(0 bytes\)"):
        peermem.ShardReader([files[0], str(empty)], record_size=RS)
    with pytest.raises(ValueError, match=r"empty\.bin: an empty file"):
        peermem.ShardReader([files[0], str(empty)], index=[(0, 0, 10)])


@pytest.mark.parametrize("kw, err, msg", [
    ({"rank": -1, "world_size": 4}, ValueError, r"^rank must be >= 0 and < world_size \(got -1\)$"),
    ({"rank": 4, "world_size": 4}, ValueError, r"^rank must be >= 0 and < world_size \(got 4, world_size 4\)$"),
    ({"world_size": 0}, ValueError, r"^world_size must be >= 1 \(got 0\)$"),
    ({"batch_size": 0}, ValueError, r"^batch_size must be >= 1 \(got 0\)$"),
    ({"batch_size": "8"}, TypeError, r"^batch_size must be an int, not str$"),
    ({"batch_size": 2**70}, ValueError, r"^batch_size must be <= \d+ \(got 1180591620717411303424\)$"),
    ({"seed": -1}, ValueError, r"^seed must be >= 0 \(got -1\)$"),
    ({"prefetch": 3, "ring": 2}, ValueError, r"^ring must be >= prefetch \(got 2, prefetch 3\)$"),
    ({"depth": 0}, ValueError, r"^depth must be >= 1 \(got 0\)$"),
    ({"worker": 2, "workers": 2}, ValueError, r"^worker must be >= 0 and < workers \(got 2, workers 2\)$"),
    ({"record_size": 0}, ValueError, r"^record_size must be >= 1 \(got 0\)$"),
    ({"rank": 1.5, "world_size": 2}, TypeError, r"^rank must be an int, not float$"),
])
def test_a_bad_argument_is_named_with_the_one_rule_it_broke(shards, kw, err, msg):
    files, _ = shards
    args = {"record_size": RS, **kw}
    with pytest.raises(err, match=msg):
        peermem.ShardReader(files, **args)


def test_files_must_be_a_list_of_paths(shards, tmp_path):
    files, _ = shards
    with pytest.raises(TypeError, match=r"^files must be a list of paths, not a str$"):
        peermem.ShardReader(files[0], record_size=RS)
    with pytest.raises(TypeError, match=r"^files must be a list of paths, not a PosixPath$"):
        peermem.ShardReader(tmp_path, record_size=RS)
    with pytest.raises(TypeError, match=r"^files\[1\] must be a path \(str or os.PathLike\), not int$"):
        peermem.ShardReader([files[0], 3], record_size=RS)
    with pytest.raises(ValueError, match=r"^files must name at least one file"):
        peermem.ShardReader([], record_size=RS)
    # Any iterable of str or os.PathLike paths will do.
    import pathlib
    r = peermem.ShardReader((pathlib.Path(f) for f in files), record_size=RS)
    assert r.num_records == 102


def test_a_closed_reader_refuses_a_new_iteration(shards):
    files, _ = shards
    with peermem.ShardReader(files, record_size=RS, batch_size=64) as r:
        it = iter(r)
    # An iterator made before the close reads on.
    assert sum(len(b) for b in it) == 102
    with pytest.raises(peermem.PeerMemError, match="closed"):
        iter(r)
