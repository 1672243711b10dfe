"""RabbitMQ's tutorial patterns, with pika as the client: work queues,
publish/subscribe, routing, topics, headers and RPC."""

import threading
import time
import uuid

import pika

from amqp_tests.conftest import drain


def test_hello_world_round_trip_with_properties(connect):
    ch = connect().channel()
    ch.queue_declare("hello")
    props = pika.BasicProperties(
        content_type="text/plain", delivery_mode=2, priority=3,
        correlation_id="c-1", message_id="m-1", timestamp=1700000000,
        type="greeting", app_id="tests",
        headers={"s": "str", "i": 42, "b": True, "nested": {"k": [1, "two"]}})
    ch.basic_publish("", "hello", b"Hello World!", properties=props)
    [(method, got, body)] = drain(ch, "hello", 1)
    assert body == b"Hello World!"
    assert method.routing_key == "hello" and method.exchange == ""
    assert not method.redelivered
    for field in ("content_type", "delivery_mode", "priority", "correlation_id",
                  "message_id", "timestamp", "type", "app_id"):
        assert getattr(got, field) == getattr(props, field), field
    assert got.headers == props.headers


def test_work_queue_fair_dispatch_under_prefetch_1(connect):
    setup = connect().channel()
    setup.queue_declare("tasks", durable=True)
    setup.queue_purge("tasks")
    n = 40
    seen = {"slow": [], "fast": []}
    lock = threading.Lock()
    done = threading.Event()

    def worker(name, delay):
        conn = connect()
        ch = conn.channel()
        ch.basic_qos(prefetch_count=1)

        def cb(ch_, method, props, body):
            time.sleep(delay)
            with lock:
                seen[name].append(body)
                if len(seen["slow"]) + len(seen["fast"]) >= n:
                    done.set()
            ch_.basic_ack(method.delivery_tag)

        ch.basic_consume("tasks", cb)
        while not done.is_set():
            conn.process_data_events(time_limit=0.1)
        ch.cancel()

    threads = [threading.Thread(target=worker, args=("slow", 0.25)),
               threading.Thread(target=worker, args=("fast", 0.0))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for i in range(n):
        setup.basic_publish("", "tasks", f"task {i}".encode(),
                            properties=pika.BasicProperties(delivery_mode=2))
    assert done.wait(60), seen
    for t in threads:
        t.join(10)
    everything = sorted(seen["slow"] + seen["fast"])
    assert everything == sorted(f"task {i}".encode() for i in range(n))
    # Prefetch 1: the slow worker holds one task at a time, so the fast
    # one takes nearly all of them.
    assert len(seen["slow"]) <= 6, {k: len(v) for k, v in seen.items()}


def test_fanout_reaches_every_bound_queue(connect):
    ch = connect().channel()
    ch.exchange_declare("logs", exchange_type="fanout")
    queues = []
    for _ in range(3):
        q = ch.queue_declare("", exclusive=True).method.queue
        assert q.startswith("amq.gen-")
        ch.queue_bind(q, "logs")
        queues.append(q)
    for i in range(5):
        ch.basic_publish("logs", "ignored", f"log {i}".encode())
    for q in queues:
        got = [b for _, _, b in drain(ch, q, 5)]
        assert got == [f"log {i}".encode() for i in range(5)]


def test_direct_routing(connect):
    ch = connect().channel()
    ch.exchange_declare("direct_logs", exchange_type="direct")
    errors = ch.queue_declare("", exclusive=True).method.queue
    everything = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(errors, "direct_logs", "error")
    for sev in ("info", "warning", "error"):
        ch.queue_bind(everything, "direct_logs", sev)
    for sev in ("info", "warning", "error", "debug"):
        ch.basic_publish("direct_logs", sev, sev.encode())
    assert [b for _, _, b in drain(ch, errors, 1)] == [b"error"]
    assert [(m.routing_key, b) for m, _, b in drain(ch, everything, 3)] == [
        ("info", b"info"), ("warning", b"warning"), ("error", b"error")]
    assert ch.basic_get(errors)[0] is None
    assert ch.basic_get(everything)[0] is None


def test_topic_routing_with_wildcard_edge_cases(connect):
    ch = connect().channel()
    ch.exchange_declare("topic_logs", exchange_type="topic")
    patterns = ["*.orange.*", "*.*.rabbit", "lazy.#", "#", "a.*.#", "#.end",
                "x.#.y", "*", "a..b"]
    queues = {}
    for p in patterns:
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "topic_logs", p)
        queues[p] = q
    keys = ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox",
            "lazy.brown.fox", "lazy", "quick.brown.fox", "orange",
            "quick.orange.male.rabbit", "a", "a.b", "a.b.c", "end", "x.end",
            "x.y", "x.1.2.y", "", "a..b"]
    for k in keys:
        ch.basic_publish("topic_logs", k, k.encode())
    expected = {
        "*.orange.*": ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"],
        "*.*.rabbit": ["quick.orange.rabbit"],
        "lazy.#": ["lazy.orange.elephant", "lazy.brown.fox", "lazy"],
        "#": keys,
        "a.*.#": ["a.b", "a.b.c", "a..b"],
        "#.end": ["end", "x.end"],
        "x.#.y": ["x.y", "x.1.2.y"],
        "*": ["lazy", "orange", "a", "end"],
        "a..b": ["a..b"],
    }
    for p, want in expected.items():
        got = [b.decode() for _, _, b in drain(ch, queues[p], len(want))]
        assert got == want, p
        assert ch.basic_get(queues[p])[0] is None, p


