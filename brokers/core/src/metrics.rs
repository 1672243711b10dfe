//! The broker's metrics, in Pulsar's names where Pulsar has the metric.
//!
//! Two kinds:
//! - **Counters** (`pulsar_in_messages_total` and the like) are kept per
//!   namespace by the broker itself, not summed from the topics loaded at
//!   scrape time: a topic that unloads, or whose bundle moves away, takes
//!   nothing back, so a namespace's counter never goes backwards.
//! - **Gauges** (storage, backlog, topics, subscriptions, consumers,
//!   connections) are read from live state when Prometheus scrapes, into
//!   a registry made for that scrape.
//!
//! Series are at namespace level: every MQTT session is a queue, so
//! per-topic series would grow with the number of devices.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use magnetar_metrics::prometheus_client::collector::Collector;
use magnetar_metrics::prometheus_client::encoding::EncodeLabelSet;
use magnetar_metrics::prometheus_client::metrics::counter::Counter;
use magnetar_metrics::prometheus_client::metrics::family::Family;
use magnetar_metrics::prometheus_client::metrics::gauge::Gauge;
pub use magnetar_metrics::prometheus_client::metrics::histogram::Histogram;
pub use magnetar_metrics::prometheus_client::registry::Registry;
use magnetar_metrics::{Exposition, MetricsError};
use magnetar_tenancy::NamespaceName;

use crate::listener::Admission;

/// The labels of a namespace-level series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct NsLabels {
    pub cluster: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    cluster: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

/// Handles to one namespace's message and byte counters, cached by
/// whatever counts (a topic, a subscription) so that the hot path only
/// adds to two atomics.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    messages: Counter,
    bytes: Counter,
}

impl Traffic {
    pub fn add(&self, messages: u64, bytes: u64) {
        self.messages.inc_by(messages);
        self.bytes.inc_by(bytes);
    }
}

/// A namespace's offload counters.
#[derive(Clone, Debug, Default)]
pub struct OffloadTraffic {
    bytes: Counter,
    ledgers: Counter,
    errors: Counter,
}

impl OffloadTraffic {
    /// Counts one upload attempt: a ledger offloaded (with its bytes), or
    /// a failure.
    pub fn count<E>(&self, outcome: &Result<Option<u64>, E>) {
        match outcome {
            Ok(Some(bytes)) => {
                self.ledgers.inc();
                self.bytes.inc_by(*bytes);
            }
            Ok(None) => {}
            Err(_) => {
                self.errors.inc();
            }
        }
    }
}

/// Families that need awaiting to read (the metadata store, topics),
/// built afresh at each scrape: a protocol's own (Kafka's consumer-group
/// lag) or the process's.
pub trait ScrapeSource: Send + Sync {
    fn scrape<'a>(&'a self, cluster: &'a str) -> BoxFuture<'a, Registry>;
}

/// A [`ScrapeSource`] over a protocol's shared state, held weakly so that
/// the metrics do not keep a stopped listener's state alive: the
/// function reads the state, and a source whose state is gone adds
/// nothing.
pub struct WeakSource<T>(
    pub Weak<T>,
    pub for<'a> fn(Arc<T>, &'a str) -> BoxFuture<'a, Registry>,
);

impl<T: Send + Sync> ScrapeSource for WeakSource<T> {
    fn scrape<'a>(&'a self, cluster: &'a str) -> BoxFuture<'a, Registry> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(t) => (self.1)(t, cluster).await,
                None => Registry::default(),
            }
        })
    }
}

