//! AMQP judged by lapin, the Rust client: 100,000 persistent messages
//! published with pipelined publisher confirms, all confirmed and all
//! consumed in order; mandatory returns and nacks as confirmations; and
//! RabbitMQ's tutorial patterns (work queues, fanout, direct, topic,
//! headers, RPC with a reply queue and with direct reply-to).

mod common;

use std::collections::VecDeque;
use std::process::Command;
use std::time::Duration;

use common::{free_port, spawn_until, Proc, BIN};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

struct Standalone {
    _dir: tempfile::TempDir,
    _proc: Proc,
    amqp: u16,
}

fn standalone() -> Standalone {
    let dir = tempfile::tempdir().expect("temp dir");
    let amqp = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg("standalone")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--kafka-listen", "127.0.0.1:0"])
        .args(["--amqp-listen", &format!("127.0.0.1:{amqp}")])
        .args(["--mqtt-listen", "127.0.0.1:0"])
        .args(["--meta-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--bookie-listen", &format!("127.0.0.1:{}", free_port())])
        .env("MAGNETAR_LOG", "info,openraft=warn");
    let proc = spawn_until(
        cmd,
        "ready",
        &dir.path().join("standalone.log"),
        Duration::from_secs(60),
    );
    Standalone {
        _dir: dir,
        _proc: proc,
        amqp,
    }
}

