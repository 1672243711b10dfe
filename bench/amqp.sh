#!/usr/bin/env bash
# AMQP against RabbitMQ, in one run on this machine: `magnetar-perf amqp`
# (lapin) against `magnetar standalone` (release build), then the same
# command against Debian's rabbitmq-server started here on loopback.
# Workload: a durable queue (a quorum queue on RabbitMQ, a replicated-ledger
# queue on Magnetar), persistent 1 KiB messages published with confirms,
# four producers and two consumers at once (one lapin connection saturates
# its own core before either broker does). Prints both perf lines and the
# ratios. The target is at least 2x RabbitMQ's confirmed-publish rate.
# Both share two cores with the load generator, so single runs vary by a
# fifth; each broker gets ROUNDS runs (default 3) on a fresh queue, every
# line is printed, and the ratios compare the medians.
#   [ROUNDS=N] bench/amqp.sh [extra perf args, e.g. --messages 400000 --producers 1 --consumers 1]
set -euo pipefail
extra=("$@")
rounds=${ROUNDS:-3}
source "$(dirname "$0")/common.sh"
if ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get install -y -q --no-install-recommends rabbitmq-server >/dev/null
fi

workload=(--messages 200000 --size 1024 --confirm --persistent --queue-type quorum
  --producers 4 --consumers 2 --prefetch 200 ${extra[@]+"${extra[@]}"})
echo "machine: cores=$(nproc)"

# CPU seconds (user+system) a process and its threads have used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/hz}' "/proc/$1/stat"; }
# Broker CPU per 1,000 messages over a run: what the broker itself costs,
# apart from the load generator it shares the cores with.
cpu_per_k() { python3 -c "print(f'{($2-$1)*1000*1000/$3:.1f}')"; }
msgs=$(python3 - "${workload[@]}" <<'PY'
import sys
a = sys.argv[1:]
print([a[i + 1] for i in range(len(a) - 1) if a[i] == "--messages"][-1])
PY
)
# ROUNDS runs of the workload against one broker: prints each line with the
# broker's CPU per 1,000 messages and leaves them in `lines`.
#   run_rounds LABEL URL BROKER_PID BROKER_LOG
run_rounds() {
  local label=$1 url=$2 pid=$3 log=$4 r before line
  lines=()
  for r in $(seq "$rounds"); do
    before=$(cpu_s "$pid")
    line=$("$perf" amqp --url "$url" --queue "bench$r" "${workload[@]}" 2>"$dir/perf.log") ||
      { tail -n 20 "$dir/perf.log" "$log"; exit 1; }
    line="$line broker_cpu_ms_per_1k=$(cpu_per_k "$before" "$(cpu_s "$pid")" "$msgs")"
    echo "$label: $line"
    lines+=("$line")
  done
}

amqp=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$(port)" \
  --kafka-listen "127.0.0.1:$(port)" --amqp-listen "127.0.0.1:$amqp" --mqtt-listen "127.0.0.1:$(port)" \
  --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready
run_rounds magnetar "amqp://127.0.0.1:$amqp/%2f" "${pids[0]}" "$dir/standalone.log"
magnetar_lines=("${lines[@]}")
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
beam=$(pgrep -f "beam.smp.*$dir" | head -n1)
run_rounds "rabbitmq $rabbit_version" "amqp://guest:guest@127.0.0.1:$rmq/%2f" "$beam" "$dir/rabbit.out"
rabbit_lines=("${lines[@]}")
/usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBITMQ_NODENAME" stop >/dev/null 2>&1 || true
/usr/lib/erlang/bin/epmd -port "$ERL_EPMD_PORT" -kill >/dev/null 2>&1 || true

# The median of one field over perf lines.
median() {
  local f=$1; shift
  printf '%s\n' "$@" | sed -E "s/.*$f=([0-9.]+).*/\1/" | sort -g |
    python3 -c 'import sys; v=[float(x) for x in sys.stdin]; print(v[len(v)//2])'
}
ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{a/b:.2f}' if b else 'inf')"; }
for f in publish_msgs_per_s consume_msgs_per_s broker_cpu_ms_per_1k; do
  m=$(median $f "${magnetar_lines[@]}"); r=$(median $f "${rabbit_lines[@]}")
  echo "median $f magnetar=$m rabbitmq=$r ratio=$(ratio "$m" "$r")"
done
