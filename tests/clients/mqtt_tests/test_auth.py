"""Token authentication: the CONNECT user name and password go to the
broker's auth hook. The password carries a Pulsar token (a JWT whose `sub`
is the role); the user name may name the namespace. The role's namespace
permissions decide what it may publish and subscribe to."""

import queue
import time

import paho.mqtt.client as mqtt
import pytest

from mqtt_tests.conftest import LEVELS, QUIET, V311, V5, Client, uid

# CONNACK reasons; paho reports 3.1.1's return codes 4 and 5 as these.
BAD_USER_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87


class Acks:
    """Records the reason code of each PUBACK/PUBCOMP by message id."""

    def __init__(self, c):
        self.q = queue.Queue()
        c.c.on_publish = lambda _c, _u, mid, rc, _p: self.q.put((mid, rc.value))

    def wait(self, mid, timeout=10):
        deadline = time.time() + timeout
        while True:
            m, rc = self.q.get(timeout=max(0.01, deadline - time.time()))
            if m == mid:
                return rc


@pytest.fixture
def made():
    clients = []
    yield clients
    for c in clients:
        c.close()


def connect(secured, level, made, user=None, password=None, will=None):
    c = Client(secured.mqtt_port, level)
    made.append(c)
    if user is not None or password is not None:
        c.c.username_pw_set(user, password)
    return c, c.connect(will=will)[1]


@pytest.fixture(scope="module")
def ns(secured):
    """A namespace where `sensor` may produce and `dashboard` consume."""
    name = f"public/iot-{uid()}"
    secured.namespace(name)
    secured.grant(name, "sensor", ["produce"])
    secured.grant(name, "dashboard", ["consume"])
    return name


@LEVELS
def test_a_superuser_token_connects_publishes_and_subscribes(secured, level, made):
    c, rc = connect(secured, level, made, "admin", secured.token("admin"))
    assert rc == 0
    assert c.subscribe("auth/room1", qos=1) == [1]
    c.publish("auth/room1", b"hello", qos=1)
    assert c.expect_one().payload == b"hello"


@LEVELS
def test_no_credentials_are_not_authorized(secured, level, made):
    _, rc = connect(secured, level, made)
    assert rc == NOT_AUTHORIZED


@LEVELS
def test_wrong_expired_or_foreign_tokens_are_refused(secured, level, made, tmp_path):
    foreign_key = tmp_path / "other.key"
    foreign_key.write_bytes(b"another secret key of thirty-two!")
    foreign = secured.token("admin", key=f"file://{foreign_key}")
    expiring = secured.token("admin", expiry="1s")
    time.sleep(2.1)
    for password in ["not-a-token", foreign, expiring, ""]:
        _, rc = connect(secured, level, made, "admin", password)
        assert rc == BAD_USER_OR_PASSWORD, password
    # KoP's `token:` prefix is accepted as well.
    _, rc = connect(secured, level, made, "admin", "token:" + secured.token("admin"))
    assert rc == 0


@LEVELS
def test_a_role_without_permissions_is_not_authorized(secured, level, made, ns):
    _, rc = connect(secured, level, made, ns, secured.token("stranger"))
    assert rc == NOT_AUTHORIZED
    # Nor in public/default, where nothing was granted to anyone.
    _, rc = connect(secured, level, made, "sensor", secured.token("sensor"))
    assert rc == NOT_AUTHORIZED


def test_permissions_split_publishing_from_subscribing_v5(secured, made, ns):
    topic = f"plant/{uid()}/temp"
    dash, rc = connect(secured, V5, made, ns, secured.token("dashboard"))
    assert rc == 0
    sensor, rc = connect(secured, V5, made, ns, secured.token("sensor"))
    assert rc == 0
    # The sensor may not subscribe: SUBACK 0x87, per filter.
    assert sensor.subscribe([(topic, 1), ("plant/#", 0)]) == [NOT_AUTHORIZED, NOT_AUTHORIZED]
    assert dash.subscribe(topic, qos=1) == [1]
    sensor.publish(topic, b"21.5", qos=1)
    assert dash.expect_one().payload == b"21.5"
    # The dashboard may not publish: PUBACK and PUBREC carry 0x87, and
    # nothing is stored or delivered.
    acks = Acks(dash)
    info = dash.c.publish(topic, b"forged-qos1", qos=1)
    assert acks.wait(info.mid) == NOT_AUTHORIZED
    # paho answers even a refusing PUBREC with PUBREL, whose id the refused
    # flow no longer holds: PUBCOMP says 0x92 (Packet Identifier Not Found).
    info = dash.c.publish(topic, b"forged-qos2", qos=2)
    assert acks.wait(info.mid) == 0x92
    dash.c.publish(topic, b"forged-qos0", qos=0)
    dash.expect_none(QUIET)
    # The connection stays up for what the role may do.
    sensor.publish(topic, b"22.0", qos=1)
    assert dash.expect_one().payload == b"22.0"


def test_permissions_at_3_1_1(secured, made, ns):
    topic = f"plant/{uid()}/hum"
    dash, rc = connect(secured, V311, made, ns, secured.token("dashboard"))
    assert rc == 0
    sensor, rc = connect(secured, V311, made, ns, secured.token("sensor"))
    assert rc == 0
    # 3.1.1 SUBACK has only "failure" (0x80), which paho reports as 0x80.
    assert sensor.subscribe(topic, qos=1) == [0x80]
    assert dash.subscribe(topic, qos=1) == [1]
    sensor.publish(topic, b"40%", qos=1)
    assert dash.expect_one().payload == b"40%"
    # A 3.1.1 publish cannot be refused in its PUBACK: the connection
    # closes (MQTT-3.3.5-2), and nothing is delivered.
    dash.c.publish(topic, b"forged", qos=1)
    from_server, _ = dash.wait_disconnected()
    assert not from_server
    listener, rc = connect(secured, V311, made, ns, secured.token("dashboard"))
    listener.subscribe(topic, qos=1)
    listener.expect_none(QUIET)


@LEVELS
def test_a_will_needs_the_produce_permission(secured, level, made, ns):
    _, rc = connect(secured, level, made, ns, secured.token("dashboard"),
                    will=("plant/will", b"gone", 1, False, None))
    assert rc == NOT_AUTHORIZED
    _, rc = connect(secured, level, made, ns, secured.token("sensor"),
                    will=("plant/will", b"gone", 1, False, None))
    assert rc == 0


def test_over_websocket_the_token_works_too(secured, made):
    c = Client(secured.ports["http"], V5)
    made.append(c)
    c.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=c.client_id,
                      protocol=V5, transport="websockets")
    # The upgrade carries the token too, as every HTTP path does.
    c.c.ws_set_options(path="/mqtt",
                       headers={"Authorization": f"Bearer {secured.token('admin')}"})
    c.c.on_connect = c._on_connect
    c.c.on_message = c._on_message
    c.c.on_subscribe = c._on_subscribe
    c.c.username_pw_set("admin", secured.token("admin"))
    assert c.connect()[1] == 0
    assert c.subscribe("ws/auth", qos=1) == [1]
    c.publish("ws/auth", b"browser", qos=1)
    assert c.expect_one().payload == b"browser"


def test_admin_api_takes_superuser_tokens_only(secured):
    assert secured.admin("GET", "/admin/v2/tenants", role=None) == 401
    assert secured.admin("GET", "/admin/v2/tenants", role="sensor") == 403
    assert secured.admin("GET", "/admin/v2/tenants") == 200
    # Health and readiness stay open.
    assert secured.admin("GET", "/admin/v2/brokers/health", role=None) == 200
