"""Topic operations on a partitioned topic's base name act on every
partition, as Pulsar users run them: `magnetar admin topics stats`,
`internal-stats`, `unload`, `offload-status`, and the subscriptions:
listed, created, cleared, reset and deleted (and the REST paths under
them). Skipping a count of messages is refused on a base name, as in
Pulsar."""

import json
import uuid

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from interop_tests.test_routes import call, cli


def partitioned_topic(standalone, messages=30):
    """A 3-partition topic with `messages` spread evenly; its name and the
    full names of its partitions."""
    topic = f"parts-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=standalone.kafka, request_timeout_ms=30000)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=standalone.kafka)
    for i in range(messages):
        p.send(topic, b"m%d" % i, partition=i % 3)
    p.flush()
    p.close()
    full = f"persistent://public/default/{topic}"
    return topic, {f"{full}-partition-{i}" for i in range(3)}


def test_admin_operations_on_a_base_name_act_on_every_partition(standalone):
    topic, parts = partitioned_topic(standalone)

    out = cli(standalone, "stats", topic)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert set(stats["partitions"]) == parts
    assert stats["msgInCounter"] == 30
    # A partition alone still answers for itself.
    out = cli(standalone, "stats", f"{topic}-partition-1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["msgInCounter"] == 10

    out = cli(standalone, "unload", topic)
    assert out.returncode == 0, out.stderr
    # Unloaded partitions load again on use, their data intact.
    status, body = call(standalone, "GET", f"/admin/v2/persistent/public/default/{topic}/stats")
    assert status == 200, body
    assert json.loads(body)["storageSize"] > 0

    out = cli(standalone, "offload-status", topic)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["partitions"]) == parts

    # Subscriptions: listed across the partitions, deleted from each.
    status, _ = call(standalone, "PUT",
                     f"/admin/v2/persistent/public/default/{topic}-partition-0/subscription/audit",
                     "earliest")
    assert status == 204
    status, body = call(standalone, "GET",
                        f"/admin/v2/persistent/public/default/{topic}/subscriptions")
    assert status == 200, body
    assert "audit" in json.loads(body), body
    status, body = call(standalone, "DELETE",
                        f"/admin/v2/persistent/public/default/{topic}/subscription/audit")
    assert status == 204, body
    status, body = call(standalone, "GET",
                        f"/admin/v2/persistent/public/default/{topic}/subscriptions")
    assert "audit" not in json.loads(body), body


def test_subscription_operations_on_a_base_name_act_on_every_partition(standalone):
    topic, parts = partitioned_topic(standalone)
    base = f"/admin/v2/persistent/public/default/{topic}"

    def cursors():
        status, body = call(standalone, "GET", f"{base}/internalStats")
        assert status == 200, body
        stats = json.loads(body)
        assert stats["metadata"]["partitions"] == 3
        assert set(stats["partitions"]) == parts
        return {p: s["cursors"].get("audit") for p, s in stats["partitions"].items()}

    # internalStats of a base name is Pulsar's partitioned-internalStats.
    out = cli(standalone, "internal-stats", topic)
    assert out.returncode == 0, out.stderr
    assert all(s["numberOfEntries"] > 0 for s in json.loads(out.stdout)["partitions"].values())
    status, body = call(standalone, "GET", f"{base}/partitioned-internalStats")
    assert status == 200, body

    out = cli(standalone, "create-subscription", topic, "audit", "--from", "earliest")
    assert out.returncode == 0, out.stderr
    assert all(c is not None and c["markDeleteOffset"] == 0 for c in cursors().values()), cursors()
    out = cli(standalone, "create-subscription", topic, "audit")
    assert out.returncode != 0 and "already exists" in out.stdout + out.stderr

    out = cli(standalone, "skip-all", topic, "audit")
    assert out.returncode == 0, out.stderr
    assert all(c["markDeleteOffset"] == 10 for c in cursors().values()), cursors()

    out = cli(standalone, "reset-cursor", topic, "audit", "4")
    assert out.returncode == 0, out.stderr
    assert all(c["markDeleteOffset"] == 4 for c in cursors().values()), cursors()

    # By publish time: every partition to its first message at or after it.
    status, body = call(standalone, "POST", f"{base}/subscription/audit/resetcursor/0")
    assert status == 204, body
    assert all(c["markDeleteOffset"] == 0 for c in cursors().values()), cursors()

    # A count of messages means nothing across partitions: refused.
    out = cli(standalone, "skip", topic, "audit", "2")
    assert out.returncode != 0 and "partition" in out.stdout + out.stderr
    out = cli(standalone, "skip", f"{topic}-partition-2", "audit", "2")
    assert out.returncode == 0, out.stderr

    status, body = call(standalone, "POST", f"{base}/subscription/nobody/skip_all")
    assert status == 404, body
