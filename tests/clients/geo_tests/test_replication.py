"""Replication between regions with real Kafka clients: one way with
everything a record carries intact, both ways at once without loops, a
full mesh of three, and stream retention that replication does not turn
into a queue's."""

import hashlib
import json
import subprocess
import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from conftest import BIN
from geo_tests.regions import NS, metric, ok, partitioned, regions, replication, stats, wait_for
from interop_tests.test_routes import call


@pytest.fixture(scope="module")
def mesh():
    with regions(["east", "west", "central"], replicate=["east", "west"]) as r:
        yield r


def produce(region, topic, n, tag, size=1024, partition_of=None):
    """`n` records keyed and headed by `tag`; the digests of what each
    partition was acknowledged with, in offset order."""
    p = Producer({"bootstrap.servers": region.kafka, "enable.idempotence": True,
                  "compression.type": "lz4", "linger.ms": 5, "acks": "all"})
    acked = {}
    errors = []

    def done(err, m, d):
        if err is not None:
            errors.append(err)
        else:
            acked.setdefault(m.partition(), []).append((m.offset(), d))

    base_ts = int(time.time() * 1000) - 10_000
    for i in range(n):
        kwargs = {} if partition_of is None else {"partition": partition_of(i)}
        value = (f"{tag}-{i:08d}-".encode() * (size // 16 + 1))[:size]
        key = f"{tag}-{i % 97}".encode()
        headers = [("origin", tag.encode()), ("seq", str(i).encode())]
        d = digest_of(key, value, headers, base_ts + i)
        p.produce(topic, key=key, value=value, headers=headers, timestamp=base_ts + i,
                  on_delivery=lambda err, m, d=d: done(err, m, d), **kwargs)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0
    assert not errors, errors[:3]
    return {part: [d for _, d in sorted(v)] for part, v in acked.items()}


def digest_of(key, value, headers, ts):
    h = hashlib.sha1()
    for part in (key or b"", value or b""):
        h.update(len(part).to_bytes(4, "big") + part)
    for k, v in headers or []:
        h.update(k.encode() + b"=" + (v or b"") + b";")
    h.update(str(ts).encode())
    return h.hexdigest()


def digest(m):
    return digest_of(m.key(), m.value(), m.headers(), m.timestamp()[1])


def consume(region, topic, partitions, expected, timeout=120):
    """Every record of the topic's partitions from the start, until
    `expected` have come (and a moment more, to see any extra)."""
    c = Consumer({"bootstrap.servers": region.kafka, "group.id": f"read-{time.time()}",
                  "enable.auto.commit": False, "fetch.max.bytes": 8 << 20})
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(partitions)])
    got = {}
    n = 0
    deadline = time.time() + timeout
    settle = None
    try:
        while time.time() < deadline:
            batch = c.consume(1000, 0.5)
            for m in batch:
                assert m.error() is None, m.error()
                got.setdefault(m.partition(), []).append(m)
                n += 1
            if n >= expected:
                settle = settle or time.time() + 2
                if time.time() > settle:
                    break
    finally:
        c.close()
    return got


