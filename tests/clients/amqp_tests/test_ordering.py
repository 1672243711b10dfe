"""A channel's methods apply in order, as RabbitMQ promises: a publish is
seen by the get, consume or purge that follows it on the channel, without
publisher confirms in between; a queue that an old connection's cleanup
deletes is never a newer one of the same name; and a connection closed
many times at once closes once, cleanly."""

import struct
import threading
import uuid

import pika
import pytest

from amqp_tests.conftest import frames, method, raw_open


def uid():
    return uuid.uuid4().hex[:6]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "transient"])
def test_publish_then_get_on_one_channel_sees_the_message(connect, durable):
    ch = connect().channel()
    q = f"order-{uid()}"
    ch.queue_declare(q, durable=durable, auto_delete=not durable)
    props = pika.BasicProperties(delivery_mode=2 if durable else 1)
    for i in range(1000):
        body = b"%d" % i
        ch.basic_publish("", q, body, props)
        method, _, got = ch.basic_get(q, auto_ack=True)
        assert method is not None, f"round {i}: get-empty after the publish"
        assert got == body, (i, got)
    # A purge counts what the channel published just before.
    for i in range(3):
        ch.basic_publish("", q, b"x", props)
    assert ch.queue_purge(q).method.message_count == 3
    ch.basic_publish("", q, b"y", props)
    assert ch.queue_declare(q, passive=True).method.message_count == 1


def test_publish_then_consume_on_a_stream_sees_the_message(connect):
    ch = connect().channel()
    q = f"order-stream-{uid()}"
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "stream"})
    ch.basic_qos(prefetch_count=10)
    for i in range(200):
        body = b"%d" % i
        ch.basic_publish("", q, body)
        # `last` starts at the newest message: the one just published.
        got = []
        tag = ch.basic_consume(q, lambda c, m, p, b: got.append(b),
                               arguments={"x-stream-offset": "last"})
        while not got:
            ch.connection.process_data_events(time_limit=1)
        ch.basic_cancel(tag)
        assert got[0] == body, (i, got)


def test_an_auto_delete_queue_redeclared_by_a_new_connection_survives(connect):
    q = f"reconnect-{uid()}"
    for i in range(50):
        conn = connect()
        ch = conn.channel()
        ch.queue_declare(q, auto_delete=True)
        got = []
        ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
        ch.basic_publish("", q, b"%d" % i)
        while not got:
            conn.process_data_events(time_limit=1)
        assert got == [b"%d" % i], (i, got)
        conn.close()


def test_an_exclusive_queue_redeclared_by_a_new_connection_survives(connect):
    q = f"reconnect-x-{uid()}"
    for i in range(50):
        conn = connect()
        ch = conn.channel()
        ch.queue_declare(q, exclusive=True)
        ch.basic_publish("", q, b"%d" % i)
        method, _, body = ch.basic_get(q, auto_ack=True)
        assert method is not None and body == b"%d" % i, (i, body)
        conn.close()


def connection_methods(s):
    """The (class, method) of every channel-0 method until end of stream."""
    try:
        return [struct.unpack(">HH", p[:4]) for kind, ch, p in frames(s) if kind == 1 and ch == 0]
    except ConnectionResetError:
        raise AssertionError("the connection was reset, not closed")


CLOSE = method(0, 10, 50, struct.pack(">H", 200) + b"\x03bye" + struct.pack(">HH", 0, 0))


def test_many_closes_of_one_connection_each_get_close_ok(standalone):
    """100 connection.close at once, as a client closing from many threads
    sends them: each is answered with close-ok, and the connection ends
    without a close (a frame error, 501) of the server's own."""
    s = raw_open(standalone.amqp_port, channel=False)
    s.sendall(CLOSE * 100)
    got = connection_methods(s)
    closes = [m for m in got if m == (10, 50)]
    oks = [m for m in got if m == (10, 51)]
    assert closes == [] and len(oks) == 100, got


def test_what_follows_a_close_is_discarded(standalone):
    """After close-ok only closes count; a torn frame (interleaved writes
    from two threads) is the peer's last garbage, not a 501."""
    s = raw_open(standalone.amqp_port, channel=False)
    s.sendall(CLOSE + method(1, 20, 10, b"\x00") + b"\x01\x00\x00garbage" + CLOSE)
    got = connection_methods(s)
    assert (10, 50) not in got and got.count((10, 51)) == 1, got


def test_concurrent_closes_from_threads_end_cleanly(connect):
    """Threads closing one pika connection: each close returns or finds it
    closed, never a frame error."""
    conns = [connect() for _ in range(5)]
    errors = []

    def close(c):
        try:
            c.close()
        except pika.exceptions.ConnectionWrongStateError:
            pass
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    for c in conns:
        threads = [threading.Thread(target=close, args=(c,)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not c.is_open
    assert not any("501" in e for e in errors), errors
