"""The interop matrix: messages published through each of Kafka
(confluent-kafka), AMQP (pika), MQTT (paho-mqtt 5) and the WebSocket API
(websockets), consumed through each of the four: 16 pairs, each checked
for payload bytes, key, headers (W3C `traceparent` among them) and order
as the README's "Across protocols" table says.

The meeting point is an AMQP queue `Q` bound to `amq.topic` with
`interop.<tag>.#`, which is also where MQTT subscriptions live:

- AMQP publishes to `amq.topic`, MQTT publishes on `interop/<tag>/mqtt`;
- Kafka and WebSocket producers write the topic `S`, whose records a route
  republishes through `amq.topic`, keyed by their key;
- Kafka reads `Q`'s topic, pika consumes `Q`, a WebSocket consumer
  subscribes to `Q`'s topic, paho subscribes to `interop/<tag>/#`.
"""

import base64
import json
import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pika
from confluent_kafka import Consumer, Producer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from websockets.sync.client import connect

from interop_tests.test_routes import call

PROTOCOLS = ["kafka", "amqp", "mqtt", "ws"]
#: Messages per source, to see order.
N = 5
TIMEOUT = 20


def payload(src, i):
    # Bytes that are not UTF-8, and a zero byte, so nothing passes as text.
    return bytes([0, 0xFF, 0xFE]) + f"{src}-{i}".encode() + bytes([0x80, i])


def headers(src, i):
    # `traceparent` (W3C Trace Context) among them: a trace started by any
    # writer continues at every reader, under its own unprefixed name.
    return {"h-src": src, "h-seq": str(i), "h-note": "ü ✓",
            "traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e47{i:02x}-00f067aa0ba902b7-01"}


class Matrix:
    """Writers connect to `standalone`; readers to `sink` (the same one
    unless given: another region, for the matrix across regions)."""

    def __init__(self, standalone, sink=None):
        self.s = standalone
        self.sink = sink or standalone
        self.tag = uuid.uuid4().hex[:8]
        self.queue = f"interop-{self.tag}"
        self.source = f"interop-src-{self.tag}"
        self.ws_base = standalone.http.replace("http://", "ws://")
        self.sink_ws_base = self.sink.http.replace("http://", "ws://")

    # ---- the expected mapping, per the README's table ----

    def routing_key(self, src):
        return f"interop.{self.tag}.{src}"

    def mqtt_topic(self, src):
        return f"interop/{self.tag}/{src}"

    def expected_key(self, src, sink):
        """The key (Kafka, WebSocket), routing key (AMQP) or topic (MQTT)
        a sink sees for a message from `src`."""
        if sink == "mqtt":
            return self.mqtt_topic(src)
        if sink == "amqp":
            return self.routing_key(src)
        # A record's key: an MQTT publish is keyed by its topic.
        return self.mqtt_topic(src) if src == "mqtt" else self.routing_key(src)

    # ---- setup ----

    def amqp_channel(self, s=None):
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", (s or self.s).amqp_port, connection_attempts=3, retry_delay=0.5))
        return conn, conn.channel()

    def setup(self):
        conn, ch = self.amqp_channel(self.sink)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, "amq.topic", routing_key=f"interop.{self.tag}.#")
        conn.close()
        # The source topic is routed in every region: each routes what it
        # holds of it, its own records and replicated ones.
        for s in {id(self.s): self.s, id(self.sink): self.sink}.values():
            call(s, "PUT", f"/admin/v2/persistent/public/default/{self.source}")
            assert call(s, "PUT", f"/admin/v2/persistent/public/default/{self.source}/route",
                        {"exchange": "amq.topic"})[0] == 204

    # ---- sinks, started before anything is published ----

    def start_sinks(self):
        # AMQP: a consumer on Q, acknowledging as it goes.
        self.amqp_conn, self.amqp_ch = self.amqp_channel(self.sink)
        self.amqp_got = []

        def on_amqp(ch, method, props, body):
            self.amqp_got.append((method.routing_key, dict(props.headers or {}), body))
            ch.basic_ack(method.delivery_tag)

        self.amqp_ch.basic_qos(prefetch_count=100)
        self.amqp_ch.basic_consume(self.queue, on_amqp)

        # MQTT: a v5 session subscribed at QoS 1 under the tag.
        self.mqtt_got = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sink-{self.tag}",
                        protocol=mqtt.MQTTv5)
        subscribed = queue.Queue()
        c.on_message = lambda _c, _u, m: self.mqtt_got.put(
            (m.topic, list(getattr(m.properties, "UserProperty", None) or []), m.payload))
        c.on_subscribe = lambda *a: subscribed.put(True)
        c.connect("127.0.0.1", self.sink.mqtt_port)
        c.loop_start()
        c.subscribe(f"interop/{self.tag}/#", qos=1)
        subscribed.get(timeout=10)
        self.mqtt_sink = c

        # WebSocket: a consumer of Q's topic.
        self.ws_sink = connect(
            f"{self.sink_ws_base}/ws/v2/consumer/persistent/public/default/{self.queue}/ws-sink"
            "?subscriptionInitialPosition=Earliest", open_timeout=10)

    # ---- sources ----

    def publish_kafka(self):
        p = Producer({"bootstrap.servers": self.s.kafka, "enable.idempotence": True})
        for i in range(N):
            p.produce(self.source, value=payload("kafka", i), key=self.routing_key("kafka"),
                      headers=[(k, v.encode()) for k, v in headers("kafka", i).items()])
        assert p.flush(TIMEOUT) == 0

    def publish_amqp(self):
        conn, ch = self.amqp_channel()
        ch.confirm_delivery()
        for i in range(N):
            ch.basic_publish("amq.topic", self.routing_key("amqp"), payload("amqp", i),
                             pika.BasicProperties(headers=headers("amqp", i), delivery_mode=2))
        conn.close()

    def publish_mqtt(self):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"src-{self.tag}",
                        protocol=mqtt.MQTTv5)
        c.connect("127.0.0.1", self.s.mqtt_port)
        c.loop_start()
        try:
            for i in range(N):
                p = Properties(PacketTypes.PUBLISH)
                p.UserProperty = list(headers("mqtt", i).items())
                info = c.publish(self.mqtt_topic("mqtt"), payload("mqtt", i), qos=1, properties=p)
                info.wait_for_publish(TIMEOUT)
                assert info.is_published()
        finally:
            c.disconnect()
            c.loop_stop()

    def publish_ws(self):
        url = f"{self.ws_base}/ws/v2/producer/persistent/public/default/{self.source}"
        with connect(url, open_timeout=10) as p:
            for i in range(N):
                p.send(json.dumps({
                    "payload": base64.b64encode(payload("ws", i)).decode(),
                    "key": self.routing_key("ws"),
                    "properties": headers("ws", i),
                    "context": str(i),
                }))
            for _ in range(N):
                assert json.loads(p.recv(timeout=TIMEOUT))["result"] == "ok"

    # ---- what each sink got, as (source, key, headers, payload) in order ----

    def collect_kafka(self, total):
        c = Consumer({"bootstrap.servers": self.sink.kafka, "group.id": f"matrix-{self.tag}",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(self.queue, 0, 0)])
        got = []
        deadline = time.time() + TIMEOUT
        try:
            while len(got) < total and time.time() < deadline:
                m = c.poll(0.5)
                if m is None or m.error():
                    continue
                h = {k: (v or b"").decode() for k, v in (m.headers() or [])}
                got.append((m.key().decode() if m.key() else None, h, m.value()))
        finally:
            c.close()
        return got

    def collect_amqp(self, total):
        deadline = time.time() + TIMEOUT
        while len(self.amqp_got) < total and time.time() < deadline:
            self.amqp_conn.process_data_events(time_limit=0.2)
        self.amqp_conn.close()
        return [(k, {n: v.decode() if isinstance(v, bytes) else str(v) for n, v in h.items()}, b)
                for k, h, b in self.amqp_got]

    def collect_mqtt(self, total):
        got = []
        deadline = time.time() + TIMEOUT
        while len(got) < total and time.time() < deadline:
            try:
                topic, props, body = self.mqtt_got.get(timeout=0.2)
            except queue.Empty:
                continue
            got.append((topic, dict(props), body))
        self.mqtt_sink.disconnect()
        self.mqtt_sink.loop_stop()
        return got

    def collect_ws(self, total):
        got = []
        deadline = time.time() + TIMEOUT
        while len(got) < total and time.time() < deadline:
            try:
                m = json.loads(self.ws_sink.recv(timeout=max(0.1, deadline - time.time())))
            except TimeoutError:
                break
            self.ws_sink.send(json.dumps({"messageId": m["messageId"]}))
            got.append((m.get("key"), m.get("properties", {}), base64.b64decode(m["payload"])))
        self.ws_sink.close()
        return got