/// Registers a gauge family of `rows`, each a label set and a value, for
/// a [`ScrapeSource`]: protocols report what they alone know without
/// depending on the metrics library.
pub fn add_gauges(
    r: &mut Registry,
    name: &'static str,
    help: &'static str,
    rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, i64)>,
) {
    let f = Family::<Vec<(&'static str, String)>, Gauge>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    r.register(name, help, f);
}

/// How far back the rates look.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Per-second rates of `N` counters per key, over the samples of the last
/// minute (Pulsar's rates are over its one-minute stats interval). A
/// sample is taken at each read, one a second at most, so that many
/// scrapers keep the window short; the first read has nothing to compare
/// with, and reports 0.
pub struct RateWindow<K, const N: usize> {
    samples: Mutex<std::collections::VecDeque<Sample<K, N>>>,
}

/// The counters as they stood at one moment.
type Sample<K, const N: usize> = (Instant, BTreeMap<K, [u64; N]>);

impl<K, const N: usize> Default for RateWindow<K, N> {
    fn default() -> Self {
        RateWindow {
            samples: Mutex::new(std::collections::VecDeque::new()),
        }
    }
}

impl<K: Ord + Clone, const N: usize> RateWindow<K, N> {
    /// The rates of `current`, the counters as they stand at `now`.
    pub fn rates(&self, now: Instant, current: BTreeMap<K, [u64; N]>) -> BTreeMap<K, [f64; N]> {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while samples.len() > 1
            && samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            samples.pop_front();
        }
        let base = samples
            .front()
            .filter(|(t, _)| now.duration_since(*t) >= Duration::from_millis(500));
        let mut out = BTreeMap::new();
        for (l, v) in &current {
            let mut r = [0.0; N];
            if let Some((t, old)) = base {
                let dt = now.duration_since(*t).as_secs_f64();
                let was = old.get(l).copied().unwrap_or([0; N]);
                for i in 0..N {
                    r[i] = v[i].saturating_sub(was[i]) as f64 / dt;
                }
            }
            out.insert(l.clone(), r);
        }
        if samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            samples.push_back((now, current));
        }
        out
    }
}

/// A connection counted in `pulsar_producers_count` until it is dropped.
#[derive(Debug)]
pub struct ProducerGuard(Gauge);

impl Drop for ProducerGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// [`add_gauges`] of namespace-level rows: each a namespace and a value.
pub fn add_ns_gauges(
    r: &mut Registry,
    cluster: &str,
    name: &'static str,
    help: &'static str,
    rows: impl IntoIterator<Item = (String, i64)>,
) {
    add_gauges(
        r,
        name,
        help,
        rows.into_iter()
            .map(|(ns, v)| (vec![("cluster", cluster.to_owned()), ("namespace", ns)], v)),
    );
}

/// `(live, ready)` of a part of the process, for `/health` and `/ready`.
pub type Probe = Arc<dyn Fn() -> (bool, bool) + Send + Sync>;

