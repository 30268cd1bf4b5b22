"""The `PEERMEM_*` variables reach the Python `Loader` and `ShardReader` as they reach the Rust
`Options::from_env`; an argument given wins, and a malformed variable is a `ValueError` naming
it."""

import numpy as np
import peermem
import pytest


@pytest.fixture
def aligned(tmp_path):
    p = tmp_path / "aligned.bin"
    data = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
    data.tofile(p)
    return p, data


@pytest.mark.parametrize("var, value", [
    ("PEERMEM_DEPTH", "bogus"),
    ("PEERMEM_ENGINE", "dpdk"),
    ("PEERMEM_CHUNK", "1Q"),
    ("PEERMEM_STRICT", "maybe"),
    ("PEERMEM_IO", "sometimes"),
    ("PEERMEM_DEPTH", "0"),
])
def test_a_malformed_variable_is_a_value_error_naming_it(monkeypatch, aligned, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        peermem.Loader()
    with pytest.raises(ValueError, match=var):
        peermem.ShardReader([aligned[0]], record_size=4096)


def test_the_engine_comes_from_peermem_engine(monkeypatch, aligned):
    path, data = aligned
    buf = peermem.HostBuffer(len(data))
    monkeypatch.setenv("PEERMEM_ENGINE", "pool")
    with peermem.Loader() as ld:
        rep = ld.read(path, buf)
    assert "thread pool" in rep.method, rep.method
    assert np.array_equal(np.asarray(buf), data)
    # The reader's loader takes the variable too: its batches arrive intact through the pool.
    r = peermem.ShardReader([path], record_size=4096, batch_size=16)
    got = np.concatenate([np.asarray(b).copy() for b in r]).reshape(-1)
    assert np.array_equal(got, data)
    monkeypatch.delenv("PEERMEM_ENGINE")
    with peermem.Loader() as ld:
        assert "thread pool" not in ld.read(path, buf).method


def test_strict_comes_from_peermem_strict_and_an_argument_wins(monkeypatch, aligned):
    path, _ = aligned
    out = bytearray(10_000)
    monkeypatch.setenv("PEERMEM_STRICT", "1")
    with pytest.raises(peermem.NotDirectError):
        peermem.Loader().read(path, out, offset=1, size=10_000)
    rep = peermem.Loader(strict=False).read(path, out, offset=1, size=10_000)
    assert rep.bytes == 10_000


def test_an_explicit_depth_wins_over_peermem_depth(monkeypatch, aligned):
    path, _ = aligned
    monkeypatch.setenv("PEERMEM_DEPTH", "2")
    monkeypatch.setenv("PEERMEM_ENGINE", "pool")
    buf = peermem.HostBuffer(1 << 20)
    # The pool has `depth` threads, and the report's reasons name the engine with its count.
    assert any("(2 threads)" in r for r in peermem.Loader().read(path, buf).reasons)
    assert any("(5 threads)" in r for r in peermem.Loader(depth=5).read(path, buf).reasons)
    with pytest.raises(ValueError, match=r"^depth must be >= 1 \(got 0\)$"):
        peermem.Loader(depth=0)


@pytest.mark.parametrize("kw, err, msg", [
    ({"depth": -1}, ValueError, r"^depth must be >= 1 \(got -1\)$"),
    ({"chunk": 4097}, ValueError, r"^chunk must be a multiple of 4096 \(got 4097\)$"),
    ({"chunk": "1M"}, TypeError, r"^chunk must be an int, not str$"),
    ({"strict": 1}, TypeError, r"^strict must be True or False, not int$"),
    ({"workers": 0}, ValueError, r"^workers must be >= 1 \(got 0\)$"),
])
def test_loader_arguments_are_named_in_their_errors(kw, err, msg):
    with pytest.raises(err, match=msg):
        peermem.Loader(**kw)


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_the_io_mode_comes_from_the_argument_or_peermem_io_and_the_report_says_it(monkeypatch, aligned, mode):
    path, data = aligned
    buf = peermem.HostBuffer(len(data))
    other = "buffered" if mode == "direct" else "direct"
    said = {"direct": ": O_DIRECT: ", "buffered": ": buffered: "}
    monkeypatch.setenv("PEERMEM_IO", other)
    with peermem.Loader(io=mode) as ld:
        rep = ld.read(path, buf)
    assert len(rep.io) == 1 and said[mode] in rep.io[0], rep.io
    assert np.array_equal(np.asarray(buf), data)
    with peermem.Loader() as ld:
        assert said[other] in ld.read(path, buf).io[0]
    r = peermem.ShardReader([path], record_size=4096, batch_size=16, io=mode)
    got = np.concatenate([np.asarray(b).copy() for b in r]).reshape(-1)
    assert np.array_equal(got, data)


def test_a_bad_io_argument_names_it(aligned):
    with pytest.raises(ValueError, match="io must be 'auto', 'direct' or 'buffered'"):
        peermem.Loader(io="fast")
    with pytest.raises(TypeError, match="io must be a str"):
        peermem.ShardReader([aligned[0]], record_size=4096, io=1)
