#!/usr/bin/env python3
"""peermem.torch.ShardDataset through a torch DataLoader: num_workers=0 against workers.

One epoch of a file of 128 KiB records, shuffled, batch 32, per way:
  w0           DataLoader(num_workers=0): each batch a zero-copy tensor over the reader's ring,
               the reader keeping `prefetch` batches in flight
  wN           DataLoader(num_workers=N, persistent_workers=True): each worker reads its share
               of the batches and copies each once into shared memory for the main process
The consumer sums one byte per record of every batch (it touches every batch, as training
would, without adding a compute-bound step). Ways run interleaved, round after round; the page
cache is dropped for the file (posix_fadvise DONTNEED) before every run; the best run of each
way is kept and every run's record count checked. Workers are started before the clock (one
warm-up epoch); the first epoch of w0 builds its reader inside the clock.

  python3 python/bench/bench_torch.py [--dir DIR] [--mib 256] [--repeat 3] [--workers 1,2]
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from bench_loader import drop_cache  # this directory: the script's own
from peermem.torch import ShardDataset

REC = 128 << 10
BATCH = 32


def epoch(loader, ds, e):
    ds.set_epoch(e)
    n = 0
    acc = torch.zeros((), dtype=torch.int64)
    for x in loader:
        acc += x[:, 0].sum()
        n += len(x)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the data file goes (an O_DIRECT filesystem)")
    ap.add_argument("--mib", type=int, default=256, help="file size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best run of each way is kept")
    ap.add_argument("--workers", default="1,2", help="worker counts to set against num_workers=0")
    a = ap.parse_args()

    size = a.mib << 20
    path = os.path.join(a.dir, "peermem-bench-torch.bin")
    np.random.default_rng(1).integers(0, 256, size=size, dtype=np.uint8).tofile(path)
    records = size // REC
    ways = {}
    for w in [0] + [int(x) for x in a.workers.split(",") if x]:
        ds = ShardDataset([path], record_size=REC, batch_size=BATCH, shuffle=True, seed=3)
        kw = {"num_workers": w, "persistent_workers": True} if w else {}
        loader = ds.dataloader(**kw)
        if w:
            epoch(loader, ds, 0)  # start the workers
        ways[f"w{w}"] = (loader, ds)
    best = {k: float("inf") for k in ways}
    names = list(ways)
    for r in range(a.repeat):
        for k in names[r % len(names):] + names[: r % len(names)]:
            loader, ds = ways[k]
            drop_cache(path)
            t = time.perf_counter()
            n = epoch(loader, ds, r + 1)
            best[k] = min(best[k], time.perf_counter() - t)
            assert n == records, (k, n, records)
    print(f"{a.mib} MiB, {records} records of {REC} bytes, batch {BATCH}, {a.repeat} rounds, best run:")
    for k in names:
        print(f"  {k:4s} {size / best[k] / 1e6:8.0f} MB/s  ({best[k]:.3f} s)")
    os.unlink(path)


if __name__ == "__main__":
    main()
