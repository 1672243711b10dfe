"""kafka-python's admin client: topics, partitions, configs and groups,
and Kafka's own error codes."""

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, KafkaAdminClient, NewPartitions, NewTopic
from kafka.errors import (
    InvalidPartitionsError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)


@pytest.fixture
def admin(standalone):
    a = KafkaAdminClient(bootstrap_servers=standalone.kafka, request_timeout_ms=30000)
    yield a
    a.close()


def partitions_of(admin, topic):
    (t,) = admin.describe_topics([topic])
    assert t["error_code"] == 0, t
    return len(t["partitions"])


def test_topics_are_created_described_grown_and_deleted(admin):
    admin.create_topics([NewTopic("adm-a", 3, 1),
                         NewTopic("adm-b", 1, 1, topic_configs={"retention.ms": "3600000"})])
    assert {"adm-a", "adm-b"} <= set(admin.list_topics())
    assert partitions_of(admin, "adm-a") == 3
    assert partitions_of(admin, "adm-b") == 1

    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic("adm-a", 3, 1)])
    with pytest.raises(InvalidPartitionsError):
        admin.create_topics([NewTopic("adm-zero", 0, 1)])

    admin.create_partitions({"adm-a": NewPartitions(5)})
    assert partitions_of(admin, "adm-a") == 5
    with pytest.raises(InvalidPartitionsError):
        admin.create_partitions({"adm-a": NewPartitions(2)})
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.create_partitions({"adm-missing": NewPartitions(4)})

    admin.delete_topics(["adm-b"])
    assert "adm-b" not in admin.list_topics()
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topics(["adm-b"])


def configs_of(admin, topic):
    r = admin.describe_configs([ConfigResource("TOPIC", topic)], config_filter="all")
    return {k: (v["value"], v["config_source"]) for k, v in r["topic"][topic].items()}


def test_configs_are_described_and_altered(admin):
    admin.create_topics([NewTopic("cfg", 1, 1, topic_configs={"cleanup.policy": "delete"})])
    cfg = configs_of(admin, "cfg")
    assert cfg["cleanup.policy"] == ("delete", "DYNAMIC_TOPIC_CONFIG")
    assert cfg["retention.ms"] == ("604800000", "DEFAULT_CONFIG")
    admin.alter_configs([ConfigResource("TOPIC", "cfg",
                                        configs={"retention.ms": "60000", "retention.bytes": "1048576"})],
                        incremental=False)
    cfg = configs_of(admin, "cfg")
    assert cfg["retention.ms"] == ("60000", "DYNAMIC_TOPIC_CONFIG")
    assert cfg["retention.bytes"] == ("1048576", "DYNAMIC_TOPIC_CONFIG")
    # The client carries the other overrides over into a whole-set alter.
    assert cfg["cleanup.policy"] == ("delete", "DYNAMIC_TOPIC_CONFIG")
    admin.alter_configs([ConfigResource("TOPIC", "cfg", configs={"retention.bytes": ("DELETE", None)})],
                        incremental=True)
    cfg = configs_of(admin, "cfg")
    assert cfg["retention.bytes"] == ("-1", "DEFAULT_CONFIG")
    assert cfg["retention.ms"] == ("60000", "DYNAMIC_TOPIC_CONFIG")
    for incremental in (True, False):
        def alter(topic, configs):
            r = admin.alter_configs([ConfigResource("TOPIC", topic, configs=configs)],
                                    raise_on_unknown=False, incremental=incremental)
            # The client reports each resource's error by its Kafka code.
            return str(r["topic"][topic])
        assert alter("cfg", {"no.such.config": "1"}).startswith("[Error 40] InvalidConfigurationError")
        assert alter("cfg", {"retention.ms": "soon"}).startswith("[Error 40] InvalidConfigurationError")
        assert alter("cfg-missing", {"retention.ms": "1"}).startswith("[Error 3] UnknownTopicOrPartitionError")


