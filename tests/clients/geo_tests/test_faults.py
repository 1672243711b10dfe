"""Faults between and inside regions: the target killed and restarted,
the link cut for a minute, the target frozen, and the source
partition's owner killed mid-stream, and the target killed while it
routes an exchange's messages into a queue. Afterwards every message the
source acknowledged is in the target exactly once, and the receiver's
duplicate counter shows that resends happened and were absorbed."""

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter

from conftest import BIN, free_port
from faultproxy import FaultProxy
from geo_tests.regions import (NS, connect, metric, ok, partitioned, regions, register,
                               replicate_default, replication, wait_for)
from geo_tests.test_replication import consume
from interop_tests.test_routes import call
from confluent_kafka import Producer
import pika


class Paced:
    """A producer thread writing `n` numbered records at about `rate` per
    second; `acked` holds the numbers the source acknowledged."""

    def __init__(self, bootstrap, topic, n, rate):
        self.acked = set()
        self.errors = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(bootstrap, topic, n, rate))
        self.thread.start()

    def run(self, bootstrap, topic, n, rate):
        p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                      "linger.ms": 5, "message.timeout.ms": 120_000})

        def done(err, m):
            if err is None:
                self.acked.add(int(m.value().split(b"-")[1]))
            else:
                self.errors += 1
        start = time.time()
        for i in range(n):
            p.produce(topic, key=str(i % 31).encode(), value=f"east-{i:08d}-".encode() * 8,
                      on_delivery=done)
            p.poll(0)
            ahead = i / rate - (time.time() - start)
            if ahead > 0:
                time.sleep(ahead)
        p.flush(180)
        self.done.set()

    def join(self):
        self.thread.join()


def numbers(region, topic, partitions, expected):
    got = consume(region, topic, partitions, expected, timeout=180)
    return Counter(int(m.value().split(b"-")[1]) for msgs in got.values() for m in msgs)


def test_target_killed_link_cut_and_region_frozen_lose_and_duplicate_nothing():
    with regions(["east", "west"]) as r:
        east, west = r["east"], r["west"]
        # East reaches west only through the proxy.
        proxy = FaultProxy(west.ports["http"])
        try:
            register(east, "west", proxy.url)
            partitioned([east], "faults", 3)
            producer = Paced(east.kafka, "faults", 60_000, 600)
            wait_for("replication under way",
                     lambda: replication(east, "faults", "west").get("msgOutCounter", 0) > 1000)
            # The target dies and comes back on its own data.
            west.kill()
            west.start()
            wait_for("replication resumed",
                     lambda: replication(east, "faults", "west").get("connected"), timeout=60)
            # West stores what it gets but its answers are lost, then the
            # link goes for a minute: what west stored comes again and is
            # absorbed. Meanwhile the backlog waits in east.
            proxy.pause_replies()
            time.sleep(5)
            proxy.cut()
            wait_for("disconnected", lambda: not replication(east, "faults", "west").get("connected", True))
            time.sleep(20)
            assert replication(east, "faults", "west")["replicationBacklog"] > 0
            assert metric(east, "pulsar_replication_backlog", [("remoteCluster", "west")]) > 0
            time.sleep(40)
            proxy.heal()
            # Frozen: the connections hold, nothing answers.
            time.sleep(5)
            os.kill(west.proc.pid, signal.SIGSTOP)
            time.sleep(15)
            os.kill(west.proc.pid, signal.SIGCONT)
            producer.join()
            assert producer.errors == 0 and len(producer.acked) == 60_000
            wait_for("the backlog drained",
                     lambda: replication(east, "faults", "west").get("replicationBacklog") == 0
                     and replication(east, "faults", "west").get("state") == "running",
                     timeout=120)
            got = numbers(west, "faults", 3, 60_000)
            assert set(got) == producer.acked
            assert set(got.values()) == {1}, [n for n, c in got.items() if c > 1][:10]
            assert metric(west, "magnetar_replication_duplicates_total") > 0
        finally:
            proxy.close()


