#!/usr/bin/env bash
# Builds what bench/gpu/run.sh needs on the GPU machine (which has no Rust) into
# target/gpu-carry: the `peermem` CLI (release, stripped), the abi3 wheel (CPython >= 3.11), and
# the CUDA test binaries of peermem-cuda and peermem-loader (release, stripped), named test-*,
# and Debian's Vulkan loader (lib/libvulkan.so.1: the GPU machine may have the NVIDIA Vulkan
# driver without a loader; run.sh uses it only where the machine has none).
# Usage: bench/gpu/carry.sh   (then carry target/gpu-carry with the device tool)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=target/gpu-carry
rm -rf "$dest"
mkdir -p "$dest"
cargo build --release -p peermem-cli
cp target/release/peermem "$dest/peermem"
# A test binary's path is the last "executable" in cargo's JSON messages for that target.
test_bin() {
  cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
exe=[m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable")]
print(exe[-1])'
}
cp "$(test_bin peermem-cuda device)" "$dest/test-cuda-device"
cp "$(test_bin peermem-cuda gds)" "$dest/test-cuda-gds"
cp "$(test_bin peermem-loader cuda)" "$dest/test-loader-cuda"
cp "$(test_bin peermem-loader shard)" "$dest/test-loader-shard"
strip "$dest"/peermem "$dest"/test-*
mkdir -p "$dest/lib"
cp -L /usr/lib/x86_64-linux-gnu/libvulkan.so.1 "$dest/lib/libvulkan.so.1"
# The wheel: maturin from the Python test environment (python/run-tests sets it up).
venv=${PEERMEM_PYVENV:-$HOME/.cache/peermem/pyvenv-$(python3 -c 'import sys; print(sys.implementation.cache_tag)')}
# Tagged linux_x86_64 (not manylinux_2_NN of this machine's glibc), so pip takes it on the GPU
# machine whatever its glibc; the symbol versions below say what it really needs.
PATH=$venv/bin:$PATH maturin build --release -m python/Cargo.toml --compatibility linux -o "$dest" -q
"$venv/bin/python" -m pip download -q --only-binary=:all: -d "$dest/pywheels" pytest
for f in "$dest"/peermem "$dest"/test-*; do
  echo "$f needs glibc $(objdump -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
done
ls -l "$dest"
du -sh "$dest"
