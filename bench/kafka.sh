#!/usr/bin/env bash
# Kafka throughput on standalone: starts `magnetar standalone` (release
# build) on free loopback ports, then `magnetar-perf kafka` with librdkafka:
# 1 KiB messages, acks=all, one producer and one consumer, a six-partition
# topic. Prints the machine's limits first (cores, and the disk's
# sequential write rate with fdatasync, which bounds acks=all), then the
# perf line. The target is at least 100 MB/s produced.
#   bench/kafka.sh [extra perf args, e.g. --messages 2000000 --compression lz4]
set -euo pipefail
extra=("$@")
source "$(dirname "$0")/common.sh"

disk=$(dd if=/dev/zero of="$dir/dd.test" bs=1M count=1024 conv=fdatasync 2>&1 | tail -1 | sed -E 's/.*, ([0-9.]+ [GMk]?B\/s)$/\1/')
rm -f "$dir/dd.test"
echo "machine: cores=$(nproc) disk_seq_write_fdatasync=\"$disk\""

kafka=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$(port)" \
  --kafka-listen "127.0.0.1:$kafka" --amqp-listen "127.0.0.1:$(port)" --mqtt-listen "127.0.0.1:$(port)" --meta-listen "127.0.0.1:$(port)" \
  --bookie-listen "127.0.0.1:$(port)" >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready

"$perf" kafka --bootstrap "127.0.0.1:$kafka" --topic bench --messages 1000000 --size 1024 \
  ${extra[@]+"${extra[@]}"} 2>"$dir/perf.log"
rss=$(ps -o rss= -p "${pids[0]}" | awk '{printf "%.0f", $1/1024}')
echo "standalone_rss_mb=$rss"
