//! `magnetar-perf geo`: replication lag between two regions. Records are
//! written in one region at a fixed rate and read in the other; each
//! carries the time it was meant to be sent (so that a sender that falls
//! behind does not hide the delay, coordinated omission) and its number
//! (so that losses and duplicates are counted). The same run drives
//! Magnetar over Kafka, MQTT or AMQP, and the peers: two Mosquitto brokers
//! with a bridge (MQTT), two RabbitMQ nodes with exchange federation
//! (AMQP).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;

use crate::amqp::now_us;

#[derive(Args, Clone)]
pub struct GeoPerf {
    /// kafka, mqtt or amqp.
    #[arg(long, default_value = "kafka")]
    protocol: String,
    /// Where records are written: Kafka bootstrap servers, mqtt://HOST:PORT
    /// or amqp://HOST:PORT/VHOST.
    #[arg(long)]
    produce: String,
    /// Where they are read, in the other region.
    #[arg(long)]
    consume: String,
    /// Kafka topic (made beforehand in both regions), MQTT topic, or AMQP
    /// routing key on `amq.topic` (a queue of that name is bound to it
    /// where records are read).
    #[arg(long, default_value = "geo-lag")]
    topic: String,
    /// The AMQP exchange records go through (declared as a durable topic
    /// exchange unless it is an `amq.` one).
    #[arg(long, default_value = "amq.topic")]
    exchange: String,
    /// Partitions of the Kafka topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Bytes per record.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// How long to wait for the last records after the last send.
    #[arg(long, default_value_t = 15)]
    drain_seconds: u64,
    /// Pause between the reader being ready and the first record, for
    /// links that learn of the reader's binding (federation) first.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Printed on the result line (`rtt_ms=50`, `peer=mosquitto`, …).
    #[arg(long, default_value = "")]
    label: String,
}

/// What the reader saw: lag per record, and which numbers came.
struct Seen {
    lag: Histogram<u64>,
    got: Vec<u8>,
    dups: u64,
}

impl Seen {
    fn new(n: u64) -> Self {
        Seen {
            lag: Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"),
            got: vec![0; usize::try_from(n).unwrap_or(0)],
            dups: 0,
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let (Some(ts), Some(seq)) = (
            payload
                .get(0..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes),
            payload
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes),
        ) else {
            return;
        };
        let Some(slot) = usize::try_from(seq).ok().and_then(|i| self.got.get_mut(i)) else {
            return;
        };
        if *slot > 0 {
            self.dups += 1;
            return;
        }
        *slot = 1;
        let _ = self.lag.record(now_us().saturating_sub(ts).max(1));
    }

    fn received(&self) -> u64 {
        self.got.iter().filter(|g| **g > 0).count() as u64
    }
}

/// The record numbered `seq`, meant to go at `at_us`.
fn payload(at_us: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(16)];
    p[0..8].copy_from_slice(&at_us.to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Sleeps until record `i` is due; its intended send time (wall clock).
async fn pace(start: Instant, start_us: u64, rate: u64, i: u64) -> u64 {
    let offset = Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1));
    tokio::time::sleep_until((start + offset).into()).await;
    start_us + offset.as_micros() as u64
}

pub async fn run(args: GeoPerf) -> anyhow::Result<()> {
    let n = args.rate * args.seconds;
    let seen = Arc::new(Mutex::new(Seen::new(n)));
    let publish = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds"),
    ));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (args, seen, done) = (args.clone(), Arc::clone(&seen), Arc::clone(&done));
        tokio::spawn(async move {
            match args.protocol.as_str() {
                "kafka" => read_kafka(args, seen, ready_tx, done).await,
                "mqtt" => read_mqtt(args, seen, ready_tx).await,
                "amqp" => read_amqp(args, seen, ready_tx).await,
                p => anyhow::bail!("--protocol {p}: kafka, mqtt or amqp"),
            }
        })
    };
    ready_rx.await.context("the reader did not start")?;
    tokio::time::sleep(Duration::from_secs(args.warmup_seconds)).await;
    let sent = match args.protocol.as_str() {
        "kafka" => write_kafka(&args, n, Arc::clone(&publish)).await?,
        "mqtt" => write_mqtt(&args, n, Arc::clone(&publish)).await?,
        _ => write_amqp(&args, n, Arc::clone(&publish)).await?,
    };
    let deadline = Instant::now() + Duration::from_secs(args.drain_seconds);
    while Instant::now() < deadline {
        if seen.lock().expect("lock").received() >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The Kafka reader polls on a thread of its own, which abort cannot
    // stop.
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.abort();
    let s = seen.lock().expect("lock");
    let p = publish.lock().expect("lock");
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let received = s.received();
    println!(
        "geo protocol={} {}rate={} sent={} received={} lost={} duplicates={} lag_p50_ms={:.2} lag_p99_ms={:.2} lag_p999_ms={:.2} lag_max_ms={:.2} publish_p99_ms={:.2}",
        args.protocol,
        if args.label.is_empty() { String::new() } else { format!("{} ", args.label) },
        args.rate,
        sent,
        received,
        sent.saturating_sub(received),
        s.dups,
        ms(&s.lag, 0.5),
        ms(&s.lag, 0.99),
        ms(&s.lag, 0.999),
        s.lag.max() as f64 / 1000.0,
        ms(&p, 0.99),
    );
    Ok(())
}

