#!/bin/sh
# testbed/guest/rdma-two-hosts.sh: examples/rdma_to_gpu (the transfer engine, connected by
# address with its metadata read over rdma_cm) across the two guests of testbed/run2, then its
# faults; host A ($PEERMEM_HOST=A) serves, host B drives. Each case must end the way it
# says (exit status and the typed error's words), in bounded time:
#   1. the pattern written from B lands in A's GPU buffer, every byte checked on A
#   2. B asks for an address nobody has: "unreachable" (exit 2)
#   3. A refuses the connection: B reports "refused it" (exit 2)
#   4. A unregisters its buffer once B's first batch landed: B's next batch fails "remote access
#      error" (exit 2); A sees nothing land after the unregister
#   5. B exits halfway through its batches (exit 3): A reports "disconnected" (exit 2)
# Writes go 16 deep: at 64 deep the UDP link between the guests drops datagrams when the host is
# loaded, and rxe's responder has been seen to answer a retransmitted write's middle packets with
# "remote invalid request" (seen once at load average ~15); testbed/rdma-cross-bench measures 64.
# Usage (from the checkout, after `cargo build -p peermem-examples --example rdma_to_gpu`):
#   testbed/run2 switch -- testbed/guest/rdma-two-hosts.sh -- testbed/guest/rdma-two-hosts.sh
set -u
E=target/debug/examples/rdma_to_gpu
T="--timeout 120"
SIZE="--size 4194304"
err=/tmp/rdma-two-hosts.err
# expect CODE WORDS CMD...: run CMD, show its stderr, require exit CODE and WORDS in stderr.
expect() {
  code=$1 words=$2; shift 2
  "$@" 2>"$err"; rc=$?
  cat "$err" >&2
  [ "$rc" = "$code" ] || { echo "FAIL: exit $rc, expected $code: $*" >&2; exit 1; }
  grep -q "$words" "$err" || { echo "FAIL: no '$words' in the errors of: $*" >&2; exit 1; }
  echo "ok: $* -> exit $rc, '$words'"
}
case ${PEERMEM_HOST:-} in
  A)
    $E server $SIZE $T || exit 1
    $E server --port 19876 --fault reject $T || exit 1
    $E server --port 19877 --fault unregister $SIZE $T || exit 1
    expect 2 "disconnected" $E server --port 19878 $SIZE $T
    ;;
  B)
    P=$PEERMEM_PEER_IP
    $E client --host "$P" --iters 2 --depth 16 $T || exit 1
    expect 2 "unreachable" $E client --host 10.77.0.99 --timeout 5
    expect 2 "refused it" $E client --host "$P" --port 19876 $T
    expect 2 "remote access error" $E client --host "$P" --port 19877 --iters 8 --depth 16 $T
    $E client --host "$P" --port 19878 --iters 8 --depth 16 --fault exit-mid $T
    rc=$?; [ $rc = 3 ] || { echo "FAIL: the exit-mid client exited $rc, expected 3" >&2; exit 1; }
    ;;
  *) echo "run me through testbed/run2 (PEERMEM_HOST is A or B)" >&2; exit 2 ;;
esac
echo "rdma-two-hosts: host $PEERMEM_HOST passed"
