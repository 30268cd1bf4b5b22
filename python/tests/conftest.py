"""Shared fixtures: a generated dataset of records with known bytes, and the repository's sysfs
captures."""

import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"


class Dataset:
    """A file of records: some 4 KiB-aligned (the direct path), some at odd offsets and sizes
    (the bounce path), one spanning several MiB."""

    def __init__(self, path: pathlib.Path):
        rng = np.random.default_rng(20261129)
        sizes = [4096, 128 << 10, 1, 4095, 4097, 777, 65536 + 3, 3 << 20, 12345, 8192]
        self.records = []  # (offset, size)
        off = 0
        for i, s in enumerate(sizes):
            # Even records start 4 KiB-aligned, odd ones one byte after a boundary.
            off = (off + 4095) // 4096 * 4096 + (i % 2)
            self.records.append((off, s))
            off += s
        self.data = rng.integers(0, 256, size=off + 5000, dtype=np.uint8)
        path.write_bytes(self.data.tobytes())
        self.path = path
        self.size = len(self.data)

    def expect(self, i: int) -> np.ndarray:
        off, size = self.records[i]
        return self.data[off : off + size]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Dataset:
    return Dataset(tmp_path_factory.mktemp("data") / "records.bin")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    assert FIXTURES.is_dir(), FIXTURES
    return FIXTURES


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def need_torch():
    """torch, or a skip saying it is missing. Under python/run-tests (PEERMEM_REQUIRE_TORCH=1,
    which installs torch) a missing torch is an import error, never a skip."""
    if os.environ.get("PEERMEM_REQUIRE_TORCH") == "1":
        import torch

        return torch
    return pytest.importorskip("torch", reason="torch is not installed (python/run-tests installs it)")
