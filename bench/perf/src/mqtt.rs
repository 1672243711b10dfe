//! `magnetar-perf mqtt`: publishers and subscribers through an MQTT broker
//! with rumqttc, measuring acknowledged-publish throughput, delivery
//! throughput (every subscriber gets every message) and end-to-end
//! latency; optionally, the broker's resident memory per idle connection.
//! The same run works against Magnetar and Mosquitto, so that
//! `bench/mqtt.sh` can compare them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::amqp::now_us;

/// Later flags override earlier ones, so that scripts can pass defaults
/// and let the caller's arguments win.
#[derive(Args)]
#[command(args_override_self = true)]
pub struct MqttPerf {
    /// mqtt://HOST:PORT
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    url: String,
    #[arg(long, default_value = "perf/mqtt")]
    topic: String,
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Bytes per payload (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    #[arg(long, default_value_t = 1)]
    publishers: u64,
    /// Subscribers of the topic; each receives every message. 0 measures
    /// publishing alone.
    #[arg(long, default_value_t = 1)]
    subscribers: u64,
    /// Idle connections held open; with --server-pid, the broker's
    /// resident memory per connection is measured over them.
    #[arg(long, default_value_t = 0)]
    connections: u64,
    /// The broker's process, whose resident memory is read.
    #[arg(long)]
    server_pid: Option<u32>,
    /// QoS 1 and 2 publishes each publisher keeps unacknowledged.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Instead of publishing: this many SUBSCRIBEs, one at a time, each to
    /// a new filter at --qos, timed from the SUBSCRIBE to its SUBACK
    /// (each is unsubscribed again).
    #[arg(long, default_value_t = 0)]
    subscribe_latency: u64,
}

/// SUBSCRIBE to SUBACK, one at a time on one connection: how soon a
/// subscription is in place.
async fn subscribe_latency(args: &MqttPerf, qos: QoS, run_id: u64) -> anyhow::Result<()> {
    let (c, mut ev) = client(format!("perf-sublat-{run_id}"), args, 16)?;
    loop {
        if let Event::Incoming(Incoming::ConnAck(_)) = ev.poll().await.context("connecting")? {
            break;
        }
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for i in 0..args.subscribe_latency {
        let filter = format!("{}/sublat/{run_id}/{i}", args.topic);
        c.subscribe(filter.as_str(), qos).await?;
        let mut sent = None;
        loop {
            match ev.poll().await.context("subscribing")? {
                Event::Outgoing(Outgoing::Subscribe(_)) => sent = Some(Instant::now()),
                Event::Incoming(Incoming::SubAck(_)) => break,
                _ => {}
            }
        }
        if let Some(t) = sent {
            hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        }
        c.unsubscribe(filter.as_str()).await?;
        loop {
            if let Event::Incoming(Incoming::UnsubAck(_)) =
                ev.poll().await.context("unsubscribing")?
            {
                break;
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "subscribes={} subscribe_p50_ms={:.3} subscribe_p99_ms={:.3}",
        hist.len(),
        ms(0.5),
        ms(0.99)
    );
    Ok(())
}

fn qos_of(n: u8) -> anyhow::Result<QoS> {
    Ok(match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => anyhow::bail!("--qos must be 0, 1 or 2"),
    })
}

pub(crate) fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .map_or((rest, "1883"), |(h, p)| (h, p));
    Ok((
        host.to_owned(),
        port.parse().with_context(|| format!("port of {url}"))?,
    ))
}

fn client(id: String, args: &MqttPerf, cap: usize) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (host, port) = host_port(&args.url)?;
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts.set_inflight(args.inflight.max(1));
    let max = args.size + 1024;
    opts.set_max_packet_size(max, max);
    Ok(AsyncClient::new(opts, cap))
}

pub async fn run(args: MqttPerf) -> anyhow::Result<()> {
    let qos = qos_of(args.qos)?;
    let args = Arc::new(args);
    let run_id = now_us();
    if args.subscribe_latency > 0 {
        return subscribe_latency(&args, qos, run_id).await;
    }

    // Idle connections first, so that the memory they take is measured
    // alone.
    let (idle, rss_per_conn) = if args.connections > 0 {
        crate::idle_connections(args.server_pid, open_idle(&args, run_id)).await?
    } else {
        (Vec::new(), None)
    };

    let want = args.messages * args.subscribers;
    let delivered = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let (c, mut ev) = client(format!("perf-sub-{run_id}-{i}"), &args, 16)?;
        c.subscribe(args.topic.as_str(), qos).await?;
        // Until SUBACK, so that no subscriber misses the first messages.
        loop {
            match ev.poll().await.context("subscriber connection")? {
                Event::Incoming(Incoming::SubAck(_)) => break,
                _ => continue,
            }
        }
        let (delivered, hist) = (Arc::clone(&delivered), Arc::clone(&hist));
        let each = args.messages;
        subscribers.push(tokio::spawn(async move {
            let _client = c;
            let mut local = Histogram::<u64>::new(3).expect("a valid histogram");
            let mut mine = 0u64;
            while let Ok(e) = ev.poll().await {
                if let Event::Incoming(Incoming::Publish(p)) = e {
                    if p.payload.len() >= 8 {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&p.payload[..8]);
                        let _ = local.record(now_us().saturating_sub(u64::from_le_bytes(ts)));
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
                    mine += 1;
                    if local.len() >= 1000 || mine >= each {
                        if let Ok(mut h) = hist.lock() {
                            let _ = h.add(&local);
                        }
                        local.reset();
                    }
                }
            }
        }));
    }

