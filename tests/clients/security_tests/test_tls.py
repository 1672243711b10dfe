"""TLS on every listener, checked with real clients against certificates
made by `magnetar tls`: confluent-kafka over SSL (the role from the client
certificate) and SASL_SSL (a token), pika over AMQPS with a token and with
EXTERNAL, paho over MQTT/TLS and over WSS, python websockets over wss, and
curl over HTTPS. A client that trusts another CA, or shows a certificate
another CA signed, is refused. The internal planes speak TLS too
(`--internal-tls`): the admin CLI reaches the metadata store with the CA,
and fails without it. Certificates renewed on disk are served without a
restart."""

import os
import queue
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from paho.mqtt.enums import CallbackAPIVersion
from websockets.sync.client import connect

from conftest import BIN, Pki, Secured, free_port


@pytest.fixture(scope="module")
def env():
    with tempfile.TemporaryDirectory(prefix="magnetar-tls-") as d:
        pki = Pki(d)
        ports = {k: free_port() for k in ("kafka_tls", "amqps", "mqtts", "https")}
        s = Secured(d, extra=[
            "--kafka-tls-listen", f"127.0.0.1:{ports['kafka_tls']}",
            "--amqp-tls-listen", f"127.0.0.1:{ports['amqps']}",
            "--mqtt-tls-listen", f"127.0.0.1:{ports['mqtts']}",
            "--https-listen", f"127.0.0.1:{ports['https']}",
            "--tls-cert-file", pki.path("server.pem"),
            "--tls-key-file", pki.path("server.key"),
            "--tls-ca-file", pki.path("ca.pem"),
            "--internal-tls",
        ])
        s.start()
        s.pki, s.tls_ports = pki, ports
        yield s
        s.stop()


def kafka_conf(env, **extra):
    conf = {
        "bootstrap.servers": f"127.0.0.1:{env.tls_ports['kafka_tls']}",
        "ssl.ca.location": env.pki.path("ca.pem"),
    }
    conf.update(extra)
    return conf


