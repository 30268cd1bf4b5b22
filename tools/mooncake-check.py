#!/usr/bin/env python3
"""Mooncake's transfer engine reading a `peermem export --mooncake-topo` file (tools/engine-check).

Usage: mooncake-check.py FILE PROTOCOL [--expect-init-fail] [--transfer]

Sets MC_CUSTOM_TOPO_JSON=FILE, initializes an engine (P2P handshake, no metadata server) and
checks, from the engine's own log and `get_local_topology()`, that it loaded FILE: the log line
"Using custom topology from: FILE", as many HCAs as distinct device names in FILE, and the same
keys. `--expect-init-fail`: the names do not exist here, so `initialize` fails after parsing
(what Mooncake does for a device it cannot open, even over TCP). `--transfer`: a second engine,
and a 1 MiB write from one to the other over the file's devices, read back and compared.
Exit 0 when every check holds; 1 with the failed check on stderr.
"""
import ctypes
import json
import os
import re
import sys
import tempfile


def engine_log(fn):
    """Runs fn() with fd 2 captured (glog writes there from C++); returns (result, log text)."""
    with tempfile.TemporaryFile(mode="w+b") as cap:
        saved = os.dup(2)
        os.dup2(cap.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        return result, cap.read().decode(errors="replace")


def fail(msg, log=""):
    sys.stderr.write(f"mooncake-check: FAIL {msg}\n{log[-3000:]}")
    sys.exit(1)


def main():
    path, protocol = os.path.abspath(sys.argv[1]), sys.argv[2]
    expect_fail, transfer = "--expect-init-fail" in sys.argv, "--transfer" in sys.argv
    want = json.load(open(path))
    names = {n for pair in want.values() for lst in pair for n in lst}
    os.environ["MC_CUSTOM_TOPO_JSON"] = path
    from mooncake.engine import TransferEngine

    a = TransferEngine()
    rc, log = engine_log(lambda: a.initialize("127.0.0.1:17811", "P2PHANDSHAKE", protocol, ""))
    if f"Using custom topology from: {path}" not in log:
        fail("the engine did not load the file", log)
    m = re.search(r"Found (\d+) HCAs", log)
    if not m or int(m.group(1)) != len(names):
        fail(f"expected {len(names)} HCAs from the file, log says {m and m.group(0)}", log)
    if "falling back to auto-detect" in log:
        fail("the engine refused the file and discovered its own topology", log)
    if expect_fail:
        if rc == 0:
            fail("initialize succeeded with devices that do not exist here", log)
    elif rc != 0:
        fail(f"initialize returned {rc}", log)
    got = json.loads(a.get_local_topology())
    if sorted(got) != sorted(want):
        fail(f"keys {sorted(got)} != the file's {sorted(want)}", log)
    if not expect_fail:
        for k, v in want.items():
            if got[k] != v:
                fail(f"{k}: engine has {got[k]}, the file {v}", log)
    print(f"mooncake-check: {os.path.basename(path)}: loaded ({len(names)} HCAs, keys {', '.join(sorted(got))}),"
          f" initialize {'failed as expected' if expect_fail else 'ok'}")
    if transfer:
        b = TransferEngine()
        rc, log = engine_log(lambda: b.initialize("127.0.0.1:17812", "P2PHANDSHAKE", protocol, ""))
        if rc != 0:
            fail(f"second engine: initialize returned {rc}", log)
        # Buffers of this process registered with each engine (the engines' own managed-buffer
        # calls crashed in the guest): a 1 MiB pattern written from a's into b's.
        n = 1 << 20
        data = bytes((i * 7 + 3) % 251 for i in range(n))
        src, dst = ctypes.create_string_buffer(data, n), ctypes.create_string_buffer(n)
        ps, pd = ctypes.addressof(src), ctypes.addressof(dst)
        if a.register_memory(ps, n) != 0 or b.register_memory(pd, n) != 0:
            fail("register_memory refused a buffer")
        rc, log = engine_log(lambda: a.transfer_sync_write(f"127.0.0.1:{b.get_rpc_port()}", ps, pd, n))
        if rc != 0:
            fail(f"transfer_sync_write returned {rc}", log)
        if dst.raw != data:
            fail("the bytes written engine to engine differ", log)
        print(f"mooncake-check: {n} bytes written engine to engine over {protocol}, read back equal")


if __name__ == "__main__":
    main()
