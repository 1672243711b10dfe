//! Routes out of a topic: every record of a topic republished through an
//! exchange of its namespace, as a RabbitMQ shovel moves a queue's messages
//! to an exchange.
//!
//! Exchanges only see what AMQP and MQTT publish into them; Kafka and
//! WebSocket producers write topics directly. A route is how such a topic
//! feeds the routing table, and through `amq.topic` the MQTT sessions.
//!
//! The owner of each partition runs one forwarder on the durable exclusive
//! subscription [`ROUTE_SUBSCRIPTION`]. A record is acknowledged only once
//! every queue it reached has stored it, so a crash repeats at most the
//! record in flight (at least once), and order is kept per partition. The
//! record's key is the routing key; records without one are routed, and
//! keyed, by the route's `routingKey`. Copies carry [`ROUTED_FROM`] and are never routed again,
//! so that routes cannot loop.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use magnetar_tenancy::TopicName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::format::Message;
use crate::routing::HeaderValue;
use crate::service::WeakBroker;
use crate::subscription::{
    ConsumerOptions, InitialPosition, SubscriptionOptions, SubscriptionType,
};

/// The subscription a route reads through; it holds the backlog of records
/// not yet routed.
pub const ROUTE_SUBSCRIPTION: &str = "__route";
/// Header on routed copies: the partition they were routed out of.
pub const ROUTED_FROM: &str = "magnetar.routed-from";

/// Deliveries handed to a forwarder ahead of its acknowledgements.
const WINDOW: u64 = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a topic's records are routed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopicRoute {
    /// An exchange of the topic's namespace (`""` is the default exchange).
    pub exchange: String,
    /// The routing key of records without a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
}

/// One record on its way through the exchange.
#[derive(Debug)]
pub struct Outbound {
    pub routing_key: String,
    /// The record's headers, as a headers exchange matches them.
    pub headers: Vec<(String, HeaderValue)>,
    /// What the queues store.
    pub copy: Message,
}

impl TopicRoute {
    /// How a record goes out; `None` for a record that was routed already.
    pub fn prepare(&self, from: &TopicName, m: &Message) -> Option<Outbound> {
        if m.headers.iter().any(|(k, _)| k == ROUTED_FROM) {
            return None;
        }
        let key = match &m.key {
            Some(k) => String::from_utf8_lossy(k).into_owned(),
            None => self.routing_key.clone().unwrap_or_default(),
        };
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    None => HeaderValue::Void,
                    Some(b) => match std::str::from_utf8(b) {
                        Ok(s) => HeaderValue::Str(s.to_owned()),
                        Err(_) => HeaderValue::Bytes(b.to_vec()),
                    },
                };
                (k.clone(), v)
            })
            .collect();
        let mut copy = m.clone();
        // Routed like an AMQP publish, the copy is keyed by its routing
        // key, which is where MQTT deliveries take their topic from.
        if copy.key.is_none() && !key.is_empty() {
            copy.key = Some(Bytes::from(key.clone()));
        }
        copy.headers
            .push((ROUTED_FROM.to_owned(), Some(Bytes::from(from.to_string()))));
        Some(Outbound {
            routing_key: key,
            headers,
            copy,
        })
    }
}

/// The route's subscription, made at `Latest` when the route is set; a
/// forwarder that finds none (a partition added later) starts at the
/// partition's first record, all of which came after the route.
pub(crate) fn subscription_options(initial_position: InitialPosition) -> SubscriptionOptions {
    SubscriptionOptions {
        sub_type: SubscriptionType::Exclusive,
        initial_position,
        ..SubscriptionOptions::default()
    }
}

struct Running {
    route: TopicRoute,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The forwarders this broker runs, one per routed partition it owns.
#[derive(Default)]
pub(crate) struct Forwarders {
    running: HashMap<TopicName, Running>,
}

impl Forwarders {
    /// Runs exactly the forwarders of `wanted`. Those whose route was
    /// removed (not merely moved to another broker) lose their
    /// subscription, so it holds no backlog.
    pub(crate) async fn reconcile(
        &mut self,
        weak: &WeakBroker,
        wanted: HashMap<TopicName, TopicRoute>,
        routed_anywhere: &HashSet<TopicName>,
    ) {
        let stale: Vec<TopicName> = self
            .running
            .iter()
            .filter(|(t, r)| wanted.get(*t) != Some(&r.route))
            .map(|(t, _)| t.clone())
            .collect();
        for t in stale {
            if let Some(r) = self.running.remove(&t) {
                let _ = r.stop.send(true);
                let _ = r.task.await;
                if !routed_anywhere.contains(&t) {
                    if let Some(b) = weak.upgrade() {
                        if let Err(e) = b.unsubscribe(&t, ROUTE_SUBSCRIPTION, true).await {
                            tracing::debug!(topic = %t, "removing the route subscription: {e}");
                        }
                    }
                }
            }
        }
        for (t, route) in wanted {
            if self.running.contains_key(&t) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(forward(weak.clone(), t.clone(), route.clone(), stopped));
            self.running.insert(t, Running { route, stop, task });
        }
    }

