#!/usr/bin/env bash
# Geo-replication between two regions on loopback: two `magnetar
# standalone` (release build), `east` and `west`, east reaching west through
# `magnetar-perf proxy` (which adds a round trip). `magnetar-perf geo`
# writes 1 KiB records in east at a fixed rate and reads them in west,
# timing each from when it was meant to be sent:
#   - lag p50/p99/p99.9 with librdkafka at 1k, 10k and 50k records/s, with
#     0 and 50 ms of round trip;
#   - the same east -> east with replication off for the topic (the
#     baseline), and the publish p99 with replication on against it;
#   - catch-up: a backlog of 1M records built while the link is down,
#     then the rate it drains at (MB/s);
#   - the peers at the same rates, in the same run: MQTT across two
#     Mosquitto brokers with a bridge, and AMQP across two RabbitMQ nodes
#     with exchange federation, against Magnetar's MQTT and AMQP across
#     its two regions.
# Every line counts what was lost and doubled; both must be 0.
#   bench/geo.sh [--seconds N]
set -euo pipefail
seconds=10
[ "${1:-}" = "--seconds" ] && seconds=$2
source "$(dirname "$0")/common.sh"
echo "machine: cores=$(nproc)"

start_region() { # NAME -> sets ${NAME}_http ${NAME}_kafka ${NAME}_amqp ${NAME}_mqtt
  local name=$1 http kafka amqp mqtt
  http=$(port); kafka=$(port); amqp=$(port); mqtt=$(port)
  "$bin" standalone --cluster "$name" --data-dir "$dir/$name" --http-listen "127.0.0.1:$http" \
    --kafka-listen "127.0.0.1:$kafka" --amqp-listen "127.0.0.1:$amqp" --mqtt-listen "127.0.0.1:$mqtt" \
    --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
    --kafka-namespace geo/ns --geo-rescan-ms 1000 --geo-backoff-max-ms 1000 \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  pids+=($!)
  wait_line "$dir/$name.out" ready
  eval "${name}_http=http://127.0.0.1:$http ${name}_kafka=127.0.0.1:$kafka ${name}_amqp=$amqp ${name}_mqtt=$mqtt"
}
api() { curl -sf -X "$2" -H 'Content-Type: application/json' ${4:+-d "$4"} "$1$3" >/dev/null; }
stat() { curl -sf "$1/admin/v2/persistent/geo/ns/$2/partitioned-stats"; }

start_region east
start_region west
proxy_port=$(port)
start_proxy() {
  "$perf" proxy --listen "127.0.0.1:$proxy_port" --target "${west_http#http://}" --rtt-ms "$1" \
    >"$dir/proxy.out" 2>&1 &
  proxy_pid=$!
  pids+=($proxy_pid)
  wait_line "$dir/proxy.out" ready
}
stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }
start_proxy 0
api "$east_http" PUT /admin/v2/clusters/west "{\"serviceUrl\":\"http://127.0.0.1:$proxy_port\"}"
api "$west_http" PUT /admin/v2/clusters/east "{\"serviceUrl\":\"$east_http\"}"
for r in "$east_http" "$west_http"; do
  api "$r" PUT /admin/v2/tenants/geo '{"allowedClusters":["east","west"]}'
  api "$r" PUT /admin/v2/namespaces/geo/ns '{}'
  api "$r" POST /admin/v2/namespaces/geo/ns/replication '["east","west"]'
  api "$r" POST /admin/v2/tenants/public '{"allowedClusters":["east","west"]}'
  api "$r" POST /admin/v2/namespaces/public/default/replication '["east","west"]'
done
topic() { # NAME -> a 6-partition topic in both regions
  for r in "$east_http" "$west_http"; do api "$r" PUT "/admin/v2/persistent/geo/ns/$1/partitions" 6; done
}
geo() { "$perf" geo --seconds "$seconds" "$@" 2>>"$dir/perf.log" | tee -a "$dir/results"; }

# Baseline: replication off for the topic, read where it is written.
api "$east_http" PUT /admin/v2/persistent/geo/ns/local/partitions 6
api "$east_http" POST /admin/v2/persistent/geo/ns/local/replication '["east"]'
sleep 2
geo --protocol kafka --produce "$east_kafka" --consume "$east_kafka" --topic local --rate 10000 --label "rtt_ms=0 baseline=east->east"

for rtt in 0 50; do
  stop_proxy; start_proxy "$rtt"
  for rate in 1000 10000 50000; do
    topic "lag-$rtt-$rate"; sleep 1
    geo --protocol kafka --produce "$east_kafka" --consume "$west_kafka" --topic "lag-$rtt-$rate" --rate "$rate" --label "rtt_ms=$rtt"
  done
done
stop_proxy; start_proxy 0
off=$(grep "baseline=east->east" "$dir/results" | sed -E 's/.*publish_p99_ms=([0-9.]+).*/\1/')
on=$(grep "rtt_ms=0 rate=10000 " "$dir/results" | sed -E 's/.*publish_p99_ms=([0-9.]+).*/\1/')
echo "geo overhead publish_p99_ms_replication_off=$off publish_p99_ms_replication_on=$on publish_p99_overhead_pct=$(python3 -c "print(round(($on/$off - 1) * 100, 1))")" | tee -a "$dir/results"

