"""Refusals before the upgrade (HTTP statuses with Pulsar's messages),
malformed frames after it (Pulsar's `send-error:N` answers and close
codes), and tokens through the auth hook."""

import json

import pytest
from websockets.sync.client import connect

from ws_tests.conftest import Ws, b64, closed_with, recv, send, unb64


def test_bad_query_params_are_400(ws, tag):
    for params in [{"receiverQueueSize": "many"}, {"subscriptionType": "Sometimes"},
                   {"ackTimeoutMillis": "soon"}, {"subscriptionMode": "Forever"}]:
        status, body = ws.refusal(ws.url("consumer", f"t-{tag}", "s", **params))
        assert status == 400, (params, body)
        assert body.startswith("Invalid query params: "), body
    status, body = ws.refusal(ws.url("reader", f"t-{tag}", messageId="not-an-id"))
    assert status == 400 and body.startswith("Invalid query params: "), body


def test_bad_paths_are_400_or_404(ws, tag):
    assert ws.refusal(ws.url("producer", f"t-{tag}", domain="durable"))[0] == 400
    # A consumer path needs a subscription.
    assert ws.refusal(f"{ws.base}/ws/v2/consumer/persistent/public/default/t-{tag}")[0] == 400
    assert ws.refusal(f"{ws.base}/ws/v2/everything/persistent/public/default/t-{tag}")[0] == 404
    status, body = ws.refusal(f"{ws.base}/ws/v3/consumer/s")
    assert status == 400 and "topics" in body
    status, body = ws.refusal(
        f"{ws.base}/ws/v3/consumer/s?topics=a&topicsPattern=public/default/.*")
    assert status == 400, body


def test_unknown_namespaces_and_topics_are_404(ws, tag):
    status, body = ws.refusal(ws.url("producer", f"t-{tag}", ns="public/nowhere"))
    assert status == 404, body
    status, body = ws.refusal(ws.url("consumer", f"t-{tag}", "s", ns="nobody/default"))
    assert status == 404, body
    status, body = ws.refusal(ws.url("reader", f"t-{tag}", ns="public/nowhere"))
    assert status == 404, body


def test_producer_answers_malformed_frames_with_send_errors(ws, tag):
    with ws.producer(f"t-{tag}") as p:
        p.send("{not json")
        a = json.loads(p.recv(timeout=10))
        assert a["result"] == "send-error:3" and "context" not in a
        p.send(json.dumps({"payload": "%%% not base64", "context": "c1"}))
        a = json.loads(p.recv(timeout=10))
        assert a["result"] == "send-error:7" and a["context"] == "c1"
        assert "Invalid Base64" in a["errorMsg"]
        p.send(json.dumps({"context": "c2"}))
        a = json.loads(p.recv(timeout=10))
        assert a["result"] == "send-error:7" and a["context"] == "c2"
        p.send(json.dumps({"payload": b64("x"), "eventTime": "tuesday", "context": "c3"}))
        assert json.loads(p.recv(timeout=10))["result"] == "send-error:7"
        p.send(b"\xff\xfe binary junk")
        assert json.loads(p.recv(timeout=10))["result"] == "send-error:3"
        p.send("[1, 2, 3]")
        assert json.loads(p.recv(timeout=10))["result"] == "send-error:3"
        # The connection still works.
        assert send(p, b"fine", context="c4")["result"] == "ok"


def test_consumer_closes_on_frames_that_are_not_json(ws, tag):
    with ws.consumer(f"t-{tag}", "s") as c:
        c.send("{oops")
        code, reason = closed_with(c)
        assert code == 4003, (code, reason)
        assert reason.startswith("Failed to de-serialize from JSON")


def test_consumer_closes_on_a_message_id_that_is_not_one(ws, tag):
    for bad in ["!!!", b64(b"\x08"), ""]:
        with ws.consumer(f"t-{tag}", "s") as c:
            c.send(json.dumps({"messageId": bad}))
            code, _ = closed_with(c)
            assert code == 4003, bad
    with ws.consumer(f"t-{tag}", "s") as c:
        c.send(json.dumps({"type": "permit"}))
        assert closed_with(c)[0] == 4003


def test_acks_of_other_topics_are_ignored(ws, tag):
    with ws.producer(f"other-{tag}") as p:
        foreign = send(p, b"x")["messageId"]
    with ws.consumer(f"t-{tag}", "s") as c, ws.producer(f"t-{tag}") as p:
        c.send(json.dumps({"messageId": foreign}))
        send(p, b"mine")
        assert unb64(recv(c)["payload"]) == b"mine"


def test_frames_over_the_size_limit_close_the_socket(ws, tag):
    with ws.producer(f"t-{tag}") as p:
        p.send(json.dumps({"payload": "A" * (9 << 20)}))
        code, _ = closed_with(p)
        assert code == 1009


@pytest.fixture(scope="module")
def secure_ws(secured):
    secured.namespace("public/ws")
    secured.grant("public/ws", "reader", ["consume"])
    secured.grant("public/ws", "writer", ["produce"])
    return secured, Ws(secured.http)


def test_tokens_pass_through_the_auth_hook(secure_ws, tag):
    s, ws = secure_ws
    ns = "public/ws"
    # No token, a bad token: 401.
    status, body = ws.refusal(ws.url("producer", f"t-{tag}", ns=ns))
    assert status == 401, body
    status, _ = ws.refusal(ws.url("producer", f"t-{tag}", ns=ns, token="not.a.jwt"))
    assert status == 401
    # A role without the grant: 403.
    status, body = ws.refusal(ws.url("producer", f"t-{tag}", ns=ns, token=s.token("reader")))
    assert status == 403, body
    status, _ = ws.refusal(ws.url("consumer", f"t-{tag}", "s", ns=ns, token=s.token("writer")))
    assert status == 403
    # The token by query parameter and by Authorization header.
    c = connect(ws.url("consumer", f"t-{tag}", "s", ns=ns),
                additional_headers={"Authorization": f"Bearer {s.token('reader')}"},
                open_timeout=10)
    with c, connect(ws.url("producer", f"t-{tag}", ns=ns, token=s.token("writer")),
                    open_timeout=10) as p:
        assert send(p, b"authorized")["result"] == "ok"
        assert unb64(recv(c)["payload"]) == b"authorized"