pub struct BrokerMetrics {
    cluster: String,
    auth_failures: Family<ProtocolLabels, Counter>,
    sources: RwLock<Vec<Arc<dyn ScrapeSource>>>,
    probes: RwLock<Vec<(&'static str, Probe)>>,
    in_messages: Family<NsLabels, Counter>,
    in_bytes: Family<NsLabels, Counter>,
    out_messages: Family<NsLabels, Counter>,
    out_bytes: Family<NsLabels, Counter>,
    write_latency: Family<NsLabels, Histogram, fn() -> Histogram>,
    publish_latency: Family<ProtocolLabels, Histogram, fn() -> Histogram>,
    producers: Family<NsLabels, Gauge>,
    offload_bytes: Family<NsLabels, Counter>,
    offload_ledgers: Family<NsLabels, Counter>,
    offload_errors: Family<NsLabels, Counter>,
    /// Every namespace's four traffic counters, for the rates.
    traffic: Mutex<BTreeMap<NsLabels, [Counter; 4]>>,
    /// The rates of the traffic counters.
    traffic_rates: RateWindow<NsLabels, 4>,
    /// The counters and whatever collectors the process adds (the
    /// process's own, and in standalone the metadata node's and the
    /// bookie's).
    registry: RwLock<Registry>,
    /// Every client listener's admission: its open connections are the
    /// connection gauge.
    admissions: Mutex<Vec<Arc<Admission>>>,
    /// What listeners that stopped admitted and refused, by protocol, so
    /// that the connection counters never go backwards.
    retired: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerMetrics")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl BrokerMetrics {
    pub fn new(cluster: &str) -> Self {
        let m = BrokerMetrics {
            cluster: cluster.to_owned(),
            auth_failures: Family::default(),
            sources: RwLock::new(Vec::new()),
            probes: RwLock::new(Vec::new()),
            in_messages: Family::default(),
            in_bytes: Family::default(),
            out_messages: Family::default(),
            out_bytes: Family::default(),
            write_latency: Family::new_with_constructor(latency_histogram),
            publish_latency: Family::new_with_constructor(latency_histogram),
            producers: Family::default(),
            offload_bytes: Family::default(),
            offload_ledgers: Family::default(),
            offload_errors: Family::default(),
            traffic: Mutex::new(BTreeMap::new()),
            traffic_rates: RateWindow::default(),
            registry: RwLock::new(Registry::default()),
            admissions: Mutex::new(Vec::new()),
            retired: Mutex::new(BTreeMap::new()),
        };
        {
            let mut r = m.registry.write().unwrap_or_else(|p| p.into_inner());
            let counters: [(&str, &str, &Family<NsLabels, Counter>); 7] = [
                (
                    "pulsar_in_messages",
                    "Messages stored, after deduplication",
                    &m.in_messages,
                ),
                (
                    "pulsar_in_bytes",
                    "Bytes of the record batches stored",
                    &m.in_bytes,
                ),
                (
                    "pulsar_out_messages",
                    "Messages delivered to consumers, redeliveries included",
                    &m.out_messages,
                ),
                (
                    "pulsar_out_bytes",
                    "Payload bytes delivered to consumers",
                    &m.out_bytes,
                ),
                (
                    "magnetar_offload_bytes",
                    "Bytes of ledgers written to the object store",
                    &m.offload_bytes,
                ),
                (
                    "magnetar_offload_ledgers",
                    "Ledgers written to the object store",
                    &m.offload_ledgers,
                ),
                (
                    "magnetar_offload_errors",
                    "Ledger uploads that failed, retries included",
                    &m.offload_errors,
                ),
            ];
            for (name, help, fam) in counters {
                r.register(name, help, fam.clone());
            }
            r.register(
                "pulsar_storage_write_latency_seconds",
                "From a write's submission to its durability on a quorum of bookies",
                m.write_latency.clone(),
            );
            r.register(
                "magnetar_publish_latency_seconds",
                "From a publish's arrival to its acknowledgement: a Kafka produce request to its response, an AMQP confirmed publish to its basic.ack, an MQTT QoS 1 or 2 publish to its PUBACK or PUBREC, a WebSocket message to its ack",
                m.publish_latency.clone(),
            );
            // Every protocol's series from the start, at 0: a counter that
            // appears only at its first refusal hides that first one from
            // `rate()`.
            for protocol in ["kafka", "amqp", "mqtt", "websocket", "http"] {
                let _ = m.auth_failures.get_or_create(&ProtocolLabels {
                    cluster: cluster.to_owned(),
                    protocol: protocol.to_owned(),
                });
            }
            r.register(
                "magnetar_auth_failures",
                "Logins refused (a bad or expired token, password or certificate), by protocol",
                m.auth_failures.clone(),
            );
            r.register(
                "pulsar_producers_count",
                "Connections publishing into the namespace: WebSocket producers, and Kafka, AMQP and MQTT connections that have published",
                m.producers.clone(),
            );
            r.register_collector(Box::new(magnetar_metrics::ProcessCollector));
        }
        m
    }

    /// The counters offloads of a topic of `ns` add to.
    pub fn offload(&self, ns: &NamespaceName) -> OffloadTraffic {
        let l = self.labels(ns);
        OffloadTraffic {
            bytes: self.offload_bytes.get_or_create_owned(&l),
            ledgers: self.offload_ledgers.get_or_create_owned(&l),
            errors: self.offload_errors.get_or_create_owned(&l),
        }
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    fn labels(&self, ns: &NamespaceName) -> NsLabels {
        NsLabels {
            cluster: self.cluster.clone(),
            namespace: ns.to_string(),
        }
    }

    /// The counters a topic of `ns` adds what it stores to.
    pub fn inbound(&self, ns: &NamespaceName) -> Traffic {
        let [messages, bytes, ..] = self.traffic_of(ns);
        Traffic { messages, bytes }
    }

    /// A namespace's counters: messages and bytes in, then out.
    fn traffic_of(&self, ns: &NamespaceName) -> [Counter; 4] {
        let l = self.labels(ns);
        let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        t.entry(l)
            .or_insert_with_key(|l| {
                [
                    self.in_messages.get_or_create_owned(l),
                    self.in_bytes.get_or_create_owned(l),
                    self.out_messages.get_or_create_owned(l),
                    self.out_bytes.get_or_create_owned(l),
                ]
            })
            .clone()
    }

    /// Counts a connection as a producer of `ns` while the guard lives.
    pub fn producer(&self, ns: &NamespaceName) -> ProducerGuard {
        let g = self.producers.get_or_create_owned(&self.labels(ns));
        g.inc();
        ProducerGuard(g)
    }

    /// Messages and bytes per second in and out of each namespace, over
    /// the scrapes of the last minute (Pulsar's `pulsar_rate_in` and
    /// `pulsar_throughput_in` are over its one-minute stats interval).
    /// The first scrape has nothing to compare with, and reports 0.
    fn rates(&self, now: Instant) -> BTreeMap<NsLabels, [f64; 4]> {
        let current = self
            .traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(l, c)| (l.clone(), [c[0].get(), c[1].get(), c[2].get(), c[3].get()]))
            .collect();
        self.traffic_rates.rates(now, current)
    }

    /// The histogram a protocol times its publishes in.
    pub fn publish_latency(&self, protocol: &str) -> Histogram {
        self.publish_latency.get_or_create_owned(&ProtocolLabels {
            cluster: self.cluster.clone(),
            protocol: protocol.to_owned(),
        })
    }

    /// The histogram a topic of `ns` times its writes in.
    pub fn write_latency(&self, ns: &NamespaceName) -> Histogram {
        self.write_latency.get_or_create_owned(&self.labels(ns))
    }

    /// The counters deliveries from a topic of `ns` add to.
    pub fn outbound(&self, ns: &NamespaceName) -> Traffic {
        let [_, _, messages, bytes] = self.traffic_of(ns);
        Traffic { messages, bytes }
    }

    /// Counts a refused login on `protocol` (lower case: `kafka`, `amqp`,
    /// `mqtt`, `http`, `websocket`).
    pub fn auth_failure(&self, protocol: &str) {
        self.auth_failures
            .get_or_create(&ProtocolLabels {
                cluster: self.cluster.clone(),
                protocol: protocol.to_owned(),
            })
            .inc();
    }

    /// Adds families read at each scrape.
    pub fn add_source(&self, s: Arc<dyn ScrapeSource>) {
        self.sources
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }

    pub(crate) fn sources(&self) -> Vec<Arc<dyn ScrapeSource>> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds a part of the process to `/health` and `/ready` (standalone
    /// adds its metadata node and bookie).
    pub fn add_probe(&self, name: &'static str, p: Probe) {
        self.probes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, p));
    }

