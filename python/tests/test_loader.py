"""Loader.read and Loader.pread: every record arrives intact in every destination kind, futures
resolve to their own load in any order, bad inputs raise the documented exceptions, and many
loads leave no fd or registration behind."""

import gc
import os
import threading

import numpy as np
import peermem
import pytest

from conftest import open_fds

VULKAN = peermem.vulkan_available()


def destinations(n):
    """Every kind of destination, each `n` bytes, and a way to read it back."""
    kinds = {
        "HostBuffer": lambda: peermem.HostBuffer(n),
        "numpy": lambda: np.zeros(n, dtype=np.uint8),
        "numpy-float32": lambda: np.zeros((n + 3) // 4, dtype=np.float32),
        "bytearray": lambda: bytearray(n),
        "memoryview": lambda: memoryview(bytearray(n)),
    }
    if VULKAN:
        kinds["VulkanBuffer"] = lambda: peermem.VulkanBuffer(n)
    return kinds


def readback(out, at, size):
    return np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)[at : at + size]


KINDS = list(destinations(1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["read", "pread"])
def test_every_record_arrives_intact_in_every_destination(dataset, kind, how):
    loader = peermem.Loader()
    biggest = max(s for _, s in dataset.records)
    for i, (off, size) in enumerate(dataset.records):
        for out_offset in (0, 4096, 1):
            out = destinations(biggest + 8192)[kind]()
            if how == "read":
                r = loader.read(str(dataset.path), out, offset=off, size=size, out_offset=out_offset)
            else:
                r = loader.pread(dataset.path, out, off, size, out_offset).result(timeout=60)
            assert r.bytes == size
            got = readback(out, out_offset, size)
            assert np.array_equal(got, dataset.expect(i)), (kind, i, out_offset, r.method)
            # Bytes around the record are untouched.
            assert not readback(out, 0, out_offset).any()
            assert not readback(out, out_offset + size, 4096).any()


def test_a_whole_file_loads_by_default_and_reports_the_route(dataset):
    out = peermem.HostBuffer(dataset.size)
    r = peermem.Loader(verify=True).read(dataset.path, out)
    assert r.bytes == dataset.size
    assert np.array_equal(np.asarray(out)[: dataset.size], dataset.data)
    assert r.source_checksum == r.checksum
    assert r.route == "cpu_mapped"
    assert r.mb_per_s > 0 and r.seconds > 0
    assert any(x.startswith("plan:") for x in r.reasons)
    # Aligned into page-aligned memory: direct whenever the filesystem took O_DIRECT.
    assert r.direct == ("O_DIRECT" in r.source), (r.source, r.method)


def test_strict_loads_raise_not_direct_with_the_reasons(dataset):
    out = peermem.HostBuffer(1 << 20)
    with pytest.raises(peermem.NotDirectError) as e:
        peermem.Loader(strict=True).read(dataset.path, out, offset=1, size=10_000)
    assert isinstance(e.value, peermem.PeerMemError)
    assert any(x.startswith("plan:") for x in e.value.reasons)


def test_futures_resolve_to_their_own_loads_in_any_order(dataset):
    loader = peermem.Loader(workers=4)
    outs, futs = [], []
    order = list(range(len(dataset.records))) * 4
    for j, i in enumerate(order):
        off, size = dataset.records[i]
        out = np.zeros(size, dtype=np.uint8)
        outs.append((i, out))
        futs.append(loader.pread(dataset.path, out, off, size))
    # Collected last-submitted first, and again: each future gives its own report.
    for (i, out), f in reversed(list(zip(outs, futs))):
        r = f.result(timeout=60)
        assert f.done()
        assert r.bytes == dataset.records[i][1]
        assert f.result() is r
        assert np.array_equal(out, dataset.expect(i))
    loader.close()


def test_futures_from_many_threads(dataset):
    loader = peermem.Loader()
    errors = []

    def worker(k):
        try:
            for i, (off, size) in enumerate(dataset.records):
                out = bytearray(size)
                loader.pread(dataset.path, out, off, size).result(timeout=60)
                assert bytes(out) == dataset.expect(i).tobytes()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_a_failed_pread_raises_at_result(tmp_path):
    f = peermem.Loader().pread(tmp_path / "missing.bin", bytearray(10))
    with pytest.raises(FileNotFoundError):
        f.result(timeout=60)
    assert f.done()
    with pytest.raises(FileNotFoundError):
        f.result()


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        peermem.Loader().read(tmp_path / "missing.bin", bytearray(10))


def test_ranges_past_the_end_raise_value_error(dataset):
    ld = peermem.Loader()
    out = peermem.HostBuffer(dataset.size + 10)
    with pytest.raises(ValueError, match="past the end"):
        ld.read(dataset.path, out, offset=dataset.size + 1)
    with pytest.raises(ValueError, match="past the end"):
        ld.read(dataset.path, out, offset=dataset.size - 10, size=11)
    with pytest.raises(ValueError):
        ld.read(dataset.path, out, offset=dataset.size)
    with pytest.raises(ValueError):
        ld.read(dataset.path, out, size=0)


@pytest.mark.parametrize("kind", ["HostBuffer", "bytearray"])
def test_destinations_too_small_raise_value_error(dataset, kind):
    out = destinations(4096)[kind]()
    with pytest.raises(ValueError, match="do not fit"):
        peermem.Loader().read(dataset.path, out, size=4097)
    with pytest.raises(ValueError, match="do not fit"):
        peermem.Loader().read(dataset.path, out, size=100, out_offset=4000)


def test_unusable_destinations_are_refused(dataset):
    ld = peermem.Loader()
    with pytest.raises(ValueError, match="read-only"):
        ld.read(dataset.path, b"\0" * 100, size=10)
    with pytest.raises(ValueError, match="contiguous"):
        ld.read(dataset.path, np.zeros((8, 8), dtype=np.uint8)[:, ::2], size=10)
    with pytest.raises(TypeError):
        ld.read(dataset.path, 12345, size=10)
    with pytest.raises(ValueError, match="empty"):
        ld.read(dataset.path, bytearray(), size=10)


def test_paths_that_are_not_files_are_refused_without_blocking(tmp_path):
    ld = peermem.Loader()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path, "/dev/zero"):
        with pytest.raises(ValueError, match="not a regular file"):
            ld.read(p, bytearray(4096), size=10)


