"""Retention counts every consumer: a Kafka group's committed offset holds
a topic's data like a durable subscription, and a subscription created by
a dashboard (admin API or WebSocket consumer) never deletes what the group
has not read."""

import json
import tempfile
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from websockets.sync.client import connect

from conftest import Standalone

N = 3000


@pytest.fixture(scope="module")
def small_ledgers():
    # Ten entries a ledger and a retention pass every second, so that
    # whole ledgers would go within the test if retention allowed it.
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--retention-interval-s", "1", "--ledger-max-entries", "10"])
        s.start()
        yield s
        s.stop()


def watermarks(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.close()
    return low, high


def commit(bootstrap, group, topic, offset):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    c.close()


def test_a_group_offset_holds_data_a_new_subscription_would_let_go(small_ledgers):
    s = small_ledgers
    topic = f"held-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=s.kafka, request_timeout_ms=30000)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    # 60 entries of 50 messages: six ledgers.
    p = Producer({"bootstrap.servers": s.kafka, "linger.ms": 0})
    for b in range(N // 50):
        for i in range(50):
            p.produce(topic, value=b"m-%d" % (b * 50 + i))
        assert p.flush(30) == 0
    commit(s.kafka, "slow", topic, 10)

    # A dashboard's durable subscription from the latest offset, through
    # the admin API, and a WebSocket consumer's (durable, latest).
    path = f"/admin/v2/persistent/public/default/{topic}-partition-0/subscription/dash"
    req = urllib.request.Request(f"{s.http}{path}", data=json.dumps("latest").encode(),
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status in (200, 204)
    ws = s.http.replace("http://", "ws://")
    with connect(f"{ws}/ws/v2/consumer/persistent/public/default/{topic}-partition-0/dash-ws",
                 open_timeout=10) as c:
        c.ping().wait(5)

    # Several retention passes: nothing the group has not read goes.
    time.sleep(5)
    assert watermarks(s.kafka, topic) == (0, N)

    c = Consumer({"bootstrap.servers": s.kafka, "group.id": "slow",
                  "enable.auto.commit": False, "auto.offset.reset": "error"})
    c.subscribe([topic])
    got = []
    deadline = time.time() + 60
    while len(got) < N - 10 and time.time() < deadline:
        m = c.poll(1)
        if m is None:
            continue
        assert m.error() is None, m.error()
        got.append((m.offset(), m.value()))
    assert [o for o, _ in got] == list(range(10, N))
    assert got[0][1] == b"m-10" and got[-1][1] == b"m-%d" % (N - 1)

    # Once the group has read everything, retention deletes what every
    # consumer has acknowledged: the subscriptions make a queue of it.
    c.commit(asynchronous=False)
    c.close()
    deadline = time.time() + 30
    while time.time() < deadline and watermarks(s.kafka, topic)[0] < N // 2:
        time.sleep(0.5)
    low, high = watermarks(s.kafka, topic)
    assert high == N and low >= N - 500, (low, high)
