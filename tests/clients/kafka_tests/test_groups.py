"""Consumer groups and producers across rebalances and broker restarts."""

import signal
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)]
    ).values():
        f.result(30)


def produce(bootstrap, topic, n, start=0, partitions=None):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for i in range(start, start + n):
        kw = {} if partitions is None else {"partition": i % partitions}
        p.produce(topic, key=b"%d" % i, value=b"m%d" % i, **kw)
    assert p.flush(60) == 0


def consumer(bootstrap, group, **extra):
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    conf.update(extra)
    return Consumer(conf)


def test_three_members_share_six_partitions_and_a_leaver_is_rebalanced(standalone):
    create(standalone.kafka, "six", 6)
    assigned = {}

    def tracker(name):
        def on_assign(c, parts):
            assigned[name] = sorted(p.partition for p in parts)

        def on_revoke(c, parts):
            assigned[name] = []

        return on_assign, on_revoke

    members = {}
    for name in ("a", "b", "c"):
        c = consumer(standalone.kafka, "trio")
        on_assign, on_revoke = tracker(name)
        c.subscribe(["six"], on_assign=on_assign, on_revoke=on_revoke)
        members[name] = c

    def settle(names, per_member, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n in names:
                members[n].poll(0.1)
            parts = [assigned.get(n, []) for n in names]
            flat = sorted(p for ps in parts for p in ps)
            if flat == list(range(6)) and all(len(ps) == per_member for ps in parts):
                return
        raise AssertionError(f"no balanced assignment: {assigned}")

    settle(["a", "b", "c"], 2)
    members.pop("c").close()  # LeaveGroup
    assigned.pop("c", None)
    settle(["a", "b"], 3)
    for c in members.values():
        c.close()


def read_until(c, want, timeout=60):
    """Polls until `want` messages arrived; returns (partition, offset, value)."""
    out = []
    deadline = time.time() + timeout
    while len(out) < want and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        assert m.error() is None, m.error()
        out.append((m.partition(), m.offset(), m.value()))
    assert len(out) == want, f"got {len(out)} of {want}"
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_committed_offsets_survive_consumer_and_broker_restarts(standalone, how):
    topic = f"commits-{how}"
    create(standalone.kafka, topic, 3)
    produce(standalone.kafka, topic, 900, partitions=3)
    group = f"g-{how}"
    seen = []
    committed = {}

    def session(count):
        c = consumer(standalone.kafka, group)
        c.subscribe([topic])
        got = read_until(c, count)
        # Each partition resumes exactly at its last commit.
        firsts = {}
        for p, o, _ in got:
            firsts.setdefault(p, o)
        for p, o in firsts.items():
            assert o == committed.get(p, 0), f"partition {p} resumed at {o}, committed {committed.get(p, 0)}"
        last = {}
        for p, o, _ in got:
            last[p] = o + 1
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in last.items()], asynchronous=False)
        stored = c.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)
        for tp in stored:
            if tp.partition in last:
                assert tp.offset == last[tp.partition]
        committed.update(last)
        c.close()
        seen.extend(got)

    session(300)          # then a consumer restart
    session(300)
    standalone.restart(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    c = consumer(standalone.kafka, group)
    stored = c.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)
    assert {tp.partition: tp.offset for tp in stored if tp.offset >= 0} == committed
    c.close()
    session(300)
    values = [v for _, _, v in seen]
    assert len(values) == len(set(values)) == 900, "a message was skipped or read twice"