def spawn(args, log, until, timeout=60):
    f = open(log, "a")
    p = subprocess.Popen([BIN, *args], stdout=subprocess.PIPE, stderr=f, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if until in line:
            return p
        if not line and p.poll() is not None:
            break
    p.kill()
    raise AssertionError(f"{args[0]} did not start: {open(log).read()[-3000:]}")


class Brokers:
    """East as a cluster of processes: one metadata node, one bookie and
    two brokers, whose ownership moves when one dies."""

    def __init__(self, d):
        self.d = d
        self.meta = f"127.0.0.1:{free_port()}"
        self.procs = [
            spawn(["meta", "--id", "1", "--listen", self.meta, "--http-listen", "127.0.0.1:0",
                   "--data-dir", os.path.join(d, "meta")], os.path.join(d, "meta.log"), "listening on"),
            spawn(["bookie", "--id", "1", "--listen", f"127.0.0.1:{free_port()}",
                   "--http-listen", "127.0.0.1:0", "--meta", self.meta,
                   "--data-dir", os.path.join(d, "bookie"), "--session-ttl-ms", "2000",
                   "--disk-usage-threshold", "0.999"], os.path.join(d, "bookie.log"), "listening on"),
        ]
        self.brokers = []
        for i in range(2):
            http, kafka = free_port(), free_port()
            p = spawn(["broker", "--meta", self.meta, "--cluster", "east",
                       "--http-listen", f"127.0.0.1:{http}", "--kafka-listen", f"127.0.0.1:{kafka}",
                       "--amqp-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0",
                       "--ensemble", "1", "--write-quorum", "1", "--ack-quorum", "1",
                       "--session-ttl-ms", "2000", "--kafka-namespace", NS,
                       "--geo-rescan-ms", "1000", "--geo-backoff-max-ms", "2000"],
                      os.path.join(d, f"broker{i}.log"), "ready")
            self.procs.append(p)
            self.brokers.append((p, f"http://127.0.0.1:{http}", f"127.0.0.1:{kafka}"))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class At:
    """An admin endpoint, as `call` takes it."""

    def __init__(self, http):
        self.http = http


def test_the_source_owner_killed_mid_stream():
    with tempfile.TemporaryDirectory(prefix="magnetar-geo-east-") as d, \
            regions(["west"], replicate=["west"]) as r:
        west = r["west"]
        east = Brokers(d)
        try:
            a, b = At(east.brokers[0][1]), At(east.brokers[1][1])
            register(a, "west", west.http)
            register(west, "east", a.http)
            ok(call(a, "PUT", "/admin/v2/tenants/geo", {"allowedClusters": ["east", "west"]}))
            ok(call(west, "POST", "/admin/v2/tenants/geo", {"allowedClusters": ["east", "west"]}))
            ok(call(a, "PUT", f"/admin/v2/namespaces/{NS}", {}))
            for s in (a, west):
                ok(call(s, "POST", f"/admin/v2/namespaces/{NS}/replication", ["east", "west"]))
            partitioned([a], "owned", 2)
            bootstrap = ",".join(k for _, _, k in east.brokers)
            producer = Paced(bootstrap, "owned", 40_000, 2000)
            wait_for("replication under way",
                     lambda: replication(a, "owned", "west").get("msgOutCounter", 0) > 2000)
            # Kill the owner of a partition, with its replicator.
            status, body = call(a, "GET", f"/lookup/v2/topic/persistent/{NS}/owned-partition-0")
            assert status == 200, body
            owner_url = json.loads(body)["httpUrl"]
            owner = next(p for p, url, _ in east.brokers if url == owner_url)
            owner.kill()
            producer.join()
            assert producer.errors == 0, producer.errors
            survivor = next(At(url) for p, url, _ in east.brokers if p is not owner)
            wait_for("the backlog drained after takeover",
                     lambda: replication(survivor, "owned", "west").get("replicationBacklog") == 0
                     and replication(survivor, "owned", "west").get("msgOutCounter", 0) > 0,
                     timeout=120)
            got = numbers(west, "owned", 2, len(producer.acked))
            assert producer.acked <= set(got)
            assert set(got.values()) == {1}, [n for n, c in got.items() if c > 1][:10]
            assert metric(west, "magnetar_replication_duplicates_total") > 0
        finally:
            east.stop()


def test_routed_in_messages_reach_a_queue_once_across_a_kill_of_the_target():
    """Exchange federation across a crash: west routes what east's
    `amq.topic` captured into a durable queue, and is SIGKILLed while it
    does. Whatever west had appended but not yet marked as routed is
    routed again after the restart, and the queue's watermark for the
    stream keeps it from being stored twice."""
    n = 6000
    with regions(["east", "west"]) as r:
        east, west = r["east"], r["west"]
        replicate_default([east, west])
        tag = f"{time.time_ns() % 1_000_000}"
        q = f"ri-{tag}"
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", west.amqp_port))
        ch = conn.channel()
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, "amq.topic", routing_key=f"ri.{tag}.#")
        conn.close()

        confirmed = []

        def publish():
            pconn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", east.amqp_port))
            pch = pconn.channel()
            pch.confirm_delivery()
            for i in range(n):
                pch.basic_publish("amq.topic", f"ri.{tag}.m", str(i).encode(),
                                  pika.BasicProperties(delivery_mode=2))
                confirmed.append(i)
            pconn.close()
        t = threading.Thread(target=publish)
        t.start()
        wait_for("routing under way", lambda: len(confirmed) > n // 4, timeout=120)
        west.kill()
        west.start()
        t.join()
        assert len(confirmed) == n

        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", west.amqp_port))
        ch = conn.channel()
        got = Counter()
        deadline = time.time() + 120
        quiet_since = None
        while time.time() < deadline:
            method, _props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                # Everything came; wait a little longer for any second copy.
                if len(got) == n:
                    quiet_since = quiet_since or time.time()
                    if time.time() - quiet_since > 3:
                        break
                time.sleep(0.2)
                continue
            quiet_since = None
            got[int(body)] += 1
        conn.close()
        assert set(got) == set(range(n)), sorted(set(range(n)) - set(got))[:10]
        assert set(got.values()) == {1}, [k for k, c in got.items() if c > 1][:10]
