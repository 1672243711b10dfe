"""Every listener bounds what a silent or slow client can hold: idle
connections go after the handshake timeout (the client protocols, HTTP,
and the metadata and bookie gRPC planes), a flood beyond the connection
limit is refused at once, and a client trickling HTTP header bytes
(slowloris) is dropped; meanwhile connected clients carry on."""

import os
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import Consumer, Producer
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Standalone

HERE = os.path.dirname(os.path.abspath(__file__))
FLOOD = 20_000
# Shorter than the 10 s default, to keep the suite quick; the mechanism is
# the same.
HANDSHAKE_S = 5


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--handshake-timeout-ms", str(HANDSHAKE_S * 1000)])
        s.start()
        yield s
        s.stop()


def flood(port, count, wait_s):
    """Helper processes of at most 9,000 connections each (the descriptor
    limit of one process may be 20,000)."""
    procs = []
    left = count
    per_process = max(100, min(9000, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200))
    while left > 0:
        n = min(left, per_process)
        left -= n
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "flood.py"), str(port), str(n), str(wait_s)],
            stdout=subprocess.PIPE, text=True))
    return procs


def flood_results(procs):
    closed = total = 0
    for p in procs:
        out, _ = p.communicate(timeout=300)
        line = out.strip().splitlines()[-1]
        c, _, t = line.removeprefix("closed ").partition(" of ")
        closed, total = closed + int(c), total + int(t)
    return closed, total


class RealClients:
    """Clients connected before the flood, used while it lasts."""

    def __init__(self, s):
        self.s = s
        tag = uuid.uuid4().hex[:6]
        self.topic = f"live-{tag}"
        self.producer = Producer({"bootstrap.servers": s.kafka})
        self.producer.produce(self.topic, b"warm-up")
        assert self.producer.flush(30) == 0
        self.amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
        self.ch = self.amqp.channel()
        self.queue = f"live-{tag}"
        self.ch.queue_declare(self.queue)
        self.got = queue.Queue()
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"live-{tag}")
        connected, subscribed = queue.Queue(), queue.Queue()
        self.mqtt.on_message = lambda _c, _u, m: self.got.put(m.payload)
        self.mqtt.on_connect = lambda *a: connected.put(True)
        self.mqtt.on_subscribe = lambda *a: subscribed.put(True)
        self.mqtt.connect("127.0.0.1", s.mqtt_port)
        self.mqtt.loop_start()
        # Generous: the suites share two cores, and this is the first
        # MQTT session of a new standalone.
        connected.get(timeout=60)
        self.mqtt.subscribe(f"live/{tag}", qos=1)
        subscribed.get(timeout=60)
        self.mqtt_topic = f"live/{tag}"
        self.n = 0

    def round_trip(self):
        """One message through each protocol's existing connection."""
        self.n += 1
        self.producer.produce(self.topic, b"k-%d" % self.n)
        assert self.producer.flush(30) == 0
        self.ch.basic_publish("", self.queue, b"a-%d" % self.n)
        method, _, body = self.ch.basic_get(self.queue, auto_ack=True)
        for _ in range(50):
            if method is not None:
                break
            self.amqp.sleep(0.1)
            method, _, body = self.ch.basic_get(self.queue, auto_ack=True)
        assert body == b"a-%d" % self.n
        self.mqtt.publish(self.mqtt_topic, b"m-%d" % self.n, qos=1).wait_for_publish(10)
        assert self.got.get(timeout=30) == b"m-%d" % self.n

    def close(self):
        self.mqtt.loop_stop()
        self.mqtt.disconnect()
        self.amqp.close()


# meta and bookie: the gRPC listeners of the embedded metadata node and
# bookie, which the broker itself uses throughout the flood.
@pytest.mark.parametrize("listener", ["kafka", "amqp", "mqtt", "http", "meta", "bookie"])
def test_idle_connections_go_after_the_handshake_timeout(server, listener):
    live = RealClients(server)
    live.round_trip()
    time.sleep(1)
    fds_before, rss_before = server.open_fds(), server.rss_mb()
    procs = flood(server.ports[listener], FLOOD, HANDSHAKE_S + 20)
    # The broker keeps serving its connected clients through the flood.
    deadline = time.time() + HANDSHAKE_S
    rounds = 0
    while time.time() < deadline:
        live.round_trip()
        rounds += 1
    peak_fds, peak_rss = server.open_fds(), server.rss_mb()
    closed, total = flood_results(procs)
    assert (closed, total) == (FLOOD, FLOOD), f"{listener}: {closed} of {total} closed"
    assert server.alive(), server.tail()
    live.round_trip()
    # New clients get in again.
    with urllib.request.urlopen(f"{server.http}/admin/v2/brokers/health", timeout=10) as r:
        assert r.status == 200
    # The allocator hands freed memory back to the system over a few
    # seconds; give it that long before judging.
    deadline = time.time() + 20
    while True:
        fds_after, rss_after = server.open_fds(), server.rss_mb()
        settled = fds_after <= fds_before + 16 and rss_after <= rss_before + 64
        if settled or time.time() > deadline:
            break
        time.sleep(0.5)
    live.close()
    print(f"{listener}: rounds={rounds} fds {fds_before}->{peak_fds}->{fds_after} "
          f"rss_mb {rss_before:.0f}->{peak_rss:.0f}->{rss_after:.0f}")
    assert fds_after <= fds_before + 16, (fds_before, fds_after)
    assert rss_after <= rss_before + 64, (rss_before, rss_after)


def test_a_slowloris_http_client_is_dropped(server):
    s = socket.create_connection(("127.0.0.1", server.ports["http"]), timeout=30)
    request = b"GET /admin/v2/brokers/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.time()
    dropped = None
    for b in request:
        try:
            s.sendall(bytes([b]))
        except OSError:
            dropped = time.time() - started
            break
        s.settimeout(5)
        try:
            if s.recv(1024) == b"":
                dropped = time.time() - started
                break
        except socket.timeout:
            continue
        except OSError:
            dropped = time.time() - started
            break
    s.close()
    assert dropped is not None, "still connected after every byte"
    assert dropped < HANDSHAKE_S + 6, dropped
    with urllib.request.urlopen(f"{server.http}/admin/v2/brokers/health", timeout=10) as r:
        assert r.status == 200


def test_a_flood_over_the_connection_limit_is_refused_at_once():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--max-connections", "100", "--max-connections-per-ip", "50"])
        s.start()
        try:
            # Per address: the 51st connection from 127.0.0.1 is closed at once.
            held = [socket.create_connection(("127.0.0.1", s.ports["kafka"]), timeout=5)
                    for _ in range(50)]
            extra = socket.create_connection(("127.0.0.1", s.ports["kafka"]), timeout=5)
            extra.settimeout(5)
            assert extra.recv(1) == b""
            extra.close()
            for h in held:
                h.close()
            time.sleep(0.5)
            # Once they are gone, clients get in again.
            c = Consumer({"bootstrap.servers": s.kafka, "group.id": "after"})
            assert c.list_topics(timeout=10) is not None
            c.close()
        finally:
            s.stop()
