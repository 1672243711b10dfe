"""Regions for the geo-replication tests: standalones on loopback, each
its own cluster with its own metadata store, registered with one another
by their service URLs (directly, or through a fault proxy), with a tenant
`geo` that allows them all and a namespace `geo/ns` replicated between
them."""

import contextlib
import json
import tempfile
import time

from conftest import Standalone
from interop_tests.test_routes import call

NS = "geo/ns"


def ok(resp):
    status, body = resp
    assert status in (200, 204), (status, body)
    return body


def register(region, name, url):
    """Registers cluster `name` at `url` with `region` (created, or moved)."""
    status, _ = call(region, "GET", f"/admin/v2/clusters/{name}")
    method = "POST" if status == 200 else "PUT"
    ok(call(region, method, f"/admin/v2/clusters/{name}", {"serviceUrl": url}))


@contextlib.contextmanager
def regions(names, extra=(), urls=None, replicate=None, kafka_ns=NS):
    """Standalones named `names`, each knowing the others (at `urls[a][b]`,
    the URL `a` reaches `b` by, when given), with `geo/ns` replicated
    between `replicate` (all of them by default)."""
    with contextlib.ExitStack() as stack:
        out = {}
        for n in names:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"magnetar-geo-{n}-"))
            s = Standalone(d, extra=["--cluster", n, "--kafka-namespace", kafka_ns,
                                     "--geo-rescan-ms", "1000", "--geo-backoff-max-ms", "2000",
                                     *extra])
            s.start()
            stack.callback(s.stop)
            s.name = n
            out[n] = s
        connect(out, urls)
        for s in out.values():
            ok(call(s, "PUT", "/admin/v2/tenants/geo", {"allowedClusters": list(names)}))
            ok(call(s, "PUT", f"/admin/v2/namespaces/{NS}", {}))
            if s.name in (replicate or names):
                ok(call(s, "POST", f"/admin/v2/namespaces/{NS}/replication",
                        list(replicate or names)))
        yield out


def replicate_default(regions_):
    """Replicates `public/default`, where AMQP and MQTT clients land,
    between all of `regions_`."""
    names = [s.name for s in regions_]
    for s in regions_:
        ok(call(s, "POST", "/admin/v2/tenants/public", {"allowedClusters": names}))
        ok(call(s, "POST", "/admin/v2/namespaces/public/default/replication", names))


def connect(out, urls=None):
    for a in out.values():
        for b in out.values():
            if a is not b:
                url = (urls or {}).get(a.name, {}).get(b.name, b.http)
                register(a, b.name, url)


def partitioned(regions_, topic, n):
    for s in regions_:
        ok(call(s, "PUT", f"/admin/v2/persistent/{NS}/{topic}/partitions", n))


def stats(s, topic):
    status, body = call(s, "GET", f"/admin/v2/persistent/{NS}/{topic}/partitioned-stats")
    assert status == 200, body
    return json.loads(body)


def replication(s, topic, remote):
    return stats(s, topic).get("replication", {}).get(remote, {})


def wait_for(what, predicate, timeout=60, every=0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def metric(s, name, labels=()):
    """The sum of a series of `/metrics` over the samples whose labels
    include `labels`."""
    import urllib.request
    with urllib.request.urlopen(f"{s.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series = head.split("{", 1)[0]
        if series != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels):
            total += float(value)
    return total
