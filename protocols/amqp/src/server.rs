//! The AMQP listener: one task per connection.

use std::sync::Arc;

use magnetar_broker::listener::ProtocolListeners;
use magnetar_broker::Broker;
use tokio::net::TcpListener;

use crate::session::{serve, Ctx};
use crate::AmqpConfig;

/// A running AMQP listener.
#[derive(Debug)]
pub struct AmqpServer {
    /// This one and the AMQPS (5671) listeners, sharing the queues' state
    /// and the connection budget; TLS ones are added here.
    pub listeners: ProtocolListeners,
}

impl AmqpServer {
    /// Serves AMQP 0-9-1 clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: AmqpConfig) -> std::io::Result<Self> {
        let admission = broker.admission("AMQP");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_alarms();
        ctx.broker
            .metrics()
            .add_source(Arc::new(magnetar_broker::metrics::WeakSource(
                Arc::downgrade(&ctx),
                queue_gauges,
            )));
        let mut listeners = ProtocolListeners::new("AMQP", admission, move |stream, _| {
            let certificate = stream.certificate_role().cloned();
            serve(stream, certificate, Arc::clone(&ctx))
        });
        listeners.serve_plain(listener)?;
        Ok(AmqpServer { listeners })
    }
}

/// RabbitMQ's queue gauges, per namespace (a vhost), from the queues
/// loaded on this broker: the subscription each AMQP queue is.
fn queue_gauges(
    ctx: Arc<Ctx>,
    cluster: &str,
) -> futures::future::BoxFuture<'_, magnetar_broker::metrics::Registry> {
    Box::pin(async move {
        let mut r = magnetar_broker::metrics::Registry::default();
        // Per namespace: queues, ready, unacked.
        let mut by_ns = std::collections::BTreeMap::<String, [i64; 3]>::new();
        for t in ctx.broker.loaded_topics().await {
            let Ok(sub) = t.subscription(crate::queue::QUEUE_SUBSCRIPTION).await else {
                continue;
            };
            let Ok(st) = sub.stats().await else {
                continue;
            };
            let e = by_ns.entry(t.name().namespace().to_string()).or_default();
            let unacked = i64::try_from(st.unacked_messages).unwrap_or(i64::MAX);
            let backlog = i64::try_from(st.msg_backlog).unwrap_or(i64::MAX);
            e[0] += 1;
            e[1] += backlog.saturating_sub(unacked).max(0);
            e[2] += unacked;
        }
        let families: [(&'static str, &'static str); 3] = [
            ("rabbitmq_queues", "AMQP queues loaded on this broker"),
            (
                "rabbitmq_queue_messages_ready",
                "Messages ready for delivery to AMQP consumers",
            ),
            (
                "rabbitmq_queue_messages_unacked",
                "Messages delivered to AMQP consumers and not yet acknowledged",
            ),
        ];
        for (i, (name, help)) in families.into_iter().enumerate() {
            let rows = by_ns.iter().map(|(ns, v)| (ns.clone(), v[i]));
            magnetar_broker::metrics::add_ns_gauges(&mut r, cluster, name, help, rows);
        }
        r
    })
}