    let start = Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let publishers = args.publishers.max(1);
    let per = args.messages / publishers;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let n = if p == 0 {
            args.messages - per * (publishers - 1)
        } else {
            per
        };
        let (c, ev) = client(format!("perf-pub-{run_id}-{p}"), &args, 1024)?;
        let args = Arc::clone(&args);
        let published = Arc::clone(&published);
        tasks.push(tokio::spawn(async move {
            publish(c, ev, &args, qos, n, &published).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_s = start.elapsed().as_secs_f64();

    let mut deliver_s = 0.0;
    if args.subscribers > 0 {
        // QoS 0 may drop; wait until deliveries stop coming.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
        while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = delivered.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if qos == QoS::AtMostOnce && last.1.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        deliver_s = last.1.duration_since(start).as_secs_f64();
        for s in subscribers {
            s.abort();
        }
    }
    drop(idle);

    let n = published.load(Ordering::Relaxed);
    let got = delivered.load(Ordering::Relaxed);
    let h = hist.lock().map_err(|_| anyhow::anyhow!("histogram lock"))?;
    eprintln!(
        "published={n} delivered={got} of {want} publish_s={publish_s:.2} deliver_s={deliver_s:.2}"
    );
    crate::print_pubsub_summary(n, publish_s, got, deliver_s, &h, rss_per_conn);
    anyhow::ensure!(
        qos == QoS::AtMostOnce || got >= want,
        "delivered {got} of {want} messages"
    );
    Ok(())
}

/// Publishes `n` messages; counts them once acknowledged (PUBACK for
/// QoS 1, PUBCOMP for QoS 2) or, at QoS 0, once written.
async fn publish(
    c: AsyncClient,
    mut ev: EventLoop,
    args: &MqttPerf,
    qos: QoS,
    n: u64,
    published: &AtomicU64,
) -> anyhow::Result<()> {
    let (topic, size) = (args.topic.clone(), args.size.max(8));
    let sender = c.clone();
    let feed = tokio::spawn(async move {
        for _ in 0..n {
            let mut body = vec![b'x'; size];
            body[..8].copy_from_slice(&now_us().to_le_bytes());
            if sender
                .publish(topic.as_str(), qos, false, body)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut done = 0;
    while done < n {
        let counted = match ev.poll().await.context("publisher connection")? {
            Event::Outgoing(Outgoing::Publish(_)) => qos == QoS::AtMostOnce,
            Event::Incoming(Incoming::PubAck(_)) => qos == QoS::AtLeastOnce,
            Event::Incoming(Incoming::PubComp(_)) => qos == QoS::ExactlyOnce,
            _ => false,
        };
        if counted {
            done += 1;
            published.fetch_add(1, Ordering::Relaxed);
        }
    }
    feed.await?;
    let _ = c.disconnect().await;
    // Until DISCONNECT is out, so that QoS 0 publishes are not cut short.
    while let Ok(e) = ev.poll().await {
        if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(())
}

/// Opens `--connections` MQTT 3.1.1 connections that only CONNECT (no
/// keep-alive) and then stay silent, as sleeping devices do.
async fn open_idle(args: &MqttPerf, run_id: u64) -> anyhow::Result<Vec<TcpStream>> {
    let (host, port) = host_port(&args.url)?;
    let mut out = Vec::with_capacity(usize::try_from(args.connections).unwrap_or(0));
    let mut next = 0u64;
    while next < args.connections {
        let batch: Vec<_> = (next..args.connections.min(next + 256))
            .map(|i| {
                let host = host.clone();
                async move {
                    let mut s = TcpStream::connect((host.as_str(), port)).await?;
                    s.write_all(&connect_packet(&format!("idle-{run_id}-{i}")))
                        .await?;
                    let mut ack = [0u8; 4];
                    s.read_exact(&mut ack).await?;
                    anyhow::ensure!(ack[0] == 0x20 && ack[3] == 0, "CONNACK {ack:?}");
                    Ok::<_, anyhow::Error>(s)
                }
            })
            .collect();
        for s in futures::future::join_all(batch).await {
            out.push(s.context("opening an idle connection")?);
        }
        next += 256;
    }
    Ok(out)
}

/// CONNECT, MQTT 3.1.1, clean session, keep-alive 0.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10, u8::try_from(body.len()).unwrap_or(127)];
    p.extend_from_slice(&body);
    p
}