/// A record the writer's broker acknowledged, meant to go at `at_us`.
fn count_ack(acked: &std::sync::atomic::AtomicU64, publish: &Mutex<Histogram<u64>>, at_us: u64) {
    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = publish
        .lock()
        .expect("lock")
        .record(now_us().saturating_sub(at_us).max(1));
}

// ---- Kafka (librdkafka) ----

async fn write_kafka(
    args: &GeoPerf,
    n: u64,
    publish: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<u64> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &args.produce)
        .set("linger.ms", "1")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    // One record per partition before the clock starts: the producer id,
    // the metadata and a connection to every leader are then in place, as
    // in a producer that has been running (and as OpenMessaging Benchmark's
    // warm-up phase does). Their number is out of range for the reader.
    let warm = payload(now_us(), u64::MAX, args.size);
    for partition in 0..args.partitions {
        let rec = FutureRecord::<[u8], _>::to(&args.topic)
            .payload(&warm)
            .partition(partition);
        p.send(rec, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("warm-up record: {e}"))?;
    }
    let (start, start_us) = (Instant::now(), now_us());
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = pace(start, start_us, args.rate, i).await;
        let value = payload(at, i, args.size);
        let key = (i % 1024).to_be_bytes();
        let rec = FutureRecord::to(&args.topic).payload(&value).key(&key);
        let fut = p
            .send_result(rec)
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
        let (publish, acked) = (Arc::clone(&publish), Arc::clone(&acked));
        pending.spawn(async move {
            if let Ok(Ok(_)) = fut.await {
                count_ack(&acked, &publish, at);
            }
        });
    }
    while pending.join_next().await.is_some() {}
    Ok(acked.load(std::sync::atomic::Ordering::Relaxed))
}

async fn read_kafka(
    args: GeoPerf,
    seen: Arc<Mutex<Seen>>,
    ready: tokio::sync::oneshot::Sender<()>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &args.consume)
            .set("group.id", format!("geo-lag-{}", now_us()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..args.partitions {
            tpl.add_partition_offset(&args.topic, p, rdkafka::Offset::Beginning)?;
        }
        c.assign(&tpl)?;
        let _ = ready.send(());
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                if let Some(v) = m.payload() {
                    seen.lock().expect("lock").record(v);
                }
            }
        }
        Ok(())
    })
    .await?
}

// ---- MQTT (rumqttc) ----

