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
#   5. bench/gpu/bench.py: loader into CUDA (through cuFile where it is taken, and through pinned
#      staging) vs into host vs torch pinned + .cuda(), ShardReader on cuda:0 vs
#      DataLoader(pin_memory=True), interleaved, every byte checked.
# Before 3: what GPUDirect Storage and Vulkan have here (nvidia-fs, the cufile wheel, the Vulkan
# loader and NVIDIA's ICD; the carried Vulkan loader where the machine has none). The Rust tests
# include cuFile against the wheel's library and Vulkan memory of the GPU imported into CUDA.
# Prints one summary at the end (and writes it to $OUT/summary.txt). Whole run: under 8 minutes.
# Usage: bench/gpu/run.sh [CARRY_DIR]   (OUT defaults to /tmp/peermem-gpu-out)
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=${1:-target/gpu-carry}
out=${OUT:-/tmp/peermem-gpu-out}
# Files on the checkout's disk: /tmp may be a tmpfs, which refuses O_DIRECT (and so cuFile).
mkdir -p target
work=$(mktemp -d "$PWD/target/peermem-gpu.XXXXXX")
export TMPDIR=$work
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

# GPUDirect Storage and Vulkan as this machine has them; the exports below reach the tests.
cufile_lib=$(python3 -c 'import glob, importlib.util as u; s = u.find_spec("nvidia")
print(next(iter(sorted(p for d in (s.submodule_search_locations if s else []) for p in glob.glob(d + "/*/lib/libcufile.so.0"))), ""))' 2>/dev/null)
[ -n "$cufile_lib" ] && export PEERMEM_TEST_CUFILE=$cufile_lib
ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 ' || export LD_LIBRARY_PATH=$(cd "$carry" && pwd)/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
icd=$(ls /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json 2>/dev/null | head -1)
glx=$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libGLX_nvidia.so.0' | head -1)
if [ -z "$icd" ] && [ -n "$glx" ]; then
  printf '{"file_format_version": "1.0.1", "ICD": {"library_path": "%s", "api_version": "1.3"}}\n' "$glx" >"$work/nvidia_icd.json"
  export VK_ICD_FILENAMES=$work/nvidia_icd.json
fi
gds_env() {
  echo "nvidia-cufile wheel: ${PEERMEM_TEST_CUFILE:-none}"
  ls -l /proc/driver/nvidia-fs 2>&1 | head -5
  cat /proc/driver/nvidia-fs/stats 2>&1 | head -20
  grep -E 'nvidia_fs|nvidia_peermem|nvme' /proc/modules 2>&1
  cat /etc/cufile.json 2>&1 | grep -E 'allow_compat_mode|use_pci_p2pdma|posix' | head
  df -T /tmp "$PWD" 2>&1
  lsblk -o NAME,TYPE,TRAN,SIZE,MOUNTPOINT 2>&1 | head -20
  echo "vulkan loader: $(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libvulkan.so.1' | head -1) LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "NVIDIA Vulkan ICD: ${icd:-none} (libGLX_nvidia: ${glx:-none}; VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-})"
}
export -f gds_env
export icd glx
step gds-vulkan-env 30 bash -c gds_env
note "      cufile wheel: ${PEERMEM_TEST_CUFILE:-none}; Vulkan ICD: ${icd:-${VK_ICD_FILENAMES:-none}}"

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
step cufile-status 30 python3 -c 'import peermem; print("cufile_status:", peermem.cufile_status())'
sed 's/^/      /' "$out/cufile-status.log" | tee -a "$summary"
# The CLI into CUDA memory: which path and why (GPUDirect Storage or pinned staging).
head -c $((256 << 20)) /dev/urandom >"$work/cli.bin"
step cli-cuda 60 "$carry/peermem" load "$work/cli.bin" --dest cuda --verify
grep -E '^  (method|why: +cufile)|moved' "$out/cli-cuda.log" | sed 's/^/      /' | tee -a "$summary"
rm -f "$work/cli.bin"
step bench 330 python3 bench/gpu/bench.py --out "$out" --workdir "$work"

note "---- bench summary"
sed -n '/== summary/,$p' "$out/bench.log" | tee -a "$summary"
note "---- rust test results"
grep -h -E '^test result|panicked|skipped|vulkan -> cuda|^(path|added):|gds (true|false)' "$out"/rust-*.log 2>/dev/null | tee -a "$summary"
note "---- python"
tail -n 3 "$out/pytest-cuda.log" | tee -a "$summary"
note "total $(($(date +%s) - t_start))s; logs and bench.json under $out"
