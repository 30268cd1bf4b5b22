"""The GPU machine's benchmark: peermem's loader into CUDA memory (through GPUDirect Storage where
the loader takes it, and through pinned staging) against the loader into host memory and against
PyTorch reading the same file into pinned memory then `.cuda()`, and a
ShardReader epoch on `cuda:0` against a `DataLoader(pin_memory=True)` + `.cuda(non_blocking=True)`
baseline. Every byte of every result is checked (on the GPU, against the file's bytes). Methods
run interleaved, round after round, on the same file. Writes `bench.json` under --out and prints
one summary.

Run by `bench/gpu/run.sh`; runs anywhere `import peermem, torch` works (without CUDA it does the
host-side parts only and says what it skipped).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import peermem


def log(*a):
    print(*a, flush=True)


def write_file(path, nbytes, seed):
    """A file of `nbytes` random bytes (written in 64 MiB pieces)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, 64 << 20)
            f.write(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
            left -= n


def record_file(path, first, count, record):
    """`count` records of `record` bytes: record g is (i * 31 + g) mod 256 at byte i."""
    i = np.arange(record, dtype=np.uint32)
    with open(path, "wb") as f:
        for g in range(first, first + count):
            f.write(((i * 31 + g) % 256).astype(np.uint8).tobytes())


def gbps(nbytes, s):
    return nbytes / s / 1e9


class Loads:
    """One file read whole, three ways; `ref` is the file's bytes on the GPU (checked against
    numpy once), every result is compared with it."""

    def __init__(self, torch, path, nbytes):
        self.torch, self.path, self.n = torch, path, nbytes
        self.loader = peermem.Loader()
        self.staged = peermem.Loader(gds=False)
        self.host = peermem.HostBuffer(nbytes)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        self.ref = None
        self.reports = {}

    def check_gpu(self, t, what):
        if not self.torch.equal(t, self.ref):
            raise SystemExit(f"{what}: bytes differ from the file")

    def torch_pinned(self):
        t0 = time.perf_counter()
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(self.pinned.numpy())
            got = 0
            while got < self.n:
                k = f.readinto(view[got:])
                if not k:
                    raise SystemExit("short read")
                got += k
        g = self.pinned.to("cuda", non_blocking=True)
        self.torch.cuda.synchronize()
        s = time.perf_counter() - t0
        if self.ref is None:
            want = np.fromfile(self.path, dtype=np.uint8)
            if not np.array_equal(self.pinned.numpy(), want):
                raise SystemExit("torch pinned read: bytes differ from numpy's")
            self.ref = g
        else:
            self.check_gpu(g, "torch pinned + .cuda()")
        return s

    def into_cuda(self, loader, key):
        self.dev.fill_(0xA5)
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = loader.read(self.path, self.dev)
        self.torch.cuda.synchronize()
        s = time.perf_counter() - t0
        self.reports[key] = r
        self.check_gpu(self.dev, f"loader into CUDA ({r.method})")
        return s

    def loader_cuda(self):
        """The loader's own choice: cuFile where it is taken, else pinned staging."""
        return self.into_cuda(self.loader, "cuda")

    def loader_cuda_staged(self):
        """Pinned staging always (gds=False): the path cuFile is measured against."""
        return self.into_cuda(self.staged, "cuda_staged")

    def loader_host(self):
        t0 = time.perf_counter()
        r = self.loader.read(self.path, self.host)
        s = time.perf_counter() - t0
        self.reports["host"] = r
        # Checked on the GPU too (the copy up is not timed).
        self.check_gpu(self.torch.from_numpy(np.asarray(self.host)).to("cuda"), "loader into host")
        return s


def bench_loads(torch, path, nbytes, rounds):
    l = Loads(torch, path, nbytes)
    l.torch_pinned()  # warm-up, and the reference bytes
    l.loader_cuda()  # warm-up: cuFile's driver and the route probe, and which path it takes
    gds = l.reports["cuda"].method.startswith("gds")
    log(f"  into CUDA: {l.reports['cuda'].method}; {l.reports['cuda'].cufile}")
    order0 = [("torch_pinned_cuda", l.torch_pinned), ("loader_cuda", l.loader_cuda), ("loader_host", l.loader_host)]
    if gds:
        order0.append(("loader_cuda_staged", l.loader_cuda_staged))
    times = {name: [] for name, _ in order0}
    for r in range(rounds):
        order = list(order0)
        if r % 2:
            order.reverse()
        for name, fn in order:
            times[name].append(fn())
        log(f"  round {r}: " + ", ".join(f"{k} {gbps(nbytes, v[-1]):.2f} GB/s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bytes": nbytes,
        "rounds": rounds,
        "seconds": times,
        "median_gbps": {k: gbps(nbytes, v) for k, v in med.items()},
        "cuda_over_host": med["loader_host"] / med["loader_cuda"],
        "cuda_over_torch": med["torch_pinned_cuda"] / med["loader_cuda"],
        "report_cuda": {"method": l.reports["cuda"].method, "io": l.reports["cuda"].io, "reasons": l.reports["cuda"].reasons,
                        "cufile": l.reports["cuda"].cufile},
        "gds_taken": gds,
        "gds_over_staged": med["loader_cuda_staged"] / med["loader_cuda"] if gds else None,
        "report_host": {"method": l.reports["host"].method, "io": l.reports["host"].io},
        "verified": True,
    }
    return out


# Where the checks run (the GPU; "cpu" to try the host-side parts on a machine without one).
DEV = "cuda"


def expected_batch(torch, indices, record):
    g = torch.tensor(indices, dtype=torch.int64, device=DEV)[:, None]
    i = torch.arange(record, dtype=torch.int64, device=DEV)[None, :]
    return ((i * 31 + g) % 256).to(torch.uint8)


def shard_epoch(torch, files, record, batch, seed):
    reader = peermem.ShardReader(files, record_size=record, batch_size=batch, shuffle=True, seed=seed,
                                 prefetch=4, device="cuda:0")
    t0 = time.perf_counter()
    seen = 0
    for b in reader:
        t = torch.from_dlpack(b)
        if t.device.type != "cuda" or not torch.equal(t, expected_batch(torch, b.indices, record)):
            raise SystemExit("ShardReader on cuda:0: a batch differs from the records")
        seen += len(b)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, seen


class Records:
    """The torch baseline's dataset: one record per item, read with pread."""

    def __init__(self, files, per, record):
        self.files, self.per, self.record = files, per, record
        self.fds = None

    def __len__(self):
        return len(self.files) * self.per

    def __getitem__(self, g):
        if self.fds is None:
            self.fds = [os.open(f, os.O_RDONLY) for f in self.files]
        b = os.pread(self.fds[g // self.per], self.record, (g % self.per) * self.record)
        import torch

        return torch.frombuffer(bytearray(b), dtype=torch.uint8), g


def torch_epoch(torch, loader, record):
    t0 = time.perf_counter()
    seen = 0
    for x, g in loader:
        x = x.to(DEV, non_blocking=True)
        if not torch.equal(x, expected_batch(torch, g.tolist(), record)):
            raise SystemExit("DataLoader baseline: a batch differs from the records")
        seen += len(g)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, seen


def bench_shards(torch, workdir, files_n, per, record, batch, workers, rounds):
    files = []
    for f in range(files_n):
        p = os.path.join(workdir, f"shard-{f:03d}.bin")
        record_file(p, f * per, per, record)
        files.append(p)
    n = files_n * per
    from torch.utils.data import DataLoader

    dl = DataLoader(Records(files, per, record), batch_size=batch, shuffle=True, num_workers=workers,
                    pin_memory=True, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    times = {"shardreader_cuda": [], "torch_dataloader": []}
    shard_epoch(torch, files, record, batch, 99)  # warm-up: page cache, CUDA context, pools
    torch_epoch(torch, dl, record)
    for r in range(rounds):
        s, seen = shard_epoch(torch, files, record, batch, r)
        assert seen == n, (seen, n)
        times["shardreader_cuda"].append(s)
        s, seen = torch_epoch(torch, dl, record)
        assert seen == n, (seen, n)
        times["torch_dataloader"].append(s)
        log(f"  epoch {r}: " + ", ".join(f"{k} {gbps(n * record, v[-1]):.2f} GB/s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "records": n, "record_bytes": record, "batch": batch, "dataloader_workers": workers, "rounds": rounds,
        "seconds": times,
        "median_gbps": {k: gbps(n * record, v) for k, v in med.items()},
        "shardreader_over_torch": med["torch_dataloader"] / med["shardreader_cuda"],
        "verified": True,
    }


def export_check():
    b = peermem.CudaBuffer(64 << 20)
    return {"dma_buf": b.dma_buf, "reason": b.dma_buf_reason, "notes": b.notes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--file-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shard-files", type=int, default=8)
    ap.add_argument("--per-file", type=int, default=512)
    ap.add_argument("--record", type=int, default=128 << 10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    res = {"peermem": peermem.__version__, "cuda_available": peermem.cuda_available(),
           "cufile_status": peermem.cufile_status()}
    log(f"cufile_status: {res['cufile_status']}")
    import torch

    res["torch"] = torch.__version__
    res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if not (res["cuda_available"] and torch.cuda.is_available()):
        log(f"no CUDA here (peermem {res['cuda_available']}, torch {torch.cuda.is_available()}): nothing to measure")
        json.dump(res, open(os.path.join(a.out, "bench.json"), "w"), indent=1)
        return 2
    log("== allocate + export")
    res["export"] = export_check()
    log(json.dumps(res["export"], indent=1))
    path = os.path.join(a.workdir, "load.bin")
    nbytes = a.file_mib << 20
    t0 = time.perf_counter()
    write_file(path, nbytes, 1)
    log(f"== loads: {a.file_mib} MiB file (written in {time.perf_counter() - t0:.1f} s), {a.rounds} rounds")
    res["loads"] = bench_loads(torch, path, nbytes, a.rounds)
    os.unlink(path)
    log(f"== shards: {a.shard_files} files x {a.per_file} records of {a.record} bytes, batch {a.batch}")
    res["shards"] = bench_shards(torch, a.workdir, a.shard_files, a.per_file, a.record, a.batch, a.workers, a.epochs)
    json.dump(res, open(os.path.join(a.out, "bench.json"), "w"), indent=1, default=str)
    L, S = res["loads"], res["shards"]
    log("== summary (" + res["gpu"] + ")")
    for k, v in L["median_gbps"].items():
        log(f"  {k:24s} {v:6.2f} GB/s")
    log(f"  loader CUDA / host       {L['cuda_over_host']:.2f}x (target >= 0.8x)")
    log(f"  into CUDA: {L['report_cuda']['method']}")
    log(f"  {L['report_cuda']['cufile']}")
    if L["gds_taken"]:
        log(f"  cuFile / pinned staging  {L['gds_over_staged']:.2f}x")
    log(f"  loader CUDA / torch      {L['cuda_over_torch']:.2f}x")
    for k, v in S["median_gbps"].items():
        log(f"  {k:24s} {v:6.2f} GB/s")
    log(f"  ShardReader / DataLoader {S['shardreader_over_torch']:.2f}x (target >= 1.0x)")
    log(f"  dma-buf: {res['export']['dma_buf']} {res['export']['reason'] or ''}")
    log("  every byte checked: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
