#!/usr/bin/env bash
# What TLS costs: one `magnetar standalone` (release build) with the plain
# and the TLS listeners side by side (certificates from `magnetar tls`),
# and the same workloads over each, alternating, ROUNDS times (default 3):
#   - Kafka produce with librdkafka (`magnetar-perf kafka`): 1 KiB
#     messages, acks=all, six partitions, produce alone; plain vs SSL;
#   - AMQP publish with lapin (`magnetar-perf amqp`): persistent 1 KiB
#     messages with confirms to a durable queue, four producers, publish
#     alone; amqp:// vs amqps://.
# Prints every line, then the medians and TLS as a share of plain. The
# target is at least 80% of plain for both.
#   [ROUNDS=N] bench/tls.sh
set -euo pipefail
rounds=${ROUNDS:-3}
source "$(dirname "$0")/common.sh"
echo "machine: cores=$(nproc)"

"$bin" tls create-ca --dir "$dir/pki" >/dev/null
"$bin" tls create-cert --ca-cert "$dir/pki/ca.pem" --ca-key "$dir/pki/ca.key" \
  --cn broker --name server --dir "$dir/pki" >/dev/null
kafka=$(port) kafka_tls=$(port) amqp=$(port) amqps=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$(port)" \
  --kafka-listen "127.0.0.1:$kafka" --kafka-tls-listen "127.0.0.1:$kafka_tls" \
  --amqp-listen "127.0.0.1:$amqp" --amqp-tls-listen "127.0.0.1:$amqps" \
  --mqtt-listen "127.0.0.1:$(port)" --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
  --tls-cert-file "$dir/pki/server.pem" --tls-key-file "$dir/pki/server.key" \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready

kafka_run() { # LABEL BOOTSTRAP ROUND [perf args]
  local label=$1 bootstrap=$2 r=$3 line
  shift 3
  line=$("$perf" kafka --bootstrap "$bootstrap" --topic "kafka-$label-$r" --messages 500000 \
    --size 1024 --consumers 0 "$@" 2>"$dir/perf.log") || { tail -n 20 "$dir/perf.log"; exit 1; }
  echo "kafka-$label $line" | tee -a "$dir/results"
}
amqp_run() { # LABEL URL ROUND [perf args]
  local label=$1 url=$2 r=$3 line
  shift 3
  line=$("$perf" amqp --url "$url" --queue "amqp-$label-$r" --messages 200000 --size 1024 \
    --confirm --persistent --queue-type quorum --producers 4 --consumers 0 "$@" \
    2>"$dir/perf.log") || { tail -n 20 "$dir/perf.log"; exit 1; }
  echo "amqp-$label $line" | tee -a "$dir/results"
}

ssl=(--config security.protocol=SSL --config "ssl.ca.location=$dir/pki/ca.pem")
for r in $(seq "$rounds"); do
  kafka_run plain "127.0.0.1:$kafka" "$r"
  kafka_run tls "127.0.0.1:$kafka_tls" "$r" "${ssl[@]}"
  amqp_run plain "amqp://127.0.0.1:$amqp/%2f" "$r"
  amqp_run tls "amqps://localhost:$amqps/%2f" "$r" --tls-ca-file "$dir/pki/ca.pem"
done

share() { python3 -c "print(f'{100*$2/$1:.0f}%' if $1 else 'n/a')"; }
kp=$(median kafka-plain produce_mb_per_s) kt=$(median kafka-tls produce_mb_per_s)
ap=$(median amqp-plain publish_msgs_per_s) at=$(median amqp-tls publish_msgs_per_s)
echo "median: kafka_produce_mb_per_s plain=$kp tls=$kt tls_share=$(share "$kp" "$kt")"
echo "median: amqp_publish_msgs_per_s plain=$ap tls=$at tls_share=$(share "$ap" "$at")"
