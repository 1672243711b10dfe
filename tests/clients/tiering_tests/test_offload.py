"""Tiered storage against a real S3-compatible server (moto_server, started
here): 200 MB written through Kafka are offloaded, leave the bookies, and
read back byte for byte through Kafka and an AMQP stream queue, before and
after a restart; pyarrow reads the offloaded objects; a corrupted object is
refused, and a store that goes away mid-offload loses nothing."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import boto3
import pika
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from conftest import Standalone, free_port
from interop_tests.test_routes import call, cli
from tiering_tests.read_offloaded import open_table

BUCKET = "magnetar"
TOPIC = "tiered"
VALUE = 16 << 10
COUNT = 12_800  # 200 MiB of values
NS = "/admin/v2/namespaces/public/default"
TOPIC_PATH = f"/admin/v2/persistent/public/default/{TOPIC}"


class Moto:
    def __init__(self):
        self.port = free_port()
        self.proc = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self.s3().create_bucket(Bucket=BUCKET)

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def s3(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")


class Cutter:
    """A TCP proxy in front of the store that can be cut: once armed, after
    `limit` more bytes towards the store it drops every connection and
    refuses new ones until restored, as a store going away mid-upload."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.budget = None  # bytes left before the cut; None: not armed
        self.down = False
        self.socks = []
        threading.Thread(target=self.accept, daemon=True).start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def accept(self):
        while True:
            conn, _ = self.listener.accept()
            with self.lock:
                if self.down:
                    conn.close()
                    continue
                up = socket.create_connection(("127.0.0.1", self.target))
                self.socks += [conn, up]
            threading.Thread(target=self.pump, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(up, conn, False), daemon=True).start()

    def pump(self, src, dst, to_store):
        try:
            while data := src.recv(65536):
                if to_store:
                    with self.lock:
                        if self.budget is not None:
                            self.budget -= len(data)
                            if self.budget <= 0:
                                self.cut()
                                return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.down = True
        self.budget = None
        for x in self.socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socks = []

    def arm(self, limit):
        with self.lock:
            self.budget = limit

    def restore(self):
        with self.lock:
            self.down = False


@pytest.fixture(scope="module")
def moto():
    m = Moto()
    m.start()
    m.cutter = Cutter(m.port)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def tiered(moto):
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=[
            "--offload-url", f"s3://{BUCKET}/offload",
            "--offload-option", f"endpoint={moto.cutter.endpoint},region=us-east-1,"
                                "access_key_id=test,secret_access_key=test",
            "--offload-interval-ms", "500",
            "--ledger-max-mb", "16",
        ])
        s.start()
        # Keep everything; bookies drop offloaded ledgers after 1 s.
        assert call(s, "POST", f"{NS}/retention",
                    {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1})[0] == 204
        assert call(s, "POST", f"{NS}/offloadDeletionLagMs", 1000)[0] == 204
        yield s
        s.stop()


def digest(b):
    return hashlib.sha256(b).digest()


PRODUCED = {}


def produce(standalone, topic, count, size):
    """`count` random values of `size` bytes, keyed and with a header; their
    digests by offset."""
    out = {}
    failed = []

    def done(err, msg):
        if err is not None:
            failed.append(err)
        else:
            out[msg.offset()] = (msg.key(), digest(msg.value()))

    p = Producer({"bootstrap.servers": standalone.kafka, "acks": "all",
                  "linger.ms": 5, "enable.idempotence": True})
    for i in range(count):
        p.produce(topic, key=b"k%d" % i, value=os.urandom(size),
                  headers=[("i", str(i).encode())], on_delivery=done)
        p.poll(0)
    assert p.flush(120) == 0
    assert not failed, failed[:3]
    assert sorted(out) == list(range(len(out)))
    return out


