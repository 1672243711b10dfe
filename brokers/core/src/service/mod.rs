//! The broker service and its protocol-neutral API, [`Broker`].
//!
//! Protocol crates call only this handle: publish, fetch, subscribe,
//! declare and bind, route. It loads topics on demand, once this broker
//! owns the topic's namespace bundle through a lease in the metadata store;
//! otherwise it answers [`BrokerError::NotOwner`] with the owner's address.
//!
//! Ownership is an ephemeral key per bundle, tied to this broker's session.
//! When a broker dies its session expires, its keys vanish, and the next
//! broker asked for one of its topics takes the bundle, which recovers
//! (fences) the topic's last ledger before any write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use magnetar_bookies::LedgerClient;
use magnetar_metadata::{EventKind, MetaClient, MetaError, Session};
use magnetar_tenancy::{NamespaceName, Policies, TenancyStore, TopicDomain, TopicName};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell, RwLock};

use crate::error::{BrokerError, Result};
use crate::format::{Message, ProducerSequence};
use crate::log::{MemoryLog, PartitionLog};
use crate::managed_ledger::{
    offload_candidates, Entry, ManagedLedger, ManagedLedgerConfig, OffloadState, OffloadStatus,
    ML_PREFIX,
};
use crate::routing::{Binding, ExchangeDef, HeaderValue, Routed, RoutingSnapshot, RoutingTable};
use crate::state::StateStore;
use crate::subscription::{Consumer, ConsumerOptions, DeadLetterSink, SubscriptionOptions};
use crate::topic::{Published, RetentionDefaults, Topic, TopicStats};
use crate::topic_route::{Forwarders, TopicRoute, ROUTE_SUBSCRIPTION};

mod data;
mod maintenance;
mod ownership;
mod routing;
mod topics;

const OWNER_PREFIX: &str = "/namespace-owners/";
const BROKERS_PREFIX: &str = "/brokers/active/";
const PARTITIONED_PREFIX: &str = "/partitioned-topics/";
const ROUTING_PREFIX: &str = "/routing/";
/// Where topic-level policies are stored, by topic path.
pub const TOPIC_POLICIES_PREFIX: &str = "/topic-policies/";

/// Policies set on one topic (all its partitions), over its namespace's,
/// as Pulsar's topic-level policies are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policies: Option<magnetar_tenancy::RetentionPolicies>,
    /// Where the topic's records are routed, besides being kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<TopicRoute>,
    /// The clusters the topic replicates to, over its namespace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_clusters: Option<std::collections::BTreeSet<String>>,
    /// Over its namespace's `replicatorDispatchRate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicator_dispatch_rate: Option<magnetar_tenancy::DispatchRate>,
}
/// The topic of a replicated namespace that keeps, for the other
/// clusters, what enters its durable exchange: this, then the exchange.
pub const GEO_EXCHANGE_PREFIX: &str = "__geo-exchange-";

/// The topic of a replicated namespace that carries changes of its
/// replicated protocol state (MQTT's retained messages) between clusters.
pub const GEO_STATE_TOPIC: &str = "__geo-state";

/// Topics of replication's own; once every cursor on them (the other
/// clusters', and the local routing in) has a record, it goes.
pub const GEO_TOPIC_PREFIX: &str = "__geo-";

/// A replicated topic deleted here, followed by the topic's path: inbound
/// replication does not make it again until it is created explicitly.
pub const GEO_TOMBSTONE_PREFIX: &str = "/geo/tombstones/";

/// Where brokers send each other publishes for topics they do not own,
/// followed by the topic's path.
pub const FORWARD_PATH: &str = "/internal/v1/batch/";

/// How a broker is reached, as stored in its registration and in the
/// ownership keys it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub id: String,
    /// Base URL of the HTTP listener (admin API, WebSocket).
    pub http_url: String,
    /// Advertised protocol listeners, by protocol name (`kafka`, `amqp`,
    /// `mqtt`), as `host:port`.
    #[serde(default)]
    pub listeners: BTreeMap<String, String>,
}

