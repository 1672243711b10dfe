//! `magnetar perf`: load generators. Each prints one summary line per phase,
//! as `key=value` pairs, so that scripts can compare runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use magnetar_metadata::{parse_endpoints, MetaClient};

#[derive(Args)]
pub struct PerfArgs {
    #[command(subcommand)]
    command: PerfCommand,
}

#[derive(Subcommand)]
enum PerfCommand {
    /// Put, then get, keys on a metadata group.
    Metadata(MetadataPerf),
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

pub async fn run(args: PerfArgs) -> anyhow::Result<()> {
    match args.command {
        PerfCommand::Metadata(m) => metadata(m).await,
    }
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
