"""`/metrics` of standalone and of a cluster's metadata node and bookie,
judged by the Prometheus client's strict OpenMetrics parser, with traffic
from pika, paho and confluent-kafka: the counters equal what was sent,
the backlog what was left unread, connection gauges follow the clients,
and nothing goes backwards when a topic unloads."""

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as text_parse
from websockets.sync.client import connect as ws_connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kit"))
from free_port import free_port  # noqa: E402
from interop_tests.test_routes import call as admin  # noqa: E402
from conftest import running  # noqa: E402

BIN = os.environ.get("MAGNETAR_BIN", "magnetar")
OM = "application/openmetrics-text; version=1.0.0"
NS = "public/metrics"


def get(url, accept=OM, token=None):
    req = urllib.request.Request(url, headers={"Accept": accept})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, "", str(e)


def families(url):
    """The strict parse of one OpenMetrics scrape, checked for one `# TYPE`
    per name and for histogram invariants."""
    status, ctype, text = get(url)
    assert status == 200, text
    assert ctype.startswith("application/openmetrics-text") and "version=1.0.0" in ctype, ctype
    types = [l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    fams = {f.name: f for f in om_parse(text)}
    for f in fams.values():
        if f.type != "histogram":
            continue
        by_series = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            by_series.setdefault(key, []).append(s)
        for series in by_series.values():
            buckets = [s.value for s in series if s.name.endswith("_bucket")]
            assert buckets == sorted(buckets), f.name
            count = [s.value for s in series if s.name.endswith("_count")]
            assert count and buckets[-1] == count[0], f.name
    return fams


def value(fams, name, **labels):
    f = fams.get(name)
    if f is None:
        return None
    want = name + "_total" if f.type == "counter" else name
    vals = [s.value for s in f.samples
            if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(vals) if vals else None


@pytest.fixture(scope="module")
def s(standalone):
    status, body = admin(standalone, "PUT", f"/admin/v2/namespaces/{NS}")
    assert status in (200, 204, 409), body
    return standalone


def confirmed_queue(s, prefix):
    """A pika connection to NS, a channel in confirm mode, and a new
    durable queue."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", s.amqp_port, virtual_host=NS))
    ch = conn.channel()
    ch.confirm_delivery()
    q = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(q, durable=True)
    return conn, ch, q


def scrape(s):
    return families(f"{s.http}/metrics")


def test_both_formats_parse_and_name_every_family_once(s):
    families(f"{s.http}/metrics")
    status, ctype, text = get(f"{s.http}/metrics", accept="text/plain")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    names = [f.name for f in text_parse(text)]
    assert len(names) == len(set(names))
    assert "# EOF" not in text


def test_standalone_serves_the_metadata_node_bookie_and_process_families(s):
    fams = scrape(s)
    for name in ("magnetar_meta_is_leader", "magnetar_meta_raft_term", "magnetar_meta_applied_index",
                 "bookie_SERVER_STATUS", "bookie_ledgers_count", "bookie_journal_syncs",
                 "bookie_WRITE_BYTES", "bookie_READ_BYTES", "bookie_journal_sync_latency_seconds",
                 "process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds",
                 "pulsar_broker_topics_count", "magnetar_meta_commit_index",
                 "bookie_journal_add_latency_seconds", "bookie_journal_queue_size"):
        assert name in fams, name
    assert value(fams, "magnetar_meta_is_leader") == 1
    assert value(fams, "bookie_SERVER_STATUS") == 1
    assert value(fams, "bookie_WRITE_BYTES") is not None
    assert value(fams, "magnetar_meta_commit_index") >= value(fams, "magnetar_meta_applied_index") > 0
    assert value(fams, "process_resident_memory_bytes") > 1 << 20


def test_amqp_counters_equal_the_traffic_and_the_backlog_what_is_unread(s):
    before = scrape(s)
    in0 = value(before, "pulsar_in_messages", namespace=NS) or 0
    out0 = value(before, "pulsar_out_messages", namespace=NS) or 0
    conn, ch, q = confirmed_queue(s, "metrics")
    for i in range(12):
        ch.basic_publish("", q, b"payload-%d" % i)
    got = 0
    while got < 7:
        m, _, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            time.sleep(0.05)
            continue
        got += 1
    fams = scrape(s)
    assert value(fams, "pulsar_in_messages", namespace=NS) - in0 == 12
    assert value(fams, "pulsar_out_messages", namespace=NS) - out0 == 7
    assert value(fams, "pulsar_msg_backlog", namespace=NS) == 5
    assert value(fams, "rabbitmq_queue_messages_ready", namespace=NS) == 5
    assert value(fams, "rabbitmq_queue_messages_unacked", namespace=NS) == 0
    m, _, _ = ch.basic_get(q, auto_ack=False)
    assert m is not None
    fams = scrape(s)
    assert value(fams, "rabbitmq_queue_messages_ready", namespace=NS) == 4
    assert value(fams, "rabbitmq_queue_messages_unacked", namespace=NS) == 1
    assert value(fams, "rabbitmq_queues", namespace=NS) == 1
    # Durable publishes went through the embedded bookie's journal.
    assert value(fams, "bookie_WRITE_BYTES") > 0
    stats = json.loads(admin(s, "GET", f"/admin/v2/persistent/{NS}/{q}/stats")[1])
    assert stats["msgInCounter"] == 12
    conn.close()


def test_mqtt_counters_count_what_reaches_a_subscribers_session(s):
    before = scrape(s)
    in0 = value(before, "pulsar_in_messages", namespace=NS) or 0
    out0 = value(before, "pulsar_out_messages", namespace=NS) or 0
    topic = f"metrics/{uuid.uuid4().hex[:8]}"
    got = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"m-sub-{uuid.uuid4().hex[:6]}")
    sub.username_pw_set(NS)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", s.mqtt_port)
    sub.loop_start()
    r, _ = sub.subscribe(topic, qos=1)
    time.sleep(0.5)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"m-pub-{uuid.uuid4().hex[:6]}")
    pub.username_pw_set(NS)
    pub.connect("127.0.0.1", s.mqtt_port)
    pub.loop_start()
    for i in range(9):
        pub.publish(topic, b"v%d" % i, qos=1).wait_for_publish(10)
    deadline = time.time() + 10
    while len(got) < 9 and time.time() < deadline:
        time.sleep(0.05)
    assert len(got) == 9
    fams = scrape(s)
    assert value(fams, "pulsar_in_messages", namespace=NS) - in0 == 9
    assert value(fams, "pulsar_out_messages", namespace=NS) - out0 == 9
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()


def test_kafka_produce_counts_in_the_default_namespace(s):
    before = scrape(s)
    in0 = value(before, "pulsar_in_messages", namespace="public/default") or 0
    p = Producer({"bootstrap.servers": s.kafka, "acks": "all"})
    topic = f"metrics-{uuid.uuid4().hex[:8]}"
    for i in range(25):
        p.produce(topic, b"k%d" % i)
    assert p.flush(30) == 0
    fams = scrape(s)
    assert value(fams, "pulsar_in_messages", namespace="public/default") - in0 == 25
    assert value(fams, "pulsar_in_bytes", namespace="public/default") > 0


def test_kafka_group_lag_is_what_the_group_left_unread(s):
    before = scrape(s)
    out0 = value(before, "pulsar_out_messages", namespace="public/default") or 0
    topic = f"lag-{uuid.uuid4().hex[:8]}"
    group = f"g-{topic}"
    p = Producer({"bootstrap.servers": s.kafka, "acks": "all"})
    for i in range(25):
        p.produce(topic, b"v%d" % i, partition=0)
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": s.kafka, "group.id": group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + 30
    while len(got) < 10 and time.time() < deadline:
        m = c.poll(1)
        if m is not None and not m.error():
            got.append(m.offset())
    assert len(got) == 10
    c.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
    c.close()
    fams = scrape(s)
    assert value(fams, "magnetar_kafka_consumer_group_lag", group=group, topic=topic,
                 partition="0") == 15
    assert value(fams, "magnetar_kafka_consumer_group_lag_sum", group=group) == 15
    # Fetch responses carry at least what the consumer read.
    assert value(fams, "pulsar_out_messages", namespace="public/default") - out0 >= 10


def test_refused_logins_count_by_protocol(secured):
    before = value(families_auth(secured), "magnetar_auth_failures", protocol="amqp")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", secured.amqp_port,
            credentials=pika.PlainCredentials("nobody", "not-a-token")))
    after = value(families_auth(secured), "magnetar_auth_failures", protocol="amqp")
    assert after == before + 1
    # Without a superuser's token the scrape is refused.
    assert get(f"{secured.http}/metrics")[0] == 401
    assert get(f"{secured.http}/metrics", token=secured.token("sensor"))[0] == 403


def families_auth(secured):
    status, ctype, text = get(f"{secured.http}/metrics", token=secured.token("admin"))
    assert status == 200, text
    return {f.name: f for f in om_parse(text)}


def test_connection_gauges_follow_connects_and_disconnects(s):
    def open_amqp():
        return value(scrape(s), "magnetar_connections", protocol="amqp") or 0
    base = open_amqp()
    conns = [pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
             for _ in range(3)]
    assert open_amqp() == base + 3
    opened = value(scrape(s), "magnetar_connections_opened", protocol="amqp")
    for c in conns:
        c.close()
    deadline = time.time() + 5
    while open_amqp() != base and time.time() < deadline:
        time.sleep(0.05)
    assert open_amqp() == base
    assert value(scrape(s), "magnetar_connections_opened", protocol="amqp") == opened


def test_counters_survive_a_topic_unload(s):
    conn, ch, q = confirmed_queue(s, "unload")
    for i in range(4):
        ch.basic_publish("", q, b"x")
    conn.close()
    before = scrape(s)
    status, body = admin(s, "PUT", f"/admin/v2/persistent/{NS}/{q}/unload")
    assert status in (200, 204), body
    after = scrape(s)
    for name in ("pulsar_in_messages", "pulsar_in_bytes", "pulsar_out_messages"):
        assert value(after, name, namespace=NS) >= value(before, name, namespace=NS), name
    stats = json.loads(admin(s, "GET", f"/admin/v2/persistent/{NS}/{q}/stats")[1])
    # The topic's own counter starts again when it loads; the namespace's does not.
    assert stats["msgInCounter"] == 0


def hist_count(fams, name, **labels):
    f = fams.get(name)
    return sum(x.value for x in f.samples if x.name == name + "_count"
               and all(x.labels.get(k) == v for k, v in labels.items())) if f else 0


def test_producers_publish_latency_and_rates_follow_each_protocol(s):
    before = scrape(s)
    producers0 = value(before, "pulsar_producers_count", namespace=NS) or 0
    lat0 = {p: hist_count(before, "magnetar_publish_latency_seconds", protocol=p)
            for p in ("amqp", "mqtt", "websocket")}
    conn, ch, q = confirmed_queue(s, "rates")
    for _ in range(20):
        ch.basic_publish("", q, b"r" * 100)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"m-lat-{uuid.uuid4().hex[:6]}")
    pub.username_pw_set(NS)
    pub.connect("127.0.0.1", s.mqtt_port)
    pub.loop_start()
    for i in range(5):
        pub.publish(f"lat/{q}", b"v", qos=1).wait_for_publish(10)
    ws_url = s.http.replace("http://", "ws://") + f"/ws/v2/producer/persistent/{NS}/ws-{q}"
    with ws_connect(ws_url) as ws:
        for _ in range(3):
            ws.send(json.dumps({"payload": base64.b64encode(b"w").decode()}))
            assert json.loads(ws.recv(timeout=10))["result"] == "ok"
        fams = scrape(s)
        # pika, paho and the WebSocket producer, each one producer.
        assert value(fams, "pulsar_producers_count", namespace=NS) == producers0 + 3
    for p, n in (("amqp", 20), ("mqtt", 5), ("websocket", 3)):
        assert hist_count(fams, "magnetar_publish_latency_seconds", protocol=p) - lat0[p] == n, p
    time.sleep(1.2)
    fams = scrape(s)
    assert value(fams, "pulsar_rate_in", namespace=NS) > 0
    assert value(fams, "pulsar_throughput_in", namespace=NS) > 0
    conn.close()
    pub.disconnect()
    pub.loop_stop()
    deadline = time.time() + 5
    while value(scrape(s), "pulsar_producers_count", namespace=NS) != producers0 \
            and time.time() < deadline:
        time.sleep(0.05)
    assert value(scrape(s), "pulsar_producers_count", namespace=NS) == producers0


def test_topic_level_series_are_opt_in_and_capped():
    with running(extra=["--metrics-topic-level", "--metrics-max-topics", "2"]) as sa:
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", sa.amqp_port))
        ch = conn.channel()
        ch.confirm_delivery()
        for q in ("qa", "qb", "qc"):
            ch.queue_declare(q, durable=True)
            ch.basic_publish("", q, b"x")
        conn.close()
        fams = families(f"{sa.http}/metrics")
    rows = [x for x in fams["pulsar_msg_backlog"].samples
            if x.labels.get("namespace") == "public/default"]
    topics = sorted(x.labels["topic"] for x in rows if x.labels.get("topic"))
    assert len(topics) == 2, rows
    # The third queue's backlog stays in its namespace's row, and the sum
    # over the rows is the namespace's.
    assert sum(x.value for x in rows) == 3, rows
    assert value(fams, "pulsar_broker_msg_backlog") == 3


# ---- a cluster's metadata node and bookie ----

def spawn(args, log, until):
    p = subprocess.Popen([BIN, *args], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    deadline = time.time() + 60
    for line in p.stdout:
        if until in line:
            return p
        if time.time() > deadline:
            break
    p.kill()
    raise AssertionError(f"{args[0]} did not start: {open(log).read()[-2000:]}")


def wait_for(url, status, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if get(url)[0] == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}; last {get(url)[:3:2]}")


def start_broker(d, meta):
    http = f"127.0.0.1:{free_port()}"
    p = spawn(["broker", "--meta", meta, "--cluster", "local", "--http-listen", http,
               "--kafka-listen", "127.0.0.1:0", "--amqp-listen", "127.0.0.1:0",
               "--mqtt-listen", "127.0.0.1:0", "--ensemble", "1", "--write-quorum", "1",
               "--ack-quorum", "1"], os.path.join(d, "broker.log"), "ready")
    return p, f"http://{http}"


def test_meta_and_bookie_serve_metrics_and_flip_ready():
    with tempfile.TemporaryDirectory() as d:
        meta, meta_http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        bookie_http = f"127.0.0.1:{free_port()}"
        procs = []
        try:
            procs.append(spawn(["meta", "--id", "1", "--listen", meta, "--http-listen", meta_http,
                                "--data-dir", os.path.join(d, "meta")],
                               os.path.join(d, "meta.log"), "listening on"))
            wait_for(f"http://{meta_http}/ready", 200)
            assert get(f"http://{meta_http}/health")[0] == 200
            fams = families(f"http://{meta_http}/metrics")
            assert value(fams, "magnetar_meta_is_leader") == 1
            assert value(fams, "magnetar_meta_raft_term") >= 1
            assert "process_resident_memory_bytes" in fams
            # A disk threshold of 0 turns the bookie read-only at its
            # first check.
            bookie = spawn(["bookie", "--id", "1", "--listen", f"127.0.0.1:{free_port()}",
                            "--http-listen", bookie_http, "--meta", meta,
                            "--data-dir", os.path.join(d, "bookie"), "--session-ttl-ms", "1000",
                            "--disk-usage-threshold", "0.999", "--disk-check-interval-ms", "100"],
                           os.path.join(d, "bookie.log"), "listening on")
            procs.append(bookie)
            wait_for(f"http://{bookie_http}/ready", 200)
            fams = families(f"http://{bookie_http}/metrics")
            assert value(fams, "bookie_SERVER_STATUS") == 1
            assert value(fams, "bookie_registered") == 1
            broker, broker_http = start_broker(d, meta)
            procs.append(broker)
            wait_for(f"{broker_http}/ready", 200)
            assert "pulsar_broker_topics_count" in families(f"{broker_http}/metrics")
            bookie.terminate()
            bookie.wait(30)
            procs.remove(bookie)
            ro = spawn(["bookie", "--id", "1", "--listen", f"127.0.0.1:{free_port()}",
                        "--http-listen", bookie_http, "--meta", meta,
                        "--data-dir", os.path.join(d, "bookie"), "--session-ttl-ms", "1000",
                        "--disk-usage-threshold", "0", "--disk-check-interval-ms", "100"],
                       os.path.join(d, "bookie-ro.log"), "listening on")
            procs.append(ro)
            wait_for(f"http://{bookie_http}/ready", 503)
            assert get(f"http://{bookie_http}/health")[0] == 200
            assert value(families(f"http://{bookie_http}/metrics"), "bookie_SERVER_STATUS") == 0
            # The broker has no writable bookie left for a ledger.
            wait_for(f"{broker_http}/ready", 503)
            assert "writable bookies" in get(f"{broker_http}/ready")[2]
            assert get(f"{broker_http}/health")[0] == 200
            # Its metadata store gone (the group's only member), the
            # broker says so.
            procs[0].kill()
            deadline = time.time() + 30
            while "metadata store" not in get(f"{broker_http}/ready")[2] and time.time() < deadline:
                time.sleep(0.2)
            assert "metadata store" in get(f"{broker_http}/ready")[2]
            assert get(f"{broker_http}/health")[0] == 200
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_a_member_that_loses_its_leader_is_not_ready():
    with tempfile.TemporaryDirectory() as d:
        addrs = {i: f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
        https = {i: f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
        peers = ",".join(f"{i}={a}" for i, a in addrs.items())
        procs = {}
        try:
            for i in addrs:
                procs[i] = spawn(["meta", "--id", str(i), "--listen", addrs[i],
                                  "--http-listen", https[i], "--peers", peers,
                                  "--heartbeat-ms", "100", "--election-min-ms", "500",
                                  "--election-max-ms", "1000",
                                  "--data-dir", os.path.join(d, f"meta-{i}")],
                                 os.path.join(d, f"meta-{i}.log"), "listening on")
            for i in addrs:
                wait_for(f"http://{https[i]}/ready", 200)
            leaders = [i for i in addrs
                       if value(families(f"http://{https[i]}/metrics"), "magnetar_meta_is_leader") == 1]
            assert len(leaders) == 1
            # Two of three gone: the one left knows no leader once its
            # election timeout passes.
            left = [i for i in addrs if i != leaders[0]][0]
            for i in addrs:
                if i != left:
                    procs[i].kill()
            wait_for(f"http://{https[left]}/ready", 503)
            assert get(f"http://{https[left]}/health")[0] == 200
        finally:
            for p in procs.values():
                p.kill()
                p.wait()
