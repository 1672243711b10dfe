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

const OWNER_PREFIX: &str = "/namespace-owners/";
const BROKERS_PREFIX: &str = "/brokers/active/";
const PARTITIONED_PREFIX: &str = "/partitioned-topics/";
const ROUTING_PREFIX: &str = "/routing/";
const TOPIC_POLICIES_PREFIX: &str = "/topic-policies/";

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
}
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
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// The protocol-neutral broker API. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// A handle for background tasks that must not keep the broker alive;
/// it upgrades only while the broker runs.
#[derive(Clone)]
pub(crate) struct WeakBroker(Weak<Inner>);

impl WeakBroker {
    pub(crate) fn upgrade(&self) -> Option<Broker> {
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

    // ---- ownership ----

    async fn policies(&self, ns: &NamespaceName) -> Result<Policies> {
        match self.inner.tenancy.get_policies(ns).await {
            Ok(p) => Ok(p),
            Err(magnetar_tenancy::TenancyError::NotFound(_)) => {
                Err(BrokerError::NotFound(format!("namespace {ns}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn owner_key(topic: &TopicName, policies: &Policies) -> String {
        format!(
            "{OWNER_PREFIX}{}/{}",
            topic.namespace(),
            bundle_of(topic, policies.bundles.num_bundles)
        )
    }

    /// The broker owning `topic`'s bundle, taking the bundle if nobody
    /// holds it.
    pub async fn lookup(&self, topic: &TopicName) -> Result<BrokerInfo> {
        let policies = self.policies(topic.namespace()).await?;
        let key = Self::owner_key(topic, &policies);
        loop {
            if let Some(kv) = self.inner.meta.get(&key).await? {
                return parse(&key, &kv.value);
            }
            let session = self.inner.session.read().await;
            match session.create(&key, json(&self.inner.cfg.info)).await {
                Ok(_) => return Ok(self.inner.cfg.info.clone()),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn topic_policies_key(topic: &TopicName) -> String {
        format!("{TOPIC_POLICIES_PREFIX}{}", topic.base().path())
    }

    /// The topic's own policies (for a partition: its topic's).
    pub async fn topic_policies(&self, topic: &TopicName) -> Result<TopicPolicies> {
        let key = Self::topic_policies_key(topic);
        match self.inner.meta.get(&key).await? {
            Some(kv) => parse(&key, &kv.value),
            None => Ok(TopicPolicies::default()),
        }
    }

    /// Sets the topic's own policies; the default (nothing set) removes
    /// them, and the namespace's apply again. Retention picks them up at
    /// its next run.
    pub async fn set_topic_policies(&self, topic: &TopicName, p: &TopicPolicies) -> Result<()> {
        let key = Self::topic_policies_key(topic);
        if *p == TopicPolicies::default() {
            self.inner.meta.delete(&key).await?;
        } else {
            self.inner.meta.put(&key, json(p)).await?;
        }
        Ok(())
    }

    /// Where the topic's records are routed, if anywhere.
    pub async fn topic_route(&self, topic: &TopicName) -> Result<Option<TopicRoute>> {
        Ok(self.topic_policies(topic).await?.route)
    }

    /// Routes the topic's records (every partition's) through an exchange
    /// of its namespace from now on, or stops routing them. Partitions
    /// owned here start at once: what is written after this returns is
    /// routed. The owners of the others pick the route up within
    /// [`ROUTE_RESCAN`].
    pub async fn set_topic_route(
        &self,
        topic: &TopicName,
        route: Option<TopicRoute>,
    ) -> Result<()> {
        let topic = topic.base();
        if let Some(r) = &route {
            if !topic.is_persistent() {
                return Err(BrokerError::InvalidArgument(format!(
                    "{topic} is not persistent; only persistent topics can be routed"
                )));
            }
            if !self.topic_exists(&topic).await? {
                return Err(BrokerError::NotFound(format!("topic {topic} not found")));
            }
            let routing = self.routing(topic.namespace()).await?;
            if !routing.lock().await.table.has_exchange(&r.exchange) {
                return Err(BrokerError::NotFound(format!(
                    "no exchange {:?} in {}",
                    r.exchange,
                    topic.namespace()
                )));
            }
            for t in self.partitions_of(&topic).await? {
                if self.lookup(&t).await?.id == self.inner.cfg.info.id {
                    self.topic(&t, true)
                        .await?
                        .get_or_create_subscription(
                            ROUTE_SUBSCRIPTION,
                            crate::topic_route::subscription_options(
                                crate::subscription::InitialPosition::Latest,
                            ),
                        )
                        .await?;
                }
            }
        }
        let mut p = self.topic_policies(&topic).await?;
        p.route = route;
        self.set_topic_policies(&topic, &p).await
    }

    /// A topic's partitions, or the topic itself when it has none.
    async fn partitions_of(&self, topic: &TopicName) -> Result<Vec<TopicName>> {
        Ok(match self.partitions(topic).await? {
            Some(n) => (0..n).map(|i| topic.partition(i)).collect(),
            None => vec![topic.clone()],
        })
    }

    /// Every routed partition, and those of them this broker owns.
    async fn routed_partitions(
        &self,
    ) -> Result<(HashSet<TopicName>, HashMap<TopicName, TopicRoute>)> {
        let mut all = HashSet::new();
        let mut mine = HashMap::new();
        for kv in self.inner.meta.list(TOPIC_POLICIES_PREFIX).await? {
            let Some(path) = kv.key.strip_prefix(TOPIC_POLICIES_PREFIX) else {
                continue;
            };
            let Ok(topic) = TopicName::from_path(path) else {
                continue;
            };
            let Ok(TopicPolicies {
                route: Some(route), ..
            }) = parse::<TopicPolicies>(&kv.key, &kv.value)
            else {
                continue;
            };
            for t in self.partitions_of(&topic).await? {
                all.insert(t.clone());
                match self.lookup(&t).await {
                    Ok(owner) if owner.id == self.inner.cfg.info.id => {
                        mine.insert(t, route.clone());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(topic = %t, "route owner: {e}"),
                }
            }
        }
        Ok((all, mine))
    }

    /// The namespace's policies with the topic's own laid over them.
    async fn effective_policies(&self, topic: &TopicName) -> Result<Policies> {
        let mut p = self.policies(topic.namespace()).await?;
        let own = self.topic_policies(topic).await?;
        if own.retention_policies.is_some() {
            p.retention_policies = own.retention_policies;
        }
        Ok(p)
    }

    async fn ensure_owner(&self, topic: &TopicName) -> Result<()> {
        let owner = self.lookup(topic).await?;
        if owner.id == self.inner.cfg.info.id {
            Ok(())
        } else {
            Err(BrokerError::NotOwner {
                topic: topic.to_string(),
                owner: Some(owner.http_url),
            })
        }
    }

    // ---- topics ----

    fn ml_key(topic: &TopicName) -> String {
        format!("{ML_PREFIX}{}", topic.path())
    }

    /// Whether the topic exists: stored data for a persistent topic,
    /// partition metadata for a partitioned one.
    pub async fn topic_exists(&self, topic: &TopicName) -> Result<bool> {
        if self.inner.topics.lock().await.contains_key(topic) {
            return Ok(true);
        }
        if self.partitions(topic).await?.is_some() {
            return Ok(true);
        }
        Ok(topic.is_persistent() && self.inner.meta.get(&Self::ml_key(topic)).await?.is_some())
    }

    /// The loaded topic, loading it if this broker owns it.
    pub async fn topic(&self, name: &TopicName, create: bool) -> Result<Arc<Topic>> {
        let cell = {
            let mut topics = self.inner.topics.lock().await;
            topics.entry(name.clone()).or_default().clone()
        };
        let loaded = cell.get_or_try_init(|| self.load_topic(name, create)).await;
        match loaded {
            Ok(t) => {
                t.touch();
                Ok(t.clone())
            }
            Err(e) => {
                let mut topics = self.inner.topics.lock().await;
                if topics.get(name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    topics.remove(name);
                }
                Err(e)
            }
        }
    }

    async fn load_topic(&self, name: &TopicName, create: bool) -> Result<Arc<Topic>> {
        if *self.inner.shutdown.borrow() {
            return Err(BrokerError::ShuttingDown);
        }
        let policies = self.policies(name.namespace()).await?;
        self.ensure_owner(name).await?;
        if self.partitions(name).await?.is_some() {
            return Err(BrokerError::InvalidArgument(format!(
                "{name} is a partitioned topic; use its partitions"
            )));
        }
        let log = match name.domain() {
            TopicDomain::Persistent => {
                let exists = self.inner.meta.get(&Self::ml_key(name)).await?.is_some();
                let may_create = create && self.inner.cfg.auto_create_topics;
                if !exists && !may_create {
                    return Err(BrokerError::NotFound(format!("topic {name}")));
                }
                if !exists {
                    self.check_topic_quota(name, &policies).await?;
                }
                let ml = ManagedLedger::open(
                    self.inner.ledgers.clone(),
                    &name.path(),
                    self.inner.cfg.managed_ledger.clone(),
                )
                .await?;
                PartitionLog::Managed(ml)
            }
            TopicDomain::NonPersistent => PartitionLog::Memory(MemoryLog::new(
                &name.to_string(),
                self.inner.cfg.memory_topic_bytes,
            )),
        };
        let topic = Topic::load(
            name.clone(),
            log,
            self.inner.meta.clone(),
            Some(self.dead_letter_sink(name.namespace().clone())),
        )
        .await?;
        topic.set_policies(&policies);
        Ok(topic)
    }

    async fn check_topic_quota(&self, name: &TopicName, policies: &Policies) -> Result<()> {
        if let Some(max) = policies.max_topics_per_namespace.filter(|&m| m > 0) {
            let n = self.list_topics(name.namespace()).await?.len();
            if n >= max as usize {
                return Err(BrokerError::QuotaExceeded(format!(
                    "namespace {} already has {n} topics (max {max})",
                    name.namespace()
                )));
            }
        }
        Ok(())
    }

    fn dead_letter_sink(&self, ns: NamespaceName) -> DeadLetterSink {
        let weak = Arc::downgrade(&self.inner);
        Arc::new(move |topic: String, msg: Message| {
            let weak = weak.clone();
            let ns = ns.clone();
            Box::pin(async move {
                let inner = weak.upgrade().ok_or(BrokerError::ShuttingDown)?;
                let broker = Broker { inner };
                let name = resolve_in(&ns, &topic)?;
                broker.publish(&name, vec![msg]).await.map(drop)
            })
        })
    }

    /// Creates a non-partitioned persistent topic (idempotent for
    /// protocols; the admin API checks existence first).
    pub async fn create_topic(&self, name: &TopicName) -> Result<()> {
        self.topic(name, true).await.map(drop)
    }

    pub async fn partitions(&self, base: &TopicName) -> Result<Option<u32>> {
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        match self.inner.meta.get(&key).await? {
            Some(kv) => Ok(Some(
                parse::<PartitionedMetadata>(&key, &kv.value)?.partitions,
            )),
            None => Ok(None),
        }
    }

    /// Creates a partitioned topic: partition metadata only; partitions are
    /// created on first use, as in Pulsar.
    pub async fn create_partitioned_topic(&self, base: &TopicName, partitions: u32) -> Result<()> {
        if partitions == 0 || partitions > 10_000 {
            return Err(BrokerError::InvalidArgument(
                "partitions must be between 1 and 10000".into(),
            ));
        }
        if base.partition_index().is_some() {
            return Err(BrokerError::InvalidArgument(format!(
                "{base} names a partition"
            )));
        }
        self.policies(base.namespace()).await?;
        if self.inner.meta.get(&Self::ml_key(base)).await?.is_some() {
            return Err(BrokerError::AlreadyExists(format!("topic {base}")));
        }
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        match self
            .inner
            .meta
            .create(&key, json(&PartitionedMetadata { partitions }))
            .await
        {
            Ok(_) => Ok(()),
            Err(MetaError::Conflict { .. }) => Err(BrokerError::AlreadyExists(format!(
                "partitioned topic {base}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises the partition count; Kafka and Pulsar only ever add.
    pub async fn update_partitions(&self, base: &TopicName, partitions: u32) -> Result<()> {
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        let kv = self
            .inner
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("partitioned topic {base}")))?;
        let cur: PartitionedMetadata = parse(&key, &kv.value)?;
        if partitions <= cur.partitions {
            return Err(BrokerError::InvalidArgument(format!(
                "partitions can only grow (now {})",
                cur.partitions
            )));
        }
        self.inner
            .meta
            .compare_and_put(&key, kv.version, json(&PartitionedMetadata { partitions }))
            .await?;
        Ok(())
    }

    /// Persistent topics stored in a namespace (partitions included).
    pub async fn list_topics(&self, ns: &NamespaceName) -> Result<Vec<TopicName>> {
        let prefix = format!("{ML_PREFIX}{ns}/persistent/");
        let mut out = Vec::new();
        for key in self.inner.meta.list_keys(&prefix).await? {
            if let Some(path) = key.strip_prefix(ML_PREFIX) {
                out.push(TopicName::from_path(path)?);
            }
        }
        Ok(out)
    }

    pub async fn list_partitioned_topics(&self, ns: &NamespaceName) -> Result<Vec<TopicName>> {
        let prefix = format!("{PARTITIONED_PREFIX}{ns}/persistent/");
        let mut out = Vec::new();
        for key in self.inner.meta.list_keys(&prefix).await? {
            if let Some(path) = key.strip_prefix(PARTITIONED_PREFIX) {
                out.push(TopicName::from_path(path)?);
            }
        }
        Ok(out)
    }

    /// Deletes a topic, or every partition of a partitioned one.
    pub async fn delete_topic(&self, name: &TopicName, force: bool) -> Result<()> {
        if let Some(n) = self.partitions(name).await? {
            for i in 0..n {
                let p = name.partition(i);
                if self.topic_exists(&p).await? {
                    self.delete_partition(&p, force).await?;
                }
            }
            self.inner
                .meta
                .delete(&format!("{PARTITIONED_PREFIX}{}", name.path()))
                .await?;
        } else {
            self.delete_partition(name, force).await?;
        }
        self.inner
            .meta
            .delete(&Self::topic_policies_key(name))
            .await?;
        Ok(())
    }

    async fn delete_partition(&self, name: &TopicName, force: bool) -> Result<()> {
        let topic = self.topic(name, false).await?;
        topic.delete(force).await?;
        self.inner.topics.lock().await.remove(name);
        Ok(())
    }

    /// Closes a loaded topic here (its cursors written, its ledger
    /// closed), so that any broker can load it next.
    pub async fn unload_topic(&self, name: &TopicName) -> Result<()> {
        let cell = self.inner.topics.lock().await.remove(name);
        if let Some(t) = cell.and_then(|c| c.get().cloned()) {
            t.close().await?;
        }
        Ok(())
    }

    /// Unloads non-persistent topics that nobody has used for
    /// `memory_topic_idle` and that have no subscriptions (as Pulsar's
    /// `delete_when_no_subscriptions`): their messages would reach
    /// nobody, and each may hold up to `memory_topic_bytes`.
    async fn unload_idle_topics(&self) -> Result<()> {
        let idle = self.inner.cfg.memory_topic_idle;
        if idle.is_zero() {
            return Ok(());
        }
        let candidates: Vec<Arc<Topic>> = self
            .loaded_topics()
            .await
            .into_iter()
            .filter(|t| !t.log().is_persistent() && t.idle_for() >= idle)
            .collect();
        for t in candidates {
            if t.has_subscriptions().await {
                continue;
            }
            // A transient queue keeps its messages for consumers to come,
            // as RabbitMQ's do, until it is deleted.
            let ns = t.name().namespace().clone();
            if self
                .queue_exists(&ns, t.name().base().local_name())
                .await
                .unwrap_or(true)
            {
                continue;
            }
            let name = t.name().clone();
            let unloaded = {
                let mut topics = self.inner.topics.lock().await;
                // Still idle, and held by no one but the table and `t`.
                let still = topics
                    .get(&name)
                    .and_then(|c| c.get())
                    .is_some_and(|held| Arc::ptr_eq(held, &t) && Arc::strong_count(&t) <= 2)
                    && t.idle_for() >= idle;
                still.then(|| topics.remove(&name)).flatten()
            };
            if unloaded.is_some() {
                tracing::debug!("unloading idle non-persistent topic {name}");
                let _ = t.close().await;
            }
        }
        Ok(())
    }

    pub async fn loaded_topics(&self) -> Vec<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .await
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    pub async fn topic_stats(&self, name: &TopicName) -> Result<TopicStats> {
        self.topic(name, false).await?.stats().await
    }

    // ---- data path ----

    /// Publishes messages to one partition (or non-partitioned topic) as
    /// one batch; returns the first message's offset.
    pub async fn publish(&self, topic: &TopicName, messages: Vec<Message>) -> Result<u64> {
        let batch = crate::format::encode_messages(&messages)?;
        match self.publish_batch(topic, batch).await? {
            Published::Stored(o) => Ok(o),
            // A batch without a producer id is never a duplicate.
            Published::Duplicate => Err(BrokerError::TopicUnavailable(topic.to_string())),
        }
    }

    /// Publishes with a producer's sequence numbers; retries of stored
    /// batches come back as [`Published::Duplicate`].
    pub async fn publish_idempotent(
        &self,
        topic: &TopicName,
        messages: Vec<Message>,
        producer: ProducerSequence,
    ) -> Result<Published> {
        let batch = crate::format::encode_batch(&messages, Some(producer))?;
        self.publish_batch(topic, batch).await
    }

    /// Appends a record batch (a Kafka client's, or one encoded here)
    /// unchanged but for its base offset; batches of idempotent producers
    /// are deduplicated. A topic owned by another broker gets the batch
    /// forwarded; the owner is remembered until a forward to it fails.
    pub async fn publish_batch(&self, topic: &TopicName, batch: Bytes) -> Result<Published> {
        let cached = self.remote_owners().get(topic).cloned();
        if let Some(url) = cached {
            match self.forward(&url, topic, batch.clone()).await {
                Ok(p) => return Ok(p),
                Err(e @ (BrokerError::InvalidArgument(_) | BrokerError::NotFound(_))) => {
                    return Err(e)
                }
                // Moved or gone: ask again below.
                Err(_) => {
                    self.remote_owners().remove(topic);
                }
            }
        }
        match self.topic(topic, true).await {
            Ok(t) => t.publish_batch(batch).await,
            Err(BrokerError::NotOwner {
                owner: Some(url), ..
            }) => {
                let r = self.forward(&url, topic, batch).await;
                if r.is_ok() {
                    self.remote_owners().insert(topic.clone(), url);
                }
                r
            }
            Err(e) => Err(e),
        }
    }

    fn remote_owners(&self) -> std::sync::MutexGuard<'_, HashMap<TopicName, String>> {
        self.inner
            .remote_owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Durable state for one protocol's sessions, under its own area.
    pub fn state(&self, area: &str) -> StateStore {
        StateStore::new(self.inner.meta.clone(), area)
    }

    /// Reserves `count` ids of the cluster-wide sequence `name`; returns
    /// the first. Ids are unique across brokers and restarts.
    pub async fn reserve_ids(&self, name: &str, count: u64) -> Result<u64> {
        crate::state::reserve_ids(&self.inner.meta, name, count).await
    }

    /// A publisher for one-message-at-a-time protocols that gathers what
    /// arrives while earlier appends are in flight into one batch.
    pub fn coalescer(&self, topic: &TopicName) -> crate::Coalescer {
        crate::Coalescer::start(self.clone(), topic.clone())
    }

    /// Appends a batch here only, never forwarding: what a forwarded
    /// publish arrives as.
    pub async fn publish_batch_local(&self, topic: &TopicName, batch: Bytes) -> Result<Published> {
        self.topic(topic, true).await?.publish_batch(batch).await
    }

    /// Sends a batch to the owning broker's internal endpoint. One hop
    /// only: the owner appends it or refuses.
    async fn forward(&self, owner_url: &str, topic: &TopicName, batch: Bytes) -> Result<Published> {
        let url = format!(
            "{}{FORWARD_PATH}{}",
            owner_url.trim_end_matches('/'),
            topic.path()
        );
        let unavailable = |why: String| BrokerError::TopicUnavailable(format!("{topic}: {why}"));
        let req = self
            .internal_request(reqwest::Method::POST, &url)
            .header("content-type", "application/octet-stream");
        let resp = req
            .body(batch)
            .send()
            .await
            .map_err(|e| unavailable(format!("forwarding to {owner_url}: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| unavailable(format!("reply of {owner_url}: {e}")))?;
        if !status.is_success() {
            let reason = body["reason"].as_str().unwrap_or("no reason").to_string();
            return Err(match status.as_u16() {
                400 => BrokerError::InvalidArgument(reason),
                404 => BrokerError::NotFound(reason),
                _ => unavailable(reason),
            });
        }
        match body["offset"].as_u64() {
            Some(o) => Ok(Published::Stored(o)),
            None if body["duplicate"].as_bool() == Some(true) => Ok(Published::Duplicate),
            None => Err(unavailable(format!("unreadable reply of {owner_url}"))),
        }
    }

    /// A request to another broker, as this broker: with the internal
    /// token when authentication is on.
    fn internal_request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.inner.http.request(method, url);
        match self
            .config()
            .auth
            .as_ref()
            .and_then(|a| a.internal_token.as_ref())
        {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends an admin request to another broker (`path` from `/admin` on,
    /// with `body` as JSON unless empty), as this broker, with the
    /// internal token; its status and body.
    pub async fn admin_request(
        &self,
        owner: &BrokerInfo,
        method: reqwest::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let url = format!("{}{path}", owner.http_url.trim_end_matches('/'));
        let unavailable = |why: String| BrokerError::TopicUnavailable(format!("{url}: {why}"));
        let mut req = self.internal_request(method, &url);
        if !body.is_empty() {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req.send().await.map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        Ok((status, body))
    }

    /// Reads entries from `offset` on, up to about `max_bytes`; with
    /// `wait`, waits that long for data when there is none yet.
    pub async fn fetch(
        &self,
        topic: &TopicName,
        offset: u64,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<FetchResult> {
        let t = self.topic(topic, false).await?;
        let log = t.log();
        let mut end_rx = log.watch_end();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let entries = log.read(offset, 1000, max_bytes).await?;
            if !entries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(FetchResult {
                    entries,
                    start_offset: log.start_offset(),
                    end_offset: log.end_offset(),
                });
            }
            if *end_rx.borrow_and_update() > offset {
                continue;
            }
            if tokio::time::timeout_at(deadline, end_rx.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    pub async fn subscribe(
        &self,
        topic: &TopicName,
        subscription: &str,
        opts: SubscriptionOptions,
        consumer: ConsumerOptions,
    ) -> Result<Consumer> {
        self.topic(topic, true)
            .await?
            .subscribe(subscription, opts, consumer)
            .await
    }

    pub async fn unsubscribe(
        &self,
        topic: &TopicName,
        subscription: &str,
        force: bool,
    ) -> Result<()> {
        self.topic(topic, false)
            .await?
            .unsubscribe(subscription, force)
            .await
    }

    // ---- routing ----

    async fn routing(&self, ns: &NamespaceName) -> Result<Arc<Mutex<NamespaceRouting>>> {
        if let Some(r) = self.inner.routing.lock().await.get(ns) {
            return Ok(r.clone());
        }
        self.policies(ns).await?;
        let key = format!("{ROUTING_PREFIX}{ns}");
        let (table, version) = match self.inner.meta.get(&key).await? {
            Some(kv) => (
                RoutingTable::from_snapshot(parse::<RoutingSnapshot>(&key, &kv.value)?)?,
                kv.version,
            ),
            None => (RoutingTable::new(), 0),
        };
        let r = Arc::new(Mutex::new(NamespaceRouting::new(table, version)));
        let mut all = self.inner.routing.lock().await;
        Ok(all.entry(ns.clone()).or_insert(r).clone())
    }

    /// Runs `f` on the namespace's table and waits for the durable part to
    /// be stored. Routing follows the change at once; see
    /// [`Broker::apply_routing`].
    async fn modify_routing<T>(
        &self,
        ns: &NamespaceName,
        f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (out, stored) = self.apply_routing(ns, None, f).await?;
        stored.await?;
        Ok(out)
    }

    /// Runs `f` on the namespace's table, so that routes follow it from
    /// now on, and returns with the wait for its durable part to be
    /// stored. Changes are stored in order, many in one compare-and-set;
    /// when another broker's change was stored first, they are replayed on
    /// it, and one that no longer applies, or a store that keeps failing,
    /// undoes the change and fails the wait. A change that touches only
    /// transient queues and exchanges is complete at once.
    ///
    /// `durable`: whether the change touches the stored part, when the
    /// caller can tell (a binding can); then the change costs no copy of
    /// the table, and its size is checked when it is stored.
    async fn apply_routing<T>(
        &self,
        ns: &NamespaceName,
        durable: Option<&(dyn Fn(&NamespaceRouting) -> bool + Sync)>,
        mut f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> Result<(T, RoutingStored)> {
        use futures::FutureExt;
        let r = self.routing(ns).await?;
        let mut g = r.lock().await;
        if let Some(durable) = durable {
            let durable = durable(&g);
            let out = f(&mut g)?;
            self.bump_routing_generation();
            if !durable {
                return Ok((out, futures::future::ready(Ok(())).boxed()));
            }
            let stored = self.pend(ns, &r, &mut g, f);
            return Ok((out, stored));
        }
        let before = g.table.clone();
        let before_transient = g.transient.clone();
        let durable_before = durable_snapshot(&g);
        let out = f(&mut g)?;
        // Cached routes go stale from here on.
        self.bump_routing_generation();
        let durable = durable_snapshot(&g);
        if durable == durable_before {
            return Ok((out, futures::future::ready(Ok(())).boxed()));
        }
        let size = json(&durable).len();
        if size > magnetar_metadata::MAX_VALUE_BYTES {
            // The table is one metadata value: refusing what would not
            // fit keeps the namespace's routing as it was, so that
            // deletes and unbinds still work.
            g.table = before;
            g.transient = before_transient;
            return Err(BrokerError::QuotaExceeded(format!(
                "routing table of namespace {ns} would take {size} bytes (max {}); \
                 delete or unbind first",
                magnetar_metadata::MAX_VALUE_BYTES
            )));
        }
        let stored = self.pend(ns, &r, &mut g, f);
        Ok((out, stored))
    }

    /// Queues an applied change to be stored; the wait for it.
    fn pend<T>(
        &self,
        ns: &NamespaceName,
        r: &Arc<Mutex<NamespaceRouting>>,
        g: &mut NamespaceRouting,
        mut f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> RoutingStored {
        use futures::FutureExt;
        let (done, stored) = tokio::sync::oneshot::channel();
        let seq = g.next_seq;
        g.next_seq += 1;
        g.pending.push_back(PendingChange {
            seq,
            op: Box::new(move |r| f(r).map(drop)),
            done,
        });
        if !g.flushing {
            g.flushing = true;
            tokio::spawn(self.clone().store_routing(ns.clone(), Arc::clone(r)));
        }
        async move {
            stored
                .await
                .unwrap_or_else(|_| Err(BrokerError::ShuttingDown))
        }
        .boxed()
    }

    fn bump_routing_generation(&self) {
        self.inner
            .routing_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Stores a namespace's pending routing changes until none is left,
    /// each write carrying all that are pending; the namespace's lock is
    /// not held while a write is in flight, so routes and new changes go
    /// on meanwhile.
    async fn store_routing(self, ns: NamespaceName, r: Arc<Mutex<NamespaceRouting>>) {
        let key = format!("{ROUTING_PREFIX}{ns}");
        let mut conflicts = 0;
        loop {
            let (snapshot, bytes, upto, version) = {
                let mut g = r.lock().await;
                let Some(upto) = g.pending.back().map(|p| p.seq) else {
                    g.flushing = false;
                    return;
                };
                let snapshot = durable_snapshot(&g);
                let bytes = json(&snapshot);
                if bytes.len() > magnetar_metadata::MAX_VALUE_BYTES {
                    // The table is one metadata value: refusing what would
                    // not fit keeps the namespace's routing as it was, so
                    // that deletes and unbinds still work.
                    let why = format!(
                        "routing table of namespace {ns} would take {} bytes (max {}); \
                         delete or unbind first",
                        bytes.len(),
                        magnetar_metadata::MAX_VALUE_BYTES
                    );
                    for p in g.roll_back() {
                        p.fail(BrokerError::QuotaExceeded(why.clone()));
                    }
                    self.bump_routing_generation();
                    continue;
                }
                g.inflight = true;
                (snapshot, bytes, upto, g.version)
            };
            let result = self.inner.meta.compare_and_put(&key, version, bytes).await;
            let mut g = r.lock().await;
            g.inflight = false;
            let deferred = g.deferred.take();
            match result {
                Ok(kv) => {
                    conflicts = 0;
                    g.version = kv.version;
                    g.base = snapshot;
                    while g.pending.front().is_some_and(|p| p.seq <= upto) {
                        if let Some(p) = g.pending.pop_front() {
                            let _ = p.done.send(Ok(()));
                        }
                    }
                    // Another broker's change stored after this one.
                    if let Some((table, v)) = deferred.filter(|(_, v)| *v > g.version) {
                        let failed = g.adopt(table, v);
                        self.bump_routing_generation();
                        tell_failed(failed);
                    }
                }
                Err(MetaError::Conflict { current, .. }) if conflicts < 16 => {
                    conflicts += 1;
                    let stored = match current {
                        Some(kv) => parse(&key, &kv.value)
                            .and_then(RoutingTable::from_snapshot)
                            .map(|t| (t, kv.version)),
                        None => Ok((RoutingTable::new(), 0)),
                    };
                    match stored {
                        Ok((table, v)) => {
                            let failed = g.adopt(table, v);
                            self.bump_routing_generation();
                            tell_failed(failed);
                        }
                        Err(e) => {
                            let why = e.to_string();
                            for p in g.roll_back() {
                                p.fail(BrokerError::TopicUnavailable(why.clone()));
                            }
                            self.bump_routing_generation();
                        }
                    }
                }
                Err(e) => {
                    let why = match e {
                        MetaError::Conflict { .. } => format!("routing of {ns} keeps changing"),
                        e => format!("routing of {ns} not stored: {e}"),
                    };
                    for p in g.roll_back() {
                        p.fail(BrokerError::TopicUnavailable(why.clone()));
                    }
                    self.bump_routing_generation();
                }
            }
        }
    }

    pub async fn declare_exchange(
        &self,
        ns: &NamespaceName,
        def: ExchangeDef,
        passive: bool,
    ) -> Result<()> {
        if passive {
            let r = self.routing(ns).await?;
            return r.lock().await.table.declare_exchange(def, true).map(drop);
        }
        self.modify_routing(ns, move |r| r.table.declare_exchange(def.clone(), false))
            .await
            .map(drop)
    }

    pub async fn delete_exchange(
        &self,
        ns: &NamespaceName,
        name: &str,
        if_unused: bool,
    ) -> Result<()> {
        let name = name.to_owned();
        self.modify_routing(ns, move |r| r.table.delete_exchange(&name, if_unused))
            .await
            .map(drop)
    }

    /// Declares a queue: a topic named after it in the namespace. A
    /// durable queue is a persistent topic; a transient one is
    /// non-persistent and known to this broker only.
    pub async fn declare_queue(
        &self,
        ns: &NamespaceName,
        name: &str,
        durable: bool,
    ) -> Result<TopicName> {
        let topic = self.queue_topic(ns, name, durable)?;
        if durable {
            self.create_topic(&topic).await?;
        }
        let owned = name.to_owned();
        self.modify_routing(ns, move |r| {
            r.table.declare_queue(&owned)?;
            if !durable {
                r.transient.insert(owned.clone());
            }
            Ok(())
        })
        .await?;
        Ok(topic)
    }

    /// The topic behind a queue name.
    pub fn queue_topic(&self, ns: &NamespaceName, name: &str, durable: bool) -> Result<TopicName> {
        let domain = if durable {
            TopicDomain::Persistent
        } else {
            TopicDomain::NonPersistent
        };
        Ok(ns.topic(domain, name)?)
    }

    pub async fn queue_exists(&self, ns: &NamespaceName, name: &str) -> Result<bool> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.table.has_queue(name))
    }

    /// Deletes a queue, its bindings and its topic.
    pub async fn delete_queue(&self, ns: &NamespaceName, name: &str) -> Result<()> {
        let durable = {
            let r = self.routing(ns).await?;
            let g = r.lock().await;
            !g.transient.contains(name)
        };
        let owned = name.to_owned();
        self.modify_routing(ns, move |r| {
            r.transient.remove(&owned);
            Ok(r.table.delete_queue(&owned))
        })
        .await?;
        let topic = self.queue_topic(ns, name, durable)?;
        match self.delete_topic(&topic, true).await {
            Ok(()) | Err(BrokerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn bind(&self, ns: &NamespaceName, binding: Binding) -> Result<()> {
        self.bind_now(ns, binding).await?.await
    }

    pub async fn unbind(&self, ns: &NamespaceName, binding: &Binding) -> Result<()> {
        self.unbind_now(ns, binding.clone()).await?.await
    }

    /// Binds at once: routes follow the binding when this returns, and the
    /// returned wait ends when it is stored (a failure there undoes it).
    /// A front end may answer its client before that, as long as it drops
    /// the client if the wait fails.
    pub async fn bind_now(&self, ns: &NamespaceName, binding: Binding) -> Result<RoutingStored> {
        let b = binding.clone();
        let durable = move |g: &NamespaceRouting| binding_is_durable(g, &b);
        let (_, stored) = self
            .apply_routing(ns, Some(&durable), move |r| r.table.bind(binding.clone()))
            .await?;
        Ok(stored)
    }

    /// Unbinds at once; see [`Broker::bind_now`].
    pub async fn unbind_now(&self, ns: &NamespaceName, binding: Binding) -> Result<RoutingStored> {
        let b = binding.clone();
        let durable = move |g: &NamespaceRouting| binding_is_durable(g, &b);
        let (_, stored) = self
            .apply_routing(ns, Some(&durable), move |r| r.table.unbind(&binding))
            .await?;
        Ok(stored)
    }

    pub async fn routing_snapshot(&self, ns: &NamespaceName) -> Result<RoutingSnapshot> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.table.to_snapshot())
    }

    /// The queues a message would reach through `exchange`, with their
    /// topics, without publishing: for front ends that apply per-queue
    /// rules (length limits, confirms) before they append.
    pub async fn route(
        &self,
        ns: &NamespaceName,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<Vec<(String, TopicName)>> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        let routed = g.table.route(exchange, routing_key, headers)?;
        routed
            .queues
            .into_iter()
            .map(|q| {
                let t = self.queue_topic(ns, &q, !g.transient.contains(&q))?;
                Ok((q, t))
            })
            .collect()
    }

    /// Changes whenever routing changes on this broker; a route computed
    /// under one value holds while the value stays the same.
    pub fn routing_generation(&self) -> u64 {
        self.inner
            .routing_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a queue was declared non-durable (held in memory).
    pub async fn queue_is_transient(&self, ns: &NamespaceName, name: &str) -> Result<bool> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.transient.contains(name))
    }

    /// Routes a message through an exchange and publishes it to every
    /// queue it reaches. Returns the queues; empty means unroutable.
    pub async fn route_publish(
        &self,
        ns: &NamespaceName,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
        message: Message,
    ) -> Result<Routed> {
        // The queues' topics are named under the lock; the message is
        // encoded once and the same batch appended to each.
        let (routed, topics) = {
            let r = self.routing(ns).await?;
            let g = r.lock().await;
            let routed = g.table.route(exchange, routing_key, headers)?;
            let topics = routed
                .queues
                .iter()
                .map(|q| self.queue_topic(ns, q, !g.transient.contains(q)))
                .collect::<Result<Vec<_>>>()?;
            (routed, topics)
        };
        if topics.is_empty() {
            return Ok(routed);
        }
        let batch = crate::format::encode_messages(std::slice::from_ref(&message))?;
        let publishes = topics.iter().map(|t| self.publish_batch(t, batch.clone()));
        for r in futures::future::join_all(publishes).await {
            r?;
        }
        Ok(routed)
    }

    /// Expires messages past the namespace's message TTL, then runs
    /// retention, over every loaded persistent topic now. A topic that
    /// fails does not stop the pass: it is reported, and the rest are
    /// trimmed. A namespace whose retention holds cannot be read keeps
    /// all its data this pass, since what its consumers need is unknown.
    pub async fn run_retention(&self) -> RetentionRun {
        let mut run = RetentionRun::default();
        let mut by_ns: BTreeMap<NamespaceName, Vec<Arc<Topic>>> = BTreeMap::new();
        for t in self.loaded_topics().await {
            if t.log().is_persistent() {
                by_ns
                    .entry(t.name().namespace().clone())
                    .or_default()
                    .push(t);
            }
        }
        let holders: Vec<Arc<dyn RetentionHold>> = self
            .inner
            .retention_holds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (ns, topics) in by_ns {
            let mut holds: Option<HashMap<TopicName, u64>> = Some(HashMap::new());
            for h in &holders {
                match h.holds(&ns).await {
                    Ok(more) => {
                        if let Some(all) = holds.as_mut() {
                            for (t, o) in more {
                                let e = all.entry(t).or_insert(o);
                                *e = (*e).min(o);
                            }
                        }
                    }
                    Err(e) => {
                        holds = None;
                        for t in &topics {
                            run.failed.push((t.name().clone(), e.to_string()));
                        }
                        break;
                    }
                }
            }
            let Some(holds) = holds else {
                continue;
            };
            for t in topics {
                let hold = holds.get(t.name()).copied();
                match self.retain(&t, hold).await {
                    Ok(ids) => run.deleted.extend(ids),
                    Err(e) => run.failed.push((t.name().clone(), e.to_string())),
                }
            }
        }
        run
    }

    async fn retain(&self, t: &Topic, hold: Option<u64>) -> Result<Vec<u64>> {
        let policies = self.effective_policies(t.name()).await?;
        t.set_policies(&policies);
        if let Some(ttl) = policies.message_ttl_in_seconds.filter(|&s| s > 0) {
            t.expire_messages(Duration::from_secs(u64::from(ttl)))
                .await?;
        }
        t.evict_backlog().await?;
        t.apply_retention(&policies, self.inner.cfg.retention, hold)
            .await
    }

    /// Admission for a new client listener of `protocol`, under this
    /// broker's listener limits.
    pub fn admission(&self, protocol: &'static str) -> Arc<crate::listener::Admission> {
        crate::listener::Admission::new(protocol, self.inner.cfg.listener_limits.clone())
    }

    /// Adds a consumer of topic data whose positions live outside the
    /// topics' subscriptions (Kafka groups): retention keeps what it still
    /// needs.
    pub fn add_retention_hold(&self, hold: Arc<dyn RetentionHold>) {
        self.inner
            .retention_holds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hold);
    }

    /// The managed ledger of a persistent topic this broker owns.
    async fn managed(&self, name: &TopicName) -> Result<ManagedLedger> {
        match self.topic(name, false).await?.log() {
            PartitionLog::Managed(ml) => Ok(ml.clone()),
            PartitionLog::Memory(_) => Err(BrokerError::InvalidArgument(format!(
                "{name} is not persistent; only persistent topics are offloaded"
            ))),
        }
    }

    /// Offloads every closed ledger of the topic now, in the background
    /// (Pulsar's `PUT …/offload`); its progress is [`Self::offload_status`].
    pub async fn trigger_offload(&self, name: &TopicName) -> Result<()> {
        if self.inner.cfg.managed_ledger.tier.is_none() {
            return Err(BrokerError::PreconditionFailed(
                "no offload store is configured".into(),
            ));
        }
        let ml = self.managed(name).await?;
        if ml.offload_status().status == OffloadState::Running {
            return Err(BrokerError::AlreadyExists(format!(
                "an offload of {name} is running"
            )));
        }
        let ids = offload_candidates(&ml.ledgers(), Some(0), None);
        let attempts = self.inner.cfg.offload.attempts;
        tokio::spawn(async move {
            let _ = ml.offload(&ids, attempts).await;
        });
        Ok(())
    }

    pub async fn offload_status(&self, name: &TopicName) -> Result<OffloadStatus> {
        Ok(self.managed(name).await?.offload_status())
    }

    /// Runs the offload policy over every loaded persistent topic now:
    /// offloads what the namespace's thresholds ask for, then deletes the
    /// bookie copies of ledgers offloaded longer than the deletion lag.
    pub async fn run_offload(&self) -> Result<()> {
        let defaults = self.inner.cfg.offload.clone();
        let tier = self.inner.cfg.managed_ledger.tier.is_some();
        for t in self.loaded_topics().await {
            let PartitionLog::Managed(ml) = t.log() else {
                continue;
            };
            let p = self.policies(t.name().namespace()).await?;
            let now = magnetar_bookies::meta::now_ms();
            let bytes = p.offload_threshold.unwrap_or(defaults.threshold_bytes);
            let secs = p
                .offload_threshold_in_seconds
                .unwrap_or(defaults.threshold_seconds);
            let ids = offload_candidates(
                &ml.ledgers(),
                u64::try_from(bytes).ok(),
                u64::try_from(secs)
                    .ok()
                    .map(|s| now.saturating_sub(s.saturating_mul(1000))),
            );
            if tier && !ids.is_empty() {
                if let Err(e) = ml.offload(&ids, defaults.attempts).await {
                    tracing::warn!(topic = %t.name(), "offload: {e}");
                }
            }
            let lag = p
                .offload_deletion_lag_ms
                .unwrap_or(defaults.deletion_lag.as_millis() as u64);
            if let Err(e) = ml.drop_bookie_copies(now.saturating_sub(lag)).await {
                tracing::warn!(topic = %t.name(), "deleting offloaded ledgers from the bookies: {e}");
            }
        }
        Ok(())
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
