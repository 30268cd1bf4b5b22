#!/bin/sh
# testbed/guest/kv-two-hosts.sh: examples/kv_transfer across the two guests of
# `testbed/run2 --nics 2` (two rails: rxe0 and rxe1 on two links). Host A serves its blocks,
# host B reads 128 of them (64 KiB each) in one batch; each case must end the way it says, in bounded time:
#   1. every byte verified, A notified, both rails carry bytes
#   1w. the same with B writing its blocks into A's slots: A checks every byte, and that nothing
#      outside the written blocks changed
#   2. B takes its second link down mid-batch (512 blocks, so that the batch outlasts starting
#      `ip` under emulation): every byte still verified, A notified, the report names the
#      failed rail
#   3. A unregisters its blocks mid-batch: B's batch fails with the peer's access error
#   4. A's process exits mid-batch: B's batch fails within seconds, the peer gone (or its access
#      error), long before the engine's bound. A's host stays up a while after it: a process
#      that ends tells the peer (its kernel disconnects), a guest that powers off at once may not
# Writes go 16 deep (see rdma-two-hosts.sh: the UDP links drop datagrams at 64 under load).
# Usage (from the checkout, after `cargo build -p peermem-examples --example kv_transfer`):
#   testbed/run2 --nics 2 switch -- testbed/guest/kv-two-hosts.sh -- testbed/guest/kv-two-hosts.sh
set -u
E=target/debug/examples/kv_transfer
out=/tmp/kv.json
# client NAME ARGS...: one client run, its JSON kept in $out and shown.
client() {
  name=$1; shift
  $E client --host "$PEERMEM_PEER_IP" --depth 16 --json --want 128 "$@" >"$out"
  echo "B: $name: $(cat "$out")"
}
# need FILTER NAME: the jq FILTER holds of the client's JSON (an empty output fails: `input`).
need() { jq -e -n "input | ($1)" "$out" >/dev/null || { echo "FAIL: $2: not ($1)" >&2; exit 1; }; }
case ${PEERMEM_HOST:-} in
  A)
    S="$E server --blocks 256 --block-size 65536"
    $S || exit 1
    $S || exit 1
    $S --blocks 512 || exit 1
    $S --fault unregister || exit 1
    $S --fault exit
    sleep 20
    ;;
  B)
    client "two rails"
    need '.verified and .notified' "two rails"
    need '[.rails[] | select(.bytes > 0)] | length == 2' "two rails"
    client "two rails, write" --op write
    need '.op == "write" and .verified and .untouched and .notified' "two rails, write"
    need '[.rails[] | select(.bytes > 0)] | length == 2' "two rails, write"
    client "link down" --want 512 --timeout 120 --fault "link-down=$PEERMEM_NETDEV1"
    need '.verified and .notified' "link down"
    need '[.rails[] | select(.state == "failed")] | length == 1' "link down"
    # The link is up again; rxe's port follows it.
    sleep 3
    client "unregister"
    need '.error | test("refused access")' "unregister"
    client "peer exit"
    need '.error | test("is gone|refused access")' "peer exit"
    need '.seconds < 15' "peer exit"
    echo "B: all five cases ended as they should"
    ;;
  *) echo "run me through testbed/run2 (PEERMEM_HOST is A or B)" >&2; exit 2 ;;
esac
