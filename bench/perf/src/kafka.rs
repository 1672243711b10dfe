//! `magnetar-perf kafka`: throughput and end-to-end latency measured with
//! librdkafka (the `rdkafka` crate), the client most Kafka applications
//! sit on, so that the figures are what such applications would see.
//!
//! Producers and consumers run at once. Each message carries its send time
//! (wall clock, microseconds) in its first eight bytes; consumers turn that
//! into end-to-end latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::amqp::now_us;

#[derive(Args)]
pub struct KafkaPerf {
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT].
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value = "perf")]
    topic: String,
    /// Partitions of the topic, if it has to be created.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Bytes per message value.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    producers: u64,
    /// Consumers in one group; 0 measures produce alone.
    #[arg(long, default_value_t = 1)]
    consumers: u64,
    /// all, 1 or 0.
    #[arg(long, default_value = "all")]
    acks: String,
    /// none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Producer linger, in ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// More librdkafka settings for every client, KEY=VALUE, repeated:
    /// `security.protocol=SSL`, `ssl.ca.location=ca.pem`, SASL, …
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
}

impl KafkaPerf {
    /// A client configuration with the bootstrap servers and `--config`.
    fn client(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap);
        for kv in &self.config {
            if let Some((k, v)) = kv.split_once('=') {
                cfg.set(k.trim(), v.trim());
            }
        }
        cfg
    }
}

struct Counting {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn ensure_topic(args: &KafkaPerf) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        args.client().create().context("admin client")?;
    let topic = NewTopic::new(&args.topic, args.partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .context("CreateTopics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("creating {t}: {e}"),
        }
    }
    Ok(())
}

pub async fn run(args: KafkaPerf) -> anyhow::Result<()> {
    ensure_topic(&args).await?;
    let args = Arc::new(args);
    let consumed = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    // Consumers take partitions round-robin from where each ends now, so
    // that they read exactly what this run produces.
    let ends = end_offsets(&args)?;
    let mut consumers = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for c in 0..args.consumers {
        let mine: Vec<(i32, i64)> = ends
            .iter()
            .copied()
            .filter(|(p, _)| *p as u64 % args.consumers == c)
            .collect();
        let (args, consumed, latency, ready) = (
            args.clone(),
            consumed.clone(),
            latency.clone(),
            ready_tx.clone(),
        );
        consumers.push(std::thread::spawn(move || {
            consume(&args, &mine, &consumed, &latency, ready)
        }));
    }
    for _ in 0..args.consumers {
        let _ = ready_rx.recv_timeout(Duration::from_secs(30));
    }

    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let n = args.messages / args.producers + u64::from(p < args.messages % args.producers);
        let (args, acked, failed) = (args.clone(), acked.clone(), failed.clone());
        producers.push(std::thread::spawn(move || produce(&args, n, acked, failed)));
    }
    for p in producers {
        p.join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    }
    let produce_secs = start.elapsed().as_secs_f64();
    let failures = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failures == 0, "{failures} messages were not acknowledged");

    for c in consumers {
        c.join()
            .map_err(|_| anyhow::anyhow!("consumer thread panicked"))??;
    }
    let consume_secs = start.elapsed().as_secs_f64();
    let n = args.messages as f64;
    let h = latency.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let (p50, p99) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
        )
    };
    let consume_rate = if args.consumers > 0 {
        consumed.load(Ordering::Relaxed) as f64 / consume_secs
    } else {
        0.0
    };
    println!(
        "produce_msgs_per_s={:.0} produce_mb_per_s={:.1} consume_msgs_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        n / produce_secs,
        n * args.size as f64 / produce_secs / 1e6,
        consume_rate,
        p50,
        p99
    );
    Ok(())
}

fn produce(
    args: &KafkaPerf,
    n: u64,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<Counting> = args
        .client()
        .set("acks", &args.acks)
        .set("enable.idempotence", (args.acks == "all").to_string())
        .set("compression.type", &args.compression)
        .set("linger.ms", args.linger_ms.to_string())
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "262144")
        .create_with_context(Counting {
            acked: acked.clone(),
            failed,
        })
        .context("producer")?;
    let mut value = vec![0u8; args.size.max(8)];
    for (i, b) in value.iter_mut().enumerate().skip(8) {
        *b = i as u8;
    }
    for i in 0..n {
        value[..8].copy_from_slice(&now_us().to_be_bytes());
        let key = (i % 1024).to_be_bytes();
        let mut record = BaseRecord::to(&args.topic)
            .payload(&value[..])
            .key(&key[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .context("flushing the producer")?;
    Ok(())
}

fn end_offsets(args: &KafkaPerf) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer = args.client().create().context("consumer")?;
    let md = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(30))?;
    let topic = md
        .topics()
        .first()
        .ok_or_else(|| anyhow::anyhow!("no metadata for {}", args.topic))?;
    let mut out = Vec::new();
    for p in topic.partitions() {
        let (_, high) = consumer.fetch_watermarks(&args.topic, p.id(), Duration::from_secs(30))?;
        out.push((p.id(), high));
    }
    Ok(out)
}

fn consume(
    args: &KafkaPerf,
    partitions: &[(i32, i64)],
    consumed: &AtomicU64,
    latency: &Mutex<Histogram<u64>>,
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = args
        .client()
        .set("group.id", "perf")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .context("consumer")?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for &(p, at) in partitions {
        tpl.add_partition_offset(&args.topic, p, rdkafka::Offset::Offset(at))?;
    }
    consumer.assign(&tpl)?;
    let _ = ready.send(());
    let mut local = Histogram::<u64>::new(3)?;
    let mut idle_since = Instant::now();
    while consumed.load(Ordering::Relaxed) < args.messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                if let Some(p) = m.payload().filter(|p| p.len() >= 8) {
                    let mut ts = [0u8; 8];
                    ts.copy_from_slice(&p[..8]);
                    let sent = u64::from_be_bytes(ts);
                    let _ = local.record(now_us().saturating_sub(sent).max(1));
                }
                consumed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(e)) => eprintln!("consume error: {e}"),
            None if idle_since.elapsed() > Duration::from_secs(60) => {
                anyhow::bail!(
                    "no message for 60 s after {} of {}",
                    consumed.load(Ordering::Relaxed),
                    args.messages
                )
            }
            None => {}
        }
    }
    latency
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .add(&local)?;
    Ok(())
}
