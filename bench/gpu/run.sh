#!/usr/bin/env bash
# One run on a GPU machine (H100/H200, NVIDIA driver, CUDA 13, PyTorch, Python 3.12, no Rust, no
# network), from a checkout that carries what bench/gpu/carry.sh built here: the abi3 wheel, the
# `peermem` CLI and the CUDA test binaries, under target/gpu-carry. In order, each step bounded
# and logged under $OUT, a failed step recorded and the next one run:
#   1. the machine: nvidia-smi, the kernel module, torch's view;
#   2. `peermem topo --json` and `peermem capture --archive` (a fixture, with its provenance);
#   3. the Rust CUDA tests (allocate, export: dma-buf or the reason, copies, adopt, the loader
#      into CUDA memory, ShardReader rings on the GPU) against the real driver;
#   4. the wheel installed (no index, no dependencies) and the Python CUDA tests;
#   5. bench/gpu/bench.py: loader into CUDA vs into host vs torch pinned + .cuda(), ShardReader
#      on cuda:0 vs DataLoader(pin_memory=True), interleaved, every byte checked.
# Prints one summary at the end (and writes it to $OUT/summary.txt). Whole run: under 8 minutes.
# Usage: bench/gpu/run.sh [CARRY_DIR]   (OUT defaults to /tmp/peermem-gpu-out)
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=${1:-target/gpu-carry}
out=${OUT:-/tmp/peermem-gpu-out}
work=$(mktemp -d /tmp/peermem-gpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
summary=$out/summary.txt
: >"$summary"
t_start=$(date +%s)
note() { echo "$*" | tee -a "$summary"; }

# step NAME SECONDS CMD...: runs CMD under a timeout, output to $out/NAME.log, notes the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) note "ok    $name (${dt}s)" ;;
    124 | 137) note "TIME  $name: past ${limit}s (see $name.log)" ;;
    *) note "FAIL  $name: exit $rc (${dt}s; see $name.log)" ;;
  esac
  return $rc
}

note "peermem GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), carry $carry"
for f in "$carry"/peermem "$carry"/*.whl; do
  [ -e "$f" ] || { note "FAIL  carry: $f missing (run bench/gpu/carry.sh where Rust is)"; exit 1; }
done

machine() {
  uname -a
  cat /etc/os-release 2>/dev/null | head -3
  nproc
  free -g | head -2
  cat /proc/driver/nvidia/version 2>&1
  nvidia-smi 2>&1
  nvidia-smi topo -m 2>&1
  nvidia-smi -q 2>&1 | grep -iE 'product name|bus id|driver version|cuda version|addressing mode|persistence' | sort -u
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  python3 -c 'import cupy; print("cupy", cupy.__version__)' 2>&1
  true
}
export -f machine
step machine 60 bash -c machine
grep -m1 -E 'NVRM version' "$out/machine.log" | sed 's/^/      /' | tee -a "$summary"

chmod +x "$carry"/peermem "$carry"/test-* 2>/dev/null
step topo 60 sh -c "'$carry/peermem' topo --json > '$out/topo.json' && '$carry/peermem' topo"
step capture 120 sh -c "'$carry/peermem' capture --archive '$out/capture.tar.gz' && \
  { echo 'peermem capture of the device tool GPU machine'; date -u; uname -a; nvidia-smi -L 2>&1 || true; } > '$out/capture.provenance.txt'"

# The Rust tests, built here with their harness: each prints what it found on stderr.
# test-loader-shard also holds the lavapipe Vulkan tests: only its CUDA ones run here.
for t in "$carry"/test-*; do
  [ -x "$t" ] || continue
  filter=
  case $t in *shard) filter=cuda ;; esac
  step "rust-$(basename "$t")" 120 "$t" --test-threads=1 --nocapture $filter
done

site=$work/site
step wheel 120 python3 -m pip install -q --no-index --no-deps --target "$site" "$carry"/*.whl
# pytest (pure Python, carried as wheels) where the machine lacks it.
python3 -c 'import pytest' 2>/dev/null ||
  step pytest-install 60 python3 -m pip install -q --no-index --target "$site" "$carry"/pywheels/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
step pytest-cuda 120 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_cuda.py
step bench 330 python3 bench/gpu/bench.py --out "$out" --workdir "$work"

note "---- bench summary"
sed -n '/== summary/,$p' "$out/bench.log" | tee -a "$summary"
note "---- rust test results"
grep -h -E '^test result|panicked|skipped' "$out"/rust-*.log 2>/dev/null | tee -a "$summary"
note "---- python"
tail -n 3 "$out/pytest-cuda.log" | tee -a "$summary"
note "total $(($(date +%s) - t_start))s; logs and bench.json under $out"
