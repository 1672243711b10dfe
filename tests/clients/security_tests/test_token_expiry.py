"""A token's `exp` holds on open connections: each protocol's connection
closes within a second of it, with that protocol's authorization error
(AMQP connection.close 403, MQTT 5 DISCONNECT 0x87, WebSocket close 1008;
a Kafka client finds its connection closed and its token refused), and
not before it."""

import base64
import json
import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pika
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

LIFETIME = "6s"


def expiring(s):
    """A superuser token that expires in a few seconds, and its `exp`."""
    token = s.token("admin", expiry=LIFETIME)
    body = token.split(".")[1]
    exp = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["exp"]
    return token, exp


def assert_closed_at_exp(closed_at, exp, what):
    assert closed_at >= exp - 0.05, f"{what} closed {exp - closed_at:.2f} s before exp"
    assert closed_at <= exp + 1.0, f"{what} closed {closed_at - exp:.2f} s after exp"


def sasl_conf(secured, token, **extra):
    """librdkafka's settings for SASL/PLAIN with `token` in public/default."""
    return {
        "bootstrap.servers": secured.kafka,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "public/default",
        "sasl.password": "token:" + token,
        **extra,
    }


def test_kafka(secured):
    token, exp = expiring(secured)
    errors = queue.Queue()
    p = Producer(sasl_conf(secured, token, error_cb=lambda e: errors.put((time.time(), e))))
    p.produce(f"exp-{uuid.uuid4().hex[:6]}", b"before")
    assert p.flush(30) == 0
    assert time.time() < exp - 1, "the token expired before the test began"
    first = None
    deadline = exp + 10
    while first is None and time.time() < deadline:
        p.poll(0.05)
        try:
            first = errors.get_nowait()
        except queue.Empty:
            pass
    assert first is not None, "the Kafka connection outlived its token"
    assert_closed_at_exp(first[0], exp, f"Kafka ({first[1]})")


def test_kafka_reauthenticates_on_its_connection_before_exp(secured):
    """KIP-368: the SASL answer tells the client its session ends at the
    token's exp; a client given a new token re-authenticates on the same
    connection before then and keeps it past the old exp."""
    token, exp = expiring(secured)
    stats = queue.Queue()
    errors = queue.Queue()
    p = Producer(sasl_conf(secured, token, **{"statistics.interval.ms": 500,
                                               "stats_cb": stats.put,
                                               "error_cb": errors.put}))
    topic = f"reauth-{uuid.uuid4().hex[:6]}"
    p.produce(topic, b"before")
    assert p.flush(30) == 0
    # Used from the re-authentication on.
    p.set_sasl_credentials("public/default", "token:" + secured.token("admin"))
    while time.time() < exp + 3:
        p.produce(topic, b"across exp")
        p.poll(0.2)
    assert p.flush(30) == 0
    assert errors.empty(), list(errors.queue)
    last = None
    while not stats.empty():
        last = json.loads(stats.get())
    brokers = [b for b in last["brokers"].values() if b["nodeid"] >= 0]
    assert brokers and all(b["connects"] == 1 for b in brokers), \
        [(b["name"], b["connects"], b["disconnects"]) for b in brokers]


def test_amqp(secured):
    token, exp = expiring(secured)
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", secured.amqp_port, credentials=pika.PlainCredentials("admin", token)))
    ch = conn.channel()
    ch.queue_declare(f"exp-{uuid.uuid4().hex[:6]}", exclusive=True)
    closed = None
    while closed is None and time.time() < exp + 10:
        try:
            conn.process_data_events(time_limit=0.05)
        except pika.exceptions.ConnectionClosedByBroker as e:
            closed = (time.time(), e.reply_code)
    assert closed is not None, "the AMQP connection outlived its token"
    assert closed[1] == 403
    assert_closed_at_exp(closed[0], exp, "AMQP")


