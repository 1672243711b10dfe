//! `magnetar-perf amqp`: publish and consume through an AMQP 0-9-1 broker
//! with lapin, measuring confirmed-publish throughput, consume throughput
//! and end-to-end latency. The same run works against Magnetar and against
//! RabbitMQ, so that `bench/amqp.sh` can compare them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Confirmation;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Later flags override earlier ones, so that scripts can pass defaults
/// and let the caller's arguments win.
#[derive(Args)]
#[command(args_override_self = true)]
pub struct AmqpPerf {
    /// amqp://HOST:PORT/VHOST (the vhost `/` is `%2f`).
    #[arg(long, default_value = "amqp://127.0.0.1:5672/%2f")]
    url: String,
    #[arg(long, default_value = "perf")]
    queue: String,
    /// classic, quorum or stream; declared with the queue.
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Bytes per message body.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Publish in confirm mode and count only confirmed messages.
    #[arg(long)]
    confirm: bool,
    /// delivery_mode 2.
    #[arg(long)]
    persistent: bool,
    #[arg(long, default_value_t = 1)]
    producers: u64,
    /// Consumers; 0 measures publishing alone.
    #[arg(long, default_value_t = 1)]
    consumers: u64,
    #[arg(long, default_value_t = 200)]
    prefetch: u16,
    /// Unconfirmed publishes per producer at most.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// PEM CA the server's certificate is checked against, for an
    /// `amqps://` URL.
    #[arg(long)]
    tls_ca_file: Option<std::path::PathBuf>,
}

/// Publishes handed to lapin and not yet written, per producer.
const PUBLISHES_IN_FLIGHT: usize = 64;

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn connect(args: &AmqpPerf) -> anyhow::Result<Connection> {
    let url = &args.url;
    let tls = lapin::tcp::OwnedTLSConfig {
        cert_chain: match &args.tls_ca_file {
            Some(ca) => Some(
                std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?,
            ),
            None => None,
        },
        identity: None,
    };
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime)
        .await
        .with_context(|| format!("connecting to {url}"))
}

pub async fn run(args: AmqpPerf) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let setup = connect(&args).await?;
    let ch = setup.create_channel().await?;
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(args.queue_type.as_str())),
    );
    ch.queue_declare(
        args.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await
    .context("declaring the queue")?;
    if args.queue_type != "stream" {
        ch.queue_purge(args.queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }

    let consumed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let start = Instant::now();
    let mut consumers = Vec::new();
    for i in 0..args.consumers {
        let args = Arc::clone(&args);
        let consumed = Arc::clone(&consumed);
        let hist = Arc::clone(&hist);
        let conn = connect(&args).await?;
        consumers.push(tokio::spawn(async move {
            consume(i, conn, &args, &consumed, &hist).await
        }));
    }
    let published = Arc::new(AtomicU64::new(0));
    let nacked = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    let per = args.messages / args.producers.max(1);
    for p in 0..args.producers.max(1) {
        let n = if p == 0 {
            args.messages - per * (args.producers.max(1) - 1)
        } else {
            per
        };
        let args = Arc::clone(&args);
        let published = Arc::clone(&published);
        let nacked = Arc::clone(&nacked);
        let conn = connect(&args).await?;
        producers.push(tokio::spawn(async move {
            produce(conn, &args, n, &published, &nacked).await
        }));
    }
    for p in producers {
        p.await??;
    }
    let publish_s = start.elapsed().as_secs_f64();
    let mut consume_s = 0.0;
    if args.consumers > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while consumed.load(Ordering::Relaxed) < args.messages && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        consume_s = start.elapsed().as_secs_f64();
        for c in consumers {
            c.abort();
        }
    }
    let n = published.load(Ordering::Relaxed);
    let got = consumed.load(Ordering::Relaxed);
    let h = hist.lock().map_err(|_| anyhow::anyhow!("histogram lock"))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "published={n} nacked={} consumed={got} publish_s={publish_s:.2} consume_s={consume_s:.2}",
        nacked.load(Ordering::Relaxed)
    );
    println!(
        "publish_msgs_per_s={:.0} consume_msgs_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        n as f64 / publish_s,
        if consume_s > 0.0 {
            got as f64 / consume_s
        } else {
            0.0
        },
        ms(0.5),
        ms(0.99),
    );
    anyhow::ensure!(
        args.consumers == 0 || got >= args.messages,
        "consumed {got} of {} messages",
        args.messages
    );
    Ok(())
}

async fn produce(
    conn: Connection,
    args: &AmqpPerf,
    n: u64,
    published: &AtomicU64,
    nacked: &AtomicU64,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    if args.confirm {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut props = BasicProperties::default();
    if args.persistent {
        props = props.with_delivery_mode(2);
    }
    let queue: lapin::types::ShortString = args.queue.as_str().into();
    // lapin resolves a publish once its frames are handed to its I/O
    // thread. Awaiting each in turn costs a thread wake-up per message,
    // which on a small machine starves the broker under test; keeping many
    // in flight lets that thread write them together, as an application
    // publishing from several tasks would.
    let mut sending = FuturesOrdered::new();
    let mut confirms = FuturesOrdered::new();
    let mut queued = 0u64;
    loop {
        while queued < n
            && sending.len() < PUBLISHES_IN_FLIGHT
            && sending.len() + confirms.len() < args.max_in_flight
        {
            let mut body = vec![b'x'; args.size.max(8)];
            body[..8].copy_from_slice(&now_us().to_le_bytes());
            let (ch, queue, props) = (ch.clone(), queue.clone(), props.clone());
            sending.push_back(async move {
                ch.basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
            });
            queued += 1;
        }
        tokio::select! {
            Some(sent) = sending.next(), if !sending.is_empty() => {
                let confirm = sent?;
                if args.confirm {
                    confirms.push_back(confirm);
                } else {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(c) = confirms.next(), if !confirms.is_empty() => settle(c?, published, nacked),
            else => break,
        }
    }
    conn.close(200, "done".into()).await.ok();
    Ok(())
}

fn settle(c: Confirmation, published: &AtomicU64, nacked: &AtomicU64) {
    match c {
        Confirmation::Ack(_) | Confirmation::NotRequested => {
            published.fetch_add(1, Ordering::Relaxed);
        }
        Confirmation::Nack(_) => {
            nacked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn consume(
    i: u64,
    conn: Connection,
    args: &AmqpPerf,
    consumed: &AtomicU64,
    hist: &Mutex<Histogram<u64>>,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut cargs = FieldTable::default();
    if args.queue_type == "stream" {
        cargs.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from("next")),
        );
    }
    let mut consumer = ch
        .basic_consume(
            args.queue.as_str().into(),
            format!("perf-{i}").as_str().into(),
            BasicConsumeOptions::default(),
            cargs,
        )
        .await?;
    let ack_every = u64::from(args.prefetch / 2).max(1);
    let mut since_ack = 0;
    let mut local = Histogram::<u64>::new(3)?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        if d.data.len() >= 8 {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&d.data[..8]);
            let sent = u64::from_le_bytes(ts);
            let _ = local.record(now_us().saturating_sub(sent));
        }
        since_ack += 1;
        if since_ack >= ack_every {
            d.acker.ack(BasicAckOptions { multiple: true }).await?;
            since_ack = 0;
        }
        let total = consumed.fetch_add(1, Ordering::Relaxed) + 1;
        if local.len() % 1000 == 0 || total >= args.messages {
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
            local.reset();
        }
    }
    Ok(())
}
