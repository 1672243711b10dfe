//! What every MQTT connection of a listener shares: the session, retained,
//! QoS 2 and owner stores, the live connection of each client id (for
//! takeover), the QoS 2 packet ids received, the publish routes, and the
//! subscribe gate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use magnetar_broker::format::now_ms;
use magnetar_broker::{Broker, Message, StateStore};
use magnetar_tenancy::names::{NamespaceName, TopicName};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::debug;

use crate::error::{MqttError, Result};
use crate::order::SubscribeGate;
use crate::props;
use crate::retained;
use crate::rules::subscriptions::{session_queue, Sub};
use crate::topic;
use crate::{MqttConfig, EXCHANGE};

/// Where persistent sessions keep their subscriptions.
const SESSION_AREA: &str = "mqtt-sessions";
/// Where retained messages are kept.
const RETAINED_AREA: &str = "mqtt-retained";
/// Packet ids of QoS 2 publishes that persistent sessions stored and the
/// client has not yet released: a resend after a reconnect, to this
/// broker after a restart or to another one, is not stored twice.
const QOS2_AREA: &str = "mqtt-qos2";
/// The connection each client id has, cluster-wide: a broker that sees
/// another broker write the record of a client id connected to it ends
/// that connection (takeover).
const OWNERS_AREA: &str = "mqtt-owners";

/// What every connection of a listener shares.
pub(crate) struct Ctx {
    pub broker: Broker,
    pub cfg: MqttConfig,
    pub(crate) sessions: StateStore,
    pub(crate) retained: StateStore,
    pub(crate) qos2: StateStore,
    pub(crate) owners: StateStore,
    pub(crate) retained_quota: magnetar_broker::KeyQuota,
    pub(crate) session_quota: magnetar_broker::KeyQuota,
    /// This listener's id in owner records.
    pub(crate) instance: u64,
    /// Owner record writes at once at most, so that a storm of connects
    /// or disconnects does not flood the metadata store.
    pub(crate) meta_ops: tokio::sync::Semaphore,
    pub(crate) next_conn: AtomicU64,
    pub(crate) registry: std::sync::Mutex<Registry>,
    /// SUBSCRIBEs that publishes read after them wait for.
    pub(crate) gate: Arc<SubscribeGate>,
    /// A QoS 1 or 2 publish from its arrival to its PUBACK or PUBREC.
    pub(crate) publish_latency: magnetar_broker::metrics::Histogram,
}

#[derive(Default)]
pub(crate) struct Registry {
    /// The live connection of each client id (by session key), and how
    /// to end it.
    pub(crate) live: HashMap<String, Live>,
    /// Packet ids of QoS 2 publishes stored but not yet released, per
    /// client: a resend after a reconnect is not stored twice.
    pub(crate) received: HashMap<(NamespaceName, String), HashSet<u16>>,
    pub(crate) publishers: HashMap<TopicName, magnetar_broker::Coalescer>,
    /// Where each topic's publishes go, valid while the broker's routing
    /// generation stays `routes_generation`.
    pub(crate) routes: HashMap<(NamespaceName, String), Arc<[magnetar_broker::Coalescer]>>,
    pub(crate) routes_generation: u64,
}

/// How often every broker looks for sessions past their expiry whose
/// timers a restart lost.
const SWEEP: Duration = Duration::from_secs(10);

/// A session key back to its namespace and client id.
fn parse_session_key(key: &str) -> Option<(NamespaceName, String)> {
    use magnetar_tenancy::names::decode_segment;
    let mut parts = key.split('/');
    let (t, n, c) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let ns = NamespaceName::new(&decode_segment(t).ok()?, &decode_segment(n).ok()?).ok()?;
    Some((ns, decode_segment(c).ok()?))
}

/// Owner record operations in flight at most, per listener.
const META_OPS: usize = 32;

/// Topics whose routes are cached at most; past it the cache starts over.
const ROUTE_CACHE: usize = 65_536;

pub(crate) struct Live {
    pub(crate) conn: u64,
    /// The role of the connection (None: authentication is off).
    pub(crate) role: Option<String>,
    pub(crate) kick: Option<oneshot::Sender<()>>,
    /// Version of this connection's owner record: a later one written by
    /// another broker means the client connected there.
    pub(crate) owner_version: u64,
}

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct StoredSession {
    pub(crate) subs: Vec<Sub>,
    /// Seconds the session outlives its connection (u32::MAX: forever).
    pub(crate) expiry: u32,
    /// The connection that last took the session up (its owner token):
    /// a timer of an older one (expiry, will delay) leaves it alone.
    #[serde(default)]
    pub(crate) owner: String,
    /// When its last connection ended (ms since the epoch); None while
    /// connected. What the sweeper expires sessions by once a restart
    /// has lost their timers.
    #[serde(default)]
    pub(crate) disconnected_ms: Option<i64>,
    /// The role that made the session: only it (or a superuser) may take
    /// the client id over and resume it. None: made with auth off.
    #[serde(default)]
    pub(crate) role: Option<String>,
}

