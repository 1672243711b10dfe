//! `magnetar-perf`: load generators. Each prints one summary line per
//! phase, as `key=value` pairs, so that scripts can compare runs. A binary
//! of its own, so that the server links none of the client libraries
//! (librdkafka, lapin, rumqttc) these drive.

mod amqp;
mod geo;
mod kafka;
mod mqtt;
mod offload;
mod ws;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use magnetar_bookies::{CreateOptions, LedgerClient};
use magnetar_metadata::{parse_endpoints, MetaClient};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The benches embed a standalone with the server's allocator, so that
/// their memory figures are the server's.
#[derive(Parser)]
#[command(
    name = "magnetar-perf",
    version,
    about = "Load generators that print throughput and latency"
)]
struct PerfArgs {
    #[command(subcommand)]
    command: PerfCommand,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    magnetar::init_tracing();
    match run(PerfArgs::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum PerfCommand {
    /// Put, then get, keys on a metadata group.
    Metadata(MetadataPerf),
    /// Write a ledger with pipelined adds, then read it back and verify it.
    Ledger(LedgerPerf),
    /// Memory under a large backlog: an embedded standalone (metadata node,
    /// bookie, broker) in this process, a subscription whose consumer
    /// barely reads, and a million messages published past it.
    Backlog(BacklogPerf),
    /// Tiered storage: hot reads from the bookies beside cold reads from
    /// the object store, and a tail reader's latency while a catch-up
    /// reader scans; on an embedded standalone.
    Offload(crate::offload::OffloadPerf),
    /// Produce and consume through a Kafka listener with librdkafka.
    Kafka(crate::kafka::KafkaPerf),
    /// Publish (with confirms) and consume through an AMQP listener with
    /// lapin; works against RabbitMQ too.
    Amqp(crate::amqp::AmqpPerf),
    /// Publish and subscribe through an MQTT broker (Magnetar or Mosquitto).
    Mqtt(crate::mqtt::MqttPerf),
    /// Produce and consume through the WebSocket API (Pulsar's JSON
    /// frames); optionally hold idle subscriber connections.
    Ws(crate::ws::WsPerf),
    /// Replication lag between two regions at a fixed rate, over Kafka,
    /// MQTT or AMQP (Magnetar, or a Mosquitto bridge, or RabbitMQ
    /// federation).
    Geo(crate::geo::GeoPerf),
    /// A loopback TCP proxy that adds a round trip.
    Proxy(crate::geo::ProxyArgs),
}

#[derive(Args)]
struct BacklogPerf {
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per published batch (one entry).
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Batches in flight at most.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// The slow consumer's rate, in messages per second.
    #[arg(long, default_value_t = 1000)]
    consume_rate: u64,
    /// How long the slow consumer reads after publishing ends, in seconds.
    #[arg(long, default_value_t = 10)]
    consume_secs: u64,
    /// Data directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct LedgerPerf {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(long, env = "MAGNETAR_META", default_value = "127.0.0.1:2379")]
    meta: String,
    /// Bookies per ledger (E).
    #[arg(long, default_value_t = 3)]
    ensemble: usize,
    /// Copies of each entry (Qw).
    #[arg(long, default_value_t = 3)]
    write_quorum: usize,
    /// Durable copies before an add completes (Qa).
    #[arg(long, default_value_t = 2)]
    ack_quorum: usize,
    #[arg(long, default_value_t = 100_000)]
    entries: u64,
    #[arg(long, default_value_t = 1024)]
    entry_size: usize,
    /// Adds per second; unlimited if absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Adds in flight at most.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Keep the ledger instead of deleting it afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct MetadataPerf {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(long, env = "MAGNETAR_META", default_value = "127.0.0.1:2379")]
    meta: String,
    /// Operations per phase.
    #[arg(long, default_value_t = 20_000)]
    ops: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys; puts and gets cycle over them.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

async fn run(args: PerfArgs) -> anyhow::Result<()> {
    match args.command {
        PerfCommand::Metadata(m) => metadata(m).await,
        PerfCommand::Ledger(l) => ledger(l).await,
        PerfCommand::Backlog(b) => backlog(b).await,
        PerfCommand::Offload(o) => crate::offload::run(o).await,
        PerfCommand::Kafka(k) => crate::kafka::run(k).await,
        PerfCommand::Amqp(a) => crate::amqp::run(a).await,
        PerfCommand::Mqtt(a) => crate::mqtt::run(a).await,
        PerfCommand::Ws(w) => crate::ws::run(w).await,
        PerfCommand::Geo(g) => crate::geo::run(g).await,
        PerfCommand::Proxy(p) => crate::geo::proxy(p).await,
    }
}

/// Opens idle connections with `open` and measures the server's resident
/// memory per connection over them (with its pid): the connections, and
/// KiB each. Run first, on a fresh server, so that memory freed by earlier
/// work does not hide what connections take.
pub async fn idle_connections<T>(
    server_pid: Option<u32>,
    open: impl std::future::Future<Output = anyhow::Result<Vec<T>>>,
) -> anyhow::Result<(Vec<T>, Option<f64>)> {
    let rss = || server_pid.and_then(|p| proc_status_kib(Some(p), "VmRSS:"));
    let before = rss();
    let idle = open.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_conn = None;
    if let (Some(b), Some(a), false) = (before, rss(), idle.is_empty()) {
        per_conn = Some((a - b) / idle.len() as f64);
        eprintln!(
            "idle_connections={} server_rss_before_kib={b:.0} server_rss_after_kib={a:.0}",
            idle.len()
        );
    }
    Ok((idle, per_conn))
}

/// The last line of `perf mqtt` and `perf ws`: throughput of
/// acknowledged publishes and of deliveries, end-to-end latency, and the
/// memory per idle connection when measured.
pub fn print_pubsub_summary(
    published: u64,
    publish_s: f64,
    delivered: u64,
    deliver_s: f64,
    latency_us: &Histogram<u64>,
    rss_per_conn_kib: Option<f64>,
) {
    let ms = |q: f64| latency_us.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "publish_msgs_per_s={:.0} deliver_msgs_per_s={:.0} p50_ms={:.1} p99_ms={:.1} rss_per_conn_kib={}",
        published as f64 / publish_s,
        if deliver_s > 0.0 {
            delivered as f64 / deliver_s
        } else {
            0.0
        },
        ms(0.5),
        ms(0.99),
        rss_per_conn_kib.map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1}")),
    );
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
}

async fn metadata(args: MetadataPerf) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.concurrency > 0 && args.keys > 0,
        "concurrency and keys must be positive"
    );
    let client = MetaClient::new(&parse_endpoints(&args.meta))?;
    // One write first, so that leader discovery is not measured.
    client.put("/perf/warmup", "x").await?;
    for (op, name) in [(Op::Put, "put"), (Op::Get, "get")] {
        let (elapsed, hist, errors) = phase(&client, &args, op).await?;
        let done = hist.len();
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "op={name} ops={done} concurrency={} value_size={} ops_per_s={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} errors={errors}",
            args.concurrency,
            args.value_size,
            done as f64 / elapsed.as_secs_f64(),
            ms(0.5),
            ms(0.99),
            ms(0.999),
        );
    }
    Ok(())
}

