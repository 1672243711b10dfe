"""AMQP fixtures: pika connections to the module's standalone process."""

import contextlib
import socket
import struct

import pika
import pytest


@contextlib.contextmanager
def connections(port, **defaults):
    """An opener of pika blocking connections to `port`
    (`open_(vhost="/", **connection_parameters)`); they close on exit."""
    opened = []

    def open_(vhost="/", **kw):
        params = pika.ConnectionParameters("127.0.0.1", port, virtual_host=vhost,
                                           **{**defaults, **kw})
        c = pika.BlockingConnection(params)
        opened.append(c)
        return c

    try:
        yield open_
    finally:
        for c in opened:
            try:
                if c.is_open:
                    c.close()
            except Exception:
                pass


@pytest.fixture
def connect(standalone):
    """Opens pika blocking connections, closed at the end of the test."""
    with connections(standalone.amqp_port, connection_attempts=3, retry_delay=0.5) as open_:
        yield open_


def drain(ch, queue, n, timeout=10, auto_ack=True):
    """Takes up to `n` messages from `queue` with basic.get (acked by the
    broker on delivery unless `auto_ack` is false)."""
    import time
    out = []
    deadline = time.time() + timeout
    while len(out) < n and time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is None:
            time.sleep(0.02)
            continue
        out.append((method, props, body))
    return out


# ---- raw AMQP frames, for what clients will not send ----

def raw_session(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"AMQP\x00\x00\x09\x01")
    return s


def method(channel, class_id, method_id, args=b""):
    payload = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def raw_open(port, heartbeat=0, channel=True):
    """A raw connection through the handshake (PLAIN guest/guest, vhost /),
    with channel 1 opened unless told otherwise."""
    s = raw_session(port)
    s.sendall(method(0, 10, 11, struct.pack(">I", 0) + b"\x05PLAIN"
                     + struct.pack(">I", 12) + b"\x00guest\x00guest" + b"\x05en_US"))
    s.sendall(method(0, 10, 31, struct.pack(">HIH", 0, 131072, heartbeat)))
    s.sendall(method(0, 10, 40, b"\x01/\x00\x00"))
    if channel:
        s.sendall(method(1, 20, 10, b"\x00"))
    return s


def frames(s):
    """(type, channel, payload) of each frame the server sends, until end
    of stream."""
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 7:
            kind, ch, size = struct.unpack(">BHI", buf[:7])
            if len(buf) < size + 8:
                break
            payload, buf = buf[7:7 + size], buf[size + 8:]
            yield kind, ch, payload
