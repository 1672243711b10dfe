#!/usr/bin/env bash
# The WebSocket API on `magnetar standalone` (release build) with
# `magnetar-perf ws` (tokio-tungstenite, Pulsar's JSON frames):
#   idle    first, on the fresh broker: 10,000 idle subscriber connections
#           (consumers on one shared subscription) held while a small run
#           goes on; prints the broker's resident memory per connection;
#   pubsub  1 producer (1,000 publishes in flight), 1 consumer, 256 B,
#           ROUNDS times (default 3);
#   fanout  1 producer to 20 consumers, each on its own subscription.
# Prints every line, then the medians.
#   [ROUNDS=N] bench/ws.sh [extra perf args, e.g. --size 1024]
set -euo pipefail
extra=("$@")
rounds=${ROUNDS:-3}
source "$(dirname "$0")/common.sh"
ulimit -n "$(ulimit -Hn)"

workload() {
  case "$1" in
    idle) echo --messages 1000 --subscribers 1 --connections 10000 ;;
    pubsub) echo --messages 100000 --subscribers 1 ;;
    fanout) echo --messages 10000 --subscribers 20 ;;
  esac
}
workloads=(idle pubsub fanout)
echo "machine: cores=$(nproc)"

http=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$http" \
  --kafka-listen "127.0.0.1:$(port)" --amqp-listen "127.0.0.1:$(port)" --mqtt-listen "127.0.0.1:$(port)" \
  --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready

for w in "${workloads[@]}"; do
  n=$rounds; [ "$w" = idle ] && n=1
  for r in $(seq "$n"); do
    # shellcheck disable=SC2046
    line=$("$perf" ws --url "ws://127.0.0.1:$http" --topic "bench-$w-$r" --size 256 $(workload "$w") \
      --server-pid "${pids[0]}" ${extra[@]+"${extra[@]}"} 2>"$dir/perf.log") ||
      { tail -n 20 "$dir/perf.log" "$dir/standalone.log"; exit 1; }
    [ "$w" = idle ] && grep idle_connections "$dir/perf.log" || true
    echo "$w: $line"
    echo "$w $line" >>"$dir/results"
  done
done

for w in "${workloads[@]}"; do
  fields=(publish_msgs_per_s deliver_msgs_per_s p50_ms p99_ms)
  [ "$w" = idle ] && fields=(rss_per_conn_kib)
  for f in "${fields[@]}"; do
    echo "median $w $f=$(median "$w" "$f")"
  done
done
