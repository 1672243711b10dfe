"""MQTT retained messages follow their namespace to every region: set in
east, a new subscriber in west gets it; cleared in west, gone in east;
set in both at once, both regions settle on the same one."""

import queue
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from geo_tests.regions import regions, replicate_default


def retained_of(region, topic, wait=1.0):
    """The retained payload a new subscriber to `topic` gets, or None."""
    got = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time()}",
                    protocol=mqtt.MQTTv311)
    c.on_message = lambda _c, _u, m: got.put((m.retain, m.payload))
    c.connect("127.0.0.1", region.mqtt_port)
    c.loop_start()
    try:
        c.subscribe(topic, qos=1)
        try:
            retain, payload = got.get(timeout=wait)
            return payload if retain else None
        except queue.Empty:
            return None
    finally:
        c.disconnect()
        c.loop_stop()


def publish(region, topic, payload):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time()}",
                    protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", region.mqtt_port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def eventually(region, topic, want, timeout):
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        got = retained_of(region, topic)
        if got == want:
            return time.time()
        time.sleep(0.2)
    raise AssertionError(f"{region.name}: retained {got!r}, expected {want!r}")


def test_retained_messages_replicate_and_clear_across_regions():
    with regions(["east", "west"], kafka_ns="public/default") as r:
        east, west = r["east"], r["west"]
        replicate_default([east, west])
        time.sleep(2)
        start = time.time()
        publish(east, "s/1", b"from-east")
        assert eventually(west, "s/1", b"from-east", 5) - start <= 5
        # Cleared in west, gone in east.
        publish(west, "s/1", b"")
        eventually(east, "s/1", None, 10)
        # Set in both at once: both settle on one of them.
        publish(east, "s/2", b"east-wins?")
        publish(west, "s/2", b"west-wins?")
        time.sleep(3)
        a, b = retained_of(east, "s/2"), retained_of(west, "s/2")
        assert a == b and a in (b"east-wins?", b"west-wins?"), (a, b)