def test_groups_are_listed_described_and_deleted(standalone, admin):
    p = KafkaProducer(bootstrap_servers=standalone.kafka)
    for i in range(10):
        p.send("grp-topic", b"%d" % i)
    p.flush()
    p.close()
    c = KafkaConsumer("grp-topic", bootstrap_servers=standalone.kafka, group_id="adm-group",
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=15000)
    n = 0
    for _ in c:
        n += 1
        if n == 10:
            break
    c.commit()
    assert "adm-group" in {g["group_id"] for g in admin.list_groups()}
    desc = admin.describe_groups(["adm-group"])["adm-group"]
    assert desc["group_state"] == "Stable" and len(desc["members"]) == 1, desc
    offsets = admin.list_group_offsets("adm-group")["adm-group"]
    assert [o.offset for tp, o in offsets.items() if tp.topic == "grp-topic"] == [10]
    c.close()
    desc = admin.describe_groups(["adm-group"])["adm-group"]
    assert desc["group_state"] == "Empty", desc
    admin.delete_groups(["adm-group"])
    assert "adm-group" not in {g["group_id"] for g in admin.list_groups()}


def test_delete_records_moves_the_start_of_a_partition(standalone, admin):
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient as CAdmin

    admin.create_topics([NewTopic("trimmed", 1, 1)])
    p = KafkaProducer(bootstrap_servers=standalone.kafka, acks="all")
    for i in range(100):
        p.send("trimmed", b"%d" % i)
    p.flush()
    p.close()

    ca = CAdmin({"bootstrap.servers": standalone.kafka})
    (f,) = ca.delete_records([TopicPartition("trimmed", 0, 40)]).values()
    assert f.result(30).low_watermark == 40

    c = Consumer({"bootstrap.servers": standalone.kafka, "group.id": "trim-check"})
    assert c.get_watermark_offsets(TopicPartition("trimmed", 0), timeout=10) == (40, 100)
    c.assign([TopicPartition("trimmed", 0, 0)])  # below the start: reset
    c.close()

    c = KafkaConsumer(bootstrap_servers=standalone.kafka, auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=15000)
    from kafka import TopicPartition as KTP
    c.assign([KTP("trimmed", 0)])
    c.seek_to_beginning()
    got = []
    for m in c:
        got.append((m.offset, m.value))
        if len(got) == 60:
            break
    c.close()
    assert got == [(i, b"%d" % i) for i in range(40, 100)]

    # Past the end is out of range; -1 means the end.
    (f,) = ca.delete_records([TopicPartition("trimmed", 0, 500)]).values()
    with pytest.raises(Exception, match="OFFSET_OUT_OF_RANGE"):
        f.result(30)
    (f,) = ca.delete_records([TopicPartition("trimmed", 0, -1)]).values()
    assert f.result(30).low_watermark == 100


def test_max_message_bytes_bounds_a_stored_batch(standalone, admin):
    """`max.message.bytes` of a topic, and the listener's
    `message.max.bytes` for the others, refuse larger batches with
    MESSAGE_TOO_LARGE, as Kafka does; smaller ones are stored."""
    from confluent_kafka import KafkaError, Producer

    admin.create_topics([NewTopic("mmb-small", 1, 1, topic_configs={"max.message.bytes": "10000"})])
    assert configs_of(admin, "mmb-small")["max.message.bytes"] == ("10000", "DYNAMIC_TOPIC_CONFIG")

    # The client's own limit is raised so that the broker is the one
    # that refuses; no batching, so each message is its own batch.
    p = Producer({"bootstrap.servers": standalone.kafka, "message.max.bytes": 4_000_000,
                  "linger.ms": 0, "compression.type": "none", "retries": 0})
    outcome = {}

    def report(name):
        def cb(err, msg):
            outcome[name] = err.code() if err else KafkaError.NO_ERROR
        return cb

    p.produce("mmb-small", b"x" * 5_000, callback=report("small-fits"))
    p.flush(30)
    p.produce("mmb-small", b"x" * 20_000, callback=report("small-over"))
    p.flush(30)
    p.produce("mmb-default", b"x" * 900_000, callback=report("default-fits"))
    p.flush(30)
    p.produce("mmb-default", b"x" * 1_500_000, callback=report("default-over"))
    p.flush(30)
    assert outcome == {
        "small-fits": KafkaError.NO_ERROR,
        "small-over": KafkaError.MSG_SIZE_TOO_LARGE,
        "default-fits": KafkaError.NO_ERROR,
        "default-over": KafkaError.MSG_SIZE_TOO_LARGE,
    }, outcome
    assert configs_of(admin, "mmb-default")["max.message.bytes"] == ("1048588", "DEFAULT_CONFIG")