/// See [`Broker::metadata_quorum`].
#[derive(Clone, Debug)]
pub struct MetadataQuorum {
    pub leader: u64,
    pub term: u64,
    /// The leader's last applied index.
    pub applied: u64,
    pub voters: Vec<QuorumVoter>,
}

#[derive(Clone, Debug)]
pub struct QuorumVoter {
    pub id: u64,
    pub addr: String,
    pub last_log_index: i64,
}

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub cluster: String,
    pub info: BrokerInfo,
    /// TLS of this broker's calls to other brokers (forwarded publishes,
    /// lookups), for those advertising `https://`: the cluster's CA, and
    /// the certificate presented.
    pub http_tls: Option<magnetar_net::tls::ClientConfig>,
    pub managed_ledger: ManagedLedgerConfig,
    /// Byte budget of each non-persistent partition.
    pub memory_topic_bytes: usize,
    /// How long a non-persistent topic without subscriptions stays
    /// loaded after it was last used (Pulsar deletes inactive ones after
    /// 60 s); zero: for good.
    pub memory_topic_idle: Duration,
    pub retention: RetentionDefaults,
    /// How often retention runs over the loaded topics.
    pub retention_interval: Duration,
    /// TTL of this broker's metadata session: how long its ownership
    /// outlives it after a crash.
    pub session_ttl: Duration,
    /// Create topics on first publish or subscribe, as Pulsar and Kafka do
    /// by default.
    pub auto_create_topics: bool,
    /// The auth hook; `None` lets every client do everything.
    pub auth: Option<crate::auth::AuthConfig>,
    /// When closed ledgers move to the object store
    /// (`managed_ledger.tier`), unless a namespace says otherwise.
    pub offload: OffloadDefaults,
    /// Connection limits and timeouts of every client listener.
    pub listener_limits: crate::listener::ListenerLimits,
    /// How many topics get series of their own in `/metrics`, beside
    /// their namespace's; 0 (the default) keeps every series at namespace
    /// level, since every MQTT session is a queue.
    pub metrics_topics: usize,
}

/// The broker's offload settings; namespaces override the policies.
#[derive(Clone, Debug)]
pub struct OffloadDefaults {
    /// How often the offload policy runs over the loaded topics.
    pub interval: Duration,
    /// Bytes on the bookies past which a topic's oldest closed ledgers are
    /// offloaded; -1: never, by size.
    pub threshold_bytes: i64,
    /// Age in seconds (since closing) past which closed ledgers are
    /// offloaded; -1: never, by age.
    pub threshold_seconds: i64,
    /// How long the bookies keep a ledger's copy after its offload.
    pub deletion_lag: Duration,
    /// Attempts per ledger and run, with backoff between them.
    pub attempts: u32,
}

impl Default for OffloadDefaults {
    fn default() -> Self {
        OffloadDefaults {
            interval: Duration::from_secs(60),
            threshold_bytes: -1,
            threshold_seconds: -1,
            // Pulsar's default managedLedgerOffloadDeletionLagMs.
            deletion_lag: Duration::from_secs(4 * 3600),
            attempts: 3,
        }
    }
}

impl BrokerConfig {
    pub fn new(cluster: &str, info: BrokerInfo) -> Self {
        BrokerConfig {
            cluster: cluster.into(),
            info,
            http_tls: None,
            managed_ledger: ManagedLedgerConfig::default(),
            memory_topic_bytes: 16 << 20,
            memory_topic_idle: Duration::from_secs(60),
            retention: RetentionDefaults::default(),
            retention_interval: Duration::from_secs(60),
            session_ttl: Duration::from_secs(10),
            auto_create_topics: true,
            auth: None,
            offload: OffloadDefaults::default(),
            listener_limits: crate::listener::ListenerLimits::default(),
            metrics_topics: 0,
        }
    }
}

