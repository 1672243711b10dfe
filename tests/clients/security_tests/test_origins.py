"""Browser-borne requests: a page on another origin may neither open a
WebSocket (the Pulsar-style API or MQTT over WebSocket) nor send a request
that changes state, even with authentication off and the listener on
127.0.0.1; the listener's own origin may, clients that send no `Origin`
(not browsers) are not concerned, and `--allowed-origins` replaces the
default."""

import tempfile
import urllib.error
import urllib.request
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import Standalone

EVIL = "http://evil.example:8080"


def status(s, method, path, origin=None, body=b'{"messages":[{"payload":"aGk="}]}'):
    req = urllib.request.Request(f"{s.http}{path}", method=method,
                                 data=body if method != "GET" else None)
    req.add_header("Content-Type", "application/json")
    if origin:
        req.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def ws(s, path, origin=None, subprotocols=None):
    url = f"ws://127.0.0.1:{s.ports['http']}{path}"
    try:
        with connect(url, origin=origin, open_timeout=10, subprotocols=subprotocols):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_other_origins_may_not_open_websockets_or_change_state(standalone):
    s = standalone
    own = f"http://127.0.0.1:{s.ports['http']}"
    t = f"o-{uuid.uuid4().hex[:6]}"
    consumer = f"/ws/v2/consumer/persistent/public/default/{t}/sub"
    assert ws(s, consumer, origin=EVIL) == 403
    assert ws(s, "/mqtt", origin=EVIL, subprotocols=["mqtt"]) == 403
    assert ws(s, consumer, origin=own) == 101
    assert ws(s, consumer, origin=f"http://localhost:{s.ports['http']}") == 101
    assert ws(s, consumer) == 101
    produce = f"/topics/persistent/public/default/{t}"
    assert status(s, "POST", produce, origin=EVIL) == 403
    assert status(s, "PUT", f"/admin/v2/namespaces/public/{t}", origin=EVIL, body=b"") == 403
    assert status(s, "POST", produce, origin=own) == 200
    assert status(s, "POST", produce) == 200
    # Reads are left to the browser's same-origin policy: no CORS headers.
    assert status(s, "GET", "/admin/v2/brokers/health", origin=EVIL) == 200


def test_allowed_origins_replace_the_default():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--allowed-origins", "https://console.example"])
        s.start()
        try:
            t = f"o-{uuid.uuid4().hex[:6]}"
            path = f"/ws/v2/consumer/persistent/public/default/{t}/sub"
            assert ws(s, path, origin="https://console.example") == 101
            assert ws(s, path, origin=f"http://127.0.0.1:{s.ports['http']}") == 403
        finally:
            s.stop()


def test_a_websocket_token_may_travel_as_a_subprotocol(secured):
    """Browsers cannot set headers on a WebSocket: the token may come as a
    `bearer.<jwt>` subprotocol next to `magnetar`, which is echoed."""
    url = secured.http.replace("http://", "ws://") + \
        "/ws/v2/producer/persistent/public/default/subprotocol-auth"
    with connect(url, subprotocols=["magnetar", "bearer." + secured.token("admin")]) as ws:
        assert ws.subprotocol == "magnetar"
        ws.send('{"payload": "aGk="}')
        assert '"result":"ok"' in ws.recv(timeout=10).replace(" ", "")
    try:
        connect(url, subprotocols=["magnetar", "bearer.forged"], open_timeout=10)
        raise AssertionError("a forged token was taken")
    except InvalidStatus as e:
        assert e.response.status_code == 401
