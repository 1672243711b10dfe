"""AMQP fixtures: pika connections to the module's standalone process."""

import contextlib

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
