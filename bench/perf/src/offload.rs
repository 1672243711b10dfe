//! `magnetar-perf offload`: reads under tiered storage. An embedded
//! standalone (metadata node, bookie, broker) in this process writes a topic
//! and reads it back from the bookies (hot); then it offloads the closed
//! ledgers, drops the bookie copies and reads the same range back from the
//! object store (cold). A tail reader's publish-to-delivery latency is
//! measured alone and while a catch-up reader scans the topic from either
//! place, since a catch-up reader must not slow down the tail.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use magnetar_broker::managed_ledger::OffloadState;
use magnetar_broker::{
    Broker, ConsumerOptions, InitialPosition, Message, SubscriptionOptions, SubscriptionType,
};
use magnetar_tenancy::TopicName;

use crate::amqp::now_us;

#[derive(Args)]
pub struct OffloadPerf {
    /// MiB published before the reads.
    #[arg(long, default_value_t = 256)]
    mb: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per published batch (one entry).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Ledger size at which the topic rolls over to a new ledger, in MiB.
    #[arg(long, default_value_t = 32)]
    ledger_mb: u64,
    /// Where ledgers are offloaded: `s3://bucket/prefix` (with
    /// --offload-option) or `file:///dir`; default `file://<data-dir>/offload`.
    #[arg(long)]
    offload_url: Option<String>,
    /// Settings of an S3 store, KEY=VALUE, as the broker's flag of that name.
    #[arg(long = "offload-option", value_delimiter = ',')]
    offload_options: Vec<String>,
    /// Block cache for reads from the store, in MiB. Below --mb, every
    /// scan of the topic misses the cache, as a catch-up reader would.
    #[arg(long, default_value_t = 64)]
    cache_mb: usize,
    /// Bytes the catch-up reader asks for per read, in KiB.
    #[arg(long, default_value_t = 1024)]
    fetch_kb: usize,
    /// Messages per second published to the tail reader.
    #[arg(long, default_value_t = 500)]
    tail_rate: u64,
    /// Length of each tail-latency phase, in seconds.
    #[arg(long, default_value_t = 10)]
    tail_secs: u64,
    /// Data directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub async fn run(args: OffloadPerf) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch >= 1 && args.size >= 8 && args.tail_rate >= 1,
        "--batch and --tail-rate must be positive and --size at least 8"
    );
    let (_tmp, dir) = crate::data_dir(args.data_dir.as_ref())?;
    let url = match &args.offload_url {
        Some(u) => u.clone(),
        None => format!(
            "file://{}",
            std::path::absolute(dir.join("offload"))?.display()
        ),
    };
    let tier = magnetar::broker::tier_from_url(&url, &args.offload_options, args.cache_mb)
        .context("the offload store")?;
    let ledger_bytes = args.ledger_mb.max(1) << 20;
    let embedded = crate::embedded(&dir, move || {
        let mut cfg = magnetar::broker::standalone_config("perf", "127.0.0.1:0")?;
        cfg.managed_ledger.tier = Some(tier);
        cfg.managed_ledger.max_ledger_bytes = ledger_bytes;
        // The benchmark offloads when it chooses, and drops the bookie
        // copies at once.
        cfg.offload.deletion_lag = Duration::ZERO;
        cfg.offload.interval = Duration::from_secs(24 * 3600);
        Ok(cfg)
    })
    .await?;
    let result = phases(&args, &embedded.broker, &url).await;
    embedded.shutdown().await;
    result
}

async fn phases(args: &OffloadPerf, broker: &Broker, url: &str) -> anyhow::Result<()> {
    let topic: TopicName = "persistent://public/default/perf-offload".parse()?;
    let fetch_bytes = args.fetch_kb.max(1) << 10;
    let end = publish(args, broker, &topic).await?;
    // Closing the topic closes its last ledger, so that every published
    // message is in a ledger the offload can take.
    broker.unload_topic(&topic).await?;

    let hot = scan(broker, &topic, end, fetch_bytes, None).await?;
    hot.print("hot_read", "bookies");

    let tail = TailReader::start(broker, &topic).await?;
    // The bookie is still flushing the burst just written; its stalls
    // belong to no reader, so they get a phase of their own.
    let warmup = tail.phase(args, broker, &topic, None).await?;
    warmup.print("tail_warmup", None);
    let alone = tail.phase(args, broker, &topic, None).await?;
    alone.print("tail_alone", None);
    let during_hot = tail
        .phase(args, broker, &topic, Some((end, fetch_bytes)))
        .await?;
    during_hot.print("tail_during_hot_catchup", Some("bookies"));

    offload(broker, &topic, hot.bytes).await?;
    let cold = scan(broker, &topic, end, fetch_bytes, None).await?;
    cold.print("cold_read", url);
    // Bytes differ a little: read-back regroups records into new batches.
    anyhow::ensure!(
        cold.messages == hot.messages,
        "the object store gave back {} messages where the bookies gave {}",
        cold.messages,
        hot.messages
    );
    let during_cold = tail
        .phase(args, broker, &topic, Some((end, fetch_bytes)))
        .await?;
    during_cold.print("tail_during_cold_catchup", Some("object store"));

    println!(
        "hot_read_mb_per_s={:.0} cold_read_mb_per_s={:.0} tail_p99_ms={:.2} \
         tail_p99_ms_during_hot_catchup={:.2} tail_p99_ms_during_cold_catchup={:.2} \
         store={url}",
        hot.mb_per_s(),
        cold.mb_per_s(),
        alone.p99_ms(),
        during_hot.p99_ms(),
        during_cold.p99_ms(),
    );
    Ok(())
}

