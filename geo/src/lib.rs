//! Geo-replication between Magnetar clusters (regions), each with its own
//! metadata store, bookies and brokers.
//!
//! A namespace (or a topic) lists the clusters it replicates to. For every
//! partition it owns in such a namespace and every other cluster listed,
//! a broker runs a replicator ([`replicator`]): a durable cursor
//! `pulsar.repl.<cluster>` and one ordered gRPC stream that carries the
//! partition's stored record batches unchanged. The remote broker
//! ([`receiver`]) appends each batch exactly once, by the source offsets it
//! covers, through the log's own path ([`magnetar_broker::replicated`]),
//! and marks it so that it is never replicated again: a full mesh of
//! regions has no loops. Every protocol writes the same log, so Kafka,
//! AMQP, MQTT and WebSocket traffic replicates by the one mechanism.
//!
//! The crate sits above the broker as a protocol does: the broker knows
//! nothing of it, and the binary mounts the receiver on the HTTP listener
//! and starts the replicators.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use magnetar_broker::service::{GEO_EXCHANGE_PREFIX, GEO_STATE_TOPIC, GEO_TOPIC_PREFIX};
use magnetar_broker::topic::REPLICATOR_PREFIX;
use magnetar_broker::{Broker, WeakBroker};
use magnetar_tenancy::TopicName;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod error;
pub mod receiver;
pub mod remote;
pub mod replicator;
pub mod routein;
pub mod statesync;
pub mod stats;
pub mod status;

pub use error::{GeoError, Result};
pub use stats::{ReplicatorStatus, Stats};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("magnetar.geo.v1");
}

/// The records of a stored entry that were replicated in from another
/// cluster (what routing in and state sync act on; local ones were acted
/// on when they were written).
pub(crate) fn replicated_records(
    entry: bytes::Bytes,
) -> magnetar_broker::Result<Vec<magnetar_broker::StoredMessage>> {
    let mut data = entry;
    let mut out = Vec::new();
    while !data.is_empty() {
        let h = magnetar_broker::format::BatchHeader::parse(&data)?;
        let batch = data.split_to(h.size.min(data.len()));
        if magnetar_broker::replicated::is_replicated(h.producer_id) && !h.is_control() {
            out.extend(magnetar_broker::format::decode_entry(&batch)?);
        }
    }
    Ok(out)
}

/// Replication settings of a broker.
#[derive(Clone, Debug)]
pub struct GeoConfig {
    /// How often the replicators are checked against the policies and
    /// the ownership of partitions, besides whenever a policy changes.
    pub rescan: Duration,
    /// Batches sent ahead of the remote's replies, per replicator.
    pub max_inflight_batches: usize,
    /// Bytes sent ahead of the remote's replies, per replicator.
    pub max_inflight_bytes: u64,
    /// Bytes read from the log at a time.
    pub read_bytes: usize,
    /// Longest pause between attempts to reach a remote.
    pub backoff_max: Duration,
    /// How long the oldest batch in flight may wait for its reply before
    /// the stream is given up and made anew.
    pub reply_timeout: Duration,
    /// Roles, besides superusers, that other clusters replicate in as.
    pub peer_roles: BTreeSet<String>,
}

impl Default for GeoConfig {
    fn default() -> Self {
        GeoConfig {
            rescan: Duration::from_secs(5),
            max_inflight_batches: 1000,
            max_inflight_bytes: 8 << 20,
            read_bytes: 1 << 20,
            backoff_max: Duration::from_secs(60),
            reply_timeout: Duration::from_secs(30),
            peer_roles: BTreeSet::new(),
        }
    }
}

/// What replicators share.
pub(crate) struct Ctx {
    pub(crate) broker: WeakBroker,
    /// This cluster's name.
    pub(crate) cluster: String,
    pub(crate) cfg: GeoConfig,
    pub(crate) stats: Arc<Stats>,
    remotes: Mutex<HashMap<String, remote::Remote>>,
}

impl Ctx {
    /// The remote cluster as registered now.
    pub(crate) async fn remote(&self, b: &Broker, name: &str) -> Result<remote::Remote> {
        let data = b.tenancy().get_cluster(name).await?;
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = remotes.get(name).filter(|r| r.is(&data)) {
            return Ok(r.clone());
        }
        let r = remote::Remote::new(name, data)?;
        remotes.insert(name.to_owned(), r.clone());
        Ok(r)
    }
}

