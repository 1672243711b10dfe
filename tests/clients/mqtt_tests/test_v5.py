"""MQTT 5 features: publish properties, request/response, message expiry,
topic aliases both ways, and the limits CONNACK announces (Receive Maximum,
Maximum Packet Size)."""

import socket
import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_tests.conftest import DISCONNECT, PUBACK, PUBREC, QUIET, V5, alive, props, uid


def pub_props(**kw):
    return props(PacketTypes.PUBLISH, **kw)


def test_connack_announces_the_limits(raw):
    r = raw(5)
    assert r.connect(f"ca-{uid()}") == (False, 0)
    p = r.connack_props
    assert p.get("ReceiveMaximum") == 1024
    assert p.get("MaximumPacketSize") == 1 << 20
    assert p.get("TopicAliasMaximum", 0) > 0


def test_publish_properties_arrive(client, tag):
    """User properties (order and repeats kept), content type, payload
    format indicator, response topic and correlation data reach the
    subscriber."""
    sub = client(V5)
    sub.subscribe(f"pp/{tag}", qos=1)
    pub = client(V5)
    users = [("a", "1"), ("b", "2"), ("a", "3"), ("ünï", "cödé")]
    pub.publish(f"pp/{tag}", "héllo".encode(), qos=1, properties=pub_props(
        UserProperty=users, ContentType="text/plain; charset=utf-8", PayloadFormatIndicator=1,
        ResponseTopic=f"pp/{tag}/reply", CorrelationData=b"\x00\xffcorr"))
    m = sub.expect_one()
    assert m.payload == "héllo".encode()
    assert m.prop("UserProperty") == users
    assert m.prop("ContentType") == "text/plain; charset=utf-8"
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ResponseTopic") == f"pp/{tag}/reply"
    assert m.prop("CorrelationData") == b"\x00\xffcorr"
    assert m.prop("MessageExpiryInterval") is None


def test_request_response(client, tag):
    """A requester names a response topic and correlation data; a responder
    answers there, echoing the correlation data."""
    responder = client(V5)
    responder.subscribe(f"svc/{tag}/req", qos=1)
    requester = client(V5)
    requester.subscribe(f"svc/{tag}/resp/{requester.client_id}", qos=1)
    for i in range(3):
        requester.publish(f"svc/{tag}/req", f"q{i}".encode(), qos=1, properties=pub_props(
            ResponseTopic=f"svc/{tag}/resp/{requester.client_id}", CorrelationData=f"id{i}".encode()))
    for req in responder.expect(3):
        responder.publish(req.prop("ResponseTopic"), b"re:" + req.payload, qos=1,
                          properties=pub_props(CorrelationData=req.prop("CorrelationData")))
    answers = {m.prop("CorrelationData"): m.payload for m in requester.expect(3)}
    assert answers == {b"id0": b"re:q0", b"id1": b"re:q1", b"id2": b"re:q2"}


def test_message_expiry_for_an_offline_session(client, tag):
    """A message whose Message Expiry Interval passes while it waits for an
    offline persistent session is not delivered; one that has time left is,
    with the interval reduced by the time it waited."""
    cid = f"mx-{tag}"
    cprops = props(PacketTypes.CONNECT, SessionExpiryInterval=300)
    c = client(V5, client_id=cid, clean=False, properties=cprops)
    c.subscribe(f"mx/{tag}", qos=1)
    c.disconnect()
    pub = client(V5)
    pub.publish(f"mx/{tag}", b"expires", qos=1, properties=pub_props(MessageExpiryInterval=1))
    pub.publish(f"mx/{tag}", b"lasts", qos=1, properties=pub_props(MessageExpiryInterval=60))
    pub.publish(f"mx/{tag}", b"forever", qos=1)
    time.sleep(3)
    c2 = client(V5, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False, properties=cprops)
    assert (present, rc) == (True, 0)
    got = c2.expect(2) + c2.collect(QUIET)
    assert [m.payload for m in got] == [b"lasts", b"forever"]
    assert got[0].prop("MessageExpiryInterval") <= 58
    assert got[1].prop("MessageExpiryInterval") is None