async fn phase(
    client: &MetaClient,
    args: &MetadataPerf,
    op: Op,
) -> anyhow::Result<(Duration, Histogram<u64>, u64)> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let value = bytes::Bytes::from(vec![b'v'; args.value_size]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let next = next.clone();
        let errors = errors.clone();
        let value = value.clone();
        let (ops, keys) = (args.ops, args.keys);
        tasks.push(tokio::spawn(async move {
            // Microseconds, up to a minute.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    return anyhow::Ok(hist);
                }
                let key = format!("/perf/key-{:08}", i % keys);
                let t = Instant::now();
                let ok = match op {
                    Op::Put => client.put(&key, value.clone()).await.is_ok(),
                    Op::Get => client.get(&key).await.is_ok(),
                };
                if ok {
                    hist.saturating_record(t.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    Ok((start.elapsed(), total, errors.load(Ordering::Relaxed)))
}

async fn ledger(args: LedgerPerf) -> anyhow::Result<()> {
    anyhow::ensure!(args.entries > 0, "--entries must be positive");
    anyhow::ensure!(args.max_in_flight > 0, "--max-in-flight must be positive");
    let client = LedgerClient::new(MetaClient::new(&parse_endpoints(&args.meta))?);
    let w = client
        .create(CreateOptions::new(
            args.ensemble,
            args.write_quorum,
            args.ack_quorum,
        ))
        .await?;
    let (md, _) = client.metadata(w.id()).await?;
    let bookies = md.all_bookies();
    let journal_before = journal_counters(&client, &bookies).await;
    let payloads: Vec<bytes::Bytes> = (0..args.entries.min(4096))
        .map(|i| magnetar::entry_payload(i, args.entry_size))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..args.entries {
        if let Some(rate) = args.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        while in_flight.len() >= args.max_in_flight {
            if let Some((t, r)) = in_flight.next().await {
                record(&mut hist, &mut errors, t, r);
            }
        }
        // Payloads repeat every 4096 entries, except for their id.
        let mut p = payloads[(i % payloads.len() as u64) as usize].to_vec();
        if p.len() >= 8 {
            p[..8].copy_from_slice(&i.to_le_bytes());
        }
        let t = Instant::now();
        let fut = w.add(bytes::Bytes::from(p));
        in_flight.push(async move { (t, fut.await) });
    }
    while let Some((t, r)) = in_flight.next().await {
        record(&mut hist, &mut errors, t, r);
    }
    let elapsed = start.elapsed();
    let md = w.close().await?;
    let journal_after = journal_counters(&client, &bookies).await;

    // Read everything back and check each entry.
    let r = client.open(w.id()).await?;
    let rstart = Instant::now();
    let mut verified = 0u64;
    let mut next = 0u64;
    while (next as i64) <= md.last_entry {
        let last = (next + 999).min(md.last_entry as u64);
        match r.read(next, last).await {
            Ok(entries) => {
                for e in entries {
                    let want_id = e.payload.get(..8).map(|b| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        u64::from_le_bytes(a)
                    });
                    if want_id == Some(e.entry_id) && e.payload.len() == args.entry_size.max(8) {
                        verified += 1;
                    } else {
                        errors += 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("read {next}..={last}: {e}");
                errors += last - next + 1;
            }
        }
        next = last + 1;
    }
    let relapsed = rstart.elapsed();
    if !args.keep {
        client.delete(w.id()).await?;
    }
    let done = hist.len();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let mb = (done as f64 * args.entry_size as f64) / (1 << 20) as f64;
    println!(
        "phase=read ledger={} entries={verified} read_entries_per_s={:.0} read_mb_per_s={:.1}",
        w.id(),
        verified as f64 / relapsed.as_secs_f64(),
        verified as f64 * args.entry_size as f64 / (1 << 20) as f64 / relapsed.as_secs_f64(),
    );
    let (syncs, records) = (
        journal_after.0.saturating_sub(journal_before.0),
        journal_after.1.saturating_sub(journal_before.1),
    );
    println!(
        "phase=journal bookies={} fsyncs={syncs} records={records} records_per_fsync={:.1}",
        bookies.len(),
        records as f64 / syncs.max(1) as f64,
    );
    println!(
        "ensemble={} write_quorum={} ack_quorum={} entries={done} entry_size={} entries_per_s={:.0} mb_per_s={:.1} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} errors={errors}",
        args.ensemble,
        args.write_quorum,
        args.ack_quorum,
        args.entry_size,
        done as f64 / elapsed.as_secs_f64(),
        mb / elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
    );
    Ok(())
}

/// Journal fsyncs and the records they covered, summed over `bookies`.
async fn journal_counters(client: &LedgerClient, bookies: &[u64]) -> (u64, u64) {
    let mut sum = (0, 0);
    for &b in bookies {
        if let Ok(mut c) = client.pool().client(b).await {
            if let Ok(i) = c.info(magnetar_bookies::proto::InfoRequest {}).await {
                let i = i.into_inner();
                sum.0 += i.journal_syncs;
                sum.1 += i.journal_entries;
            }
        }
    }
    sum
}

fn record(
    hist: &mut Histogram<u64>,
    errors: &mut u64,
    t: Instant,
    r: magnetar_bookies::Result<u64>,
) {
    match r {
        Ok(_) => hist.saturating_record(t.elapsed().as_micros() as u64),
        Err(e) => {
            if *errors == 0 {
                eprintln!("add failed: {e}");
            }
            *errors += 1;
        }
    }
}

/// Resident and peak resident memory of this process, in MiB.
fn rss_mb() -> (f64, f64) {
    let field = |name| proc_status_kib(None, name).map_or(0.0, |kb| kb / 1024.0);
    (field("VmRSS:"), field("VmHWM:"))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`) of `pid`, or
/// of this process.
pub(crate) fn proc_status_kib(pid: Option<u32>, name: &str) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
}

async fn backlog(args: BacklogPerf) -> anyhow::Result<()> {
    use magnetar_broker::{
        ConsumerOptions, InitialPosition, Message, SubscriptionOptions, SubscriptionType,
    };
    anyhow::ensure!(
        args.batch >= 1 && args.size >= 1,
        "--batch and --size must be positive"
    );
    let (_tmp, dir) = data_dir(args.data_dir.as_ref())?;
    let embedded = embedded(&dir, || {
        magnetar::broker::standalone_config("perf", "127.0.0.1:0")
    })
    .await?;
    let broker = embedded.broker.clone();
    let topic: magnetar_tenancy::TopicName = "persistent://public/default/perf-backlog".parse()?;
    let mut consumer = broker
        .subscribe(
            &topic,
            "slow",
            SubscriptionOptions {
                sub_type: SubscriptionType::Shared,
                initial_position: InitialPosition::Earliest,
                ..SubscriptionOptions::default()
            },
            ConsumerOptions {
                name: "slow".into(),
                ..ConsumerOptions::default()
            },
        )
        .await?;
    let (rss0, _) = rss_mb();
    println!("phase=start rss_mb={rss0:.0}");

    // The consumer reads throughout, at its slow rate.
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let consumed = consumed.clone();
        let stop = stop.clone();
        let pause = Duration::from_secs_f64(1.0 / args.consume_rate.max(1) as f64);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                consumer.flow(1);
                if let Ok(Some(d)) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
                {
                    consumer.ack(d.offset);
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(pause).await;
            }
        })
    };
    let peak = Arc::new(std::sync::Mutex::new(0f64));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let (rss, _) = rss_mb();
                {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let batches = args.messages.div_ceil(args.batch as u64);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut errors = 0u64;
    for i in 0..batches {
        let n = (args.messages - i * args.batch as u64).min(args.batch as u64);
        let msgs: Vec<Message> = (0..n).map(|_| Message::new(payload.clone())).collect();
        let b = broker.clone();
        let t = topic.clone();
        in_flight.push(async move { b.publish(&t, msgs).await });
        while in_flight.len() >= args.max_in_flight {
            if let Some(Err(_)) = in_flight.next().await {
                errors += 1;
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        if r.is_err() {
            errors += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (rss, _) = rss_mb();
    println!(
        "phase=publish messages={} size={} batch={} secs={secs:.1} msgs_per_s={:.0} mb_per_s={:.1} rss_mb={rss:.0} errors={errors}",
        args.messages,
        args.size,
        args.batch,
        args.messages as f64 / secs,
        (args.messages * args.size as u64) as f64 / secs / 1e6,
    );
    tokio::time::sleep(Duration::from_secs(args.consume_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = reader.await;
    sampler.abort();
    let stats = broker.topic_stats(&topic).await?;
    let backlog = stats.subscriptions.get("slow").map_or(0, |s| s.msg_backlog);
    let (rss, hwm) = rss_mb();
    let peak = (*peak.lock().unwrap_or_else(|e| e.into_inner())).max(rss);
    println!(
        "backlog={backlog} consumed={} rss_mb={rss:.0} peak_rss_mb={peak:.0} vm_hwm_mb={hwm:.0} (one process: metadata node, bookie and broker)",
        consumed.load(Ordering::Relaxed)
    );
    embedded.shutdown().await;
    Ok(())
}

/// Where an embedded standalone keeps its data: `given`, or a temporary
/// directory removed when the returned guard drops.
fn data_dir(
    given: Option<&std::path::PathBuf>,
) -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let dir = given.cloned().unwrap_or_else(|| tmp.path().to_path_buf());
    Ok((tmp, dir))
}

/// A standalone (metadata node, bookie, broker) in this process, on
/// loopback ports of its own, with the broker configuration `cfg` makes.
async fn embedded(
    dir: &std::path::Path,
    cfg: impl FnOnce() -> anyhow::Result<magnetar_broker::BrokerConfig>,
) -> anyhow::Result<magnetar::broker::Embedded> {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    magnetar::broker::Embedded::start(dir, any, any, Default::default(), &Default::default(), cfg)
        .await
}
