"""Tenancy: a user name `tenant/namespace` puts the connection in that
namespace (as a Kafka SASL user name does), whose `amq.topic`, sessions and
retained messages are its own; an unknown namespace is refused."""

import urllib.request

from mqtt_tests.conftest import LEVELS, QUIET, Client, uid


def create_namespace(standalone, name):
    req = urllib.request.Request(f"{standalone.http}/admin/v2/namespaces/{name}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status in (200, 204)


def in_namespace(standalone, level, user, made):
    c = Client(standalone.mqtt_port, level)
    made.append(c)
    c.c.username_pw_set(user, "secret")
    return c


@LEVELS
def test_user_name_picks_the_namespace(standalone, client, level):
    ns = f"public/mqtt-{uid()}"
    create_namespace(standalone, ns)
    made = []
    try:
        sub = in_namespace(standalone, level, ns, made)
        assert sub.connect()[1] == 0
        assert sub.subscribe("plant/line1", qos=1) == [1]
        # The same topic in public/default does not reach it...
        client(level).publish("plant/line1", b"elsewhere", qos=1)
        assert sub.collect(QUIET) == []
        # ...a publisher of its namespace does, retained messages included.
        pub = in_namespace(standalone, level, ns, made)
        assert pub.connect()[1] == 0
        pub.publish("plant/line1", b"here", qos=1, retain=True)
        assert sub.expect_one().payload == b"here"
        late = in_namespace(standalone, level, ns, made)
        assert late.connect()[1] == 0
        late.subscribe("plant/#", qos=1)
        assert late.expect_one().payload == b"here"
        other = client(level)
        other.subscribe("plant/#", qos=1)
        assert other.collect(QUIET) == []
    finally:
        for c in made:
            c.close()


@LEVELS
def test_unknown_namespace_is_refused(standalone, level):
    made = []
    try:
        c = in_namespace(standalone, level, "nosuch/namespace", made)
        _, rc, _ = c.connect()
        # 0x86 Bad User Name or Password; paho reports 3.1.1's return
        # code 4 as the same reason.
        assert rc == 0x86
    finally:
        for c in made:
            c.close()