# Catch-up: 1M records while the link is down, then the drain.
topic catchup; sleep 1
stop_proxy
"$perf" kafka --bootstrap "$east_kafka" --topic catchup --messages 1000000 --size 1024 --consumers 0 \
  >"$dir/catchup-produce.out" 2>>"$dir/perf.log"
start=$(date +%s.%N)
start_proxy 0
while :; do
  backlog=$(stat "$east_http" catchup | python3 -c 'import json,sys; print(json.load(sys.stdin).get("replication",{}).get("west",{}).get("replicationBacklog",-1))')
  [ "$backlog" = 0 ] && break
  sleep 0.5
done
took=$(python3 -c "import time; print(time.time() - $start)")
west_in=$(stat "$west_http" catchup | python3 -c 'import json,sys; print(json.load(sys.stdin)["msgInCounter"])')
bytes=$(stat "$east_http" catchup | python3 -c 'import json,sys; print(json.load(sys.stdin)["storageSize"])')
echo "geo catchup records=1000000 west_holds=$west_in seconds=$(printf %.1f "$took") catchup_mb_per_s=$(python3 -c "print(round($bytes/1048576/$took, 1))")" | tee -a "$dir/results"

# Magnetar's MQTT and AMQP across its regions, then the peers.
for rate in 1000 10000; do
  geo --protocol mqtt --produce "mqtt://127.0.0.1:$east_mqtt" --consume "mqtt://127.0.0.1:$west_mqtt" --topic "geo/lag/$rate" --rate "$rate" --label "peer=magnetar"
  geo --protocol amqp --produce "amqp://127.0.0.1:$east_amqp/%2f" --consume "amqp://127.0.0.1:$west_amqp/%2f" --exchange geo.fed --topic "geo.lag.$rate" --rate "$rate" --label "peer=magnetar"
done

# Two Mosquitto brokers, A bridging geo/# out to B.
if command -v mosquitto >/dev/null; then
  ma=$(port); mb=$(port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mb" >"$dir/mosq-b.conf"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nconnection west\naddress 127.0.0.1:%s\ntopic geo/# out 1\n' "$ma" "$mb" >"$dir/mosq-a.conf"
  mosquitto -c "$dir/mosq-b.conf" >"$dir/mosq-b.log" 2>&1 & pids+=($!)
  sleep 0.5
  mosquitto -c "$dir/mosq-a.conf" >"$dir/mosq-a.log" 2>&1 & pids+=($!)
  sleep 1.5
  for rate in 1000 10000; do
    geo --protocol mqtt --produce "mqtt://127.0.0.1:$ma" --consume "mqtt://127.0.0.1:$mb" --topic "geo/lag/$rate" --rate "$rate" --label "peer=mosquitto-bridge"
  done
fi

# Two RabbitMQ nodes, B federating exchange geo.fed from A.
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$(port)
  rabbit() { # NAME PORT
    mkdir -p "$dir/$1"
    printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\n' "$2" >"$dir/$1/rabbitmq.conf"
    echo "[rabbitmq_federation]." >"$dir/$1/enabled_plugins"
    HOME="$dir/$1" RABBITMQ_NODENAME="$1$$@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT=$2 RABBITMQ_DIST_PORT=$(port) RABBITMQ_MNESIA_BASE="$dir/$1/mnesia" \
      RABBITMQ_LOG_BASE="$dir/$1/log" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/$1/enabled_plugins" \
      RABBITMQ_CONFIG_FILE="$dir/$1/rabbitmq" /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/$1.out" 2>&1 &
    pids+=($!)
    for _ in $(seq 120); do grep -q "completed with" "$dir/$1.out" 2>/dev/null && return 0; sleep 0.5; done
    echo "rabbitmq $1 did not start" >&2; return 1
  }
  ra=$(port); rb=$(port)
  rabbit ra "$ra" && rabbit rb "$rb"
  ctl() { HOME="$dir/rb" /usr/lib/rabbitmq/bin/rabbitmqctl -n "rb$$@localhost" "$@" >/dev/null; }
  ctl set_parameter federation-upstream east "{\"uri\":\"amqp://127.0.0.1:$ra\",\"ack-mode\":\"on-confirm\",\"max-hops\":1}"
  ctl set_policy fed '^geo\.fed$' '{"federation-upstream-set":"all"}' --apply-to exchanges
  for rate in 1000 10000; do
    geo --protocol amqp --produce "amqp://127.0.0.1:$ra/%2f" --consume "amqp://127.0.0.1:$rb/%2f" --exchange geo.fed --topic "geo.lag.$rate" --rate "$rate" --label "peer=rabbitmq-federation"
  done
  for n in ra rb; do HOME="$dir/$n" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$n$$@localhost" stop >/dev/null 2>&1 || true; done
fi

east_rss=$(ps -o rss= -p "${pids[0]}" | awk '{printf "%.0f", $1/1024}')
echo "east_rss_mb=$east_rss"