async fn write_mqtt(
    args: &GeoPerf,
    n: u64,
    publish: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<u64> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let (host, port) = crate::mqtt::host_port(&args.produce)?;
    let mut opts = MqttOptions::new(format!("geo-w-{}", now_us()), host, port);
    opts.set_inflight(1000);
    opts.set_max_packet_size(args.size + 1024, args.size + 1024);
    let (c, mut ev) = AsyncClient::new(opts, 10_000);
    // A warm-up record, acknowledged before the clock starts (as for Kafka).
    c.publish(
        &args.topic,
        QoS::AtLeastOnce,
        false,
        payload(now_us(), u64::MAX, args.size),
    )
    .await?;
    while !matches!(ev.poll().await?, Event::Incoming(Incoming::PubAck(_))) {}
    let sent_at = Arc::new(Mutex::new(std::collections::VecDeque::<u64>::new()));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let poller = {
        let (sent_at, acked, publish) = (Arc::clone(&sent_at), Arc::clone(&acked), publish);
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let Event::Incoming(Incoming::PubAck(_)) = e {
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(at) = sent_at.lock().expect("lock").pop_front() {
                        let _ = publish
                            .lock()
                            .expect("lock")
                            .record(now_us().saturating_sub(at).max(1));
                    }
                }
            }
        })
    };
    let (start, start_us) = (Instant::now(), now_us());
    for i in 0..n {
        let at = pace(start, start_us, args.rate, i).await;
        sent_at.lock().expect("lock").push_back(at);
        c.publish(
            &args.topic,
            QoS::AtLeastOnce,
            false,
            payload(at, i, args.size),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = c.disconnect().await;
    poller.abort();
    Ok(acked.load(std::sync::atomic::Ordering::Relaxed))
}

async fn read_mqtt(
    args: GeoPerf,
    seen: Arc<Mutex<Seen>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let (host, port) = crate::mqtt::host_port(&args.consume)?;
    let mut opts = MqttOptions::new(format!("geo-r-{}", now_us()), host, port);
    opts.set_max_packet_size(args.size + 1024, args.size + 1024);
    let (c, mut ev) = AsyncClient::new(opts, 10_000);
    c.subscribe(&args.topic, QoS::AtLeastOnce).await?;
    let mut ready = Some(ready);
    loop {
        match ev.poll().await.context("reading")? {
            Event::Incoming(Incoming::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Event::Incoming(Incoming::Publish(p)) => seen.lock().expect("lock").record(&p.payload),
            _ => {}
        }
    }
}

// ---- AMQP (lapin) ----

async fn amqp(url: &str, exchange: &str) -> anyhow::Result<lapin::Channel> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let ch = conn.create_channel().await?;
    // The connection lives as long as the process: the channel needs it.
    std::mem::forget(conn);
    if !exchange.starts_with("amq.") {
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    }
    Ok(ch)
}

async fn write_amqp(
    args: &GeoPerf,
    n: u64,
    publish: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<u64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let ch = amqp(&args.produce, &args.exchange).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    // A warm-up record, confirmed before the clock starts (as for Kafka).
    ch.basic_publish(
        args.exchange.as_str().into(),
        args.topic.as_str().into(),
        BasicPublishOptions::default(),
        &payload(now_us(), u64::MAX, args.size),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    let (start, start_us) = (Instant::now(), now_us());
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = pace(start, start_us, args.rate, i).await;
        let confirm = ch
            .basic_publish(
                args.exchange.as_str().into(),
                args.topic.as_str().into(),
                BasicPublishOptions::default(),
                &payload(at, i, args.size),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        let (publish, acked) = (Arc::clone(&publish), Arc::clone(&acked));
        pending.spawn(async move {
            if let Ok(lapin::Confirmation::Ack(_) | lapin::Confirmation::NotRequested) =
                confirm.await
            {
                count_ack(&acked, &publish, at);
            }
        });
    }
    while pending.join_next().await.is_some() {}
    Ok(acked.load(std::sync::atomic::Ordering::Relaxed))
}

async fn read_amqp(
    args: GeoPerf,
    seen: Arc<Mutex<Seen>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    let ch = amqp(&args.consume, &args.exchange).await?;
    let queue = format!("geo-lag-{}", now_us());
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        args.exchange.as_str().into(),
        args.topic.as_str().into(),
        QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "geo-lag".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let _ = ready.send(());
    while let Some(d) = consumer.next().await {
        let d = d?;
        seen.lock().expect("lock").record(&d.data);
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// `magnetar-perf proxy`: a loopback TCP proxy adding a one-way delay in
/// each direction (half the round trip asked for), for the lag with a
/// wide-area round trip.
#[derive(Args)]
pub struct ProxyArgs {
    /// Where to listen, HOST:PORT.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where to forward, HOST:PORT.
    #[arg(long)]
    target: std::net::SocketAddr,
    /// Round trip to add, in ms.
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
}

pub async fn proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let p = magnetar_testkit::faults::FaultProxy::start_at(args.listen, args.target).await?;
    p.delay(Duration::from_millis(args.rtt_ms / 2));
    println!("proxy ready: addr={} rtt_ms={}", p.addr(), args.rtt_ms);
    std::future::pending::<()>().await;
    Ok(())
}
