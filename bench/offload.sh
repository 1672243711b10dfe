#!/usr/bin/env bash
# Tiered storage with `magnetar-perf offload` (an embedded standalone in one
# process): 256 MiB of 1 KiB messages in 32 MiB ledgers, read back from the
# bookies (hot), offloaded, dropped from the bookies and read back from the
# object store (cold); then a tail reader's latency at 500 msg/s, 10 s per
# phase: a warm-up (while the bookie flushes the burst), alone, and while a
# catch-up reader scans the topic from the bookies and then from the store.
# Runs ROUNDS times (default 3) per store:
#   file  the local filesystem (standalone's default store);
#   s3    moto_server from the test venv, over HTTP on loopback: the S3
#         protocol end to end, though moto (Python) is far slower than S3
#         or MinIO, so its cold figure is a floor.
# Prints every line, then the medians of the summary lines.
#   [ROUNDS=N] [STORES="file s3"] bench/offload.sh [extra perf args, e.g. --mb 1024]
set -euo pipefail
extra=("$@")
source "$(dirname "$0")/common.sh"
venv="${MAGNETAR_VENV:-$HOME/.cache/magnetar-venv}"
rounds=${ROUNDS:-3}
stores=(${STORES:-file s3})
echo "machine: cores=$(nproc)"

for store in "${stores[@]}"; do
  args=()
  if [ "$store" = s3 ]; then
    p=$(port)
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$p" >"$dir/moto.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
      "$venv/bin/python" - "$p" <<'EOF' 2>/dev/null && break
import sys, boto3
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
             aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="offload")
EOF
      sleep 0.2
    done
    args+=(--offload-url s3://offload/bench
      --offload-option "endpoint=http://127.0.0.1:$p,region=us-east-1,access_key_id=bench,secret_access_key=bench")
  fi
  for r in $(seq "$rounds"); do
    echo "== store: $store, round $r"
    rm -rf "$dir/data"
    "$perf" offload --data-dir "$dir/data" ${args[@]+"${args[@]}"} ${extra[@]+"${extra[@]}"} \
      2>"$dir/perf.log" | tee "$dir/out" || { tail -20 "$dir/perf.log" >&2; exit 1; }
    echo "$store $(tail -1 "$dir/out")" >>"$dir/results"
  done
done

for store in "${stores[@]}"; do
  for f in hot_read_mb_per_s cold_read_mb_per_s tail_p99_ms tail_p99_ms_during_hot_catchup \
    tail_p99_ms_during_cold_catchup; do
    echo "median $store $f=$(median "$store" "$f")"
  done
done
