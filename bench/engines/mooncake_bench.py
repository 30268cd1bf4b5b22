#!/usr/bin/env python3
"""Mooncake's Transfer Engine moving kv_transfer's workload between two hosts, for the
side-by-side bench (testbed/guest/engines-side-by-side.sh).

    mooncake_bench.py server [--blocks N] [--block-size B] [--want K] [--op read|write] [--port P]
                             [--protocol rdma] [--devices rxe0,rxe1] [--topo FILE]
    mooncake_bench.py client --host IP [same flags]

Metadata: P2PHANDSHAKE (no etcd, no metadata server): each engine serves its own segment
description on its RPC port, and the client names the server's segment "IP:RPC_PORT", learnt
over the TCP control channel with the buffer's address and the block table. NICs: `--devices`
is Mooncake's filter over its own discovery ("": every device it finds); `--topo FILE` hands it
a topology file instead (MC_CUSTOM_TOPO_JSON, what `peermem export --mooncake-topo` writes), and
then the filter is not read.

The client moves its K blocks in one batch (`batch_transfer_sync_read` / `_write`, one entry per
block) and prints one JSON line: bytes, verified, seconds (the batch call), gbps. Every byte is
checked: by the client after a READ, by the server after a WRITE (which also checks that nothing
outside the blocks changed). Before the timed batch one 1 MiB READ opens the server's segment and
its connections (kv_transfer connects before its clock starts too).
"""
import argparse
import os
import sys
import time

import numpy as np

import common

NAME = "mooncake"


def options():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--protocol", default="rdma")
    p.add_argument("--devices", default="")
    p.add_argument("--topo", default="")
    own, rest = p.parse_known_args()
    sys.argv[1:] = rest
    a = common.args("mooncake_bench.py")
    a.protocol, a.devices, a.topo = own.protocol, own.devices, own.topo
    return a


def engine(a, ip):
    """An initialized engine on `ip` (the control channel's local address)."""
    if a.topo:
        os.environ["MC_CUSTOM_TOPO_JSON"] = os.path.abspath(a.topo)
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    rc = te.initialize(ip, "P2PHANDSHAKE", a.protocol, a.devices)
    if rc != 0:
        raise RuntimeError(f"initialize({ip}, P2PHANDSHAKE, {a.protocol}, {a.devices!r}) returned {rc}")
    return te


def register(te, buf):
    rc = te.register_memory(buf.ctypes.data, buf.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory of {buf.nbytes} bytes returned {rc}")


def server(a):
    buf = np.zeros(2 * a.blocks * a.block_size, dtype=np.uint8)
    if a.op == "read":
        common.fill_server(buf, a.blocks, a.block_size)
    ctl = common.Control.serve(a.port, a.timeout)
    ip = ctl.s.getsockname()[0]
    te = engine(a, ip)
    register(te, buf)
    offsets = [common.slot(b, a.blocks) * a.block_size for b in range(a.blocks)]
    ctl.send_json(
        {"segment": f"{ip}:{te.get_rpc_port()}", "addr": buf.ctypes.data, "blocks": a.blocks,
         "block": a.block_size, "offsets": offsets}
    )
    if ctl.recv() == b"written":
        ok, untouched = common.verified_server(buf, a.blocks, a.block_size, a.want)
        ctl.send_json({"verified_bytes": ok, "untouched": untouched})
        ctl.recv()  # the client is done
    te.unregister_memory(buf.ctypes.data)
    return 0


def client(a):
    ctl = common.Control.connect(a.host, a.port, a.timeout)
    head = ctl.recv_json()
    blocks, block, seg = head["blocks"], head["block"], head["segment"]
    buf = np.zeros(a.want * block, dtype=np.uint8)
    te = engine(a, ctl.s.getsockname()[0])
    register(te, buf)
    # Open the server's segment and its connections: a 1 MiB READ (then the buffer is reset).
    rc = te.transfer_sync_read(seg, buf.ctypes.data, head["addr"], min(1 << 20, buf.nbytes))
    if rc != 0:
        return common.fail(NAME, f"the warm-up READ from {seg} returned {rc}")
    if a.op == "write":
        common.fill_client(buf, blocks, block, a.want)
    else:
        buf[:] = 0
    want = common.wanted(a.want, blocks)
    local = [buf.ctypes.data + j * block for j in range(len(want))]
    remote = [head["addr"] + head["offsets"][b] for b in want]
    call = te.batch_transfer_sync_read if a.op == "read" else te.batch_transfer_sync_write
    t0 = time.perf_counter()
    rc = call(seg, local, remote, [block] * len(want))
    seconds = time.perf_counter() - t0
    if rc != 0:
        return common.fail(NAME, f"batch_transfer_sync_{a.op} returned {rc} after {seconds:.2f} s")
    nbytes = len(want) * block
    extra = {}
    if a.op == "read":
        ok = common.verified_client(buf, blocks, block, a.want)
        ctl.send(b"done")
    else:
        ctl.send(b"written")
        v = ctl.recv_json()
        ok, extra["untouched"] = v["verified_bytes"], v["untouched"]
        ctl.send(b"done")
    te.unregister_memory(buf.ctypes.data)
    return common.report(NAME, a, seconds, nbytes, ok, requests=len(want), topo=bool(a.topo), **extra)


def main():
    a = options()
    try:
        return server(a) if a.role == "server" else client(a)
    except Exception as e:  # every failure ends as one JSON line, with its text
        return common.fail(NAME, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
