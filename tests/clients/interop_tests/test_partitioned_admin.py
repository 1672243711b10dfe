"""Topic operations on a partitioned topic's base name act on every
partition, as Pulsar users run them: `magnetar admin topics stats`,
`unload`, `offload-status`, and the subscriptions (and the REST paths
under them)."""

import json
import uuid

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from interop_tests.test_routes import call, cli


def test_admin_operations_on_a_base_name_act_on_every_partition(standalone):
    topic = f"parts-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=standalone.kafka, request_timeout_ms=30000)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=standalone.kafka)
    for i in range(30):
        p.send(topic, b"m%d" % i, partition=i % 3)
    p.flush()
    p.close()
    full = f"persistent://public/default/{topic}"
    parts = {f"{full}-partition-{i}" for i in range(3)}

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
