"""Ways in besides MQTT 3.1.1 and 5 over TCP: MQTT over WebSocket at `/mqtt`
on the HTTP listener (what browsers use), MQTT 3.1 (`MQIsdp`, level 3), and
the server's keep-alive limit."""

import base64
import os
import socket
import tempfile
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Standalone
from mqtt_tests.conftest import DISCONNECT, LEVELS, V5, Client, Raw, uid


def ws_client(standalone, level, client_id=None):
    """A paho client over WebSocket, connected, whose messages land in a
    queue like the TCP fixture's."""
    import queue
    got = queue.Queue()
    connected = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"ws-{uid()}",
                    protocol=level, transport="websockets")
    c.ws_set_options(path="/mqtt")
    c.on_message = lambda cl, u, m: got.put(m)
    c.on_connect = lambda cl, u, f, rc, p: connected.put(rc)
    port = int(standalone.http.rsplit(":", 1)[1])
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.get(timeout=10) == 0
    return c, got


@LEVELS
def test_mqtt_over_websocket(standalone, client, level):
    """A WebSocket client subscribes and publishes like a TCP one, and the
    two see each other's messages, payloads of 100 KB included (several
    WebSocket messages' worth)."""
    tag = uid()
    ws, got = ws_client(standalone, level)
    try:
        r = ws.subscribe(f"ws/{tag}/#", qos=1)
        assert r[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.3)
        tcp = client(level)
        tcp.publish(f"ws/{tag}/in", b"from tcp", qos=1)
        m = got.get(timeout=10)
        assert (m.topic, m.payload, m.qos) == (f"ws/{tag}/in", b"from tcp", 1)

        tcp.subscribe(f"back/{tag}", qos=1)
        big = os.urandom(100_000)
        ws.publish(f"back/{tag}", big, qos=1).wait_for_publish(10)
        m = tcp.expect_one()
        assert m.payload == big
    finally:
        ws.disconnect()
        ws.loop_stop()


def test_websocket_upgrade_selects_the_mqtt_subprotocol(standalone):
    """The handshake answers with `Sec-WebSocket-Protocol: mqtt`, which
    browsers insist on when they offered it."""
    port = int(standalone.http.rsplit(":", 1)[1])
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((
            "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, head
            head += chunk
    text = head.decode().lower()
    assert text.startswith("http/1.1 101"), text
    assert "sec-websocket-protocol: mqtt" in text, text


def test_mqtt_31_client(standalone, client):
    """MQTT 3.1 (protocol name `MQIsdp`, level 3) clients still work."""
    tag = uid()
    old = Client(standalone.mqtt_port, mqtt.MQTTv31)
    try:
        _, rc, _ = old.connect()
        assert rc == 0
        assert old.subscribe(f"v31/{tag}", qos=1) == [1]
        new = client(V5)
        new.publish(f"v31/{tag}", b"to 3.1", qos=1)
        m = old.expect_one()
        assert (m.payload, m.qos) == (b"to 3.1", 1)
        new.subscribe(f"v31/{tag}/up", qos=1)
        old.publish(f"v31/{tag}/up", b"from 3.1", qos=1)
        assert new.expect_one().payload == b"from 3.1"
    finally:
        old.close()


@pytest.fixture(scope="module")
def strict():
    """A standalone that allows keep-alives of at most 2 seconds."""
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=["--mqtt-max-keep-alive", "2"])
        s.start()
        yield s
        s.stop()


def test_server_keep_alive(strict):
    """A v5 client asking for more than the server allows is told the
    server's keep-alive in CONNACK, and held to it: silent for 1.5 times
    that, it is disconnected with 0x8D. A 3.1.1 client, which cannot be
    told, is refused as Mosquitto refuses it (0x02)."""
    r = Raw(strict.mqtt_port, 5)
    try:
        assert r.connect(f"ka-{uid()}", keepalive=60) == (False, 0)
        assert r.connack_props.get("ServerKeepAlive") == 2
        start = time.time()
        got = r.until_closed(timeout=10)
        assert 2.5 <= time.time() - start < 6
        assert [p.type for p in got] == [DISCONNECT]
        assert got[0].reason(True) == 0x8D
    finally:
        r.close()

    old = Raw(strict.mqtt_port, 4)
    try:
        assert old.connect(f"ka3-{uid()}", keepalive=60)[1] == 0x02
    finally:
        old.close()

    ok = Raw(strict.mqtt_port, 4)
    try:
        assert ok.connect(f"ka3-{uid()}", keepalive=1)[1] == 0
    finally:
        ok.close()
