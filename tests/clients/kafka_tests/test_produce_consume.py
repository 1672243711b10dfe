"""Produce and consume with librdkafka (confluent-kafka), kafka-python and
kcat: every compression codec, acks=all, keys, headers and timestamps."""

import os
import random
import subprocess
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def create(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fs = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    for f in fs.values():
        f.result(30)


def consume_all(bootstrap, topic, partitions, expected, timeout=120):
    """Reads every partition from the start, by assign(), until `expected`
    messages arrived; returns them per partition in arrival order."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"reader-{topic}",
        "enable.auto.commit": False,
        "fetch.max.bytes": 8 << 20,
    })
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = {p: [] for p in range(partitions)}
    n = 0
    deadline = time.time() + timeout
    while n < expected and time.time() < deadline:
        for m in c.consume(10000, 1.0):
            assert m.error() is None, m.error()
            got[m.partition()].append(
                (m.offset(), m.key(), m.value(), m.headers() or [], m.timestamp()[1])
            )
            n += 1
    c.close()
    assert n == expected, f"{n} of {expected} messages consumed"
    return got


@pytest.mark.parametrize("codec", CODECS)
def test_100k_per_codec_with_acks_all_come_back_identical(standalone, codec):
    topic = f"codec-{codec}"
    create(standalone.kafka, topic, 3)
    rnd = random.Random(codec)
    p = Producer({
        "bootstrap.servers": standalone.kafka,
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": codec,
        "linger.ms": 5,
    })
    sent = {}
    errors = []

    def on_delivery(err, msg):
        if err:
            errors.append(err)
        else:
            sent[(msg.partition(), msg.offset())] = msg

    base_ts = int(time.time() * 1000) - 3_600_000
    records = []
    for i in range(100_000):
        key = b"key-%d" % (i % 997)
        value = os.urandom(rnd.randint(0, 300)) if i % 10 else b""
        headers = [("seq", b"%d" % i), ("empty", b"")]
        ts = base_ts + i
        records.append((key, value, headers, ts))
        while True:
            try:
                p.produce(topic, key=key, value=value, headers=headers,
                          timestamp=ts, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.1)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0
    assert not errors, errors[:5]
    assert len(sent) == 100_000

    got = consume_all(standalone.kafka, topic, 3, 100_000)
    by_seq = {}
    for part, msgs in got.items():
        offsets = [m[0] for m in msgs]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        # In order per partition: produce order (by seq) matches offsets.
        seqs = [int(dict(m[3])["seq"]) for m in msgs]
        assert seqs == sorted(seqs), f"partition {part} out of order"
        for off, key, value, headers, ts in msgs:
            by_seq[int(dict(headers)["seq"])] = (key, value or b"", headers, ts)
    assert len(by_seq) == 100_000
    for i, (key, value, headers, ts) in enumerate(records):
        k, v, h, t = by_seq[i]
        assert (k, v, t) == (key, value, ts), i
        assert [(n, x or b"") for n, x in h] == headers, i


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4", "zstd"])
def test_kafka_python_round_trip(standalone, codec):
    from kafka import KafkaConsumer, KafkaProducer

    topic = f"kp-{codec or 'none'}"
    p = KafkaProducer(bootstrap_servers=standalone.kafka, acks="all",
                      compression_type=codec, linger_ms=5)
    futures = []
    for i in range(5000):
        futures.append(p.send(topic, key=b"k%d" % i, value=b"v%d" % i,
                              headers=[("i", b"%d" % i)], timestamp_ms=1_700_000_000_000 + i))
    p.flush(60)
    metas = [f.get(30) for f in futures]
    assert [m.offset for m in metas] == list(range(5000))
    p.close()

    c = KafkaConsumer(topic, bootstrap_servers=standalone.kafka, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None, consumer_timeout_ms=30_000)
    got = []
    for m in c:
        got.append((m.offset, m.key, m.value, m.headers, m.timestamp))
        if len(got) == 5000:
            break
    c.close()
    assert len(got) == 5000
    for i, (off, k, v, h, ts) in enumerate(got):
        assert (off, k, v, ts) == (i, b"k%d" % i, b"v%d" % i, 1_700_000_000_000 + i)
        assert list(h) == [("i", b"%d" % i)]


def test_kcat_lists_produces_and_consumes(standalone):
    kcat = ["kcat", "-b", standalone.kafka]
    lines = "".join(f"key{i}:value{i}\n" for i in range(100))
    subprocess.run(kcat + ["-P", "-t", "kcat-topic", "-K:"], input=lines, text=True,
                   check=True, timeout=60)
    listing = subprocess.run(kcat + ["-L"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    assert 'topic "kcat-topic" with 1 partitions' in listing, listing
    assert "1 brokers" in listing, listing
    out = subprocess.run(kcat + ["-C", "-t", "kcat-topic", "-e", "-f", "%k=%s@%o\n"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines() == [f"key{i}=value{i}@{i}" for i in range(100)]


def test_topic_compression_type_recompresses_what_producers_send(standalone):
    import json
    import urllib.request

    admin = AdminClient({"bootstrap.servers": standalone.kafka})
    topics = [NewTopic("packed", num_partitions=1, replication_factor=1,
                       config={"compression.type": "gzip"}),
              NewTopic("unpacked", num_partitions=1, replication_factor=1)]
    for f in admin.create_topics(topics).values():
        f.result(30)
    value = b"the same sentence, over and over. " * 30
    for topic in ("packed", "unpacked"):
        p = Producer({"bootstrap.servers": standalone.kafka, "acks": "all",
                      "compression.type": "none", "linger.ms": 20})
        for i in range(2000):
            p.produce(topic, key=b"%d" % i, value=value)
        assert p.flush(60) == 0

    def stored(topic):
        url = f"{standalone.http}/admin/v2/persistent/public/default/{topic}-partition-0/stats"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["storageSize"]

    assert stored("packed") * 5 < stored("unpacked"), (stored("packed"), stored("unpacked"))
    got = consume_all(standalone.kafka, "packed", 1, 2000)[0]
    assert [(k, v) for _, k, v, _, _ in got] == [(b"%d" % i, value) for i in range(2000)]
