"""Retained messages: kept per topic, sent to new matching subscriptions
with RETAIN set, replaced and cleared, kept across a restart, and MQTT 5's
Retain Handling. This module restarts its standalone process."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_tests.conftest import LEVELS, QUIET, V5, props, sub_id, sub_opts


@LEVELS
def test_retained_message_is_sent_on_subscribe(client, tag, level):
    pub = client(level)
    pub.publish(f"rt/{tag}/a/temp", b"21.5", qos=1, retain=True)
    pub.publish(f"rt/{tag}/b/temp", b"19.0", qos=1, retain=True)
    pub.publish(f"rt/{tag}/b/hum", b"40", qos=1, retain=True)
    pub.publish(f"rt/{tag}/c/temp", b"not kept", qos=1, retain=False)
    sub = client(level)
    sub.subscribe(f"rt/{tag}/+/temp", qos=1)
    got = sub.expect(2) + sub.collect(QUIET)
    assert sorted((m.topic, m.payload, m.retain) for m in got) == [
        (f"rt/{tag}/a/temp", b"21.5", True), (f"rt/{tag}/b/temp", b"19.0", True)]
    # Live messages after that carry RETAIN 0.
    pub.publish(f"rt/{tag}/a/temp", b"22.0", qos=1, retain=True)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"22.0", False)


@LEVELS
def test_retained_message_is_replaced_and_cleared(client, tag, level):
    pub = client(level)
    t = f"rc/{tag}"
    pub.publish(t, b"one", qos=1, retain=True)
    pub.publish(t, b"two", qos=1, retain=True)
    s1 = client(level)
    s1.subscribe(t, qos=1)
    assert [m.payload for m in s1.expect(1) + s1.collect(0.5)] == [b"two"]
    # An empty retained payload clears it; it is forwarded as usual.
    pub.publish(t, b"", qos=1, retain=True)
    assert s1.expect_one().payload == b""
    s2 = client(level)
    s2.subscribe(t, qos=1)
    s2.expect_none()


@LEVELS
def test_retained_qos_is_the_lower_of_message_and_subscription(client, tag, level):
    pub = client(level)
    pub.publish(f"rq/{tag}/two", b"q2", qos=2, retain=True)
    pub.publish(f"rq/{tag}/zero", b"q0", qos=0, retain=True)
    sub = client(level)
    sub.subscribe(f"rq/{tag}/#", qos=1)
    got = {m.payload: m.qos for m in sub.expect(2)}
    assert got == {b"q2": 1, b"q0": 0}


def test_v5_retained_message_keeps_its_properties(client, tag):
    pub = client(V5)
    pub.publish(f"rp/{tag}", b"{}", qos=1, retain=True, properties=props(
        PacketTypes.PUBLISH, ContentType="application/json", UserProperty=[("k", "v")]))
    sub = client(V5)
    sub.subscribe(f"rp/{tag}", qos=1, properties=sub_id(9))
    m = sub.expect_one()
    assert m.retain
    assert m.prop("ContentType") == "application/json"
    assert m.prop("UserProperty") == [("k", "v")]
    assert m.prop("SubscriptionIdentifier") == [9]


def test_v5_retained_message_expires(client, tag):
    pub = client(V5)
    pub.publish(f"rx/{tag}", b"short", qos=1, retain=True,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    time.sleep(2.2)
    sub = client(V5)
    sub.subscribe(f"rx/{tag}", qos=1)
    sub.expect_none()


def test_retained_shared_subscription_gets_none(client, tag):
    """MQTT 5, 4.8.2: retained messages are not sent for a shared
    subscription."""
    pub = client(V5)
    pub.publish(f"rs/{tag}", b"kept", qos=1, retain=True)
    sub = client(V5)
    sub.subscribe(f"$share/g{tag}/rs/{tag}", qos=1)
    sub.expect_none()


@pytest.mark.parametrize("rh, first, second", [(0, True, True), (1, True, False), (2, False, False)],
                         ids=["rh0_send", "rh1_if_new", "rh2_never"])
def test_v5_retain_handling(client, tag, rh, first, second):
    """Retain Handling 0: sent on every SUBSCRIBE; 1: only when the
    subscription is new; 2: never."""
    pub = client(V5)
    pub.publish(f"rh/{tag}", b"kept", qos=1, retain=True)
    sub = client(V5)
    def after_subscribe(expected):
        sub.subscribe(f"rh/{tag}", options=sub_opts(qos=1, rh=rh))
        return (sub.expect(1) if expected else []) + sub.collect(QUIET)
    got1 = after_subscribe(first)
    got2 = after_subscribe(second)
    assert ([m.payload for m in got1], [m.payload for m in got2]) == (
        [b"kept"] if first else [], [b"kept"] if second else [])
    assert all(m.retain for m in got1 + got2)


@LEVELS
def test_retained_messages_survive_a_restart(standalone, client, tag, level):
    pub = client(level)
    pub.publish(f"rr/{tag}/x", b"before restart", qos=1, retain=True)
    pub.publish(f"rr/{tag}/y", b"cleared", qos=1, retain=True)
    pub.publish(f"rr/{tag}/y", b"", qos=1, retain=True)
    pub.disconnect()
    standalone.restart()
    sub = client(level)
    sub.subscribe(f"rr/{tag}/#", qos=1)
    got = sub.expect(1, timeout=10) + sub.collect(QUIET)
    assert [(m.topic, m.payload, m.retain) for m in got] == [(f"rr/{tag}/x", b"before restart", True)]


@LEVELS
def test_will_with_retain_is_retained(client, tag, level):
    live = client(level)
    live.subscribe(f"rw/{tag}/#", qos=1)
    dev = client(level, will=(f"rw/{tag}/status", b"offline", 1, True, None))
    dev.drop()
    assert live.expect_one().payload == b"offline"
    later = client(level)
    later.subscribe(f"rw/{tag}/#", qos=1)
    got = later.expect(1) + later.collect(0.5)
    assert [(m.topic, m.payload, m.retain) for m in got] == [(f"rw/{tag}/status", b"offline", True)]
