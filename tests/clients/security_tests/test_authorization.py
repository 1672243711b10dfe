"""Authorization with token authentication on, judged by real clients:
every HTTP route but health takes a token (401 without, 403 with a role
that may not), MQTT over WebSocket included, a WebSocket dead-letter topic must be one the role may
produce to, destructive Kafka and AMQP operations are the namespace
admin's, and an MQTT persistent session belongs to the role that made it.

Tenants: `acme` (admin role `acme-admin`; in `acme/ns`, `acme-rw` may
produce and consume, `acme-ro` consume, `acme-wo` produce) and `victim`
(namespace `victim/ns`, nobody's but the superuser's)."""

import json
import queue
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

NS = "acme/ns"
VICTIM = "victim/ns"


@pytest.fixture(scope="module")
def s(secured):
    assert secured.admin("PUT", "/admin/v2/tenants/acme", {"adminRoles": ["acme-admin"]}) == 204
    assert secured.admin("PUT", "/admin/v2/tenants/victim", {"adminRoles": []}) == 204
    secured.namespace(NS)
    secured.namespace(VICTIM)
    secured.grant(NS, "acme-rw", ["produce", "consume"])
    secured.grant(NS, "acme-ro", ["consume"])
    secured.grant(NS, "acme-wo", ["produce"])
    return secured


def http(s, method, path, role=None, body=None, token=None):
    """The status of one request with `role`'s token (None: no token)."""
    return s.admin(method, path, body, role=role, token=token)


def message():
    return {"messages": [{"payload": "aGk="}]}


