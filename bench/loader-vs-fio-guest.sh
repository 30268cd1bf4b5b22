#!/usr/bin/env bash
# bench/loader-vs-fio-guest.sh: the loader against fio on the testbed's emulated NVMe (topology
# switch-gpu), in one guest boot, with the release bench binary built here on the host:
#   1. a filesystem: mkfs.ext4 on SWITCH-B's namespace, mounted, then the same comparison as
#      bench/loader-vs-fio.sh (fio io_uring O_DIRECT vs the loader: sequential 1 MiB QD16, random
#      128 KiB QD32, shards; Vulkan rows on lavapipe);
#   2. the raw namespace: the loader through the userspace VFIO driver on SWITCH-A against fio on
#      the same namespace's block device (kernel driver), and the loader into the ivshmem "GPU" BAR
#      (peer to peer under the switch) against host memory.
# QEMU's NVMe model under TCG emulation is the bottleneck: absolute MB/s say nothing about real
# drives; the ratios (both sides through the same emulated device, interleaved round by round) are
# the figures. PEERMEM_BENCH_MIB (default 64) and PEERMEM_BENCH_SHARDS (default 200) size the jobs
# for the 256 MiB namespaces; PEERMEM_BENCH_ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(nice cargo bench -p peermem-bench --bench loader --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "loader" and .executable != null) | .executable' |
  tail -1)
[[ -x $bin ]] || { echo "cannot build the loader bench"; exit 1; }
export PEERMEM_BENCH_MIB=${PEERMEM_BENCH_MIB:-64} PEERMEM_BENCH_SHARDS=${PEERMEM_BENCH_SHARDS:-200}
export PEERMEM_BENCH_ROUNDS=${PEERMEM_BENCH_ROUNDS:-3}
testbed/run switch-gpu --timeout "${PEERMEM_BENCH_TIMEOUT:-3000}" -- sh -c '
  set -e
  ns_of() { basename "$(ls -d /sys/bus/pci/devices/$1/nvme/nvme*/nvme*n1 | head -1)"; }
  dev=/dev/$(ns_of 0000:04:00.0)
  echo "guest: $(nproc) CPUs, $(uname -r); filesystem on $dev (0000:04:00.0), VFIO on 0000:03:00.0"
  mkfs.ext4 -q -F "$dev" && mkdir -p /tmp/mnt && mount "$dev" /tmp/mnt
  echo "== ext4 on the emulated NVMe: fio vs the loader (kernel driver, io_uring)"
  PEERMEM_LOADER_VS_FIO=/tmp/mnt '"$bin"'
  umount /tmp/mnt
  echo "== raw namespace: fio (kernel driver) vs the loader (VFIO driver)"
  PEERMEM_LOADER_VS_FIO_VFIO=0000:03:00.0 '"$bin"'
'
