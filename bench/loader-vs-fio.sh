#!/usr/bin/env bash
# bench/loader-vs-fio.sh [DIR]: the loader against fio (io_uring engine, O_DIRECT, same block
# size, depth and files) on the disk holding DIR (default: target/loader-vs-fio, this checkout's
# disk), and the loader into Vulkan buffers (lavapipe) against host memory. Every pair runs
# interleaved, round by round, and is reported as a ratio of medians with CPU seconds per GiB:
# other work on the machine slows both sides of a pair alike.
# PEERMEM_BENCH_ROUNDS (default 3) rounds; PEERMEM_LOADER_SWEEP=1 sweeps chunk and depth first.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/loader-vs-fio}
mkdir -p "$dir"
command -v fio >/dev/null || { echo "needs fio (apt-get install fio)"; exit 1; }
echo "machine: $(nproc) CPUs, $(uname -r), disk of $(df --output=source "$dir" | tail -1) ($(findmnt -no FSTYPE -T "$dir"))"
PEERMEM_LOADER_VS_FIO="$(realpath "$dir")" nice cargo bench -p peermem-bench --bench loader