def test_one_way_records_arrive_once_in_order_with_everything_they_carry(mesh):
    east, west = mesh["east"], mesh["west"]
    partitioned([east], "orders", 6)
    # A first sample for the rates, before anything moves.
    metric(east, "pulsar_replication_rate_out")
    metric(west, "pulsar_replication_rate_in")
    sent = produce(east, "orders", 100_000, "east")
    # West makes the topic as east has it, and holds exactly what east
    # acknowledged, partition by partition, in east's order.
    got = consume(west, "orders", 6, 100_000)
    assert sum(len(v) for v in got.values()) == 100_000
    for part, msgs in got.items():
        assert [digest(m) for m in msgs] == sent[part], f"partition {part}"
        # The same batches: the same offsets.
        assert [m.offset() for m in msgs] == list(range(len(msgs)))
    assert stats(west, "orders")["metadata"]["partitions"] == 6
    # The batches were stored as they came, still compressed: both
    # regions hold the same bytes.
    wait_for("the replicator's counters",
             lambda: replication(east, "orders", "west").get("msgOutCounter") == 100_000)
    assert stats(west, "orders")["storageSize"] == stats(east, "orders")["storageSize"]
    assert stats(east, "orders")["storageSize"] < 100_000 * 1024 / 2, "lz4 kept"
    r = replication(east, "orders", "west")
    assert r["connected"] and r["state"] == "running" and r["replicationBacklog"] == 0, r
    # Rates over the last minute, on both sides.
    assert r["msgRateOut"] > 0 and r["msgThroughputOut"] > r["msgRateOut"], r
    assert metric(east, "pulsar_replication_rate_out", [("remoteCluster", "west")]) > 0
    assert metric(west, "pulsar_replication_throughput_in", [("remoteCluster", "east")]) > 0
    # The operator's view: one line per namespace and remote cluster.
    done = subprocess.run([BIN, "admin", "--url", east.http, "geo", "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    line = next(l for l in json.loads(done.stdout)
                if l["namespace"] == NS and l["remoteCluster"] == "west")
    assert line["state"] == "running" and line["replicationBacklog"] == 0
    assert line["topics"] >= 6 and line["connected"] == line["topics"]
    # Central is not in the namespace's clusters.
    assert call(central_of(mesh), "GET", f"/admin/v2/persistent/{NS}/orders/partitions")[0] == 404


def central_of(mesh):
    return mesh["central"]


def test_both_ways_at_once_each_region_holds_everything_once_and_nothing_loops(mesh):
    east, west = mesh["east"], mesh["west"]
    partitioned([east, west], "aa", 3)
    threads = [threading.Thread(target=produce, args=(r, "aa", 50_000, r.name, 256))
               for r in (east, west)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for region in (east, west):
        got = consume(region, "aa", 3, 100_000)
        seen = {}
        for part, msgs in got.items():
            last = {}
            for m in msgs:
                origin, seq = m.value().decode().split("-")[:2]
                seen[(origin, seq)] = seen.get((origin, seq), 0) + 1
                # Each origin's records keep their order.
                assert last.get(origin, "") < seq, (region.name, part, origin, seq)
                last[origin] = seq
        assert len(seen) == 100_000 and set(seen.values()) == {1}, region.name
    # Idle, nothing moves: no record goes back where it came from.
    before = [stats(r, "aa")["msgInCounter"] for r in (east, west)]
    assert before == [100_000, 100_000]
    time.sleep(60)
    assert [stats(r, "aa")["msgInCounter"] for r in (east, west)] == before
    for a, b in ((east, "west"), (west, "east")):
        assert replication(a, "aa", b)["replicationBacklog"] == 0


def test_a_full_mesh_of_three_holds_everything_once(mesh):
    partitioned(mesh.values(), "mesh", 2)
    for s in mesh.values():
        ok(call(s, "POST", f"/admin/v2/persistent/{NS}/mesh/replication",
                ["east", "west", "central"]))
    threads = [threading.Thread(target=produce, args=(r, "mesh", 10_000, r.name, 128))
               for r in mesh.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for region in mesh.values():
        got = consume(region, "mesh", 2, 30_000)
        values = [tuple(m.value().split(b"-")[:2]) for msgs in got.values() for m in msgs]
        assert len(values) == 30_000 and len(set(values)) == 30_000, region.name


def test_a_stream_topic_keeps_its_retention_and_a_removed_cluster_releases_its_cursor():
    with regions(["east", "west"], extra=["--retention-interval-s", "1",
                                          "--ledger-max-entries", "10"]) as r:
        east, west = r["east"], r["west"]
        partitioned([east], "stream", 1)
        produce(east, "stream", 200, "east", 64, partition_of=lambda i: 0)
        wait_for("replication", lambda: replication(east, "stream", "west").get("msgOutCounter") == 200)
        # A replicator's cursor does not make the topic a queue: after
        # retention has run, offset 0 is still there for Kafka readers.
        time.sleep(3)
        assert len(consume(east, "stream", 1, 200, timeout=30).get(0, [])) == 200
        assert stats(east, "stream")["partitions"][f"persistent://{NS}/stream-partition-0"]["startOffset"] == 0
        # Off the topic's clusters, west's cursor goes, and with it what it
        # held back.
        ok(call(east, "POST", f"/admin/v2/persistent/{NS}/stream/replication", ["east"]))
        def cursors():
            status, body = call(east, "GET",
                                f"/admin/v2/persistent/{NS}/stream-partition-0/internalStats")
            assert status == 200, body
            return json.loads(body)["cursors"]
        assert "pulsar.repl.west" in cursors()
        part = stats(east, "stream")["partitions"][f"persistent://{NS}/stream-partition-0"]
        assert "pulsar.repl.west" not in part["subscriptions"], "listed under replication only"
        wait_for("the cursor released", lambda: "pulsar.repl.west" not in cursors())
        assert replication(east, "stream", "west") == {}


def test_the_replicator_dispatch_rate_paces_a_topic(mesh):
    east, west = mesh["east"], mesh["west"]
    partitioned([east], "paced", 1)
    ok(call(east, "POST", f"/admin/v2/persistent/{NS}/paced/replicatorDispatchRate",
            {"dispatchThrottlingRateInMsg": 100, "ratePeriodInSecond": 1}))
    # Batches of ten records, so that the pace shows in whole batches.
    p = Producer({"bootstrap.servers": east.kafka, "linger.ms": 50, "batch.num.messages": 10})
    for i in range(600):
        p.produce("paced", value=f"p-{i}".encode(), partition=0)
    assert p.flush(30) == 0
    start = time.time()
    time.sleep(2)
    early = replication(east, "paced", "west").get("msgOutCounter", 0)
    assert early <= 400, early
    wait_for("all of it, at the pace", lambda: replication(east, "paced", "west")
             .get("msgOutCounter") == 600, timeout=30)
    assert time.time() - start >= 3


def test_a_partition_count_mismatch_pauses_visibly_and_loses_nothing(mesh):
    east, west = mesh["east"], mesh["west"]
    # West has `x` unpartitioned; east makes it with three partitions.
    ok(call(west, "PUT", f"/admin/v2/persistent/{NS}/mismatch"))
    partitioned([east], "mismatch", 3)
    produce(east, "mismatch", 300, "east", 64)
    wait_for("partitionMismatch", lambda: replication(east, "mismatch", "west")
             .get("state") == "partitionMismatch", timeout=30)
    assert replication(east, "mismatch", "west")["replicationBacklog"] == 300
    # The operator removes west's topic, which replicates too, so with
    # force; its tombstone keeps replication from making it again until
    # the operator creates it as east has it. Then it catches up.
    ok(call(west, "DELETE", f"/admin/v2/persistent/{NS}/mismatch?force=true"))
    wait_for("remoteTopicDeleted", lambda: replication(east, "mismatch", "west")
             .get("state") == "remoteTopicDeleted", timeout=30)
    partitioned([west], "mismatch", 3)
    got = consume(west, "mismatch", 3, 300, timeout=60)
    assert sum(len(v) for v in got.values()) == 300
    assert stats(west, "mismatch")["metadata"]["partitions"] == 3