def check(matrix, src, sink, received):
    """Why the pair fails, or None: the messages from `src`, in the order
    `sink` saw them, must be the N sent, with their key and headers."""
    mine = [r for r in received if r[1].get("h-src") == src]
    if len(mine) != N:
        return f"{len(mine)} of {N} arrived"
    for i, (key, h, body) in enumerate(mine):
        if h.get("h-seq") != str(i):
            return f"out of order: message {i} has h-seq {h.get('h-seq')}"
        if body != payload(src, i):
            return f"message {i}: payload {body!r}"
        want = matrix.expected_key(src, sink)
        if key != want:
            return f"message {i}: key {key!r}, expected {want!r}"
        for name, value in headers(src, i).items():
            if h.get(name) != value:
                return f"message {i}: header {name} = {h.get(name)!r}, expected {value!r}"
    return None


def test_every_protocol_reads_what_every_protocol_writes(standalone, capsys):
    run_matrix(Matrix(standalone), capsys)


def run_matrix(m, capsys, title=""):
    """Writes through every protocol, reads through every protocol, and
    prints the grid."""
    m.setup()
    m.start_sinks()
    m.publish_kafka()
    m.publish_amqp()
    m.publish_mqtt()
    m.publish_ws()
    total = N * len(PROTOCOLS)
    received = {
        "kafka": m.collect_kafka(total),
        "amqp": m.collect_amqp(total),
        "mqtt": m.collect_mqtt(total),
        "ws": m.collect_ws(total),
    }
    failures = {}
    for src in PROTOCOLS:
        for sink in PROTOCOLS:
            why = check(m, src, sink, received[sink])
            if why:
                failures[(src, sink)] = why
    rows = ([title] if title else []) + ["from \\ to " + "".join(f"{p:>7}" for p in PROTOCOLS)]
    for src in PROTOCOLS:
        cells = "".join(f"{'FAIL' if (src, s) in failures else 'pass':>7}" for s in PROTOCOLS)
        rows.append(f"{src:<10}{cells}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
        for (src, sink), why in failures.items():
            print(f"{src} -> {sink}: {why}")
    assert not failures, failures
