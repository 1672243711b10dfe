//! `magnetar-perf ws`: a producer and consumers on Pulsar's WebSocket API
//! (tokio-tungstenite, the client half of the library the broker serves
//! with), measuring acknowledged-publish throughput, delivery throughput
//! and end-to-end latency; optionally the broker's resident memory per
//! idle subscriber connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use clap::Args;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::amqp::now_us;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Args)]
#[command(args_override_self = true)]
pub struct WsPerf {
    /// The broker's HTTP listener, as ws://HOST:PORT.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// A topic: `name` (in public/default), `tenant/ns/name` or a full
    /// `persistent://…` name.
    #[arg(long, default_value = "perf-ws")]
    topic: String,
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Bytes per payload (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Consumers, each on its own subscription, so each gets every
    /// message. 0 measures publishing alone.
    #[arg(long, default_value_t = 1)]
    subscribers: u64,
    /// Publishes in flight (sent, not acknowledged) at most.
    #[arg(long, default_value_t = 1000)]
    inflight: u64,
    /// Idle subscriber connections held open; with --server-pid, the
    /// broker's resident memory per connection is measured over them.
    #[arg(long, default_value_t = 0)]
    connections: u64,
    /// The broker's process, whose resident memory is read.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// `domain/tenant/ns/topic` of a topic as the flag gives it.
fn topic_path(t: &str) -> String {
    let (domain, rest) = t.split_once("://").unwrap_or(("persistent", t));
    match rest.matches('/').count() {
        0 => format!("{domain}/public/default/{rest}"),
        _ => format!("{domain}/{rest}"),
    }
}

async fn open(url: &str) -> anyhow::Result<Socket> {
    let (s, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(s)
}

pub async fn run(args: WsPerf) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').to_owned();
    let path = topic_path(&args.topic);
    let run_id = now_us();

    let (idle, rss_per_conn) = if args.connections > 0 {
        let url =
            format!("{base}/ws/v2/consumer/{path}-idle/idle-{run_id}?subscriptionType=Shared");
        crate::idle_connections(args.server_pid, open_idle(&url, args.connections)).await?
    } else {
        (Vec::new(), None)
    };

    let want = args.messages * args.subscribers;
    let delivered = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut consumers = Vec::new();
    for i in 0..args.subscribers {
        let url = format!("{base}/ws/v2/consumer/{path}/perf-{run_id}-{i}");
        let sock = open(&url).await?;
        let (delivered, hist) = (Arc::clone(&delivered), Arc::clone(&hist));
        let each = args.messages;
        consumers.push(tokio::spawn(consume(sock, each, delivered, hist)));
    }

    let producer = open(&format!("{base}/ws/v2/producer/{path}")).await?;
    let start = Instant::now();
    let published = produce(producer, &args).await?;
    let publish_s = start.elapsed().as_secs_f64();

    let mut deliver_s = 0.0;
    if args.subscribers > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        deliver_s = start.elapsed().as_secs_f64();
        for c in consumers {
            c.abort();
        }
    }
    drop(idle);

    let got = delivered.load(Ordering::Relaxed);
    let h = hist.lock().map_err(|_| anyhow::anyhow!("histogram lock"))?;
    eprintln!(
        "published={published} delivered={got} of {want} publish_s={publish_s:.2} deliver_s={deliver_s:.2}"
    );
    crate::print_pubsub_summary(published, publish_s, got, deliver_s, &h, rss_per_conn);
    anyhow::ensure!(got >= want, "delivered {got} of {want} messages");
    Ok(())
}

/// Sends `--messages` with at most `--inflight` unacknowledged; the count
/// acknowledged `ok`.
async fn produce(sock: Socket, args: &WsPerf) -> anyhow::Result<u64> {
    let (mut tx, mut rx) = sock.split();
    let size = args.size.max(8);
    let (mut sent, mut acked) = (0u64, 0u64);
    let b64 = base64::engine::general_purpose::STANDARD;
    while acked < args.messages {
        while sent < args.messages && sent - acked < args.inflight.max(1) {
            let mut body = vec![b'x'; size];
            body[..8].copy_from_slice(&now_us().to_le_bytes());
            let frame = json!({ "payload": b64.encode(&body), "context": sent.to_string() });
            tx.feed(Message::text(frame.to_string())).await?;
            sent += 1;
        }
        tx.flush().await?;
        let frame = rx.next().await.context("the producer socket closed")??;
        let Message::Text(t) = frame else { continue };
        let ack: Value = serde_json::from_str(t.as_str())?;
        anyhow::ensure!(ack["result"] == "ok", "publish failed: {ack}");
        acked += 1;
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(acked)
}

async fn consume(
    sock: Socket,
    each: u64,
    delivered: Arc<AtomicU64>,
    hist: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = sock.split();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut local = Histogram::<u64>::new(3)?;
    let mut mine = 0u64;
    while let Some(frame) = rx.next().await {
        let Message::Text(t) = frame? else { continue };
        let m: Value = serde_json::from_str(t.as_str())?;
        let payload = b64.decode(m["payload"].as_str().unwrap_or_default())?;
        if payload.len() >= 8 {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&payload[..8]);
            let _ = local.record(now_us().saturating_sub(u64::from_le_bytes(ts)));
        }
        tx.send(Message::text(
            json!({ "messageId": m["messageId"] }).to_string(),
        ))
        .await?;
        delivered.fetch_add(1, Ordering::Relaxed);
        mine += 1;
        if local.len() >= 1000 || mine >= each {
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
            local.reset();
        }
    }
    Ok(())
}

/// Opens `n` consumer connections that then stay silent, 256 at a time.
async fn open_idle(url: &str, n: u64) -> anyhow::Result<Vec<Socket>> {
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut next = 0u64;
    while next < n {
        let batch: Vec<_> = (next..n.min(next + 256)).map(|_| open(url)).collect();
        for s in futures::future::join_all(batch).await {
            out.push(s.context("opening an idle connection")?);
        }
        next += 256;
    }
    Ok(out)
}
