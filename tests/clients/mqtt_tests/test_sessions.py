"""Sessions: wills, session expiry, takeover by a second connection with
the same client id, and what a resumed session keeps."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from mqtt_tests.conftest import (LEVELS, PUBLISH, QUIET, SUBACK, V311, V5, level_num,
                                  props, uid)


def will(topic, payload=b"gone", qos=1, retain=False, **wprops):
    return (topic, payload, qos, retain, props(PacketTypes.WILLMESSAGE, **wprops) if wprops else None)


@LEVELS
def test_will_fires_when_the_socket_just_closes(client, tag, level):
    watcher = client(level)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    dev = client(level, will=will(f"will/{tag}/dev", b"dev died"))
    dev.drop()
    m = watcher.expect_one()
    assert (m.topic, m.payload, m.qos) == (f"will/{tag}/dev", b"dev died", 1)


@LEVELS
def test_will_fires_when_the_raw_socket_closes(client, raw, tag, level):
    """The same with a client that only ever wrote CONNECT."""
    watcher = client(level)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    r = raw(level_num(level))
    assert r.connect(f"rw-{tag}", will=(f"will/{tag}/raw", b"raw died", 1, False, None)) == (False, 0)
    r.close()
    m = watcher.expect_one()
    assert (m.topic, m.payload) == (f"will/{tag}/raw", b"raw died")


@LEVELS
def test_no_will_after_a_clean_disconnect(client, tag, level):
    watcher = client(level)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    dev = client(level, will=will(f"will/{tag}/dev"))
    dev.disconnect()
    watcher.expect_none(1.5)


def test_v5_disconnect_with_will_message_sends_the_will(client, tag):
    """Reason code 0x04 on DISCONNECT asks for the will all the same."""
    watcher = client(V5)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    dev = client(V5, will=will(f"will/{tag}/dev", b"asked for"))
    dev.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
    assert watcher.expect_one().payload == b"asked for"


def test_v5_will_properties_are_carried(client, tag):
    watcher = client(V5)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    dev = client(V5, will=will(f"will/{tag}/dev", b"{}", ContentType="application/json",
                               UserProperty=[("why", "crash")], ResponseTopic="r/t",
                               CorrelationData=b"\x01\x02"))
    dev.drop()
    m = watcher.expect_one()
    assert m.prop("ContentType") == "application/json"
    assert m.prop("UserProperty") == [("why", "crash")]
    assert m.prop("ResponseTopic") == "r/t"
    assert m.prop("CorrelationData") == b"\x01\x02"


def test_v5_will_delay_waits_then_fires(client, tag):
    """With a Will Delay Interval the will goes out that long after the
    connection is lost, not at once."""
    watcher = client(V5)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    cid = f"wd-{tag}"
    dev = client(V5, client_id=cid, clean=False,
                 properties=props(PacketTypes.CONNECT, SessionExpiryInterval=30),
                 will=will(f"will/{tag}/dev", b"late", WillDelayInterval=2))
    t0 = time.time()
    dev.drop()
    watcher.expect_none(1.2)
    m = watcher.expect_one(timeout=6)
    assert m.payload == b"late"
    assert time.time() - t0 >= 1.8


def test_v5_will_delay_cancelled_by_reconnecting(client, tag):
    """A client that comes back within the Will Delay Interval (its session
    outliving the delay) has its will cancelled."""
    watcher = client(V5)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    cid = f"wd-{tag}"
    connect_props = props(PacketTypes.CONNECT, SessionExpiryInterval=30)
    dev = client(V5, client_id=cid, clean=False, properties=connect_props,
                 will=will(f"will/{tag}/dev", b"should not fire", WillDelayInterval=2))
    dev.drop()
    time.sleep(0.3)
    again = client(V5, client_id=cid, clean=False, properties=connect_props)
    watcher.expect_none(3.5)
    again.disconnect()
    watcher.expect_none(0.5)


def test_v5_will_delay_is_capped_by_session_expiry(client, tag):
    """The will goes out when the session ends, if that is sooner than
    the delay (MQTT 5, 3.1.3.2.2)."""
    watcher = client(V5)
    watcher.subscribe(f"will/{tag}/#", qos=1)
    dev = client(V5, client_id=f"wx-{tag}", clean=False,
                 properties=props(PacketTypes.CONNECT, SessionExpiryInterval=1),
                 will=will(f"will/{tag}/dev", b"at expiry", WillDelayInterval=60))
    dev.drop()
    assert watcher.expect_one(timeout=5).payload == b"at expiry"


@LEVELS
def test_takeover_disconnects_the_first_connection(client, tag, level):
    cid = f"to-{tag}"
    first = client(level, client_id=cid)
    second = client(level, client_id=cid)
    first.wait_disconnected(timeout=5)
    # The second connection works.
    second.subscribe(f"to/{tag}", qos=1)
    second.publish(f"to/{tag}", b"still here", qos=1)
    assert second.expect_one().payload == b"still here"
    assert second.c.is_connected()


def test_v5_takeover_reason_code(client, raw, tag):
    """The v5 connection taken over is told why: DISCONNECT 0x8E Session
    taken over, then a close. (A raw client reads it: paho 2.1 ignores the
    reason code of a DISCONNECT whose remaining length is 2.)"""
    cid = f"to5-{tag}"
    first = raw(5)
    assert first.connect(cid) == (False, 0)
    client(V5, client_id=cid)
    got = first.until_closed(timeout=5)
    assert [(p.name, p.reason(True)) for p in got] == [("DISCONNECT", 0x8E)]


@LEVELS
def test_takeover_keeps_the_session(client, tag, level):
    """A second connection with clean session off resumes the first's
    session: its subscriptions keep delivering."""
    cid = f"tk-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=60)} if level == V5 else {}
    first = client(level, client_id=cid, clean=False, **kw)
    first.subscribe(f"tk/{tag}", qos=1)
    second = client(level, client_id=cid, connect=False, clean=False)
    present, rc, _ = second.connect(clean_start=False, **kw)
    assert (present, rc) == (True, 0)
    first.wait_disconnected(timeout=5)
    pub = client(level)
    pub.publish(f"tk/{tag}", b"to the new one", qos=1)
    assert second.expect_one().payload == b"to the new one"


@LEVELS
def test_session_present_without_subscriptions(client, tag, level):
    """A session exists from the first CONNECT with clean session off,
    subscriptions or not: reconnecting reports it ([MQTT-3.2.2-2], MQTT 5
    3.2.2.1.1)."""
    cid = f"sp-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=60)} if level == V5 else {}
    c = client(level, client_id=cid, clean=False, **kw)
    c.disconnect()
    c2 = client(level, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False, **kw)
    assert (present, rc) == (True, 0)


@LEVELS
def test_unacknowledged_delivery_is_resent_with_dup_on_reconnect(client, raw, tag, level):
    """A QoS 1 delivery the client did not acknowledge before its
    connection dropped is sent again on reconnect, with DUP set
    [MQTT-3.3.1-1] (and, for v5, on the resumed session)."""
    n = level_num(level)
    cid = f"dup-{tag}"
    sprops = {"SessionExpiryInterval": 300} if n == 5 else None
    r = raw(n)
    r.connect(cid, clean=False, props=sprops)
    r.subscribe(1, [(f"dup/{tag}", 1)])
    r.expect(SUBACK)
    pub = client(level)
    pub.publish(f"dup/{tag}", b"unacked", qos=1)
    first = r.expect(PUBLISH)
    assert first.body.endswith(b"unacked") and not first.flags & 0x08
    r.close()
    r2 = raw(n)
    assert r2.connect(cid, clean=False, props=sprops) == (True, 0)
    again = r2.expect(PUBLISH)
    assert again.body.endswith(b"unacked")
    assert again.flags & 0x08, f"resent without DUP: {again}"


def test_v5_session_expiry(client, tag):
    """A session with Session Expiry Interval 1 is gone 3 s after its
    connection; one of 60 s is still there."""
    short, long_ = f"se1-{tag}", f"se60-{tag}"
    for cid, secs in ((short, 1), (long_, 60)):
        c = client(V5, client_id=cid, clean=False,
                   properties=props(PacketTypes.CONNECT, SessionExpiryInterval=secs))
        c.subscribe(f"se/{tag}", qos=1)
        c.disconnect()
    time.sleep(3)
    res = {}
    for cid in (short, long_):
        c = client(V5, client_id=cid, connect=False, clean=False)
        present, rc, _ = c.connect(clean_start=False,
                                   properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
        assert rc == 0
        res[cid] = present
        c.disconnect()
    assert res == {short: False, long_: True}


def test_v5_session_expiry_zero_ends_the_session_at_disconnect(client, tag):
    cid = f"se0-{tag}"
    c = client(V5, client_id=cid, clean=False)  # no Session Expiry Interval: 0
    c.subscribe(f"se/{tag}", qos=1)
    c.disconnect()
    c2 = client(V5, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False)
    assert (present, rc) == (False, 0)


def test_v5_disconnect_can_shorten_session_expiry(client, tag):
    """DISCONNECT may set a new Session Expiry Interval: 0 ends the session."""
    cid = f"sd-{tag}"
    c = client(V5, client_id=cid, clean=False,
               properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    c.subscribe(f"sd/{tag}", qos=1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    time.sleep(0.3)
    c2 = client(V5, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False,
                                properties=props(PacketTypes.CONNECT, SessionExpiryInterval=60))
    assert (present, rc) == (False, 0)


@LEVELS
def test_clean_session_discards_the_old_session(client, tag, level):
    cid = f"cs-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=60)} if level == V5 else {}
    c = client(level, client_id=cid, clean=False, **kw)
    c.subscribe(f"cs/{tag}", qos=1)
    c.disconnect()
    c2 = client(level, client_id=cid, connect=False, clean=True)
    present, rc, _ = c2.connect(clean_start=True)
    assert (present, rc) == (False, 0)
    pub = client(level)
    pub.publish(f"cs/{tag}", b"nobody listens", qos=1)
    c2.expect_none(QUIET)


@LEVELS
def test_offline_messages_wait_for_a_persistent_session(client, tag, level):
    """Without a restart: QoS 1 messages published while the client is
    away are delivered when it comes back, QoS 0 ones may be dropped."""
    cid = f"off-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=300)} if level == V5 else {}
    c = client(level, client_id=cid, clean=False, **kw)
    c.subscribe(f"off/{tag}", qos=1)
    c.disconnect()
    pub = client(level)
    for i in range(5):
        pub.publish(f"off/{tag}", f"m{i}".encode(), qos=1)
    c2 = client(level, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False, **kw)
    assert (present, rc) == (True, 0)
    got = c2.expect(5)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)]


def test_v311_empty_client_id_needs_clean_session(raw):
    """3.1.1: a zero-length client id with clean session off is refused with
    0x02 Identifier rejected; with clean session on, it is given one."""
    r = raw(4)
    assert r.connect("", clean=False) == (False, 0x02)
    r2 = raw(4)
    assert r2.connect("", clean=True) == (False, 0)


def test_v5_will_topic_with_a_wildcard_is_refused(raw):
    """A will topic must be a valid topic name: CONNACK 0x90 Topic Name
    invalid (or another code >= 0x80), then a close."""
    r = raw(5)
    r.send(b"")
    try:
        present, rc = r.connect(f"wt-{uid()}", will=("a/+", b"x", 0, False, None))
    except AssertionError:
        raise AssertionError("closed without CONNACK") from None
    assert rc >= 0x80 and not present, f"CONNACK {rc:#x}"
    assert r.until_closed(timeout=5) == []


def test_v5_empty_client_id_is_assigned(raw):
    r = raw(5)
    assert r.connect("", clean=True) == (False, 0)
    assert r.connack_props.get("AssignedClientIdentifier", "")


@pytest.mark.parametrize("level", [V311], ids=["v311"])
def test_v311_keepalive_expiry_fires_the_will(client, raw, tag, level):
    """A client silent for 1.5 x its keep-alive is dropped and its will
    published."""
    watcher = client(level)
    watcher.subscribe(f"ka/{tag}", qos=1)
    r = raw(4)
    r.connect(f"ka-{tag}", keepalive=1, will=(f"ka/{tag}", b"timed out", 1, False, None))
    t0 = time.time()
    assert watcher.expect_one(timeout=6).payload == b"timed out"
    assert time.time() - t0 >= 1.2


@pytest.mark.parametrize("level", [4, 5])
def test_packets_written_together_with_connect_are_served(raw, tag, level):
    """A client may send SUBSCRIBE (and anything else) before CONNACK
    comes back, and the bytes then often arrive in one segment with
    CONNECT; they are served at once, not when the client sends more."""
    import struct

    from mqtt_tests.conftest import CONNACK, CONNECT, SUBSCRIBE, encode_props, packet, s

    r = raw(level)
    var = s("MQTT") + bytes([level, 0x02]) + struct.pack("!H", 60)
    sub = struct.pack("!H", 7)
    if level == 5:
        var += encode_props({})
        sub += encode_props({})
    sub += s(f"together/{tag}/#") + b"\x01"
    r.send(packet(CONNECT, 0, var + s(f"together-{tag}")) + packet(SUBSCRIBE, 0x02, sub))
    assert r.expect(CONNACK).body[-1 if level == 4 else 1] == 0
    ack = r.expect(SUBACK, timeout=5)
    assert ack.body[:2] == struct.pack("!H", 7)
    assert ack.body[-1] == 1, ack
