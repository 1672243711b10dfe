"""A consumer that stops reading holds its backlog on the bookies, not in
the broker: an AMQP consumer without a prefetch limit that never reads
its socket, over a 200 MB backlog."""

import time
import uuid

import pika
from confluent_kafka import Producer


def test_an_unlimited_amqp_consumer_that_stops_reading_does_not_fill_memory(standalone):
    s = standalone
    q = f"backlog-{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
    ch = conn.channel()
    ch.queue_declare(q, durable=True)
    p = Producer({"bootstrap.servers": s.kafka, "linger.ms": 20})
    body = b"x" * 10_000
    for i in range(20_000):
        p.produce(q, value=body)
        if i % 2000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    time.sleep(1)
    before = s.rss_mb()

    # No basic.qos: the broker may send as fast as the socket takes. The
    # client then reads nothing for ten seconds.
    stuck = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
    sch = stuck.channel()
    got = []
    sch.basic_consume(q, lambda c, m, _p, b: got.append((m.delivery_tag, b)), auto_ack=False)
    peak = before
    deadline = time.time() + 10
    while time.time() < deadline:
        peak = max(peak, s.rss_mb())
        time.sleep(0.2)
    print(f"broker RSS {before:.0f} MiB before, {peak:.0f} MiB at the peak")
    assert peak - before < 100, (before, peak)

    # Reading again, the consumer gets its messages.
    deadline = time.time() + 60
    while len(got) < 2000 and time.time() < deadline:
        stuck.process_data_events(time_limit=1)
    assert len(got) >= 2000 and all(b == body for _, b in got)
    sch.basic_ack(got[-1][0], multiple=True)
    stuck.close()
    conn.close()
    assert s.alive()