def topics_of(s, ns):
    req = urllib.request.Request(f"{s.http}/admin/v2/persistent/{ns}")
    req.add_header("Authorization", f"Bearer {s.token('admin')}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_every_http_route_takes_a_token_and_its_grants(s):
    t = f"t-{uuid.uuid4().hex[:6]}"
    # (method, path, body, a role that may, a role that may not)
    cases = [
        ("POST", f"/topics/persistent/{NS}/{t}", message(), "acme-wo", "acme-ro"),
        ("GET", f"/topics/persistent/{NS}/{t}/messages?offset=0", None, "acme-ro", "acme-wo"),
        ("GET", f"/lookup/v2/topic/persistent/{NS}/{t}", None, "acme-ro", "someone"),
        ("GET", f"/admin/v2/namespaces/acme", None, "acme-admin", "acme-rw"),
        ("GET", f"/admin/v2/persistent/{NS}", None, "acme-admin", "acme-rw"),
        ("GET", "/admin/v2/tenants/acme", None, "acme-admin", "acme-rw"),
        ("GET", "/admin/v2/clusters", None, "admin", "acme-admin"),
        ("POST", f"/internal/v1/batch/{NS}/persistent/{t}", None, None, "acme-admin"),
    ]
    for method, path, body, allowed, refused in cases:
        assert http(s, method, path, body=body) == 401, (method, path)
        assert http(s, method, path, role=refused, body=body) == 403, (method, path, refused)
        if allowed:
            assert http(s, method, path, role=allowed, body=body) in (200, 204), (method, path)
    # Another tenant's roles, even its admin, reach nothing of `victim`.
    for role in ("acme-admin", "acme-rw"):
        assert http(s, "POST", f"/topics/persistent/{VICTIM}/secret", role, message()) == 403
        assert http(s, "GET", f"/topics/persistent/{VICTIM}/secret/messages?offset=0",
                    role) == 403
        assert http(s, "GET", "/admin/v2/namespaces/victim", role) == 403
        assert http(s, "PUT", f"/admin/v2/persistent/{VICTIM}/made", role) == 403
        assert http(s, "POST", "/admin/v2/tenants/acme", role,
                    {"adminRoles": ["acme-rw"]}) == 403
    # A forged token is refused as no token is.
    assert http(s, "GET", f"/admin/v2/persistent/{NS}", token="e30.e30.AAAA") == 401
    # Nothing reached `victim`: no topic appeared there.
    assert topics_of(s, VICTIM) == []
    # Health and readiness stay open for load balancers.
    assert http(s, "GET", "/admin/v2/brokers/health") == 200
    # A tenant admin administers its own namespaces.
    assert http(s, "PUT", "/admin/v2/namespaces/acme/made-by-admin", "acme-admin") in (200, 204)


def ws_status(s, path, role=None, subprotocols=None, token=None):
    url = f"ws://127.0.0.1:{s.ports['http']}{path}"
    token = token or (s.token(role) if role else None)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with ws_connect(url, open_timeout=10, additional_headers=headers,
                        subprotocols=subprotocols):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_websocket_needs_a_token_and_a_dead_letter_topic_it_may_produce_to(s):
    t = f"ws-{uuid.uuid4().hex[:6]}"
    consumer = f"/ws/v2/consumer/persistent/{NS}/{t}/sub"
    assert ws_status(s, consumer) == 401
    assert ws_status(s, consumer, "someone") == 403
    assert ws_status(s, f"/ws/v2/producer/persistent/{NS}/{t}", "acme-ro") == 403
    assert ws_status(s, consumer, "acme-ro") == 101
    # The cross-tenant write through the dead-letter topic, refused.
    stolen = f"{consumer}?maxRedeliverCount=1&deadLetterTopic=persistent://{VICTIM}/stolen"
    assert ws_status(s, stolen, "acme-rw") == 403
    # A consume-only role may not have the broker produce dead letters
    # for it, even in its own namespace.
    own = f"{consumer}?maxRedeliverCount=1&deadLetterTopic=dlq-{t}"
    assert ws_status(s, own, "acme-ro") == 403
    assert ws_status(s, own, "acme-rw") == 101
    assert "persistent://victim/ns/stolen" not in topics_of(s, VICTIM)


def kafka_conf(s, role):
    return {
        "bootstrap.servers": s.kafka,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": NS,
        "sasl.password": "token:" + s.token(role),
    }


def code_of(future):
    try:
        future.result(30)
        return None
    except KafkaException as e:
        return e.args[0].code()


def test_kafka_destructive_requests_need_the_namespace_admin(s):
    topic = f"k-{uuid.uuid4().hex[:6]}"
    p = Producer(kafka_conf(s, "acme-rw"))
    for i in range(10):
        p.produce(topic, b"m%d" % i)
    assert p.flush(30) == 0
    reader = AdminClient(kafka_conf(s, "acme-ro"))
    denied = KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert code_of(reader.delete_topics([topic])[topic]) == denied
    res = ConfigResource("topic", topic, set_config={"retention.ms": "0"})
    assert code_of(reader.alter_configs([res])[res]) == denied
    tp = TopicPartition(topic, 0, 10)
    assert code_of(reader.delete_records([tp])[tp]) == denied
    from confluent_kafka.admin import NewPartitions, NewTopic
    assert code_of(reader.create_partitions([NewPartitions(topic, 4)])[topic]) == denied
    other = f"k-{uuid.uuid4().hex[:6]}"
    assert code_of(reader.create_topics([NewTopic(other, 1)])[other]) == denied
    # The data is all still there.
    hw = Producer(kafka_conf(s, "acme-rw"))
    from confluent_kafka import Consumer
    c = Consumer({**kafka_conf(s, "acme-ro"), "group.id": f"g-{topic}",
                  "auto.offset.reset": "earliest"})
    low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
    c.close()
    assert (low, high) == (0, 10)
    del hw
    # Groups need consume: a produce-only role may not commit for one.
    wo = Consumer({**kafka_conf(s, "acme-wo"), "group.id": f"g-{topic}"})
    with pytest.raises(KafkaException) as e:
        wo.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
    assert e.value.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED
    wo.close()
    # The tenant's admin may.
    admin = AdminClient(kafka_conf(s, "acme-admin"))
    assert code_of(admin.alter_configs([res])[res]) is None
    assert code_of(admin.delete_topics([topic])[topic]) is None


def test_amqp_purge_and_delete_need_their_permissions(s):
    q = f"q-{uuid.uuid4().hex[:6]}"

    def channel(role):
        params = pika.ConnectionParameters(
            "127.0.0.1", s.amqp_port, virtual_host=NS,
            credentials=pika.PlainCredentials(role, s.token(role)))
        return pika.BlockingConnection(params).channel()

    admin = channel("acme-admin")
    admin.queue_declare(q, durable=True)
    admin.basic_publish("", q, b"keep")
    for op in (lambda ch: ch.queue_purge(q), lambda ch: ch.queue_delete(q),
               lambda ch: ch.exchange_delete("amq.fanout"),
               lambda ch: ch.exchange_declare(f"x-{q}", "fanout")):
        ch = channel("acme-wo")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
            op(ch)
        assert e.value.reply_code == 403
        ch.connection.close()
    # A consume-only role may not delete it either, but may purge.
    ro = channel("acme-ro")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ro.queue_delete(q)
    assert e.value.reply_code == 403
    ro.connection.close()
    check = channel("acme-ro")
    method, _, body = check.basic_get(q, auto_ack=False)
    assert body == b"keep"
    check.connection.close()
    assert admin.queue_delete(q).method.message_count == 1


def mqtt_connect(s, client_id, role, clean, version=mqtt.MQTTv311):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version,
                    clean_session=clean if version != mqtt.MQTTv5 else None)
    c.username_pw_set(NS, s.token(role))
    result = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: result.put(rc.value)
    c.on_disconnect = lambda *a: result.put("disconnected")
    c.connect("127.0.0.1", s.mqtt_port)
    c.loop_start()
    return c, result.get(timeout=30), result