/// What a fetch returns: entries from the requested offset on, and where
/// the partition starts and ends.
#[derive(Clone, Debug)]
pub struct FetchResult {
    pub entries: Vec<Entry>,
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PartitionedMetadata {
    partitions: u32,
}

type TopicCell = Arc<OnceCell<Arc<Topic>>>;

/// A change to a namespace's routing that applies at once and is stored
/// after: replayed on the stored table when another broker's change is
/// stored first.
type RoutingOp = Box<dyn FnMut(&mut NamespaceRouting) -> Result<()> + Send>;

struct PendingChange {
    seq: u64,
    op: RoutingOp,
    /// Told when the change is stored, or why it is not.
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

impl PendingChange {
    fn fail(self, e: BrokerError) {
        let _ = self.done.send(Err(e));
    }
}

/// The wait for a routing change that already applies to be stored.
pub type RoutingStored = futures::future::BoxFuture<'static, Result<()>>;

struct NamespaceRouting {
    table: RoutingTable,
    version: u64,
    /// Queues that live as long as this broker does (exclusive AMQP
    /// queues, clean MQTT sessions): non-persistent topics, never stored.
    transient: HashSet<String>,
    /// The durable part as stored at `version`: what the table goes back
    /// to, with the transient part, when unstored changes are refused.
    base: RoutingSnapshot,
    /// Durable changes that apply here and are not stored yet, in order.
    pending: std::collections::VecDeque<PendingChange>,
    next_seq: u64,
    /// A task is storing the pending changes.
    flushing: bool,
    /// A write is in flight: another broker's table seen meanwhile waits
    /// here, since the write may have stored this broker's changes after
    /// it.
    inflight: bool,
    deferred: Option<(RoutingTable, u64)>,
}

impl NamespaceRouting {
    fn new(table: RoutingTable, version: u64) -> Self {
        NamespaceRouting {
            base: table.to_snapshot(),
            table,
            version,
            transient: HashSet::new(),
            pending: Default::default(),
            next_seq: 0,
            flushing: false,
            inflight: false,
            deferred: None,
        }
    }

    /// Takes a stored table (another broker's change) as the new base and
    /// replays this broker's own transient part on it (non-durable
    /// exchanges, transient queues and the bindings that involve them),
    /// then its unstored changes. Those that no longer apply are returned,
    /// with why, to be told.
    #[must_use]
    fn adopt(&mut self, stored: RoutingTable, version: u64) -> Vec<(PendingChange, BrokerError)> {
        let full = self.table.to_snapshot();
        let durable = durable_snapshot(self);
        self.base = stored.to_snapshot();
        let mut next = stored;
        for e in full.exchanges {
            if !durable.exchanges.iter().any(|d| d.name == e.name) {
                let _ = next.declare_exchange(e, false);
            }
        }
        for q in &self.transient {
            let _ = next.declare_queue(q);
        }
        for b in full.bindings {
            if !durable.bindings.contains(&b) {
                let _ = next.bind(b);
            }
        }
        self.table = next;
        self.version = version;
        let mut failed = Vec::new();
        for mut p in std::mem::take(&mut self.pending) {
            match (p.op)(self) {
                Ok(()) => self.pending.push_back(p),
                Err(e) => failed.push((p, e)),
            }
        }
        failed
    }