def test_bad_loader_options_raise_value_error():
    for kw in ({"chunk": 1000}, {"chunk": 0}, {"depth": 0}, {"workers": 0}):
        with pytest.raises(ValueError):
            peermem.Loader(**kw)
    with pytest.raises(ValueError):
        peermem.Loader().pread("/nonexistent", bytearray(1)).result(timeout=-1)


def test_ten_thousand_loads_leave_no_fd_or_registration_behind(dataset):
    ld = peermem.Loader(depth=1, workers=4)
    host = peermem.HostBuffer(8192)
    arr = np.zeros(8192, dtype=np.uint8)
    off, size = dataset.records[0]
    want = dataset.expect(0)
    ld.read(dataset.path, arr, off, size)  # start the registry and the workers' first threads
    ld.pread(dataset.path, arr, off, size).result()
    gc.collect()  # buffers of earlier tests still held by reference cycles (tracebacks) go now
    fds, regs = open_fds(), peermem.registered_buffers()
    for k in range(10_000):
        out = (host, arr, bytearray(8192))[k % 3]
        if k % 2:
            ld.pread(dataset.path, out, off, size).result(timeout=60)
        else:
            ld.read(dataset.path, out, off, size)
        if k % 1000 == 0:
            assert np.array_equal(np.frombuffer(out, dtype=np.uint8)[:size], want)
    # Failures release what they took too.
    for _ in range(100):
        with pytest.raises(ValueError):
            ld.read(dataset.path, bytearray(10), off, size)
        with pytest.raises(FileNotFoundError):
            ld.pread(str(dataset.path) + ".missing", arr).result()
    assert peermem.registered_buffers() == regs
    assert open_fds() == fds
    ld.close()


def test_dropping_a_loader_with_loads_in_flight_keeps_them(dataset):
    ld = peermem.Loader(workers=2)
    jobs = []
    for i, (off, size) in enumerate(dataset.records * 3):
        out = bytearray(size)
        jobs.append((i % len(dataset.records), out, ld.pread(dataset.path, out, off, size)))
    del ld  # the workers finish the queue (each job owns its destination), then exit
    for i, out, f in jobs:
        assert f.result(timeout=60).bytes == len(out)
        assert bytes(out) == dataset.expect(i).tobytes()


def test_a_loader_is_a_context_manager_that_waits_for_its_loads(dataset):
    off, size = dataset.records[7]
    out = np.zeros(size, dtype=np.uint8)
    with peermem.Loader() as ld:
        f = ld.pread(dataset.path, out, off, size)
    assert f.done()
    assert np.array_equal(out, dataset.expect(7))


