"""Topic filters: wildcards, `$` topics, invalid filters, shared
subscriptions, overlapping subscriptions and MQTT 5's subscription
options."""

import time

import pytest

from mqtt_tests.conftest import (LEVELS, PUBLISH, QUIET, SUBACK, V311, V5, level_num, sub_id,
                                  sub_opts)


def topics_seen(c, within=QUIET):
    return sorted(m.topic for m in c.collect(within))


@LEVELS
def test_single_and_multi_level_wildcards(client, tag, level):
    filters = {
        "plus": f"w/{tag}/+/c",
        "hash": f"w/{tag}/#",
        "plus_hash": f"w/{tag}/+/#",
        "exact": f"w/{tag}/b/c",
        "leading_plus": f"+/{tag}/b/c",
    }
    subs = {}
    for name, f in filters.items():
        subs[name] = client(level)
        subs[name].subscribe(f, qos=1)
    pub = client(level)
    published = [f"w/{tag}", f"w/{tag}/b/c", f"w/{tag}/b/d", f"w/{tag}/b/c/d", f"w/{tag}//c"]
    for t in published:
        pub.publish(t, b"x", qos=1)
    want = {
        "plus": sorted([f"w/{tag}/b/c", f"w/{tag}//c"]),
        # `#` matches its parent level too.
        "hash": sorted(published),
        "plus_hash": sorted([f"w/{tag}/b/c", f"w/{tag}/b/d", f"w/{tag}/b/c/d", f"w/{tag}//c"]),
        "exact": [f"w/{tag}/b/c"],
        "leading_plus": [f"w/{tag}/b/c"],
    }
    got = {name: [m.topic for m in c.expect(len(want[name]))] for name, c in subs.items()}
    time.sleep(QUIET)
    got = {name: sorted(got[name] + [m.topic for m in c.collect(0.01)]) for name, c in subs.items()}
    assert got == want


@LEVELS
def test_dots_in_topics_do_not_leak_into_other_levels(client, tag, level):
    """`/` and `.` swap places on amq.topic; a dot is an ordinary character
    of an MQTT level and must not split it."""
    sub = client(level)
    sub.subscribe(f"d/{tag}/+", qos=1)
    other = client(level)
    other.subscribe(f"d/{tag}/v1/#", qos=1)
    pub = client(level)
    pub.publish(f"d/{tag}/v1.2", b"dotted", qos=1)
    m = sub.expect_one()
    assert (m.topic, m.payload) == (f"d/{tag}/v1.2", b"dotted")
    other.expect_none()


@LEVELS
def test_dollar_topics_are_not_matched_by_leading_wildcards(client, tag, level):
    """[MQTT-4.7.2-1]: `#` and `+/...` do not match topics starting with
    `$`; a filter starting with the `$` level does."""
    dollar = f"${tag}/x"
    hash_ = client(level)
    hash_.subscribe("#", qos=1)
    plus = client(level)
    plus.subscribe("+/x", qos=1)
    explicit = client(level)
    explicit.subscribe(f"${tag}/#", qos=1)
    pub = client(level)
    pub.publish(dollar, b"system", qos=1)
    assert explicit.expect_one().topic == dollar
    assert dollar not in topics_seen(hash_)
    assert dollar not in topics_seen(plus, 0.1)


@LEVELS
@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", "##", "$share/g", "$share//a"])
def test_invalid_filter_gets_a_failure_code(raw, tag, level, bad):
    """A bad filter fails in SUBACK (0x8F Topic Filter invalid in v5, 0x80
    in 3.1.1) alongside the good ones of the same SUBSCRIBE; the connection
    stays open. (paho refuses to send such filters, hence a raw client.)"""
    r = raw(level_num(level))
    r.connect(f"bad-{tag}")
    r.subscribe(3, [(f"ok/{tag}", 1), (bad, 1)])
    ack = r.expect(SUBACK, timeout=5)
    assert ack.packet_id == 3
    codes = list(ack.body[2:]) if not r.v5 else list(ack.body[2 + 1 + ack.body[2]:])
    assert codes == [1, 0x8F if r.v5 else 0x80]
    # Still connected, and the good filter works.
    r.publish(f"ok/{tag}", b"still works", qos=0)
    p = r.expect(PUBLISH, timeout=5)
    assert p.body.endswith(b"still works")


