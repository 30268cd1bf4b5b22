"""ShardReader: batches of fixed-size records, every record exactly once per epoch across ranks,
a reproducible shuffle, zero-copy batches that go back to the ring."""

import numpy as np
import peermem
import pytest

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
def test_ranks_cover_every_record_exactly_once_per_epoch(shards, world, shuffle):
    files, data = shards
    for epoch in (0, 1):
        got = []
        for rank in range(world):
            r = peermem.ShardReader(files, record_size=RS, batch_size=8, shuffle=shuffle, seed=5,
                                    rank=rank, world_size=world, epoch=epoch)
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
    torch = pytest.importorskip("torch", reason="torch is not installed (never installed by the tests)")
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
    with pytest.raises(peermem.PeerMemError, match="ring"):
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
            r = peermem.ShardReader(files, index=index, batch_size=7, shuffle=True, seed=2, rank=rank, world_size=world)
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
