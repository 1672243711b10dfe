"""Deleting a replicated topic: refused (409) without force; with force
the topic goes here only, and a tombstone keeps the other region's
replication from making it again (`remoteTopicDeleted`) until it is
created here explicitly, after which the other region's records flow
again."""

from confluent_kafka import Producer

from geo_tests.regions import NS, ok, regions, wait_for
from geo_tests.test_per_message import read_topic
from interop_tests.test_routes import call


def produce(region, topic, values):
    p = Producer({"bootstrap.servers": region.kafka, "enable.idempotence": True})
    for v in values:
        p.produce(topic, value=v.encode())
    assert p.flush(30) == 0


def west_state(west, topic):
    status, body = call(west, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")
    if status != 200:
        return None
    import json
    return json.loads(body).get("replication", {}).get("east", {})


def test_a_replicated_topic_is_deleted_only_with_force_and_stays_deleted():
    with regions(["east", "west"]) as r:
        east, west = r["east"], r["west"]
        topic = "doomed"
        ok(call(east, "PUT", f"/admin/v2/persistent/{NS}/{topic}"))
        produce(east, topic, [f"e{i}" for i in range(10)])
        assert read_topic(west, topic, "e9") == [f"e{i}" for i in range(10)]
        # West's own replicator back to east is running too.
        wait_for("west's replicator", lambda: (west_state(west, topic) or {}).get("connected"))

        status, body = call(east, "DELETE", f"/admin/v2/persistent/{NS}/{topic}")
        assert status == 409, (status, body)
        assert "force" in body
        assert call(east, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")[0] == 200

        ok(call(east, "DELETE", f"/admin/v2/persistent/{NS}/{topic}?force=true"))
        assert call(east, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")[0] == 404
        # Not cascaded: west keeps its copy, and what it writes now does
        # not make the topic again in east.
        produce(west, topic, [f"w{i}" for i in range(5)])
        s = wait_for("remoteTopicDeleted", lambda: (
            s if (s := west_state(west, topic) or {}).get("state") == "remoteTopicDeleted" else None))
        assert "create it here" in s.get("lastError", ""), s
        assert s["replicationBacklog"] >= 5, s
        assert call(east, "GET", f"/admin/v2/persistent/{NS}/{topic}/stats")[0] == 404
        assert read_topic(west, topic, "w4") == [f"e{i}" for i in range(10)] + [
            f"w{i}" for i in range(5)]

        # Created again here on purpose: west's backlog drains into it.
        ok(call(east, "PUT", f"/admin/v2/persistent/{NS}/{topic}"))
        assert read_topic(east, topic, "w4") == [f"w{i}" for i in range(5)]
        wait_for("running again", lambda: (west_state(west, topic) or {}).get("state") == "running")