    pub(crate) async fn stop_all(&mut self) {
        for (_, r) in self.running.drain() {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }
}

/// Sleeps for `d`; false if told to stop first.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

async fn forward(
    weak: WeakBroker,
    topic: TopicName,
    route: TopicRoute,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(b) = weak.upgrade() else { return };
        let opts = ConsumerOptions {
            name: "route".into(),
            ..ConsumerOptions::default()
        };
        // Never creates the topic: a deleted topic stays deleted while its
        // route is being removed.
        let subscribe = async {
            b.topic(&topic, false)
                .await?
                .subscribe(
                    ROUTE_SUBSCRIPTION,
                    subscription_options(InitialPosition::Earliest),
                    opts,
                )
                .await
        };
        let subscribed = tokio::select! {
            r = subscribe => r,
            _ = stop.changed() => return,
        };
        drop(b);
        let mut consumer = match subscribed {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%topic, "route subscription: {e}");
                if !pause(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        consumer.flow(WINDOW);
        loop {
            let delivery = tokio::select! {
                d = consumer.recv() => d,
                _ = stop.changed() => return,
            };
            // The topic was unloaded or moved: subscribe again.
            let Some(d) = delivery else { break };
            if let Some(out) = route.prepare(&topic, &d.message) {
                let mut retry = Duration::from_millis(100);
                loop {
                    let Some(b) = weak.upgrade() else { return };
                    let r = b
                        .route_publish(
                            topic.namespace(),
                            &route.exchange,
                            &out.routing_key,
                            &out.headers,
                            out.copy.clone(),
                        )
                        .await;
                    drop(b);
                    match r {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(%topic, exchange = %route.exchange, "routing out: {e}; retrying");
                            if !pause(&mut stop, retry).await {
                                return;
                            }
                            retry = (retry * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
            consumer.ack(d.offset);
            consumer.flow(1);
            backoff = Duration::from_millis(100);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> TopicName {
        "persistent://public/default/t".parse().expect("topic")
    }

    #[test]
    fn the_key_is_the_routing_key_and_copies_are_marked() {
        let r = TopicRoute {
            exchange: "amq.topic".into(),
            routing_key: Some("fallback".into()),
        };
        let mut m = Message::new("v");
        m.key = Some(Bytes::from_static(b"a.b"));
        m.headers = vec![
            ("h".into(), Some(Bytes::from_static(b"x"))),
            ("bin".into(), Some(Bytes::from_static(&[0xff]))),
            ("none".into(), None),
        ];
        let Outbound {
            routing_key,
            headers,
            copy,
        } = r.prepare(&topic(), &m).expect("routed");
        assert_eq!(routing_key, "a.b");
        assert_eq!(
            headers,
            vec![
                ("h".into(), HeaderValue::Str("x".into())),
                ("bin".into(), HeaderValue::Bytes(vec![0xff])),
                ("none".into(), HeaderValue::Void),
            ]
        );
        assert_eq!(copy.value, m.value);
        assert_eq!(copy.key, m.key);
        assert_eq!(&copy.headers[..3], &m.headers[..]);
        assert_eq!(
            copy.headers[3],
            (
                ROUTED_FROM.into(),
                Some(Bytes::from("persistent://public/default/t"))
            )
        );
        // A routed copy is not routed again.
        assert!(r.prepare(&topic(), &copy).is_none());
    }

    #[test]
    fn records_without_a_key_take_the_routes_key() {
        let mut r = TopicRoute {
            exchange: "amq.topic".into(),
            routing_key: Some("fallback".into()),
        };
        let m = Message::new("v");
        let out = r.prepare(&topic(), &m).expect("routed");
        assert_eq!(out.routing_key, "fallback");
        assert_eq!(out.copy.key.as_deref(), Some(&b"fallback"[..]));
        r.routing_key = None;
        let out = r.prepare(&topic(), &m).expect("routed");
        assert_eq!(out.routing_key, "");
        assert_eq!(out.copy.key, None);
    }

    #[test]
    fn routes_read_and_write_pulsar_style_json() {
        let r: TopicRoute =
            serde_json::from_str(r#"{"exchange":"amq.topic","routingKey":"k"}"#).expect("json");
        assert_eq!(r.routing_key.as_deref(), Some("k"));
        assert_eq!(
            serde_json::to_string(&TopicRoute {
                exchange: "x".into(),
                routing_key: None
            })
            .expect("json"),
            r#"{"exchange":"x"}"#
        );
        assert!(serde_json::from_str::<TopicRoute>(r#"{"exchange":"x","bogus":1}"#).is_err());
    }
}
