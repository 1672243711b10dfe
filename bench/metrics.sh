#!/usr/bin/env bash
# The cost of a Prometheus scrape of `magnetar standalone` (release build)
# holding TOPICS non-persistent topics (one REST publish each, default
# 10,000) and SESSIONS persistent MQTT sessions (paho, MQTT 5, session
# expiry 1 h, one QoS 0 subscription each: a queue per session; default
# 10,000), at the default namespace level. Prints the median time and the
# size of SCRAPES scrapes (default 5) in both formats, and the number of
# series.
#   [TOPICS=N] [SESSIONS=N] [SCRAPES=N] bench/metrics.sh
set -euo pipefail
topics=${TOPICS:-10000}
sessions=${SESSIONS:-10000}
scrapes=${SCRAPES:-5}
source "$(dirname "$0")/common.sh"
ulimit -n "$(ulimit -Hn)"
echo "machine: cores=$(nproc)"

http=$(port)
mqtt=$(port)
"$bin" standalone --data-dir "$dir/data" --http-listen "127.0.0.1:$http" \
  --kafka-listen "127.0.0.1:$(port)" --amqp-listen "127.0.0.1:$(port)" --mqtt-listen "127.0.0.1:$mqtt" \
  --meta-listen "127.0.0.1:$(port)" --bookie-listen "127.0.0.1:$(port)" \
  >"$dir/standalone.out" 2>"$dir/standalone.log" &
pids+=($!)
wait_line "$dir/standalone.out" ready

venv="${MAGNETAR_VENV:-$HOME/.cache/magnetar-venv}"
"$venv/bin/python" - "$http" "$mqtt" "$topics" "$sessions" "$scrapes" <<'PY'
import statistics, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
import paho.mqtt.client as mqtt

http, mqtt_port, topics, sessions, scrapes = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
base = f"http://127.0.0.1:{http}"

def publish(i):
    req = urllib.request.Request(
        f"{base}/topics/non-persistent/public/default/scrape-{i}",
        data=b'{"messages":[{"payload":"eA=="}]}', method="POST",
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()

t0 = time.time()
with ThreadPoolExecutor(16) as pool:
    list(pool.map(publish, range(topics)))
print(f"setup topics={topics} secs={time.time() - t0:.1f}", flush=True)

def session(i):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"scrape-{i}", protocol=mqtt.MQTTv5)
    props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", mqtt_port, clean_start=True, properties=props)
    c.loop_start()
    c.subscribe(f"devices/{i}/cmd", qos=0)
    time.sleep(0.05)
    # paho's network thread ends only once disconnected.
    c.disconnect()
    c.loop_stop()

t0 = time.time()
with ThreadPoolExecutor(16) as pool:
    list(pool.map(session, range(sessions)))
print(f"setup sessions={sessions} secs={time.time() - t0:.1f}", flush=True)

def scrape(accept):
    t = time.perf_counter()
    req = urllib.request.Request(f"{base}/metrics", headers={"Accept": accept})
    body = urllib.request.urlopen(req, timeout=60).read()
    return time.perf_counter() - t, body

for fmt, accept in (("openmetrics", "application/openmetrics-text; version=1.0.0"),
                    ("text", "text/plain")):
    runs = [scrape(accept) for _ in range(scrapes)]
    body = runs[-1][1]
    lines = body.decode().splitlines()
    series = sum(1 for l in lines if l and not l.startswith("#"))
    def total(name):
        return sum(float(l.rsplit(" ", 1)[1]) for l in lines
                   if l.startswith(name + "{") or l.startswith(name + " "))
    ms = statistics.median(r[0] for r in runs) * 1000
    print(f"scrape format={fmt} topics={topics} sessions={sessions} "
          f"ms_p50={ms:.1f} bytes={len(body)} series={series} "
          f"topics_loaded={total('pulsar_broker_topics_count'):.0f} "
          f"sessions_stored={total('magnetar_mqtt_sessions_persisted'):.0f}", flush=True)
PY
