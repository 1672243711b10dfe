"""Per-message replication control: a record whose `pulsar.replicate-to`
header (a Kafka header, an AMQP header, an MQTT v5 user property) or
whose WebSocket `replicationClusters` leaves a cluster out never reaches
that cluster; the others do, and a batch that mixes both is sent in
parts."""

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

from geo_tests.regions import ok, regions, replicate_default, wait_for
from interop_tests.test_routes import call

HEADER = "pulsar.replicate-to"
NS = "public/default"


def read_topic(region, topic, until, timeout=60):
    """The values of `topic` in `region`, from the start up to `until`."""
    c = Consumer({"bootstrap.servers": region.kafka, "group.id": f"pm-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + timeout
    try:
        while until not in got and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            got.append(m.value().decode())
    finally:
        c.close()
    assert until in got, f"{region.name}/{topic}: {got}"
    return got


def replication_of(region, topic):
    status, body = call(region, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")
    assert status == 200, body
    return json.loads(body).get("replication", {}).get("west", {})


def test_per_message_replicate_to_keeps_records_home_on_every_protocol():
    with regions(["east", "west"], kafka_ns=NS) as r:
        east, west = r["east"], r["west"]
        replicate_default([east, west])

        # Kafka: one lz4 batch that mixes records for west with ones kept
        # in east, so that it is sent in parts.
        ok(call(east, "PUT", f"/admin/v2/persistent/{NS}/pm-kafka"))
        p = Producer({"bootstrap.servers": east.kafka, "enable.idempotence": True,
                      "compression.type": "lz4", "linger.ms": 200})
        for i in range(20):
            to = ["east", "east,west", None, " east , west "][i % 4]
            p.produce("pm-kafka", value=f"k{i}".encode(),
                      headers=[(HEADER, to.encode())] if to else [])
        p.produce("pm-kafka", value=b"end", headers=[(HEADER, b"")])
        p.produce("pm-kafka", value=b"end2")
        assert p.flush(30) == 0
        got = read_topic(west, "pm-kafka", "end2")
        assert got == [f"k{i}" for i in range(20) if i % 4 != 0] + ["end2"], got
        stats = wait_for("east's counters", lambda: (
            s if (s := replication_of(east, "pm-kafka")).get("msgFilteredCounter", 0) >= 6 else None))
        assert stats["msgFilteredCounter"] == 6, stats
        assert stats["splitBatches"] >= 1, stats
        # East keeps all of them.
        assert len(read_topic(east, "pm-kafka", "end2")) == 22

        # WebSocket: Pulsar's replicationClusters.
        ok(call(east, "PUT", f"/admin/v2/persistent/{NS}/pm-ws"))
        url = east.http.replace("http://", "ws://") + f"/ws/v2/producer/persistent/{NS}/pm-ws"
        with connect(url, open_timeout=10) as ws:
            for i in range(6):
                frame = {"payload": base64.b64encode(f"w{i}".encode()).decode(), "context": str(i)}
                if i % 2:
                    frame["replicationClusters"] = ["east"]
                ws.send(json.dumps(frame))
            ws.send(json.dumps({"payload": base64.b64encode(b"wend").decode()}))
            for _ in range(7):
                assert json.loads(ws.recv(timeout=20))["result"] == "ok"
        assert read_topic(west, "pm-ws", "wend") == ["w0", "w2", "w4", "wend"]

        # MQTT v5 and AMQP into amq.topic: west's MQTT session and AMQP
        # queue get only what may leave east.
        tag = uuid.uuid4().hex[:8]
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", west.amqp_port))
        ch = conn.channel()
        q = f"pm-{tag}"
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, "amq.topic", routing_key=f"pm.{tag}.#")
        got_mqtt = queue.Queue()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pm-sub-{tag}",
                          protocol=mqtt.MQTTv5)
        subscribed = queue.Queue()
        sub.on_message = lambda _c, _u, m: got_mqtt.put(m.payload.decode())
        sub.on_subscribe = lambda *a: subscribed.put(True)
        sub.connect("127.0.0.1", west.mqtt_port)
        sub.loop_start()
        sub.subscribe(f"pm/{tag}/#", qos=1)
        subscribed.get(timeout=10)

        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pm-pub-{tag}",
                          protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", east.mqtt_port)
        pub.loop_start()
        for i in range(4):
            props = Properties(PacketTypes.PUBLISH)
            if i % 2:
                props.UserProperty = [(HEADER, "east")]
            info = pub.publish(f"pm/{tag}/m", f"m{i}".encode(), qos=1, properties=props)
            info.wait_for_publish(20)
        pconn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", east.amqp_port))
        pch = pconn.channel()
        pch.confirm_delivery()
        for i in range(4):
            headers = {HEADER: "east"} if i % 2 else {"other": "x"}
            pch.basic_publish("amq.topic", f"pm.{tag}.a", f"a{i}".encode(),
                              pika.BasicProperties(headers=headers, delivery_mode=2))
        pch.basic_publish("amq.topic", f"pm.{tag}.a", b"aend",
                          pika.BasicProperties(delivery_mode=2))
        pconn.close()
        pub.disconnect()
        pub.loop_stop()

        want = ["m0", "m2", "a0", "a2", "aend"]
        mqtt_got = []
        deadline = time.time() + 60
        while "aend" not in mqtt_got and time.time() < deadline:
            try:
                mqtt_got.append(got_mqtt.get(timeout=0.5))
            except queue.Empty:
                pass
        # Anything kept home would have come before the last one.
        time.sleep(1)
        while not got_mqtt.empty():
            mqtt_got.append(got_mqtt.get())
        sub.disconnect()
        sub.loop_stop()
        assert mqtt_got == want, mqtt_got

        amqp_got = []
        deadline = time.time() + 30
        while "aend" not in amqp_got and time.time() < deadline:
            method, _props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                time.sleep(0.2)
                continue
            amqp_got.append(body.decode())
        assert amqp_got == want, amqp_got
        conn.close()
