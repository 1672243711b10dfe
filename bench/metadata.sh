#!/usr/bin/env bash
# Starts a three-node metadata group on loopback, runs `magnetar perf
# metadata` against it, and prints put/get throughput and latency.
#   bench/metadata.sh [extra perf args, e.g. --ops 50000 --concurrency 128]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/magnetar-target}"
scripts/bootstrap
# MAGNETAR_BENCH_PROFILE=dev reuses the test build (dependencies optimised,
# Magnetar's own code at opt-level 1) instead of compiling a release build.
profile="${MAGNETAR_BENCH_PROFILE:-release}"
cargo build --profile "$profile" --locked -p magnetar
case "$profile" in dev) bin="$CARGO_TARGET_DIR/debug/magnetar" ;; *) bin="$CARGO_TARGET_DIR/$profile/magnetar" ;; esac

dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port)
peers="1=127.0.0.1:$p1,2=127.0.0.1:$p2,3=127.0.0.1:$p3"
for id in 1 2 3; do
  eval "p=\$p$id"
  "$bin" meta --id "$id" --listen "127.0.0.1:$p" --data-dir "$dir/n$id" --peers "$peers" \
    >"$dir/n$id.out" 2>"$dir/n$id.log" &
  pids+=($!)
done
for id in 1 2 3; do
  for _ in $(seq 100); do grep -q listening "$dir/n$id.out" && break; sleep 0.1; done
done
echo "three metadata nodes on one machine ($(nproc) cores), each fsyncing its own raft log"
"$bin" perf metadata --meta "127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p3" "$@"