@pytest.mark.parametrize("kind", ["HostBuffer", "numpy", "bytearray"])
@pytest.mark.parametrize("how", ["read", "pread", "read_batch"])
def test_strict_refuses_before_any_byte_is_written(dataset, kind, how):
    # An unaligned source offset cannot go direct: the strict loader must refuse it while
    # planning, so the destination keeps its pattern byte for byte.
    ld = peermem.Loader(strict=True)
    out = destinations(1 << 20)[kind]()
    view = readback(out, 0, 1 << 20)
    view[:] = 0xA5
    before = view.copy()
    with pytest.raises(peermem.NotDirectError) as e:
        if how == "read":
            ld.read(dataset.path, out, offset=1, size=300_000)
        elif how == "pread":
            ld.pread(dataset.path, out, 1, 300_000).result(timeout=60)
        else:
            ld.read_batch([(dataset.path, out, 0, 4096), (dataset.path, out, 1, 300_000, 8192)])
    assert np.array_equal(readback(out, 0, 1 << 20), before)
    assert any("aligned" in x for x in e.value.reasons), e.value.reasons
    # The same loader moves aligned ranges directly.
    if kind == "HostBuffer":
        r = ld.read(dataset.path, out, offset=0, size=1 << 20)
        assert r.direct or "O_DIRECT" not in r.source


def test_a_batch_of_reads_lands_every_record(dataset):
    ld = peermem.Loader()
    outs = [np.zeros(size + 4096, dtype=np.uint8) for _, size in dataset.records]
    host = peermem.HostBuffer(sum(s for _, s in dataset.records) + 4096 * len(dataset.records))
    reads, at = [], 0
    for i, (off, size) in enumerate(dataset.records):
        reads.append((dataset.path, outs[i], off, size, i % 2))
        reads.append((str(dataset.path), host, off, size, at))
        at += (size + 4095) // 4096 * 4096
    r = ld.pread_batch(reads).result(timeout=60)
    assert r.bytes == 2 * sum(s for _, s in dataset.records)
    at = 0
    for i, (off, size) in enumerate(dataset.records):
        assert np.array_equal(outs[i][i % 2 : i % 2 + size], dataset.expect(i))
        assert np.array_equal(np.asarray(host)[at : at + size], dataset.expect(i))
        at += (size + 4095) // 4096 * 4096
    with pytest.raises(ValueError):
        ld.read_batch([])
    with pytest.raises(ValueError):
        ld.read_batch([(dataset.path,)])


def test_a_numpy_view_of_a_host_buffer_loads_through_its_registration(dataset):
    host = peermem.HostBuffer(1 << 20)
    view = np.asarray(host)[4096:]
    regs = peermem.registered_buffers()
    off, size = dataset.records[1]
    r = peermem.Loader().read(dataset.path, view, off, size, 3)
    assert np.array_equal(view[3 : 3 + size], dataset.expect(1))
    assert r.bytes == size
    assert peermem.registered_buffers() == regs


def test_threads_waiting_on_one_future_all_get_its_report(dataset):
    ld = peermem.Loader()
    off, size = dataset.records[7]  # the 3 MiB record
    out = np.zeros(size, dtype=np.uint8)
    for _ in range(5):
        out[:] = 0
        f = ld.pread(dataset.path, out, off, size)
        got, errors = [], []

        def wait(timeout):
            try:
                got.append(f.result(timeout=timeout))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=wait, args=(t,)) for t in (None, 60, 60, None)]
        for t in ts:
            t.start()
        f.done()  # never blocks on the waiters
        for t in ts:
            t.join()
        assert errors == [] and len(got) == 4
        assert all(r is got[0] for r in got)
        assert np.array_equal(out, dataset.expect(7))


@pytest.mark.parametrize("kw, err, msg", [
    ({"offset": -1}, ValueError, r"^offset must be >= 0 \(got -1\)$"),
    ({"size": 0}, ValueError, r"^size must be >= 1 \(got 0\)$"),
    ({"out_offset": -4096}, ValueError, r"^out_offset must be >= 0 \(got -4096\)$"),
    ({"offset": "0"}, TypeError, r"^offset must be an int, not str$"),
])
def test_read_arguments_are_named_in_their_errors(dataset, kw, err, msg):
    out = peermem.HostBuffer(4096)
    ld = peermem.Loader()
    with pytest.raises(err, match=msg):
        ld.read(dataset.path, out, **kw)
    with pytest.raises(err, match=msg):
        ld.pread(dataset.path, out, **kw)
    t = (dataset.path, out, kw.get("offset"), kw.get("size"), kw.get("out_offset"))
    with pytest.raises(err, match=msg):
        ld.read_batch([t])