@LEVELS
def test_unsubscribe_stops_delivery(client, tag, level):
    c = client(level)
    c.subscribe(f"u/{tag}/+", qos=1)
    c.subscribe(f"u/{tag}/#", qos=1)
    pub = client(level)
    assert c.unsubscribe(f"u/{tag}/+") in ([0], [])
    pub.publish(f"u/{tag}/a", b"1", qos=1)
    # `u/{tag}/#` still matches.
    assert [m.payload for m in c.expect(1) + c.collect(0.5)] == [b"1"]
    assert c.unsubscribe(f"u/{tag}/#") in ([0], [])
    pub.publish(f"u/{tag}/a", b"2", qos=1)
    c.expect_none()
    if level == V5:
        assert c.unsubscribe(f"u/{tag}/never") == [0x11]  # No subscription existed


@LEVELS
@pytest.mark.parametrize("members", [2, 3])
def test_shared_subscription_spreads_without_duplicates(client, tag, level, members):
    group = f"g{tag}"
    subs = [client(level) for _ in range(members)]
    for s in subs:
        assert s.subscribe(f"$share/{group}/sh/{tag}/#", qos=1) == [1]
    pub = client(level)
    n = 60
    infos = [pub.c.publish(f"sh/{tag}/{i % 5}", f"{i}".encode(), qos=1) for i in range(n)]
    for i in infos:
        i.wait_for_publish(10)
    got = {i: [] for i in range(members)}
    deadline = time.time() + 15
    while sum(map(len, got.values())) < n and time.time() < deadline:
        for i, s in enumerate(subs):
            got[i] += [int(m.payload) for m in s.collect(0.05)]
    for i, s in enumerate(subs):
        got[i] += [int(m.payload) for m in s.collect(0.5)]
    every = sorted(x for v in got.values() for x in v)
    assert every == list(range(n)), f"union/duplicates wrong: counts {[len(v) for v in got.values()]}"
    assert all(got.values()), f"a member got nothing: counts {[len(v) for v in got.values()]}"


@LEVELS
def test_shared_and_plain_subscriptions_both_get_a_copy(client, tag, level):
    a, b = client(level), client(level)
    a.subscribe(f"$share/g{tag}/sp/{tag}", qos=1)
    b.subscribe(f"$share/g{tag}/sp/{tag}", qos=1)
    plain = client(level)
    plain.subscribe(f"sp/{tag}", qos=1)
    pub = client(level)
    pub.publish(f"sp/{tag}", b"one", qos=1)
    assert plain.expect_one().payload == b"one"
    shared = a.collect(1.0) + b.collect(0.1)
    assert [m.payload for m in shared] == [b"one"]


def test_shared_member_leaving_hands_over_to_the_rest(client, tag):
    """Messages for a group whose member went keep flowing to the others."""
    a, b = client(V5), client(V5)
    for c in (a, b):
        c.subscribe(f"$share/h{tag}/ho/{tag}", qos=1)
    a.disconnect()
    pub = client(V5)
    for i in range(10):
        pub.publish(f"ho/{tag}", f"{i}".encode(), qos=1)
    assert sorted(int(m.payload) for m in b.expect(10)) == list(range(10))


def test_v5_overlapping_subscriptions_deliver_once_with_both_ids(client, tag):
    """MQTT 5, 3.3.4: one client with two matching (non-shared)
    subscriptions gets the message once, carrying every matching
    Subscription Identifier, at the highest QoS."""
    c = client(V5)
    assert c.subscribe(f"ov/{tag}/+/x", qos=0, properties=sub_id(1)) == [0]
    assert c.subscribe(f"ov/{tag}/#", qos=1, properties=sub_id(2)) == [1]
    c.subscribe(f"ov/{tag}/other", qos=1, properties=sub_id(3))
    pub = client(V5)
    pub.publish(f"ov/{tag}/a/x", b"both", qos=1)
    got = c.expect(1) + c.collect(QUIET)
    assert len(got) == 1, got
    assert sorted(got[0].prop("SubscriptionIdentifier", [])) == [1, 2]
    assert got[0].qos == 1


def test_v311_overlapping_subscriptions_use_the_highest_qos(client, tag):
    """3.1.1 allows one copy per subscription or one in all, but each at
    most the QoS of the matching subscription and one at the highest."""
    c = client(V311)
    c.subscribe(f"ov/{tag}/+/x", qos=0)
    c.subscribe(f"ov/{tag}/#", qos=1)
    pub = client(V311)
    pub.publish(f"ov/{tag}/a/x", b"both", qos=1)
    got = c.expect(1) + c.collect(QUIET)
    assert 1 <= len(got) <= 2
    assert max(m.qos for m in got) == 1


def test_v5_subscription_identifier_updated_by_resubscribe(client, tag):
    c = client(V5)
    c.subscribe(f"si/{tag}", qos=1, properties=sub_id(5))
    c.subscribe(f"si/{tag}", qos=1, properties=sub_id(6))
    pub = client(V5)
    pub.publish(f"si/{tag}", b"x", qos=1)
    m = c.expect_one()
    assert m.prop("SubscriptionIdentifier") == [6]
    c.expect_none(0.3)


