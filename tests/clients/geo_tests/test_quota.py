"""The backlog quota counts what waits for another region, and message
TTL expires it. With west cut off, east's producers are refused once the
replication backlog passes a 1 MiB `producer_exception` quota (Kafka
POLICY_VIOLATION, MQTT v5 PUBACK 0x97, AMQP basic.nack), and accepted
again once the link heals and the backlog drains; everything
acknowledged reaches west once."""

import json
import queue
import time
import uuid
from collections import Counter

import paho.mqtt.client as mqtt
import pika
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from faultproxy import FaultProxy
from geo_tests.regions import NS as GEO_NS
from geo_tests.regions import ok, register, regions, replicate_default, wait_for
from interop_tests.test_routes import call

NS = "public/default"
LIMIT = 1 << 20


def kafka_burst(region, topic, n, tag):
    """Produces `n` 1 KiB records; returns (acked numbers, error codes)."""
    acked, errors = [], []
    p = Producer({"bootstrap.servers": region.kafka, "enable.idempotence": False,
                  "retries": 0, "linger.ms": 5, "batch.size": 16384})

    def done(err, m):
        if err is None:
            acked.append(int(m.value()[:8]))
        else:
            errors.append(err.code())
    for i in range(n):
        p.produce(topic, value=f"{tag + i:08d}".encode() + b"x" * 1016, on_delivery=done)
        p.poll(0)
        if i % 64 == 63:
            p.flush(30)
    p.flush(30)
    return acked, errors


def mqtt_burst(region, topic, n):
    """Publishes `n` 1 KiB QoS 1 messages over MQTT v5; returns the PUBACK
    reason codes."""
    codes = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"quota-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.on_publish = lambda _c, _u, _mid, rc, _p: codes.put(rc.value)
    gone = []
    c.on_disconnect = lambda _c, _u, _f, rc, _p: gone.append(rc)
    connected = queue.Queue()
    c.on_connect = lambda *a: connected.put(True)
    c.connect("127.0.0.1", region.mqtt_port)
    c.loop_start()
    connected.get(timeout=10)
    try:
        for _ in range(n):
            assert not gone, f"disconnected: {gone}, after {codes.qsize()} acks"
            c.publish(topic, b"m" * 1024, qos=1).wait_for_publish(20)
    finally:
        c.disconnect()
        c.loop_stop()
    return [codes.get() for _ in range(codes.qsize())]


