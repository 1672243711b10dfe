"""Token authentication with pika: the PLAIN password carries a Pulsar token
(a JWT whose `sub` is the role). A refused login is connection.close 403
ACCESS_REFUSED; a vhost the role has no permission in is 530 NOT_ALLOWED;
a publish or consume the role may not make closes the channel with 403."""

import uuid

import pika
import pytest

from amqp_tests.conftest import connections


@pytest.fixture
def login(secured):
    with connections(secured.amqp_port) as open_:
        yield lambda user, password, vhost="/": open_(
            vhost, credentials=pika.PlainCredentials(user, password))


@pytest.fixture(scope="module")
def vhost(secured):
    name = f"public/amqp-{uuid.uuid4().hex[:8]}"
    secured.namespace(name)
    secured.grant(name, "writer", ["produce"])
    secured.grant(name, "reader", ["consume", "produce"])
    return name


def test_a_superuser_token_logs_in_and_round_trips(secured, login):
    ch = login("admin", secured.token("admin")).channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"hello")
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"hello"


@pytest.mark.parametrize("password", ["guest", "token:not-a-jwt", ""])
def test_bad_tokens_are_access_refused(secured, login, password):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
        login("admin", password)
    assert "403" in repr(e.value) or "ACCESS_REFUSED" in repr(e.value) \
        or isinstance(e.value, pika.exceptions.ProbableAuthenticationError), repr(e.value)


def test_a_vhost_without_permissions_is_not_allowed(secured, login, vhost):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as e:
        login("stranger", secured.token("stranger"), vhost)
    assert "530" in repr(e.value) or isinstance(
        e.value, pika.exceptions.ProbableAccessDeniedError), repr(e.value)


def test_permissions_gate_publish_and_consume(secured, login, vhost):
    admin = login("admin", secured.token("admin"), vhost).channel()
    q = f"auth-{uuid.uuid4().hex[:8]}"
    admin.queue_declare(q, durable=True)
    writer = login("writer", secured.token("writer"), vhost).channel()
    writer.confirm_delivery()
    writer.basic_publish("", q, b"from-writer")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        writer.basic_get(q, auto_ack=True)
    assert e.value.reply_code == 403
    reader = login("reader", secured.token("reader"), vhost).channel()
    _, _, body = reader.basic_get(q, auto_ack=True)
    assert body == b"from-writer"
