"""Persistent sessions outlive the broker: subscriptions and the QoS 1
messages queued for an offline client survive a restart (SIGTERM and
SIGKILL). This module restarts its own standalone process."""

import signal
import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_tests.conftest import LEVELS, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, V5, level_num, props


@LEVELS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_persistent_session_survives_a_restart(standalone, client, tag, level, sig):
    cid = f"ps-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=3600)} if level == V5 else {}
    c = client(level, client_id=cid, clean=False, **kw)
    assert c.subscribe(f"ps/{tag}/#", qos=1) == [1]
    c.disconnect()

    pub = client(level)
    for i in range(10):
        pub.publish(f"ps/{tag}/{i % 2}", f"m{i}".encode(), qos=1)
    pub.disconnect()

    standalone.restart(sig)

    c2 = client(level, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False, **kw)
    assert (present, rc) == (True, 0)
    got = c2.expect(10, timeout=15)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(10)]
    assert all(m.qos == 1 for m in got)
    # The subscription itself survived too: new publishes arrive.
    pub2 = client(level)
    pub2.publish(f"ps/{tag}/new", b"after restart", qos=1)
    m = c2.expect_one()
    assert (m.topic, m.payload) == (f"ps/{tag}/new", b"after restart")


@LEVELS
def test_unacknowledged_delivery_is_redelivered_after_a_restart(standalone, client, raw, tag, level):
    """A QoS 1 delivery the client never acknowledged comes again, with
    DUP, after the broker restarts."""
    n = level_num(level)
    cid = f"ua-{tag}"
    sprops = {"SessionExpiryInterval": 3600} if n == 5 else None
    r = raw(n)
    assert r.connect(cid, clean=False, props=sprops) == (False, 0)
    r.subscribe(1, [(f"ua/{tag}", 1)], props=None)
    r.expect(SUBACK)
    pub = client(level)
    pub.publish(f"ua/{tag}", b"unacked", qos=1)
    p = r.expect(PUBLISH)
    assert p.body.endswith(b"unacked") and p.flags & 0x08 == 0
    r.close()  # no PUBACK

    standalone.restart()

    r2 = raw(n)
    present, rc = r2.connect(cid, clean=False, props=sprops)
    assert (present, rc) == (True, 0)
    p = r2.expect(PUBLISH, timeout=15)
    assert p.body.endswith(b"unacked")
    assert p.flags & 0x08, "a redelivery must carry DUP"


@LEVELS
def test_qos2_exactly_once_across_a_restart(standalone, client, raw, tag, level):
    """A persistent session's QoS 2 publish stored (PUBREC sent) and not
    released when the broker restarts: the client resends it with DUP,
    and it is still routed once."""
    n = level_num(level)
    cid = f"q2r-{tag}"
    sprops = {"SessionExpiryInterval": 3600} if n == 5 else None
    sub_id = f"q2rs-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=3600)} if level == V5 else {}
    sub = client(level, client_id=sub_id, clean=False, **kw)
    assert sub.subscribe(f"q2r/{tag}", qos=2) == [2]
    sub.disconnect()

    r = raw(n)
    assert r.connect(cid, clean=False, props=sprops)[1] == 0
    r.publish(f"q2r/{tag}", b"once", qos=2, pid=11)
    assert r.expect(PUBREC).packet_id == 11
    r.close()  # no PUBREL

    standalone.restart()

    r2 = raw(n)
    assert r2.connect(cid, clean=False, props=sprops) == (True, 0)
    r2.publish(f"q2r/{tag}", b"once", qos=2, pid=11, dup=True)
    assert r2.expect(PUBREC).packet_id == 11
    r2.ack(PUBREL, 11)
    comp = r2.expect(PUBCOMP)
    assert comp.packet_id == 11 and comp.reason(r2.v5) == 0

    sub2 = client(level, client_id=sub_id, connect=False, clean=False)
    present, rc, _ = sub2.connect(clean_start=False, **kw)
    assert (present, rc) == (True, 0)
    got = sub2.expect(1, timeout=15) + sub2.collect()
    assert [m.payload for m in got] == [b"once"]


def test_v5_session_expires_after_a_restart(standalone, client, tag):
    """A session's expiry goes on counting across a broker restart, which
    loses the timer that would have ended it: the brokers' sweep of
    expired sessions ends it (within ten seconds of its expiry)."""
    cid = f"exr-{tag}"
    kw = {"properties": props(PacketTypes.CONNECT, SessionExpiryInterval=2)}
    c = client(V5, client_id=cid, clean=False, **kw)
    assert c.subscribe(f"exr/{tag}", qos=1) == [1]
    c.disconnect()
    standalone.restart()
    time.sleep(13)
    c2 = client(V5, client_id=cid, connect=False, clean=False)
    present, rc, _ = c2.connect(clean_start=False, **kw)
    assert (present, rc) == (False, 0)
