#!/usr/bin/env python3
"""NIXL (its UCX backend) moving kv_transfer's workload between two hosts, for the side-by-side
bench (testbed/guest/engines-side-by-side.sh).

    nixl_bench.py server [--blocks N] [--block-size B] [--want K] [--op read|write] [--port P]
    nixl_bench.py client --host IP [same workload flags]

The server registers its buffer of 2N block slots (filled with the blocks for a READ, zeroed for
a WRITE); the agents swap their metadata over the TCP control channel; the client moves its K
blocks in one NIXL transfer request (one descriptor per block, notification "batch" to the
server) and prints one JSON line: bytes, verified, seconds (from creating the request to its
completion), gbps. Every byte is checked: by the client after a READ, by the server after a WRITE
(which also checks that nothing outside the blocks changed). Before the timed request, one 1 MiB
READ brings the connection up (kv_transfer connects before its clock starts too).

UCX reads its configuration from the environment (UCX_NET_DEVICES, UCX_TLS, UCX_MODULES): the
driver sets them.
"""
import sys
import time

import numpy as np

import common

NAME = "nixl"


def agent(name):
    from nixl_cu13 import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def register(ag, buf):
    return ag.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")


def server(a):
    buf = np.zeros(2 * a.blocks * a.block_size, dtype=np.uint8)
    if a.op == "read":
        common.fill_server(buf, a.blocks, a.block_size)
    ag = agent("server")
    reg = register(ag, buf)
    ctl = common.Control.serve(a.port, a.timeout)
    ctl.send(ag.get_agent_metadata())
    offsets = [common.slot(b, a.blocks) * a.block_size for b in range(a.blocks)]
    ctl.send_json({"addr": buf.ctypes.data, "blocks": a.blocks, "block": a.block_size, "offsets": offsets})
    peer = ag.add_remote_agent(ctl.recv())
    peer = peer.decode() if isinstance(peer, bytes) else peer  # notifications are keyed by str
    deadline = time.monotonic() + a.timeout
    while not ag.check_remote_xfer_done(peer, b"batch"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no notification from {peer} within {a.timeout} s")
        if ctl.closed():
            raise ConnectionError(f"{peer} closed the control channel before its notification")
        time.sleep(0.001)
    if a.op == "write":
        ok, untouched = common.verified_server(buf, a.blocks, a.block_size, a.want)
        ctl.send_json({"verified_bytes": ok, "untouched": untouched})
    ctl.recv()  # the client is done with the buffer
    ag.deregister_memory(reg)
    return 0


def run(ag, handle, notif, timeout):
    """Posts the request (with its notification: transfer() replaces the request's) and polls it
    to its end, bounded; True when it completed."""
    deadline = time.monotonic() + timeout
    state = ag.transfer(handle, notif)
    while state == "PROC":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the transfer did not end within {timeout} s")
        time.sleep(0.0005)
        state = ag.check_xfer_state(handle)
    return state == "DONE"


def client(a):
    ctl = common.Control.connect(a.host, a.port, a.timeout)
    md, head = ctl.recv(), ctl.recv_json()
    blocks, block = head["blocks"], head["block"]
    buf = np.zeros(a.want * block, dtype=np.uint8)
    ag = agent("client")
    reg = register(ag, buf)
    ctl.send(ag.get_agent_metadata())
    peer = ag.add_remote_agent(md)
    # Bring the connection up: a 1 MiB READ from the server's buffer (then the buffer is reset).
    warm = min(1 << 20, buf.nbytes)
    h = ag.initialize_xfer(
        "READ",
        ag.get_xfer_descs([(buf.ctypes.data, warm, 0)], "DRAM"),
        ag.get_xfer_descs([(head["addr"], warm, 0)], "DRAM"),
        peer,
    )
    if not run(ag, h, b"warmup", a.timeout):
        return common.fail(NAME, "the warm-up READ failed")
    h.release()
    if a.op == "write":
        common.fill_client(buf, blocks, block, a.want)
    else:
        buf[:] = 0
    want = common.wanted(a.want, blocks)
    local = [(buf.ctypes.data + j * block, block, 0) for j in range(len(want))]
    remote = [(head["addr"] + head["offsets"][b], block, 0) for b in want]
    t0 = time.perf_counter()
    h = ag.initialize_xfer(a.op.upper(), ag.get_xfer_descs(local, "DRAM"), ag.get_xfer_descs(remote, "DRAM"), peer)
    done = run(ag, h, b"batch", a.timeout)
    seconds = time.perf_counter() - t0
    if not done:
        return common.fail(NAME, f"the {a.op.upper()} request ended in error after {seconds:.2f} s")
    h.release()
    nbytes = len(want) * block
    extra = {}
    if a.op == "read":
        ok = common.verified_client(buf, blocks, block, a.want)
    else:
        v = ctl.recv_json()
        ok, extra["untouched"] = v["verified_bytes"], v["untouched"]
    ctl.send(b"done")
    ag.deregister_memory(reg)
    return common.report(NAME, a, seconds, nbytes, ok, requests=len(want), **extra)


def main():
    a = common.args("nixl_bench.py")
    try:
        return server(a) if a.role == "server" else client(a)
    except Exception as e:  # every failure ends as one JSON line, with its text
        return common.fail(NAME, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
