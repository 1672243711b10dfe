"""Decompression bombs: record batches of a few kilobytes that inflate to
a gigabyte, produced through Kafka with gzip and zstd. They are refused
(CORRUPT_MESSAGE) and never stored, and the broker's memory stays bounded
while AMQP, MQTT and WebSocket consumers read the topic."""

import json
import os
import queue
import struct
import subprocess
import threading
import time
import uuid
import zlib

import paho.mqtt.client as mqtt
import pika
import zstandard
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect

BIN = os.environ.get("MAGNETAR_BIN", "magnetar")
GIB = 1 << 30
CORRUPT_MESSAGE = 2
INVALID_PRODUCER_ID_MAPPING = 49
INVALID_RECORD = 87


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def varint(n):
    n = (n << 1) ^ (n >> 63)  # zigzag
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def bomb_records(codec, size):
    """One record whose value is `size` zero bytes, compressed as a
    stream so that the test never holds the inflated form."""
    body_head = b"\x00" + varint(0) + varint(0) + varint(-1) + varint(size)
    length = len(body_head) + size + 1  # and a zero header count
    head = varint(length) + body_head
    if codec == 1:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
    else:
        c = zstandard.ZstdCompressor(level=3).compressobj()
    out = [c.compress(head)]
    chunk = bytes(1 << 20)
    for _ in range(size // len(chunk)):
        out.append(c.compress(chunk))
    out.append(c.compress(b"\x00"))
    out.append(c.flush())
    return b"".join(out)


def plain_record(value):
    body = b"\x00" + varint(0) + varint(0) + varint(-1) + varint(len(value)) + value + varint(0)
    return varint(len(body)) + body


def record_batch(codec, records, attributes=0, last_offset_delta=0, producer_id=-1, epoch=-1,
                 count=1):
    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", codec | attributes, last_offset_delta, now, now,
                            producer_id, epoch, -1 if producer_id < 0 else 0, count) + records
    crc = crc32c(after_crc)
    after_length = struct.pack(">ibI", -1, 2, crc) + after_crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


def produce_raw(port, topic, batch, transactional_id=None):
    """A Produce v7 request with one batch for partition 0; the error code."""
    t = topic.encode()
    body = struct.pack(">hhi", 0, 7, 1) + struct.pack(">h", 4) + b"bomb"
    if transactional_id is None:
        body += struct.pack(">h", -1)
    else:
        body += struct.pack(">h", len(transactional_id)) + transactional_id.encode()
    body += struct.pack(">hi", -1, 30000)
    body += struct.pack(">i", 1) + struct.pack(">h", len(t)) + t
    body += struct.pack(">i", 1) + struct.pack(">i", 0) + struct.pack(">i", len(batch)) + batch
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        head = s.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack(">i", head)
        resp = b""
        while len(resp) < n:
            resp += s.recv(n - len(resp))
    # correlation id, topics count, name, partitions count, index, error.
    at = 4 + 4
    (name_len,) = struct.unpack(">h", resp[at:at + 2])
    at += 2 + name_len + 4 + 4
    (error,) = struct.unpack(">h", resp[at:at + 2])
    return error


def test_gzip_and_zstd_bombs_are_refused_and_memory_stays_bounded(standalone):
    s = standalone
    tag = uuid.uuid4().hex[:6]
    q = f"bombs-{tag}"
    # The topic is an AMQP queue (Kafka's partition 0 is the topic itself),
    # read by AMQP, by a WebSocket consumer, and by MQTT through a route.
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
    ch = conn.channel()
    ch.queue_declare(q, durable=True)
    route = subprocess.run([BIN, "admin", "--url", s.http, "topics", "route", q, "amq.topic",
                            "--routing-key", f"bombs.{tag}"], capture_output=True, text=True, timeout=30)
    assert route.returncode == 0, route.stderr
    mqtt_got = queue.Queue()
    subscribed = queue.Queue()
    m = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bombs-{tag}")
    m.on_message = lambda _c, _u, msg: mqtt_got.put(msg.payload)
    connected = queue.Queue()
    m.on_connect = lambda *a: connected.put(True)
    m.on_subscribe = lambda *a: subscribed.put(True)
    m.connect("127.0.0.1", s.mqtt_port)
    m.loop_start()
    connected.get(timeout=60)
    m.subscribe(f"bombs/{tag}", qos=1)
    subscribed.get(timeout=60)
    ws = connect(f"{s.http.replace('http://', 'ws://')}/ws/v2/consumer/persistent/public/default/{q}/ws"
                 "?subscriptionInitialPosition=Earliest", open_timeout=10)

    peak = [s.rss_mb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], s.rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for codec, name in [(1, "gzip"), (4, "zstd")]:
            records = bomb_records(codec, GIB)
            batch = record_batch(codec, records)
            print(f"{name} bomb: {len(batch)} bytes inflating to {GIB}")
            assert produce_raw(s.ports["kafka"], q, batch) == CORRUPT_MESSAGE, name
            assert s.alive(), s.tail()

        # A real producer's messages after the bombs reach every consumer.
        p = Producer({"bootstrap.servers": s.kafka, "compression.type": "zstd"})
        for i in range(3):
            p.produce(q, value=b"after-%d" % i)
        assert p.flush(30) == 0

        got = []
        for method, _, body in ch.consume(q, inactivity_timeout=15):
            assert method is not None, got
            got.append(body)
            ch.basic_ack(method.delivery_tag)
            if len(got) == 3:
                break
        ch.cancel()
        assert got == [b"after-0", b"after-1", b"after-2"]
        ws_got = []
        while len(ws_got) < 3:
            frame = json.loads(ws.recv(timeout=15))
            import base64
            ws_got.append(base64.b64decode(frame["payload"]))
            ws.send(json.dumps({"messageId": frame["messageId"]}))
        assert ws_got == got
        assert [mqtt_got.get(timeout=15) for _ in range(3)] == got
    finally:
        stop.set()
        sampler.join()
        ws.close()
        m.loop_stop()
        conn.close()
    print(f"peak broker RSS {peak[0]:.0f} MiB")
    assert peak[0] < 512, peak[0]
    assert s.alive(), s.tail()


def test_batches_that_lie_about_themselves_are_refused(standalone):
    """A transactional batch outside any transaction (which would freeze
    the partition's last stable offset), and a batch claiming more offsets
    than it has records."""
    from confluent_kafka import Consumer, TopicPartition
    s = standalone
    topic = f"sanity-{uuid.uuid4().hex[:6]}"
    p = Producer({"bootstrap.servers": s.kafka})
    p.produce(topic, value=b"first")
    assert p.flush(30) == 0

    stray = record_batch(0, plain_record(b"stray"), attributes=0x10, producer_id=999_999, epoch=0)
    assert produce_raw(s.ports["kafka"], topic, stray, transactional_id="ghost") \
        == INVALID_PRODUCER_ID_MAPPING
    gapped = record_batch(0, plain_record(b"gapped"), last_offset_delta=1000)
    assert produce_raw(s.ports["kafka"], topic, gapped) == INVALID_RECORD

    p.produce(topic, value=b"second")
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": s.kafka, "group.id": topic,
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + 20
    while len(got) < 2 and time.time() < deadline:
        m = c.poll(1)
        if m is not None and m.error() is None:
            got.append((m.offset(), m.value()))
    c.close()
    # Nothing of either batch was stored, and read_committed readers go on.
    assert got == [(0, b"first"), (1, b"second")], got
