"""Stream queues read from an offset, shared with Kafka both ways; AMQP
transactions commit and roll back."""

import datetime
import time

import pika
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from amqp_tests.conftest import drain


def read_stream(conn, queue, offset, n, timeout=10):
    ch = conn.channel()
    ch.basic_qos(prefetch_count=50)
    out = []
    for method, props, body in ch.consume(queue, arguments={"x-stream-offset": offset},
                                          inactivity_timeout=timeout):
        if method is None:
            break
        out.append((props.headers["x-stream-offset"], body))
        ch.basic_ack(method.delivery_tag)
        if len(out) == n:
            break
    ch.cancel()
    ch.close()
    return out


def test_stream_queue_offsets(connect):
    conn = connect()
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("events", durable=True, arguments={"x-queue-type": "stream"})
    before = datetime.datetime.now() - datetime.timedelta(seconds=30)
    for i in range(10):
        ch.basic_publish("", "events", f"e{i}".encode(),
                         properties=pika.BasicProperties(delivery_mode=2))
    first = read_stream(conn, "events", "first", 10)
    assert first == [(i, f"e{i}".encode()) for i in range(10)]
    # Reading does not consume: the same again, from a numeric offset.
    assert read_stream(conn, "events", 5, 5) == [(i, f"e{i}".encode()) for i in range(5, 10)]
    assert read_stream(conn, "events", "last", 1) == [(9, b"e9")]
    assert read_stream(conn, "events", before, 2) == [(0, b"e0"), (1, b"e1")]
    # next: only what is published after the consumer starts.
    nxt = conn.channel()
    nxt.basic_qos(prefetch_count=10)
    got = []
    nxt.basic_consume("events", lambda c, m, p, b: (got.append(b), c.basic_ack(m.delivery_tag)),
                      arguments={"x-stream-offset": "next"})
    conn.process_data_events(time_limit=0.5)
    assert got == []
    ch.basic_publish("", "events", b"e10")
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert got == [b"e10"]
    # Stream consumers must set a prefetch, as in RabbitMQ.
    bare = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        bare.basic_consume("events", lambda *_: None, arguments={"x-stream-offset": "first"})
        conn.process_data_events(time_limit=1)
    assert e.value.reply_code == 406


def test_kafka_reads_a_stream_queue_and_writes_a_queue(connect, standalone):
    conn = connect()
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("shared-stream", durable=True, arguments={"x-queue-type": "stream"})
    for i in range(5):
        ch.basic_publish("", "shared-stream", f"s{i}".encode(),
                         properties=pika.BasicProperties(content_type="text/plain",
                                                         headers={"seq": str(i)}))
    c = Consumer({"bootstrap.servers": standalone.kafka, "group.id": "amqp-interop",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition("shared-stream", 0, 0)])
    got = []
    deadline = time.time() + 20
    while len(got) < 5 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m)
    c.close()
    assert [m.value() for m in got] == [f"s{i}".encode() for i in range(5)]
    assert got[0].key() == b"shared-stream"
    headers = dict(got[0].headers())
    assert headers["seq"] == b"0"
    assert headers["amqp.content-type"] == b"text/plain"

    # A Kafka producer's messages reach an AMQP consumer of a queue.
    ch.queue_declare("from-kafka", durable=True)
    ch.queue_purge("from-kafka")
    p = Producer({"bootstrap.servers": standalone.kafka, "acks": "all"})
    for i in range(5):
        p.produce("from-kafka", key=f"k{i}".encode(), value=f"v{i}".encode(),
                  headers=[("origin", b"kafka")])
    assert p.flush(20) == 0
    got = drain(ch, "from-kafka", 5)
    assert [b for _, _, b in got] == [f"v{i}".encode() for i in range(5)]
    method, props, _ = got[0]
    assert method.routing_key == "k0"
    assert props.headers["origin"] == "kafka"


def test_transactions_commit_and_roll_back(connect):
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("txq", durable=True)
    ch.queue_purge("txq")
    ch.tx_select()
    ch.basic_publish("", "txq", b"rolled back")
    ch.tx_rollback()
    ch.basic_publish("", "txq", b"committed 1")
    ch.basic_publish("", "txq", b"committed 2")
    other = connect().channel()
    assert other.basic_get("txq")[0] is None
    ch.tx_commit()
    assert [b for _, _, b in drain(other, "txq", 2)] == [b"committed 1", b"committed 2"]
    # Acknowledgements wait for commit too; a rolled-back ack leaves the
    # message unacknowledged on the channel.
    ch.basic_publish("", "txq", b"to ack")
    ch.tx_commit()
    [(m, _, body)] = drain(ch, "txq", 1, auto_ack=False)
    assert body == b"to ack"
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    ch.close()
    assert other.basic_get("txq")[0] is None