def test_headers_exchange_all_and_any(connect):
    ch = connect().channel()
    ch.exchange_declare("hx", exchange_type="headers")
    all_q = ch.queue_declare("", exclusive=True).method.queue
    any_q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(all_q, "hx", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    ch.queue_bind(any_q, "hx", arguments={"x-match": "any", "format": "pdf", "size": 10})
    msgs = [
        ({"format": "pdf", "type": "report"}, b"both"),
        ({"format": "pdf"}, b"format only"),
        ({"size": 10}, b"size int"),
        ({"size": "10"}, b"size str"),
        ({"type": "report"}, b"type only"),
        ({}, b"none"),
    ]
    for h, body in msgs:
        ch.basic_publish("hx", "", body, properties=pika.BasicProperties(headers=h))
    assert [b for _, _, b in drain(ch, all_q, 1)] == [b"both"]
    assert [b for _, _, b in drain(ch, any_q, 3)] == [b"both", b"format only", b"size int"]
    assert ch.basic_get(all_q)[0] is None
    assert ch.basic_get(any_q)[0] is None


def _rpc_server(connect, stop):
    conn = connect()
    ch = conn.channel()
    ch.queue_declare("rpc_queue")
    ch.basic_qos(prefetch_count=1)

    def on_request(ch_, method, props, body):
        n = int(body)
        ch_.basic_publish("", props.reply_to, str(n * n).encode(),
                          properties=pika.BasicProperties(correlation_id=props.correlation_id))
        ch_.basic_ack(method.delivery_tag)

    ch.basic_consume("rpc_queue", on_request)
    while not stop.is_set():
        conn.process_data_events(time_limit=0.1)


def test_rpc_with_reply_queue_and_direct_reply_to(connect):
    stop = threading.Event()
    server = threading.Thread(target=_rpc_server, args=(connect, stop))
    server.start()
    try:
        time.sleep(0.5)
        conn = connect()
        ch = conn.channel()
        # Classic: an exclusive callback queue and correlation ids.
        callback = ch.queue_declare("", exclusive=True).method.queue
        replies = {}

        def on_reply(ch_, method, props, body):
            replies[props.correlation_id] = body

        ch.basic_consume(callback, on_reply, auto_ack=True)
        ids = {}
        for n in (2, 3, 7):
            cid = str(uuid.uuid4())
            ids[cid] = n
            ch.basic_publish("", "rpc_queue", str(n).encode(),
                             properties=pika.BasicProperties(reply_to=callback, correlation_id=cid))
        deadline = time.time() + 20
        while len(replies) < 3 and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert {cid: int(v) for cid, v in replies.items()} == {c: n * n for c, n in ids.items()}

        # Direct reply-to: no queue at all.
        ch2 = conn.channel()
        direct = {}
        ch2.basic_consume("amq.rabbitmq.reply-to",
                          lambda c, m, p, b: direct.__setitem__(p.correlation_id, b),
                          auto_ack=True)
        ch2.basic_publish("", "rpc_queue", b"12",
                          properties=pika.BasicProperties(reply_to="amq.rabbitmq.reply-to",
                                                          correlation_id="direct-1"))
        deadline = time.time() + 20
        while not direct and time.time() < deadline:
            conn.process_data_events(time_limit=0.1)
        assert direct == {"direct-1": b"144"}
    finally:
        stop.set()
        server.join(10)


def test_single_active_consumer_hands_over_in_order(connect):
    setup = connect().channel()
    setup.confirm_delivery()
    setup.queue_declare("sac", durable=True, arguments={"x-single-active-consumer": True})
    setup.queue_purge("sac")
    got = {"a": [], "b": []}
    conns = {}
    for name in ("a", "b"):
        conn = connect()
        ch = conn.channel()
        ch.basic_qos(prefetch_count=10)
        ch.basic_consume("sac", lambda c, m, p, b, name=name: (got[name].append(b), c.basic_ack(m.delivery_tag)),
                         consumer_tag=f"sac-{name}")
        conns[name] = conn
    for i in range(10):
        setup.basic_publish("", "sac", f"m{i}".encode())
    deadline = time.time() + 10
    while len(got["a"]) + len(got["b"]) < 10 and time.time() < deadline:
        for c in conns.values():
            c.process_data_events(time_limit=0.05)
    assert got["a"] == [f"m{i}".encode() for i in range(10)]
    assert got["b"] == []
    conns["a"].close()
    for i in range(10, 15):
        setup.basic_publish("", "sac", f"m{i}".encode())
    deadline = time.time() + 10
    while len(got["b"]) < 5 and time.time() < deadline:
        conns["b"].process_data_events(time_limit=0.05)
    assert got["b"] == [f"m{i}".encode() for i in range(10, 15)]
