"""The metadata store and the bookies with authentication on, called by
grpcio with stubs generated from the project's .proto files: every RPC
without a token is UNAUTHENTICATED, with a token of a role that is not a
superuser PERMISSION_DENIED, and with a superuser's token served. The
admin CLI needs a token for the store as well."""

import os
import subprocess
import sys

import grpc
import pytest

from conftest import BIN

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """metadata_pb2(_grpc) and bookie_pb2(_grpc), generated with grpcio-tools."""
    from grpc_tools import protoc
    out = tmp_path_factory.mktemp("stubs")
    for proto_dir, name in (("metadata/proto", "metadata.proto"), ("bookies/proto", "bookie.proto")):
        inc = os.path.join(ROOT, proto_dir)
        rc = protoc.main(["protoc", f"-I{inc}", f"--python_out={out}",
                          f"--grpc_python_out={out}", os.path.join(inc, name)])
        assert rc == 0, name
    sys.path.insert(0, str(out))
    import bookie_pb2
    import bookie_pb2_grpc
    import metadata_pb2
    import metadata_pb2_grpc
    return metadata_pb2, metadata_pb2_grpc, bookie_pb2, bookie_pb2_grpc


def calls(stubs, channel):
    """Every RPC of both planes, with an empty request: (name, thunk)."""
    m, m_grpc, b, b_grpc = stubs
    meta = m_grpc.MetadataStub(channel["meta"])
    raft = m_grpc.RaftStub(channel["meta"])
    bookie = b_grpc.BookieStub(channel["bookie"])
    return [
        ("Get", lambda md: meta.Get(m.GetRequest(key="/admin/tenants/public"), metadata=md, timeout=10)),
        ("Put", lambda md: meta.Put(m.PutRequest(key="/x", value=b"1"), metadata=md, timeout=10)),
        ("Delete", lambda md: meta.Delete(m.DeleteRequest(key="/x"), metadata=md, timeout=10)),
        ("List", lambda md: meta.List(m.ListRequest(prefix="/"), metadata=md, timeout=10)),
        ("Watch", lambda md: next(iter(meta.Watch(m.WatchRequest(prefix="/"), metadata=md,
                                                  timeout=10)))),
        ("GrantSession", lambda md: meta.GrantSession(m.GrantSessionRequest(), metadata=md,
                                                      timeout=10)),
        ("KeepAlive", lambda md: meta.KeepAlive(m.KeepAliveRequest(), metadata=md, timeout=10)),
        ("RevokeSession", lambda md: meta.RevokeSession(m.RevokeSessionRequest(), metadata=md,
                                                        timeout=10)),
        ("Status", lambda md: meta.Status(m.StatusRequest(), metadata=md, timeout=10)),
        ("AppendEntries", lambda md: raft.AppendEntries(m.RaftRequest(), metadata=md, timeout=10)),
        ("Vote", lambda md: raft.Vote(m.RaftRequest(), metadata=md, timeout=10)),
        ("InstallSnapshot", lambda md: raft.InstallSnapshot(m.RaftRequest(), metadata=md,
                                                            timeout=10)),
        ("Add", lambda md: next(iter(bookie.Add(iter([b.AddRequest()]), metadata=md,
                                                timeout=10)))),
        ("Read", lambda md: bookie.Read(b.ReadRequest(), metadata=md, timeout=10)),
        ("ReadLac", lambda md: bookie.ReadLac(b.LedgerRequest(), metadata=md, timeout=10)),
        ("Fence", lambda md: bookie.Fence(b.LedgerRequest(), metadata=md, timeout=10)),
        ("BookieDelete", lambda md: bookie.Delete(b.LedgerRequest(), metadata=md, timeout=10)),
        ("Info", lambda md: bookie.Info(b.InfoRequest(), metadata=md, timeout=10)),
    ]


