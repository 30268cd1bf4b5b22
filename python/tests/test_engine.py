"""peermem.Engine on a host without RDMA: opening it is a typed error naming what is missing, and
its arguments are checked, each error naming the argument, before any NIC is opened. The
transfers themselves are tested where soft-RoCE exists (test_engine_rdma.py, in the testbed)."""

import os

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
    assert peermem.Engine.__text_signature__ == "(nics=None, port=0, host=None, timeout=60.0, depth=64)"
    assert peermem.Engine.notifications.__text_signature__ == "(self, timeout=0.0)"
    for name in ("register", "unregister", "routes", "metadata", "connect", "read", "write", "rails", "close"):
        assert callable(getattr(peermem.Engine, name)), name
    for name in ("done", "result"):
        assert callable(getattr(peermem.Transfer, name)), name
    with pytest.raises(TypeError):
        peermem.Transfer()
