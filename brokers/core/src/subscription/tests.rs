//! Cursors, dispatch and redelivery of a subscription, in memory.

use super::*;
use crate::format::encode_messages;
use crate::log::MemoryLog;

// The dispatcher over an in-memory log: no sockets, no storage.

fn setup(sub_type: SubscriptionType, log: &PartitionLog) -> Subscription {
    setup_with(
        SubscriptionOptions {
            sub_type,
            ..SubscriptionOptions::default()
        },
        log,
    )
}

fn setup_with(opts: SubscriptionOptions, log: &PartitionLog) -> Subscription {
    Subscription::start(SubscriptionSetup {
        topic: "t".into(),
        name: "s".into(),
        log: log.clone(),
        cursor: CursorState::new(0, 0),
        opts,
        store: None,
        dead_letter: None,
        partition: 0,
        delivered: Default::default(),
    })
}

async fn publish(log: &PartitionLog, from: u64, n: u64, keys: u64) {
    for i in from..from + n {
        let m = Message::new(format!("m{i}")).with_key(format!("k{}", i % keys));
        log.append(encode_messages(&[m]).expect("encode"))
            .await
            .expect("append");
    }
}

async fn drain(c: &mut Consumer) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(150), c.recv()).await {
        out.push(d.offset);
    }
    out
}

fn consumer(name: &str) -> ConsumerOptions {
    ConsumerOptions {
        name: name.into(),
        ..ConsumerOptions::default()
    }
}

#[tokio::test]
async fn priorities_go_out_highest_first_and_in_order_within_a_level() {
    let log = PartitionLog::Memory(MemoryLog::new("t", 1 << 20));
    let sub = setup_with(
        SubscriptionOptions {
            sub_type: SubscriptionType::Shared,
            priority: Some(MessagePriority {
                header: "p".into(),
                max: 5,
            }),
            ..SubscriptionOptions::default()
        },
        &log,
    );
    // Levels by offset; 9 counts as 5, "x" and none as 0.
    let levels = [Some("1"), None, Some("5"), Some("9"), Some("x"), Some("3")];
    for l in levels {
        let mut m = Message::new("v");
        if let Some(l) = l {
            m.headers.push(("p".into(), Some(bytes::Bytes::from(l))));
        }
        log.append(encode_messages(&[m]).expect("encode"))
            .await
            .expect("append");
    }
    let mut c = sub.add_consumer(consumer("a")).await.expect("consumer");
    c.flow(100);
    assert_eq!(drain(&mut c).await, vec![2, 3, 5, 0, 1, 4]);
}

#[tokio::test]
async fn ready_bytes_count_payloads_neither_acked_nor_out() {
    let log = PartitionLog::Memory(MemoryLog::new("t", 1 << 20));
    let sub = setup(SubscriptionType::Shared, &log);
    publish(&log, 0, 12, 1).await;
    // Payloads "m0".."m9" are 2 bytes, "m10" and "m11" 3.
    assert_eq!(sub.ready_bytes().await.expect("bytes"), 26);
    let mut c = sub.add_consumer(consumer("a")).await.expect("consumer");
    c.flow(2);
    assert_eq!(drain(&mut c).await, vec![0, 1]);
    c.ack(0);
    assert_eq!(sub.ready_bytes().await.expect("bytes"), 22);
    let reaped = sub.reap(3, Box::new(|_| true)).await.expect("reap");
    assert_eq!(
        reaped.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(sub.ready_bytes().await.expect("bytes"), 16);
}

#[tokio::test]
async fn permits_bound_what_is_delivered() {
    let log = PartitionLog::Memory(MemoryLog::new("t", 1 << 20));
    let sub = setup(SubscriptionType::Exclusive, &log);
    let mut c = sub.add_consumer(consumer("a")).await.expect("consumer");
    publish(&log, 0, 10, 1).await;
    c.flow(3);
    assert_eq!(drain(&mut c).await, vec![0, 1, 2]);
    c.flow(2);
    assert_eq!(drain(&mut c).await, vec![3, 4]);
    let st = sub.stats().await.expect("stats");
    assert_eq!(st.unacked_messages, 5);
    assert_eq!(st.consumers[0].available_permits, 0);
}

#[tokio::test]
async fn key_shared_newcomer_waits_until_earlier_messages_are_acked() {
    let log = PartitionLog::Memory(MemoryLog::new("t", 1 << 20));
    let sub = setup(SubscriptionType::KeyShared, &log);
    let mut a = sub.add_consumer(consumer("a")).await.expect("a");
    a.flow(1000);
    publish(&log, 0, 20, 8).await;
    let first = drain(&mut a).await;
    assert_eq!(first.len(), 20);
    // b joins with a's twenty messages unacknowledged, then more come.
    let mut b = sub.add_consumer(consumer("b")).await.expect("b");
    b.flow(1000);
    publish(&log, 20, 20, 8).await;
    let a_more = drain(&mut a).await;
    assert!(drain(&mut b).await.is_empty(), "b got messages too early");
    // Once everything before b joined is acknowledged, b gets its keys.
    a.ack_many(first);
    let b_got = drain(&mut b).await;
    assert!(!b_got.is_empty());
    assert_eq!(a_more.len() + b_got.len(), 20);
    assert!(b_got.iter().all(|&o| o >= 20));
}

#[tokio::test]
async fn dead_letters_go_to_the_sink_after_the_limit() {
    let log = PartitionLog::Memory(MemoryLog::new("t", 1 << 20));
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink: DeadLetterSink = {
        let sent = sent.clone();
        Arc::new(move |topic: String, m: Message| {
            sent.lock().expect("lock").push((topic, m));
            Box::pin(async { Ok(()) })
        })
    };
    let sub = Subscription::start(SubscriptionSetup {
        topic: "t".into(),
        name: "s".into(),
        log: log.clone(),
        cursor: CursorState::new(0, 0),
        opts: SubscriptionOptions {
            sub_type: SubscriptionType::Shared,
            dead_letter: Some(DeadLetterPolicy {
                max_redeliveries: 1,
                topic: None,
            }),
            ..SubscriptionOptions::default()
        },
        store: None,
        dead_letter: Some(sink),
        partition: 0,
        delivered: Default::default(),
    });
    let mut c = sub.add_consumer(consumer("a")).await.expect("consumer");
    c.flow(10);
    publish(&log, 0, 1, 1).await;
    for n in 0..2 {
        let d = c.recv().await.expect("delivery");
        assert_eq!(d.redelivery_count, n);
        c.nack(vec![d.offset], Duration::ZERO);
    }
    assert!(drain(&mut c).await.is_empty());
    let sent = sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "t-s-DLQ");
    assert_eq!(sub.stats().await.expect("stats").msg_backlog, 0);
}

#[test]
fn subscription_types_parse_like_pulsar_names() {
    assert_eq!(
        SubscriptionType::parse("Key_Shared").expect("parse"),
        SubscriptionType::KeyShared
    );
    assert_eq!(
        SubscriptionType::parse("shared").expect("parse"),
        SubscriptionType::Shared
    );
    assert!(SubscriptionType::parse("bogus").is_err());
}