    /// Drops every unstored change, back to the stored table; the changes
    /// are returned to be told.
    #[must_use]
    fn roll_back(&mut self) -> Vec<PendingChange> {
        let pending: Vec<PendingChange> = std::mem::take(&mut self.pending).into();
        // The base parsed once already, so it parses again.
        if let Ok(base) = RoutingTable::from_snapshot(self.base.clone()) {
            let _ = self.adopt(base, self.version);
        }
        pending
    }
}

fn tell_failed(failed: Vec<(PendingChange, BrokerError)>) {
    for (p, e) in failed {
        p.fail(e);
    }
}

struct Inner {
    cfg: BrokerConfig,
    meta: MetaClient,
    /// For forwarding to other brokers.
    http: reqwest::Client,
    /// Owners of topics this broker forwarded to, by HTTP URL.
    remote_owners: std::sync::Mutex<HashMap<TopicName, String>>,
    ledgers: LedgerClient,
    tenancy: TenancyStore,
    session: RwLock<Session>,
    topics: Mutex<HashMap<TopicName, TopicCell>>,
    routing: Mutex<HashMap<NamespaceName, Arc<Mutex<NamespaceRouting>>>>,
    /// Bumped whenever any namespace's routing changes here, so that
    /// front ends can cache routes and know when to drop them.
    routing_generation: std::sync::atomic::AtomicU64,
    retention_holds: std::sync::RwLock<Vec<Arc<dyn RetentionHold>>>,
    replication_stats: std::sync::RwLock<Option<ReplicationStats>>,
    /// Counts the persistent topics this broker made.
    topics_created: tokio::sync::watch::Sender<u64>,
    metrics: Arc<crate::metrics::BrokerMetrics>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// The protocol-neutral broker API. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// A topic's replicators' stats by remote cluster, from whatever runs
/// them (the broker knows nothing of replication's transport).
pub type ReplicationStats =
    Arc<dyn Fn(&TopicName) -> BTreeMap<String, serde_json::Value> + Send + Sync>;

/// A handle for background tasks that must not keep the broker alive;
/// it upgrades only while the broker runs.
#[derive(Clone)]
pub struct WeakBroker(Weak<Inner>);

impl WeakBroker {
    pub fn upgrade(&self) -> Option<Broker> {
        self.0
            .upgrade()
            .filter(|i| !*i.shutdown.borrow())
            .map(|inner| Broker { inner })
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("id", &self.inner.cfg.info.id)
            .finish()
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| BrokerError::CorruptMetadata {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// The bundle (hash range) of a topic, named as Pulsar names bundles.
pub fn bundle_of(topic: &TopicName, num_bundles: u32) -> String {
    let n = u64::from(num_bundles.max(1));
    let h = u64::from(crc32c::crc32c(topic.to_string().as_bytes()));
    let i = (h * n) >> 32;
    let lo = (i << 32) / n;
    let hi = ((i + 1) << 32) / n;
    format!("0x{lo:08x}_0x{:08x}", hi.min(u64::from(u32::MAX)))
}

impl Broker {
    /// Registers this broker, makes sure the cluster, `public` and
    /// `public/default` exist, and starts the background work.
    pub async fn start(meta: MetaClient, cfg: BrokerConfig) -> Result<Broker> {
        let tenancy = TenancyStore::new(meta.clone());
        let cluster = magnetar_tenancy::ClusterData {
            service_url: Some(cfg.info.http_url.clone()),
            ..Default::default()
        };
        tenancy.ensure_defaults(&cfg.cluster, &cluster).await?;
        let session = meta.grant_session(cfg.session_ttl).await?;
        session
            .put(&format!("{BROKERS_PREFIX}{}", cfg.info.id), json(&cfg.info))
            .await?;
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = cfg.http_tls.clone() {
            http = http.use_preconfigured_tls(tls);
        }
        let http = http
            .build()
            .map_err(|e| BrokerError::InvalidArgument(format!("HTTP client: {e}")))?;
        let inner = Arc::new(Inner {
            http,
            remote_owners: std::sync::Mutex::default(),
            ledgers: LedgerClient::new(meta.clone()),
            tenancy,
            session: RwLock::new(session),
            topics: Mutex::new(HashMap::new()),
            routing: Mutex::new(HashMap::new()),
            routing_generation: std::sync::atomic::AtomicU64::new(0),
            retention_holds: std::sync::RwLock::default(),
            replication_stats: std::sync::RwLock::default(),
            topics_created: tokio::sync::watch::Sender::new(0),
            metrics: Arc::new(crate::metrics::BrokerMetrics::new(&cfg.cluster)),
            shutdown,
            meta,
            cfg,
        });
        let broker = Broker { inner };
        tokio::spawn(session_keeper(Arc::downgrade(&broker.inner)));
        tokio::spawn(periodic(
            Arc::downgrade(&broker.inner),
            "retention",
            |c| c.retention_interval,
            |b| {
                Box::pin(async move {
                    let run = b.run_retention().await;
                    for (topic, why) in &run.failed {
                        tracing::warn!("retention skipped {topic}: {why}");
                    }
                    Ok(())
                })
            },
        ));
        tokio::spawn(periodic(
            Arc::downgrade(&broker.inner),
            "offload",
            |c| c.offload.interval,
            |b| Box::pin(b.run_offload()),
        ));
        tokio::spawn(periodic(
            Arc::downgrade(&broker.inner),
            "idle topics",
            |c| (c.memory_topic_idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30)),
            |b| Box::pin(b.unload_idle_topics()),
        ));
        tokio::spawn(routing_watch(Arc::downgrade(&broker.inner)));
        tokio::spawn(route_loop(WeakBroker(Arc::downgrade(&broker.inner))));
        Ok(broker)
    }

    pub fn info(&self) -> &BrokerInfo {
        &self.inner.cfg.info
    }

    /// A handle that does not keep the broker alive.
    pub fn downgrade(&self) -> WeakBroker {
        WeakBroker(Arc::downgrade(&self.inner))
    }

    /// Turns true when the broker shuts down.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.cfg
    }

    pub fn tenancy(&self) -> &TenancyStore {
        &self.inner.tenancy
    }

    pub fn meta(&self) -> &MetaClient {
        &self.inner.meta
    }

    /// The metadata store's raft group as its leader sees it, with each
    /// member's last log index (-1 for a member that did not answer);
    /// `None` when no reachable node knows a leader.
    pub async fn metadata_quorum(&self) -> Option<MetadataQuorum> {
        let meta = &self.inner.meta;
        let mut statuses = Vec::new();
        for endpoint in meta.endpoints() {
            if let Ok(s) = meta.node_status(endpoint).await {
                statuses.push(s);
            }
        }
        let leader = statuses.iter().find(|s| s.leader == Some(s.id))?;
        let voters = leader
            .members
            .iter()
            .map(|m| QuorumVoter {
                id: m.id,
                addr: m.addr.clone(),
                last_log_index: statuses
                    .iter()
                    .find(|s| s.id == m.id)
                    .and_then(|s| i64::try_from(s.last_log_index).ok())
                    .unwrap_or(-1),
            })
            .collect();
        Some(MetadataQuorum {
            leader: leader.id,
            term: leader.term,
            applied: leader.last_applied,
            voters,
        })
    }

    pub fn ledger_client(&self) -> &LedgerClient {
        &self.inner.ledgers
    }

    /// Whether storage is out of disk: fewer bookies take writes than a
    /// new ledger needs, and some of the running ones turned read-only
    /// because their disks passed the usage threshold. (Bookies that are
    /// merely down are not a disk problem.)
    pub async fn storage_full(&self) -> Result<bool> {
        let running = self.inner.ledgers.pool().available().await?;
        let writable = running.iter().filter(|b| !b.read_only).count();
        Ok(
            writable < self.inner.cfg.managed_ledger.ensemble
                && running.iter().any(|b| b.read_only),
        )
    }

    /// Registered brokers, from the metadata store.
    pub async fn active_brokers(&self) -> Result<Vec<BrokerInfo>> {
        let mut out = Vec::new();
        for kv in self.inner.meta.list(BROKERS_PREFIX).await? {
            out.push(parse(&kv.key, &kv.value)?);
        }
        Ok(out)
    }

    /// Closes every topic (cursors written, ledgers closed) and gives up
    /// ownership, so that other brokers take over without recovery.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let topics: Vec<TopicCell> = self
            .inner
            .topics
            .lock()
            .await
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in topics {
            if let Some(t) = c.get() {
                if let Err(e) = t.close().await {
                    tracing::warn!(topic = %t.name(), "closing: {e}");
                }
            }
        }
        let session = self.inner.session.read().await;
        let _ = self.inner.meta.revoke_session(session.id()).await;
    }
}

/// Resolves a topic name given relative to a namespace.
pub fn resolve_in(ns: &NamespaceName, name: &str) -> Result<TopicName> {
    if name.contains("://") {
        Ok(name.parse()?)
    } else {
        Ok(ns.topic(TopicDomain::Persistent, name)?)
    }
}

/// Whether a binding is part of the stored table, by the rule of
/// [`durable_snapshot`]: both ends durable (or predeclared).
fn binding_is_durable(r: &NamespaceRouting, b: &Binding) -> bool {
    let exchange = |name: &str| {
        RoutingTable::is_predeclared(name) || r.table.exchange(name).is_some_and(|e| e.durable)
    };
    let destination = match &b.destination {
        crate::routing::Destination::Queue(q) => r.table.has_queue(q) && !r.transient.contains(q),
        crate::routing::Destination::Exchange(e) => exchange(e),
    };
    exchange(&b.source) && destination
}

fn durable_snapshot(r: &NamespaceRouting) -> RoutingSnapshot {
    let mut s = r.table.to_snapshot();
    s.exchanges.retain(|e| e.durable);
    let durable_exchanges: HashSet<String> = s.exchanges.iter().map(|e| e.name.clone()).collect();
    s.queues.retain(|q| !r.transient.contains(q));
    let durable_queues: HashSet<String> = s.queues.iter().cloned().collect();
    let kept = |name: &str, is_queue: bool| {
        if is_queue {
            durable_queues.contains(name)
        } else {
            RoutingTable::is_predeclared(name) || durable_exchanges.contains(name)
        }
    };
    s.bindings.retain(|b| {
        let dest_ok = match &b.destination {
            crate::routing::Destination::Queue(q) => kept(q, true),
            crate::routing::Destination::Exchange(e) => kept(e, false),
        };
        kept(&b.source, false) && dest_ok
    });
    s
}

/// Keeps a live metadata session: when the store expires it (this broker
/// was cut off too long), every topic is dropped, since their bundles may
/// already be owned elsewhere, and a new session starts.
async fn session_keeper(weak: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if *inner.shutdown.borrow() {
            return;
        }
        if inner.session.read().await.is_alive() {
            continue;
        }
        tracing::warn!("metadata session expired; unloading every topic");
        let lost: Vec<TopicCell> = inner.topics.lock().await.drain().map(|(_, c)| c).collect();
        // Closing stops the dispatchers and tries to close the ledgers; a
        // broker that already took a topic over makes that fail harmlessly
        // (compare-and-set, fencing).
        for c in lost {
            if let Some(t) = c.get() {
                if let Err(e) = t.close().await {
                    tracing::debug!(topic = %t.name(), "closing a lost topic: {e}");
                }
            }
        }
        match inner.meta.grant_session(inner.cfg.session_ttl).await {
            Ok(s) => {
                let key = format!("{BROKERS_PREFIX}{}", inner.cfg.info.id);
                if let Err(e) = s.put(&key, json(&inner.cfg.info)).await {
                    tracing::warn!("registering again: {e}");
                }
                *inner.session.write().await = s;
            }
            Err(e) => tracing::warn!("new metadata session: {e}"),
        }
    }
}

/// Consumers that keep their positions outside the topics' subscriptions,
/// in a protocol's own state: a Kafka group's committed offsets. Retention
/// treats each position like a durable cursor (as KoP does), so that a
/// topic whose only other consumer acknowledges quickly does not lose what
/// a group has not read yet.
pub trait RetentionHold: Send + Sync {
    /// For the partitions of `ns` this consumer reads, the first offset it
    /// still needs. Positions that expired do not count.
    fn holds<'a>(
        &'a self,
        ns: &'a NamespaceName,
    ) -> futures::future::BoxFuture<'a, Result<HashMap<TopicName, u64>>>;
}

/// What one retention pass did: the ledgers it deleted, and the topics it
/// could not trim, with why.
#[derive(Debug, Default)]
pub struct RetentionRun {
    pub deleted: Vec<u64>,
    pub failed: Vec<(TopicName, String)>,
}

/// Runs `job` every `interval` while the broker lives: retention and the
/// offload policy.
async fn periodic(
    weak: Weak<Inner>,
    what: &'static str,
    interval: fn(&BrokerConfig) -> Duration,
    job: for<'a> fn(&'a Broker) -> futures::future::BoxFuture<'a, Result<()>>,
) {
    loop {
        let every = match weak.upgrade() {
            Some(i) => interval(&i.cfg),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if *inner.shutdown.borrow() {
            return;
        }
        let broker = Broker { inner };
        if let Err(e) = job(&broker).await {
            tracing::warn!("{what}: {e}");
        }
    }
}

/// How often the forwarders are checked against the routes and the
/// ownership of their topics, besides whenever a topic's policies change.
pub const ROUTE_RESCAN: Duration = Duration::from_secs(5);

/// Keeps one forwarder running per routed partition this broker owns.
async fn route_loop(weak: WeakBroker) {
    let Some(b) = weak.upgrade() else {
        return;
    };
    let mut shutdown = b.inner.shutdown.subscribe();
    let mut events = Some(b.inner.meta.watch(TOPIC_POLICIES_PREFIX, 0));
    drop(b);
    let mut forwarders = Forwarders::default();
    let mut rescan = tokio::time::interval(ROUTE_RESCAN);
    loop {
        tokio::select! {
            _ = rescan.tick() => {}
            _ = shutdown.changed() => {}
            ev = async {
                match events.as_mut() {
                    Some(e) => e.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // A watch that ended is made again, after a pause.
                if ev.is_none() {
                    events = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let Some(b) = weak.upgrade() else {
            forwarders.stop_all().await;
            return;
        };
        if events.is_none() {
            events = Some(b.inner.meta.watch(TOPIC_POLICIES_PREFIX, 0));
        }
        match b.routed_partitions().await {
            Ok((all, mine)) => {
                forwarders.reconcile(&weak, mine, &all).await;
            }
            Err(e) => tracing::warn!("topic routes: {e}"),
        }
    }
}

/// Drops cached routing tables that another broker changed.
async fn routing_watch(weak: Weak<Inner>) {
    let Some(inner) = weak.upgrade() else {
        return;
    };
    let mut events = inner.meta.watch(ROUTING_PREFIX, 0);
    drop(inner);
    while let Some(ev) = events.next().await {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let Ok(ev) = ev else {
            continue;
        };
        let Some(ns) = ev
            .kv
            .key
            .strip_prefix(ROUTING_PREFIX)
            .and_then(|s| s.parse::<NamespaceName>().ok())
        else {
            continue;
        };
        let cached = {
            let all = inner.routing.lock().await;
            all.get(&ns).cloned()
        };
        let Some(r) = cached else {
            continue;
        };
        let mut g = r.lock().await;
        if ev.kv.version <= g.version && ev.kind == EventKind::Put {
            continue;
        }
        let stored = match ev.kind {
            EventKind::Put => serde_json::from_slice::<RoutingSnapshot>(&ev.kv.value)
                .ok()
                .and_then(|s| RoutingTable::from_snapshot(s).ok()),
            EventKind::Delete => Some(RoutingTable::new()),
        };
        match stored {
            Some(table) => {
                let version = if ev.kind == EventKind::Put {
                    ev.kv.version
                } else {
                    0
                };
                if g.inflight {
                    // The write in flight settles which is newer.
                    g.deferred = Some((table, version));
                    continue;
                }
                let failed = g.adopt(table, version);
                drop(g);
                tell_failed(failed);
                // Routes cached by front ends may miss the change.
                inner
                    .routing_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
            }
            None => {
                // Unreadable: drop the cache so the next use reports it.
                drop(g);
                inner.routing.lock().await.remove(&ns);
            }
        }
    }
}