    /// The parts that are not live, and those that are not ready.
    pub fn probe(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let (mut dead, mut unready) = (Vec::new(), Vec::new());
        for (name, p) in self.probes.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let (live, ready) = p();
            if !live {
                dead.push(*name);
            }
            if !ready {
                unready.push(*name);
            }
        }
        (dead, unready)
    }

    /// Adds a collector to every scrape of this broker.
    pub fn register_collector(&self, c: Box<dyn Collector>) {
        self.extend(|r| r.register_collector(c));
    }

    /// Adds families to every scrape of this broker (standalone adds its
    /// metadata node's and bookie's).
    pub fn extend(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.write().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn watch_admission(&self, a: &Arc<Admission>) {
        self.admissions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(a));
    }

    /// Open connections by protocol, and connections admitted and refused
    /// since the broker started.
    fn connections(&self) -> BTreeMap<&'static str, (usize, u64, u64)> {
        let mut live = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        // A listener nobody else holds has stopped, and its connections
        // are gone: only its totals remain.
        live.retain(|a| {
            if Arc::strong_count(a) > 1 {
                return true;
            }
            let e = retired.entry(a.protocol()).or_default();
            e.0 += a.admitted();
            e.1 += a.refused_total();
            false
        });
        let mut out: BTreeMap<&'static str, (usize, u64, u64)> = retired
            .iter()
            .map(|(p, &(admitted, refused))| (*p, (0, admitted, refused)))
            .collect();
        for a in live.iter() {
            let e = out.entry(a.protocol()).or_default();
            e.0 += a.open();
            e.1 += a.admitted();
            e.2 += a.refused_total();
        }
        out
    }

    /// Encodes the counters, the gauges of `live`, and the collectors.
    pub(crate) fn render(
        &self,
        live: &BTreeMap<GaugeKey, NamespaceGauges>,
        sourced: &[Registry],
        openmetrics: bool,
    ) -> Result<Exposition, MetricsError> {
        let scrape = self.scrape_registry(live);
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        let mut all = vec![&*registry, &scrape];
        all.extend(sourced);
        magnetar_metrics::render(&all, openmetrics)
    }

    fn scrape_registry(&self, live: &BTreeMap<GaugeKey, NamespaceGauges>) -> Registry {
        let mut r = Registry::default();
        type G = Family<Vec<(&'static str, String)>, Gauge>;
        let fams: [(&str, &str, G); 8] = [
            (
                "pulsar_topics_count",
                "Topic partitions loaded",
                G::default(),
            ),
            (
                "pulsar_subscriptions_count",
                "Subscriptions of the topics loaded",
                G::default(),
            ),
            (
                "pulsar_consumers_count",
                "Consumers attached to those subscriptions",
                G::default(),
            ),
            (
                "pulsar_msg_backlog",
                "Messages not yet acknowledged, summed over subscriptions",
                G::default(),
            ),
            (
                "pulsar_subscription_unacked_messages",
                "Messages delivered and not yet acknowledged",
                G::default(),
            ),
            (
                "pulsar_storage_size",
                "Bytes stored on bookies and offloaded",
                G::default(),
            ),
            (
                "pulsar_storage_offloaded_size",
                "Bytes offloaded to the object store",
                G::default(),
            ),
            (
                "pulsar_storage_backlog_size",
                "Bytes of ledgers the slowest subscription still needs",
                G::default(),
            ),
        ];
        let total = live
            .values()
            .fold(NamespaceGauges::default(), |a, g| a.plus(g));
        for ((ns, topic), g) in live {
            let mut l = vec![
                ("cluster", self.cluster.clone()),
                ("namespace", ns.to_string()),
            ];
            if let Some(t) = topic {
                l.push(("topic", t.clone()));
            }
            let v = g.values();
            for ((_, _, fam), v) in fams.iter().zip(v) {
                fam.get_or_create(&l).set(v);
            }
        }
        for (name, help, fam) in fams {
            r.register(name, help, fam);
        }
        type Rate = Family<NsLabels, Gauge<f64, AtomicU64>>;
        let rates: [(&str, &str, Rate); 4] = [
            (
                "pulsar_rate_in",
                "Messages stored per second, over the last minute",
                Family::default(),
            ),
            (
                "pulsar_throughput_in",
                "Bytes stored per second, over the last minute",
                Family::default(),
            ),
            (
                "pulsar_rate_out",
                "Messages delivered per second, over the last minute",
                Family::default(),
            ),
            (
                "pulsar_throughput_out",
                "Bytes delivered per second, over the last minute",
                Family::default(),
            ),
        ];
        for (l, v) in self.rates(Instant::now()) {
            for ((_, _, fam), v) in rates.iter().zip(v) {
                fam.get_or_create(&l).set(v);
            }
        }
        for (name, help, fam) in rates {
            r.register(name, help, fam);
        }
        // Always there, whatever the level: the broker's totals
        // (Pulsar's PIP-214 `pulsar_broker_*`).
        let cl = ClusterLabels {
            cluster: self.cluster.clone(),
        };
        let broker: [(&str, &str, i64); 4] = [
            (
                "pulsar_broker_topics_count",
                "Topic partitions loaded",
                total.topics,
            ),
            (
                "pulsar_broker_msg_backlog",
                "Messages not yet acknowledged, over every namespace",
                total.msg_backlog,
            ),
            (
                "pulsar_broker_storage_size",
                "Bytes stored, over every namespace",
                total.storage_size,
            ),
            (
                "pulsar_broker_subscriptions_count",
                "Subscriptions, over every namespace",
                total.subscriptions,
            ),
        ];
        for (name, help, v) in broker {
            let f = Family::<ClusterLabels, Gauge>::default();
            f.get_or_create(&cl).set(v);
            r.register(name, help, f);
        }
        let open = Family::<ProtocolLabels, Gauge>::default();
        let opened = Family::<ProtocolLabels, Counter>::default();
        let refused = Family::<ProtocolLabels, Counter>::default();
        for (protocol, (n, admitted, rejected)) in self.connections() {
            let l = ProtocolLabels {
                cluster: self.cluster.clone(),
                protocol: protocol.to_ascii_lowercase(),
            };
            open.get_or_create(&l)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            opened.get_or_create(&l).inc_by(admitted);
            refused.get_or_create(&l).inc_by(rejected);
        }
        r.register(
            "magnetar_connections",
            "Client connections open, by protocol",
            open,
        );
        r.register(
            "magnetar_connections_opened",
            "Client connections admitted, by protocol",
            opened,
        );
        r.register(
            "magnetar_connections_rejected",
            "Client connections refused at a listener's limits, by protocol",
            refused,
        );
        r
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(magnetar_metrics::LATENCY_BUCKETS)
}

/// Whose gauges a row holds: a namespace's, or with topic-level metrics
/// on, one topic's (the topics past the cap stay in their namespace's
/// row).
pub type GaugeKey = (NamespaceName, Option<String>);

/// One namespace's gauges, summed over its loaded topics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamespaceGauges {
    pub topics: i64,
    pub subscriptions: i64,
    pub consumers: i64,
    pub msg_backlog: i64,
    pub unacked: i64,
    pub storage_size: i64,
    pub offloaded_size: i64,
    pub backlog_size: i64,
}