def test_v5_no_local(client, tag):
    """No Local: a client's own publishes are not sent back to it; others'
    are, and a client without the option gets its own."""
    nl = client(V5)
    nl.subscribe(f"nl/{tag}", options=sub_opts(qos=1, no_local=True))
    plain = client(V5)
    plain.subscribe(f"nl/{tag}", options=sub_opts(qos=1))
    nl.publish(f"nl/{tag}", b"from nl", qos=1)
    plain.publish(f"nl/{tag}", b"from plain", qos=1)
    assert sorted(m.payload for m in plain.expect(2)) == [b"from nl", b"from plain"]
    got = nl.expect(1) + nl.collect(0.5)
    assert [m.payload for m in got] == [b"from plain"]


def test_v5_no_local_on_a_shared_subscription_is_a_protocol_error(raw, tag):
    """MQTT 5, 3.8.3.1: No Local on a shared subscription is a Protocol
    Error: DISCONNECT 0x82, then a close."""
    r = raw(5)
    r.connect(f"nls-{tag}")
    r.subscribe(1, [(f"$share/n{tag}/x", 0x01 | 0x04)])
    got = r.until_closed(timeout=5)
    assert [(p.name, p.reason(True)) for p in got] == [("DISCONNECT", 0x82)]


def test_v5_retain_as_published(client, tag):
    """A live message published with RETAIN reaches existing subscribers
    with RETAIN 0, unless they asked for Retain As Published."""
    rap = client(V5)
    rap.subscribe(f"rap/{tag}", options=sub_opts(qos=1, rap=True))
    plain = client(V5)
    plain.subscribe(f"rap/{tag}", options=sub_opts(qos=1))
    pub = client(V5)
    pub.publish(f"rap/{tag}", b"r", qos=1, retain=True)
    pub.publish(f"rap/{tag}", b"n", qos=1, retain=False)
    assert [(m.payload, m.retain) for m in rap.expect(2)] == [(b"r", True), (b"n", False)]
    assert [(m.payload, m.retain) for m in plain.expect(2)] == [(b"r", False), (b"n", False)]
    pub.publish(f"rap/{tag}", b"", qos=1, retain=True)  # clear it


def test_v311_live_retained_publish_reaches_subscribers_without_retain(client, tag):
    """[MQTT-3.3.1-9]: to an existing subscription, RETAIN is 0."""
    sub = client(V311)
    sub.subscribe(f"lr/{tag}", qos=1)
    pub = client(V311)
    pub.publish(f"lr/{tag}", b"r", qos=1, retain=True)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"r", False)
    pub.publish(f"lr/{tag}", b"", qos=1, retain=True)


# This holds with the cores busy too (the suites beside this one, or busy
# loops): a reader the OS preempted mid-read does not get A's PUBLISH in
# ahead of B's SUBSCRIBE, which the kernel made readable first.
@pytest.mark.parametrize("qos", [0, 1])
def test_a_publish_right_behind_another_clients_subscribe_reaches_it(standalone, tag, qos):
    """B writes SUBSCRIBE, and A publishes the moment that write returned,
    before any SUBACK: the broker reads the SUBSCRIBE first, so B gets the
    message (as from Mosquitto), 1,000 rounds in a row. paho without its
    loop thread writes each packet in the call that makes it; with
    TCP_NODELAY the kernel sends it at once too, rather than holding a
    small packet until the broker acknowledged the previous one."""
    import socket

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = []

    def make(name):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{tag}", protocol=V5)
        c.connect("127.0.0.1", standalone.mqtt_port)
        deadline = time.monotonic() + 10
        while not c.is_connected():
            assert time.monotonic() < deadline, f"{name} got no CONNACK"
            c.loop(timeout=0.05)
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    a, b = make("a"), make("b")
    b.on_message = lambda c, u, m: got.append(m.topic)
    missed = []
    try:
        for i in range(1000):
            topic = f"{tag}/{i}"
            b.subscribe(topic, qos=qos)
            a.publish(topic, b"x", qos=1)
            # Generous: a busy machine may be slow, only a loss fails.
            deadline = time.monotonic() + 10
            while topic not in got and time.monotonic() < deadline:
                b.loop(timeout=0.01)
                a.loop(timeout=0)
            if topic not in got:
                missed.append(i)
                if len(missed) >= 3:
                    break
            b.unsubscribe(topic)
    finally:
        a.disconnect()
        b.disconnect()
    assert not missed, f"publishes of rounds {missed} missed the subscriber"
