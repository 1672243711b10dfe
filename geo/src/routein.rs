//! Exchange federation's receiving half: what entered an exchange of a
//! replicated namespace in another cluster arrives here in that
//! exchange's capture topic (`__geo-exchange-<exchange>`), and is routed
//! through this cluster's exchange of the same name, into this region's
//! queues and MQTT subscriptions, once each: a persistent queue keeps a
//! watermark for the stream, as a replicated partition does for its
//! source cluster. Records captured here are left alone: they were routed
//! here when they were published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_broker::service::GEO_EXCHANGE_PREFIX;
use magnetar_broker::subscription::{InitialPosition, SubscriptionOptions, SubscriptionType};
use magnetar_broker::topic::{ReplicatedAppend, Topic};
use magnetar_broker::{coalesce, format, BrokerError, Coalescer, Message, TopicRoute};
use magnetar_tenancy::TopicName;
use tokio::sync::watch;

use crate::error::Result;
use crate::Ctx;

/// The cursor of what has been routed in.
pub const ROUTE_IN_SUBSCRIPTION: &str = "__geo-route-in";

/// Header giving the routing key a record was published with.
const ROUTING_KEY_HEADER: &str = "amqp.routing-key";

/// Routes the capture topic's replicated records in until told to stop.
pub(crate) async fn run(ctx: Arc<Ctx>, topic: TopicName, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&ctx, &topic, &mut stop).await {
            Ok(()) => return,
            Err(e) => tracing::debug!(%topic, "routing replicated records in: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(ctx.cfg.backoff_max);
    }
}

/// Where one queue's routed copies go.
enum Dest {
    /// A persistent queue served here: each run of neighbouring capture
    /// offsets is appended with the stream's watermark, so that what is
    /// routed again after a restart is recognised and left out.
    Once {
        queue: Arc<Topic>,
        /// Where the last run sent to the queue ended.
        prev: u64,
        run: Option<Run>,
    },
    /// A queue held in memory, or served by another broker: appended as
    /// a publish would be.
    Coalesced(Coalescer),
}

/// Routed copies of neighbouring capture offsets `[base, next)`, sent
/// once as large as a coalesced batch may be.
struct Run {
    base: u64,
    next: u64,
    bytes: usize,
    messages: Vec<Message>,
}

type Durable = BoxFuture<'static, magnetar_broker::Result<()>>;

impl Dest {
    async fn open(
        b: &magnetar_broker::Broker,
        queue: &TopicName,
        source: u16,
        incarnation: u64,
    ) -> Result<Dest> {
        let coalesced = || Dest::Coalesced(b.coalescer(queue));
        let t = match b.topic(queue, true).await {
            Ok(t) => t,
            Err(BrokerError::NotOwner { .. }) => return Ok(coalesced()),
            Err(e) => return Err(e.into()),
        };
        if t.incarnation().is_err() {
            return Ok(coalesced());
        }
        let next = t.replication_handshake(source, incarnation).await?;
        Ok(Dest::Once {
            queue: t,
            prev: next,
            run: None,
        })
    }

    /// Takes the copy of the record at capture `offset`.
    async fn take(
        &mut self,
        source: u16,
        offset: u64,
        copy: Message,
        pending: &mut Vec<Durable>,
    ) -> Result<()> {
        match self {
            Dest::Coalesced(c) => pending.push(c.publish(copy).map(|r| r.map(|_| ())).boxed()),
            Dest::Once { queue, prev, run } => {
                // Stored before this session began (a run under way
                // starts at or after `prev`).
                if offset < *prev {
                    return Ok(());
                }
                let fits = run.as_ref().is_some_and(|r| {
                    r.next == offset
                        && r.messages.len() < coalesce::MAX_BATCH_MESSAGES
                        && r.bytes < coalesce::MAX_BATCH_BYTES
                });
                if !fits {
                    if let Some(r) = run.take() {
                        pending.push(send(queue, source, prev, r).await?);
                    }
                }
                let r = run.get_or_insert_with(|| Run {
                    base: offset,
                    next: offset,
                    bytes: 0,
                    messages: Vec::new(),
                });
                r.next = offset + 1;
                r.bytes += coalesce::size_of(&copy);
                r.messages.push(copy);
            }
        }
        Ok(())
    }

    /// Sends what is gathered.
    async fn flush(&mut self, source: u16, pending: &mut Vec<Durable>) -> Result<()> {
        if let Dest::Once { queue, prev, run } = self {
            if let Some(r) = run.take() {
                pending.push(send(queue, source, prev, r).await?);
            }
        }
        Ok(())
    }
}