def test_inbound_topic_alias(client, tag):
    """A publisher sets alias 1 with a topic, then publishes with the alias
    and an empty topic: the subscriber gets both under the full topic."""
    sub = client(V5)
    sub.subscribe(f"al/{tag}/#", qos=1)
    pub = client(V5)
    pub.publish(f"al/{tag}/long/topic/name", b"first", qos=1, properties=pub_props(TopicAlias=1))
    pub.publish("", b"second", qos=1, properties=pub_props(TopicAlias=1))
    # An alias can be moved to another topic.
    pub.publish(f"al/{tag}/other", b"third", qos=1, properties=pub_props(TopicAlias=1))
    pub.publish("", b"fourth", qos=1, properties=pub_props(TopicAlias=1))
    got = [(m.topic, m.payload) for m in sub.expect(4)]
    assert got == [(f"al/{tag}/long/topic/name", b"first"), (f"al/{tag}/long/topic/name", b"second"),
                   (f"al/{tag}/other", b"third"), (f"al/{tag}/other", b"fourth")]
    # The alias property itself is the publisher's business, not forwarded.
    assert all(m.prop("TopicAlias") is None for m in sub.collect(0.1))


@pytest.mark.parametrize("case", ["unset", "over_max", "zero"])
def test_bad_inbound_topic_alias_disconnects(raw, case):
    """An alias never set (with an empty topic), above the server's Topic
    Alias Maximum or 0 ends the connection: DISCONNECT 0x94 Topic Alias
    invalid for one over the maximum; for an unset alias or 0 the spec
    speaks of a Protocol Error, so 0x82 (or Malformed 0x81 for 0, which
    cannot be encoded as a valid alias) is accepted too."""
    r = raw(5)
    r.connect(f"ba-{uid()}")
    amax = r.connack_props.get("TopicAliasMaximum", 0)
    topic, alias = {"unset": ("", 5), "over_max": ("x/y", amax + 1), "zero": ("x/y", 0)}[case]
    r.publish(topic, b"x", qos=1, pid=1, props={"TopicAlias": alias})
    got = r.until_closed(timeout=5)
    assert got and got[-1].type == DISCONNECT, got
    allowed = {"unset": {0x94, 0x82}, "over_max": {0x94}, "zero": {0x94, 0x82, 0x81}}[case]
    assert got[-1].reason(True) in allowed, f"DISCONNECT {got[-1].reason(True):#x}"


def test_outbound_topic_aliases(client, tag):
    """A client announcing Topic Alias Maximum > 0 may get repeated
    deliveries of one topic as an alias with an empty topic; every
    message must still resolve to its topic (the fixture resolves aliases
    as the spec says a client must)."""
    sub = client(V5, properties=props(PacketTypes.CONNECT, TopicAliasMaximum=10))
    sub.subscribe(f"oa/{tag}/#", qos=1)
    pub = client(V5)
    topics = [f"oa/{tag}/a", f"oa/{tag}/b"] * 3
    for i, t in enumerate(topics):
        pub.publish(t, f"{i}".encode(), qos=1)
    got = sub.expect(6)
    assert [(m.topic, m.payload) for m in got] == [(t, f"{i}".encode()) for i, t in enumerate(topics)]
    aliases = [m.prop("TopicAlias") for m in got]
    assert all(a is None or 1 <= a <= 10 for a in aliases)
    assert any(m.via_alias for m in got), "no delivery used an alias"


def test_no_outbound_aliases_without_topic_alias_maximum(client, tag):
    sub = client(V5)
    sub.subscribe(f"na/{tag}", qos=1)
    pub = client(V5)
    for i in range(3):
        pub.publish(f"na/{tag}", b"x", qos=1)
    assert all(m.prop("TopicAlias") is None and m.topic == f"na/{tag}" for m in sub.expect(3))


def test_receive_maximum_exceeded(raw, standalone, tag):
    """More unacknowledged QoS 2 publishes than the server's Receive Maximum
    (a QoS 2 publish counts until PUBCOMP, MQTT 5 4.9, so PUBREL is never
    sent here) is DISCONNECT 0x93 Receive Maximum exceeded."""
    r = raw(5)
    r.connect(f"rm-{tag}")
    rmax = r.connack_props.get("ReceiveMaximum", 65535)
    data = b"".join(r.publish_bytes(f"rm/{tag}", b"x", qos=2, pid=i) for i in range(1, rmax + 2))
    try:
        r.send(data)
    except OSError:
        pass
    try:
        got = r.until_closed(timeout=5)
    except AssertionError as e:
        raise AssertionError(f"sent {rmax + 1} QoS 2 PUBLISH without PUBREL (Receive Maximum "
                             f"{rmax}): {e}") from None
    recs = [p for p in got if p.type == PUBREC]
    assert got and got[-1].type == DISCONNECT, f"{len(recs)} PUBREC, then {got[-1:] or 'close'}"
    assert got[-1].reason(True) == 0x93, f"DISCONNECT {got[-1].reason(True):#x}"
    assert len(recs) <= rmax
    alive(standalone.mqtt_port)


