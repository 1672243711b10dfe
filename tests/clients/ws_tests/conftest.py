"""WebSocket API fixtures: the `websockets` library's synchronous client
speaking Pulsar's JSON frames to the module's standalone process."""

import base64
import json
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

#: How long a test waits to be sure something does *not* arrive.
QUIET = 0.8


def uid():
    return uuid.uuid4().hex[:10]


@pytest.fixture
def tag():
    return uid()


def b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


class Ws:
    """URLs of one broker's WebSocket API, and clients on them."""

    def __init__(self, http):
        self.base = http.replace("http://", "ws://")

    def url(self, kind, topic, sub=None, domain="persistent", ns="public/default", **params):
        path = f"/ws/v2/{kind}/{domain}/{ns}/{topic}"
        if sub is not None:
            path += f"/{sub}"
        return self.base + path + query(params)

    def producer(self, topic, **kw):
        return connect(self.url("producer", topic, **kw), open_timeout=10)

    def consumer(self, topic, sub, **kw):
        return connect(self.url("consumer", topic, sub, **kw), open_timeout=10)

    def reader(self, topic, **kw):
        return connect(self.url("reader", topic, **kw), open_timeout=10)

    def v3(self, sub, **params):
        return connect(f"{self.base}/ws/v3/consumer/{sub}{query(params)}", open_timeout=10)

    def refusal(self, url, **kw):
        """The HTTP status and body of a refused handshake."""
        with pytest.raises(InvalidStatus) as e:
            connect(url, open_timeout=10, **kw)
        r = e.value.response
        return r.status_code, r.body.decode(errors="replace")


def query(params):
    from urllib.parse import urlencode
    params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
    return "?" + urlencode(params) if params else ""


@pytest.fixture
def ws(standalone):
    return Ws(standalone.http)


def send(producer, payload, **fields):
    """Publishes one message; its ack."""
    producer.send(json.dumps({"payload": b64(payload), **fields}))
    return json.loads(producer.recv(timeout=10))


def publish(producer, payloads, **fields):
    """Publishes several messages in a pipeline; their acks, in order."""
    for i, p in enumerate(payloads):
        producer.send(json.dumps({"payload": b64(p), "context": str(i), **fields}))
    acks = [json.loads(producer.recv(timeout=10)) for _ in payloads]
    assert [a["result"] for a in acks] == ["ok"] * len(payloads), acks
    assert [a["context"] for a in acks] == [str(i) for i in range(len(payloads))]
    return acks


def recv(consumer, timeout=10):
    return json.loads(consumer.recv(timeout=timeout))


def recv_all(consumer, n, timeout=10):
    return [recv(consumer, timeout) for _ in range(n)]


def nothing(consumer, wait=QUIET):
    """Asserts that no frame arrives for a while."""
    with pytest.raises(TimeoutError):
        consumer.recv(timeout=wait)


def ack(consumer, msg):
    consumer.send(json.dumps({"messageId": msg["messageId"]}))


def closed_with(sock, timeout=10):
    """The close code and reason the server ended the socket with."""
    with pytest.raises(ConnectionClosed) as e:
        while True:
            sock.recv(timeout=timeout)
    rcvd = e.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)