/// Publishes `--mb` of distinct payloads; returns the end offset.
async fn publish(args: &OffloadPerf, broker: &Broker, topic: &TopicName) -> anyhow::Result<u64> {
    let messages = (args.mb << 20) / args.size as u64;
    let batches = messages.div_ceil(args.batch as u64);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..batches {
        let first = i * args.batch as u64;
        let msgs: Vec<Message> = (first..(first + args.batch as u64).min(messages))
            .map(|m| Message::new(magnetar::entry_payload(m, args.size)))
            .collect();
        in_flight.push(async move { broker.publish(topic, msgs).await });
        while in_flight.len() >= 64 {
            if let Some(r) = in_flight.next().await {
                r?;
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "phase=publish messages={messages} size={} secs={secs:.1} mb_per_s={:.1}",
        args.size,
        (messages * args.size as u64) as f64 / secs / 1e6
    );
    Ok(broker.fetch(topic, 0, 1, Duration::ZERO).await?.end_offset)
}

/// Offloads every closed ledger of the topic and drops the bookie copies.
async fn offload(broker: &Broker, topic: &TopicName, bytes: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    broker.trigger_offload(topic).await?;
    loop {
        let status = broker.offload_status(topic).await?;
        match status.status {
            OffloadState::Success => break,
            OffloadState::Error => anyhow::bail!("the offload failed: {}", status.last_error),
            OffloadState::NotRun | OffloadState::Running => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // With no deletion lag, the policy run deletes the bookie copies.
    broker.run_offload().await?;
    let ledgers = broker.topic(topic, false).await?.ledgers();
    let offloaded = ledgers.iter().filter(|l| l.offload.is_some()).count();
    let dropped = ledgers.iter().filter(|l| l.bookie_deleted).count();
    anyhow::ensure!(
        offloaded > 0 && dropped == offloaded,
        "{offloaded} ledgers offloaded, {dropped} of them dropped from the bookies"
    );
    println!(
        "phase=offload ledgers={offloaded} bookie_deleted={dropped} secs={secs:.1} mb_per_s={:.1}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

/// What one or more scans of the topic read.
#[derive(Default)]
struct Scan {
    bytes: u64,
    messages: u64,
    secs: f64,
    /// Retriable errors met and retried.
    retries: u64,
}

impl Scan {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e6
    }

    fn print(&self, phase: &str, from: &str) {
        println!(
            "phase={phase} from={from:?} messages={} mb={:.1} secs={:.2} mb_per_s={:.1} msgs_per_s={:.0} retries={}",
            self.messages,
            self.bytes as f64 / 1e6,
            self.secs,
            self.mb_per_s(),
            self.messages as f64 / self.secs.max(1e-9),
            self.retries
        );
    }
}

/// Reads offsets `0..to` as a catch-up reader does, in reads of about
/// `fetch_bytes`, until done or until `stop` is set.
async fn scan(
    broker: &Broker,
    topic: &TopicName,
    to: u64,
    fetch_bytes: usize,
    stop: Option<&AtomicBool>,
) -> anyhow::Result<Scan> {
    let start = Instant::now();
    let mut s = Scan::default();
    let mut offset = 0;
    while offset < to && !stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
        match broker
            .fetch(topic, offset, fetch_bytes, Duration::ZERO)
            .await
        {
            Ok(r) => {
                let Some(last) = r.entries.last() else {
                    anyhow::bail!("nothing read at offset {offset} of {to}");
                };
                let next = last.end_offset();
                s.bytes += r.entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
                s.messages += next.min(to) - offset;
                offset = next;
            }
            Err(e) if e.is_retriable() && s.retries < 100 => {
                s.retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("reading offset {offset}")),
        }
    }
    s.secs = start.elapsed().as_secs_f64();
    Ok(s)
}

/// A consumer at the end of the topic, recording each message's latency
/// from its publish (whose time travels in the payload).
struct TailReader {
    latency_us: Arc<Mutex<Histogram<u64>>>,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct TailPhase {
    latency_us: Histogram<u64>,
    sent: u64,
    received: u64,
    catch_up: Option<Scan>,
}

impl TailPhase {
    fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }

    fn print(&self, phase: &str, catch_up_from: Option<&str>) {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let catch_up = match (&self.catch_up, catch_up_from) {
            (Some(s), Some(from)) => format!(
                " catchup_from={from:?} catchup_mb_per_s={:.1} catchup_retries={}",
                s.mb_per_s(),
                s.retries
            ),
            _ => String::new(),
        };
        println!(
            "phase={phase} sent={} received={} samples={} min_ms={:.2} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}{catch_up}",
            self.sent,
            self.received,
            self.latency_us.len(),
            self.latency_us.min() as f64 / 1000.0,
            ms(0.5),
            ms(0.99),
            self.latency_us.max() as f64 / 1000.0,
        );
    }
}

impl TailReader {
    async fn start(broker: &Broker, topic: &TopicName) -> anyhow::Result<TailReader> {
        let mut consumer = broker
            .subscribe(
                topic,
                "tail",
                SubscriptionOptions {
                    sub_type: SubscriptionType::Exclusive,
                    initial_position: InitialPosition::Latest,
                    ..SubscriptionOptions::default()
                },
                ConsumerOptions {
                    name: "tail".into(),
                    ..ConsumerOptions::default()
                },
            )
            .await?;
        let latency_us = Arc::new(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
        let received = Arc::new(AtomicU64::new(0));
        let task = {
            let latency_us = latency_us.clone();
            let received = received.clone();
            tokio::spawn(async move {
                consumer.flow(1000);
                while let Some(d) = consumer.recv().await {
                    let sent = d
                        .message
                        .value
                        .as_ref()
                        .and_then(|v| v.get(..8))
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes);
                    let us = now_us().saturating_sub(sent);
                    latency_us
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .saturating_record(us);
                    received.fetch_add(1, Ordering::Relaxed);
                    consumer.ack(d.offset);
                    consumer.flow(1);
                }
            })
        };
        Ok(TailReader {
            latency_us,
            received,
            task,
        })
    }

    /// Publishes `--tail-rate` messages a second for `--tail-secs`, each on
    /// its own, with a catch-up reader scanning `0..end` over and over
    /// meanwhile if asked to.
    async fn phase(
        &self,
        args: &OffloadPerf,
        broker: &Broker,
        topic: &TopicName,
        catch_up: Option<(u64, usize)>,
    ) -> anyhow::Result<TailPhase> {
        self.latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
        let received0 = self.received.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = catch_up.map(|(end, fetch_bytes)| {
            let (broker, topic, stop) = (broker.clone(), topic.clone(), stop.clone());
            tokio::spawn(async move {
                let mut total = Scan::default();
                while !stop.load(Ordering::Relaxed) {
                    let s = scan(&broker, &topic, end, fetch_bytes, Some(&stop)).await?;
                    total.bytes += s.bytes;
                    total.messages += s.messages;
                    total.secs += s.secs;
                    total.retries += s.retries;
                }
                anyhow::Ok(total)
            })
        });
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.tail_rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = Instant::now() + Duration::from_secs(args.tail_secs);
        let mut sends = FuturesUnordered::new();
        let mut sent = 0u64;
        while Instant::now() < deadline {
            tokio::select! {
                _ = tick.tick() => {
                    let mut payload = vec![0u8; 128];
                    payload[..8].copy_from_slice(&now_us().to_le_bytes());
                    sends.push(broker.publish(topic, vec![Message::new(payload)]));
                    sent += 1;
                }
                Some(r) = sends.next(), if !sends.is_empty() => { r?; }
            }
        }
        while let Some(r) = sends.next().await {
            r?;
        }
        // Deliveries of the last publishes.
        let drain = Instant::now() + Duration::from_secs(5);
        while self.received.load(Ordering::Relaxed) - received0 < sent && Instant::now() < drain {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let catch_up = match reader {
            Some(r) => Some(r.await??),
            None => None,
        };
        let latency_us = self
            .latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(TailPhase {
            latency_us,
            sent,
            received: self.received.load(Ordering::Relaxed) - received0,
            catch_up,
        })
    }
}

impl Drop for TailReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
