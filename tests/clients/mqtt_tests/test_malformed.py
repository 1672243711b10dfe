"""Malformed and forbidden packets close the connection (after a DISCONNECT
with a reason code of 0x80 or more in MQTT 5; 3.1.1 has no server
DISCONNECT) and nothing else: the server keeps serving new clients."""

import struct

import pytest

from mqtt_tests.conftest import DISCONNECT, Raw, alive, encode_props, packet, s, uid


def publish_raw(level, topic_bytes, payload=b"x"):
    body = struct.pack("!H", len(topic_bytes)) + topic_bytes
    if level == 5:
        body += b"\x00"
    return packet(3, 0, body + payload)


def props0(level):
    """An empty property list in v5, nothing before."""
    return b"\x00" if level == 5 else b""


def connect_bytes(level, cid):
    var = s("MQTT") + bytes([level, 0x02]) + struct.pack("!H", 60)
    if level == 5:
        var += encode_props({})
    return packet(1, 0, var + s(cid))


CASES = {
    # Remaining length with five bytes: at most four are allowed.
    "remaining_length_5_bytes": lambda lv: b"\x30\xff\xff\xff\xff\x7f",
    # SUBSCRIBE's fixed header flags must be 0010.
    "subscribe_reserved_flags": lambda lv: packet(8, 0, b"\x00\x01" + props0(lv) + s("a/b") + b"\x01"),
    # PUBREL's fixed header flags must be 0010.
    "pubrel_reserved_flags": lambda lv: packet(6, 0, b"\x00\x01"),
    # UNSUBSCRIBE's too.
    "unsubscribe_reserved_flags": lambda lv: packet(10, 0, b"\x00\x01" + props0(lv) + s("a/b")),
    # PINGREQ with a body.
    "pingreq_with_body": lambda lv: b"\xc0\x01\x00",
    # QoS 3 does not exist.
    "publish_qos3": lambda lv: b"\x36" + publish_raw(lv, b"a/b")[1:],
    "wildcard_in_publish_topic": lambda lv: publish_raw(lv, b"a/+"),
    "hash_in_publish_topic": lambda lv: publish_raw(lv, b"a/#"),
    "invalid_utf8_topic": lambda lv: publish_raw(lv, b"a/\xc3\x28"),
    "nul_in_topic": lambda lv: publish_raw(lv, b"a/\x00b"),
    "second_connect": lambda lv: connect_bytes(lv, f"again-{uid()}"),
    # A packet type only servers send.
    "connack_from_client": lambda lv: b"\x20\x02\x00\x00",
    # Packet type 0 is reserved.
    "reserved_type_0": lambda lv: b"\x00\x00",
    # SUBSCRIBE without any filter [MQTT-3.8.3-3].
    "subscribe_without_filters": lambda lv: packet(8, 2, b"\x00\x01" + props0(lv)),
}


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_packet_closes_the_connection(standalone, level, case):
    r = Raw(standalone.mqtt_port, level)
    try:
        assert r.connect(f"mal-{uid()}") == (False, 0)
        try:
            r.send(CASES[case](level))
        except OSError:
            pass
        got = r.until_closed(timeout=3)
    finally:
        r.close()
    if level == 5:
        assert got and got[-1].type == DISCONNECT, f"no DISCONNECT before close: {got}"
        assert got[-1].reason(True) >= 0x80, f"DISCONNECT {got[-1].reason(True):#x}"
        assert all(p.type == DISCONNECT for p in got), got
    else:
        assert got == [], f"3.1.1 has no server packets to send here: {got}"
    alive(standalone.mqtt_port)


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x10\x0c\x00\x04MQTT\x07\x02\x00\x3c\x00\x00",   # protocol level 7
    b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00",   # wrong protocol name
    b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00",   # CONNECT reserved flag
    b"\x82\x08\x00\x01\x00\x03a/b\x01",                # SUBSCRIBE before CONNECT
], ids=["http", "level_7", "protocol_name", "connect_reserved_flag", "subscribe_first"])
def test_bad_first_packet_is_refused(standalone, payload):
    """Garbage, a wrong protocol, or a first packet that is not CONNECT:
    the connection is closed (a CONNACK with an error code is allowed for a
    CONNECT the server could read), and the server lives on."""
    r = Raw(standalone.mqtt_port, 4)
    try:
        r.send(payload)
        got = r.until_closed(timeout=5)
    finally:
        r.close()
    for p in got:
        assert p.type == 2 and p.body[1] != 0, got
    alive(standalone.mqtt_port)


def test_silent_and_half_sent_connections_time_out(standalone):
    """A connection that sends nothing, half a fixed header or half a
    CONNECT is closed after the connect timeout (10 s by default), not
    kept forever; the three wait together."""
    conns = []
    for payload in (b"", b"\x10", b"\x10\x05\x00\x04MQ"):
        r = Raw(standalone.mqtt_port, 4)
        if payload:
            r.send(payload)
        conns.append(r)
    try:
        for r in conns:
            assert r.until_closed(timeout=15) == []
    finally:
        for r in conns:
            r.close()
    alive(standalone.mqtt_port)


def test_unknown_protocol_level_gets_connack_0x01_or_close(standalone):
    """[MQTT-3.1.2-2]: an unsupported level is answered with CONNACK 0x01
    (3.1.1) / 0x84 (5) and a close, or just a close."""
    r = Raw(standalone.mqtt_port, 4)
    try:
        r.send(b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00")
        got = r.until_closed(timeout=5)
    finally:
        r.close()
    assert all(p.type == 2 and p.body[1] in (0x01, 0x84) for p in got), got
    alive(standalone.mqtt_port)


def test_many_malformed_connections_at_once(standalone):
    """A burst of bad connections does not take the listener down."""
    socks = []
    for i in range(50):
        r = Raw(standalone.mqtt_port, 4)
        r.send(bytes([0x10 + (i % 7), 0xff, 0xff, 0xff, 0xff, 0x01]))
        socks.append(r)
    for r in socks:
        try:
            r.until_closed(timeout=5)
        finally:
            r.close()
    alive(standalone.mqtt_port)
