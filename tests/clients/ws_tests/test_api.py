"""Pulsar's WebSocket API, endpoint by endpoint and option by option, with
the `websockets` client and Pulsar's JSON frames."""

import base64
import json
import re
import time
import urllib.request

from ws_tests.conftest import (QUIET, ack, b64, closed_with, nothing, publish, recv, recv_all, send,
                      unb64, uid)


def admin(standalone, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(standalone.http + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def message_id_fields(mid):
    """(ledgerId, entryId, partition) of a base64 MessageIdData, read by
    hand: varint fields 1, 2 and 3 of the protobuf."""
    raw = base64.b64decode(mid)
    out, i = {}, 0
    while i < len(raw):
        key = raw[i]
        i += 1
        shift, value = 0, 0
        while True:
            b = raw[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        out[key >> 3] = value
    return out.get(1), out.get(2), out.get(3)


def test_produce_and_consume_with_every_field(ws, tag):
    with ws.consumer(f"t-{tag}", "sub") as c, ws.producer(f"t-{tag}") as p:
        a = send(p, b"\x00\x01hello\xff", key="k1", properties={"a": "1", "b": "two"},
                 context="ctx-1", eventTime="2020-11-18T09:58:23.355Z")
        assert a["result"] == "ok" and a["context"] == "ctx-1"
        assert a["errorCode"] == 0 and a["schemaVersion"] == 0
        m = recv(c)
        assert unb64(m["payload"]) == b"\x00\x01hello\xff"
        assert m["key"] == "k1"
        assert m["properties"] == {"a": "1", "b": "two"}
        assert m["messageId"] == a["messageId"]
        assert m["redeliveryCount"] == 0
        assert m["eventTime"] == "2020-11-18T09:58:23.355Z"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z", m["publishTime"])
        ledger, entry, _ = message_id_fields(m["messageId"])
        assert ledger is not None and entry == 0
        ack(c, m)
        b = send(p, b"plain")
        m = recv(c)
        assert "key" not in m and m["properties"] == {}
        assert message_id_fields(m["messageId"])[1] == 1
        assert b["messageId"] == m["messageId"]


def test_acks_persist_and_unacked_messages_come_back(ws, tag):
    with ws.producer(f"t-{tag}") as p:
        with ws.consumer(f"t-{tag}", "s") as c:
            publish(p, [b"1", b"2", b"3"])
            ms = recv_all(c, 3)
            ack(c, ms[0])
            ack(c, ms[2])
            time.sleep(0.3)
        with ws.consumer(f"t-{tag}", "s") as c:
            m = recv(c)
            assert unb64(m["payload"]) == b"2"
            nothing(c)


def test_exclusive_refuses_a_second_consumer_with_409(ws, tag):
    with ws.consumer(f"t-{tag}", "s"):
        status, body = ws.refusal(ws.url("consumer", f"t-{tag}", "s"))
        assert status == 409, body
        assert "Failed to create producer/consumer" in body


def test_shared_spreads_messages(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", subscriptionType="Shared", receiverQueueSize=1) as c1, \
            ws.consumer(t, "s", subscriptionType="Shared", receiverQueueSize=1) as c2, \
            ws.producer(t) as p:
        publish(p, [str(i).encode() for i in range(20)])
        got = {1: [], 2: []}
        deadline = time.time() + 15
        while len(got[1]) + len(got[2]) < 20 and time.time() < deadline:
            for n, c in ((1, c1), (2, c2)):
                try:
                    m = recv(c, timeout=0.2)
                except TimeoutError:
                    continue
                got[n].append(unb64(m["payload"]))
                ack(c, m)
        assert sorted(got[1] + got[2], key=int) == [str(i).encode() for i in range(20)]
        assert got[1] and got[2], got


def test_failover_hands_over_when_the_active_consumer_leaves(ws, tag):
    t = f"t-{tag}"
    c1 = ws.consumer(t, "s", subscriptionType="Failover", consumerName="a")
    c2 = ws.consumer(t, "s", subscriptionType="Failover", consumerName="b")
    with ws.producer(t) as p:
        publish(p, [b"x1", b"x2"])
        first = [c for c in (c1, c2) if _has_message(c)]
        assert len(first) == 1
        active = first[0]
        other = c2 if active is c1 else c1
        active.close()
        publish(p, [b"x3"])
        payloads = [unb64(recv(other)["payload"]) for _ in range(3)]
        # The unacked ones come again, then the new one.
        assert payloads[-1] == b"x3" and set(payloads) == {b"x1", b"x2", b"x3"}
    other.close()


def _has_message(c):
    try:
        recv(c, timeout=2)
        return True
    except TimeoutError:
        return False


def test_key_shared_keeps_a_key_on_one_consumer(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", subscriptionType="Key_Shared") as c1, \
            ws.consumer(t, "s", subscriptionType="Key_Shared") as c2, ws.producer(t) as p:
        for i in range(40):
            send(p, str(i).encode(), key=f"key-{i % 4}")
        seen = {}
        count = 0
        deadline = time.time() + 15
        while count < 40 and time.time() < deadline:
            for n, c in ((1, c1), (2, c2)):
                try:
                    m = recv(c, timeout=0.2)
                except TimeoutError:
                    continue
                count += 1
                seen.setdefault(m["key"], set()).add(n)
                ack(c, m)
        assert count == 40
        assert all(len(v) == 1 for v in seen.values()), seen


def test_receiver_queue_size_bounds_unacked_messages(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", receiverQueueSize=5) as c, ws.producer(t) as p:
        publish(p, [str(i).encode() for i in range(20)])
        first = recv_all(c, 5)
        nothing(c)  # five out, none acked: nothing more
        ack(c, first[0])
        m = recv(c)
        assert unb64(m["payload"]) == b"5"
        nothing(c)
        for x in first[1:] + [m]:
            ack(c, x)
        rest = recv_all(c, 5)
        assert [unb64(x["payload"]) for x in rest] == [str(i).encode() for i in range(6, 11)]


def test_pull_mode_sends_only_against_permits(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", pullMode=True) as c, ws.producer(t) as p:
        publish(p, [str(i).encode() for i in range(10)])
        nothing(c)
        c.send(json.dumps({"type": "permit", "permitMessages": 3}))
        ms = recv_all(c, 3)
        assert [unb64(m["payload"]) for m in ms] == [b"0", b"1", b"2"]
        for m in ms:
            ack(c, m)
        nothing(c)  # acks grant nothing in pull mode
        c.send(json.dumps({"type": "permit", "permitMessages": 2}))
        assert len(recv_all(c, 2)) == 2
        nothing(c)


def test_ack_timeout_redelivers(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", ackTimeoutMillis=1000) as c, ws.producer(t) as p:
        send(p, b"again")
        m1 = recv(c)
        assert m1["redeliveryCount"] == 0
        m2 = recv(c, timeout=10)
        assert m2["messageId"] == m1["messageId"]
        assert m2["redeliveryCount"] == 1
        ack(c, m2)
        nothing(c, 1.5)


def test_negative_ack_redelivers_after_the_delay(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(t, "s", negativeAckRedeliveryDelay=300) as c, ws.producer(t) as p:
        send(p, b"nope")
        m = recv(c)
        c.send(json.dumps({"type": "negativeAcknowledge", "messageId": m["messageId"]}))
        again = recv(c)
        assert again["messageId"] == m["messageId"] and again["redeliveryCount"] == 1


def test_dead_letter_after_max_redeliveries(ws, tag):
    t = f"t-{tag}"
    dlq = f"{t}-s-DLQ"
    with ws.consumer(dlq, "dlq", subscriptionInitialPosition="Earliest") as d, \
            ws.consumer(t, "s", maxRedeliverCount=2, negativeAckRedeliveryDelay=50) as c, \
            ws.producer(t) as p:
        send(p, b"poison", key="k", properties={"p": "1"})
        send(p, b"fine")
        counts = []
        while True:
            m = recv(c)
            if unb64(m["payload"]) == b"fine":
                ack(c, m)
                continue
            counts.append(m["redeliveryCount"])
            c.send(json.dumps({"type": "negativeAcknowledge", "messageId": m["messageId"]}))
            if len(counts) == 3:
                break
        assert counts == [0, 1, 2]
        dead = recv(d)
        assert unb64(dead["payload"]) == b"poison"
        assert dead["key"] == "k" and dead["properties"].get("p") == "1"
        nothing(c)


def test_dead_letter_topic_can_be_named(ws, tag):
    t = f"t-{tag}"
    with ws.consumer(f"graveyard-{tag}", "g", subscriptionInitialPosition="Earliest") as d, \
            ws.consumer(t, "s", maxRedeliverCount=1, deadLetterTopic=f"graveyard-{tag}",
                        negativeAckRedeliveryDelay=50) as c, ws.producer(t) as p:
        send(p, b"bad")
        for _ in range(2):
            m = recv(c)
            c.send(json.dumps({"type": "negativeAcknowledge", "messageId": m["messageId"]}))
        assert unb64(recv(d)["payload"]) == b"bad"


def test_reader_from_earliest_latest_and_a_saved_id(ws, tag):
    t = f"t-{tag}"
    with ws.producer(t) as p:
        acks = publish(p, [b"a", b"b", b"c", b"d"])
        with ws.reader(t, messageId="earliest") as r:
            ms = recv_all(r, 4)
            assert [unb64(m["payload"]) for m in ms] == [b"a", b"b", b"c", b"d"]
            assert [m["messageId"] for m in ms] == [a["messageId"] for a in acks]
        # From a saved id: the messages after it.
        with ws.reader(t, messageId=acks[1]["messageId"]) as r:
            assert [unb64(m["payload"]) for m in recv_all(r, 2)] == [b"c", b"d"]
            nothing(r)
        with ws.reader(t) as r:  # latest
            nothing(r)
            send(p, b"e")
            assert unb64(recv(r)["payload"]) == b"e"


def test_reader_is_paced_by_acks(ws, tag):
    t = f"t-{tag}"
    with ws.producer(t) as p, ws.reader(t, messageId="earliest", receiverQueueSize=3) as r:
        publish(p, [str(i).encode() for i in range(6)])
        ms = recv_all(r, 3)
        nothing(r)
        r.send(json.dumps({"messageId": ms[0]["messageId"]}))
        assert unb64(recv(r)["payload"]) == b"3"


def test_readers_leave_no_subscription(standalone, ws, tag):
    t = f"t-{tag}"
    with ws.producer(t) as p:
        send(p, b"x")
    with ws.reader(t, messageId="earliest") as r:
        recv(r)
    time.sleep(0.3)
    assert admin(standalone, "GET", f"/admin/v2/persistent/public/default/{t}/subscriptions") == []


def test_v3_consumer_on_a_list_of_topics(ws, tag):
    a, b = f"a-{tag}", f"b-{tag}"
    with ws.v3("multi", topics=f"{a},persistent://public/default/{b}") as c, \
            ws.producer(a) as pa, ws.producer(b) as pb:
        publish(pa, [b"a1", b"a2"])
        publish(pb, [b"b1"])
        ms = recv_all(c, 3)
        assert sorted(unb64(m["payload"]) for m in ms) == [b"a1", b"a2", b"b1"]
        for m in ms:
            ack(c, m)
        time.sleep(0.3)
    # Every ack found its topic: nothing comes again.
    with ws.v3("multi", topics=f"{a},{b}") as c:
        nothing(c)


def test_v3_consumer_on_a_pattern_finds_new_topics(standalone, ws, tag):
    with ws.producer(f"pat-{tag}-1") as p:
        send(p, b"before")  # creates the topic; the consumer starts at latest
    with ws.v3("pat", topicsPattern=f"persistent://public/default/pat-{tag}-.*") as c, \
            ws.producer(f"pat-{tag}-1") as p1, ws.producer(f"other-{tag}") as other:
        send(p1, b"one")
        send(other, b"not matched")
        assert unb64(recv(c)["payload"]) == b"one"
        # A topic made after the consumer joins within the discovery period.
        with ws.producer(f"pat-{tag}-2") as p2:
            send(p2, b"two-early")
            deadline = time.time() + 20
            got = []
            while time.time() < deadline and b"two-late" not in got:
                send(p2, b"two-late")
                try:
                    got.append(unb64(recv(c, timeout=1)["payload"]))
                except TimeoutError:
                    pass
            assert b"two-late" in got


def test_is_end_of_topic(ws, tag):
    with ws.consumer(f"t-{tag}", "s") as c:
        c.send(json.dumps({"type": "isEndOfTopic"}))
        assert recv(c) == {"endOfTopic": False}
    with ws.reader(f"t-{tag}") as r:
        r.send(json.dumps({"type": "isEndOfTopic"}))
        assert recv(r) == {"endOfTopic": False}


def test_unsubscribe_removes_the_subscription(standalone, ws, tag):
    t = f"t-{tag}"
    subs = f"/admin/v2/persistent/public/default/{t}/subscriptions"
    with ws.consumer(t, "gone") as c:
        assert admin(standalone, "GET", subs) == ["gone"]
        c.send(json.dumps({"type": "unsubscribe"}))
        code, _ = closed_with(c)
        assert code == 1000
    assert admin(standalone, "GET", subs) == []


def test_non_persistent_topics(ws, tag):
    t = f"np-{tag}"
    with ws.consumer(t, "s", domain="non-persistent") as c, \
            ws.producer(t, domain="non-persistent") as p:
        a = send(p, b"fleeting")
        assert a["result"] == "ok"
        assert unb64(recv(c)["payload"]) == b"fleeting"


def test_partitioned_topics(standalone, ws, tag):
    t = f"parts-{tag}"
    admin(standalone, "PUT", f"/admin/v2/persistent/public/default/{t}/partitions", 3)
    with ws.consumer(t, "s") as c, ws.producer(t) as p:
        acks = publish(p, [str(i).encode() for i in range(12)])
        parts = {message_id_fields(a["messageId"])[2] for a in acks}
        assert parts == {0, 1, 2}, parts
        # Keyed messages stay on one partition, in order.
        keyed = [send(p, f"k{i}".encode(), key="same") for i in range(5)]
        assert len({message_id_fields(a["messageId"])[2] for a in keyed}) == 1
        ms = recv_all(c, 17)
        assert sorted(unb64(m["payload"]) for m in ms) == sorted(
            [str(i).encode() for i in range(12)] + [f"k{i}".encode() for i in range(5)])
        same = [unb64(m["payload"]) for m in ms if m.get("key") == "same"]
        assert same == [f"k{i}".encode() for i in range(5)]
        for m in ms:
            ack(c, m)
    with ws.reader(t, messageId="earliest") as r:
        assert len(recv_all(r, 17)) == 17


def test_producer_acks_keep_order_under_pipelining(ws, tag):
    with ws.producer(f"t-{tag}") as p:
        acks = publish(p, [b"x" * 100] * 500)
        entries = [message_id_fields(a["messageId"])[1] for a in acks]
        assert entries == list(range(500))
