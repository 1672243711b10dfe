"""Routes out of a topic: a Kafka application's partitioned topic feeding
MQTT devices and AMQP queues through `amq.topic`, and the route's admin API
and CLI."""

import json
import os
import queue
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pika
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from paho.mqtt.enums import CallbackAPIVersion

BIN = os.environ.get("MAGNETAR_BIN", "magnetar")


def call(standalone, method, path, body=None):
    """The status and body of an admin API call."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{standalone.http}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def cli(standalone, *args):
    return subprocess.run([BIN, "admin", "--url", standalone.http, "topics", *args],
                          capture_output=True, text=True, timeout=30)


def test_a_partitioned_kafka_topic_feeds_mqtt_devices_and_amqp_queues(standalone):
    tag = uuid.uuid4().hex[:8]
    topic = f"commands-{tag}"
    admin = KafkaAdminClient(bootstrap_servers=standalone.kafka, request_timeout_ms=30000)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    done = cli(standalone, "route", topic, "amq.topic", "--routing-key", f"devices.{tag}.all")
    assert done.returncode == 0, done.stderr

    # Each device subscribes to its own command topic, and to broadcasts.
    got = queue.Queue()
    subscribed = queue.Queue()
    dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{tag}", protocol=mqtt.MQTTv5)
    dev.on_message = lambda _c, _u, m: got.put((m.topic, m.payload))
    dev.on_subscribe = lambda *a: subscribed.put(True)
    dev.connect("127.0.0.1", standalone.mqtt_port)
    dev.loop_start()
    dev.subscribe(f"devices/{tag}/#", qos=1)
    subscribed.get(timeout=10)
    # An AMQP audit queue sees every command.
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", standalone.amqp_port))
    ch = conn.channel()
    audit = f"audit-{tag}"
    ch.queue_declare(audit, durable=True)
    ch.queue_bind(audit, "amq.topic", routing_key=f"devices.{tag}.#")

    p = KafkaProducer(bootstrap_servers=standalone.kafka, acks="all")
    sent = {}
    for d in range(6):
        for i in range(5):
            key = f"devices.{tag}.d{d}"
            p.send(topic, key=key.encode(), value=f"{d}:{i}".encode())
            sent.setdefault(f"devices/{tag}/d{d}", []).append(f"{d}:{i}".encode())
    p.send(topic, value=b"to everyone")  # no key: the route's routing key
    p.flush(30)
    p.close()

    by_topic = {}
    for _ in range(31):
        try:
            t, body = got.get(timeout=20)
        except queue.Empty:
            break
        by_topic.setdefault(t, []).append(body)
    dev.disconnect()
    dev.loop_stop()
    assert by_topic.pop(f"devices/{tag}/all") == [b"to everyone"]
    # Each key stays on one partition, so each device's commands keep their order.
    assert by_topic == sent

    audited = 0
    deadline = time.time() + 20
    while audited < 31 and time.time() < deadline:
        method, _, _ = ch.basic_get(audit, auto_ack=True)
        if method is None:
            time.sleep(0.05)
        else:
            audited += 1
    conn.close()
    assert audited == 31

    # The route shows in the topic's subscriptions while it is set.
    status, body = call(standalone, "GET",
                        f"/admin/v2/persistent/public/default/{topic}-partition-0/subscriptions")
    assert status == 200 and "__route" in json.loads(body)


def test_the_route_admin_api_and_cli(standalone):
    tag = uuid.uuid4().hex[:8]
    base = f"/admin/v2/persistent/public/default/routed-{tag}"
    assert call(standalone, "PUT", base)[0] == 204
    assert call(standalone, "GET", f"{base}/route") == (204, "")
    status, body = call(standalone, "PUT", f"{base}/route", {"exchange": "no-such"})
    assert status == 404 and "no-such" in json.loads(body)["reason"]
    status, body = call(standalone, "PUT", f"{base}/route", {"exchange": "amq.topic", "x": 1})
    assert status == 400, body
    status, body = call(standalone, "PUT", f"/admin/v2/persistent/public/default/none-{tag}/route",
                        {"exchange": "amq.topic"})
    assert status == 404, body
    status, body = call(standalone, "PUT",
                        f"/admin/v2/non-persistent/public/default/np-{tag}/route",
                        {"exchange": "amq.topic"})
    assert status == 400, body
    assert call(standalone, "POST", f"{base}/route",
                {"exchange": "amq.fanout", "routingKey": "k"})[0] == 204
    status, body = call(standalone, "GET", f"{base}/route")
    assert (status, json.loads(body)) == (200, {"exchange": "amq.fanout", "routingKey": "k"})
    shown = cli(standalone, "get-route", f"routed-{tag}")
    assert shown.returncode == 0 and json.loads(shown.stdout) == json.loads(body)
    assert cli(standalone, "remove-route", f"routed-{tag}").returncode == 0
    assert call(standalone, "GET", f"{base}/route") == (204, "")
    # Its subscription goes with it.
    deadline = time.time() + 10
    while time.time() < deadline:
        status, body = call(standalone, "GET", f"{base}/subscriptions")
        if "__route" not in json.loads(body):
            break
        time.sleep(0.2)
    assert "__route" not in json.loads(body)