def test_mqtt(secured):
    token, exp = expiring(secured)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"exp-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set("public/default", token)
    events = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: events.put(("connect", rc.value))
    c.on_disconnect = lambda _c, _u, _f, rc, _p: events.put(("disconnect", time.time(),
                                                             rc.value))
    c.reconnect_delay_set(60, 60)
    props = Properties(PacketTypes.CONNECT)
    c.connect("127.0.0.1", secured.mqtt_port, keepalive=60, properties=props)
    c.loop_start()
    try:
        assert events.get(timeout=30) == ("connect", 0)
        kind, at, reason = events.get(timeout=exp - time.time() + 10)
        assert kind == "disconnect"
        assert reason == 0x87, hex(reason)
        assert_closed_at_exp(at, exp, "MQTT")
    finally:
        c.loop_stop()


def test_websocket(secured):
    token, exp = expiring(secured)
    url = (f"ws://127.0.0.1:{secured.ports['http']}/ws/v2/consumer/persistent/public/default/"
           f"exp-{uuid.uuid4().hex[:6]}/sub")
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                 open_timeout=10) as w:
        closed = None
        while closed is None and time.time() < exp + 10:
            try:
                w.recv(timeout=0.05)
            except TimeoutError:
                pass
            except ConnectionClosed as e:
                closed = (time.time(), e.rcvd.code if e.rcvd else None)
    assert closed is not None, "the WebSocket outlived its token"
    assert closed[1] == 1008
    assert_closed_at_exp(closed[0], exp, "WebSocket")


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind, body):
    return bytes([kind]) + _varint(len(body)) + body


def _s(data):
    data = data.encode() if isinstance(data, str) else data
    return len(data).to_bytes(2, "big") + data


def _token_props(token):
    # Authentication Method 0x15 "token", Authentication Data 0x16.
    props = b"\x15" + _s("token") + b"\x16" + _s(token)
    return _varint(len(props)) + props


def _read_packet(sock):
    head = sock.recv(1)
    if not head:
        return None, b""
    n, shift = 0, 0
    while True:
        b = sock.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return head[0], body


def test_mqtt5_reauthenticates_with_auth_before_exp(secured):
    """MQTT 5 enhanced authentication with the method `token`: CONNECT
    carries the token as authentication data, AUTH 0x19 with a new token
    of the same role keeps the connection past the old exp, and one of
    another role ends it with DISCONNECT 0x87. (No client library in the
    suite sends AUTH, so the packets are written here, per MQTT 5.0
    3.1, 3.2 and 3.15.)"""
    import socket
    token, exp = expiring(secured)
    with socket.create_connection(("127.0.0.1", secured.mqtt_port), timeout=10) as s:
        connect_body = (_s("MQTT") + b"\x05\x02\x00\x3c" + _token_props(token)
                        + _s(f"reauth-{uuid.uuid4().hex[:6]}"))
        s.sendall(_packet(0x10, connect_body))
        kind, body = _read_packet(s)
        assert kind == 0x20 and body[1] == 0, (hex(kind or 0), body[:4])
        assert b"\x15\x00\x05token" in body, "CONNACK names the method"
        s.sendall(_packet(0xF0, b"\x19" + _token_props(secured.token("admin"))))
        kind, body = _read_packet(s)
        assert kind == 0xF0 and body[0] == 0x00, (hex(kind or 0), body[:4])
        time.sleep(max(0.0, exp - time.time()) + 1.5)
        s.sendall(b"\xc0\x00")  # PINGREQ, past the first token's exp
        assert _read_packet(s) == (0xD0, b"")
        s.sendall(_packet(0xF0, b"\x19" + _token_props(secured.token("sensor"))))
        kind, body = _read_packet(s)
        assert kind == 0xE0 and body[0] == 0x87, (hex(kind or 0), body[:4])
    # A method other than `token` is refused at CONNECT.
    with socket.create_connection(("127.0.0.1", secured.mqtt_port), timeout=10) as s:
        props = b"\x15" + _s("SCRAM-SHA-256")
        s.sendall(_packet(0x10, _s("MQTT") + b"\x05\x02\x00\x3c" + _varint(len(props)) + props
                          + _s("scram")))
        kind, body = _read_packet(s)
        assert kind == 0x20 and body[1] == 0x8C, (hex(kind or 0), body[:4])
