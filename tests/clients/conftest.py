"""Shared fixtures: a `magnetar standalone` process on ephemeral loopback
ports, which a test may restart (SIGTERM) or kill (SIGKILL) and start again
on the same ports and data."""

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time

import pytest

BIN = os.environ.get("MAGNETAR_BIN", "magnetar")


# The one port rule of the test kit (tests/kit), shared with the Rust tests
# and the bench scripts.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kit"))
from free_port import free_port  # noqa: E402


class Standalone:
    def __init__(self, data_dir, extra=(), env=None):
        self.data_dir = data_dir
        self.extra = list(extra)
        self.env = dict(env or {})
        self.ports = {k: free_port() for k in ("http", "kafka", "amqp", "mqtt", "meta", "bookie")}
        self.proc = None
        self.log_path = os.path.join(data_dir, "standalone.log")

    @property
    def kafka(self):
        return f"127.0.0.1:{self.ports['kafka']}"

    @property
    def amqp_port(self):
        return self.ports["amqp"]

    @property
    def mqtt_port(self):
        return self.ports["mqtt"]

    @property
    def http(self):
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self, timeout=90):
        log = open(self.log_path, "a")
        env = dict(os.environ)
        env.setdefault("MAGNETAR_LOG", "info,openraft=warn")
        # A disk nearly full of build output must not turn the bookie
        # read-only; the tests of that mode pass their own threshold.
        env.setdefault("MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD", "0.995")
        env.update(self.env)
        self.proc = subprocess.Popen(
            [
                BIN, "standalone",
                "--data-dir", os.path.join(self.data_dir, "data"),
                "--http-listen", f"127.0.0.1:{self.ports['http']}",
                "--kafka-listen", self.kafka,
                "--amqp-listen", f"127.0.0.1:{self.ports['amqp']}",
                "--mqtt-listen", f"127.0.0.1:{self.ports['mqtt']}",
                "--meta-listen", f"127.0.0.1:{self.ports['meta']}",
                "--bookie-listen", f"127.0.0.1:{self.ports['bookie']}",
                "--kafka-group-initial-delay-ms", "300",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if "ready" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"standalone did not start; see {self.log_path}:\n" + self.tail())

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        self.stop(signal.SIGKILL)

    def restart(self, sig=signal.SIGTERM):
        self.stop(sig)
        self.start()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self):
        """The process's resident memory, in MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def open_fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def tail(self, n=40):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(extra=(), env=None):
    """A standalone started in a directory of its own, stopped (and the
    directory removed) afterwards."""
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d, extra=extra, env=env)
        s.start()
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def standalone():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Standalone(d)
        s.start()
        yield s
        s.stop()


class Secured(Standalone):
    """A standalone with token authentication on: tokens signed with an
    HS256 secret key made by `magnetar tokens`, role `admin` a superuser."""

    def __init__(self, data_dir, extra=()):
        self.key = os.path.join(data_dir, "secret.key")
        subprocess.run([BIN, "tokens", "create-secret-key", "--output", self.key], check=True)
        super().__init__(data_dir, extra=[
            "--auth-token-secret-key", f"file://{self.key}",
            "--auth-superuser-roles", "admin",
            *extra,
        ])

    def token(self, role, expiry=None, key=None):
        cmd = [BIN, "tokens", "create", "--secret-key", key or f"file://{self.key}",
               "--subject", role]
        if expiry:
            cmd += ["--expiry-time", expiry]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    def admin(self, method, path, body=None, role="admin", token=None):
        """Calls the HTTP API with `role`'s token (None: no token), or with
        `token` as given; the HTTP status."""
        import json
        import urllib.error
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.http}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token or role is not None:
            req.add_header("Authorization", f"Bearer {token or self.token(role)}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def grant(self, namespace, role, actions):
        status = self.admin("POST", f"/admin/v2/namespaces/{namespace}/permissions/{role}",
                            list(actions))
        assert status == 204, status

    def namespace(self, name):
        status = self.admin("PUT", f"/admin/v2/namespaces/{name}")
        assert status in (200, 204), status


@pytest.fixture(scope="module")
def secured():
    with tempfile.TemporaryDirectory(prefix="magnetar-test-") as d:
        s = Secured(d)
        s.start()
        yield s
        s.stop()


def tls(*args):
    """Runs `magnetar tls ARGS`."""
    subprocess.run([BIN, "tls", *args], check=True, capture_output=True)


class Pki:
    """A CA, a server certificate and client certificates in one directory,
    and a second CA with a client certificate of its own."""

    def __init__(self, d):
        self.d = d
        self.other = os.path.join(d, "other")
        tls("create-ca", "--dir", d)
        tls("create-ca", "--dir", self.other, "--name", "Another CA")
        self.cert("broker", name="server")
        self.cert("admin")
        self.cert("admin", ca_dir=self.other)

    def cert(self, cn, name=None, ca_dir=None):
        ca_dir = ca_dir or self.d
        tls("create-cert", "--ca-cert", os.path.join(ca_dir, "ca.pem"),
            "--ca-key", os.path.join(ca_dir, "ca.key"), "--cn", cn, "--dir", ca_dir,
            *(["--name", name] if name else []))

    def path(self, name, other=False):
        return os.path.join(self.other if other else self.d, name)

    def context(self, client=None, other_ca=False):
        """An ssl context trusting our CA (or the other), with a client
        certificate if `client` names one."""
        ctx = ssl.create_default_context(cafile=self.path("ca.pem", other_ca))
        if client:
            base = self.path(client)
            ctx.load_cert_chain(base + ".pem", base + ".key")
        return ctx
