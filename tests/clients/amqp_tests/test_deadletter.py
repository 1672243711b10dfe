"""Dead-lettering with RabbitMQ's x-death history: on reject, on TTL
expiry, on max-length overflow and past the delivery limit."""

import time

import pika
import pytest

from amqp_tests.conftest import drain


def dlx_setup(ch, name, **args):
    ch.exchange_declare(f"{name}.dlx", exchange_type="fanout")
    dlq = ch.queue_declare(f"{name}.dlq").method.queue
    ch.queue_bind(dlq, f"{name}.dlx")
    arguments = {"x-dead-letter-exchange": f"{name}.dlx", **args}
    ch.queue_declare(name, durable=True, arguments=arguments)
    ch.queue_purge(name)
    ch.queue_purge(dlq)
    return dlq


def death(props, i=0):
    return props.headers["x-death"][i]


def test_reject_without_requeue_dead_letters(connect):
    ch = connect().channel()
    ch.confirm_delivery()
    dlq = dlx_setup(ch, "dl-reject")
    ch.basic_publish("", "dl-reject", b"bad", properties=pika.BasicProperties(headers={"app": "1"}))
    ch.basic_publish("", "dl-reject", b"requeued")
    m1, _, b1 = ch.basic_get("dl-reject")
    assert b1 == b"bad"
    ch.basic_reject(m1.delivery_tag, requeue=False)
    m2, _, b2 = ch.basic_get("dl-reject")
    assert b2 == b"requeued"
    ch.basic_nack(m2.delivery_tag, requeue=True)
    m3, _, b3 = ch.basic_get("dl-reject")
    assert b3 == b"requeued" and m3.redelivered
    ch.basic_ack(m3.delivery_tag)
    [(method, props, body)] = drain(ch, dlq, 1)
    assert body == b"bad"
    assert method.exchange == "dl-reject.dlx" and method.routing_key == "dl-reject"
    d = death(props)
    assert d["count"] == 1
    assert d["reason"] == "rejected"
    assert d["queue"] == "dl-reject"
    assert d["exchange"] == ""
    assert d["routing-keys"] == ["dl-reject"]
    assert props.headers["x-first-death-reason"] == "rejected"
    assert props.headers["app"] == "1"


def test_queue_ttl_expires_into_the_dead_letter_queue_without_consumers(connect):
    ch = connect().channel()
    dlq = dlx_setup(ch, "dl-ttl", **{"x-message-ttl": 200,
                                     "x-dead-letter-routing-key": "expired-ones"})
    for i in range(3):
        ch.basic_publish("", "dl-ttl", f"m{i}".encode())
    time.sleep(1.0)
    assert ch.queue_declare("dl-ttl", passive=True).method.message_count == 0
    got = drain(ch, dlq, 3)
    assert [b for _, _, b in got] == [b"m0", b"m1", b"m2"]
    for method, props, _ in got:
        assert method.routing_key == "expired-ones"
        assert death(props)["reason"] == "expired"
        assert death(props)["queue"] == "dl-ttl"


def test_per_message_expiration(connect):
    ch = connect().channel()
    dlq = dlx_setup(ch, "dl-exp")
    ch.basic_publish("", "dl-exp", b"short", properties=pika.BasicProperties(expiration="100"))
    time.sleep(1.5)
    [(_, props, body)] = drain(ch, dlq, 1)
    assert body == b"short"
    assert death(props)["reason"] == "expired"
    assert death(props)["original-expiration"] == "100"
    assert props.expiration is None


def test_max_length_drop_head_dead_letters_the_oldest(connect):
    ch = connect().channel()
    ch.confirm_delivery()
    dlq = dlx_setup(ch, "dl-maxlen", **{"x-max-length": 2})
    for i in range(5):
        ch.basic_publish("", "dl-maxlen", f"m{i}".encode())
    time.sleep(0.3)
    assert [b for _, _, b in drain(ch, "dl-maxlen", 2)] == [b"m3", b"m4"]
    got = drain(ch, dlq, 3)
    assert [b for _, _, b in got] == [b"m0", b"m1", b"m2"]
    assert all(death(p)["reason"] == "maxlen" for _, p, _ in got)


def test_max_length_reject_publish_nacks_with_confirms(connect):
    ch = connect().channel()
    ch.confirm_delivery()
    ch.queue_declare("rej-pub", arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.queue_purge("rej-pub")
    ch.basic_publish("", "rej-pub", b"1")
    ch.basic_publish("", "rej-pub", b"2")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", "rej-pub", b"3")
    assert [b for _, _, b in drain(ch, "rej-pub", 2)] == [b"1", b"2"]


def test_max_length_bytes_drop_head_dead_letters_the_oldest(connect):
    """x-max-length-bytes counts message bodies: with 25 bytes, two
    10-byte messages stay and the older ones are dead-lettered."""
    ch = connect().channel()
    ch.confirm_delivery()
    dlq = dlx_setup(ch, "dl-maxbytes", **{"x-max-length-bytes": 25})
    for i in range(5):
        ch.basic_publish("", "dl-maxbytes", f"message-{i:02d}".encode(),
                         pika.BasicProperties(headers={"padding": "x" * 100}))
    time.sleep(0.3)
    assert ch.queue_declare("dl-maxbytes", passive=True).method.message_count == 2
    assert [b for _, _, b in drain(ch, "dl-maxbytes", 2)] == [b"message-03", b"message-04"]
    got = drain(ch, dlq, 3)
    assert [b for _, _, b in got] == [b"message-00", b"message-01", b"message-02"]
    assert all(death(p)["reason"] == "maxlen" for _, p, _ in got)


def test_max_length_bytes_reject_publish_nacks_with_confirms(connect):
    """A queue at its byte limit refuses the next publish: bodies of 10
    bytes are taken while fewer than 25 bytes are ready."""
    ch = connect().channel()
    ch.confirm_delivery()
    ch.queue_declare("rej-bytes", arguments={"x-max-length-bytes": 25,
                                             "x-overflow": "reject-publish"})
    ch.queue_purge("rej-bytes")
    for i in range(3):
        ch.basic_publish("", "rej-bytes", f"message-{i:02d}".encode())
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", "rej-bytes", b"message-03")
    got = drain(ch, "rej-bytes", 3)
    assert [b for _, _, b in got] == [b"message-00", b"message-01", b"message-02"]
    # Room again once consumed.
    ch.basic_publish("", "rej-bytes", b"message-04")


def test_delivery_limit_dead_letters_after_too_many_returns(connect):
    ch = connect().channel()
    ch.confirm_delivery()
    dlq = dlx_setup(ch, "dl-limit", **{"x-queue-type": "quorum", "x-delivery-limit": 2})
    ch.basic_publish("", "dl-limit", b"poison")
    deliveries = 0
    deadline = time.time() + 10
    while time.time() < deadline:
        m, _, _ = ch.basic_get("dl-limit")
        if m is None:
            if ch.queue_declare(dlq, passive=True).method.message_count:
                break
            time.sleep(0.05)
            continue
        deliveries += 1
        ch.basic_nack(m.delivery_tag, requeue=True)
    assert deliveries == 3
    [(_, props, body)] = drain(ch, dlq, 1)
    assert body == b"poison"
    assert death(props)["reason"] == "delivery_limit"