def test_a_311_client_has_no_receive_maximum(raw, standalone, tag):
    """3.1.1 has no Receive Maximum: a client with more QoS 1 publishes in
    flight than the v5 limit is slowed down, not disconnected, and every
    publish is acknowledged."""
    r = raw(4)
    r.connect(f"rm3-{tag}")
    n = 3000
    data = b"".join(r.publish_bytes(f"rm3/{tag}", b"x", qos=1, pid=i) for i in range(1, n + 1))
    r.send(data)
    acked = set()
    while len(acked) < n:
        p = r.recv(timeout=20)
        assert p is not None, f"closed after {len(acked)} PUBACKs"
        assert p.type == PUBACK, p
        acked.add(p.packet_id)
    assert acked == set(range(1, n + 1))


@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
def test_packet_over_maximum_packet_size(raw, standalone, tag, level):
    """A PUBLISH larger than the server's Maximum Packet Size (CONNACK, v5)
    ends the connection: DISCONNECT 0x95 Packet too large in v5, a plain
    close in 3.1.1. The server should not need the whole packet to decide."""
    r = raw(level)
    r.connect(f"mp-{tag}")
    maxp = r.connack_props.get("MaximumPacketSize", 1 << 20)
    whole = r.publish_bytes(f"mp/{tag}", b"x" * maxp, qos=1, pid=1)
    try:
        r.send(whole[:64])
        try:
            first = r.recv(timeout=2)
            got = [] if first is None else [first] + r.until_closed(5)
        except socket.timeout:
            r.send(whole[64:])
            got = r.until_closed(10)
    except (BrokenPipeError, ConnectionResetError):
        got = r.until_closed(5)
    assert all(p.type == DISCONNECT for p in got), got
    if level == 5:
        assert got and got[-1].reason(True) == 0x95, got
    else:
        assert got == []
    alive(standalone.mqtt_port)


def test_publish_just_under_maximum_packet_size(client, tag):
    sub = client(V5)
    sub.subscribe(f"big/{tag}", qos=1)
    pub = client(V5)
    payload = bytes(range(256)) * ((1 << 20) // 256 - 1)
    pub.publish(f"big/{tag}", payload, qos=1)
    assert sub.expect_one(timeout=20).payload == payload


def test_client_maximum_packet_size_is_respected(client, tag):
    """A delivery larger than the client's own Maximum Packet Size is not
    sent to it (MQTT 5 3.1.2.11.4: discarded as if delivered); smaller ones
    still are."""
    sub = client(V5, properties=props(PacketTypes.CONNECT, MaximumPacketSize=1024))
    sub.subscribe(f"cm/{tag}", qos=1)
    pub = client(V5)
    pub.publish(f"cm/{tag}", b"x" * 4000, qos=1)
    pub.publish(f"cm/{tag}", b"small", qos=1)
    got = sub.expect(1) + sub.collect(0.5)
    assert [m.payload for m in got] == [b"small"]
    assert sub.c.is_connected()


@pytest.mark.parametrize("qos", [1, 2])
def test_a_dropped_oversized_delivery_frees_its_receive_maximum_slot(client, tag, qos):
    """With Receive Maximum 1, a delivery over the client's Maximum Packet
    Size is dropped as if delivered, and its slot is free again: the
    next messages still arrive."""
    sub = client(V5, properties=props(PacketTypes.CONNECT, MaximumPacketSize=1024,
                                      ReceiveMaximum=1))
    sub.subscribe(f"rm/{tag}", qos=qos)
    pub = client(V5)
    pub.publish(f"rm/{tag}", b"x" * 4000, qos=qos)
    for i in range(3):
        pub.publish(f"rm/{tag}", b"small %d" % i, qos=qos)
    got = sub.expect(3) + sub.collect(0.5)
    assert [m.payload for m in got] == [b"small 0", b"small 1", b"small 2"]


def test_server_keeps_qos2_inbound_state_for_pubrel_only(raw, tag):
    """A QoS 2 publish is acknowledged with PUBREC; the PUBREL is answered
    with PUBCOMP 0 (the normal flow, byte for byte)."""
    r = raw(5)
    r.connect(f"q2-{tag}")
    r.publish(f"q2/{tag}", b"x", qos=2, pid=42)
    rec = r.expect(PUBREC)
    assert rec.packet_id == 42 and rec.reason(True) == 0
    r.ack(6, 42)
    comp = r.expect(7)
    assert comp.packet_id == 42 and comp.reason(True) == 0
