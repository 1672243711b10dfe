#!/usr/bin/env bash
# Starts a three-node metadata group on loopback, runs `magnetar-perf
# metadata` against it, and prints put/get throughput and latency.
#   bench/metadata.sh [extra perf args, e.g. --ops 50000 --concurrency 128]
set -euo pipefail
source "$(dirname "$0")/common.sh"
p1=$(port); p2=$(port); p3=$(port)
peers="1=127.0.0.1:$p1,2=127.0.0.1:$p2,3=127.0.0.1:$p3"
for id in 1 2 3; do
  eval "p=\$p$id"
  "$bin" meta --id "$id" --listen "127.0.0.1:$p" --data-dir "$dir/n$id" --peers "$peers" \
    >"$dir/n$id.out" 2>"$dir/n$id.log" &
  pids+=($!)
done
for id in 1 2 3; do wait_line "$dir/n$id.out" listening; done
echo "three metadata nodes on one machine ($(nproc) cores), each fsyncing its own raft log"
"$perf" metadata --meta "127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p3" "$@"