def kafka_read(standalone, topic, n, timeout=120, idle=None, start=0):
    c = Consumer({"bootstrap.servers": standalone.kafka, "group.id": f"reader-{time.time()}",
                  "enable.auto.commit": False, "fetch.max.bytes": 8 << 20})
    c.assign([TopicPartition(topic, 0, start)])
    got = {}
    deadline = time.time() + timeout
    last = time.time()
    while len(got) < n and time.time() < deadline:
        m = c.poll(1)
        if m is None or m.error():
            if idle and time.time() - last > idle:
                break
            continue
        last = time.time()
        assert m.offset() not in got
        got[m.offset()] = (m.key(), digest(m.value()), m.headers())
    c.close()
    return got


def ledgers(standalone, topic=TOPIC):
    status, body = call(standalone, "GET", f"/admin/v2/persistent/public/default/{topic}/internalStats")
    assert status == 200, body
    return json.loads(body)["ledgers"]


def offload(standalone, topic, expect="SUCCESS", timeout=180):
    # The ledger being written is closed by unloading; the rest are closed.
    assert call(standalone, "PUT", f"/admin/v2/persistent/public/default/{topic}/unload")[0] == 204
    done = cli(standalone, "offload", f"persistent://public/default/{topic}")
    assert done.returncode == 0, done.stderr
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, body = call(standalone, "GET", f"/admin/v2/persistent/public/default/{topic}/offload")
        assert st == 200, body
        status = json.loads(body)
        if status["status"] not in ("RUNNING", "NOT_RUN"):
            assert status["status"] == expect, status
            return status
        time.sleep(0.5)
    raise AssertionError(f"offload still running: {status}")