async fn connect(port: u16) -> Connection {
    Connection::connect(
        &format!("amqp://127.0.0.1:{port}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("lapin connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_confirmed_persistent_messages_all_consumed() {
    let s = standalone();
    let conn = connect(s.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    declare(
        &ch,
        "lapin-bulk",
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let n = 100_000u64;
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut window = VecDeque::new();
    let mut acked = 0u64;
    for i in 0..n {
        let confirm = ch
            .basic_publish(
                "".into(),
                "lapin-bulk".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props.clone(),
            )
            .await
            .expect("publish");
        window.push_back(confirm);
        if window.len() >= 5000 {
            let c = window
                .pop_front()
                .expect("non-empty")
                .await
                .expect("confirm");
            assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
            acked += 1;
        }
    }
    while let Some(c) = window.pop_front() {
        let c = c.await.expect("confirm");
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
        acked += 1;
    }
    assert_eq!(acked, n);

    let consumer_conn = connect(s.amqp).await;
    let cch = consumer_conn.create_channel().await.expect("channel");
    cch.basic_qos(500, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = cch
        .basic_consume(
            "lapin-bulk".into(),
            "bulk".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut next = 0u64;
    while next < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(d.data, format!("m{next}").into_bytes(), "in order");
        assert!(!d.redelivered);
        next += 1;
        if next.is_multiple_of(250) {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let q = cch
        .queue_declare(
            "lapin-bulk".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(q.message_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_mandatory_returns_and_rejected_publishes_nack() {
    let s = standalone();
    let conn = connect(s.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let returned = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    match returned {
        Confirmation::Ack(Some(r)) => {
            assert_eq!(r.reply_code, 312);
            assert_eq!(r.delivery.data, b"lost");
        }
        other => panic!("expected a returned message, got {other:?}"),
    }
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    ch.queue_declare("lapin-full".into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare");
    let publish = |body: &'static [u8]| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                "lapin-full".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm")
        }
    };
    assert!(matches!(publish(b"1").await, Confirmation::Ack(None)));
    assert!(matches!(publish(b"2").await, Confirmation::Nack(_)));
}

/// The bodies of `n` messages from a queue with basic.get, in order; then
/// checks that nothing more is there (publishes are confirmed, so all are
/// routed).
async fn bodies(ch: &lapin::Channel, queue: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            Some(m) => out.push(text(&m.delivery)),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let extra = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get");
    assert!(extra.is_none(), "{queue}: more than {n} messages");
    out
}

async fn declare(ch: &lapin::Channel, queue: &str, options: QueueDeclareOptions) {
    ch.queue_declare(queue.into(), options, FieldTable::default())
        .await
        .expect("declare");
}

fn text(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &str,
    props: BasicProperties,
) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
}

async fn declare_exchange(ch: &lapin::Channel, name: &str, kind: lapin::ExchangeKind) {
    ch.exchange_declare(
        name.into(),
        kind,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.declare");
}

async fn server_named_queue(
    ch: &lapin::Channel,
    exchange: &str,
    keys: &[&str],
    args: FieldTable,
) -> String {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let name = q.name().as_str().to_owned();
    for k in keys {
        ch.queue_bind(
            name.as_str().into(),
            exchange.into(),
            (*k).into(),
            lapin::options::QueueBindOptions::default(),
            args.clone(),
        )
        .await
        .expect("bind");
    }
    name
}

/// RabbitMQ's six tutorials, as lapin runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_tutorial_patterns() {
    use lapin::ExchangeKind;
    let s = standalone();
    let conn = connect(s.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let plain = BasicProperties::default;

    // Work queue, fair dispatch: with prefetch 1, a worker that holds its
    // task gets no other; the busy-free worker takes all the rest.
    ch.queue_declare(
        "lapin-tasks".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let mut workers = Vec::new();
    for name in ["slow", "fast"] {
        let c = conn.create_channel().await.expect("channel");
        c.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = c
            .basic_consume(
                "lapin-tasks".into(),
                name.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        workers.push((c, consumer));
    }
    for i in 0..10 {
        publish(
            &ch,
            "",
            "lapin-tasks",
            &format!("task {i}"),
            plain().with_delivery_mode(2),
        )
        .await;
    }
    let (_slow_ch, mut slow) = workers.remove(0);
    let (_fast_ch, mut fast) = workers.remove(0);
    let held = tokio::time::timeout(Duration::from_secs(10), slow.next())
        .await
        .expect("the slow worker gets a task")
        .expect("stream open")
        .expect("delivery");
    let mut fast_done = 0;
    while fast_done < 9 {
        let d = tokio::time::timeout(Duration::from_secs(10), fast.next())
            .await
            .expect("the fast worker keeps getting tasks")
            .expect("stream open")
            .expect("delivery");
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        fast_done += 1;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow.next())
            .await
            .is_err(),
        "prefetch 1: nothing more for a worker holding a task"
    );
    held.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");

    // Fanout: every bound queue gets every message.
    declare_exchange(&ch, "lapin-logs", ExchangeKind::Fanout).await;
    let a = server_named_queue(&ch, "lapin-logs", &[""], FieldTable::default()).await;
    let b = server_named_queue(&ch, "lapin-logs", &[""], FieldTable::default()).await;
    for i in 0..3 {
        publish(&ch, "lapin-logs", "", &format!("log {i}"), plain()).await;
    }
    for q in [&a, &b] {
        let got = bodies(&ch, q, 3).await;
        assert_eq!(got, ["log 0", "log 1", "log 2"]);
    }

    // Direct: by exact key, one queue bound with two keys.
    declare_exchange(&ch, "lapin-direct", ExchangeKind::Direct).await;
    let errors = server_named_queue(&ch, "lapin-direct", &["error"], FieldTable::default()).await;
    let all = server_named_queue(
        &ch,
        "lapin-direct",
        &["info", "error"],
        FieldTable::default(),
    )
    .await;
    for sev in ["info", "warning", "error"] {
        publish(&ch, "lapin-direct", sev, sev, plain()).await;
    }
    assert_eq!(bodies(&ch, &all, 2).await, ["info", "error"]);
    assert_eq!(bodies(&ch, &errors, 1).await, ["error"]);

    // Topic: the tutorial's bindings and keys, `*` one word, `#` any.
    declare_exchange(&ch, "lapin-topic", ExchangeKind::Topic).await;
    let q1 = server_named_queue(&ch, "lapin-topic", &["*.orange.*"], FieldTable::default()).await;
    let q2 = server_named_queue(
        &ch,
        "lapin-topic",
        &["*.*.rabbit", "lazy.#"],
        FieldTable::default(),
    )
    .await;
    for key in [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.male.rabbit",
        "lazy.orange.male.rabbit",
        "lazy",
    ] {
        publish(&ch, "lapin-topic", key, key, plain()).await;
    }
    assert_eq!(
        bodies(&ch, &q1, 3).await,
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "quick.orange.fox"
        ]
    );
    assert_eq!(
        bodies(&ch, &q2, 6).await,
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.male.rabbit",
            "lazy"
        ]
    );

    // Headers: x-match all and any.
    declare_exchange(&ch, "lapin-headers", ExchangeKind::Headers).await;
    let table = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        t
    };
    let all_q = server_named_queue(
        &ch,
        "lapin-headers",
        &[""],
        table(&[("x-match", "all"), ("format", "pdf"), ("type", "report")]),
    )
    .await;
    let any_q = server_named_queue(
        &ch,
        "lapin-headers",
        &[""],
        table(&[("x-match", "any"), ("format", "pdf"), ("type", "report")]),
    )
    .await;
    for (body, h) in [
        ("both", vec![("format", "pdf"), ("type", "report")]),
        ("format", vec![("format", "pdf"), ("type", "log")]),
        ("neither", vec![("format", "zip")]),
    ] {
        publish(
            &ch,
            "lapin-headers",
            "",
            body,
            plain().with_headers(table(&h)),
        )
        .await;
    }
    assert_eq!(bodies(&ch, &all_q, 1).await, ["both"]);
    assert_eq!(bodies(&ch, &any_q, 2).await, ["both", "format"]);

    // RPC: a server answers on reply_to with the request's correlation_id,
    // to an exclusive reply queue and to direct reply-to.
    ch.queue_declare(
        "lapin-rpc".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let server_conn = connect(s.amqp).await;
    let server = server_conn.create_channel().await.expect("channel");
    let mut requests = server
        .basic_consume(
            "lapin-rpc".into(),
            "rpc-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    tokio::spawn(async move {
        while let Some(Ok(d)) = requests.next().await {
            let n: u64 = text(&d).parse().unwrap_or(0);
            let (mut a, mut b) = (0u64, 1u64);
            for _ in 0..n {
                (a, b) = (b, a + b);
            }
            if let Some(reply_to) = d.properties.reply_to() {
                let props = BasicProperties::default()
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default());
                let _ = server
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        a.to_string().as_bytes(),
                        props,
                    )
                    .await;
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    });
    let rpc = conn.create_channel().await.expect("channel");
    let reply_queue = server_named_queue(&rpc, "", &[], FieldTable::default()).await;
    for (reply_to, n, want) in [
        (reply_queue.as_str(), 10, "55"),
        ("amq.rabbitmq.reply-to", 30, "832040"),
    ] {
        let mut replies = rpc
            .basic_consume(
                reply_to.into(),
                format!("rpc-client-{n}").as_str().into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        let corr = format!("call-{n}");
        rpc.basic_publish(
            "".into(),
            "lapin-rpc".into(),
            BasicPublishOptions::default(),
            n.to_string().as_bytes(),
            BasicProperties::default()
                .with_reply_to(reply_to.into())
                .with_correlation_id(corr.as_str().into()),
        )
        .await
        .expect("request");
        let d = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(text(&d), want);
        assert_eq!(
            d.properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some(corr.as_str())
        );
    }
}

/// The `x-death` entry of a dead-lettered delivery, by field.
fn first_death(d: &lapin::message::Delivery) -> std::collections::BTreeMap<String, AMQPValue> {
    let headers = d.properties.headers().as_ref().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death in {headers:?}");
    };
    let Some(AMQPValue::FieldTable(t)) = deaths.as_slice().first() else {
        panic!("x-death is not a list of tables: {deaths:?}");
    };
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
        .collect()
}

fn long_string(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("not a long string: {other:?}"),
    }
}

/// Dead-lettering as lapin sees it: a rejected message and an expired one
/// reach the dead-letter exchange with RabbitMQ's `x-death` history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_x_death() {
    let s = standalone();
    let conn = connect(s.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    declare_exchange(&ch, "lapin-dlx", lapin::ExchangeKind::Fanout).await;
    ch.queue_declare(
        "lapin-dlq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare dlq");
    ch.queue_bind(
        "lapin-dlq".into(),
        "lapin-dlx".into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind dlq");
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("lapin-dlx")),
    );
    ch.queue_declare(
        "lapin-work".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare work queue");

    publish(
        &ch,
        "",
        "lapin-work",
        "rejected",
        BasicProperties::default(),
    )
    .await;
    let got = ch
        .basic_get(
            "lapin-work".into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic.get")
        .expect("a message");
    ch.basic_reject(
        got.delivery.delivery_tag,
        lapin::options::BasicRejectOptions { requeue: false },
    )
    .await
    .expect("basic.reject");
    publish(
        &ch,
        "",
        "lapin-work",
        "expired",
        BasicProperties::default().with_expiration("50".into()),
    )
    .await;

    let mut deaths = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while deaths.len() < 2 && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(
                "lapin-dlq".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            Some(m) => deaths.push((text(&m.delivery), first_death(&m.delivery))),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let [(b1, d1), (b2, d2)] = &deaths[..] else {
        panic!("expected two dead letters, got {deaths:?}");
    };
    assert_eq!(b1, "rejected");
    assert_eq!(long_string(d1.get("reason")), "rejected");
    assert_eq!(b2, "expired");
    assert_eq!(long_string(d2.get("reason")), "expired");
    for d in [d1, d2] {
        assert_eq!(long_string(d.get("queue")), "lapin-work");
        assert_eq!(long_string(d.get("exchange")), "");
        assert_eq!(d.get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert!(
            matches!(d.get("routing-keys"), Some(AMQPValue::FieldArray(k))
                if k.as_slice() == [AMQPValue::LongString(LongString::from("lapin-work"))]),
            "routing-keys: {:?}",
            d.get("routing-keys")
        );
        assert!(matches!(d.get("time"), Some(AMQPValue::Timestamp(_))));
    }
    assert_eq!(
        long_string(d2.get("original-expiration")),
        "50",
        "the expiration that fired is kept"
    );
}

/// A channel's methods apply in order, as RabbitMQ promises: with no
/// confirms in between, basic.get right after basic.publish on the same
/// channel finds the message, for durable and transient queues alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_get_on_one_channel_finds_the_message() {
    let s = standalone();
    let conn = connect(s.amqp).await;
    let ch = conn.create_channel().await.expect("channel");
    for (queue, durable) in [
        ("lapin-order-durable", true),
        ("lapin-order-transient", false),
    ] {
        declare(
            &ch,
            queue,
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
        )
        .await;
        let props = BasicProperties::default().with_delivery_mode(if durable { 2 } else { 1 });
        for i in 0..1000 {
            let body = format!("{i}");
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props.clone(),
            )
            .await
            .expect("publish");
            let got = ch
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get")
                .unwrap_or_else(|| panic!("{queue}, round {i}: get-empty after the publish"));
            assert_eq!(text(&got.delivery), body, "{queue}");
        }
    }
}

/// A connection closed many times at once closes once, cleanly: every
/// close returns, and none is refused as a frame error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_closes_of_one_connection_end_cleanly() {
    let s = standalone();
    for _ in 0..5 {
        let conn = connect(s.amqp).await;
        let ch = conn.create_channel().await.expect("channel");
        declare(
            &ch,
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await;
        // lapin queues each close for its I/O loop; one queued after that
        // loop ended on the first close-ok is never answered by lapin
        // (`InternalRPCHandle::send` leaves it in the channel), whatever
        // the broker does. So each close is bounded; those lapin leaves
        // pending must leave the connection closed.
        let closes = (0..100)
            .map(|_| tokio::time::timeout(Duration::from_secs(10), conn.close(200, "bye".into())));
        let results = futures::future::join_all(closes).await;
        let answered: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for r in &answered {
            let text = format!("{r:?}");
            assert!(
                !text.contains("501") && !text.contains("FRAME_ERROR"),
                "{text}"
            );
        }
        assert!(answered.iter().any(|r| r.is_ok()), "{answered:?}");
        assert!(!conn.status().connected());
    }
}
