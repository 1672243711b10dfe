"""Errors are RabbitMQ's reply codes, as channel or connection exceptions;
malformed frames close the connection with 501 or 502."""

import os
import socket
import struct

import pika
import pytest

from amqp_tests.conftest import frames, method, raw_open, raw_session


def closed(fn):
    with pytest.raises((pika.exceptions.ChannelClosedByBroker,
                        pika.exceptions.ConnectionClosedByBroker)) as e:
        fn()
    return e.value.reply_code, e.value.reply_text


def test_channel_exceptions(connect):
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("errs", arguments={"x-message-ttl": 1000})
    code, text = closed(lambda: ch.queue_declare("errs", arguments={"x-message-ttl": 2000}))
    assert code == 406 and "inequivalent arg 'x-message-ttl'" in text
    ch = conn.channel()
    assert closed(lambda: ch.queue_declare("missing", passive=True))[0] == 404
    ch = conn.channel()
    assert closed(lambda: ch.basic_publish("no-such-exchange", "k", b"x") or ch.basic_get("errs"))[0] == 404
    ch = conn.channel()
    assert closed(lambda: ch.exchange_declare("amq.custom", exchange_type="direct"))[0] == 403
    ch = conn.channel()
    ch.exchange_declare("typed", exchange_type="direct")
    assert closed(lambda: ch.exchange_declare("typed", exchange_type="fanout"))[0] == 406
    ch = conn.channel()
    assert closed(lambda: ch.basic_ack(999) or ch.queue_declare("errs", passive=True))[0] == 406
    ch = conn.channel()
    assert closed(lambda: ch.queue_declare("badarg", arguments={"x-overflow": "nope"}))[0] == 406


def test_exclusive_queue_of_another_connection_is_locked(connect):
    a = connect().channel()
    q = a.queue_declare("mine", exclusive=True).method.queue
    b = connect().channel()
    assert closed(lambda: b.queue_declare(q, exclusive=True))[0] == 405
    b = connect().channel()
    assert closed(lambda: b.basic_consume(q, lambda *_: None))[0] == 405
    # Gone with its connection.
    a.connection.close()
    c = connect().channel()
    assert closed(lambda: c.queue_declare(q, passive=True))[0] == 404


def test_exclusive_consumer_refuses_others(connect):
    ch = connect().channel()
    ch.queue_declare("solo")
    ch.basic_consume("solo", lambda *_: None, exclusive=True)
    other = connect().channel()
    assert closed(lambda: other.basic_consume("solo", lambda *_: None))[0] == 403


def test_unknown_vhost_is_not_allowed(connect):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
        connect(vhost="nosuch/tenant")
    assert "530" in str(e.value) and "NOT_ALLOWED" in str(e.value)


def test_deleting_a_queue_cancels_its_consumers(connect):
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("doomed")
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume("doomed", lambda *_: None)
    other = connect().channel()
    other.queue_delete("doomed")
    import time
    deadline = time.time() + 10
    while not cancelled and time.time() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert cancelled == [tag]


def read_close(s):
    """Reads frames until connection.close; returns its reply code."""
    for kind, _, payload in frames(s):
        if kind == 1 and payload[:4] == b"\x00\x0a\x00\x32":
            return struct.unpack(">H", payload[4:6])[0]
    return None


def test_malformed_frames_close_with_frame_or_syntax_errors(standalone):
    # A bad frame end: 501.
    s = raw_session(standalone.amqp_port)
    s.sendall(struct.pack(">BHI", 8, 0, 0) + b"\x00")
    assert read_close(s) == 501
    # An unknown frame type: 501.
    s = raw_session(standalone.amqp_port)
    s.sendall(struct.pack(">BHI", 7, 0, 0) + b"\xce")
    assert read_close(s) == 501
    # A method with garbage arguments: 502.
    s = raw_session(standalone.amqp_port)
    s.sendall(method(0, 10, 11, b"\xff\xff\xff\xff"))
    assert read_close(s) == 502
    # A frame over frame_max: 501.
    s = raw_session(standalone.amqp_port)
    s.sendall(struct.pack(">BHI", 3, 1, 1 << 30))
    assert read_close(s) == 501
    # The broker is still fine.
    c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", standalone.amqp_port))
    c.channel().queue_declare("still-fine")
    c.close()


def test_channel_and_frame_sequence_errors_close_the_connection(standalone):
    port = standalone.amqp_port
    # A method on a channel that was never opened: 504.
    s = raw_open(port)
    s.sendall(method(5, 60, 10, struct.pack(">IHB", 0, 1, 0)))
    assert read_close(s) == 504
    # channel.open on a channel already open: 504.
    s = raw_open(port)
    s.sendall(method(1, 20, 10, b"\x00"))
    assert read_close(s) == 504
    # A content header with no basic.publish before it: 505.
    s = raw_open(port)
    s.sendall(struct.pack(">BHI", 2, 1, 14) + struct.pack(">HHQH", 60, 0, 1, 0) + b"\xce")
    assert read_close(s) == 505
    # A heartbeat on a channel other than 0: 503.
    s = raw_open(port)
    s.sendall(struct.pack(">BHI", 8, 1, 0) + b"\xce")
    assert read_close(s) == 503


