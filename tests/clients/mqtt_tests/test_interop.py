"""MQTT, AMQP and Kafka see the same messages: MQTT publishes route through
`amq.topic` with `/` and `.` swapped (RabbitMQ's MQTT mapping), so AMQP
queues bound there get them and Kafka reads those queues' topics; AMQP
publishes to `amq.topic` reach MQTT subscribers."""

import time

import pika
import pytest
from confluent_kafka import Consumer, TopicPartition
from paho.mqtt.packettypes import PacketTypes

from mqtt_tests.conftest import LEVELS, V5, props


@pytest.fixture
def amqp(standalone):
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", standalone.amqp_port, connection_attempts=3, retry_delay=0.5))
    yield conn.channel()
    try:
        conn.close()
    except Exception:
        pass


def amqp_get(ch, queue, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        method, p, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            return method, p, body
        time.sleep(0.05)
    raise AssertionError(f"nothing in {queue} after {timeout}s")


def kafka_read(bootstrap, topic, n=1, timeout=20):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"mqtt-interop-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + timeout
    try:
        while len(got) < n and time.time() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
    finally:
        c.close()
    return got


def test_mqtt_to_amqp_and_kafka(client, amqp, standalone, tag):
    """The acceptance case: a v5 device publishes `sensors/room1/temp` with
    user properties; an AMQP queue bound with `sensors.#` gets it under
    routing key `sensors.room1.temp`, and a Kafka consumer of that queue's
    topic reads it keyed by the MQTT topic, user properties as headers."""
    queue = f"mqtt-interop-{tag}"
    amqp.queue_declare(queue, durable=True)
    amqp.queue_bind(queue, "amq.topic", routing_key="sensors.#")
    dev = client(V5)
    dev.publish("sensors/room1/temp", b"21.5", qos=1, properties=props(
        PacketTypes.PUBLISH, UserProperty=[("unit", "C"), ("site", "lab")],
        ContentType="text/plain"))

    # Kafka first: AMQP's acknowledgement removes it from the queue.
    [rec] = kafka_read(standalone.kafka, queue)
    assert rec.value() == b"21.5"
    assert rec.key() == b"sensors/room1/temp"
    headers = dict(rec.headers() or [])
    assert headers.get("unit") == b"C" and headers.get("site") == b"lab", headers

    method, p, body = amqp_get(amqp, queue)
    assert body == b"21.5"
    assert (p.headers or {}).get("unit") == "C"
    assert (p.headers or {}).get("site") == "lab"
    # As RabbitMQ's MQTT plugin delivers it: the swapped key, from amq.topic.
    assert (method.routing_key, method.exchange) == ("sensors.room1.temp", "amq.topic")


@LEVELS
def test_amqp_to_mqtt(client, amqp, level):
    """pika publishes to `amq.topic` with routing key `sensors.room2.temp`;
    a paho subscriber of `sensors/+/temp` gets it on `sensors/room2/temp`,
    with the AMQP headers as user properties (v5)."""
    sub = client(level)
    sub.subscribe("sensors/+/temp", qos=1)
    amqp.basic_publish("amq.topic", "sensors.room2.temp", b"19.0",
                       properties=pika.BasicProperties(headers={"unit": "C"}, delivery_mode=2))
    m = sub.expect_one()
    assert (m.topic, m.payload) == ("sensors/room2/temp", b"19.0")
    assert m.qos == 1
    if level == V5:
        assert ("unit", "C") in (m.prop("UserProperty") or [])
        assert not any(k.startswith("amqp.") for k, _ in (m.prop("UserProperty") or []))


@LEVELS
def test_amqp_wildcard_binding_sees_mqtt_levels(client, amqp, tag, level):
    """`+` is `*` and `#` is `#`: a binding `il.*.x` on amq.topic gets
    `il/a/x` but not `il/a/b/x`."""
    queue = f"mqtt-wild-{tag}"
    amqp.queue_declare(queue, durable=False, exclusive=True)
    amqp.queue_bind(queue, "amq.topic", routing_key=f"il{tag}.*.x")
    pub = client(level)
    pub.publish(f"il{tag}/a/b/x", b"no", qos=1)
    pub.publish(f"il{tag}/a/x", b"yes", qos=1)
    method, _, body = amqp_get(amqp, queue)
    assert body == b"yes"
    time.sleep(0.3)
    assert amqp.basic_get(queue, auto_ack=True)[0] is None


@LEVELS
def test_mqtt_session_queue_is_an_amqp_queue(client, amqp, tag, level):
    """A session's subscriptions bind its queue on `amq.topic`; AMQP
    publishers reach it by the swapped key, and the topic comes back with
    slashes."""
    sub = client(level)
    sub.subscribe(f"sq/{tag}/#", qos=1)
    amqp.basic_publish("amq.topic", f"sq.{tag}.deep.er", b"from amqp")
    m = sub.expect_one()
    assert (m.topic, m.payload) == (f"sq/{tag}/deep/er", b"from amqp")
