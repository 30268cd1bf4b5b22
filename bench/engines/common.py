"""What nixl_bench.py and mooncake_bench.py share with examples/kv_transfer.rs: the block layout,
the byte pattern, the control channel and the report.

Owns: the workload's shape, so every engine moves the same bytes between the same offsets and
checks them the same way. Must not: touch an engine (each bench drives its own).

The layout is kv_transfer's: the server holds `blocks` blocks of `block` bytes in a buffer of
`2 * blocks` block slots, block b at slot (b * 7919 + 3) mod 2 * blocks; the client wants blocks
1, 3, 5, ... (`want` of them) and places block j of its list at j * block in its own buffer.
Block b's 8-byte word k is ((b << 40) ^ k) * 0x9e3779b97f4a7c15 mod 2**64, little-endian.
"""
import argparse
import json
import select
import socket
import struct
import sys
import time

import numpy as np

MIX = np.uint64(0x9E3779B97F4A7C15)
CONTROL_PORT = 18660


def slot(b, n):
    """The slot of block b of n in a buffer of 2n slots (scattered, never next to b+1)."""
    return (b * 7919 + 3) % (2 * n)


def wanted(want, blocks):
    """The blocks the client asks for, in its order."""
    return [(k * 2 + 1) % blocks for k in range(want)]


def pattern(b, length):
    """Block b's contents as a uint8 array of `length` bytes."""
    words = (length + 7) // 8
    k = np.arange(words, dtype=np.uint64)
    w = (np.uint64(b << 40) ^ k) * MIX
    return w.astype("<u8").view(np.uint8)[:length]


def fill_server(buf, blocks, block):
    """Writes every block at its slot into the server's buffer (a uint8 array)."""
    for b in range(blocks):
        off = slot(b, blocks) * block
        buf[off : off + block] = pattern(b, block)


def fill_client(buf, blocks, block, want):
    """Writes the client's blocks (block j of wanted() at j * block): what a WRITE sends."""
    for j, b in enumerate(wanted(want, blocks)):
        buf[j * block : (j + 1) * block] = pattern(b, block)


def verified_client(buf, blocks, block, want):
    """How many of the client's bytes (block j of wanted() at j * block) hold what they should."""
    ok = 0
    for j, b in enumerate(wanted(want, blocks)):
        ok += block if np.array_equal(buf[j * block : (j + 1) * block], pattern(b, block)) else 0
    return ok


def verified_server(buf, blocks, block, want):
    """After a WRITE into a zeroed server buffer: how many bytes of the wanted blocks' slots hold
    what they should, and whether everything else is still zero (nothing landed outside a
    destination range). Zeroes the checked slots as it goes."""
    ok = 0
    for b in wanted(want, blocks):
        off = slot(b, blocks) * block
        ok += block if np.array_equal(buf[off : off + block], pattern(b, block)) else 0
        buf[off : off + block] = 0
    return ok, not buf.any()


def args(prog):
    """The command line both benches take: kv_transfer's workload flags, and the role."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", help="the server's address (client)")
    p.add_argument("--port", type=int, default=CONTROL_PORT, help="control channel (TCP)")
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--block-size", type=int, default=256 << 10)
    p.add_argument("--want", type=int, default=256)
    p.add_argument("--op", choices=["read", "write"], default="read")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on every wait (seconds)")
    a = p.parse_args()
    if not (0 < a.want <= a.blocks and a.block_size > 0):
        p.error("need 0 < --want <= --blocks and --block-size > 0")
    if a.role == "client" and not a.host:
        p.error("client needs --host")
    return a


class Control:
    """Length-prefixed messages over one TCP connection, every read bounded."""

    def __init__(self, sock, timeout):
        sock.settimeout(timeout)
        self.s = sock

    @classmethod
    def serve(cls, port, timeout):
        """Waits (at most `timeout`) for the client on `port`."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(1)
        ls.settimeout(timeout)
        s, _ = ls.accept()
        ls.close()
        return cls(s, timeout)

    @classmethod
    def connect(cls, host, port, timeout):
        """Connects, retrying while the server is still starting (at most `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(socket.create_connection((host, port), timeout=5), timeout)
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def closed(self):
        """True once the peer closed the channel (a client that failed and exited): a server
        waiting for it stops waiting. Never blocks."""
        # A socket with a timeout waits for data before any recv, whatever its flags: select
        # first, peek only at what is there.
        if not select.select([self.s], [], [], 0)[0]:
            return False
        try:
            return self.s.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.s.sendall(struct.pack("<I", len(data)) + data)

    def recv(self):
        n = struct.unpack("<I", self._exact(4))[0]
        if n > 64 << 20:
            raise ValueError(f"a control message of {n} bytes")
        return self._exact(n)

    def send_json(self, obj):
        self.send(json.dumps(obj))

    def recv_json(self):
        return json.loads(self.recv())

    def _exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the peer closed the control channel")
            out += chunk
        return out


def report(engine, a, seconds, nbytes, verified, **extra):
    """Prints the client's one JSON line (kv_transfer's fields) and returns the exit status."""
    out = {
        "engine": engine,
        "op": a.op,
        "bytes": nbytes,
        "verified": verified == nbytes and extra.get("untouched", True),
        "verified_bytes": verified,
        "seconds": seconds,
        "gbps": nbytes * 8 / seconds / 1e9 if seconds > 0 else None,
        **extra,
    }
    print(json.dumps(out), flush=True)
    return 0 if out["verified"] else 1


def fail(engine, msg):
    """Prints the error as the client's JSON line (and on stderr); exit status 1."""
    print(json.dumps({"engine": engine, "error": msg}), flush=True)
    sys.stderr.write(f"{engine}: {msg}\n")
    return 1