/// The namespace a store key starts with (`tenant/namespace/…`, both
/// segments encoded).
fn key_namespace(key: &str) -> Option<String> {
    let mut it = key.splitn(3, '/');
    let (t, n) = (it.next()?, it.next()?);
    let t = magnetar_tenancy::names::decode_segment(t).ok()?;
    let n = magnetar_tenancy::names::decode_segment(n).ok()?;
    Some(format!("{t}/{n}"))
}

fn per_namespace<'a>(keys: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for k in keys {
        if let Some(ns) = key_namespace(k) {
            *out.entry(ns).or_default() += 1;
        }
    }
    out
}

/// The MQTT gauges, per namespace: sessions connected to this broker, and
/// persistent sessions and retained messages stored (cluster-wide, so
/// each broker reports the same count: take `max`, not `sum`).
pub(crate) fn mqtt_gauges(
    ctx: Arc<Ctx>,
    cluster: &str,
) -> futures::future::BoxFuture<'_, magnetar_broker::metrics::Registry> {
    Box::pin(async move {
        let mut r = magnetar_broker::metrics::Registry::default();
        let connected = {
            let reg = ctx.registry();
            per_namespace(reg.live.keys())
        };
        let stored = per_namespace(&ctx.sessions.keys("").await.unwrap_or_default());
        let retained = per_namespace(&ctx.retained.keys("").await.unwrap_or_default());
        let families = [
            (
                "magnetar_mqtt_sessions_connected",
                "MQTT sessions with a connection to this broker",
                connected,
            ),
            (
                "magnetar_mqtt_sessions_persisted",
                "Persistent MQTT sessions stored (session expiry above 0), connected or not",
                stored,
            ),
            (
                "magnetar_mqtt_retained_messages",
                "Retained MQTT messages stored",
                retained,
            ),
        ];
        for (name, help, rows) in families {
            magnetar_broker::metrics::add_ns_gauges(&mut r, cluster, name, help, rows);
        }
        r
    })
}

impl Ctx {
    pub(crate) fn new(broker: Broker, cfg: MqttConfig) -> Self {
        let sessions = broker.state(SESSION_AREA);
        let retained = broker.state(RETAINED_AREA);
        let qos2 = broker.state(QOS2_AREA);
        let owners = broker.state(OWNERS_AREA);
        Ctx {
            qos2,
            owners,
            retained_quota: magnetar_broker::KeyQuota::new(
                retained.clone(),
                cfg.max_retained_per_namespace,
                "retained messages",
            ),
            session_quota: magnetar_broker::KeyQuota::new(
                sessions.clone(),
                cfg.max_sessions_per_namespace,
                "persistent sessions",
            ),
            instance: rand::random(),
            publish_latency: broker.metrics().publish_latency("mqtt"),
            meta_ops: tokio::sync::Semaphore::new(META_OPS),
            broker,
            cfg,
            sessions,
            retained,
            next_conn: AtomicU64::new(1),
            registry: std::sync::Mutex::new(Registry::default()),
            gate: Arc::default(),
        }
    }

    /// What owner records and sessions name connection `conn` by.
    pub(crate) fn token(&self, conn: u64) -> String {
        format!("{:016x}-{conn}", self.instance)
    }

