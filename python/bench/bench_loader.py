#!/usr/bin/env python3
"""Loader from Python vs the Rust loader vs plain Python, on the same jobs, in one run.

Jobs (O_DIRECT where the filesystem takes it, 32 requests in flight):
  seq-1MiB     the whole file in 1 MiB records
  rand-128KiB  random 4 KiB-aligned 128 KiB records
Ways:
  rust         peermem._rust_job: 32 Rust threads call peermem_loader::load per record
  pread        Loader.pread per record from Python, 32 workers, futures collected in order
  read         (seq only) one Loader.read of the whole file, depth 32
  rust-one     (seq only) the same single load from Rust
  shards       (rand only) ShardReader over the file in 128 KiB records, shuffled, batch 32
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


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_rust(path, out, records, chunk):
    return peermem._rust_job(str(path), out, records, DEPTH, chunk=chunk, load_depth=1)


def run_pread(path, out, records, chunk):
    with peermem.Loader(chunk=chunk, depth=1, workers=DEPTH) as ld:
        t = time.perf_counter()
        futs = [ld.pread(path, out, off, n, oo) for off, n, oo in records]
        for f in futs:
            f.result()
        return time.perf_counter() - t


def run_read(path, out, records, chunk):
    ld = peermem.Loader(chunk=chunk, depth=DEPTH)
    t = time.perf_counter()
    ld.read(path, out)
    return time.perf_counter() - t


def run_rust_one(path, out, records, chunk):
    size = sum(n for _, n, _ in records)
    return peermem._rust_job(str(path), out, [(0, size, 0)], 1, chunk=chunk, load_depth=DEPTH)


def run_shards(path, out, records, chunk):
    """Every record of the file once, in shuffled batches of 32 (the ShardReader's own order:
    the same number of random 4 KiB-aligned 128 KiB reads as the rand job)."""
    r = peermem.ShardReader([str(path)], record_size=records[0][1], batch_size=32, shuffle=True, seed=3)
    t = time.perf_counter()
    for b in r:
        del b
    return time.perf_counter() - t


def run_plain(path, out, records, chunk):
    arr = np.asarray(out)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for off, n, oo in records:
            f.seek(off)
            f.readinto(memoryview(arr[oo : oo + n]))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the data file goes (an O_DIRECT filesystem)")
    ap.add_argument("--mib", type=int, default=256, help="file size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per (job, way); the best is kept")
    a = ap.parse_args()

    size = a.mib << 20
    path = os.path.join(a.dir, "peermem-bench.bin")
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    data.tofile(path)
    out = peermem.HostBuffer(size)
    view = np.asarray(out)

    rec = 128 << 10
    n_rand = size // rec
    slots = rng.integers(0, size // 4096 - rec // 4096, size=n_rand) * 4096
    jobs = {
        "seq-1MiB": ([(i << 20, 1 << 20, i << 20) for i in range(size >> 20)], 1 << 20),
        "rand-128KiB": ([(int(o), rec, i * rec) for i, o in enumerate(slots)], rec),
    }
    ways = {"rust": run_rust, "pread": run_pread, "rust-one": run_rust_one, "read": run_read, "shards": run_shards, "plain": run_plain}
    results = {}
    for job, (records, chunk) in jobs.items():
        for r in range(a.repeat):
            for way, fn in ways.items():
                if way in ("read", "rust-one") and job != "seq-1MiB" or way == "shards" and job == "seq-1MiB":
                    continue
                view[:] = 0
                drop_cache(path)
                secs = fn(path, out, records, chunk)
                for off, n, oo in records[:: max(1, len(records) // 64)] if way != "shards" else []:
                    assert np.array_equal(view[oo : oo + n], data[off : off + n]), (job, way, off)
                mbs = sum(n for _, n, _ in records) / secs / 1e6
                results[(job, way)] = max(results.get((job, way), 0.0), mbs)
    how = peermem.Loader().read(path, out, size=1 << 20)
    os.unlink(path)
    print(f"file {a.mib} MiB, {how.source}; {'direct' if how.direct else 'bounce'}; depth {DEPTH}; best of {a.repeat}")
    print()
    print("| job | Rust loader MB/s | Loader.pread MB/s | pread / Rust | Loader.read MB/s | read / same Rust load | ShardReader MB/s | shards / Rust | plain Python MB/s | pread / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        rust, pread, plain = results[(job, "rust")], results[(job, "pread")], results[(job, "plain")]
        rd, one = results.get((job, "read")), results.get((job, "rust-one"))
        rd_s = f"{rd:.0f} | {rd / one:.2f} (Rust {one:.0f})" if rd else "- | -"
        sh = results.get((job, "shards"))
        sh_s = f"{sh:.0f} | {sh / rust:.2f}" if sh else "- | -"
        print(f"| {job} | {rust:.0f} | {pread:.0f} | {pread / rust:.2f} | {rd_s} | {sh_s} | {plain:.0f} | {pread / plain:.2f} |")


if __name__ == "__main__":
    main()
