"""Token authentication over SASL/PLAIN, as KoP does it: the user name is
`tenant/namespace`, the password `token:<jwt>`. librdkafka and kafka-python
both log in; a wrong token fails SASL, a client without SASL is cut off,
and a role's namespace permissions decide produce and fetch."""

import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from kafka import KafkaConsumer, KafkaProducer


def sasl(secured, role, user="public/default", token=None):
    return {
        "bootstrap.servers": secured.kafka,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": user,
        "sasl.password": "token:" + (token or secured.token(role)),
    }


@pytest.fixture(scope="module")
def ns(secured):
    name = f"public/kafka-{uuid.uuid4().hex[:8]}"
    secured.namespace(name)
    secured.grant(name, "producer", ["produce"])
    secured.grant(name, "consumer", ["consume"])
    return name


def test_librdkafka_logs_in_with_a_token_and_round_trips(secured):
    topic = f"auth-{uuid.uuid4().hex[:8]}"
    p = Producer(sasl(secured, "admin"))
    p.produce(topic, key=b"k", value=b"v")
    assert p.flush(30) == 0
    c = Consumer({**sasl(secured, "admin"), "group.id": "g", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got = None
    for _ in range(60):
        m = c.poll(1)
        if m is not None and not m.error():
            got = m
            break
    c.close()
    assert got is not None and got.value() == b"v" and got.key() == b"k"


def test_kafka_python_logs_in_with_a_token(secured):
    topic = f"auth-kp-{uuid.uuid4().hex[:8]}"
    common = dict(bootstrap_servers=secured.kafka, security_protocol="SASL_PLAINTEXT",
                  sasl_mechanism="PLAIN", sasl_plain_username="public/default",
                  sasl_plain_password="token:" + secured.token("admin"))
    p = KafkaProducer(acks="all", **common)
    p.send(topic, b"from-kafka-python").get(timeout=30)
    p.close()
    c = KafkaConsumer(topic, auto_offset_reset="earliest", consumer_timeout_ms=10000, **common)
    values = [m.value for m in c]
    c.close()
    assert values == [b"from-kafka-python"]


def errors_of(conf):
    errors = []
    c = Consumer({**conf, "group.id": "x", "error_cb": errors.append})
    with pytest.raises(KafkaException):
        c.list_topics(timeout=5)
    c.close()
    return errors


def test_a_wrong_token_fails_sasl(secured, tmp_path):
    key = tmp_path / "other.key"
    key.write_bytes(b"some other secret key, 32 bytes!")
    forged = secured.token("admin", key=f"file://{key}")
    errors = errors_of(sasl(secured, "admin", token=forged))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


def test_a_client_without_sasl_is_cut_off(secured):
    errors_of({"bootstrap.servers": secured.kafka})


def test_permissions_gate_produce_and_fetch(secured, ns):
    topic = f"perm-{uuid.uuid4().hex[:8]}"
    reports = []
    p = Producer({**sasl(secured, "consumer", user=ns), "message.send.max.retries": 0})
    p.produce(topic, value=b"x", on_delivery=lambda err, _m: reports.append(err))
    p.flush(30)
    assert [e.code() for e in reports] == [KafkaError.TOPIC_AUTHORIZATION_FAILED], reports
    reports.clear()
    p = Producer(sasl(secured, "producer", user=ns))
    p.produce(topic, value=b"ok", on_delivery=lambda err, _m: reports.append(err))
    p.flush(30)
    assert reports == [None]
    c = Consumer({**sasl(secured, "consumer", user=ns), "group.id": "perm",
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got = None
    for _ in range(60):
        m = c.poll(1)
        if m is not None and not m.error():
            got = m.value()
            break
    c.close()
    assert got == b"ok"
