"""QoS 0, 1 and 2 end to end, with paho and with Mosquitto's own command-line
clients, and QoS 2's exactly-once promise across a reconnect in the middle of
the handshake."""

import shutil
import subprocess
import time

import pytest

from mqtt_tests.conftest import LEVELS, PUBCOMP, PUBREC, QUIET, level_num


@LEVELS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_round_trip(client, tag, level, qos):
    """A message comes back at the lower of the publish's and the
    subscription's QoS, with its payload untouched (binary included)."""
    sub = client(level)
    assert sub.subscribe(f"q/{tag}/#", qos=2) == [2]
    pub = client(level)
    payload = bytes(range(256)) * 4
    pub.publish(f"q/{tag}/x", payload, qos=qos)
    m = sub.expect_one()
    assert (m.topic, m.payload, m.qos, m.retain, m.dup) == (f"q/{tag}/x", payload, qos, False, False)
    sub.expect_none(0.3)


@LEVELS
def test_qos_is_downgraded_to_the_subscription(client, tag, level):
    sub = client(level)
    assert sub.subscribe(f"q/{tag}", qos=1) == [1]
    pub = client(level)
    pub.publish(f"q/{tag}", b"two", qos=2)
    assert sub.expect_one().qos == 1


@LEVELS
def test_many_qos1_messages_arrive_in_order(client, tag, level):
    sub = client(level)
    sub.subscribe(f"q/{tag}", qos=1)
    pub = client(level)
    infos = [pub.c.publish(f"q/{tag}", f"m{i}".encode(), qos=1) for i in range(200)]
    for i in infos:
        i.wait_for_publish(10)
    got = sub.expect(200)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(200)]


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_clients_round_trip(standalone, tag, version, qos):
    """mosquitto_sub waits for one message; mosquitto_pub sends until it has
    (the first publishes may come before the SUBACK)."""
    port = str(standalone.mqtt_port)
    topic = f"mosq/{tag}/t"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-V", version, "-q", str(qos),
         "-t", f"mosq/{tag}/#", "-C", "1", "-v", "-W", "20", "-i", f"sub-{tag}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 15
        while sub.poll() is None and time.time() < deadline:
            subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", version, "-q", str(qos),
                 "-t", topic, "-m", "hello mosquitto", "-i", f"pub-{tag}"],
                check=True, timeout=10, capture_output=True)
            time.sleep(0.2)
        out, err = sub.communicate(timeout=10)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    assert out.strip() == f"{topic} hello mosquitto"


@LEVELS
def test_qos2_exactly_once_across_a_reconnect(client, raw, standalone, tag, level):
    """The publisher loses its connection after PUBREC and before PUBREL.
    As MQTT requires, it reconnects to its session, resends the PUBLISH
    with DUP and the same packet id, then releases it: the broker must not
    route the resend a second time."""
    sub = client(level)
    sub.subscribe(f"eo/{tag}", qos=2)
    n = level_num(level)
    props = {"SessionExpiryInterval": 300} if n == 5 else None
    cid = f"eo-{tag}"

    r = raw(n)
    assert r.connect(cid, clean=False, props=props) == (False, 0)
    r.publish(f"eo/{tag}", b"once", qos=2, pid=7)
    rec = r.expect(PUBREC)
    assert rec.packet_id == 7 and rec.reason(r.v5) < 0x80
    r.close()  # no PUBREL

    r2 = raw(n)
    # (session_present is test_sessions' business.)
    _, rc = r2.connect(cid, clean=False, props=props)
    assert rc == 0
    r2.publish(f"eo/{tag}", b"once", qos=2, pid=7, dup=True)
    rec = r2.expect(PUBREC)
    assert rec.packet_id == 7 and rec.reason(r2.v5) < 0x80
    r2.ack(6, 7)  # PUBREL
    comp = r2.expect(PUBCOMP)
    assert comp.packet_id == 7 and comp.reason(r2.v5) == 0, comp

    got = sub.expect(1) + sub.collect(QUIET)
    assert [m.payload for m in got] == [b"once"]
    r2.disconnect()


def test_qos2_pubrel_for_an_unknown_id_is_completed(raw):
    """A PUBREL the server never saw a PUBLISH for still gets PUBCOMP (with
    0x92 Packet Identifier not found in v5), so a client that lost track
    can finish the flow."""
    for n in (4, 5):
        r = raw(n)
        r.connect(f"pr-{n}-{time.time_ns()}")
        r.ack(6, 99)
        comp = r.expect(PUBCOMP)
        assert comp.packet_id == 99
        if n == 5:
            assert comp.reason(True) == 0x92
