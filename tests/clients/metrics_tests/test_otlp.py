"""Spans over OTLP/HTTP (JSON) to a stand-in collector: a message that
carries a W3C `traceparent` (a pika header, a paho MQTT 5 user property,
a WebSocket property) continues that trace in the broker's `publish`
span, and Kafka produce requests have spans of their own."""

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import Producer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from websockets.sync.client import connect as ws_connect

from conftest import running


class Collector(ThreadingHTTPServer):
    """Takes OTLP/HTTP JSON exports at /v1/traces."""

    def __init__(self):
        self.exports = []
        self.paths = []
        super().__init__(("127.0.0.1", 0), Handler)

    def spans(self):
        out = []
        for e in list(self.exports):
            for rs in e.get("resourceSpans", []):
                resource = {a["key"]: a["value"] for a in rs.get("resource", {}).get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append(dict(s, resource=resource))
        return out


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        self.server.exports.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def traced():
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    with running(env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SERVICE_NAME": "magnetar-test",
    }) as s:
        yield s, collector
    collector.shutdown()


def traceparent():
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def wait_for(collector, pred, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [s for s in collector.spans() if pred(s)]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no such span among {len(collector.spans())}: "
                         f"{[(s['name'], s.get('traceId')) for s in collector.spans()][:20]}")


def test_publishes_continue_the_trace_their_message_carries(traced):
    s, collector = traced
    sent = {}
    # AMQP: a header.
    t, p, tp = traceparent()
    sent["amqp"] = (t, p)
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("traced", durable=True)
    ch.basic_publish("", "traced", b"a", pika.BasicProperties(headers={"traceparent": tp}))
    conn.close()
    # MQTT 5: a user property (QoS 1, so stored with a subscriber present).
    t, p, tp = traceparent()
    sent["mqtt"] = (t, p)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="traced", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", s.mqtt_port)
    c.loop_start()
    c.subscribe("traced/#", qos=1)
    time.sleep(0.3)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("traceparent", tp)]
    c.publish("traced/x", b"m", qos=1, properties=props).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    # WebSocket: a message property.
    t, p, tp = traceparent()
    sent["websocket"] = (t, p)
    url = s.http.replace("http://", "ws://") + "/ws/v2/producer/persistent/public/default/traced-ws"
    with ws_connect(url) as ws:
        ws.send(json.dumps({"payload": base64.b64encode(b"w").decode(),
                            "properties": {"traceparent": tp}}))
        assert json.loads(ws.recv(timeout=10))["result"] == "ok"
    for protocol, (trace_id, parent) in sent.items():
        spans = wait_for(collector, lambda x, t=trace_id: x.get("traceId") == t)
        assert [x["name"] for x in spans] == ["publish"], (protocol, spans)
        assert spans[0]["parentSpanId"] == parent, (protocol, spans[0])
        assert spans[0]["resource"]["service.name"] == {"stringValue": "magnetar-test"}
    assert all(path == "/v1/traces" for path in collector.paths)


def test_kafka_produce_requests_have_spans(traced):
    s, collector = traced
    before = len([x for x in collector.spans() if x["name"] == "produce"])
    p = Producer({"bootstrap.servers": s.kafka, "acks": "all"})
    for i in range(5):
        p.produce("traced-kafka", b"k%d" % i)
    assert p.flush(30) == 0
    deadline = time.time() + 20
    while len([x for x in collector.spans() if x["name"] == "produce"]) <= before:
        assert time.time() < deadline, "no produce span"
        time.sleep(0.2)
