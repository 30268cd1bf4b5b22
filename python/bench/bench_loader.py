#!/usr/bin/env python3
"""The Python package vs the Rust loader vs plain Python, on the same jobs, in one run.

Jobs (O_DIRECT where the filesystem takes it, 32 requests in flight, 1 MiB requests):
  seq-1MiB     the whole file, read in 1 MiB requests
  rand-128KiB  every 128 KiB record of the file once, in random order, 4 KiB-aligned
Ways (each job's ways run interleaved, round after round, each round starting with the next
way; the best run of each way is kept):
  rust         the job entirely in Rust, GIL released: one batch of a peermem_loader::Loader
               (peermem._rust_read_batch), or one epoch of a peermem_loader::ShardReader
               (peermem._rust_shards); the loader is started (and has read 4 KiB into the
               destination, as the Python loader has) before the clock
  read         seq: Loader.read(path, out); rand: Loader.read_batch of the records' tuples
               (building the list of tuples is timed too)
  shards       (rand) ShardReader over the file in 128 KiB records, shuffled, batch 32
  rust-shards  (rand) the same epoch of the Rust ShardReader
  pread        (rand) Loader.pread per record, futures collected in order: each is its own
               batch, and the loader runs batches one after another
  plain        open/seek/readinto per record into a numpy array (one thread, buffered)
The page cache is dropped for the file (posix_fadvise DONTNEED) before every run, so the
buffered baseline reads the disk too. Every run's bytes are checked against the file.

  python3 python/bench/bench_loader.py [--dir DIR] [--mib 256] [--repeat 3]
"""

import argparse
import os
import tempfile
import time

import numpy as np
import peermem

DEPTH = 32
CHUNK = 1 << 20
REC = 128 << 10


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the data file goes (an O_DIRECT filesystem)")
    ap.add_argument("--mib", type=int, default=256, help="file size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best run of each way is kept")
    a = ap.parse_args()

    size = a.mib << 20
    path = os.path.join(a.dir, "peermem-bench.bin")
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    data.tofile(path)
    out = peermem.HostBuffer(size)
    view = np.asarray(out)
    n_rec = size // REC
    perm = rng.permutation(n_rec)
    # (file offset, size, destination offset): record perm[i] lands in slot i.
    rand = [(int(p) * REC, REC, i * REC) for i, p in enumerate(perm)]
    seq = [(0, size, 0)]

    loader = peermem.Loader(chunk=CHUNK, depth=DEPTH)
    loader.read(path, out, size=4096)  # the loader's thread and I/O engine start here

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def shards_py():
        r = peermem.ShardReader([path], record_size=REC, batch_size=32, shuffle=True, seed=3, depth=DEPTH)
        it = iter(r)
        t = time.perf_counter()
        for b in it:
            del b
        return time.perf_counter() - t

    def plain(records):
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            for off, n, oo in records:
                f.seek(off)
                f.readinto(memoryview(view[oo : oo + n]))
        return time.perf_counter() - t

    def pread(records):
        t = time.perf_counter()
        futs = [loader.pread(path, out, off, n, oo) for off, n, oo in records]
        for f in futs:
            f.result()
        return time.perf_counter() - t

    jobs = {
        "seq-1MiB": (seq, {
            "rust": lambda: peermem._rust_read_batch(path, out, seq, chunk=CHUNK, depth=DEPTH),
            "read": lambda: timed(lambda: loader.read(path, out)),
            "plain": lambda: plain([(o, CHUNK, o) for o in range(0, size, CHUNK)]),
        }),
        "rand-128KiB": (rand, {
            "rust": lambda: peermem._rust_read_batch(path, out, rand, chunk=CHUNK, depth=DEPTH),
            "read": lambda: timed(lambda: loader.read_batch([(path, out, o, n, oo) for o, n, oo in rand])),
            "rust-shards": lambda: peermem._rust_shards([path], REC, batch_size=32, shuffle=True, seed=3, depth=DEPTH),
            "shards": shards_py,
            "pread": lambda: pread(rand),
            "plain": lambda: plain(rand),
        }),
    }
    best, runs = {}, {}
    for job, (records, ways) in jobs.items():
        for rnd in range(a.repeat):
            # Each round starts with a different way, so none always runs first.
            order = list(ways.items())
            order = order[rnd % len(order) :] + order[: rnd % len(order)]
            for way, fn in order:
                view[:] = 0
                drop_cache(path)
                secs = fn()
                if way not in ("shards", "rust-shards"):
                    for off, n, oo in records[:: max(1, len(records) // 64)]:
                        assert np.array_equal(view[oo : oo + n], data[off : off + n]), (job, way, off)
                mbs = size / secs / 1e6
                best[(job, way)] = max(best.get((job, way), 0.0), mbs)
                runs.setdefault((job, way), []).append(secs)
    how = loader.read(path, out, size=1 << 20)
    loader.close()
    os.unlink(path)
    print(f"file {a.mib} MiB, {how.source}; {'direct' if how.direct else 'bounce'}; depth {DEPTH}; best of {a.repeat} rounds")
    print()
    print("Ratios: best against best, then (in parentheses) the median over rounds of the two ways'")
    print("ratio within a round, which a slow outlier run moves less.")
    print()
    print("| job | Rust loader MB/s | Python Loader MB/s | Python / Rust | Rust ShardReader MB/s | Python ShardReader MB/s | Python / Rust | pread per record MB/s | plain Python MB/s | Loader / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def paired(job, py, rust):
        r = sorted(a / b for a, b in zip(runs[(job, rust)], runs[(job, py)]))
        return r[len(r) // 2]

    for job in jobs:
        g = lambda w: best.get((job, w))
        rust, rd, plain_ = g("rust"), g("read"), g("plain")
        rs, sh, pr = g("rust-shards"), g("shards"), g("pread")
        sh_s = f"{rs:.0f} | {sh:.0f} | {sh / rs:.2f} ({paired(job, 'shards', 'rust-shards'):.2f})" if sh else "- | - | -"
        pr_s = f"{pr:.0f}" if pr else "-"
        print(
            f"| {job} | {rust:.0f} | {rd:.0f} | {rd / rust:.2f} ({paired(job, 'read', 'rust'):.2f}) | {sh_s} | {pr_s} "
            f"| {plain_:.0f} | {rd / plain_:.2f} |"
        )


if __name__ == "__main__":
    main()
