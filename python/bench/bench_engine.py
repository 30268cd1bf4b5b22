#!/usr/bin/env python3
"""peermem.Engine against the Rust engine underneath it, on kv_transfer's job: a server holds
`--blocks` blocks scattered over twice as many slots, a client reads `--want` of them into one
contiguous array in one READ batch (two engines in this process, over the host's RDMA device:
soft-RoCE rxe0 in the testbed guest). Every batch's bytes are checked outside the clock.

Each round runs every way once, interleaved, on the same engines:
- `ticket`: the native ticket alone (`_Engine.read`, then its `wait()` and `outcome()`): what
  `Engine.read(...).result()` cost before batches were futures;
- `result`: `Engine.read(...)` (a `Transfer` future, watched by the engine's waiter thread), then
  its `result()`, which waits on the ticket itself;
- `wait`: `Engine.read(...)`, then `concurrent.futures.wait([future])`: settled by the waiter
  thread, the path of callbacks, `as_completed` and `asyncio.wrap_future`.
Per batch it prints the wall time in Python (building the tuples, the post, the wait) and the
engine's own `seconds` (post to the last completion, in Rust): their difference is what Python
adds. The first round (it sets up the rails) is left out of the medians.

`--settled N` also times the future's own machinery on N batches that have already ended
(no NIC time at all): `Transfer` + the waiter's watch + `result()` against the ticket's `wait()` +
`outcome()`, in microseconds per batch, beside a bare `concurrent.futures.Future`'s life (the
interpreter's speed: what relates an emulated guest's figures to a host's).
`examples/kv_transfer --json` times one batch of the same job as its `seconds`.

  python3 python/bench/bench_engine.py [--blocks 64] [--want 32] [--block-size 65536]
                                       [--depth 16] [--repeat 20] [--settled 200]
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import numpy as np
import peermem
from peermem import _native


def ticket_way(client, peer, batch):
    t = _native._Engine.read(client, peer, batch)
    t.wait()
    return t.outcome()


def result_way(client, peer, batch):
    return client.read(peer, batch).result()


def wait_way(client, peer, batch):
    f = client.read(peer, batch)
    concurrent.futures.wait([f])
    return f.result()


WAYS = {"ticket": ticket_way, "result": result_way, "wait": wait_way}


def future_cycle_us() -> float:
    """Microseconds of a bare `concurrent.futures.Future`'s life (made, running, result set and
    read): the interpreter's own speed, to compare machines (an emulated guest against a host)."""

    def cycle():
        f = concurrent.futures.Future()
        f.set_running_or_notify_cancel()
        f.set_result(None)
        f.result(0)

    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        cycle()
    return (time.perf_counter() - start) / n * 1e6


def settled(client, peer, batch, n: int) -> dict:
    """Microseconds per batch of the future's machinery on `n` batches that have ended."""
    tickets = [_native._Engine.read(client, peer, batch) for _ in range(n)]
    for t in tickets:
        t.wait()
    start = time.perf_counter()
    for t in tickets:
        t.wait()
        t.outcome()
    bare = time.perf_counter() - start
    start = time.perf_counter()
    for t in tickets:
        client._watched(t).result()
    future = time.perf_counter() - start
    return {
        "settled_batches": n,
        "ticket_us": bare / n * 1e6,
        "future_us": future / n * 1e6,
        "bare_future_cycle_us": future_cycle_us(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--want", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=65536)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--settled", type=int, default=0)
    a = ap.parse_args()
    n, bs = a.blocks, a.block_size
    rng = np.random.default_rng(1)
    server_mem = rng.integers(0, 256, size=2 * n * bs, dtype=np.uint8)
    slot = [(b * 7919 + 3) % (2 * n) for b in range(n)]
    want = [(k * 2 + 1) % n for k in range(a.want)]
    client_mem = np.zeros(a.want * bs, dtype=np.uint8)
    walls = {w: [] for w in WAYS}
    engine_s = {w: [] for w in WAYS}
    with peermem.Engine(host="server", depth=a.depth, timeout=30) as server, peermem.Engine(
        host="client", depth=a.depth, timeout=30
    ) as client:
        remote = server.register(server_mem)
        local = client.register(client_mem)
        peer = client.connect(server.metadata())
        for _ in range(a.repeat + 1):
            for way, run in WAYS.items():
                client_mem[:] = 0
                start = time.perf_counter()
                batch = [(local, j * bs, remote, slot[b] * bs, bs) for j, b in enumerate(want)]
                rep = run(client, peer, batch)
                walls[way].append(time.perf_counter() - start)
                engine_s[way].append(rep["seconds"])
                for j, b in enumerate(want):
                    got = client_mem[j * bs : (j + 1) * bs]
                    assert np.array_equal(got, server_mem[slot[b] * bs : (slot[b] + 1) * bs]), f"{way}: block {b}"
        extra = settled(client, peer, batch[:1], a.settled) if a.settled else {}
    out = {"bytes": a.want * bs, "rounds": a.repeat + 1, "verified": True}
    for way in WAYS:
        w, e = walls[way][1:], engine_s[way][1:]
        out[way] = {
            "first_wall_s": walls[way][0],
            "median_wall_s": statistics.median(w),
            "median_engine_s": statistics.median(e),
            "median_python_overhead_ms": statistics.median(x - y for x, y in zip(w, e)) * 1e3,
        }
    out.update(extra)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