/// Appends `run` to `queue` after the run that ended at `prev`.
async fn send(queue: &Topic, source: u16, prev: &mut u64, run: Run) -> Result<Durable> {
    let batch = format::with_base_offset(format::encode_messages(&run.messages)?, run.base);
    match queue.submit_replicated(source, *prev, batch).await? {
        ReplicatedAppend::Pending(p) => {
            *prev = run.next;
            Ok(p.map(|r| r.map(|_| ())).boxed())
        }
        // Someone else routes this stream into the queue too (an owner
        // that has not yet noticed it lost the capture topic): start over
        // from what the queue holds.
        ReplicatedAppend::Duplicate | ReplicatedAppend::OutOfOrder { .. } => {
            Err(BrokerError::TopicUnavailable(format!(
                "{}: routed-in records out of step with the queue",
                queue.name()
            ))
            .into())
        }
    }
}

async fn session(ctx: &Ctx, topic: &TopicName, stop: &mut watch::Receiver<bool>) -> Result<()> {
    let Some(exchange) = topic.local_name().strip_prefix(GEO_EXCHANGE_PREFIX) else {
        return Ok(());
    };
    let route = TopicRoute {
        exchange: exchange.to_owned(),
        routing_key: None,
    };
    let Some(b) = ctx.broker.upgrade() else {
        return Ok(());
    };
    let t = b.topic(topic, false).await?;
    // Each life of the capture topic is a source of its own: its offsets
    // start again from 0.
    let incarnation = t.incarnation()?;
    let source = b
        .tenancy()
        .stream_geo_id(&format!("{}/{incarnation}", topic.path()))
        .await?;
    let sub = t
        .get_or_create_subscription(
            ROUTE_IN_SUBSCRIPTION,
            SubscriptionOptions {
                sub_type: SubscriptionType::Exclusive,
                initial_position: InitialPosition::Earliest,
                ..SubscriptionOptions::default()
            },
        )
        .await?;
    drop(b);
    let log = t.log().clone();
    let mut pos = sub.mark_delete().max(log.start_offset());
    let mut end_rx = log.watch_end();
    // Appends to the queues are pipelined, each queue's in order; the
    // cursor moves once a read's worth is durable everywhere. What a crash
    // between the two routes again is recognised by each queue's
    // watermark for this stream, so that every record reaches each
    // persistent queue here once.
    let mut dests: HashMap<TopicName, Dest> = HashMap::new();
    loop {
        if log.end_offset() > pos {
            let entries = log.read(pos, 1000, 1 << 20).await?;
            if entries.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let Some(b) = ctx.broker.upgrade() else {
                return Ok(());
            };
            if dests.len() > 1024 {
                dests.clear();
            }
            let mut pending = Vec::new();
            for e in entries {
                for stored in crate::replicated_records(e.data)? {
                    let m = stored.message;
                    let Some(mut out) = route.prepare(topic, &m) else {
                        continue;
                    };
                    if let Some(key) = m
                        .headers
                        .iter()
                        .rev()
                        .find(|(k, _)| k == ROUTING_KEY_HEADER)
                        .and_then(|(_, v)| v.as_deref())
                    {
                        out.routing_key = String::from_utf8_lossy(key).into_owned();
                    }
                    // Not captured again: it came from elsewhere.
                    let (queues, _) = b
                        .route_here(
                            topic.namespace(),
                            &route.exchange,
                            &out.routing_key,
                            &out.headers,
                        )
                        .await?;
                    for (_, q) in queues {
                        if !dests.contains_key(&q) {
                            let d = Dest::open(&b, &q, source, incarnation).await?;
                            dests.insert(q.clone(), d);
                        }
                        if let Some(d) = dests.get_mut(&q) {
                            d.take(source, stored.offset, out.copy.clone(), &mut pending)
                                .await?;
                        }
                    }
                }
                pos = e.base_offset + e.offsets;
            }
            drop(b);
            for d in dests.values_mut() {
                d.flush(source, &mut pending).await?;
            }
            for r in futures::future::join_all(pending).await {
                r?;
            }
            sub.expire_before(pos);
            continue;
        }
        tokio::select! {
            changed = end_rx.changed() => {
                if changed.is_err() {
                    return Err(magnetar_broker::BrokerError::TopicUnavailable(topic.to_string()).into());
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}
