#!/bin/sh
# testbed/guest/engines-side-by-side.sh: peermem's transfer engine (examples/kv_transfer), NIXL
# (UCX backend) and Mooncake's Transfer Engine (protocol rdma, P2PHANDSHAKE metadata; once with
# its own NIC discovery, once with `peermem export --mooncake-topo`) moving the same bytes across
# the two guests of `testbed/run2 --nics 2`, rounds alternating engine by engine in one boot.
# Host A serves, host B reads (kv_transfer's workloads, every byte checked), M MiB each
# (PEERMEM_ENGINE_MIB, default 64):
#   one      one M MiB block (out of a 2M MiB buffer)
#   blocks   4M blocks of 256 KiB scattered among 8M slots of a 2M MiB buffer (M = 64: 256 blocks)
# Each phase starts with one small untimed transfer per engine (warmup), and each round starts
# with another engine (round 1 with peermem, round 2 with NIXL, ...): the first transfers of a
# boot are the slowest, whichever engine runs them.
# Phase 1, one rail: rxe1 is deleted on both hosts, so every engine (and peermem's export) sees
# rxe0 only. Phase 2, two rails: rxe1 is added back. Before phase 2's rounds, one small Mooncake
# run without MC_ENABLE_DEST_DEVICE_AFFINITY shows what its default pairing does on two links.
# Each of B's runs prints one line:
#   RESULT rails=R round=I workload=W engine=E rc=RC pkts=rxe0:N/R,rxe1:M/S {client's JSON}
# (pkts: packets each of B's NICs received during the run, so how each engine spread its reads,
# and the retries it counted, so how often the link lost packets under that engine's load).
# Control channels and metadata: TCP on link 1 (PEERMEM_PEER_IP), a fresh port per run.
# Needs (host side, see bench/engines/run): target/release/{peermem,examples/kv_transfer} and
# the venv of bench/engines/install ($PEERMEM_ENGINES_VENV). PEERMEM_ENGINE_ROUNDS (default 3),
# PEERMEM_ENGINE_PHASES (default "1 2": which phases run).
set -u
ROUNDS=${PEERMEM_ENGINE_ROUNDS:-3}
MIB=${PEERMEM_ENGINE_MIB:-64}
PHASES=${PEERMEM_ENGINE_PHASES:-1 2}
V=${PEERMEM_ENGINES_VENV:?bench/engines/run sets PEERMEM_ENGINES_VENV}
PY=$V/bin/python
KV=target/release/examples/kv_transfer
PM=target/release/peermem
E=bench/engines
LOGS=/tmp/engines
mkdir -p "$LOGS"
W_one="--blocks 1 --block-size $((MIB << 20)) --want 1"
W_blocks="--blocks $((MIB * 8)) --block-size 262144 --want $((MIB * 4))"
W_probe="--blocks 64 --block-size 65536 --want 32"
W_warmup=$W_probe
# NIXL: its wheel's libibverbs finds Debian's rxe provider through the venv's link (see
# bench/engines/install); UCX needs its `ib` module (rc_verbs, ud_verbs) for rxe, and its EFA
# module is left out (it crashes the process at exit on a machine with libefa).
NIXL_ENV="LD_LIBRARY_PATH=$V/nixl-verbs:/usr/lib/x86_64-linux-gnu/libibverbs UCX_MODULES=^efa"
# Mooncake: GID 1 is each rxe's IPv4 (RoCE v2) GID; with two NICs on two separate links a remote
# NIC is reachable only from the local NIC of the same name (MC_ENABLE_DEST_DEVICE_AFFINITY).
MC_ENV="MC_GID_INDEX=1 MC_TRANSFER_TIMEOUT=240 MC_ENABLE_DEST_DEVICE_AFFINITY=1"
port=18800

# counters: each rxe's packets received, and its retries (a request that timed out, or a
# sequence error NAKed by the peer: the link lost packets), so far.
counters() {
  for d in rxe0 rxe1; do
    c=/sys/class/infiniband/$d/ports/1/hw_counters
    printf '%s:%s:%s ' "$d" "$(cat $c/rcvd_pkts 2>/dev/null || echo 0)" \
      "$(($(cat $c/completer_retry_err 2>/dev/null || echo 0) + $(cat $c/rcvd_seq_err 2>/dev/null || echo 0)))"
  done
}