impl NamespaceGauges {
    fn values(&self) -> [i64; 8] {
        [
            self.topics,
            self.subscriptions,
            self.consumers,
            self.msg_backlog,
            self.unacked,
            self.storage_size,
            self.offloaded_size,
            self.backlog_size,
        ]
    }

    pub fn plus(self, o: &NamespaceGauges) -> NamespaceGauges {
        NamespaceGauges {
            topics: self.topics + o.topics,
            subscriptions: self.subscriptions + o.subscriptions,
            consumers: self.consumers + o.consumers,
            msg_backlog: self.msg_backlog + o.msg_backlog,
            unacked: self.unacked + o.unacked,
            storage_size: self.storage_size + o.storage_size,
            offloaded_size: self.offloaded_size + o.offloaded_size,
            backlog_size: self.backlog_size + o.backlog_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with the whole scrape when `line` is not in it.
    fn has(e: &Exposition, line: &str) {
        assert!(e.body.contains(line), "{line} not in:\n{}", e.body);
    }

    fn ns(s: &str) -> NamespaceName {
        s.parse().expect("a namespace")
    }

    #[test]
    fn counters_are_per_namespace_and_shared_by_every_handle() {
        let m = BrokerMetrics::new("c1");
        m.inbound(&ns("t/a")).add(2, 100);
        m.inbound(&ns("t/a")).add(1, 10);
        m.inbound(&ns("t/b")).add(5, 5);
        let e = m.render(&BTreeMap::new(), &[], true).expect("renders");
        has(
            &e,
            r#"pulsar_in_messages_total{cluster="c1",namespace="t/a"} 3"#,
        );
        has(
            &e,
            r#"pulsar_in_bytes_total{cluster="c1",namespace="t/a"} 110"#,
        );
        assert!(e
            .body
            .contains(r#"pulsar_in_messages_total{cluster="c1",namespace="t/b"} 5"#));
    }

    #[test]
    fn gauges_come_from_the_scrapes_snapshot_with_broker_totals() {
        let m = BrokerMetrics::new("c1");
        let mut live = BTreeMap::new();
        let g = NamespaceGauges {
            topics: 2,
            msg_backlog: 7,
            ..NamespaceGauges::default()
        };
        live.insert((ns("t/a"), None), g);
        live.insert((ns("t/b"), None), g);
        let e = m.render(&live, &[], false).expect("renders");
        has(&e, r#"pulsar_msg_backlog{cluster="c1",namespace="t/a"} 7"#);
        has(&e, r#"pulsar_broker_msg_backlog{cluster="c1"} 14"#);
        has(&e, r#"pulsar_broker_topics_count{cluster="c1"} 4"#);
        assert_eq!(e.body.matches("# TYPE pulsar_msg_backlog ").count(), 1);
    }

    #[test]
    fn connections_follow_the_listeners_admissions() {
        let m = BrokerMetrics::new("c1");
        let a = Admission::new("MQTT", magnetar_net::ListenerLimits::default());
        m.watch_admission(&a);
        let peer = "127.0.0.1:1".parse().expect("an address");
        let t1 = a.admit(peer);
        let t2 = a.admit(peer);
        drop(t1);
        let e = m.render(&BTreeMap::new(), &[], true).expect("renders");
        has(
            &e,
            r#"magnetar_connections{cluster="c1",protocol="mqtt"} 1"#,
        );
        has(
            &e,
            r#"magnetar_connections_opened_total{cluster="c1",protocol="mqtt"} 2"#,
        );
        // A listener that stopped, its connections gone, has none open,
        // and its totals stay.
        drop((a, t2));
        let e = m.render(&BTreeMap::new(), &[], true).expect("renders");
        has(
            &e,
            r#"magnetar_connections{cluster="c1",protocol="mqtt"} 0"#,
        );
        has(
            &e,
            r#"magnetar_connections_opened_total{cluster="c1",protocol="mqtt"} 2"#,
        );
    }

    #[test]
    fn rates_are_over_the_scrapes_of_the_last_minute() {
        let m = BrokerMetrics::new("c1");
        let t0 = Instant::now();
        let a = ns("t/a");
        m.inbound(&a).add(0, 0);
        let first = m.rates(t0);
        assert_eq!(
            first[&m.labels(&a)],
            [0.0; 4],
            "nothing to compare with yet"
        );
        m.inbound(&a).add(100, 1000);
        m.outbound(&a).add(50, 500);
        let r = m.rates(t0 + Duration::from_secs(10));
        assert_eq!(r[&m.labels(&a)], [10.0, 100.0, 5.0, 50.0]);
        // Past the window, the oldest samples no longer count.
        m.inbound(&a).add(70, 0);
        let r = m.rates(t0 + Duration::from_secs(80));
        assert_eq!(
            r[&m.labels(&a)][0],
            1.0,
            "70 messages over the 70 s since the last sample"
        );
    }

    #[test]
    fn producers_are_counted_while_their_guards_live() {
        let m = BrokerMetrics::new("c1");
        let (g1, g2) = (m.producer(&ns("t/a")), m.producer(&ns("t/a")));
        drop(g1);
        let e = m.render(&BTreeMap::new(), &[], false).expect("renders");
        has(
            &e,
            r#"pulsar_producers_count{cluster="c1",namespace="t/a"} 1"#,
        );
        drop(g2);
    }

    #[test]
    fn topic_rows_carry_a_topic_label_and_count_in_the_totals() {
        let m = BrokerMetrics::new("c1");
        let g = NamespaceGauges {
            topics: 1,
            msg_backlog: 3,
            ..NamespaceGauges::default()
        };
        let mut live = BTreeMap::new();
        live.insert((ns("t/a"), Some("persistent://t/a/x".to_owned())), g);
        live.insert((ns("t/a"), None), g.plus(&g));
        let e = m.render(&live, &[], false).expect("renders");
        assert!(
            e.body.contains(
                r#"pulsar_msg_backlog{cluster="c1",namespace="t/a",topic="persistent://t/a/x"} 3"#
            ),
            "{}",
            e.body
        );
        assert!(e
            .body
            .contains(r#"pulsar_msg_backlog{cluster="c1",namespace="t/a"} 6"#));
        assert!(e
            .body
            .contains(r#"pulsar_broker_msg_backlog{cluster="c1"} 9"#));
    }
}
