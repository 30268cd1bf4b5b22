#!/usr/bin/env python3
"""Turns the criterion results of `cargo bench -p peermem-bench --bench registry --bench loader`
into the tables of bench/RESULTS.md: loop cost subtracted, ratios to the baselines, the machine named.

Usage: python3 bench/report.py [TARGET_DIR]   (default: target)
Reads TARGET/criterion/<group>/<function>/<parameter>/new/estimates.json (median, ns).
"""
import json
import os
import sys

target = sys.argv[1] if len(sys.argv) > 1 else "target"
root = os.path.join(target, "criterion")


def median(*parts):
    path = os.path.join(root, *parts, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except OSError:
        return None


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at report time"


def best(group, name, mode):
    """The lower of the two interleaved rounds where there are two (the less disturbed one)."""
    vals = [v for v in (median(group, name, mode), median(group, name, mode + "_again")) if v is not None]
    return min(vals) if vals else None


print(f"Machine: {cpu()}\n")
print("Lookup (ns per lookup, median, loop cost subtracted; ratio = variant / flat)\n")
print("| workload | probes | variant | thrpt ns | x flat | chain ns | x flat |")
print("|---|---|---|---|---|---|---|")
for wl in ("big", "small"):
    for probes in ("4096", "1M"):
        group = f"lookup_{wl}_{probes}probes"
        if not os.path.isdir(os.path.join(root, group)):
            continue
        h = {m: best(group, "harness", m) for m in ("thrpt", "chain")}
        flat = {m: best(group, "flat", m) - h[m] for m in ("thrpt", "chain")}
        for name in ("flat", "registry_reader", "registry_snapshot", "sorted_vec", "rwlock_btreemap"):
            row = [wl, probes, name]
            for m in ("thrpt", "chain"):
                v = best(group, name, m)
                if v is None:
                    row += ["-", "-"]
                    continue
                net = v - h[m]
                row += [f"{net:.2f}", f"{net / flat[m]:.2f}" if flat[m] > 0 else "-"]
            print("| " + " | ".join(row) + " |")
        print(f"| {wl} | {probes} | (loop cost) | {h['thrpt']:.2f} | | {h['chain']:.2f} | |")

print("\nLookup, interleaved rounds, fastest of 21 (ns per lookup, loop cost subtracted)\n")
print("| workload | probes | variant | thrpt ns | x flat | chain ns | x flat |")
print("|---|---|---|---|---|---|---|")
for wl in ("big", "small"):
    for probes in ("4096", "1M"):
        path = os.path.join(root, f"lookup_{wl}_{probes}probes", "interleaved.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        h = d["harness"]
        flat = {m: d["flat"][m] - h[m] for m in ("thrpt", "chain")}
        for name in ("flat", "registry_reader", "registry_snapshot"):
            row = [wl, probes, name]
            for m in ("thrpt", "chain"):
                net = d[name][m] - h[m]
                row += [f"{net:.2f}", f"{net / flat[m]:.2f}"]
            print("| " + " | ".join(row) + " |")
        print(f"| {wl} | {probes} | (loop cost) | {h['thrpt']:.2f} | | {h['chain']:.2f} | |")

print("\nRegister + unregister with 100k live regions\n")
print("| workload | registry | rwlock_btreemap | registry / btreemap |")
print("|---|---|---|---|")
for wl in ("big", "small"):
    r = median(f"churn_{wl}", "registry_register_unregister")
    b = median(f"churn_{wl}", "rwlock_btreemap_insert_remove")
    if r and b:
        print(f"| {wl} | {1e9 / r / 1e3:.0f} k/s ({r / 1e3:.2f} us) | {1e9 / b / 1e3:.0f} k/s | {b / r:.2f} |")

path = os.path.join(root, "readers_with_writer", "scaling.json")
if os.path.exists(path):
    with open(path) as f:
        d = json.load(f)
    print(
        f"\nReaders with a churning writer (small workload, best of 5 windows of 0.5 s): 1 reader "
        f"{d['one_reader'] / 1e6:.1f} M lookups/s, 2 readers {d['two_readers'] / 1e6:.1f} M lookups/s "
        f"({d['two_readers'] / d['one_reader']:.2f}x); writer {d['churn_one']:.0f} / {d['churn_two']:.0f} "
        "register+unregister/s"
    )
    if "two_readers_alone" in d:
        print(
            f"The same without the writer (the machine's own two-thread scaling): 1 reader "
            f"{d['one_reader_alone'] / 1e6:.1f} M/s, 2 readers {d['two_readers_alone'] / 1e6:.1f} M/s "
            f"({d['two_readers_alone'] / d['one_reader_alone']:.2f}x); 2 readers with the writer reach "
            f"{d['two_readers'] / d['two_readers_alone']:.2f} of 2 readers without it"
        )

print("\nLoader into host memory, 256 MiB file (`--bench loader`; GB/s)\n")
seq = median("loader_host", "sequential_1MiB_qd16_256MiB")
staged = median("loader_host", "staged_1MiB_qd16_256MiB")
mem = median("loader_host", "memcpy_256MiB")
if seq and staged and mem:
    total = 256 << 20
    print("| direct (O_DIRECT into the pages) | staged (the one bounce) | memcpy of as many bytes |")
    print("|---|---|---|")
    print(f"| {total / seq:.2f} | {total / staged:.2f} ({seq / staged:.2f}x direct) | {total / mem:.2f} |")

print("\nDiscovery and verdicts (`--bench topology`)\n")
# Criterion flattens a `bench_function` id's slashes into one directory name; a group keeps its own.
found = []
for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    if d.startswith("discover_") and d.split("_")[1].isdigit():
        found.append((d, median(d), int(d.split("_")[1])))
if os.path.isdir(os.path.join(root, "discover")):
    for d in sorted(os.listdir(os.path.join(root, "discover"))):
        if d.split("_")[0].isdigit():
            found.append(("discover/" + d, median("discover", d), int(d.split("_")[0])))
for name, v, n in found:
    if v is not None:
        print(f"- {name}: {v / 1e6:.2f} ms, {v / n / 1e3:.1f} us per function")
v = median("verdict_uncached_pair")
if v:
    print(f"- one uncached verdict: {v / 1e3:.2f} us")
for name in ("kernel_calc", "matrix", "verdict"):
    v = median("all_pairs", name)
    if v:
        print(f"- all ordered pairs of 1024 endpoints, {name}: {v / 1e6:.1f} ms ({v / 1024 / 1024:.0f} ns per pair)")