def amqp_refused(region, routing_key):
    """Whether a confirmed 1 KiB publish to amq.topic is refused."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", region.amqp_port))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        try:
            ch.basic_publish("amq.topic", routing_key, b"a" * 1024,
                             pika.BasicProperties(delivery_mode=2))
        except pika.exceptions.NackError as e:
            return str(e)
        return None
    finally:
        if conn.is_open:
            conn.close()


def backlog(region, topic):
    status, body = call(region, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")
    assert status == 200, body
    return json.loads(body).get("replication", {}).get("west", {}).get("replicationBacklog")


def test_backlog_quota_counts_the_replication_backlog_while_the_remote_is_away():
    with regions(["east", "west"], kafka_ns=NS) as r:
        east, west = r["east"], r["west"]
        replicate_default([east, west])
        proxy = FaultProxy(west.ports["http"])
        try:
            register(east, "west", proxy.url)
            ok(call(east, "POST", f"/admin/v2/namespaces/{NS}/backlogQuota",
                    {"limitSize": LIMIT, "policy": "producer_exception"}))
            ok(call(east, "PUT", f"/admin/v2/persistent/{NS}/quota"))
            # West subscribes over MQTT and AMQP before the cut, so that
            # the exchange's capture topic replicates.
            conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", west.amqp_port))
            ch = conn.channel()
            ch.queue_declare("quota-q", durable=True)
            ch.queue_bind("quota-q", "amq.topic", routing_key="quota.#")
            conn.close()
            acked, errors = kafka_burst(east, "quota", 100, 0)
            assert len(acked) == 100 and not errors, errors
            wait_for("west connected", lambda: backlog(east, "quota") == 0)

            proxy.cut()
            acked_cut, errors = kafka_burst(east, "quota", 4096, 100)
            assert errors, "the quota never refused a Kafka producer"
            assert set(errors) == {KafkaError.POLICY_VIOLATION}, errors
            # Ledger granularity, as Pulsar measures it: the first records
            # are in the backlog's ledger too.
            assert LIMIT // 2048 <= len(acked_cut) < 4096, len(acked_cut)

            codes = mqtt_burst(east, "quota/m", 2048)
            assert 0x97 in codes, Counter(codes)
            # As RabbitMQ's reject-publish: the confirm is a nack.
            assert "NACK" in (amqp_refused(east, "quota.a") or ""), "AMQP publish accepted"

            proxy.heal()
            wait_for("backlog drained", lambda: backlog(east, "quota") == 0, timeout=120)
            extra, attempts = [], []

            def kafka_again():
                a, e = kafka_burst(east, "quota", 10, 100_000 + 100 * len(attempts))
                attempts.append(1)
                extra.extend(a)
                return not e
            wait_for("Kafka accepted again", kafka_again, timeout=60)
            # The exchange's capture topic drains on its own.
            wait_for("MQTT accepted again",
                     lambda: set(mqtt_burst(east, "quota/m", 5)) == {0}, timeout=60)
            wait_for("AMQP accepted again", lambda: amqp_refused(east, "quota.a") is None,
                     timeout=60)

            # Everything acknowledged is in west once.
            want = acked + acked_cut + extra
            c = Consumer({"bootstrap.servers": west.kafka, "group.id": "quota-check",
                          "enable.auto.commit": False})
            c.assign([TopicPartition("quota", 0, 0)])
            got = []
            deadline = time.time() + 120
            while len(got) < len(want) and time.time() < deadline:
                m = c.poll(0.5)
                if m is not None and not m.error():
                    got.append(int(m.value()[:8]))
            time.sleep(1)
            while (m := c.poll(0.5)) is not None:
                if not m.error():
                    got.append(int(m.value()[:8]))
            c.close()
            assert Counter(got) == Counter(want)
        finally:
            proxy.close()


def test_message_ttl_expires_what_waits_for_an_absent_region_and_counts_it():
    """Pulsar's TTL applies to replicators too: what expires while west is
    away is never sent, counted as `replicationSkipped`; what comes after
    replicates once."""
    with regions(["east", "west"], extra=["--retention-interval-s", "1"]) as r:
        east, west = r["east"], r["west"]
        proxy = FaultProxy(west.ports["http"])
        try:
            register(east, "west", proxy.url)
            ok(call(east, "PUT", f"/admin/v2/persistent/{GEO_NS}/ttl"))
            before, errors = kafka_burst(east, "ttl", 10, 0)
            assert len(before) == 10 and not errors, errors

            def west_values():
                c = Consumer({"bootstrap.servers": west.kafka, "group.id": uuid.uuid4().hex,
                              "enable.auto.commit": False})
                c.assign([TopicPartition("ttl", 0, 0)])
                got, idle = [], time.time()
                while time.time() - idle < 2:
                    m = c.poll(0.2)
                    if m is not None and not m.error():
                        got.append(int(m.value()[:8]))
                        idle = time.time()
                c.close()
                return got
            wait_for("the first records in west", lambda: len(west_values()) == 10)

            proxy.cut()
            ok(call(east, "POST", f"/admin/v2/namespaces/{GEO_NS}/messageTTL", 2))
            expired, errors = kafka_burst(east, "ttl", 100, 100)
            assert len(expired) == 100 and not errors, errors
            # Past the TTL and a retention run or two.
            time.sleep(6)
            ok(call(east, "DELETE", f"/admin/v2/namespaces/{GEO_NS}/messageTTL"))
            proxy.heal()
            after, errors = kafka_burst(east, "ttl", 10, 1000)
            assert len(after) == 10 and not errors, errors

            def skipped():
                status, body = call(east, "GET", f"/admin/v2/persistent/{GEO_NS}/ttl/stats")
                assert status == 200, body
                return json.loads(body)["replication"]["west"].get("replicationSkipped", 0)
            wait_for("replicationSkipped", lambda: skipped() >= 100)
            assert skipped() == 100
            assert Counter(west_values()) == Counter(before + after)
        finally:
            proxy.close()