# delta BEFORE AFTER: "rxe0:PKTS/RETRIES,rxe1:PKTS/RETRIES" between two counters readings (a NIC
# deleted or added between them counts from zero).
delta() {
  python3 -c 'import sys
b = {x.split(":")[0]: x.split(":")[1:] for x in sys.argv[1].split()}
a = {x.split(":")[0]: x.split(":")[1:] for x in sys.argv[2].split()}
d = lambda k, i: int(a[k][i]) - int(b.get(k, ["0", "0"])[i])
print(",".join(f"{k}:{d(k, 0)}/{d(k, 1)}" for k in sorted(a)))' "$1" "$2"
}

# one RAILS ROUND WORKLOAD ENGINE [ENV...]: one transfer, A serving, B reading.
one() {
  rails=$1 round=$2 wl=$3 engine=$4
  shift 4
  port=$((port + 1))
  eval "W=\$W_$wl"
  peer="--host $PEERMEM_PEER_IP --port $port"
  case $engine in
    peermem) env=""; cmd="$KV"; srv="server $W --port $port --timeout 240"
      cli="client $peer $W --timeout 240 --json" ;;
    nixl) env=$NIXL_ENV; cmd="$PY $E/nixl_bench.py"; srv="server --port $port $W"; cli="client $peer $W" ;;
    mooncake*) env=$MC_ENV; cmd="$PY $E/mooncake_bench.py"; srv="server --port $port $W"; cli="client $peer $W"
      [ "$engine" = mooncake-topo ] && { srv="$srv --topo $TOPO"; cli="$cli --topo $TOPO"; } ;;
  esac
  [ $# -gt 0 ] && env="$*"
  log=$LOGS/$rails-$round-$wl-$engine.$PEERMEM_HOST
  if [ "$PEERMEM_HOST" = A ]; then
    # shellcheck disable=SC2086
    env $env timeout 400 $cmd $srv >"$log" 2>&1 || { echo "A: $engine server exit $?"; tail -n 15 "$log"; }
    return 0
  fi
  before=$(counters)
  # shellcheck disable=SC2086
  env $env timeout 400 $cmd $cli >"$log" 2>&1
  rc=$?
  json=$(grep '^{' "$log" | tail -n 1)
  echo "RESULT rails=$rails round=$round workload=$wl engine=$engine rc=$rc pkts=$(delta "$before" "$(counters)") ${json:-{\}}"
  [ $rc -eq 0 ] || grep -E '^[EF][0-9]|rror|ailed' "$log" | tail -n 15
}

ENGINES="peermem nixl mooncake mooncake-topo"

# rotated K: the engines, starting with the K-th (modulo their number), so that no engine
# always runs first.
rotated() {
  # shellcheck disable=SC2086
  set -- $1 $ENGINES
  k=$(($1 % ($# - 1))) head="" tail=""
  n=0
  for e in $ENGINES; do
    if [ $n -lt $k ]; then tail="$tail $e"; else head="$head $e"; fi
    n=$((n + 1))
  done
  echo $head $tail
}

# phase RAILS: the topology file, one untimed small transfer per engine (the first runs of a
# boot pay for code and memory the emulator meets for the first time), then the rounds, each
# starting with another engine.
phase() {
  TOPO=/tmp/mooncake-topo-$1.json
  $PM export --mooncake-topo "$TOPO" >/dev/null 2>&1 || { echo "$PEERMEM_HOST: export --mooncake-topo failed"; exit 1; }
  echo "TOPO rails=$1 host=$PEERMEM_HOST $(tr -d ' \n' <"$TOPO")"
  for engine in $ENGINES; do
    one "$1" 0 warmup "$engine"
  done
  for i in $(seq "$ROUNDS"); do
    for wl in one blocks; do
      for engine in $(rotated $((i - 1))); do
        one "$1" "$i" "$wl" "$engine"
      done
    done
  done
}

# wait_active NIC: bounded wait for its port to come up.
wait_active() {
  for _ in $(seq 60); do
    grep -q ACTIVE "/sys/class/infiniband/$1/ports/1/state" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "$PEERMEM_HOST: $1 did not come up"; exit 1
}

case ${PEERMEM_HOST:-} in A | B) ;; *) echo "run me through testbed/run2 --nics 2 (bench/engines/run)" >&2; exit 2 ;; esac
[ -x "$PY" ] && [ -x "$KV" ] && [ -x "$PM" ] || { echo "missing $PY, $KV or $PM (bench/engines/run builds them)" >&2; exit 2; }
case " $PHASES " in *" 1 "*)
  rdma link delete rxe1 || exit 1
  phase 1
  rdma link add rxe1 type rxe netdev "$PEERMEM_NETDEV1" || exit 1
  wait_active rxe1 ;;
esac
case " $PHASES " in *" 2 "*)
  one 2 0 probe mooncake MC_GID_INDEX=1
  phase 2 ;;
esac
echo "$PEERMEM_HOST: done"
