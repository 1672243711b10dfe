"""The link between regions with authentication and TLS on: each region
takes tokens of its own signing only, and east reaches west's HTTPS
listener with west's CA. A wrong token leaves the replicator
`unauthorized` with its backlog held; an operator's `clusters update`
with the right one lets it drain, nothing lost or doubled."""

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from conftest import Pki, Secured, free_port
from geo_tests.regions import NS, wait_for


def api(s, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{s.http}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {s.token('admin')}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ok(resp):
    assert resp[0] in (200, 204), resp
    return resp[1]


def kafka(s):
    return {"bootstrap.servers": s.kafka, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": NS,
            "sasl.password": "token:" + s.token("admin")}


def west_of_east(s):
    status, body = api(s, "GET", f"/admin/v2/persistent/{NS}/secure/partitioned-stats")
    return json.loads(body).get("replication", {}).get("west", {}) if status == 200 else {}


def test_tokens_and_tls_between_regions():
    with tempfile.TemporaryDirectory(prefix="magnetar-geo-auth-") as d:
        pki = Pki(d)
        regions = {}
        try:
            for name in ("east", "west"):
                sub = os.path.join(d, name)
                os.makedirs(sub)
                https = free_port()
                s = Secured(sub, extra=[
                    "--cluster", name, "--kafka-namespace", NS, "--geo-rescan-ms", "1000",
                    "--geo-backoff-max-ms", "1000",
                    "--https-listen", f"127.0.0.1:{https}",
                    "--tls-cert-file", pki.path("server.pem"),
                    "--tls-key-file", pki.path("server.key"),
                    "--tls-ca-file", pki.path("ca.pem"),
                ])
                s.start()
                s.https = f"https://127.0.0.1:{https}"
                regions[name] = s
            east, west = regions["east"], regions["west"]
            # Unauthenticated, the replication service refuses like the
            # admin API.
            req = urllib.request.Request(f"{west.http}/magnetar.geo.v1.Replication/Handshake",
                                         data=b"", method="POST")
            req.add_header("Content-Type", "application/grpc")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status != 200 or r.headers.get("grpc-status") not in (None, "0")
            except urllib.error.HTTPError:
                pass
            link = {"serviceUrl": west.http, "serviceUrlTls": west.https,
                    "brokerClientTlsEnabled": True,
                    "brokerClientTrustCertsFilePath": pki.path("ca.pem"),
                    "authenticationPlugin": "token",
                    "authenticationParameters": "token:" + east.token("admin")}
            ok(api(east, "PUT", "/admin/v2/clusters/west", link))
            ok(api(west, "PUT", "/admin/v2/clusters/east", {"serviceUrl": east.https}))
            for s in (east, west):
                ok(api(s, "PUT", "/admin/v2/tenants/geo", {"allowedClusters": ["east", "west"]}))
                ok(api(s, "PUT", f"/admin/v2/namespaces/{NS}", {}))
                ok(api(s, "POST", f"/admin/v2/namespaces/{NS}/replication", ["east", "west"]))
            ok(api(east, "PUT", f"/admin/v2/persistent/{NS}/secure/partitions", 2))
            p = Producer(kafka(east))
            for i in range(2000):
                p.produce("secure", key=str(i).encode(), value=f"m-{i}".encode())
            assert p.flush(30) == 0
            # East's token is no good in west.
            wait_for("refused", lambda: west_of_east(east).get("state") == "unauthorized", 30)
            assert west_of_east(east)["replicationBacklog"] == 2000
            link["authenticationParameters"] = "token:" + west.token("admin")
            ok(api(east, "POST", "/admin/v2/clusters/west", link))
            wait_for("drained", lambda: west_of_east(east).get("replicationBacklog") == 0
                     and west_of_east(east).get("state") == "running", 60)
            c = Consumer({**kafka(west), "group.id": "g", "enable.auto.commit": False})
            c.assign([TopicPartition("secure", i, OFFSET_BEGINNING) for i in range(2)])
            got = Counter()
            deadline = time.time() + 30
            while sum(got.values()) < 2000 and time.time() < deadline:
                for m in c.consume(500, 0.5):
                    if m.error() is None:
                        got[m.value()] += 1
            c.close()
            assert len(got) == 2000 and set(got.values()) == {1}
            # Over TLS: the stream goes to west's HTTPS listener.
            stats = json.loads(ok(api(east, "GET", f"/admin/v2/persistent/{NS}/secure/partitioned-stats")))
            for part in stats["partitions"].values():
                assert part["replication"]["west"]["outboundConnection"] == west.https
        finally:
            for s in regions.values():
                s.stop()