def test_idempotent_producer_across_a_broker_kill_leaves_no_duplicates(standalone):
    topic = "idempotent"
    create(standalone.kafka, topic, 2)
    p = Producer({
        "bootstrap.servers": standalone.kafka,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": 120000,
        "retry.backoff.ms": 100,
    })
    delivered = []
    errors = []

    def on_delivery(err, msg):
        (errors if err else delivered).append(err or msg.value())

    total = 20000
    killed = False
    for i in range(total):
        while True:
            try:
                p.produce(topic, value=b"%d" % i, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
        # Keep about a thousand in flight, so that the kill lands mid-stream.
        while i - len(delivered) - len(errors) > 1000:
            p.poll(0.01)
        if not killed and len(delivered) >= 5000:
            standalone.kill()
            standalone.start()
            killed = True
    assert p.flush(120) == 0
    assert killed
    assert not errors, errors[:5]
    assert len(delivered) == total

    c = consumer(standalone.kafka, "idem-check")
    c.assign([TopicPartition(topic, p, 0) for p in range(2)])
    got = [v for _, _, v in read_until(c, total, timeout=120)]
    time.sleep(2)
    extra = c.poll(1.0)
    c.close()
    assert extra is None, "more messages than were produced"
    assert sorted(int(v) for v in got) == list(range(total)), "duplicates or gaps"


def test_a_static_member_rejoining_within_its_session_keeps_its_partitions(standalone):
    """KIP-345: a member with group.instance.id that restarts comes back to
    its old assignment, and the other member sees no rebalance."""
    create(standalone.kafka, "static", 6)
    events = {"a": [], "b": []}

    def member(name, instance):
        c = consumer(standalone.kafka, "static-group", **{
            "group.instance.id": instance,
            "session.timeout.ms": 20000,
        })

        def on_assign(_, parts):
            events[name].append(("assign", sorted(p.partition for p in parts)))

        def on_revoke(_, parts):
            events[name].append(("revoke", sorted(p.partition for p in parts)))

        c.subscribe(["static"], on_assign=on_assign, on_revoke=on_revoke)
        return c

    a = member("a", "inst-a")
    b = member("b", "inst-b")
    deadline = time.time() + 60
    while time.time() < deadline:
        a.poll(0.1)
        b.poll(0.1)
        la = events["a"][-1][1] if events["a"] and events["a"][-1][0] == "assign" else []
        lb = events["b"][-1][1] if events["b"] and events["b"][-1][0] == "assign" else []
        if sorted(la + lb) == list(range(6)) and len(la) == len(lb) == 3:
            break
    else:
        raise AssertionError(f"no balanced assignment: {events}")
    b_parts = events["b"][-1][1]
    a_events = len(events["a"])

    b.close()  # a static member leaves no LeaveGroup behind
    events["b2"] = []
    b2 = member("b2", "inst-b")
    deadline = time.time() + 30
    while time.time() < deadline and not events["b2"]:
        a.poll(0.1)
        b2.poll(0.1)
    assert events["b2"] == [("assign", b_parts)], events
    for _ in range(20):
        a.poll(0.1)
        b2.poll(0.1)
    assert len(events["a"]) == a_events, f"the other member was rebalanced: {events['a']}"
    a.close()
    b2.close()


def test_transactions_hide_aborted_records_from_read_committed(standalone):
    create(standalone.kafka, "txn", 2)
    create(standalone.kafka, "txn-in", 1)
    produce(standalone.kafka, "txn-in", 10)
    p = Producer({"bootstrap.servers": standalone.kafka, "transactional.id": "tx-1"})
    p.init_transactions(30)

    p.begin_transaction()
    for i in range(100):
        p.produce("txn", key=b"%d" % i, value=b"committed-%d" % i)
    # Consumed input offsets commit with the transaction.
    c = consumer(standalone.kafka, "txn-group")
    c.subscribe(["txn-in"])
    read_until(c, 10)
    p.send_offsets_to_transaction([TopicPartition("txn-in", 0, 10)], c.consumer_group_metadata(), 30)
    p.commit_transaction(30)

    p.begin_transaction()
    for i in range(50):
        p.produce("txn", key=b"%d" % i, value=b"aborted-%d" % i)
    p.flush(30)
    p.abort_transaction(30)

    p.begin_transaction()
    for i in range(10):
        p.produce("txn", key=b"%d" % i, value=b"late-%d" % i)
    p.commit_transaction(30)

    committed = c.committed([TopicPartition("txn-in", 0)], timeout=30)
    assert committed[0].offset == 10
    c.close()

    def values(isolation):
        r = consumer(standalone.kafka, f"txn-reader-{isolation}", **{"isolation.level": isolation})
        r.assign([TopicPartition("txn", p, 0) for p in range(2)])
        got = []
        deadline = time.time() + 20
        while time.time() < deadline:
            m = r.poll(0.5)
            if m is None:
                if len(got) >= 110:
                    break
                continue
            assert m.error() is None, m.error()
            got.append(m.value())
        r.close()
        return got

    got = values("read_committed")
    assert sorted(got) == sorted([b"committed-%d" % i for i in range(100)] + [b"late-%d" % i for i in range(10)])
    uncommitted = values("read_uncommitted")
    assert len([v for v in uncommitted if v.startswith(b"aborted-")]) == 50

    # A second instance with the same transactional.id fences the first.
    p2 = Producer({"bootstrap.servers": standalone.kafka, "transactional.id": "tx-1"})
    p2.init_transactions(30)
    p.begin_transaction()
    p.produce("txn", value=b"zombie")
    with pytest.raises(Exception):
        p.commit_transaction(10)


def test_a_lapsed_transaction_is_aborted_after_its_timeout(standalone):
    create(standalone.kafka, "lapsed", 1)
    p = Producer({"bootstrap.servers": standalone.kafka, "transactional.id": "tx-lapse",
                  "transaction.timeout.ms": 3000})
    p.init_transactions(30)
    p.begin_transaction()
    for i in range(5):
        p.produce("lapsed", value=b"open-%d" % i, partition=0)
    p.flush(30)
    produce(standalone.kafka, "lapsed", 3, partitions=1)

    r = consumer(standalone.kafka, "lapse-reader", **{"isolation.level": "read_committed"})
    r.assign([TopicPartition("lapsed", 0, 0)])
    # The open transaction holds read-committed readers back ...
    assert r.poll(1.0) is None
    # ... until the coordinator aborts it.
    got = [v for _, _, v in read_until(r, 3, timeout=30)]
    r.close()
    assert got == [b"m0", b"m1", b"m2"]
    with pytest.raises(Exception):
        p.commit_transaction(10)
