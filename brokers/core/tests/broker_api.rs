//! The protocol-neutral broker API against a real metadata node and
//! bookie, all in this process.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::Cluster;
use magnetar_broker::managed_ledger::ManagedLedgerConfig;
use magnetar_broker::routing::{Binding, ExchangeDef, ExchangeKind, HeaderValue};
use magnetar_broker::{
    Broker, BrokerConfig, BrokerError, BrokerInfo, Consumer, ConsumerOptions, DeadLetterPolicy,
    Delivery, InitialPosition, Message, RetentionHold, SubscriptionOptions, SubscriptionType,
};
use magnetar_tenancy::{NamespaceName, TopicName};

const WAIT: Duration = Duration::from_secs(10);

fn config(id: &str) -> BrokerConfig {
    let mut cfg = BrokerConfig::new(
        "test",
        BrokerInfo {
            id: id.into(),
            http_url: format!("http://{id}"),
            listeners: Default::default(),
        },
    );
    cfg.managed_ledger = ManagedLedgerConfig {
        max_entries_per_ledger: 20,
        ..ManagedLedgerConfig::default()
    };
    cfg.retention_interval = Duration::from_secs(3600);
    cfg
}

async fn broker(c: &Cluster) -> Broker {
    Broker::start(c.meta_client(), config("b1"))
        .await
        .expect("broker")
}

fn topic(s: &str) -> TopicName {
    s.parse().expect("topic")
}

fn shared(sub_type: SubscriptionType) -> SubscriptionOptions {
    SubscriptionOptions {
        sub_type,
        initial_position: InitialPosition::Earliest,
        ..SubscriptionOptions::default()
    }
}

fn named(name: &str) -> ConsumerOptions {
    ConsumerOptions {
        name: name.into(),
        ..ConsumerOptions::default()
    }
}

fn text(d: &Delivery) -> String {
    String::from_utf8(d.message.value.clone().unwrap_or_default().to_vec()).expect("utf8")
}

async fn recv(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(WAIT, c.recv())
        .await
        .expect("a message in time")
        .expect("subscription open")
}

async fn nothing_within(c: &mut Consumer, d: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(d, c.recv()).await {
        panic!("unexpected delivery of offset {}", m.offset);
    }
}

async fn publish_n(b: &Broker, t: &TopicName, n: usize) {
    for i in 0..n {
        b.publish(t, vec![Message::new(format!("m{i}"))])
            .await
            .expect("publish");
    }
}