def kafka_round_trip(conf):
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    p = Producer(conf)
    for i in range(10):
        p.produce(topic, f"m{i}".encode())
    assert p.flush(30) == 0
    c = Consumer({**conf, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got = []
    deadline = time.time() + 60
    while len(got) < 10 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m.value())
    c.close()
    assert got == [f"m{i}".encode() for i in range(10)]


def test_kafka_ssl_with_a_client_certificate(env):
    kafka_round_trip(kafka_conf(
        env, **{"security.protocol": "SSL",
                "ssl.certificate.location": env.pki.path("admin.pem"),
                "ssl.key.location": env.pki.path("admin.key")}))


def test_kafka_sasl_ssl_with_a_token(env):
    kafka_round_trip(kafka_conf(
        env, **{"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                "sasl.username": "public/default",
                "sasl.password": "token:" + env.token("admin")}))


def test_kafka_refuses_a_wrong_ca_and_an_anonymous_ssl_client(env):
    errors = queue.Queue()
    wrong = Producer(kafka_conf(env, **{"security.protocol": "SSL",
                                        "ssl.ca.location": env.pki.path("ca.pem", other=True),
                                        "error_cb": errors.put, "log_level": 0}))
    with pytest.raises(KafkaException):
        wrong.list_topics(timeout=5)
    wrong.poll(1)
    assert any("SSL" in str(e) or "certificate" in str(e) for e in list(errors.queue)), \
        list(errors.queue)
    # TLS without a certificate or SASL: not authenticated, so nothing.
    anon = Producer(kafka_conf(env, **{"security.protocol": "SSL", "log_level": 0}))
    with pytest.raises(KafkaException):
        anon.list_topics(timeout=5)


def amqp_params(env, credentials, **ctx):
    return pika.ConnectionParameters(
        "127.0.0.1", env.tls_ports["amqps"], credentials=credentials,
        ssl_options=pika.SSLOptions(env.pki.context(**ctx), "localhost"))


def amqp_round_trip(params):
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    q = f"tls-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(q)
    ch.basic_publish("", q, b"over amqps")
    _, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"over amqps"
    conn.close()


def test_amqps_with_a_token(env):
    amqp_round_trip(amqp_params(env, pika.PlainCredentials("admin", env.token("admin"))))


def test_amqps_external_takes_the_certificate_role(env):
    amqp_round_trip(amqp_params(env, pika.credentials.ExternalCredentials(), client="admin"))


def test_amqps_refuses_a_wrong_ca(env):
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
        pika.BlockingConnection(amqp_params(
            env, pika.PlainCredentials("admin", env.token("admin")), other_ca=True))


def mqtt_round_trip(client, port):
    got = queue.Queue()
    subscribed = queue.Queue()
    client.on_message = lambda c, u, m: got.put(m.payload)
    client.on_subscribe = lambda *a: subscribed.put(True)
    connected = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p=None: connected.put(rc)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert not connected.get(timeout=10).is_failure
        topic = f"tls/{uuid.uuid4().hex[:8]}"
        client.subscribe(topic, qos=1)
        subscribed.get(timeout=10)
        client.publish(topic, b"over tls", qos=1).wait_for_publish(10)
        assert got.get(timeout=10) == b"over tls"
    finally:
        client.loop_stop()
        client.disconnect()


def test_mqtt_over_tls_with_a_client_certificate(env):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{uuid.uuid4().hex[:6]}")
    c.tls_set_context(env.pki.context(client="admin"))
    mqtt_round_trip(c, env.tls_ports["mqtts"])


def test_mqtt_over_tls_with_a_token(env):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{uuid.uuid4().hex[:6]}")
    c.tls_set_context(env.pki.context())
    c.username_pw_set("admin", env.token("admin"))
    mqtt_round_trip(c, env.tls_ports["mqtts"])


def test_mqtt_over_wss(env):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"wss-{uuid.uuid4().hex[:6]}",
                    transport="websockets")
    c.ws_set_options(path="/mqtt", headers={"Authorization": f"Bearer {env.token('admin')}"})
    c.tls_set_context(env.pki.context())
    c.username_pw_set("admin", env.token("admin"))
    mqtt_round_trip(c, env.tls_ports["https"])