def test_an_mqtt_persistent_session_is_its_roles(s):
    cid = f"sensor-{uuid.uuid4().hex[:6]}"
    owner, rc, owner_events = mqtt_connect(s, cid, "acme-rw", clean=False)
    assert rc == 0
    # Another role of the same namespace may not take the id over...
    thief, rc, _ = mqtt_connect(s, cid, "acme-wo", clean=False)
    assert rc == 0x87, rc  # paho's name for 3.1.1's "not authorized" (5)
    thief.loop_stop()
    # ...and the owner stays connected.
    with pytest.raises(queue.Empty):
        owner_events.get(timeout=1)
    owner.disconnect()
    owner.loop_stop()
    # With the owner gone, the stored session is still its role's.
    thief, rc, _ = mqtt_connect(s, cid, "acme-wo", clean=True)
    assert rc == 0x87, rc
    thief.loop_stop()
    back, rc, _ = mqtt_connect(s, cid, "acme-rw", clean=False)
    assert rc == 0
    back.disconnect()
    back.loop_stop()


def test_mqtt_over_websocket_needs_a_token_on_the_upgrade(s):
    mqtt_ws = ["mqtt"]
    assert ws_status(s, "/mqtt", subprotocols=mqtt_ws) == 401
    assert ws_status(s, "/mqtt", token="e30.e30.AAAA", subprotocols=mqtt_ws) == 401
    # `/mqtt` serves the listener's namespace (public/default), which is
    # not acme's; `/mqtt/<tenant>/<namespace>` names another.
    assert ws_status(s, "/mqtt", "acme-rw", subprotocols=mqtt_ws) == 403
    assert ws_status(s, f"/mqtt/{VICTIM}", "acme-rw", subprotocols=mqtt_ws) == 403
    assert ws_status(s, f"/mqtt/{NS}", "someone", subprotocols=mqtt_ws) == 403
    assert ws_status(s, f"/mqtt/{NS}", "acme-rw", subprotocols=mqtt_ws) == 101
    assert ws_status(s, "/mqtt", "admin", subprotocols=mqtt_ws) == 101
    # A browser's ways, which set no header: a `bearer.<jwt>` subprotocol
    # (the server answers with `mqtt`), or `?token=`.
    url = f"ws://127.0.0.1:{s.ports['http']}/mqtt/{NS}"
    with ws_connect(url, open_timeout=10,
                    subprotocols=["mqtt", f"bearer.{s.token('acme-ro')}"]) as c:
        assert c.subprotocol == "mqtt"
    with ws_connect(f"{url}?token={s.token('acme-ro')}", open_timeout=10, subprotocols=mqtt_ws):
        pass


def test_an_mqtt_websocket_upgrades_token_logs_in_a_connect_without_password(s):
    """paho with the token on the upgrade only: CONNECT carries no
    password, and the session runs as the upgrade's role in the path's
    namespace (acme-rw may do nothing in the listener's own)."""
    got = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ws-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5, transport="websockets")
    c.ws_set_options(path=f"/mqtt/{NS}",
                     headers={"Authorization": f"Bearer {s.token('acme-rw')}"})
    c.on_connect = lambda _c, _u, _f, rc, _p: got.put(("connack", rc.value))
    c.on_subscribe = lambda _c, _u, _m, rcs, _p: got.put(("suback", [r.value for r in rcs]))
    c.on_message = lambda _c, _u, m: got.put(("message", m.payload))
    c.connect("127.0.0.1", s.ports["http"])
    c.loop_start()
    try:
        assert got.get(timeout=10) == ("connack", 0)
        c.subscribe("ws/upgrade", qos=1)
        assert got.get(timeout=10) == ("suback", [1])
        c.publish("ws/upgrade", b"from the upgrade", qos=1)
        assert got.get(timeout=10) == ("message", b"from the upgrade")
    finally:
        c.loop_stop()
        c.disconnect()