def test_command_invalid_and_not_implemented(connect):
    # An unknown exchange type closes the channel alone with 406, as
    # RabbitMQ does since 3.12.14; the connection's other channels go on.
    conn = connect()
    ch, other = conn.channel(), conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.exchange_declare("odd", exchange_type="x-no-such-type")
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - unknown exchange type 'x-no-such-type'"
    assert other.is_open and conn.is_open
    other.queue_declare("", exclusive=True)
    # channel.flow(active=false) is refused as RabbitMQ refuses it: 540.
    ch = connect().channel()
    code, text = closed(lambda: ch.flow(False))
    assert code == 540 and "active=false" in text
    # flow(true) is fine.
    ch = connect().channel()
    assert ch.flow(True) is True


def test_heartbeat_timeout_closes_a_silent_connection(standalone):
    import time
    s = raw_open(standalone.amqp_port, heartbeat=1, channel=False)
    s.settimeout(10)
    start = time.time()
    # The broker sends heartbeats, but this peer never answers: after two
    # missed ones the broker hangs up.
    while s.recv(65536):
        pass
    waited = time.time() - start
    assert 1.5 <= waited < 6, waited


def test_wrong_protocol_header_gets_ours_back(standalone):
    s = socket.create_connection(("127.0.0.1", standalone.amqp_port), timeout=5)
    s.sendall(b"AMQP\x01\x01\x00\x0a")
    assert s.recv(8) == b"AMQP\x00\x00\x09\x01"


def test_x_expires_deletes_unused_queues(connect):
    import time
    ch = connect().channel()
    ch.queue_declare("short-lived", arguments={"x-expires": 300})
    ch.queue_declare("watched", arguments={"x-expires": 300})
    tag = ch.basic_consume("watched", lambda *_: None)
    time.sleep(1.2)
    ch.queue_declare("watched", passive=True)
    assert closed(lambda: ch.queue_declare("short-lived", passive=True))[0] == 404
    ch = connect().channel()
    ch.queue_declare("watched2", arguments={"x-expires": 300})
    tag = ch.basic_consume("watched2", lambda *_: None)
    ch.basic_cancel(tag)
    time.sleep(1.2)
    assert closed(lambda: ch.queue_declare("watched2", passive=True))[0] == 404


def test_memory_alarm_blocks_publishers(tmp_path):
    """With a memory limit below what the process uses, clients that ask for
    connection.blocked are told, and a publisher is no longer read."""
    import time
    from conftest import Standalone
    s = Standalone(str(tmp_path), extra=["--amqp-memory-limit-mb", "1"])
    s.start()
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
        blocked = []
        conn.add_on_connection_blocked_callback(lambda c, frame: blocked.append(frame.method.reason))
        ch = conn.channel()
        ch.queue_declare("held")
        # Only publishers are blocked: this publish is read, the next are not.
        ch.basic_publish("", "held", b"x")
        deadline = time.time() + 10
        while not blocked and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert blocked == ["low on memory"]
        # A blocked connection is not read, so a clean close would wait for
        # the alarm to clear; the server goes instead.
    finally:
        s.stop()


def test_disk_alarm_blocks_publishers(tmp_path):
    """When the bookie's disk passes its usage threshold the bookie turns
    read-only, and publishers are told connection.blocked "low on disk".
    The threshold is set just above today's usage; a ballast file then
    pushes the disk over it."""
    import time
    from conftest import Standalone
    st = os.statvfs(tmp_path)
    total = st.f_blocks * st.f_frsize
    used = 1 - st.f_bavail / st.f_blocks
    threshold = used + (256 << 20) / total
    (tmp_path / "data").mkdir()
    s = Standalone(str(tmp_path / "data"), extra=[
        "--bookie-disk-usage-threshold", f"{threshold:.7f}",
        "--bookie-disk-check-interval-ms", "100"])
    s.start()
    ballast = tmp_path / "ballast"
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
        blocked = []
        conn.add_on_connection_blocked_callback(lambda c, frame: blocked.append(frame.method.reason))
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("disk.q")
        ch.basic_publish("", "disk.q", b"before")
        assert blocked == []
        with open(ballast, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 768 << 20)
        deadline = time.time() + 15
        while not blocked and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert blocked == ["low on disk"]
    finally:
        ballast.unlink(missing_ok=True)
        s.stop()