def test_mqtt_over_wss_with_a_client_certificate(env):
    """The certificate opens the upgrade, and CONNECT needs no password."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"wss-{uuid.uuid4().hex[:6]}",
                    transport="websockets")
    c.ws_set_options(path="/mqtt")
    c.tls_set_context(env.pki.context("admin"))
    mqtt_round_trip(c, env.tls_ports["https"])


def test_mqtt_over_tls_refuses_a_certificate_of_another_ca(env):
    import socket
    ctx = ssl.create_default_context(cafile=env.pki.path("ca.pem"))
    ctx.load_cert_chain(env.pki.path("admin.pem", other=True),
                        env.pki.path("admin.key", other=True))
    # CONNECT, MQTT 3.1.1, clean session, client id "x".
    connect_packet = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01x"
    with socket.create_connection(("127.0.0.1", env.tls_ports["mqtts"]), timeout=10) as raw:
        # TLS 1.3 reports the refused certificate at the first read.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(connect_packet)
                if not s.recv(4):
                    raise ConnectionError("closed without CONNACK")


def test_websocket_api_over_wss(env):
    https = env.tls_ports["https"]
    topic = f"persistent/public/default/wss-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {env.token('admin')}"}
    ctx = env.pki.context()
    with connect(f"wss://127.0.0.1:{https}/ws/v2/consumer/{topic}/sub", ssl=ctx,
                 additional_headers=headers) as consumer:
        with connect(f"wss://127.0.0.1:{https}/ws/v2/producer/{topic}", ssl=ctx,
                     additional_headers=headers) as producer:
            producer.send('{"payload": "d3Nz"}')
            assert '"result":"ok"' in producer.recv(timeout=10).replace(" ", "")
        msg = consumer.recv(timeout=10)
        assert '"payload":"d3Nz"' in msg.replace(" ", "")
    # The client certificate alone is a login too.
    with connect(f"wss://127.0.0.1:{https}/ws/v2/producer/{topic}",
                 ssl=env.pki.context(client="admin")) as producer:
        producer.send('{"payload": "Y2VydA=="}')
        assert '"result":"ok"' in producer.recv(timeout=10).replace(" ", "")


def curl(env, path, *args):
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        *args, f"https://127.0.0.1:{env.tls_ports['https']}{path}"],
                       capture_output=True, text=True)
    return r.returncode, r.stdout


def test_curl_over_https(env):
    ca = ["--cacert", env.pki.path("ca.pem")]
    bearer = ["-H", f"Authorization: Bearer {env.token('admin')}"]
    assert curl(env, "/admin/v2/clusters", *ca, *bearer) == (0, "200")
    assert curl(env, "/admin/v2/clusters", *ca) == (0, "401")
    cert = ["--cert", env.pki.path("admin.pem"), "--key", env.pki.path("admin.key")]
    assert curl(env, "/admin/v2/clusters", *ca, *cert) == (0, "200")
    # curl's "peer certificate cannot be authenticated with given CA".
    code, _ = curl(env, "/admin/v2/clusters", "--cacert", env.pki.path("ca.pem", other=True))
    assert code == 60


def admin_metadata(env, *tls_args, token=True):
    cmd = [BIN, "admin", *tls_args]
    if token:
        cmd += ["--auth-token", env.token("admin")]
    cmd += ["metadata", "--meta", f"127.0.0.1:{env.ports['meta']}", "list", "/admin/"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_internal_planes_speak_tls(env):
    ok = admin_metadata(env, "--meta-tls", "--tls-ca-file", env.pki.path("ca.pem"))
    assert ok.returncode == 0, ok.stderr
    assert "/admin/" in ok.stdout
    # A client certificate whose CN is a superuser needs no token.
    by_cert = admin_metadata(env, "--meta-tls", "--tls-ca-file", env.pki.path("ca.pem"),
                             "--tls-cert-file", env.pki.path("admin.pem"),
                             "--tls-key-file", env.pki.path("admin.key"), token=False)
    assert by_cert.returncode == 0, by_cert.stderr
    env_retry = dict(os.environ, MAGNETAR_LOG="error")
    for args in (["--meta-tls", "--tls-ca-file", env.pki.path("ca.pem", other=True)], []):
        bad = subprocess.run(
            [BIN, "admin", *args, "--auth-token", env.token("admin"), "metadata",
             "--meta", f"127.0.0.1:{env.ports['meta']}", "list", "/admin/"],
            capture_output=True, text=True, timeout=120, env=env_retry)
        assert bad.returncode != 0, (args, bad.stdout)


def served_cn(env):
    ctx = env.pki.context()
    import socket
    with socket.create_connection(("127.0.0.1", env.tls_ports["https"])) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return subject["commonName"]


def test_renewed_certificates_are_served_without_a_restart(env):
    assert served_cn(env) == "broker"
    env.pki.cert("broker-renewed", name="server")
    deadline = time.time() + 10
    while served_cn(env) != "broker-renewed":
        assert time.time() < deadline, "the renewed certificate was not served"
        time.sleep(0.3)
    # And the protocols still work with it.
    req = urllib.request.Request(f"https://127.0.0.1:{env.tls_ports['https']}/admin/v2/clusters",
                                 headers={"Authorization": f"Bearer {env.token('admin')}"})
    with urllib.request.urlopen(req, context=env.pki.context(), timeout=10) as r:
        assert r.status == 200
