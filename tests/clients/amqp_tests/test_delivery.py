"""Delivery guarantees: confirms at volume, redelivery after a consumer
process is killed, and durable queues across a restart."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pika
import pytest

from amqp_tests.conftest import drain


def test_confirmed_persistent_messages_are_all_consumed(connect):
    """pika's blocking channel waits for each confirm, so this is a few
    thousand; the 100k run with pipelined confirms is lapin's
    (brokers/magnetar/tests/amqp_lapin.rs)."""
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("bulk", durable=True)
    ch.queue_purge("bulk")
    n = 3_000
    confirmed = 0
    ch.confirm_delivery()
    body = b"x" * 100
    props = pika.BasicProperties(delivery_mode=2)
    t0 = time.time()
    for i in range(n):
        ch.basic_publish("", "bulk", body + str(i).encode(), properties=props)
        confirmed += 1
    publish_s = time.time() - t0
    assert confirmed == n
    got = 0
    seen_last = None
    cons = connect().channel()
    cons.basic_qos(prefetch_count=500)
    for method, _, b in cons.consume("bulk", inactivity_timeout=10):
        if method is None:
            break
        got += 1
        seen_last = b
        if got % 100 == 0 or got == n:
            cons.basic_ack(method.delivery_tag, multiple=True)
        if got == n:
            break
    cons.cancel()
    assert got == n, f"consumed {got} of {n}"
    assert seen_last == body + str(n - 1).encode()
    print(f"{n} confirmed publishes in {publish_s:.1f}s")


CONSUMER = textwrap.dedent("""
    import sys, pika
    port = int(sys.argv[1])
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    got = 0
    for method, props, body in ch.consume("victim"):
        got += 1
        print(body.decode(), flush=True)
        if got == 10:
            break
    # Holds ten unacknowledged messages until it is killed.
    import time
    time.sleep(3600)
""")


def test_sigkill_of_a_consumer_redelivers_its_unacked_messages(connect, standalone, tmp_path):
    ch = connect().channel()
    ch.confirm_delivery()
    ch.queue_declare("victim", durable=True)
    ch.queue_purge("victim")
    for i in range(20):
        ch.basic_publish("", "victim", f"m{i}".encode(), properties=pika.BasicProperties(delivery_mode=2))
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    proc = subprocess.Popen([sys.executable, str(script), str(standalone.amqp_port)],
                            stdout=subprocess.PIPE, text=True)
    held = [proc.stdout.readline().strip() for _ in range(10)]
    assert held == [f"m{i}" for i in range(10)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = drain(ch, "victim", 20)
    by_body = {b.decode(): m.redelivered for m, _, b in got}
    assert sorted(by_body) == sorted(f"m{i}" for i in range(20))
    assert all(by_body[f"m{i}"] for i in range(10)), by_body
    assert not any(by_body[f"m{i}"] for i in range(10, 20)), by_body


def test_durable_queue_survives_a_restart(standalone, connect):
    ch = connect().channel()
    ch.confirm_delivery()
    ch.exchange_declare("persist.x", exchange_type="direct", durable=True)
    ch.queue_declare("persist.q", durable=True, arguments={"x-max-length": 1000})
    ch.queue_bind("persist.q", "persist.x", "k")
    ch.queue_purge("persist.q")
    for i in range(50):
        ch.basic_publish("persist.x", "k", f"p{i}".encode(),
                         properties=pika.BasicProperties(delivery_mode=2))
    ch.connection.close()
    standalone.restart()
    ch = connect().channel()
    ok = ch.queue_declare("persist.q", passive=True).method
    assert ok.message_count == 50
    # The redeclare is checked against what was declared before.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("persist.q", durable=True)
    assert e.value.reply_code == 406
    ch = connect().channel()
    ch.exchange_declare("persist.x", passive=True)
    ch.basic_publish("persist.x", "k", b"after")
    got = [b for _, _, b in drain(ch, "persist.q", 51)]
    assert got == [f"p{i}".encode() for i in range(50)] + [b"after"]


def test_global_qos_limits_the_channel_across_consumers(connect):
    conn = connect()
    pub = conn.channel()
    for q in ("gq-a", "gq-b"):
        pub.queue_declare(q)
        pub.queue_purge(q)
        for i in range(10):
            pub.basic_publish("", q, f"{q}-{i}".encode())
    ch = conn.channel()
    # A channel-wide limit of 3 shared by two consumers, and a per-consumer
    # limit of 2 on top, as RabbitMQ applies both.
    ch.basic_qos(prefetch_count=3, global_qos=True)
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume("gq-a", lambda c, m, p, b: got.append(m))
    ch.basic_consume("gq-b", lambda c, m, p, b: got.append(m))

    def settle_at(n):
        deadline = time.time() + 10
        while len(got) < n and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
        # Anything over the limit would have arrived by now.
        conn.process_data_events(time_limit=0.5)

    settle_at(3)
    assert len(got) == 3
    queues = {m.routing_key for m in got}
    assert queues == {"gq-a", "gq-b"}
    # Each ack makes room for one more, up to all 20.
    ch.basic_ack(got[0].delivery_tag)
    settle_at(4)
    assert len(got) == 4
    deadline = time.time() + 15
    acked = 1
    while acked < 20 and time.time() < deadline:
        while acked < len(got):
            ch.basic_ack(got[acked].delivery_tag)
            acked += 1
        conn.process_data_events(time_limit=0.1)
    assert len(got) == 20 and acked == 20


def test_priority_queue_serves_higher_priorities_first(standalone, connect):
    """x-max-priority: higher priorities first, in order within a level;
    priorities above the queue's maximum count as the maximum, and none
    as 0. Both the order and the queue's levels survive a restart."""
    ch = connect().channel()
    ch.confirm_delivery()
    ch.queue_declare("prio.q", durable=True, arguments={"x-max-priority": 5})
    ch.queue_purge("prio.q")
    sent = [(0, b"a"), (3, b"b"), (None, b"c"), (5, b"d"), (3, b"e"), (9, b"f"), (1, b"g")]
    for prio, body in sent:
        ch.basic_publish("", "prio.q", body,
                         pika.BasicProperties(priority=prio, delivery_mode=2))
    first = ch.basic_get("prio.q", auto_ack=True)
    assert first[2] == b"d"
    ch.connection.close()
    standalone.restart()
    ch = connect().channel()
    got = [b for _, _, b in drain(ch, "prio.q", 6)]
    assert got == [b"f", b"b", b"e", b"g", b"a", b"c"]

    # A consumer under prefetch 1 gets the highest waiting message next.
    ch.confirm_delivery()
    ch.basic_qos(prefetch_count=1)
    ch.basic_publish("", "prio.q", b"low0", pika.BasicProperties(priority=0))
    received = []
    ch.basic_consume("prio.q", lambda c, m, p, b: received.append((m.delivery_tag, b)))
    deadline = time.time() + 10
    while not received and time.time() < deadline:
        ch.connection.process_data_events(time_limit=0.1)
    assert [b for _, b in received] == [b"low0"]
    for prio, body in [(1, b"low1"), (4, b"high"), (2, b"mid")]:
        ch.basic_publish("", "prio.q", body, pika.BasicProperties(priority=prio))
    acked = set()
    while len(received) < 4 and time.time() < deadline:
        for tag, _ in received:
            if tag not in acked:
                ch.basic_ack(tag)
                acked.add(tag)
        ch.connection.process_data_events(time_limit=0.1)
    assert [b for _, b in received] == [b"low0", b"high", b"mid", b"low1"]
