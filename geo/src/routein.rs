//! Exchange federation's receiving half: what entered an exchange of a
//! replicated namespace in another cluster arrives here in that
//! exchange's capture topic (`__geo-exchange-<exchange>`), and is routed
//! through this cluster's exchange of the same name, into this region's
//! queues and MQTT subscriptions. Records captured here are left alone:
//! they were routed here when they were published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use magnetar_broker::service::GEO_EXCHANGE_PREFIX;
use magnetar_broker::subscription::{InitialPosition, SubscriptionOptions, SubscriptionType};
use magnetar_broker::{Coalescer, TopicRoute};
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
    // Appends to the queues are pipelined, each queue's in order, through
    // one coalescer per queue; the cursor moves once a read's worth is
    // durable everywhere.
    let mut publishers: HashMap<TopicName, Coalescer> = HashMap::new();
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
            if publishers.len() > 1024 {
                publishers.clear();
            }
            let mut pending = Vec::new();
            for e in entries {
                for m in crate::replicated_records(e.data)? {
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
                        let c = publishers
                            .entry(q.clone())
                            .or_insert_with(|| b.coalescer(&q));
                        pending.push(c.publish(out.copy.clone()));
                    }
                }
                pos = e.base_offset + e.offsets;
            }
            drop(b);
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
