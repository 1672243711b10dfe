//! AMQP judged by lapin, the Rust client: 100,000 persistent messages
//! published with pipelined publisher confirms, all confirmed and all
//! consumed in order; mandatory returns and nacks as confirmations.

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
    ch.queue_declare(
        "lapin-bulk".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
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
