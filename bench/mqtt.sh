#!/usr/bin/env bash
# MQTT against Mosquitto, in one run on this machine: `magnetar-perf mqtt`
# (rumqttc, MQTT 3.1.1) against `magnetar standalone` (release build), then
# the same commands against Debian's mosquitto started here on loopback
# (in memory, its default; queues unbounded so that neither broker drops).
# Workloads, per broker:
#   idle    first, once, on the fresh broker (memory freed by earlier runs
#           would hide what connections take): 10,000 idle connections
#           held while a small QoS 1 run goes on; prints the broker's
#           resident memory per connection;
# then each ROUNDS times (default 3):
#   qos0    1 publisher, 1 subscriber, QoS 0, 256 B;
#   qos1    4 publishers, 1 subscriber, QoS 1, 256 B; Magnetar acknowledges
#           a publish once the subscriber's durable queue has it on the
#           bookie quorum;
#   fanout  1 publisher to 100 subscribers, QoS 1;
#   sublat  2,000 SUBSCRIBEs to new filters at QoS 1, one at a time on one
#           connection, SUBSCRIBE to SUBACK (each unsubscribed again).
# Prints every line, then the medians and the ratios magnetar/mosquitto.
# The target: QoS 1 publish throughput at least Mosquitto's, and at most
# 16 KiB per idle connection.
#   [ROUNDS=N] bench/mqtt.sh [extra perf args, e.g. --size 1024]
set -euo pipefail
extra=("$@")
rounds=${ROUNDS:-3}
source "$(dirname "$0")/common.sh"
# Both brokers and the load generator hold 10,000 sockets each.
ulimit -n "$(ulimit -Hn)"

workload() {
  case "$1" in
    qos0) echo --qos 0 --messages 200000 --size 256 --publishers 1 --subscribers 1 ;;
    qos1) echo --qos 1 --messages 200000 --size 256 --publishers 4 --subscribers 1 ;;
    fanout) echo --qos 1 --messages 5000 --size 256 --publishers 1 --subscribers 100 ;;
    idle) echo --qos 1 --messages 1000 --size 256 --publishers 1 --subscribers 1 --connections 10000 ;;
    sublat) echo --qos 1 --subscribe-latency 2000 ;;
  esac
}
workloads=(idle qos0 qos1 fanout sublat)
echo "machine: cores=$(nproc)"

# Every workload ROUNDS times against one broker; lines go to $dir/LABEL.
#   run_all LABEL URL BROKER_PID BROKER_LOG
run_all() {
  local label=$1 url=$2 pid=$3 log=$4 w r n line
  for w in "${workloads[@]}"; do
    n=$rounds; [ "$w" = idle ] && n=1
    for r in $(seq "$n"); do
      # shellcheck disable=SC2046
      line=$("$perf" mqtt --url "$url" --topic "bench/$w/$r" $(workload "$w") \
        --server-pid "$pid" ${extra[@]+"${extra[@]}"} 2>"$dir/perf.log") ||
        { tail -n 20 "$dir/perf.log" "$log"; exit 1; }
      echo "$label $w: $line"
      echo "$w $line" >>"$dir/$label"
    done
  done
}

mqtt=$(port)
# The default connection budget is a sixth of the open-files limit per
# listener (3,162 at 20,000); the idle workload holds 10,000 on MQTT alone.
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$(port)" \
  --kafka-listen "127.0.0.1:$(port)" --amqp-listen "127.0.0.1:$(port)" --mqtt-listen "127.0.0.1:$mqtt" \
  --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" --max-connections 12000 \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready
run_all magnetar "mqtt://127.0.0.1:$mqtt" "${pids[0]}" "$dir/standalone.log"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()

mosq=$(port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$mosq" >"$dir/mosquitto.conf"
/usr/sbin/mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$mosq") 2>/dev/null && break
  sleep 0.1
done
mosquitto_version=$(dpkg-query -W -f='${Version}' mosquitto 2>/dev/null || echo unknown)
echo "mosquitto: $mosquitto_version"
run_all mosquitto "mqtt://127.0.0.1:$mosq" "${pids[0]}" "$dir/mosquitto.log"

# The median of one field over one workload's lines of a broker.
median() {
  grep "^$2 " "$dir/$1" | sed -E "s/.*$3=(-?[0-9.]+|n\/a).*/\1/" | grep -v n/a | sort -g |
    python3 -c 'import sys; v=[float(x) for x in sys.stdin]; print(v[len(v)//2] if v else "n/a")'
}
ratio() { python3 -c "a,b='$1','$2'; print('n/a' if 'n/a' in (a,b) else (f'{float(a)/float(b):.2f}' if float(b) else 'inf'))"; }
for w in "${workloads[@]}"; do
  fields=(publish_msgs_per_s deliver_msgs_per_s p50_ms p99_ms)
  [ "$w" = idle ] && fields=(rss_per_conn_kib)
  [ "$w" = sublat ] && fields=(subscribe_p50_ms subscribe_p99_ms)
  for f in "${fields[@]}"; do
    m=$(median magnetar "$w" "$f"); q=$(median mosquitto "$w" "$f")
    echo "median $w $f magnetar=$m mosquitto=$q ratio=$(ratio "$m" "$q")"
  done
done