def declare_stream(standalone, name):
    """A stream queue: a plain (unpartitioned) topic that Kafka and AMQP
    clients share."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", standalone.amqp_port))
    conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
    conn.close()


def offload_metric(standalone, name):
    """A `magnetar_offload_*` counter of public/default, from /metrics."""
    with urllib.request.urlopen(f"{standalone.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
               if x.name == f"magnetar_offload_{name}_total"
               and x.labels.get("namespace") == "public/default")


def test_offload_200_mb_and_the_bookies_let_go(tiered, moto):
    counted = {n: offload_metric(tiered, n) for n in ("ledgers", "bytes")}
    declare_stream(tiered, TOPIC)
    PRODUCED.update(produce(tiered, TOPIC, COUNT, VALUE))
    before = [l for l in ledgers(tiered) if l["entries"] > 0]
    assert len(before) >= 10, before
    status = offload(tiered, TOPIC)
    assert len(status["offloadedLedgers"]) == len(before)
    assert offload_metric(tiered, "ledgers") - counted["ledgers"] == len(before)
    assert offload_metric(tiered, "bytes") - counted["bytes"] > COUNT * VALUE
    # After the deletion lag the bookies' copies go.
    deadline = time.time() + 30
    while time.time() < deadline:
        now = [l for l in ledgers(tiered) if l["entries"] > 0]
        if all(l["bookieDeleted"] for l in now):
            break
        time.sleep(0.5)
    assert all(l["offloaded"] and l["bookieDeleted"] for l in now), now
    objects = moto.s3().list_objects_v2(Bucket=BUCKET, Prefix="offload/")["Contents"]
    arrow = [o for o in objects if o["Key"].endswith(".arrow")]
    assert len(arrow) == len(before)
    assert sum(o["Size"] for o in arrow) > COUNT * VALUE


def check_all(got):
    assert len(got) == COUNT
    for off, (key, d) in PRODUCED.items():
        k, g, headers = got[off]
        assert (k, g) == (key, d), off
        assert headers == [("i", str(int(key[1:])).encode())]


def test_kafka_reads_everything_back_from_offset_0(tiered):
    check_all(kafka_read(tiered, TOPIC, COUNT))


def test_an_amqp_stream_queue_reads_everything_from_first(tiered):
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", tiered.amqp_port))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    seen = 0
    for method, props, body in ch.consume(TOPIC, arguments={"x-stream-offset": "first"},
                                          inactivity_timeout=30):
        assert method is not None, f"stalled after {seen}"
        off = props.headers["x-stream-offset"]
        assert off == seen
        assert digest(body) == PRODUCED[off][1], off
        ch.basic_ack(method.delivery_tag)
        seen += 1
        if seen == COUNT:
            break
    ch.cancel()
    conn.close()
    assert seen == COUNT


def test_pyarrow_reads_an_offloaded_object(tiered, moto):
    first = [l for l in ledgers(tiered) if l["entries"] > 0][0]
    table = open_table(first["offloadedObject"], moto.endpoint, BUCKET)
    offsets = table["offset"].to_pylist()
    assert offsets == list(range(first["firstOffset"], first["firstOffset"] + first["offsets"]))
    assert table.num_rows == first["offsets"]
    for off, key, value in zip(offsets, table["key"].to_pylist(), table["value"].to_pylist()):
        assert (key, digest(value)) == PRODUCED[off]
    # The command-line form prints the same count.
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "read_offloaded.py"),
                          first["offloadedObject"], "--endpoint", moto.endpoint, "--bucket", BUCKET],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"rows={first['offsets']}" in out.stdout


def test_reads_still_work_after_a_restart(tiered):
    tiered.restart()
    check_all(kafka_read(tiered, TOPIC, COUNT))


def test_a_corrupted_object_is_refused_never_served(tiered, moto):
    s3 = moto.s3()
    first = [l for l in ledgers(tiered) if l["entries"] > 0][0]
    key = first["offloadedObject"]
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    bad = bytearray(original)
    bad[len(bad) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(bad))
    tiered.restart()  # no cached blocks
    got = kafka_read(tiered, TOPIC, COUNT, timeout=30, idle=8)
    # What arrives is exact and in order, and stops at the bad block.
    assert len(got) < first["offsets"]
    assert sorted(got) == list(range(len(got)))
    for off, (k, d, _) in got.items():
        assert (k, d) == PRODUCED[off]
    assert "refused" in tiered.tail(400) or "checksum" in tiered.tail(400)
    # The error was retriable: with the object repaired, reading goes on.
    s3.put_object(Bucket=BUCKET, Key=key, Body=original)
    check_all(kafka_read(tiered, TOPIC, COUNT))


def test_the_store_stopping_mid_offload_loses_nothing(tiered, moto):
    topic = "tiered-faults"
    declare_stream(tiered, topic)
    produced = produce(tiered, topic, 6000, VALUE)  # 94 MiB: 6 ledgers
    # The store goes away 40 MB into the offload: inside the third ledger.
    moto.cutter.arm(40 << 20)
    errors = offload_metric(tiered, "errors")
    status = offload(tiered, topic, expect="ERROR", timeout=120)
    assert status["lastError"], status
    assert offload_metric(tiered, "errors") > errors
    assert len(status["offloadedLedgers"]) == 2, status
    now = [l for l in ledgers(tiered, topic) if l["entries"] > 0]
    assert [l["offloaded"] for l in now] == [True, True] + [False] * (len(now) - 2), now
    # What was not offloaded is still on the bookies, whole. (The two that
    # were may have left the bookies after the lag; they wait for the store.)
    assert not any(l["bookieDeleted"] for l in now[2:])
    rest = now[2]["firstOffset"]
    got = kafka_read(tiered, topic, len(produced) - rest, start=rest)
    assert {o: (k, d) for o, (k, d, _) in got.items()} == \
        {o: v for o, v in produced.items() if o >= rest}
    # The store comes back: a retry offloads the rest, the bookies let go,
    # and everything reads back from the store.
    moto.cutter.restore()
    status = offload(tiered, topic)
    assert len(status["offloadedLedgers"]) == len(now) - 2, status
    deadline = time.time() + 30
    while time.time() < deadline:
        now = [l for l in ledgers(tiered, topic) if l["entries"] > 0]
        if all(l["bookieDeleted"] for l in now):
            break
        time.sleep(0.5)
    assert all(l["offloaded"] and l["bookieDeleted"] for l in now), now
    got = kafka_read(tiered, topic, len(produced))
    assert {o: (k, d) for o, (k, d, _) in got.items()} == produced
