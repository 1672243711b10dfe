"""Hostile AMQP field tables: nesting deep enough to overflow a stack,
before authentication and stored in a record. The process stays up, the
sender gets a protocol error, other clients carry on."""

import socket
import struct
import uuid

import pika
from confluent_kafka import Producer


def nested_arrays(depth):
    """A field value of `depth` arrays nested in one another: 5 bytes a level."""
    v = b""
    for _ in range(depth):
        v = b"A" + struct.pack(">I", len(v)) + v
    return v


def long_str(b):
    return struct.pack(">I", len(b)) + b


def short_str(b):
    return bytes([len(b)]) + b


def read_frame(s):
    head = b""
    while len(head) < 7:
        chunk = s.recv(7 - len(head))
        if not chunk:
            return None
        head += chunk
    kind, channel, size = struct.unpack(">BHI", head)
    body = b""
    while len(body) < size + 1:
        chunk = s.recv(size + 1 - len(body))
        if not chunk:
            return None
        body += chunk
    return kind, channel, body[:-1]


def still_serves(standalone):
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", standalone.amqp_port))
    ch = conn.channel()
    q = f"alive-{uuid.uuid4().hex[:6]}"
    ch.queue_declare(q)
    ch.basic_publish("", q, b"ok")
    _, _, body = next(ch.consume(q, auto_ack=True, inactivity_timeout=10))
    conn.close()
    return body == b"ok"


def test_nested_client_properties_before_auth_close_with_502(standalone):
    # connection.start-ok whose client-properties hold 25,000 nested arrays
    # (125 KB, under the pre-tune frame_max).
    args = long_str(short_str(b"x") + nested_arrays(25_000)) + short_str(b"PLAIN") \
        + long_str(b"\0u\0p") + short_str(b"en_US")
    payload = struct.pack(">HH", 10, 11) + args
    s = socket.create_connection(("127.0.0.1", standalone.amqp_port), timeout=10)
    s.sendall(b"AMQP\0\0\x09\x01")
    kind, _, start = read_frame(s)
    assert (kind, start[:4]) == (1, struct.pack(">HH", 10, 10))  # connection.start
    s.sendall(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
    frame = read_frame(s)
    s.close()
    # connection.close with SYNTAX_ERROR and a reply text, or a plain close.
    if frame is not None:
        kind, _, close = frame
        assert kind == 1 and close[:4] == struct.pack(">HH", 10, 50), close[:16]
        (code,) = struct.unpack(">H", close[4:6])
        assert code in (501, 502), code
        assert close[6] > 0, "a reply text"
    assert standalone.alive(), standalone.tail()
    assert still_serves(standalone)


def test_a_poison_amqp_headers_record_is_delivered_without_the_table(standalone):
    q = f"orders-{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", standalone.amqp_port))
    ch = conn.channel()
    ch.queue_declare(q, durable=True)
    # A Kafka producer stores 150,000 nested arrays (750 KB) in the header
    # AMQP keeps typed headers in, then a normal record.
    p = Producer({"bootstrap.servers": standalone.kafka, "message.max.bytes": 4_000_000})
    poison = long_str(short_str(b"x") + nested_arrays(150_000))
    p.produce(q, value=b"poison", headers=[("amqp.headers", poison), ("trace", b"t-1")])
    p.produce(q, value=b"after", headers=[("trace", b"t-2")])
    assert p.flush(30) == 0

    got = []
    for method, props, body in ch.consume(q, inactivity_timeout=15):
        assert method is not None, f"timed out after {got}"
        trace = (props.headers or {}).get("trace")
        got.append((body, trace.decode() if isinstance(trace, bytes) else trace))
        ch.basic_ack(method.delivery_tag)
        if len(got) == 2:
            break
    ch.cancel()
    conn.close()
    assert got == [(b"poison", "t-1"), (b"after", "t-2")], got
    assert standalone.alive(), standalone.tail()
    # And again, as a fresh consumer would after a restart.
    assert still_serves(standalone)
