#!/usr/bin/env bash
# AMQP against RabbitMQ, in one run on this machine: `magnetar perf amqp`
# (lapin) against `magnetar standalone` (release build), then the same
# command against Debian's rabbitmq-server started here on loopback.
# Workload: a durable queue (a quorum queue on RabbitMQ, a replicated-ledger
# queue on Magnetar), persistent 1 KiB messages published with confirms,
# four producers and two consumers at once (one lapin connection saturates
# its own core before either broker does). Prints both perf lines and the
# ratios. The target is at least 2x RabbitMQ's confirmed-publish rate.
#   bench/amqp.sh [extra perf args, e.g. --messages 400000 --producers 1 --consumers 1]
set -euo pipefail
extra=("$@")
source "$(dirname "$0")/common.sh"
if ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get install -y -q --no-install-recommends rabbitmq-server >/dev/null
fi

workload=(--messages 200000 --size 1024 --confirm --persistent --queue-type quorum
  --producers 4 --consumers 2 --prefetch 200 ${extra[@]+"${extra[@]}"})
echo "machine: cores=$(nproc)"

amqp=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$(port)" \
  --kafka-listen "127.0.0.1:$(port)" --amqp-listen "127.0.0.1:$amqp" \
  --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready
magnetar_line=$("$bin" perf amqp --url "amqp://127.0.0.1:$amqp/%2f" --queue bench \
  "${workload[@]}" 2>"$dir/perf-magnetar.log") || { tail -n 20 "$dir/perf-magnetar.log" "$dir/standalone.log"; exit 1; }
echo "magnetar: $magnetar_line"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()

# RabbitMQ on loopback, with its own node name, ports and data under $dir.
rmq=$(port)
mkdir -p "$dir/rabbit"
export HOME="$dir/rabbit" ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$(port)
export RABBITMQ_NODENAME="bench$$@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$rmq RABBITMQ_DIST_PORT=$(port)
export RABBITMQ_MNESIA_BASE="$dir/rabbit/mnesia" RABBITMQ_LOG_BASE="$dir/rabbit/log"
export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/rabbit/enabled_plugins" RABBITMQ_CONFIG_FILE="$dir/rabbit/rabbitmq"
echo "[]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\n' "$rmq" >"$dir/rabbit/rabbitmq.conf"
/usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/rabbit.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$rmq") 2>/dev/null && break
  sleep 0.2
done
rabbit_version=$(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo unknown)
rabbit_line=$("$bin" perf amqp --url "amqp://guest:guest@127.0.0.1:$rmq/%2f" --queue bench \
  "${workload[@]}" 2>"$dir/perf-rabbitmq.log") || { tail -n 20 "$dir/perf-rabbitmq.log" "$dir/rabbit.out"; exit 1; }
echo "rabbitmq $rabbit_version: $rabbit_line"
/usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBITMQ_NODENAME" stop >/dev/null 2>&1 || true

field() { sed -E "s/.*$1=([0-9.]+).*/\1/" <<<"$2"; }
ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{a/b:.2f}' if b else 'inf')"; }
echo "ratio publish=$(ratio "$(field publish_msgs_per_s "$magnetar_line")" "$(field publish_msgs_per_s "$rabbit_line")")" \
  "consume=$(ratio "$(field consume_msgs_per_s "$magnetar_line")" "$(field consume_msgs_per_s "$rabbit_line")")"
