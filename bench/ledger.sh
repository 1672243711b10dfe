#!/usr/bin/env bash
# Starts one metadata node and three bookies on loopback, measures this
# machine's own fsync rate, and runs `magnetar-perf ledger` with 1 KiB
# entries: at E=Qw=Qa=1 and at 3/3/2 with 10,000 adds in flight
# (throughput), and at 3/3/2 with 100 in flight (latency).
#   bench/ledger.sh [extra perf args, e.g. --rate 50000]
#   MAGNETAR_BENCH_ENTRIES=500000 bench/ledger.sh
set -euo pipefail
extra=("$@")
source "$(dirname "$0")/common.sh"

# The disk's own rate of 4 KiB writes each followed by a sync, the ceiling
# for a journal that fsyncs every entry.
n=2000
start=$(date +%s.%N)
dd if=/dev/zero of="$dir/fsync-probe" bs=4k count=$n oflag=dsync status=none
end=$(date +%s.%N)
fsync_per_s=$(python3 -c "print(round($n/($end-$start)))")
echo "machine fsync_per_s=$fsync_per_s (dd bs=4k oflag=dsync, $(nproc) cores)"
rm -f "$dir/fsync-probe"

mp=$(port)
"$bin" meta --id 1 --listen "127.0.0.1:$mp" --data-dir "$dir/meta" >"$dir/meta.out" 2>"$dir/meta.log" &
pids+=($!)
wait_line "$dir/meta.out" listening
for id in 1 2 3; do
  "$bin" bookie --id "$id" --listen "127.0.0.1:$(port)" --data-dir "$dir/bookie-$id" \
    --meta "127.0.0.1:$mp" >"$dir/bookie-$id.out" 2>"$dir/bookie-$id.log" &
  pids+=($!)
done
for id in 1 2 3; do wait_line "$dir/bookie-$id.out" listening; done
sleep 1

entries="${MAGNETAR_BENCH_ENTRIES:-200000}"
for q in "1 1 1 10000 $entries" "3 3 2 10000 $entries" "3 3 2 100 $((entries / 10))"; do
  read -r e qw qa window n <<<"$q"
  echo "perf ledger E=$e Qw=$qw Qa=$qa, 1 KiB entries, $window in flight"
  "$perf" ledger --meta "127.0.0.1:$mp" --ensemble "$e" --write-quorum "$qw" --ack-quorum "$qa" \
    --entry-size 1024 --entries "$n" --max-in-flight "$window" ${extra[@]+"${extra[@]}"}
done