#[tokio::test]
async fn per_partition_order_and_fetch() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let base = topic("orders");
    b.create_partitioned_topic(&base, 3)
        .await
        .expect("partitioned");
    assert_eq!(b.partitions(&base).await.expect("meta"), Some(3));
    // Producers to the three partitions run concurrently, each pipelined.
    let tasks: Vec<_> = (0..3u32)
        .map(|p| {
            let b = b.clone();
            let t = base.partition(p);
            tokio::spawn(async move {
                let futs: Vec<_> = (0..200)
                    .map(|i| {
                        let b = b.clone();
                        let t = t.clone();
                        async move { b.publish(&t, vec![Message::new(format!("p{p}-{i}"))]).await }
                    })
                    .collect();
                futures::future::join_all(futs).await
            })
        })
        .collect();
    for t in tasks {
        for r in t.await.expect("join") {
            r.expect("publish");
        }
    }
    for p in 0..3u32 {
        let t = base.partition(p);
        let mut at = 0;
        let mut seen = Vec::new();
        while at < 200 {
            let f = b
                .fetch(&t, at, 1 << 20, Duration::ZERO)
                .await
                .expect("fetch");
            assert_eq!(f.end_offset, 200);
            for e in f.entries {
                for m in magnetar_broker::format::decode_entry(&e.data).expect("decode") {
                    seen.push((m.offset, m.message.value.expect("v")));
                }
                at = e.end_offset();
            }
        }
        // Offsets are dense and the payloads of one partition keep the
        // order the producer's futures were created in.
        let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
    }
    // A fetch past the end waits for data, then returns it.
    let t = base.partition(0);
    let waiter = {
        let b = b.clone();
        let t = t.clone();
        tokio::spawn(async move { b.fetch(&t, 200, 1 << 20, WAIT).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.publish(&t, vec![Message::new("late")])
        .await
        .expect("publish");
    let f = waiter.await.expect("join").expect("fetch");
    assert_eq!(f.entries[0].base_offset, 200);
    // The partitioned base name itself is not a partition.
    assert!(b.publish(&base, vec![Message::new("x")]).await.is_err());
}

#[tokio::test]
async fn shared_subscription_spreads_and_redelivers_when_a_consumer_closes() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("work");
    let opts = shared(SubscriptionType::Shared);
    let mut consumers = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let c = b
            .subscribe(&t, "workers", opts.clone(), named(name))
            .await
            .expect("subscribe");
        c.flow(1000);
        consumers.push(c);
    }
    publish_n(&b, &t, 300).await;
    let mut got: Vec<Vec<Delivery>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut total = 0;
    while total < 300 {
        for (i, c) in consumers.iter_mut().enumerate() {
            while let Some(d) = c.try_recv() {
                got[i].push(d);
                total += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, g) in got.iter().enumerate() {
        assert!(g.len() >= 60, "consumer {i} got only {}", g.len());
    }
    // c2 and c3 acknowledge; c1 closes without acknowledging.
    for (i, c) in consumers.iter().enumerate().skip(1) {
        c.ack_many(got[i].iter().map(|d| d.offset).collect());
    }
    let c1_offsets: BTreeSet<u64> = got[0].iter().map(|d| d.offset).collect();
    let mut rest = consumers.split_off(1);
    drop(consumers);
    let mut redelivered = BTreeSet::new();
    while redelivered.len() < c1_offsets.len() {
        for c in rest.iter_mut() {
            while let Some(d) = c.try_recv() {
                assert_eq!(d.redelivery_count, 1, "offset {}", d.offset);
                assert!(c1_offsets.contains(&d.offset));
                redelivered.insert(d.offset);
                c.ack(d.offset);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(redelivered, c1_offsets);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = b.topic_stats(&t).await.expect("stats");
    let s = &stats.subscriptions["workers"];
    assert_eq!(s.msg_backlog, 0, "{s:?}");
    assert_eq!(s.mark_delete_offset, 300);
}

#[tokio::test]
async fn cumulative_and_individual_acks_survive_reconnects() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("acks");
    let opts = shared(SubscriptionType::Exclusive);
    let mut c1 = b
        .subscribe(&t, "s", opts.clone(), named("a"))
        .await
        .expect("subscribe");
    // Exclusive admits one consumer.
    assert!(b
        .subscribe(&t, "s", opts.clone(), named("b"))
        .await
        .is_err());
    c1.flow(100);
    publish_n(&b, &t, 10).await;
    for i in 0..10 {
        assert_eq!(recv(&mut c1).await.offset, i);
    }
    c1.ack_cumulative(4).expect("cumulative");
    c1.ack(5);
    c1.ack(7);
    drop(c1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c2 = b
        .subscribe(&t, "s", opts.clone(), named("a"))
        .await
        .expect("resubscribe");
    c2.flow(100);
    let mut offsets = Vec::new();
    for _ in 0..3 {
        offsets.push(recv(&mut c2).await.offset);
    }
    assert_eq!(offsets, vec![6, 8, 9]);
    nothing_within(&mut c2, Duration::from_millis(200)).await;
    // Cumulative acks are refused on shared subscriptions.
    let s = b
        .subscribe(&t, "shared", shared(SubscriptionType::Shared), named("x"))
        .await
        .expect("shared");
    assert!(s.ack_cumulative(1).is_err());
    // A different type on a live subscription is refused.
    assert!(b
        .subscribe(&t, "shared", shared(SubscriptionType::Failover), named("y"))
        .await
        .is_err());
}

#[tokio::test]
async fn nack_and_ack_timeout_redeliver_and_dead_letter_after_n() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("flaky");
    // Negative acknowledgement with a delay.
    let mut c1 = b
        .subscribe(&t, "nack", shared(SubscriptionType::Shared), named("a"))
        .await
        .expect("subscribe");
    c1.flow(100);
    publish_n(&b, &t, 1).await;
    let d = recv(&mut c1).await;
    assert_eq!(d.redelivery_count, 0);
    let at = tokio::time::Instant::now();
    c1.nack(vec![d.offset], Duration::from_millis(300));
    let again = recv(&mut c1).await;
    assert!(
        at.elapsed() >= Duration::from_millis(250),
        "{:?}",
        at.elapsed()
    );
    assert_eq!((again.offset, again.redelivery_count), (d.offset, 1));
    c1.ack(again.offset);

    // Ack timeout.
    let mut c2 = b
        .subscribe(
            &t,
            "timeout",
            shared(SubscriptionType::Shared),
            ConsumerOptions {
                name: "t".into(),
                ack_timeout: Some(Duration::from_millis(300)),
                ..ConsumerOptions::default()
            },
        )
        .await
        .expect("subscribe");
    c2.flow(100);
    let first = recv(&mut c2).await;
    let second = recv(&mut c2).await;
    assert_eq!((first.offset, second.offset), (0, 0));
    assert_eq!(second.redelivery_count, 1);
    c2.ack(second.offset);
    nothing_within(&mut c2, Duration::from_millis(500)).await;

    // Dead letter after two redeliveries: three deliveries, then the DLQ.
    let opts = SubscriptionOptions {
        dead_letter: Some(DeadLetterPolicy {
            max_redeliveries: 2,
            topic: None,
        }),
        ..shared(SubscriptionType::Shared)
    };
    let mut c3 = b
        .subscribe(&t, "dl", opts, named("d"))
        .await
        .expect("subscribe");
    c3.flow(100);
    for n in 0..3 {
        let d = recv(&mut c3).await;
        assert_eq!(d.redelivery_count, n);
        c3.nack(vec![d.offset], Duration::ZERO);
    }
    nothing_within(&mut c3, Duration::from_millis(300)).await;
    let dlq = topic("persistent://public/default/flaky-dl-DLQ");
    let mut dc = b
        .subscribe(
            &dlq,
            "inspect",
            shared(SubscriptionType::Exclusive),
            named("i"),
        )
        .await
        .expect("dlq subscribe");
    dc.flow(10);
    let dead = recv(&mut dc).await;
    assert_eq!(text(&dead), "m0");
    assert_eq!(
        dead.message.header("REAL_TOPIC").map(|v| v.to_vec()),
        Some(b"persistent://public/default/flaky".to_vec())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = b.topic_stats(&t).await.expect("stats");
    assert_eq!(stats.subscriptions["dl"].msg_backlog, 0);
}

#[tokio::test]
async fn failover_and_key_shared() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("keys");
    // Failover: only the active consumer (lowest priority, then name)
    // receives; when it leaves the standby takes over its unacked messages.
    let opts = shared(SubscriptionType::Failover);
    let mut a = b
        .subscribe(&t, "fo", opts.clone(), named("a"))
        .await
        .expect("a");
    let mut z = b
        .subscribe(&t, "fo", opts.clone(), named("z"))
        .await
        .expect("z");
    a.flow(100);
    z.flow(100);
    publish_n(&b, &t, 5).await;
    for i in 0..5 {
        assert_eq!(recv(&mut a).await.offset, i);
    }
    nothing_within(&mut z, Duration::from_millis(200)).await;
    a.ack(0);
    drop(a);
    for i in 1..5 {
        let d = recv(&mut z).await;
        assert_eq!((d.offset, d.redelivery_count), (i, 1));
    }

    // Key-shared: every key sticks to one consumer.
    let opts = shared(SubscriptionType::KeyShared);
    let mut ks = Vec::new();
    for name in ["k1", "k2", "k3"] {
        let c = b
            .subscribe(&t, "ks", opts.clone(), named(name))
            .await
            .expect("ks");
        c.flow(1000);
        ks.push(c);
    }
    for i in 0..300 {
        let m = Message::new(format!("v{i}")).with_key(format!("key-{}", i % 10));
        b.publish(&t, vec![m]).await.expect("publish");
    }
    let mut owner: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut last: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut n = 0;
    while n < 300 {
        for (i, c) in ks.iter_mut().enumerate() {
            while let Some(d) = c.try_recv() {
                if d.offset < 5 {
                    c.ack(d.offset);
                    continue;
                }
                let key = d.message.key.clone().expect("key").to_vec();
                assert_eq!(*owner.entry(key.clone()).or_insert(i), i, "key moved");
                let prev = last.insert(key, d.offset);
                assert!(prev.is_none_or(|p| p < d.offset), "order within a key");
                c.ack(d.offset);
                n += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let users: BTreeSet<usize> = owner.values().copied().collect();
    assert!(users.len() >= 2, "keys spread over consumers: {owner:?}");
}

#[tokio::test]
async fn retention_by_acknowledgement_deletes_ledgers_on_the_bookies() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("queue-like");
    let mut q = b
        .subscribe(&t, "q", shared(SubscriptionType::Shared), named("q"))
        .await
        .expect("subscribe");
    q.flow(1000);
    publish_n(&b, &t, 100).await;
    let before = b.topic(&t, false).await.expect("topic").ledgers();
    assert!(before.len() >= 5, "{before:?}");
    // Half acknowledged: only wholly acknowledged ledgers may go.
    for _ in 0..50 {
        let d = recv(&mut q).await;
        q.ack(d.offset);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = b.run_retention().await.deleted;
    assert_eq!(deleted.len(), 2, "ledgers of offsets 0..40 go: {before:?}");
    for _ in 50..100 {
        let d = recv(&mut q).await;
        q.ack(d.offset);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted2 = b.run_retention().await.deleted;
    // Everything acknowledged is gone; only the ledger being written stays.
    let after = b.topic(&t, false).await.expect("topic").ledgers();
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!after[0].is_closed());
    assert_eq!(deleted.len() + deleted2.len(), 5);
    let client = c.ledger_client();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in deleted.iter().chain(&deleted2) {
        assert!(
            client.metadata(*id).await.is_err(),
            "ledger {id} metadata kept"
        );
        assert!(
            c.bookie(1).storage().read(*id, 0).is_err(),
            "bookie still holds ledger {id}"
        );
    }
    // A topic without subscriptions keeps its data (stream retention).
    let s = topic("stream");
    publish_n(&b, &s, 60).await;
    assert!(b.run_retention().await.deleted.is_empty());
    assert_eq!(b.topic_stats(&s).await.expect("stats").start_offset, 0);
}

/// A consumer whose positions live outside the subscriptions, as Kafka
/// groups do: one offset per partition.
struct FixedHold(std::sync::Mutex<HashMap<TopicName, u64>>);

impl RetentionHold for FixedHold {
    fn holds<'a>(
        &'a self,
        ns: &'a NamespaceName,
    ) -> futures::future::BoxFuture<'a, magnetar_broker::Result<HashMap<TopicName, u64>>> {
        let held = self
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _)| t.namespace() == ns)
            .map(|(t, o)| (t.clone(), *o))
            .collect();
        Box::pin(async move { Ok(held) })
    }
}

#[tokio::test]
async fn retention_keeps_what_holds_and_system_subscriptions_need() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let hold = std::sync::Arc::new(FixedHold(Default::default()));
    b.add_retention_hold(hold.clone());
    // A system subscription (a route's, a replicator's) keeps a stream a
    // stream: nothing goes although it acknowledged everything.
    for (stream, sub) in [
        ("routed-stream", "__route"),
        ("replicated-stream", "pulsar.repl.west"),
    ] {
        let s = topic(stream);
        publish_n(&b, &s, 60).await;
        let mut r = b
            .subscribe(&s, sub, shared(SubscriptionType::Shared), named("r"))
            .await
            .expect("subscribe");
        r.flow(1000);
        for _ in 0..60 {
            let d = recv(&mut r).await;
            r.ack(d.offset);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let run = b.run_retention().await;
        assert!(run.failed.is_empty(), "{:?}", run.failed);
        assert!(run.deleted.is_empty(), "{sub}: {:?}", run.deleted);
        assert_eq!(b.topic_stats(&s).await.expect("stats").start_offset, 0);
    }

    // A user subscription from the latest offset makes a queue of it, but
    // a hold at offset 10 keeps every ledger from there on.
    let t = topic("kafka-and-dashboard");
    publish_n(&b, &t, 100).await;
    hold.0.lock().expect("lock").insert(t.clone(), 10);
    let mut latest = shared(SubscriptionType::Shared);
    latest.initial_position = InitialPosition::Latest;
    let _dash = b
        .subscribe(&t, "dash", latest, named("dash"))
        .await
        .expect("subscribe");
    let run = b.run_retention().await;
    assert!(run.failed.is_empty(), "{:?}", run.failed);
    assert_eq!(run.deleted.len(), 0, "only offsets below 10 may go");
    assert_eq!(b.topic_stats(&t).await.expect("stats").start_offset, 0);
    // Once the hold reaches the end, acknowledged data goes at once.
    hold.0.lock().expect("lock").insert(t.clone(), 100);
    let run = b.run_retention().await;
    assert_eq!(run.deleted.len(), 5, "{run:?}");
    assert_eq!(b.topic_stats(&t).await.expect("stats").start_offset, 100);
}

#[tokio::test]
async fn exchanges_route_like_rabbitmq() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let ns = NamespaceName::default_namespace();
    for q in ["qa", "qb", "qc", "qd"] {
        b.declare_queue(&ns, q, true).await.expect("queue");
    }
    let ex = |name: &str, kind| ExchangeDef {
        durable: true,
        ..ExchangeDef::new(name, kind)
    };
    b.declare_exchange(&ns, ex("logs", ExchangeKind::Topic), false)
        .await
        .expect("x");
    b.declare_exchange(&ns, ex("all", ExchangeKind::Fanout), false)
        .await
        .expect("x");
    b.declare_exchange(&ns, ex("direct", ExchangeKind::Direct), false)
        .await
        .expect("x");
    b.declare_exchange(&ns, ex("hdr", ExchangeKind::Headers), false)
        .await
        .expect("x");
    b.bind(&ns, Binding::queue("logs", "qa", "*.error"))
        .await
        .expect("bind");
    b.bind(&ns, Binding::queue("logs", "qb", "kern.#"))
        .await
        .expect("bind");
    b.bind(&ns, Binding::queue("direct", "qc", "k"))
        .await
        .expect("bind");
    b.bind(&ns, Binding::queue("all", "qd", ""))
        .await
        .expect("bind");
    b.bind(
        &ns,
        Binding::queue("hdr", "qd", "").with_arguments(vec![
            ("x-match".into(), HeaderValue::from("any")),
            ("format".into(), HeaderValue::from("pdf")),
        ]),
    )
    .await
    .expect("bind");
    // Exchange to exchange: everything on `logs` also goes to `all`.
    b.bind(&ns, Binding::exchange("logs", "all", "#"))
        .await
        .expect("e2e");
    let route = |ex: &'static str, key: &'static str, headers: Vec<(String, HeaderValue)>| {
        let b = b.clone();
        let ns = ns.clone();
        async move {
            b.route_publish(&ns, ex, key, &headers, Message::new(key))
                .await
                .expect("route")
                .queues
                .into_iter()
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        route("logs", "kern.error", vec![]).await,
        vec!["qa", "qb", "qd"]
    );
    assert_eq!(route("logs", "app.error", vec![]).await, vec!["qa", "qd"]);
    assert_eq!(route("logs", "kern", vec![]).await, vec!["qb", "qd"]);
    assert_eq!(route("logs", "a.b.error", vec![]).await, vec!["qd"]);
    assert_eq!(route("direct", "k", vec![]).await, vec!["qc"]);
    assert!(route("direct", "other", vec![]).await.is_empty());
    assert_eq!(route("", "qc", vec![]).await, vec!["qc"]);
    assert_eq!(
        route("hdr", "", vec![("format".into(), HeaderValue::from("pdf"))]).await,
        vec!["qd"]
    );
    assert!(
        route("hdr", "", vec![("format".into(), HeaderValue::from("zip"))])
            .await
            .is_empty()
    );
    // The routed messages are in the queues' topics.
    let qa = ns
        .topic(magnetar_tenancy::TopicDomain::Persistent, "qa")
        .expect("t");
    let mut c1 = b
        .subscribe(&qa, "read", shared(SubscriptionType::Exclusive), named("r"))
        .await
        .expect("subscribe");
    c1.flow(10);
    assert_eq!(text(&recv(&mut c1).await), "kern.error");
    assert_eq!(text(&recv(&mut c1).await), "app.error");
    // Durable routing survives a broker restart.
    b.shutdown().await;
    let b2 = Broker::start(c.meta_client(), config("b1"))
        .await
        .expect("restart");
    let again = b2
        .route_publish(&ns, "logs", "x.error", &[], Message::new("again"))
        .await
        .expect("route");
    assert_eq!(
        again.queues.into_iter().collect::<Vec<_>>(),
        vec!["qa", "qd"]
    );
}

#[tokio::test]
async fn data_and_cursors_survive_a_broker_restart() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("durable");
    let mut s = b
        .subscribe(&t, "s", shared(SubscriptionType::Shared), named("a"))
        .await
        .expect("subscribe");
    s.flow(100);
    publish_n(&b, &t, 50).await;
    for _ in 0..30 {
        let d = recv(&mut s).await;
        s.ack(d.offset);
    }
    drop(s);
    b.shutdown().await;
    let b = Broker::start(c.meta_client(), config("b1"))
        .await
        .expect("restart");
    let mut s = b
        .subscribe(&t, "s", shared(SubscriptionType::Shared), named("a"))
        .await
        .expect("subscribe");
    s.flow(100);
    for i in 30..50 {
        let d = recv(&mut s).await;
        assert_eq!((d.offset, text(&d)), (i, format!("m{i}")));
    }
    assert_eq!(b.topic_stats(&t).await.expect("stats").end_offset, 50);
}

#[tokio::test]
async fn retried_sends_of_an_idempotent_producer_are_stored_once() {
    use magnetar_broker::{ProducerSequence, Published};
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let t = topic("dedup");
    let seq = |n: i32| ProducerSequence {
        producer_id: 42,
        epoch: 0,
        base_sequence: n,
    };
    for n in 0..10 {
        let r = b
            .publish_idempotent(&t, vec![Message::new(format!("m{n}"))], seq(n))
            .await
            .expect("publish");
        assert_eq!(r, Published::Stored(n as u64));
    }
    let again = b
        .publish_idempotent(&t, vec![Message::new("m5")], seq(5))
        .await
        .expect("retry");
    assert_eq!(again, Published::Duplicate);
    // The state outlives the broker.
    b.shutdown().await;
    let b = Broker::start(c.meta_client(), config("b1"))
        .await
        .expect("restart");
    assert_eq!(
        b.publish_idempotent(&t, vec![Message::new("m9")], seq(9))
            .await
            .expect("retry"),
        Published::Duplicate
    );
    assert_eq!(
        b.publish_idempotent(&t, vec![Message::new("m10")], seq(10))
            .await
            .expect("next"),
        Published::Stored(10)
    );
    // Without a producer identity nothing is deduplicated.
    assert_eq!(
        b.publish(&t, vec![Message::new("plain")])
            .await
            .expect("plain"),
        11
    );
    // A gap is out of order, as Kafka's brokers answer it.
    let gap = b
        .publish_idempotent(&t, vec![Message::new("m13")], seq(13))
        .await;
    assert!(
        matches!(gap, Err(BrokerError::OutOfOrderSequence(_))),
        "{gap:?}"
    );
    // A new epoch starts again at zero and fences the old one.
    let epoch = |e: i16, n: i32| ProducerSequence {
        producer_id: 42,
        epoch: e,
        base_sequence: n,
    };
    let restart = b
        .publish_idempotent(&t, vec![Message::new("e1-3")], epoch(1, 3))
        .await;
    assert!(
        matches!(restart, Err(BrokerError::OutOfOrderSequence(_))),
        "{restart:?}"
    );
    assert_eq!(
        b.publish_idempotent(&t, vec![Message::new("e1-0")], epoch(1, 0))
            .await
            .expect("new epoch"),
        Published::Stored(12)
    );
    let old = b
        .publish_idempotent(&t, vec![Message::new("m11")], seq(11))
        .await;
    assert!(
        matches!(old, Err(BrokerError::ProducerFenced(_))),
        "{old:?}"
    );
}

/// A broker with its HTTP listener, which other brokers forward to.
async fn serving_broker(c: &Cluster) -> Broker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut cfg = config(&addr);
    cfg.info.http_url = format!("http://{addr}");
    let b = Broker::start(c.meta_client(), cfg).await.expect("broker");
    let app = magnetar_broker::http::router(b.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    b
}

#[tokio::test]
async fn routing_changes_of_another_broker_keep_local_transient_queues() {
    let c = Cluster::start(1).await;
    let b1 = serving_broker(&c).await;
    let b2 = serving_broker(&c).await;
    let ns = NamespaceName::default_namespace();
    // b1: a transient queue bound to amq.topic, as a clean MQTT session has.
    b1.declare_queue(&ns, "session-1", false)
        .await
        .expect("queue");
    b1.bind(&ns, Binding::queue("amq.topic", "session-1", "sensors.#"))
        .await
        .expect("bind");
    // b2 adds a durable queue and binding; b1 learns of it by watching.
    b2.declare_queue(&ns, "archive", true).await.expect("queue");
    b2.bind(&ns, Binding::queue("amq.topic", "archive", "sensors.*"))
        .await
        .expect("bind");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let routed = b1
            .route_publish(&ns, "amq.topic", "sensors.t1", &[], Message::new("21.5"))
            .await
            .expect("route");
        let queues: Vec<String> = routed.queues.into_iter().collect();
        if queues == vec!["archive".to_string(), "session-1".to_string()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "routes seen by b1: {queues:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b1 changes routing again after b2: its write is based on b2's.
    b1.bind(&ns, Binding::queue("amq.topic", "archive", "alerts.#"))
        .await
        .expect("bind");
    let stored = b2.routing_snapshot(&ns).await.expect("snapshot");
    assert!(
        stored.queues.iter().all(|q| q != "session-1"),
        "transient queue stored"
    );
    // b2 owns `archive`: what b1 routed there was forwarded and stored.
    let archive = ns
        .topic(magnetar_tenancy::TopicDomain::Persistent, "archive")
        .expect("t");
    assert_eq!(b2.lookup(&archive).await.expect("owner").id, b2.info().id);
    assert!(b2.topic_stats(&archive).await.expect("stats").end_offset >= 1);
    // A plain publish to it through b1 is forwarded too.
    let at = b1
        .publish(&archive, vec![Message::new("via b1")])
        .await
        .expect("forwarded");
    let f = b2
        .fetch(&archive, at, 1 << 20, Duration::ZERO)
        .await
        .expect("fetch");
    let m = &magnetar_broker::format::decode_entry(&f.entries[0].data).expect("decode")[0];
    assert_eq!(m.message.value.as_deref(), Some(&b"via b1"[..]));
    // Bodies larger than a default HTTP request body are forwarded too.
    let big = vec![7u8; 5 << 20];
    let at = b1
        .publish(&archive, vec![Message::new(big.clone())])
        .await
        .expect("a 5 MiB message forwarded");
    let f = b2
        .fetch(&archive, at, 16 << 20, Duration::ZERO)
        .await
        .expect("fetch");
    let m = &magnetar_broker::format::decode_entry(&f.entries[0].data).expect("decode")[0];
    assert_eq!(m.message.value.as_deref(), Some(&big[..]));
}

#[tokio::test]
async fn message_ttl_expires_old_messages_and_timestamps_find_offsets() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let ns: NamespaceName = "public/ttl".parse().expect("ns");
    let policies = magnetar_tenancy::Policies {
        message_ttl_in_seconds: Some(1),
        ..Default::default()
    };
    b.tenancy()
        .create_namespace(&ns, &policies)
        .await
        .expect("namespace");
    let t = topic("persistent://public/ttl/readings");
    let _idle = b
        .subscribe(&t, "idle", shared(SubscriptionType::Shared), named("idle"))
        .await
        .expect("subscribe");
    // 25 messages span two ledgers (20 entries each), then a pause.
    publish_n(&b, &t, 25).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let between = magnetar_bookies::meta::now_ms() as i64;
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish_n(&b, &t, 5).await;
    let topic = b.topic(&t, false).await.expect("topic");
    assert_eq!(topic.offset_for_timestamp(0).await.expect("lookup"), 0);
    assert_eq!(
        topic.offset_for_timestamp(between).await.expect("lookup"),
        25
    );
    assert_eq!(
        topic.offset_for_timestamp(i64::MAX).await.expect("lookup"),
        30
    );
    // The first 25 are older than the TTL: they expire from the cursor.
    assert!(b.run_retention().await.failed.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = &b.topic_stats(&t).await.expect("stats").subscriptions["idle"];
    assert_eq!((s.mark_delete_offset, s.msg_backlog), (25, 5), "{s:?}");
}

#[tokio::test]
async fn backlog_quota_refuses_producers_or_evicts_the_slowest() {
    use magnetar_tenancy::{BacklogQuota, BacklogQuotaPolicy, Policies};
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let quota = |policy| Policies {
        backlog_quota_map: [(
            "destination_storage".to_string(),
            BacklogQuota {
                limit_size: 2048,
                limit_time: -1,
                policy,
            },
        )]
        .into(),
        ..Default::default()
    };
    // producer_exception: publishing fails once the backlog is over 2 KiB,
    // and works again once the subscription catches up.
    let strict: NamespaceName = "public/strict".parse().expect("ns");
    b.tenancy()
        .create_namespace(&strict, &quota(BacklogQuotaPolicy::ProducerException))
        .await
        .expect("namespace");
    let t = topic("persistent://public/strict/q");
    let mut c1 = b
        .subscribe(&t, "slow", shared(SubscriptionType::Shared), named("slow"))
        .await
        .expect("subscribe");
    let mut stored = 0;
    let refused = loop {
        match b.publish(&t, vec![Message::new(vec![b'x'; 100])]).await {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "the quota never applied");
    };
    assert!(
        matches!(refused, magnetar_broker::BrokerError::QuotaExceeded(_)),
        "{refused:?}"
    );
    assert!(stored >= 10, "refused too early, after {stored}");
    c1.flow(10_000);
    for _ in 0..stored {
        let d = recv(&mut c1).await;
        c1.ack(d.offset);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.publish(&t, vec![Message::new("again")])
        .await
        .expect("under quota again");

    // consumer_backlog_eviction: retention moves the slow cursor forward.
    let evict: NamespaceName = "public/evict".parse().expect("ns");
    b.tenancy()
        .create_namespace(&evict, &quota(BacklogQuotaPolicy::ConsumerBacklogEviction))
        .await
        .expect("namespace");
    let t = topic("persistent://public/evict/q");
    let _idle = b
        .subscribe(&t, "idle", shared(SubscriptionType::Shared), named("idle"))
        .await
        .expect("subscribe");
    for _ in 0..100 {
        b.publish(&t, vec![Message::new(vec![b'x'; 100])])
            .await
            .expect("never refused");
    }
    let topic = b.topic(&t, false).await.expect("topic");
    assert!(topic.backlog_bytes().await > 2048);
    assert!(b.run_retention().await.failed.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = &b.topic_stats(&t).await.expect("stats").subscriptions["idle"];
    assert!(s.mark_delete_offset >= 60, "{s:?}");
    assert!(
        topic.backlog_bytes().await <= 2048 + 20 * 200,
        "within the quota, to a ledger"
    );
}

#[tokio::test]
async fn a_route_republishes_a_topics_records_through_an_exchange() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let ns = NamespaceName::default_namespace();
    let src = topic("persistent://public/default/written-directly");
    b.create_topic(&src).await.expect("topic");
    b.declare_queue(&ns, "sensors", true).await.expect("queue");
    b.bind(&ns, Binding::queue("amq.topic", "sensors", "sensors.#"))
        .await
        .expect("bind");
    let route = |exchange: &str| magnetar_broker::TopicRoute {
        exchange: exchange.into(),
        routing_key: Some("sensors.unkeyed".into()),
    };
    assert!(matches!(
        b.set_topic_route(&src, Some(route("no-such-exchange")))
            .await,
        Err(BrokerError::NotFound(_))
    ));
    assert!(matches!(
        b.set_topic_route(
            &topic("persistent://public/default/absent"),
            Some(route("amq.topic"))
        )
        .await,
        Err(BrokerError::NotFound(_))
    ));
    b.set_topic_route(&src, Some(route("amq.topic")))
        .await
        .expect("route");
    assert_eq!(
        b.topic_route(&src).await.expect("get"),
        Some(route("amq.topic"))
    );
    // Written right after the route was set: routed, in order, keyed or not.
    let mut keyed = Message::new("one");
    keyed.key = Some("sensors.a".into());
    keyed.headers = vec![("h".into(), Some("v".into()))];
    let mut elsewhere = Message::new("dropped");
    elsewhere.key = Some("other.b".into());
    b.publish(&src, vec![keyed, elsewhere, Message::new("two")])
        .await
        .expect("publish");
    let q = ns
        .topic(magnetar_tenancy::TopicDomain::Persistent, "sensors")
        .expect("t");
    let mut c1 = b
        .subscribe(&q, "read", shared(SubscriptionType::Exclusive), named("r"))
        .await
        .expect("subscribe");
    c1.flow(10);
    let first = recv(&mut c1).await;
    assert_eq!(text(&first), "one");
    assert_eq!(first.message.key.as_deref(), Some(&b"sensors.a"[..]));
    assert_eq!(first.message.headers[0], ("h".into(), Some("v".into())));
    assert_eq!(
        first.message.headers[1],
        (
            magnetar_broker::topic_route::ROUTED_FROM.into(),
            Some(src.to_string().into())
        )
    );
    let second = recv(&mut c1).await;
    assert_eq!(text(&second), "two");
    c1.ack_many(vec![first.offset, second.offset]);
    nothing_within(&mut c1, Duration::from_millis(300)).await;
    // A route into a queue that routes back does not loop.
    b.declare_queue(&ns, "loop", true).await.expect("queue");
    b.bind(&ns, Binding::queue("amq.topic", "loop", "loop.#"))
        .await
        .expect("bind");
    let lq = ns
        .topic(magnetar_tenancy::TopicDomain::Persistent, "loop")
        .expect("t");
    b.set_topic_route(&lq, Some(route("amq.topic")))
        .await
        .expect("route");
    let mut l = Message::new("once");
    l.key = Some("loop.x".into());
    b.publish(&src, vec![l]).await.expect("publish");
    let mut c2 = b
        .subscribe(&lq, "read", shared(SubscriptionType::Exclusive), named("r"))
        .await
        .expect("subscribe");
    c2.flow(10);
    assert_eq!(text(&recv(&mut c2).await), "once");
    nothing_within(&mut c2, Duration::from_millis(500)).await;
    // The route survives a restart, and what was written while no
    // forwarder ran is routed once one runs again.
    b.shutdown().await;
    drop(c1);
    let b = Broker::start(c.meta_client(), config("b1"))
        .await
        .expect("restart");
    let mut late = Message::new("after restart");
    late.key = Some("sensors.c".into());
    b.publish(&src, vec![late]).await.expect("publish");
    let mut c3 = b
        .subscribe(&q, "read", shared(SubscriptionType::Exclusive), named("r"))
        .await
        .expect("subscribe");
    c3.flow(10);
    assert_eq!(text(&recv(&mut c3).await), "after restart");
    // Removing the route removes its subscription, and its backlog.
    b.set_topic_route(&src, None).await.expect("unroute");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let subs = b.topic_stats(&src).await.expect("stats").subscriptions;
        if !subs.contains_key(magnetar_broker::topic_route::ROUTE_SUBSCRIPTION) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "route subscription kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_full_routing_table_refuses_with_a_quota_error_and_still_shrinks() {
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let ns = NamespaceName::default_namespace();
    b.declare_queue(&ns, "q", true).await.expect("queue");
    b.declare_exchange(
        &ns,
        ExchangeDef {
            durable: true,
            ..ExchangeDef::new("wide", ExchangeKind::Topic)
        },
        false,
    )
    .await
    .expect("x");
    // Long binding keys fill the namespace's one routing value (1 MiB).
    let key = |i: usize| format!("{i}.{}", "k".repeat(16 * 1024));
    let mut bound = 0;
    let refused = loop {
        match b.bind(&ns, Binding::queue("wide", "q", key(bound))).await {
            Ok(()) => bound += 1,
            Err(e) => break e,
        }
        assert!(bound < 200, "the routing table never filled");
    };
    assert!(
        matches!(refused, magnetar_broker::BrokerError::QuotaExceeded(_)),
        "{refused:?}"
    );
    assert!(bound >= 50, "refused after {bound}");
    // Unbinding still works, and makes room again.
    b.unbind(&ns, &Binding::queue("wide", "q", key(0)))
        .await
        .expect("unbind");
    b.bind(&ns, Binding::queue("wide", "q", "small"))
        .await
        .expect("room again");
    b.declare_queue(&ns, "q2", true).await.expect("queue");
}

#[tokio::test]
async fn idle_non_persistent_topics_without_subscriptions_are_unloaded() {
    let c = Cluster::start(1).await;
    let mut cfg = config("b1");
    cfg.memory_topic_idle = Duration::from_secs(1);
    let b = Broker::start(c.meta_client(), cfg).await.expect("broker");
    let loaded = |b: Broker| async move {
        b.loaded_topics()
            .await
            .iter()
            .map(|t| t.name().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let spam = topic("non-persistent://public/default/spam");
    let watched = topic("non-persistent://public/default/watched");
    let kept = topic("persistent://public/default/kept");
    b.publish(&spam, vec![Message::new("x")])
        .await
        .expect("publish");
    let mut c1 = b
        .subscribe(&watched, "s", shared(SubscriptionType::Shared), named("c"))
        .await
        .expect("subscribe");
    b.publish(&kept, vec![Message::new("x")])
        .await
        .expect("publish");
    // A transient queue holds its messages for a consumer to come.
    let ns = NamespaceName::default_namespace();
    let queue = b.declare_queue(&ns, "later", false).await.expect("queue");
    b.publish(&queue, vec![Message::new("waiting")])
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = loaded(b.clone()).await;
    assert!(!now.contains(&spam.to_string()), "{now:?}");
    for t in [&watched, &kept, &queue] {
        assert!(now.contains(&t.to_string()), "{t} went: {now:?}");
    }
    b.publish(&watched, vec![Message::new("still")])
        .await
        .expect("publish");
    c1.flow(10);
    assert_eq!(
        recv(&mut c1).await.message.value.as_deref(),
        Some(&b"still"[..])
    );
    let mut c2 = b
        .subscribe(&queue, "q", shared(SubscriptionType::Shared), named("c2"))
        .await
        .expect("subscribe");
    c2.flow(10);
    assert_eq!(
        recv(&mut c2).await.message.value.as_deref(),
        Some(&b"waiting"[..])
    );
    // The unloaded one loads again on its next use.
    b.publish(&spam, vec![Message::new("again")])
        .await
        .expect("publish");
}

/// Batches replicated from another cluster are stored once each, in
/// order, whatever is resent, and the watermark outlives the topic's
/// unloading: it lives in the log.
#[tokio::test]
async fn replicated_batches_are_stored_exactly_once() {
    use magnetar_broker::format::{encode_batch, with_base_offset};
    use magnetar_broker::topic::ReplicatedAppend;
    let c = Cluster::start(1).await;
    let b = broker(&c).await;
    let name = topic("replicated");
    // Source entries at offsets 0..3 and 5..7 (3..5 held nothing to
    // replicate), as the source's log stores them.
    let batch = |base: u64, n: usize| {
        let msgs: Vec<Message> = (0..n)
            .map(|i| Message::new(format!("east-{}", base as usize + i)))
            .collect();
        with_base_offset(encode_batch(&msgs, None).expect("batch"), base)
    };
    let (first, second) = (batch(0, 3), batch(5, 2));
    let t = b.topic(&name, true).await.expect("topic");
    assert_eq!(t.replication_handshake(9, 1).await.expect("handshake"), 0);
    let stored = |r: ReplicatedAppend| async move {
        match r {
            ReplicatedAppend::Pending(p) => Some(p.await.expect("durable")),
            ReplicatedAppend::Duplicate => None,
            ReplicatedAppend::OutOfOrder { next } => panic!("out of order, next {next}"),
        }
    };
    let r = t
        .submit_replicated(9, 0, first.clone())
        .await
        .expect("first");
    assert_eq!(stored(r).await, Some(0));
    // A resend is a duplicate; skipping what was not acknowledged is not
    // allowed.
    let r = t
        .submit_replicated(9, 0, first.clone())
        .await
        .expect("resend");
    assert!(matches!(r, ReplicatedAppend::Duplicate));
    let r = t
        .submit_replicated(9, 7, batch(7, 1))
        .await
        .expect("a hole");
    assert!(matches!(r, ReplicatedAppend::OutOfOrder { next: 3 }));
    let r = t
        .submit_replicated(9, 3, second.clone())
        .await
        .expect("second");
    assert_eq!(stored(r).await, Some(3));
    // The records are as the source wrote them.
    let got = b
        .fetch(&name, 0, 1 << 20, Duration::ZERO)
        .await
        .expect("fetch");
    let values: Vec<String> = got
        .entries
        .iter()
        .flat_map(|e| magnetar_broker::format::decode_entry(&e.data).expect("decodes"))
        .map(|m| String::from_utf8(m.message.value.unwrap_or_default().to_vec()).expect("utf8"))
        .collect();
    assert_eq!(values, ["east-0", "east-1", "east-2", "east-5", "east-6"]);
    // More local idempotent producers than the partition remembers (it
    // forgets the least recently seen): the source's watermark is not
    // among them, and a resend is still a duplicate.
    let mut pending = Vec::new();
    for id in 0..10_050i64 {
        let b = encode_batch(
            &[Message::new("local")],
            Some(magnetar_broker::format::ProducerSequence {
                producer_id: id,
                epoch: 0,
                base_sequence: 0,
            }),
        )
        .expect("batch");
        pending.push(t.submit_batch(b).await.expect("submitted"));
    }
    for p in pending {
        p.await.expect("stored");
    }
    let r = t
        .submit_replicated(9, 3, second.clone())
        .await
        .expect("resend after churn");
    assert!(matches!(r, ReplicatedAppend::Duplicate));
    // A client cannot pass for replicated records.
    let one = batch(0, 1);
    let forged = magnetar_broker::format::with_geo_stamp(
        one.clone(),
        &magnetar_broker::format::validate_batch(&one).expect("valid"),
        magnetar_broker::replicated::GeoStamp::new(9, 100).expect("stamp"),
    )
    .expect("stamped");
    assert!(t.submit_batch(forged).await.is_err());
    // Unloaded and loaded again, the partition knows where the source
    // stands from its own log.
    drop(t);
    b.unload_topic(&name).await.expect("unload");
    let t = b.topic(&name, true).await.expect("topic again");
    assert_eq!(t.replication_handshake(9, 1).await.expect("handshake"), 7);
    let r = t
        .submit_replicated(9, 3, second)
        .await
        .expect("resend after reload");
    assert!(matches!(r, ReplicatedAppend::Duplicate));
    // And what continues it is stored, after the local records.
    let r = t
        .submit_replicated(9, 7, batch(7, 2))
        .await
        .expect("after reload");
    assert_eq!(stored(r).await, Some(5 + 10_050));
    // Another source cluster has a watermark of its own, and another life
    // of the source topic is refused rather than mixed in, even after a
    // reload with nothing written since the handshake.
    assert_eq!(t.replication_handshake(4, 1).await.expect("handshake"), 0);
    assert!(matches!(
        t.replication_handshake(9, 2).await,
        Err(BrokerError::PreconditionFailed(_))
    ));
    drop(t);
    b.unload_topic(&name).await.expect("unload");
    let t = b.topic(&name, true).await.expect("topic again");
    assert!(matches!(
        t.replication_handshake(4, 7).await,
        Err(BrokerError::PreconditionFailed(_))
    ));
}