/// The replicators of one broker; they stop when this is dropped.
pub struct Geo {
    stats: Arc<Stats>,
    received: Arc<stats::ReceiverMetrics>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Geo {
    /// Starts the replicators of `broker` and registers replication's
    /// series with its metrics.
    pub fn start(broker: &Broker, cfg: GeoConfig) -> Geo {
        let stats = Arc::new(Stats::default());
        let cluster = broker.config().cluster.clone();
        let receiver = Arc::new(stats::ReceiverMetrics::new(&cluster));
        broker.metrics().extend(|r| receiver.register(r));
        broker
            .metrics()
            .add_source(Arc::new(magnetar_broker::metrics::WeakSource(
                Arc::downgrade(&receiver),
                stats::ReceiverMetrics::scrape,
            )));
        broker
            .metrics()
            .add_source(Arc::new(magnetar_broker::metrics::WeakSource(
                Arc::downgrade(&stats),
                Stats::scrape,
            )));
        let weak = Arc::downgrade(&stats);
        broker.set_replication_stats(Arc::new(move |t: &TopicName| {
            weak.upgrade()
                .map(|s| {
                    s.of_topic(t)
                        .into_iter()
                        .map(|(c, st)| (c, serde_json::to_value(st).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default()
        }));
        let ctx = Arc::new(Ctx {
            broker: broker.downgrade(),
            cluster,
            cfg,
            stats: Arc::clone(&stats),
            remotes: Mutex::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(reconcile_loop(ctx, stopped));
        Geo {
            stats,
            received: receiver,
            stop,
            task: Some(task),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The receiving service and `/admin/v2/geo/status`, to be merged
    /// into the broker's HTTP router (gRPC over HTTP/2 on the same
    /// listener, with its TLS).
    pub fn router(&self, broker: &Broker, cfg: &GeoConfig) -> axum::Router {
        let server = receiver::Receiver::new(
            broker.clone(),
            cfg.peer_roles.clone(),
            Arc::clone(&self.received),
        )
        .into_server();
        // Its own paths only: the HTTP router keeps its fallback.
        axum::Router::new()
            .route_service("/magnetar.geo.v1.Replication/{method}", server)
            .route(
                "/admin/v2/geo/status",
                axum::routing::get(status::status).with_state(status::StatusState {
                    broker: broker.clone(),
                    stats: Arc::clone(&self.stats),
                }),
            )
    }

    /// Stops every replicator and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Geo {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Topics that never replicate: system topics (but exchanges' capture
/// topics), and the queues of AMQP and MQTT sessions, which each region
/// routes into from its own exchanges.
fn replicable(t: &TopicName, queues: &HashSet<String>) -> bool {
    let base = t.base();
    let name = base.local_name();
    name.starts_with(GEO_TOPIC_PREFIX)
        || !(name.starts_with("__")
            || name.starts_with("mqtt-subscription-")
            || name.starts_with("mqtt-share-")
            || queues.contains(name))
}

/// What should run on this broker.
#[derive(Default)]
struct Wanted {
    /// (partition, remote cluster) of every replicator.
    replicators: HashSet<(TopicName, String)>,
    /// The clusters of every replicated partition.
    clusters_of: HashMap<TopicName, BTreeSet<String>>,
    /// Capture topics whose replicated records are routed in here.
    route_in: HashSet<TopicName>,
    /// Namespaces that replicate.
    namespaces: BTreeSet<magnetar_tenancy::NamespaceName>,
    /// Namespaces whose replicated state this broker syncs.
    state_sync: HashSet<magnetar_tenancy::NamespaceName>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What should run here: a replicator per owned partition of a
/// replicated topic and remote cluster, and the routing in of capture
/// topics.
async fn wanted(b: &Broker, local: &str) -> magnetar_broker::Result<Wanted> {
    let overrides = b.topic_replication_overrides().await?;
    let mut w = Wanted::default();
    for tenant in b.tenancy().list_tenants().await? {
        for ns in b.tenancy().list_namespaces(&tenant).await? {
            let ns_clusters = b.tenancy().get_policies(&ns).await?.replication_clusters;
            let any_override = overrides.keys().any(|t| t.namespace() == &ns);
            let replicated = ns_clusters.len() > 1 && ns_clusters.contains(local);
            if replicated {
                w.namespaces.insert(ns.clone());
                let state = ns.topic(magnetar_tenancy::TopicDomain::Persistent, GEO_STATE_TOPIC)?;
                match b.lookup(&state).await {
                    Ok(owner) if owner.id == b.info().id => {
                        w.state_sync.insert(ns.clone());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(namespace = %ns, "replicated state's owner: {e}"),
                }
            }
            if !replicated && !any_override {
                continue;
            }
            let queues: HashSet<String> =
                b.routing_snapshot(&ns).await?.queues.into_iter().collect();
            for t in b.list_topics(&ns).await? {
                if !replicable(&t, &queues) {
                    continue;
                }
                let clusters = overrides.get(&t.base()).unwrap_or(&ns_clusters);
                if clusters.len() < 2 || !clusters.contains(local) {
                    continue;
                }
                w.clusters_of.insert(t.clone(), clusters.clone());
                // Taking an unowned bundle here is what gives an idle
                // topic with a backlog an owner after a restart.
                match b.lookup(&t).await {
                    Ok(owner) if owner.id == b.info().id => {
                        for c in clusters.iter().filter(|c| *c != local) {
                            w.replicators.insert((t.clone(), c.clone()));
                        }
                        if t.local_name().starts_with(GEO_EXCHANGE_PREFIX) {
                            w.route_in.insert(t.clone());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(topic = %t, "replicated topic's owner: {e}"),
                }
            }
        }
    }
    Ok(w)
}

async fn reconcile_loop(ctx: Arc<Ctx>, mut stopped: watch::Receiver<bool>) {
    let Some(b) = ctx.broker.upgrade() else {
        return;
    };
    let mut shutdown = b.shutdown_signal();
    let watch = |b: &Broker| {
        futures::stream::select(
            b.meta().watch("/admin/", 0),
            b.meta()
                .watch(magnetar_broker::service::TOPIC_POLICIES_PREFIX, 0),
        )
    };
    let mut events = Some(watch(&b));
    // A topic made here replicates from its first record, without
    // waiting for the next rescan.
    let mut created = b.topics_created();
    drop(b);
    let mut running: HashMap<(TopicName, String), Running> = HashMap::new();
    let mut routing_in: HashMap<TopicName, Running> = HashMap::new();
    let mut syncing: HashMap<magnetar_tenancy::NamespaceName, Running> = HashMap::new();
    let mut replicated_namespaces = BTreeSet::new();
    let mut rescan = tokio::time::interval(ctx.cfg.rescan);
    // After a pause (a frozen process), one pass, not one per missed tick.
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rescan.tick() => {}
            r = created.changed() => {
                if r.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = stopped.changed() => break,
            _ = shutdown.changed() => break,
            ev = async {
                match events.as_mut() {
                    Some(e) => e.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if ev.is_none() {
                    events = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Several changes in a row make one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let Some(b) = ctx.broker.upgrade() else {
            break;
        };
        if events.is_none() {
            events = Some(watch(&b));
        }
        let Wanted {
            replicators: run,
            clusters_of,
            route_in,
            namespaces,
            state_sync,
        } = match wanted(&b, &ctx.cluster).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("replication: {e}");
                continue;
            }
        };
        // Publishes into exchanges start (or stop) being captured.
        if namespaces != replicated_namespaces {
            b.invalidate_routes();
            replicated_namespaces = namespaces;
        }
        let keep = run.clone();
        keep_running(&mut running, run, |(t, remote), stop| {
            tokio::spawn(replicator::run(
                Arc::clone(&ctx),
                t.clone(),
                remote.clone(),
                stop,
            ))
        })
        .await;
        ctx.stats
            .retain(|t, remote| keep.contains(&(t.clone(), remote.to_owned())));
        keep_running(&mut routing_in, route_in, |t, stop| {
            tokio::spawn(routein::run(Arc::clone(&ctx), t.clone(), stop))
        })
        .await;
        keep_running(&mut syncing, state_sync, |ns, stop| {
            tokio::spawn(statesync::run(Arc::clone(&ctx), ns.clone(), stop))
        })
        .await;
        release_cursors(&b, &clusters_of).await;
    }
    for r in running
        .into_values()
        .chain(routing_in.into_values())
        .chain(syncing.into_values())
    {
        let _ = r.stop.send(true);
        let _ = r.task.await;
    }
}

/// Runs exactly one task per key of `wanted`: stops the others (and
/// waits for them, so that nothing they do outlasts the call), starts the
/// missing ones with `spawn`.
async fn keep_running<K: std::hash::Hash + Eq + Clone>(
    running: &mut HashMap<K, Running>,
    wanted: HashSet<K>,
    spawn: impl Fn(&K, watch::Receiver<bool>) -> JoinHandle<()>,
) {
    let stale: Vec<K> = running
        .keys()
        .filter(|k| !wanted.contains(*k))
        .cloned()
        .collect();
    for k in stale {
        if let Some(r) = running.remove(&k) {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }
    for k in wanted {
        if running.contains_key(&k) {
            continue;
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = spawn(&k, stop_rx);
        running.insert(k, Running { stop, task });
    }
}

/// Deletes the cursors of clusters a topic no longer replicates to, so
/// that they hold no backlog.
async fn release_cursors(b: &Broker, clusters_of: &HashMap<TopicName, BTreeSet<String>>) {
    let none = BTreeSet::new();
    for t in b.loaded_topics().await {
        let clusters = clusters_of.get(t.name()).unwrap_or(&none);
        for sub in t.subscriptions().await {
            let Some(cluster) = sub.strip_prefix(REPLICATOR_PREFIX) else {
                continue;
            };
            if !clusters.contains(cluster) {
                if let Err(e) = t.unsubscribe(&sub, true).await {
                    tracing::debug!(topic = %t.name(), "releasing {sub}: {e}");
                }
            }
        }
    }
}