    /// Ends this listener's connections whose client ids connected to
    /// another broker since: owner records written there, seen here.
    pub(crate) async fn watch_owners(ctx: std::sync::Weak<Ctx>) {
        loop {
            let Some(strong) = ctx.upgrade() else {
                return;
            };
            let mut changes = strong.owners.watch("");
            let mine = format!("{:016x}-", strong.instance);
            drop(strong);
            while let Some(ch) = changes.next().await {
                let Some(value) = ch.value else {
                    continue;
                };
                if value.starts_with(mine.as_bytes()) {
                    continue;
                }
                let Some(ctx) = ctx.upgrade() else {
                    return;
                };
                let mut reg = ctx.registry();
                if let Some(l) = reg.live.get_mut(&ch.key) {
                    if ch.version > l.owner_version {
                        if let Some(k) = l.kick.take() {
                            let _ = k.send(());
                        }
                    }
                }
            }
            // The history ran out: watch again from now.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether `token`'s connection is still the last to have taken up
    /// the session (so that its timers may act on it).
    pub(crate) async fn session_still_with(
        &self,
        ns: &NamespaceName,
        client_id: &str,
        token: &str,
    ) -> bool {
        match self.load_session(ns, client_id).await {
            Some(s) => s.owner.is_empty() || s.owner == token,
            None => true,
        }
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn publisher(&self, topic: &TopicName) -> magnetar_broker::Coalescer {
        self.registry()
            .publishers
            .entry(topic.clone())
            .or_insert_with(|| self.broker.coalescer(topic))
            .clone()
    }

    pub(crate) fn session_key(ns: &NamespaceName, client_id: &str) -> String {
        format!(
            "{}/{}/{}",
            magnetar_tenancy::names::encode_segment(ns.tenant()),
            magnetar_tenancy::names::encode_segment(ns.namespace()),
            magnetar_tenancy::names::encode_segment(client_id)
        )
    }

    pub(crate) async fn load_session(
        &self,
        ns: &NamespaceName,
        client_id: &str,
    ) -> Option<StoredSession> {
        let v = self
            .sessions
            .get(&Self::session_key(ns, client_id))
            .await
            .ok()??;
        serde_json::from_slice(&v.value).ok()
    }

    pub(crate) async fn save_session(
        &self,
        ns: &NamespaceName,
        client_id: &str,
        s: &StoredSession,
    ) -> Result<()> {
        let json = serde_json::to_vec(s).map_err(|e| MqttError::Encode(e.to_string()))?;
        self.sessions
            .put(&Self::session_key(ns, client_id), json)
            .await?;
        Ok(())
    }

    pub(crate) fn qos2_prefix(ns: &NamespaceName, client_id: &str) -> String {
        format!("{}/", Self::session_key(ns, client_id))
    }

    /// The QoS 2 packet ids a persistent session stored and the client
    /// has not released, into the registry.
    pub(crate) async fn load_received(&self, ns: &NamespaceName, client_id: &str) -> Result<()> {
        let prefix = Self::qos2_prefix(ns, client_id);
        let ids: HashSet<u16> = self
            .qos2
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix)?.parse().ok())
            .collect();
        self.registry()
            .received
            .entry((ns.clone(), client_id.to_owned()))
            .or_default()
            .extend(ids);
        Ok(())
    }

    /// Ends a session: its state, its queue and its bindings.
    pub(crate) async fn drop_session(&self, ns: &NamespaceName, client_id: &str) {
        let _permit = self.meta_ops.acquire().await;
        let _ = self
            .sessions
            .delete(&Self::session_key(ns, client_id))
            .await;
        self.drop_session_rest(ns, client_id).await;
    }

    /// Every `SWEEP`, ends the sessions past their expiry that no timer
    /// is left for (their broker restarted since they disconnected).
    /// Every broker sweeps; the record's version decides who ends one.
    pub(crate) async fn sweep_sessions(ctx: std::sync::Weak<Ctx>) {
        let mut every = tokio::time::interval(SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(ctx) = ctx.upgrade() else {
                return;
            };
            let Ok(all) = ctx.sessions.list("").await else {
                continue;
            };
            let now = now_ms();
            for (key, v) in all {
                let Ok(s) = serde_json::from_slice::<StoredSession>(&v.value) else {
                    continue;
                };
                let Some(gone) = s.disconnected_ms else {
                    continue;
                };
                let due = s.expiry != u32::MAX && gone + i64::from(s.expiry) * 1000 <= now;
                if !due || ctx.registry().live.contains_key(&key) {
                    continue;
                }
                let Some((ns, client_id)) = parse_session_key(&key) else {
                    continue;
                };
                if let Ok(true) = ctx.sessions.compare_and_delete(&key, v.version).await {
                    debug!(client = %client_id, "session expired");
                    ctx.drop_session_rest(&ns, &client_id).await;
                }
            }
        }
    }

    /// What a session holds besides its record: QoS 2 ids, queues.
    pub(crate) async fn drop_session_rest(&self, ns: &NamespaceName, client_id: &str) {
        let prefix = Self::qos2_prefix(ns, client_id);
        for (k, _) in self.qos2.list(&prefix).await.unwrap_or_default() {
            let _ = self.qos2.delete(&k).await;
        }
        for qos in [0, 1] {
            self.delete_queue(ns, &session_queue(client_id, qos)).await;
        }
        self.registry()
            .received
            .remove(&(ns.clone(), client_id.to_owned()));
    }

    /// Deletes a session's queue, and the publisher of its topic, so that
    /// sessions coming and going leave nothing behind.
    pub(crate) async fn delete_queue(&self, ns: &NamespaceName, queue: &str) {
        let _ = self.broker.delete_queue(ns, queue).await;
        for durable in [false, true] {
            if let Ok(t) = self.broker.queue_topic(ns, queue, durable) {
                self.registry().publishers.remove(&t);
            }
        }
    }

    /// Declares `queue` unless it exists.
    pub(crate) async fn ensure_queue(
        &self,
        ns: &NamespaceName,
        queue: &str,
        durable: bool,
    ) -> Result<()> {
        if !self.broker.queue_exists(ns, queue).await? {
            self.broker.declare_queue(ns, queue, durable).await?;
        }
        Ok(())
    }

    /// Routes a publish of `topic` through `amq.topic` (and keeps it as
    /// the topic's retained message if `retain`); resolves once every
    /// queue it reached has it durably (or in memory, for transient
    /// queues), and the retained store too.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        ns: &NamespaceName,
        topic: &str,
        record: Message,
        retain: bool,
    ) -> Result<BoxFuture<'static, Result<()>>> {
        let targets = self.targets(ns, topic).await?;
        if retain && record.value.as_ref().is_some_and(|v| !v.is_empty()) {
            // Refused before anything is stored, so that the client's
            // error means the whole publish.
            self.retained_quota
                .admit(
                    &retained::namespace_prefix(ns),
                    &magnetar_tenancy::names::encode_segment(topic),
                )
                .await?;
        }
        let retained = retain.then(|| {
            let (ctx, ns, topic) = (Arc::clone(self), ns.clone(), topic.to_owned());
            let record = record.clone();
            async move { ctx.retain(&ns, &topic, record).await }
        });
        let stored: Vec<_> = targets.iter().map(|c| c.publish(record.clone())).collect();
        Ok(async move {
            for r in futures::future::join_all(stored).await {
                r?;
            }
            if let Some(r) = retained {
                r.await?;
            }
            Ok(())
        }
        .boxed())
    }

    /// The publishers of the queues a publish of `topic` reaches.
    pub(crate) async fn targets(
        &self,
        ns: &NamespaceName,
        topic: &str,
    ) -> Result<Arc<[magnetar_broker::Coalescer]>> {
        let generation = self.broker.routing_generation();
        let key = (ns.clone(), topic.to_owned());
        {
            let mut reg = self.registry();
            if reg.routes_generation != generation {
                reg.routes.clear();
                reg.routes_generation = generation;
            }
            if let Some(t) = reg.routes.get(&key) {
                return Ok(Arc::clone(t));
            }
        }
        let routes = self
            .broker
            .route(ns, EXCHANGE, &topic::routing_key(topic), &[])
            .await?;
        let targets: Arc<[magnetar_broker::Coalescer]> =
            routes.iter().map(|(_, t)| self.publisher(t)).collect();
        let mut reg = self.registry();
        if reg.routes_generation == generation {
            if reg.routes.len() >= ROUTE_CACHE {
                reg.routes.clear();
            }
            reg.routes.insert(key, Arc::clone(&targets));
        }
        Ok(targets)
    }

    /// Keeps `record` as `topic`'s retained message; an empty payload
    /// clears it.
    pub(crate) async fn retain(
        &self,
        ns: &NamespaceName,
        topic: &str,
        mut record: Message,
    ) -> Result<()> {
        let key = retained::key(ns, topic);
        if record.value.as_ref().is_none_or(|v| v.is_empty()) {
            self.retained.delete(&key).await?;
        } else {
            record.timestamp_ms = now_ms();
            self.retained.put(&key, retained::encode(&record)?).await?;
        }
        Ok(())
    }

    /// The unexpired retained messages whose topics `pattern` matches.
    pub(crate) async fn retained_matching(
        &self,
        ns: &NamespaceName,
        pattern: &str,
    ) -> Result<Vec<Message>> {
        let all = self
            .retained
            .list(&retained::filter_prefix(ns, pattern))
            .await?;
        let now = now_ms();
        Ok(all
            .into_iter()
            .filter_map(|(_, v)| retained::decode(&v.value))
            .filter(|m| {
                props::read(m, now).is_some_and(|s| !s.expired && topic::matches(pattern, &s.topic))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_round_trip_with_any_client_id() {
        let ns = NamespaceName::new("acme", "iot").expect("valid");
        for id in ["dev-1", "a/b", "with space", "%2F", "ünï"] {
            let key = Ctx::session_key(&ns, id);
            assert_eq!(key.matches('/').count(), 2, "{key}");
            assert_eq!(parse_session_key(&key), Some((ns.clone(), id.to_owned())));
        }
        assert_eq!(parse_session_key("a/b"), None);
        assert_eq!(parse_session_key("a/b/c/d"), None);
    }
}
