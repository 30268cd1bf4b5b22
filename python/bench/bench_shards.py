#!/usr/bin/env python3
"""One shuffled epoch of fixed-size records: peermem's ShardReader against what a PyTorch user
would pick instead, on the same files, in interleaved rounds.

Ways (each reads every record of the data set once, in a shuffled order, in batches):
  peermem     peermem.ShardReader (its defaults: I/O mode auto, read-ahead 2 batches)
  memmap      numpy.memmap of each file, a batch gathered by fancy indexing (one gather per
              file the batch touches)
  torch       a map-style torch Dataset reading one record with numpy.fromfile, under
              DataLoader(shuffle=True, num_workers=2, pin_memory=True)
  dali        NVIDIA DALI, when installed: a CPU pipeline whose parallel external source (2
              worker processes) reads one record with numpy.fromfile (DALI has no reader for
              raw fixed-size records)
  fio         (anchor) fio random reads of the record size, O_DIRECT, io_uring, the reader's
              depth, over the same files
Cases:
  fits        the data set (--mib) fits in memory; cold (page cache dropped before every run)
              and warm (the files read once before the run)
  exceeds     the data set (--big-mib) in a memory cgroup whose limit (--limit-mib) is below
              its size, so the page cache cannot hold it; cold
Every way runs in its own process (the cgroup holds only that process); the clock runs from
the first batch asked for to the last one received. Every record's first and last 8 bytes (its
global index, and the index xor a constant) are checked in every way, inside the timed loop.

  python3 python/bench/bench_shards.py [--dir DIR] [--records 4096,131072] [--mib 256]
      [--big-mib 2048] [--limit-mib 768] [--rounds 3] [--cases fits,exceeds] [--ways ...]
      [--budget 60]

Root is needed to drop the page cache (/proc/sys/vm/drop_caches; without it every file is
dropped with posix_fadvise DONTNEED) and for the cgroup.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FILES = 8
BATCH = 32
DEPTH = 32
MAGIC = 0x5DEECE66D5DEECE6
# A run that has not finished its epoch after this many seconds stops and reports the rate so
# far (memmap thrashing under a small cgroup would take hours); --budget sets it.
BUDGET = 60.0


def make_files(d, total, rec):
    """FILES files of `total` bytes in all, records of `rec` bytes, record g holding g in its
    first 8 bytes and g ^ MAGIC in its last 8, random bytes between."""
    per = total // FILES // rec
    rng = np.random.default_rng(7)
    paths = []
    g = 0
    for f in range(FILES):
        p = os.path.join(d, f"shard-{rec}-{total}-{f}.bin")
        paths.append(p)
        if os.path.exists(p) and os.path.getsize(p) == per * rec:
            g += per
            continue
        with open(p, "wb") as out:
            left = per
            while left:
                n = min(left, max(1, (64 << 20) // rec))
                a = rng.integers(0, 256, size=(n, rec), dtype=np.uint8)
                ids = np.arange(g, g + n, dtype=np.uint64)
                a[:, :8] = ids.view(np.uint8).reshape(n, 8)
                a[:, rec - 8 :] = (ids ^ np.uint64(MAGIC)).view(np.uint8).reshape(n, 8)
                out.write(a.tobytes())
                g += n
                left -= n
    return paths, per


def drop_caches(paths):
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def check(rows, ids):
    """rows: (n, rec) uint8 array (rows may be strided); ids: their global indices."""
    ids = np.asarray(ids, dtype=np.uint64)
    head = np.ascontiguousarray(rows[:, :8]).view(np.uint64).reshape(-1)
    tail = np.ascontiguousarray(rows[:, -8:]).view(np.uint64).reshape(-1)
    if not (np.array_equal(head, ids) and np.array_equal(tail, ids ^ np.uint64(MAGIC))):
        raise SystemExit("bytes differ from the file")


# --- ways, each run in a child process: returns bytes read ----------------------------------


def run_peermem(paths, rec, per, seed):
    import peermem

    r = peermem.ShardReader(paths, record_size=rec, batch_size=BATCH, shuffle=True, seed=seed, depth=DEPTH)
    n = 0
    t = time.perf_counter()
    for b in r:
        check(np.asarray(b), b.indices)
        n += len(b)
        if time.perf_counter() - t > BUDGET:
            break
    return n * rec, time.perf_counter() - t


def run_memmap(paths, rec, per, seed):
    mms = [np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, rec) for p in paths]
    total = per * len(paths)
    order = np.random.default_rng(seed).permutation(total)
    out = np.empty((BATCH, rec), dtype=np.uint8)
    t = time.perf_counter()
    for s in range(0, total, BATCH):
        ids = order[s : s + BATCH]
        files, ks = np.divmod(ids, per)
        for f in np.unique(files):
            sel = files == f
            out[: len(ids)][sel] = mms[f][ks[sel]]
        check(out[: len(ids)], ids)
        if time.perf_counter() - t > BUDGET:
            return (s + len(ids)) * rec, time.perf_counter() - t
    return total * rec, time.perf_counter() - t


def run_torch(paths, rec, per, seed):
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Records(Dataset):
        def __len__(self):
            return per * len(paths)

        def __getitem__(self, i):
            f, k = divmod(i, per)
            return torch.from_numpy(np.fromfile(paths[f], dtype=np.uint8, count=rec, offset=k * rec)), i

    g = torch.Generator()
    g.manual_seed(seed)
    dl = DataLoader(Records(), batch_size=BATCH, shuffle=True, num_workers=2, pin_memory=True, generator=g)
    n = 0
    t = time.perf_counter()
    for rows, ids in dl:
        check(rows.numpy(), ids.numpy())
        n += len(ids)
        if time.perf_counter() - t > BUDGET:
            break
    return n * rec, time.perf_counter() - t


class DaliRecords:
    """DALI's per-sample source for records in shard files (DALI has no reader for raw
    fixed-size records; a parallel external source is its documented way for a custom format)."""

    def __init__(self, paths, rec, per, order):
        self.paths, self.rec, self.per, self.order = paths, rec, per, order

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.order):
            raise StopIteration
        g = int(self.order[info.idx_in_epoch])
        f, k = divmod(g, self.per)
        row = np.fromfile(self.paths[f], dtype=np.uint8, count=self.rec, offset=k * self.rec)
        return row, np.array([g], dtype=np.uint64)


def run_dali(paths, rec, per, seed):
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError:
        raise SystemExit("NVIDIA DALI is not installed")
    order = np.random.default_rng(seed).permutation(per * len(paths))

    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=None, py_num_workers=2, py_start_method="spawn")
    def pipe():
        src = DaliRecords(paths, rec, per, order)
        return tuple(fn.external_source(source=src, num_outputs=2, batch=False, parallel=True))

    p = pipe()
    p.build()
    n = 0
    t = time.perf_counter()
    while True:
        try:
            rows, ids = p.run()
        except StopIteration:
            break
        check(rows.as_array(), ids.as_array().reshape(-1))
        n += len(rows)
        if time.perf_counter() - t > BUDGET:
            break
    return n * rec, time.perf_counter() - t


WAYS = {"peermem": run_peermem, "memmap": run_memmap, "torch": run_torch, "dali": run_dali}


def child(args):
    global BUDGET
    BUDGET = args.child_budget
    paths = args.child_paths.split(",")
    nbytes, secs = WAYS[args.child](paths, args.child_rec, args.child_per, args.child_seed)
    print(json.dumps({"bytes": nbytes, "seconds": secs}))


# --- the parent: cases, rounds, cgroups, fio ---------------------------------------------------


class Cgroup:
    """A memory cgroup (v2 or v1) limiting the page cache of the processes put in it."""

    def __init__(self, limit):
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        base = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory"
        self.path = os.path.join(base, f"peermem-bench-{os.getpid()}")
        os.makedirs(self.path, exist_ok=True)
        knob = "memory.max" if v2 else "memory.limit_in_bytes"
        with open(os.path.join(self.path, knob), "w") as f:
            f.write(str(limit))

    def enter(self):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def close(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def run_way(way, paths, rec, per, seed, cgroup):
    cmd = [sys.executable, __file__, "--child", way, "--child-paths", ",".join(paths)]
    cmd += ["--child-rec", str(rec), "--child-per", str(per), "--child-seed", str(seed)]
    cmd += ["--child-budget", str(BUDGET)]
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cgroup.enter if cgroup else None)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
        return None, why
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["bytes"] / r["seconds"] / 1e6, None


def run_fio(paths, rec, total, cgroup):
    if not shutil.which("fio"):
        return None, "fio not installed"
    cmd = ["fio", "--name=rand", "--filename=" + ":".join(paths), "--rw=randread", f"--bs={rec}"]
    cmd += [f"--iodepth={DEPTH}", "--direct=1", "--ioengine=io_uring", f"--io_size={total}"]
    cmd += ["--output-format=json", "--randrepeat=0", f"--runtime={int(BUDGET)}"]
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cgroup.enter if cgroup else None)
    if p.returncode != 0:
        return None, p.stderr.strip()[-200:]
    job = json.loads(p.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / 1e6, None


def case(args, name, d, total, rec, cold, limit):
    paths, per = make_files(d, total, rec)
    ways = [w for w in args.ways.split(",") if w]
    got = {w: [] for w in ways}
    why = {}
    cg = Cgroup(limit) if limit else None
    try:
        for rnd in range(args.rounds):
            # Each round starts with the next way, so no way always runs first.
            for w in ways[rnd % len(ways) :] + ways[: rnd % len(ways)]:
                drop_caches(paths) if cold else warm(paths)
                if w == "fio":
                    v, e = run_fio(paths, rec, per * rec * len(paths), cg)
                else:
                    v, e = run_way(w, paths, rec, per, rnd, cg)
                if v is None:
                    why[w] = e
                else:
                    got[w].append(v)
    finally:
        if cg:
            cg.close()
    size = f"{total >> 20} MiB" + (f" in a {limit >> 20} MiB cgroup" if limit else "")
    print(f"\n{name}, {'cold' if cold else 'warm'}: {size}, {rec >> 10} KiB records, batch {BATCH}")
    base = {w: max(v) for w, v in got.items() if v}
    for w in ways:
        if not got[w]:
            print(f"  {w:8} -          ({why.get(w, 'no run')})")
            continue
        runs = " ".join(f"{v:.0f}" for v in got[w])
        ratios = []
        if w != "peermem" and "peermem" in base:
            ratios.append(f"peermem/{w} {base['peermem'] / base[w]:.2f}x")
        print(f"  {w:8} {base[w]:8.0f} MB/s best of [{runs}]  {' '.join(ratios)}")
    return base


def main():
    global BUDGET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--records", default="4096,131072")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--big-mib", type=int, default=2048)
    ap.add_argument("--limit-mib", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="fits,exceeds")
    ap.add_argument("--ways", default="peermem,memmap,torch,dali,fio")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds a run may take (then its rate so far)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-paths", help=argparse.SUPPRESS)
    ap.add_argument("--child-rec", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-per", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    BUDGET = args.budget
    if args.child:
        return child(args)
    d = args.dir or tempfile.mkdtemp(prefix="peermem-shards-", dir="/var/tmp")
    os.makedirs(d, exist_ok=True)
    print(f"files in {d}; load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        for rec in [int(x) for x in args.records.split(",")]:
            if "fits" in args.cases:
                case(args, "fits", d, args.mib << 20, rec, True, 0)
                case(args, "fits", d, args.mib << 20, rec, False, 0)
            if "exceeds" in args.cases:
                case(args, "exceeds", d, args.big_mib << 20, rec, True, args.limit_mib << 20)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
