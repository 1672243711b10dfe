"""The cluster registry and namespace replication policies, in Pulsar's
shapes: a cluster carries how to reach and log in to it (its secret never
read back), a namespace replicates only to registered clusters its tenant
allows, always including this one, and a cluster stays registered while a
namespace replicates to it."""

import json
import subprocess

import pytest

from conftest import BIN, running
from interop_tests.test_routes import call


@pytest.fixture(scope="module")
def east():
    with running(extra=["--cluster", "east"]) as s:
        yield s


def admin(s, *args):
    return subprocess.run([BIN, "admin", "--url", s.http, *args],
                          capture_output=True, text=True, timeout=30)


def test_a_cluster_keeps_its_credentials_out_of_reads(east):
    status, body = call(east, "PUT", "/admin/v2/clusters/west", {
        "serviceUrl": "http://127.0.0.1:1",
        "authenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
        "authenticationParameters": "token:not-for-your-eyes",
    })
    assert status == 204, body
    status, body = call(east, "GET", "/admin/v2/clusters/west")
    west = json.loads(body)
    assert west["serviceUrl"] == "http://127.0.0.1:1"
    assert west["authenticationParameters"] == "******"
    assert "not-for-your-eyes" not in body
    assert west["geoId"] > json.loads(call(east, "GET", "/admin/v2/clusters/east")[1])["geoId"]
    # The record sent back as read keeps the secret: the update only moves
    # the URL.
    west["serviceUrl"] = "http://127.0.0.1:2"
    assert call(east, "POST", "/admin/v2/clusters/west", west)[0] == 204
    again = json.loads(call(east, "GET", "/admin/v2/clusters/west")[1])
    assert again["serviceUrl"] == "http://127.0.0.1:2" and again["geoId"] == west["geoId"]
    assert sorted(json.loads(call(east, "GET", "/admin/v2/clusters")[1])) == ["east", "west"]
    # Refused with 400: a plugin we do not speak, a URL without its scheme.
    for bad in ({"authenticationPlugin": "kerberos"}, {"serviceUrl": "127.0.0.1:8080"}):
        assert call(east, "PUT", "/admin/v2/clusters/bad", bad)[0] == 400, bad


def test_the_cli_registers_and_updates_a_cluster_as_pulsar_admin_does(east):
    done = admin(east, "clusters", "create", "central", "--service-url", "http://127.0.0.1:3",
                 "--auth-plugin", "token", "--auth-parameters", "file:///etc/magnetar/central.jwt")
    assert done.returncode == 0, done.stderr
    done = admin(east, "clusters", "update", "central", "--service-url", "http://127.0.0.1:4",
                 "--service-url-tls", "https://127.0.0.1:5", "--tls-enable",
                 "--auth-plugin", "token", "--auth-parameters", "******")
    assert done.returncode == 0, done.stderr
    got = json.loads(admin(east, "clusters", "get", "central").stdout)
    assert got["serviceUrl"] == "http://127.0.0.1:4" and got["brokerClientTlsEnabled"] is True
    assert got["authenticationParameters"] == "******"
    done = admin(east, "clusters", "update", "central", "--tls-enable")
    assert done.returncode != 0 and "serviceUrlTls" in done.stderr


