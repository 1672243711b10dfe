"""What clients keep in the metadata store is bounded per namespace:
retained MQTT messages, persistent MQTT sessions and Kafka consumer
groups past their quota are refused with the protocol's own error, while
what already exists keeps working; and a namespace's routing table that
would outgrow its one metadata value refuses further bindings with AMQP's
resource-error rather than freezing."""

import tempfile
import time
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from conftest import Standalone

RETAINED = 5
SESSIONS = 3
GROUPS = 2


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=[
            "--mqtt-max-retained-per-namespace", str(RETAINED),
            "--mqtt-max-sessions-per-namespace", str(SESSIONS),
            "--kafka-max-groups-per-namespace", str(GROUPS),
        ])
        s.start()
        yield s
        s.stop()


def mqtt_client(server, client_id, protocol=mqtt.MQTTv5):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    return c, "127.0.0.1", server.mqtt_port


def connect_v5(server, client_id, expiry):
    """The CONNACK reason of a v5 connect with this session expiry."""
    c, host, port = mqtt_client(server, client_id)
    got = {}
    c.on_connect = lambda cl, u, flags, rc, props: got.setdefault("rc", rc.value)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    c.connect(host, port, clean_start=True, properties=props)
    c.loop_start()
    deadline = time.time() + 15
    while "rc" not in got and time.time() < deadline:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    return got.get("rc")


def test_persistent_sessions_are_bounded_per_namespace(server):
    for i in range(SESSIONS):
        assert connect_v5(server, f"keep-{i}", 3600) == 0
    # One more persistent session: CONNACK 0x97 Quota exceeded.
    assert connect_v5(server, "keep-extra", 3600) == 0x97
    # An existing session resumes, and clean sessions are not counted.
    assert connect_v5(server, "keep-0", 3600) == 0
    assert connect_v5(server, "clean-one", 0) == 0

    # MQTT 3.1.1 has no such code: Server unavailable.
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="keep-v3",
                    protocol=mqtt.MQTTv311, clean_session=False)
    got = {}
    c.on_connect = lambda cl, u, flags, rc, props: got.setdefault("rc", rc)
    c.connect("127.0.0.1", server.mqtt_port)
    c.loop_start()
    deadline = time.time() + 15
    while "rc" not in got and time.time() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    assert "rc" in got and got["rc"].is_failure and "unavailable" in str(got["rc"]).lower(), got


def test_retained_messages_are_bounded_per_namespace(server):
    c, host, port = mqtt_client(server, "retainer")
    acks, gone = {}, {}
    c.on_publish = lambda cl, u, mid, rc, props: acks.__setitem__(mid, rc.value)
    c.on_disconnect = lambda cl, u, flags, rc, props: gone.setdefault("rc", rc.value)
    c.connect(host, port)
    c.loop_start()
    for i in range(RETAINED):
        c.publish(f"ret/{i}", b"v1", qos=1, retain=True).wait_for_publish(15)
    # Replacing one that exists is fine.
    c.publish("ret/0", b"v2", qos=1, retain=True).wait_for_publish(15)
    # One more: the publish is refused, the client told Quota exceeded in
    # its PUBACK, and the connection stays.
    extra = c.publish("ret/extra", b"v1", qos=1, retain=True)
    extra.wait_for_publish(15)
    assert acks.get(extra.mid) == 0x97, acks
    c.publish("ret/1", b"v3", qos=1, retain=True).wait_for_publish(15)
    c.loop_stop()
    assert not gone, gone

    # What is retained is still served, and clearing one makes room
    # again (the count is refreshed every few seconds).
    r, host, port = mqtt_client(server, "reader")
    got = {}
    r.on_message = lambda cl, u, m: got.__setitem__(m.topic, m.payload)
    r.connect(host, port)
    r.loop_start()
    r.subscribe("ret/#", qos=1)
    deadline = time.time() + 15
    while len(got) < RETAINED and time.time() < deadline:
        time.sleep(0.05)
    assert got == {**{f"ret/{i}": b"v1" for i in range(RETAINED)}, "ret/0": b"v2", "ret/1": b"v3"}, got
    assert "ret/extra" not in got
    r.publish("ret/4", b"", qos=1, retain=True).wait_for_publish(15)
    time.sleep(6)
    r.publish("ret/extra", b"now", qos=1, retain=True).wait_for_publish(15)
    r.disconnect()
    r.loop_stop()


def test_consumer_groups_are_bounded_per_namespace(server):
    topic = "quota-" + uuid.uuid4().hex[:8]
    p = Producer({"bootstrap.servers": server.kafka})
    for i in range(10):
        p.produce(topic, b"%d" % i)
    p.flush(30)

    def commit_as(group):
        c = Consumer({"bootstrap.servers": server.kafka, "group.id": group,
                      "enable.auto.commit": False})
        try:
            c.assign([TopicPartition(topic, 0, 0)])
            (tp,) = c.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
            return tp.error
        except Exception as e:  # the client raises the commit's error
            return e.args[0]
        finally:
            c.close()

    for g in range(GROUPS):
        assert commit_as(f"grp-{g}") is None
    err = commit_as("grp-extra")
    assert err is not None and err.code() == KafkaError.POLICY_VIOLATION, err
    # A group that exists still commits.
    assert commit_as("grp-0") is None


def test_a_full_routing_table_refuses_bindings_with_resource_error(server):
    params = pika.ConnectionParameters("127.0.0.1", server.amqp_port)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    # Durable: what is transient lives on one broker, outside the table.
    ch.exchange_declare("wide", "topic", durable=True)
    ch.queue_declare("wide-q", durable=True)
    # Binding arguments are kept in the table too: 64 KB each fills its
    # 1 MiB in a few binds.
    pad = {"x-pad": "p" * 65_000}
    refused = None
    for i in range(100):
        try:
            ch.queue_bind("wide-q", "wide", routing_key=str(i), arguments=pad)
        except pika.exceptions.ConnectionClosedByBroker as e:
            # 506 RESOURCE_ERROR is a connection exception in 0-9-1.
            refused = e
            break
    assert refused is not None and refused.reply_code == 506, refused
    assert "routing table" in refused.reply_text, refused
    # The namespace still works: unbinding and declaring do.
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_unbind("wide-q", "wide", routing_key="0", arguments=pad)
    ch.queue_declare("after-full", durable=True)
    conn.close()
