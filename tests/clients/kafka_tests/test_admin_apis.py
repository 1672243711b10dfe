"""The admin APIs of a Kafka 4.0 broker, judged by kafka-python's
KafkaAdminClient, confluent-kafka's AdminClient and kcat: ACLs over
namespace permissions, DescribeTopicPartitions with paging, log dirs,
elections, reassignments, the metadata quorum, broker configs, partition
assignments, ListOffsets by time, list configs, producers and
transactions."""

import subprocess
import uuid

import pytest
from confluent_kafka import KafkaException, Producer, TopicPartition as CTP
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource as CConfigResource,
    NewTopic as CNewTopic,
    ResourcePatternType,
    ResourceType as CResourceType,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ConfigResource,
    KafkaAdminClient,
    NewPartitions,
    NewTopic,
    OffsetSpec,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)
from kafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidReplicationAssignmentError,
    NoReassignmentInProgressError,
    SecurityDisabledError,
)
from kafka.structs import OffsetAndMetadata


def uid():
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def admin(standalone):
    a = KafkaAdminClient(bootstrap_servers=standalone.kafka, request_timeout_ms=30000)
    yield a
    a.close()


@pytest.fixture(scope="module")
def node(admin):
    return admin.describe_cluster()["controller_id"]


def test_clients_see_a_kafka_4_0_broker(standalone):
    c = KafkaConsumer(bootstrap_servers=standalone.kafka)
    try:
        assert c.config["api_version"] == (4, 0)
    finally:
        c.close()
    host, port = standalone.kafka.split(":")
    out = subprocess.run(["kcat", "-b", standalone.kafka, "-L", "-t", "kcat-probe",
                          "-X", "api.version.request=true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"at {host}:{port}" in out.stdout, out.stdout


def test_describe_topic_partitions_pages_with_a_cursor(admin, node):
    a, b = f"dtp-a-{uid()}", f"dtp-b-{uid()}"
    admin.create_topics([NewTopic(a, 3, 1), NewTopic(b, 2, 1)])
    seen, cursor, pages = [], None, 0
    while True:
        r = admin.describe_topic_partitions([b, a], response_partition_limit=2, cursor=cursor)
        pages += 1
        for t in r["topics"]:
            assert t["error_code"] == 0, t
            for p in t["partitions"]:
                assert p["leader_id"] == node and p["replica_nodes"] == [node], p
                seen.append((t["name"], p["partition_index"]))
        cursor = r["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1)]
    (missing,) = admin.describe_topic_partitions([f"dtp-missing-{uid()}"])["topics"]
    assert missing["error_code"] == 3


def test_log_dirs_report_each_partition_this_broker_leads(standalone, admin, node):
    t = f"logdirs-{uid()}"
    admin.create_topics([NewTopic(t, 2, 1)])
    p = KafkaProducer(bootstrap_servers=standalone.kafka)
    for i in range(20):
        p.send(t, b"x" * 1000, partition=i % 2)
    p.flush()
    p.close()
    (broker,) = admin.describe_log_dirs({t: [0, 1]})
    assert broker["broker"] == node
    (d,) = broker["log_dirs"]
    assert d["log_dir"] == "bookies" and d["error_code"] == 0
    (topic,) = [x for x in d["topics"] if x["name"] == t]
    sizes = {p["partition_index"]: p["partition_size"] for p in topic["partitions"]}
    assert set(sizes) == {0, 1} and all(s >= 10_000 for s in sizes.values()), sizes
    # One directory, the bookies: moving a replica elsewhere is refused.
    from kafka.structs import TopicPartitionReplica
    r = admin.alter_replica_log_dirs({TopicPartitionReplica(t, 0, node): "/elsewhere",
                                      TopicPartitionReplica(t, 1, node): "bookies"})
    errors = {tpr.partition: err.__name__ for tpr, err in r.items()}
    assert errors == {0: "LogDirNotFoundError", 1: "NoError"}


def test_elections_and_reassignments_have_nothing_to_do(admin, node):
    t = f"elect-{uid()}"
    admin.create_topics([NewTopic(t, 2, 1)])
    # ElectionNotNeeded for each partition, which the client takes as done.
    r = admin.elect_leaders(0, {t: [0, 1]})
    codes = [p.error_code for res in r.replica_election_results for p in res.partition_result]
    assert codes == [84, 84]
    assert admin.list_partition_reassignments() == {}
    r = admin.alter_partition_reassignments({TopicPartition(t, 0): [node],
                                             TopicPartition(t, 1): None})
    assert r[TopicPartition(t, 0)] is None
    assert r[TopicPartition(t, 1)] is NoReassignmentInProgressError
    r = admin.alter_partition_reassignments({TopicPartition(t, 0): [node + 1]})
    assert r[TopicPartition(t, 0)] is not None
    assert admin.list_partition_reassignments() == {}


def test_the_metadata_quorum_is_described(admin):
    q = admin.describe_metadata_quorum()
    (topic,) = q["topics"]
    assert topic["topic_name"] == "__cluster_metadata"
    (p,) = topic["partitions"]
    assert p["error"] is None and p["leader_id"] >= 0 and p["leader_epoch"] >= 1, p
    assert p["high_watermark"] > 0
    assert [v["replica_id"] for v in p["current_voters"]] == [p["leader_id"]]
    assert p["current_voters"][0]["log_end_offset"] >= p["high_watermark"]
    assert [n["node_id"] for n in q["nodes"]] == [p["leader_id"]]


def test_broker_configs_name_the_advertised_listeners(standalone, admin, node):
    r = admin.describe_configs([ConfigResource("BROKER", str(node))], config_filter="all")
    cfg = r["broker"][str(node)]
    assert cfg["advertised.listeners"]["value"] == f"PLAINTEXT://{standalone.kafka}"
    assert cfg["node.id"]["value"] == str(node)
    assert cfg["transaction.max.timeout.ms"]["value"] == "900000"
    assert all(v["read_only"] for v in cfg.values())
    # And a topic shows Kafka's full set, those that have no effect here
    # read-only.
    t = f"cfgs-{uid()}"
    admin.create_topics([NewTopic(t, 1, 1)])
    topic = admin.describe_configs([ConfigResource("TOPIC", t)], config_filter="all")["topic"][t]
    for name in ("cleanup.policy", "retention.ms", "min.insync.replicas", "segment.bytes",
                 "unclean.leader.election.enable", "message.timestamp.after.max.ms",
                 "min.cleanable.dirty.ratio", "delete.retention.ms"):
        assert name in topic, name
    assert topic["unclean.leader.election.enable"]["read_only"]
    assert not topic["retention.ms"]["read_only"]


def test_partitions_are_created_with_replica_assignments(admin, node):
    t = f"assign-{uid()}"
    admin.create_topics([NewTopic(t, -1, -1, replica_assignments={0: [node], 1: [node]})])
    (d,) = admin.describe_topics([t])
    assert len(d["partitions"]) == 2
    admin.create_partitions({t: NewPartitions(4, [[node], [node]])})
    (d,) = admin.describe_topics([t])
    assert len(d["partitions"]) == 4
    # Kafka's checks: one list per new partition, and known brokers.
    with pytest.raises(InvalidReplicationAssignmentError):
        admin.create_partitions({t: NewPartitions(6, [[node]])})
    with pytest.raises(Exception):
        admin.create_partitions({t: NewPartitions(5, [[node + 1]])})
    (d,) = admin.describe_topics([t])
    assert len(d["partitions"]) == 4


def test_offsets_for_times_return_the_records_timestamp(standalone, admin):
    t = f"times-{uid()}"
    admin.create_topics([NewTopic(t, 1, 1)])
    p = KafkaProducer(bootstrap_servers=standalone.kafka, linger_ms=50)
    for i, ts in enumerate([1000, 2000, 3000, 2500]):
        p.send(t, b"%d" % i, timestamp_ms=ts)
    p.flush()
    p.close()
    tp = TopicPartition(t, 0)
    at = lambda spec: tuple(admin.list_partition_offsets({tp: spec})[tp][:2])  # noqa: E731
    assert at(1500) == (1, 2000)
    assert at(2200) == (2, 3000)
    assert at(3001) == (-1, -1)
    assert at(OffsetSpec.EARLIEST)[0] == 0
    assert at(OffsetSpec.LATEST)[0] == 4
    assert at(OffsetSpec.MAX_TIMESTAMP) == (2, 3000)
    assert at(OffsetSpec.EARLIEST_LOCAL)[0] == 0
    assert at(OffsetSpec.LATEST_TIERED)[0] == -1
    c = KafkaConsumer(bootstrap_servers=standalone.kafka)
    try:
        found = c.offsets_for_times({tp: 1500})[tp]
        assert (found.offset, found.timestamp) == (1, 2000)
    finally:
        c.close()


def test_list_configs_take_append_and_subtract(standalone):
    ca = AdminClient({"bootstrap.servers": standalone.kafka})
    t = f"lists-{uid()}"
    ca.create_topics([CNewTopic(t, 1)])[t].result(30)

    def change(op, name, value):
        res = CConfigResource(CResourceType.TOPIC, t, incremental_configs=[
            ConfigEntry(name, value, incremental_operation=op)])
        return ca.incremental_alter_configs([res])[res].result(30)

    def policy():
        res = CConfigResource(CResourceType.TOPIC, t)
        return ca.describe_configs([res])[res].result(30)["cleanup.policy"].value

    change(AlterConfigOpType.APPEND, "cleanup.policy", "compact")
    assert policy() == "delete,compact"
    change(AlterConfigOpType.APPEND, "cleanup.policy", "compact")
    assert policy() == "delete,compact"
    change(AlterConfigOpType.SUBTRACT, "cleanup.policy", "delete")
    assert policy() == "compact"
    with pytest.raises(KafkaException, match="INVALID_CONFIG"):
        change(AlterConfigOpType.APPEND, "retention.ms", "5")


def test_offset_commit_for_a_missing_partition_is_refused_per_partition(standalone, admin):
    t = f"commit-{uid()}"
    admin.create_topics([NewTopic(t, 1, 1)])
    group = f"g-{uid()}"
    r = admin.alter_group_offsets(group, {
        TopicPartition(t, 0): OffsetAndMetadata(5, "", -1),
        TopicPartition(t, 7): OffsetAndMetadata(5, "", -1),
        TopicPartition(f"nope-{uid()}", 0): OffsetAndMetadata(5, "", -1),
    })
    errors = {tp.partition if tp.topic == t else "nope": e for tp, e in r.items()}
    assert errors[0].__name__ == "NoError", errors
    assert errors[7].__name__ == "UnknownTopicOrPartitionError", errors
    assert errors["nope"].__name__ == "UnknownTopicOrPartitionError", errors
    offsets = admin.list_group_offsets(group)[group]
    assert {tp: o.offset for tp, o in offsets.items()} == {TopicPartition(t, 0): 5}


def test_transactions_and_producers_are_described(standalone, admin):
    t = f"txn-{uid()}"
    admin.create_topics([NewTopic(t, 1, 1)])
    too_long = Producer({"bootstrap.servers": standalone.kafka, "transactional.id": f"long-{uid()}",
                         "transaction.timeout.ms": 1_000_000})
    with pytest.raises(KafkaException, match="INVALID_TRANSACTION_TIMEOUT"):
        too_long.init_transactions(30)
    txn_id = f"tx-{uid()}"
    p = Producer({"bootstrap.servers": standalone.kafka, "transactional.id": txn_id})
    p.init_transactions(30)
    p.begin_transaction()
    for i in range(3):
        p.produce(t, b"%d" % i)
    p.flush(30)
    listed = admin.list_transactions()
    ours = [x for states in listed.values() for x in states if x.transactional_id == txn_id]
    assert len(ours) == 1 and ours[0].state.value == "Ongoing", listed
    assert admin.list_transactions(transactional_id_pattern="tx-.*") != {}
    desc = admin.describe_transactions([txn_id])[txn_id]
    assert desc.state.value == "Ongoing" and desc.transaction_start_time_ms > 0, desc
    assert desc.topic_partitions == {TopicPartition(t, 0)}, desc
    producers = admin.describe_producers([TopicPartition(t, 0)])[TopicPartition(t, 0)]
    (state,) = producers.active_producers
    assert state.current_transaction_start_offset == 0 and state.last_sequence == 2
    p.commit_transaction(30)
    listed = admin.list_transactions(state_filters=["CompleteCommit", "Empty"])
    ours = [x for states in listed.values() for x in states if x.transactional_id == txn_id]
    assert len(ours) == 1, listed
    assert admin.describe_transactions([txn_id])[txn_id].state.value in ("CompleteCommit", "Empty")
    producers = admin.describe_producers([TopicPartition(t, 0)])[TopicPartition(t, 0)]
    assert [s.current_transaction_start_offset for s in producers.active_producers] == [-1]


def test_acls_are_security_disabled_without_authentication(admin):
    f = ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                  permission_type=ACLPermissionType.ANY,
                  resource_pattern=ResourcePatternFilter(ResourceType.ANY, None,
                                                         ACLResourcePatternType.ANY))
    with pytest.raises(SecurityDisabledError):
        admin.describe_acls(f)


# ---- with authentication on: ACLs are namespace permissions ----

NS = "aclten/ns"


@pytest.fixture(scope="module")
def acl_env(secured):
    assert secured.admin("PUT", "/admin/v2/tenants/aclten", {"adminRoles": ["acl-admin"]}) == 204
    secured.namespace(NS)
    return secured


def kp_admin(s, role):
    return KafkaAdminClient(bootstrap_servers=s.kafka, security_protocol="SASL_PLAINTEXT",
                            sasl_mechanism="PLAIN", sasl_plain_username=NS,
                            sasl_plain_password="token:" + s.token(role),
                            request_timeout_ms=30000)


def ck_admin(s, role):
    return AdminClient({"bootstrap.servers": s.kafka, "security.protocol": "SASL_PLAINTEXT",
                        "sasl.mechanism": "PLAIN", "sasl.username": NS,
                        "sasl.password": "token:" + s.token(role)})


def grants_of(s, role):
    import json
    import urllib.request
    req = urllib.request.Request(f"{s.http}/admin/v2/namespaces/{NS}/permissions")
    req.add_header("Authorization", f"Bearer {s.token('admin')}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return sorted(json.load(r).get("namespace_auth", {}).get(role, []))


def everything():
    return ACLFilter(principal=None, host=None, operation=ACLOperation.ANY,
                     permission_type=ACLPermissionType.ANY,
                     resource_pattern=ResourcePatternFilter(ResourceType.ANY, None,
                                                            ACLResourcePatternType.ANY))


def test_kafka_python_creates_describes_and_deletes_acls(acl_env):
    s = acl_env
    a = kp_admin(s, "acl-admin")
    try:
        topic_star = ResourcePattern(ResourceType.TOPIC, "*", ACLResourcePatternType.LITERAL)
        group_star = ResourcePattern(ResourceType.GROUP, "*", ACLResourcePatternType.LITERAL)
        allow = ACLPermissionType.ALLOW
        r = a.create_acls([
            ACL("User:reader", "*", ACLOperation.READ, allow, topic_star),
            ACL("User:reader", "*", ACLOperation.DESCRIBE, allow, topic_star),
            ACL("User:reader", "*", ACLOperation.READ, allow, group_star),
            ACL("User:writer", "*", ACLOperation.WRITE, allow, topic_star),
            # What permissions cannot express is refused, never widened.
            ACL("User:writer", "*", ACLOperation.READ, ACLPermissionType.DENY, topic_star),
            ACL("User:writer", "*", ACLOperation.READ, allow,
                ResourcePattern(ResourceType.TOPIC, "orders", ACLResourcePatternType.LITERAL)),
            ACL("User:nobody", "*", ACLOperation.DESCRIBE, allow, topic_star),
        ])
        assert len(r["succeeded"]) == 4, r
        assert len(r["failed"]) == 3, r
        assert grants_of(s, "reader") == ["consume"]
        assert grants_of(s, "writer") == ["produce"]
        assert grants_of(s, "nobody") == []

        acls, error = a.describe_acls(everything())
        assert error.__name__ == "NoError"
        seen = {(x.principal, x.resource_pattern.resource_type, x.operation) for x in acls}
        assert ("User:reader", ResourceType.TOPIC, ACLOperation.READ) in seen
        assert ("User:reader", ResourceType.GROUP, ACLOperation.READ) in seen
        assert ("User:writer", ResourceType.TOPIC, ACLOperation.WRITE) in seen
        assert ("User:writer", ResourceType.TRANSACTIONAL_ID, ACLOperation.WRITE) in seen
        assert not any(p == "User:writer" and op == ACLOperation.READ for p, _, op in seen)

        only_writer = ACLFilter(principal="User:writer", host=None, operation=ACLOperation.ANY,
                                permission_type=ACLPermissionType.ANY,
                                resource_pattern=ResourcePatternFilter(
                                    ResourceType.ANY, None, ACLResourcePatternType.ANY))
        ((_, deleted, error),) = a.delete_acls([only_writer])
        assert error.__name__ == "NoError" and len(deleted) == 2, deleted
        assert grants_of(s, "writer") == []
        assert grants_of(s, "reader") == ["consume"]
    finally:
        a.close()
    # Managing permissions is the namespace admin's.
    reader = kp_admin(s, "reader")
    try:
        with pytest.raises(ClusterAuthorizationFailedError):
            reader.describe_acls(everything())
    finally:
        reader.close()


def test_confluent_kafka_acls_grant_what_the_client_then_does(acl_env):
    s = acl_env
    ca = ck_admin(s, "acl-admin")
    binding = AclBinding(CResourceType.TOPIC, "*", ResourcePatternType.LITERAL,
                         "User:app", "*", AclOperation.WRITE, AclPermissionType.ALLOW)
    for f in ca.create_acls([binding]).values():
        f.result(30)
    assert grants_of(s, "app") == ["produce"]
    # The role now produces in the namespace.
    p = Producer({"bootstrap.servers": s.kafka, "security.protocol": "SASL_PLAINTEXT",
                  "sasl.mechanism": "PLAIN", "sasl.username": NS,
                  "sasl.password": "token:" + s.token("app")})
    delivered = []
    p.produce(f"acl-{uid()}", b"granted", callback=lambda err, m: delivered.append(err))
    p.flush(30)
    assert delivered == [None]
    found = ca.describe_acls(AclBindingFilter(CResourceType.ANY, None, ResourcePatternType.ANY,
                                              "User:app", None, AclOperation.ANY,
                                              AclPermissionType.ANY)).result(30)
    assert {(b.restype, b.operation) for b in found} == {
        (CResourceType.TOPIC, AclOperation.WRITE),
        (CResourceType.TRANSACTIONAL_ID, AclOperation.WRITE)}
    deny = AclBinding(CResourceType.TOPIC, "*", ResourcePatternType.LITERAL,
                      "User:app", "*", AclOperation.READ, AclPermissionType.DENY)
    with pytest.raises(KafkaException, match="ALLOW"):
        ca.create_acls([deny])[deny].result(30)
    f = AclBindingFilter(CResourceType.TOPIC, None, ResourcePatternType.ANY, "User:app", None,
                         AclOperation.WRITE, AclPermissionType.ALLOW)
    deleted = ca.delete_acls([f])[f].result(30)
    assert len(deleted) == 2
    assert grants_of(s, "app") == []
