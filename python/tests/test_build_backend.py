"""The build backend picks the wheel kind by the interpreter: the stable-ABI (cp311-abi3) build
from 3.11 on, a wheel of the running interpreter on 3.9 and 3.10, and never overrides arguments
the caller gave."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "backend"))
peermem_build = pytest.importorskip("peermem_build", reason="maturin (the build backend) is not importable")


def test_3_11_and_later_build_the_stable_abi_wheel(monkeypatch):
    monkeypatch.delenv("MATURIN_PEP517_ARGS", raising=False)
    for v in ((3, 11), (3, 12), (3, 13)):
        assert peermem_build.settings(None, v) is None
        assert peermem_build.settings({"x": "1"}, v) == {"x": "1"}


def test_3_9_and_3_10_build_for_the_running_interpreter(monkeypatch):
    monkeypatch.delenv("MATURIN_PEP517_ARGS", raising=False)
    for v in ((3, 9), (3, 10)):
        assert peermem_build.settings(None, v) == {"maturin.build-args": peermem_build.VERSION_SPECIFIC}
        assert peermem_build.settings({"x": "1"}, v) == {"x": "1", "maturin.build-args": peermem_build.VERSION_SPECIFIC}


def test_arguments_the_caller_gave_are_kept(monkeypatch):
    given = {"maturin.build-args": "--features abi3"}
    assert peermem_build.settings(given, (3, 9)) is given
    monkeypatch.setenv("MATURIN_PEP517_ARGS", "--release")
    assert peermem_build.settings(None, (3, 10)) is None