def code(thunk, md):
    try:
        thunk(md)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_every_rpc_needs_a_superusers_token(secured, stubs):
    channel = {k: grpc.insecure_channel(f"127.0.0.1:{secured.ports[k]}") for k in ("meta", "bookie")}
    bearer = lambda role: [("authorization", f"Bearer {secured.token(role)}")]
    for name, thunk in calls(stubs, channel):
        assert code(thunk, None) == grpc.StatusCode.UNAUTHENTICATED, name
        forged = [("authorization", "Bearer e30.e30.AAAA")]
        assert code(thunk, forged) == grpc.StatusCode.UNAUTHENTICATED, name
        assert code(thunk, bearer("sensor")) == grpc.StatusCode.PERMISSION_DENIED, name
    m, _, b, _ = stubs
    ok = dict(calls(stubs, channel))
    assert code(ok["Status"], bearer("admin")) == grpc.StatusCode.OK
    assert code(ok["List"], bearer("admin")) == grpc.StatusCode.OK
    assert code(ok["Info"], bearer("admin")) == grpc.StatusCode.OK
    # The broker itself, which calls both planes with its own token, still
    # serves.
    assert secured.admin("PUT", "/admin/v2/namespaces/public/planes") in (200, 204)


def test_the_admin_cli_needs_a_token_for_the_store(secured):
    meta = f"127.0.0.1:{secured.ports['meta']}"
    cmd = [BIN, "admin", "metadata", "--meta", meta, "list", "/admin/", "--keys-only"]
    env = {k: v for k, v in os.environ.items() if k != "MAGNETAR_AUTH_TOKEN"}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0
    assert "token" in refused.stderr.lower() or "unauthenticated" in refused.stderr.lower(), \
        refused.stderr
    allowed = subprocess.run(cmd + ["--auth-token", secured.token("admin")],
                             capture_output=True, text=True, timeout=60, env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "/admin/tenants/public" in allowed.stdout


def test_raft_peers_are_known_by_their_identity_not_the_id_they_claim(stubs, tmp_path):
    """Three metadata nodes, each with a token of its own role and
    `--peer-roles`: they form a group, but a raft message that names a
    member while carrying another identity (even a superuser's) is
    PERMISSION_DENIED."""
    import time

    from conftest import free_port
    m, m_grpc, _, _ = stubs
    key = str(tmp_path / "secret.key")
    subprocess.run([BIN, "tokens", "create-secret-key", "--output", key], check=True)

    def token(role):
        return subprocess.run([BIN, "tokens", "create", "--secret-key", f"file://{key}",
                               "--subject", role], check=True, capture_output=True,
                              text=True).stdout.strip()

    addrs = {i: f"127.0.0.1:{free_port()}" for i in (1, 2, 3)}
    peers = ",".join(f"{i}={a}" for i, a in addrs.items())
    roles = ",".join(f"{i}=meta-{i}" for i in addrs)
    procs = []
    try:
        for i, addr in addrs.items():
            log = open(tmp_path / f"meta-{i}.log", "w")
            procs.append(subprocess.Popen(
                [BIN, "meta", "--id", str(i), "--listen", addr, "--http-listen", "127.0.0.1:0",
                 "--data-dir", str(tmp_path / f"meta-{i}"), "--peers", peers,
                 "--peer-roles", roles, "--heartbeat-ms", "100", "--election-min-ms", "500",
                 "--election-max-ms", "1000", "--auth-token-secret-key", f"file://{key}",
                 "--auth-superuser-roles", "admin,meta-1,meta-2,meta-3",
                 "--internal-token", token(f"meta-{i}")],
                stdout=subprocess.DEVNULL, stderr=log))
        endpoints = ",".join(addrs.values())
        admin = [BIN, "admin", "--auth-token", token("admin"), "metadata", "--meta", endpoints]
        deadline = time.time() + 60
        while True:
            put = subprocess.run([*admin, "put", "/raft-identity", "v"], capture_output=True,
                                 text=True, timeout=60)
            if put.returncode == 0:
                break
            assert time.time() < deadline, put.stderr
            time.sleep(1)

        raft = m_grpc.RaftStub(grpc.insecure_channel(addrs[1]))
        as_role = lambda role: [("authorization", f"Bearer {token(role)}")]
        for role in ("admin", "meta-3"):
            with pytest.raises(grpc.RpcError) as e:
                raft.Vote(m.RaftRequest(**{"from": 2}), metadata=as_role(role), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, e.value)
            assert "meta-2" in e.value.details()
        # Node 2's own identity gets past the check (to the payload, which
        # is empty here).
        with pytest.raises(grpc.RpcError) as e:
            raft.Vote(m.RaftRequest(**{"from": 2}), metadata=as_role("meta-2"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)