def test_replication_clusters_are_registered_allowed_and_include_this_one(east):
    ns = "public/geo-policy"
    assert call(east, "PUT", f"/admin/v2/namespaces/{ns}")[0] == 204
    assert json.loads(call(east, "GET", f"/admin/v2/namespaces/{ns}/replication")[1]) == ["east"]
    # Unknown: 412, as Pulsar's "Invalid cluster id".
    done = admin(east, "namespaces", "set-clusters", ns, "--clusters", "east,mars")
    assert done.returncode != 0 and "mars" in done.stderr
    assert call(east, "POST", f"/admin/v2/namespaces/{ns}/replication", ["east", "mars"])[0] == 412
    # Registered, but not allowed to the tenant: 403.
    assert call(east, "POST", f"/admin/v2/namespaces/{ns}/replication", ["east", "west"])[0] == 403
    # Without this cluster: 412.
    assert call(east, "POST", f"/admin/v2/namespaces/{ns}/replication", ["west"])[0] == 412
    status, body = call(east, "POST", "/admin/v2/tenants/public",
                        {"allowedClusters": ["east", "west"]})
    assert status == 204, body
    done = admin(east, "namespaces", "set-clusters", ns, "--clusters", "east,west")
    assert done.returncode == 0, done.stderr
    got = admin(east, "namespaces", "get-clusters", ns)
    assert json.loads(got.stdout) == ["east", "west"]
    # A namespace replicating to a cluster keeps it registered.
    assert call(east, "POST", "/admin/v2/tenants/public", {"allowedClusters": ["east"]})[0] == 204
    status, body = call(east, "DELETE", "/admin/v2/clusters/west")
    assert status == 409 and ns in body, body
    assert call(east, "DELETE", f"/admin/v2/namespaces/{ns}/replication")[0] == 204
    assert json.loads(call(east, "GET", f"/admin/v2/namespaces/{ns}/replication")[1]) == ["east"]
    assert call(east, "DELETE", "/admin/v2/clusters/west")[0] == 204


def test_a_topic_overrides_its_namespaces_replication(east):
    ns = "public/geo-topics"
    assert call(east, "PUT", f"/admin/v2/namespaces/{ns}")[0] == 204
    assert call(east, "PUT", "/admin/v2/clusters/north", {"serviceUrl": "http://127.0.0.1:6"})[0] == 204
    assert call(east, "POST", "/admin/v2/tenants/public",
                {"allowedClusters": ["east", "north"]})[0] == 204
    topic = f"persistent://{ns}/orders"
    path = f"/admin/v2/persistent/{ns}/orders"
    # Nothing of its own yet: it takes the namespace's.
    assert call(east, "GET", f"{path}/replication")[0] == 204
    done = admin(east, "topics", "set-replication-clusters", topic, "--clusters", "east,north")
    assert done.returncode == 0, done.stderr
    got = admin(east, "topics", "get-replication-clusters", topic)
    assert json.loads(got.stdout) == ["east", "north"]
    # The same checks as a namespace's, and persistent topics only.
    assert call(east, "POST", f"{path}/replication", ["east", "mars"])[0] == 412
    assert call(east, "POST", f"{path}/replication", ["north"])[0] == 412
    assert call(east, "POST", f"/admin/v2/non-persistent/{ns}/orders/replication", ["east"])[0] == 400
    # Dispatch rates, for the namespace and over it for the topic.
    done = admin(east, "namespaces", "set-replicator-dispatch-rate", ns,
                 "--msg-dispatch-rate", "1000", "--byte-dispatch-rate", "1048576")
    assert done.returncode == 0, done.stderr
    assert json.loads(call(east, "GET", f"/admin/v2/namespaces/{ns}/replicatorDispatchRate")[1]) == {
        "dispatchThrottlingRateInMsg": 1000, "dispatchThrottlingRateInByte": 1048576,
        "ratePeriodInSecond": 1}
    done = admin(east, "topics", "set-replicator-dispatch-rate", topic, "--msg-dispatch-rate", "10")
    assert done.returncode == 0, done.stderr
    rate = json.loads(admin(east, "topics", "get-replicator-dispatch-rate", topic).stdout)
    assert rate["dispatchThrottlingRateInMsg"] == 10 and rate["dispatchThrottlingRateInByte"] == -1
    assert call(east, "POST", f"{path}/replicatorDispatchRate",
                {"dispatchThrottlingRateInMsg": -5})[0] == 400
    # A topic replicating to a cluster keeps it registered, as a
    # namespace does.
    assert call(east, "POST", "/admin/v2/tenants/public", {"allowedClusters": ["east"]})[0] == 204
    status, body = call(east, "DELETE", "/admin/v2/clusters/north")
    assert status == 409 and "orders" in body, body
    # The topic's policies hold both, and removing one keeps the other.
    assert admin(east, "topics", "remove-replication-clusters", topic).returncode == 0
    assert call(east, "GET", f"{path}/replication")[0] == 204
    assert call(east, "GET", f"{path}/replicatorDispatchRate")[0] == 200
    assert call(east, "DELETE", "/admin/v2/clusters/north")[0] == 204
