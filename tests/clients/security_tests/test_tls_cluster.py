"""A cluster whose every internal hop is TLS and authenticated: three
`magnetar meta` nodes replicating over TLS, a bookie, and two brokers
with `--internal-tls`, each process presenting a certificate from
`magnetar tls` and a superuser's token. A publish to the broker that
does not own the topic is forwarded to the owner's HTTPS listener; the
owner advertises `https://` in lookups. The raft group elects a leader
and commits over TLS, and a node that trusts another CA cannot join
it."""

import base64
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pika
import pytest

from conftest import BIN, Pki, free_port


def spawn(args, log_path, ready, timeout=60, env=None):
    log = open(log_path, "a")
    proc = subprocess.Popen([BIN, *args], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, MAGNETAR_LOG="info,openraft=warn", **(env or {})))
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    with open(log_path) as f:
        raise RuntimeError(f"{args[0]} did not start:\n{f.read()[-3000:]}")


class Cluster:
    def __init__(self, d):
        self.d = d
        self.pki = Pki(d)
        self.key = os.path.join(d, "secret.key")
        subprocess.run([BIN, "tokens", "create-secret-key", "--output", self.key], check=True)
        self.auth = ["--auth-token-secret-key", f"file://{self.key}",
                     "--auth-superuser-roles", "admin"]
        self.tls = ["--internal-tls", "--tls-cert-file", self.pki.path("server.pem"),
                    "--tls-key-file", self.pki.path("server.key"),
                    "--tls-ca-file", self.pki.path("ca.pem")]
        self.meta = {i: f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
        self.procs = []

    @property
    def peers(self):
        return ",".join(f"{i}={a}" for i, a in self.meta.items())

    @property
    def endpoints(self):
        return ",".join(self.meta.values())

    def token(self, role):
        return subprocess.run([BIN, "tokens", "create", "--secret-key", f"file://{self.key}",
                               "--subject", role], check=True, capture_output=True,
                              text=True).stdout.strip()

    def start_meta(self, i, tls=None):
        return spawn(["meta", "--id", str(i), "--listen", self.meta[i], "--http-listen", "127.0.0.1:0",
                      "--data-dir", os.path.join(self.d, f"meta-{i}"), "--peers", self.peers,
                      "--heartbeat-ms", "100", "--election-min-ms", "500",
                      "--election-max-ms", "1000", *self.auth, *(tls or self.tls)],
                     os.path.join(self.d, f"meta-{i}.log"), "listening on")

    def start(self):
        for i in self.meta:
            self.procs.append(self.start_meta(i))
        self.procs.append(spawn(
            ["bookie", "--id", "1", "--listen", f"127.0.0.1:{free_port()}", "--http-listen", "127.0.0.1:0",
             "--data-dir", os.path.join(self.d, "bookie-1"), "--meta", self.endpoints,
             *self.auth, *self.tls], os.path.join(self.d, "bookie-1.log"), "listening on"))
        self.brokers = []
        self.amqp = []
        for b in (1, 2):
            http, https, amqp = free_port(), free_port(), free_port()
            self.amqp.append(amqp)
            self.procs.append(spawn(
                ["broker", "--meta", self.endpoints, "--cluster", "local",
                 "--http-listen", f"127.0.0.1:{http}", "--https-listen", f"127.0.0.1:{https}",
                 "--kafka-listen", "127.0.0.1:0", "--amqp-listen", f"127.0.0.1:{amqp}",
                 "--mqtt-listen", "127.0.0.1:0", "--ensemble", "1", "--write-quorum", "1",
                 "--ack-quorum", "1", *self.auth, *self.tls],
                os.path.join(self.d, f"broker-{b}.log"), "ready", timeout=90))
            self.brokers.append((f"http://127.0.0.1:{http}", f"https://127.0.0.1:{https}"))

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def call(self, method, url, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token('admin')}",
            "Content-Type": "application/json"})
        ctx = self.pki.context() if url.startswith("https") else None
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="magnetar-tls-cluster-") as d:
        c = Cluster(d)
        try:
            c.start()
            yield c
        finally:
            c.stop()


def amqp_channel(cluster, broker):
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", cluster.amqp[broker],
        credentials=pika.PlainCredentials("admin", cluster.token("admin"))))
    return conn, conn.channel()


def test_forwarded_publishes_go_to_the_owners_https_listener(cluster):
    (_, https1), _ = cluster.brokers
    topic = f"tls-fwd-{uuid.uuid4().hex[:8]}"
    # A lookup on broker 1 makes it the owner; it advertises HTTPS.
    owner = cluster.call("GET", f"{https1}/lookup/v2/topic/persistent/public/default/{topic}")
    assert owner["httpUrl"] == https1, owner
    conn1, ch1 = amqp_channel(cluster, 0)
    ch1.queue_declare(topic, durable=True)
    conn1.close()
    # Published with confirms on broker 2, which forwards each batch to
    # broker 1's HTTPS listener: a confirm means broker 1 stored it.
    conn2, ch2 = amqp_channel(cluster, 1)
    ch2.confirm_delivery()
    for i in range(5):
        ch2.basic_publish("", topic, f"m{i}".encode(), mandatory=True)
    conn2.close()
    got = cluster.call("GET", f"{https1}/topics/persistent/public/default/{topic}/messages"
                              "?offset=0")
    payloads = [base64.b64decode(m["payload"]).decode() for m in got["messages"]]
    assert payloads == [f"m{i}" for i in range(5)], got


def test_the_metadata_group_replicates_over_tls(cluster):
    """A put is committed by a majority of the three nodes, which reach
    each other over TLS only."""
    admin = [BIN, "admin", "--auth-token", cluster.token("admin"), *cluster.tls]
    key = f"/tls-test/{uuid.uuid4().hex[:8]}"
    put = subprocess.run([*admin, "metadata", "--meta", cluster.endpoints, "put", key, "v"],
                         capture_output=True, text=True, timeout=60)
    assert put.returncode == 0, put.stderr
    get = subprocess.run([*admin, "metadata", "--meta", cluster.endpoints, "get", key],
                         capture_output=True, text=True, timeout=60)
    assert get.returncode == 0 and get.stdout.strip().endswith("v"), get.stderr


def test_a_node_of_another_ca_cannot_reach_the_group(cluster):
    """A fourth process trusting another CA: its calls to the group fail
    the TLS handshake, whatever token it holds."""
    other = [*cluster.tls]
    other[other.index("--tls-ca-file") + 1] = cluster.pki.path("ca.pem", other=True)
    bad = subprocess.run(
        [BIN, "admin", "--auth-token", cluster.token("admin"), *other, "metadata",
         "--meta", cluster.meta[1], "list", "/"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, MAGNETAR_LOG="error"))
    assert bad.returncode != 0, bad.stdout
