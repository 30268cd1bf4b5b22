"""peermem.Engine on a host without RDMA: opening it is a typed error naming what is missing, and
its arguments are checked, each error naming the argument, before any NIC is opened; `Transfer`
is a `concurrent.futures.Future` that only a posted batch makes, and the native watch its waiter
thread uses waits boundedly and wakes at once. A batch needs a NIC, so the futures' behaviour
(results, typed errors, `cancel()`, callbacks on success and on failure, `wait`,
`as_completed`, `asyncio.wrap_future`) is tested where soft-RoCE exists (test_engine_rdma.py, in
the testbed): no ticket, failing or not, can be made here."""

import concurrent.futures
import inspect
import os
import time

import peermem
import pytest

HAS_RDMA = bool(os.path.isdir("/sys/class/infiniband") and os.listdir("/sys/class/infiniband"))
no_rdma = pytest.mark.skipif(HAS_RDMA, reason="this host has an RDMA device: the engine opens (test_engine_rdma.py)")


@no_rdma
def test_an_engine_without_an_rdma_device_is_a_peermem_error_naming_it():
    with pytest.raises(peermem.PeerMemError, match="RDMA device|libibverbs") as e:
        peermem.Engine()
    assert type(e.value) is peermem.PeerMemError


@no_rdma
def test_a_named_nic_that_is_absent_is_named():
    with pytest.raises(peermem.PeerMemError, match="mlx5_9|libibverbs|RDMA device"):
        peermem.Engine(nics=["mlx5_9"])


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"nics": "rxe0"}, TypeError, "nics must be a list of RDMA device names, not a str"),
        ({"nics": []}, ValueError, "nics must name at least one"),
        ({"nics": ["rxe0", 1]}, TypeError, r"nics\[1\] must be a str, not int"),
        ({"nics": [""]}, ValueError, r"nics\[0\] is an empty string"),
        ({"port": -1}, ValueError, r"port must be >= 0 \(got -1\)"),
        ({"port": 65536}, ValueError, r"port must be <= 65535 \(got 65536\)"),
        ({"port": "18650"}, TypeError, "port must be an int, not str"),
        ({"host": 7}, TypeError, "host must be a str, not int"),
        ({"timeout": 0}, ValueError, r"timeout must be > 0 \(got 0\)"),
        ({"timeout": -1.0}, ValueError, r"timeout must be >= 0 and finite \(got -1\)"),
        ({"timeout": float("nan")}, ValueError, "timeout must be >= 0 and finite"),
        ({"timeout": "60"}, TypeError, "timeout must be a number of seconds, not str"),
        ({"timeout": True}, TypeError, "timeout must be a number of seconds, not bool"),
        ({"depth": 0}, ValueError, r"depth must be >= 1 \(got 0\)"),
        ({"depth": 65}, ValueError, r"depth must be <= 64 \(got 65\)"),
        ({"depth": 2.0}, TypeError, "depth must be an int, not float"),
    ],
)
def test_arguments_are_checked_by_name_before_any_nic_opens(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        peermem.Engine(**kwargs)


def test_engine_and_transfer_are_exported_with_their_documented_signatures():
    assert peermem.Engine.__module__ == "peermem" and peermem.Transfer.__module__ == "peermem"
    assert str(inspect.signature(peermem.Engine)) == "(nics=None, port=0, host=None, timeout=60.0, depth=64)"
    assert peermem.Engine.notifications.__text_signature__ == "(self, timeout=0.0)"
    methods = ("register", "register_range", "unregister", "routes", "cache_counts", "listen_addrs", "metadata")
    for name in methods + ("connect", "read", "write", "notifications", "rails", "close"):
        assert callable(getattr(peermem.Engine, name)), name
    assert str(inspect.signature(peermem.Engine.register_range)) == "(self, /, region, offset, length)"
    assert str(inspect.signature(peermem.Engine.read)).startswith("(self, peer: int, batch:")


def test_a_transfer_is_a_future_that_only_a_posted_batch_makes():
    assert issubclass(peermem.Transfer, concurrent.futures.Future)
    for name in ("done", "result", "exception", "cancel", "add_done_callback", "running"):
        assert callable(getattr(peermem.Transfer, name)), name
    with pytest.raises(TypeError):
        peermem.Transfer()
    with pytest.raises(TypeError, match="Transfer wraps a posted batch, not Future: use Engine.read/write"):
        peermem.Transfer(concurrent.futures.Future())
    with pytest.raises(TypeError, match="cannot create"):
        peermem._Ticket()


def test_an_empty_watch_waits_its_bound_and_wake_ends_a_wait_at_once():
    w = peermem._Watch()
    assert len(w) == 0
    start = time.perf_counter()
    assert w.wait(0.2) == []
    assert 0.15 < time.perf_counter() - start < 5
    w.wake()
    start = time.perf_counter()
    assert w.wait(30) == []
    assert time.perf_counter() - start < 5, "wake() did not end the wait"
    with pytest.raises(ValueError, match="timeout must be >= 0 and finite"):
        w.wait(-1)
    with pytest.raises(TypeError, match="timeout must be a number of seconds, not str"):
        w.wait("1")
    with pytest.raises(TypeError):
        w.add(object())
