#!/usr/bin/env python3
"""The side-by-side bench's figures from its guest log (bench/engines/run).

Usage: report.py LOG

Reads host B's `RESULT rails=R round=I workload=W engine=E rc=RC pkts=... {JSON}` lines and
prints every run, then per (rails, workload) each engine's median Gb/s over its verified runs
and the ratios peermem / each other engine. A run that failed or was not verified counts in no
median and is listed with its error. The second table pairs the runs of one round (minutes
apart, while the host's speed drifts over the hour): per round peermem's Gb/s over the other
engine's, then the median of those ratios and how many rounds peermem was ahead in.
Round 0 (the untimed warm-up) counts in neither table.
"""
import json
import re
import statistics
import sys

LINE = re.compile(r"^B\| RESULT rails=(\d) round=(\d+) workload=(\w+) engine=([\w-]+) rc=(\d+) pkts=(\S*) (\{.*\})$")
ENGINES = ["peermem", "nixl", "mooncake", "mooncake-topo"]


def runs(path):
    out = []
    for line in open(path, errors="replace"):
        m = LINE.match(line.rstrip("\n"))
        if m:
            rails, rnd, wl, eng, rc, pkts, js = m.groups()
            try:
                v = json.loads(js)
            except json.JSONDecodeError:
                v = {"error": f"unreadable JSON: {js[:200]}"}
            out.append(dict(rails=int(rails), round=int(rnd), wl=wl, engine=eng, rc=int(rc), pkts=pkts, v=v))
    return out


def ok(r):
    return r["rc"] == 0 and r["v"].get("verified") is True and r["v"].get("gbps")


def main():
    rs = runs(sys.argv[1])
    if not rs:
        sys.exit("no RESULT lines in the log")
    for r in rs:
        v = r["v"]
        what = f"{v['gbps']:.4f} Gb/s, {v['seconds']:.2f} s" if ok(r) else f"FAILED: {v.get('error', v)}"
        print(f"rails {r['rails']} round {r['round']} {r['wl']:<6} {r['engine']:<13} {what}  (B's NICs rcvd/retries: {r['pkts']})")
    print()
    print("| rails | workload | " + " | ".join(f"{e} Gb/s" for e in ENGINES) + " | peermem/NIXL | peermem/Mooncake | peermem/Mooncake+topo |")
    print("|---|---|" + "---|" * (len(ENGINES) + 3))
    for rails in sorted({r["rails"] for r in rs}):
        for wl in ["one", "blocks"]:
            med = {}
            for e in ENGINES:
                g = [r["v"]["gbps"] for r in rs if (r["rails"], r["wl"], r["engine"]) == (rails, wl, e) and ok(r)]
                med[e] = statistics.median(g) if g else None
            if not any(med.values()):
                continue
            cells = [f"{med[e]:.4f}" if med[e] else "-" for e in ENGINES]
            ratios = [f"**{med['peermem'] / med[e]:.2f}**" if med["peermem"] and med[e] else "-" for e in ENGINES[1:]]
            print(f"| {rails} | {wl} | " + " | ".join(cells + ratios) + " |")
    print()
    print("| rails | workload | " + " | ".join(f"peermem/{e} per round" for e in ENGINES[1:]) + " |")
    print("|---|---|" + "---|" * (len(ENGINES) - 1))
    for rails in sorted({r["rails"] for r in rs}):
        for wl in ["one", "blocks"]:
            cells = [paired(rs, rails, wl, e) for e in ENGINES[1:]]
            if any(cells):
                print(f"| {rails} | {wl} | " + " | ".join(c or "-" for c in cells) + " |")


def paired(rs, rails, wl, other):
    """The per-round ratios peermem / `other` (rounds where both verified), their median, and
    the rounds peermem was ahead in; None without a pair."""
    gbps = {(r["round"], r["engine"]): r["v"]["gbps"] for r in rs if (r["rails"], r["wl"]) == (rails, wl) and ok(r)}
    ratios = [gbps[(i, "peermem")] / gbps[(i, other)] for i, e in gbps if e == other and (i, "peermem") in gbps]
    if not ratios:
        return None
    ahead = sum(x >= 1.0 for x in ratios)
    each = " ".join(f"{x:.2f}" for x in ratios)
    return f"{each}: **{statistics.median(ratios):.2f}** ({ahead}/{len(ratios)})"


if __name__ == "__main__":
    main()
