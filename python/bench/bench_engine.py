#!/usr/bin/env python3
"""peermem.Engine against the Rust engine underneath it, on kv_transfer's job: a server holds
`--blocks` blocks scattered over twice as many slots, a client reads `--want` of them into one
contiguous array in one READ batch (two engines in this process, over the host's RDMA device:
soft-RoCE rxe0 in the testbed guest). Every batch's bytes are checked outside the clock.

Per batch it prints the wall time in Python (building the tuples, `Engine.read`, `result()`)
and the engine's own `seconds` (post to the last completion, in Rust): their difference is what
Python adds. The first batch (it sets up the rails) is shown apart from the median of the rest;
`examples/kv_transfer --json` times one batch of the same job as its `seconds`.

  python3 python/bench/bench_engine.py [--blocks 64] [--want 32] [--block-size 65536]
                                       [--depth 16] [--repeat 20]
"""

import argparse
import json
import statistics
import time

import numpy as np
import peermem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--want", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=65536)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    n, bs = a.blocks, a.block_size
    rng = np.random.default_rng(1)
    server_mem = rng.integers(0, 256, size=2 * n * bs, dtype=np.uint8)
    slot = [(b * 7919 + 3) % (2 * n) for b in range(n)]
    want = [(k * 2 + 1) % n for k in range(a.want)]
    client_mem = np.zeros(a.want * bs, dtype=np.uint8)
    with peermem.Engine(host="server", depth=a.depth, timeout=30) as server, peermem.Engine(
        host="client", depth=a.depth, timeout=30
    ) as client:
        remote = server.register(server_mem)
        local = client.register(client_mem)
        peer = client.connect(server.metadata())
        walls, reports = [], []
        for _ in range(a.repeat + 1):
            client_mem[:] = 0
            start = time.perf_counter()
            batch = [(local, j * bs, remote, slot[b] * bs, bs) for j, b in enumerate(want)]
            rep = client.read(peer, batch).result()
            walls.append(time.perf_counter() - start)
            reports.append(rep["seconds"])
            for j, b in enumerate(want):
                got = client_mem[j * bs : (j + 1) * bs]
                assert np.array_equal(got, server_mem[slot[b] * bs : (slot[b] + 1) * bs]), f"block {b}"
    nbytes = a.want * bs
    out = {
        "bytes": nbytes,
        "batches": a.repeat + 1,
        "verified": True,
        "first_wall_s": walls[0],
        "first_engine_s": reports[0],
        "median_wall_s": statistics.median(walls[1:]),
        "median_engine_s": statistics.median(reports[1:]),
        "median_python_overhead_s": statistics.median(w - r for w, r in zip(walls[1:], reports[1:])),
        "median_mb_per_s": nbytes / statistics.median(walls[1:]) / 1e6,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
