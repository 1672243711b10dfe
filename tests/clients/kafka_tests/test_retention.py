"""Topic configs retention.bytes and retention.ms are applied by
retention, over the namespace's policy."""

import tempfile
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import ConfigResource, KafkaAdminClient, NewTopic

from conftest import Standalone


@pytest.fixture(scope="module")
def small_ledgers():
    # Small ledgers and a quick retention loop, so that whole ledgers go
    # within the test.
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--retention-interval-s", "1", "--ledger-max-entries", "10"])
        s.start()
        yield s
        s.stop()


def fill(bootstrap, topic, batches):
    """`batches` entries of five 20 KB messages: 4 MB for 40."""
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for b in range(batches):
        for i in range(5):
            p.produce(topic, value=b"%d-%d-" % (b, i) + b"x" * 20000)
        p.flush(30)


def watermarks(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "w"})
    low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.close()
    return low, high


def test_retention_bytes_deletes_old_ledgers_of_that_topic_only(small_ledgers):
    admin = KafkaAdminClient(bootstrap_servers=small_ledgers.kafka)
    admin.create_topics([NewTopic("bounded", 1, 1), NewTopic("kept", 1, 1)])
    fill(small_ledgers.kafka, "bounded", 40)
    fill(small_ledgers.kafka, "kept", 40)
    admin.alter_configs([ConfigResource("TOPIC", "bounded", configs={"retention.bytes": "1048576"})])
    deadline = time.time() + 30
    while time.time() < deadline and watermarks(small_ledgers.kafka, "bounded")[0] == 0:
        time.sleep(0.5)
    low, high = watermarks(small_ledgers.kafka, "bounded")
    # About 1 MiB (ten 100 KB entries a ledger) is kept, besides the ledger
    # being written.
    assert high == 200 and 100 <= low <= 190, (low, high)
    # The namespace keeps a week by default: the other topic is whole.
    time.sleep(2)
    assert watermarks(small_ledgers.kafka, "kept") == (0, 200)

    # Removing the override gives the namespace's policy back.
    admin.alter_configs([ConfigResource("TOPIC", "bounded", configs={"retention.bytes": ("DELETE", None)})],
                        incremental=True)
    fill(small_ledgers.kafka, "bounded", 40)
    time.sleep(3)
    assert watermarks(small_ledgers.kafka, "bounded") == (low, 400)
    admin.close()
