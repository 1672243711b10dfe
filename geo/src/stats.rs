//! What replication reports: each replicator's state for `topics stats`
//! and `geo status`, and the `pulsar_replication_*` and
//! `magnetar_replication_*` series.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;
use magnetar_broker::metrics::{add_gauges, RateWindow};
use magnetar_tenancy::TopicName;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Where a replicator stands, as Pulsar's `replication.<cluster>` stats
/// show it, with Magnetar's `state` and `lastError`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatorStatus {
    /// `connecting`, `running`, `partitionMismatch`, `remoteTopicDeleted`, `unauthorized`,
    /// `refused`, `error`.
    pub state: String,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Messages not yet stored by the remote.
    pub replication_backlog: u64,
    /// Where the remote's copy ended at the last handshake.
    pub remote_watermark: u64,
    pub msg_out_counter: u64,
    pub bytes_out_counter: u64,
    /// Messages and bytes per second the remote stored, over the last
    /// minute.
    pub msg_rate_out: f64,
    pub msg_throughput_out: f64,
    /// Age of the oldest batch sent and not yet stored, in seconds.
    pub replication_delay_in_seconds: u64,
    /// Records not sent because their `pulsar.replicate-to` header left
    /// this cluster out.
    pub msg_filtered_counter: u64,
    /// Stored batches that mixed records for this cluster with others,
    /// and were sent in parts.
    pub split_batches: u64,
    /// Messages never sent because message TTL or the backlog quota's
    /// eviction moved the cursor over them while the remote was away.
    pub replication_skipped: u64,
    /// Where this replicator last left its cursor.
    #[serde(skip)]
    pub(crate) own_mark: Option<u64>,
    /// The broker URL the stream goes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_connection: Option<String>,
}

/// Every replicator of this broker, by partition and remote cluster.
#[derive(Default)]
pub struct Stats {
    replicators: Mutex<BTreeMap<(TopicName, String), ReplicatorStatus>>,
    rates: RateWindow<(TopicName, String), 2>,
}

impl Stats {
    pub(crate) fn update(
        &self,
        topic: &TopicName,
        remote: &str,
        f: impl FnOnce(&mut ReplicatorStatus),
    ) {
        let mut all = self.replicators.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry((topic.clone(), remote.to_owned())).or_default());
    }

    /// Keeps the replicators `keep` says still run.
    pub(crate) fn retain(&self, keep: impl Fn(&TopicName, &str) -> bool) {
        self.replicators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, r), _| keep(t, r));
    }

    /// The replicators of `topic` (every partition of a partitioned one,
    /// summed), by remote cluster.
    pub fn of_topic(&self, topic: &TopicName) -> BTreeMap<String, ReplicatorStatus> {
        let base = topic.base();
        let mut out: BTreeMap<String, ReplicatorStatus> = BTreeMap::new();
        for (t, remote, s) in &self.all() {
            // A partition's own, or every partition's for the topic.
            let ours = t == topic || (topic.partition_index().is_none() && t.base() == base);
            if !ours {
                continue;
            }
            match out.get_mut(remote) {
                None => {
                    out.insert(remote.clone(), s.clone());
                }
                Some(sum) => {
                    sum.replication_backlog += s.replication_backlog;
                    sum.msg_out_counter += s.msg_out_counter;
                    sum.bytes_out_counter += s.bytes_out_counter;
                    sum.msg_filtered_counter += s.msg_filtered_counter;
                    sum.msg_rate_out += s.msg_rate_out;
                    sum.msg_throughput_out += s.msg_throughput_out;
                    sum.split_batches += s.split_batches;
                    sum.replication_skipped += s.replication_skipped;
                    sum.connected &= s.connected;
                    sum.replication_delay_in_seconds = sum
                        .replication_delay_in_seconds
                        .max(s.replication_delay_in_seconds);
                    if s.state != "running" {
                        sum.state.clone_from(&s.state);
                        sum.last_error.clone_from(&s.last_error);
                    }
                }
            }
        }
        out
    }

    /// Every replicator, with its rates, for `geo status`.
    pub fn all(&self) -> Vec<(TopicName, String, ReplicatorStatus)> {
        let all: Vec<_> = self
            .replicators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((t, r), s)| (t.clone(), r.clone(), s.clone()))
            .collect();
        let counters = all
            .iter()
            .map(|(t, r, s)| {
                (
                    (t.clone(), r.clone()),
                    [s.msg_out_counter, s.bytes_out_counter],
                )
            })
            .collect();
        let rates = self.rates.rates(Instant::now(), counters);
        all.into_iter()
            .map(|(t, r, mut s)| {
                if let Some([msgs, bytes]) = rates.get(&(t.clone(), r.clone())) {
                    s.msg_rate_out = *msgs;
                    s.msg_throughput_out = *bytes;
                }
                (t, r, s)
            })
            .collect()
    }

    /// The source side's series, summed per namespace and remote.
    pub(crate) fn scrape<'a>(self: Arc<Self>, cluster: &'a str) -> BoxFuture<'a, Registry> {
        Box::pin(async move {
            type Key = (String, String);
            let mut sums: BTreeMap<Key, [i64; 7]> = BTreeMap::new();
            let mut rates: BTreeMap<Key, [f64; 2]> = BTreeMap::new();
            for (t, remote, s) in self.all() {
                let key = (t.namespace().to_string(), remote);
                let r = rates.entry(key.clone()).or_default();
                r[0] += s.msg_rate_out;
                r[1] += s.msg_throughput_out;
                let e = sums.entry(key).or_default();
                e[0] += s.replication_backlog as i64;
                e[1] += i64::from(s.connected);
                e[2] = e[2].max(s.replication_delay_in_seconds as i64);
                e[3] += s.msg_out_counter as i64;
                e[4] += s.bytes_out_counter as i64;
                e[5] += s.msg_filtered_counter as i64;
                e[6] += s.split_batches as i64;
            }
            let mut r = Registry::default();
            let labels = |(ns, remote): &Key| {
                vec![
                    ("cluster", cluster.to_owned()),
                    ("namespace", ns.clone()),
                    ("remoteCluster", remote.clone()),
                ]
            };
            let family = |i: usize| {
                sums.iter()
                    .map(move |(k, v)| (labels(k), v[i]))
                    .collect::<Vec<_>>()
            };
            add_gauges(
                &mut r,
                "pulsar_replication_backlog",
                "Messages not yet stored by the remote cluster",
                family(0),
            );
            add_gauges(
                &mut r,
                "pulsar_replication_connected_count",
                "Replicators connected to the remote cluster",
                family(1),
            );
            add_gauges(
                &mut r,
                "pulsar_replication_delay_in_seconds",
                "Age of the oldest batch sent and not yet stored",
                family(2),
            );
            add_gauges(
                &mut r,
                "magnetar_replication_out_messages",
                "Messages the remote cluster stored, since the replicators started",
                family(3),
            );
            add_gauges(
                &mut r,
                "magnetar_replication_out_bytes",
                "Bytes the remote cluster stored, since the replicators started",
                family(4),
            );
            add_rates(
                &mut r,
                [
                    (
                        "pulsar_replication_rate_out",
                        "Messages per second the remote cluster stored, over the last minute",
                    ),
                    (
                        "pulsar_replication_throughput_out",
                        "Bytes per second the remote cluster stored, over the last minute",
                    ),
                ],
                rates.iter().map(|(k, v)| (labels(k), *v)),
            );
            add_gauges(
                &mut r,
                "magnetar_replication_filtered_messages",
                "Messages kept from the remote cluster by their pulsar.replicate-to header",
                family(5),
            );
            add_gauges(
                &mut r,
                "magnetar_replication_split_batches",
                "Stored batches sent in parts because only some of their messages replicate",
                family(6),
            );
            r
        })
    }
}

/// The receiving side's series, by source cluster.
pub struct ReceiverMetrics {
    cluster: String,
    duplicates: Family<Vec<(&'static str, String)>, Counter>,
    out_of_order: Family<Vec<(&'static str, String)>, Counter>,
    stored_bytes: Family<Vec<(&'static str, String)>, Counter>,
    lag_ms: Family<Vec<(&'static str, String)>, Histogram>,
    /// Messages and bytes stored, by source cluster, for the rates.
    totals: Mutex<BTreeMap<String, [u64; 2]>>,
    rates: RateWindow<String, 2>,
    /// Batches stored, for tests and `geo status`.
    pub stored_batches: AtomicU64,
}

impl ReceiverMetrics {
    pub fn new(cluster: &str) -> Self {
        ReceiverMetrics {
            cluster: cluster.to_owned(),
            duplicates: Family::default(),
            out_of_order: Family::default(),
            stored_bytes: Family::default(),
            lag_ms: Family::new_with_constructor(|| {
                Histogram::new([
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 30000.0,
                ])
            }),
            totals: Mutex::default(),
            rates: RateWindow::default(),
            stored_batches: AtomicU64::new(0),
        }
    }

    fn labels(&self, source: &str) -> Vec<(&'static str, String)> {
        vec![
            ("cluster", self.cluster.clone()),
            ("remoteCluster", source.to_owned()),
        ]
    }

    pub(crate) fn lag(&self, source: &str, source_append_ms: u64) {
        if source_append_ms == 0 {
            return;
        }
        let now = now_ms();
        self.lag_ms
            .get_or_create(&self.labels(source))
            .observe(now.saturating_sub(source_append_ms) as f64);
    }

    pub(crate) fn stored(&self, source: &str, messages: u64, bytes: u64) {
        self.stored_batches.fetch_add(1, Ordering::Relaxed);
        {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let t = totals.entry(source.to_owned()).or_default();
            t[0] += messages;
            t[1] += bytes;
        }
        self.stored_bytes
            .get_or_create(&self.labels(source))
            .inc_by(bytes);
    }

    pub(crate) fn duplicate(&self, source: &str) {
        self.duplicates.get_or_create(&self.labels(source)).inc();
    }

    pub(crate) fn out_of_order(&self, source: &str) {
        self.out_of_order.get_or_create(&self.labels(source)).inc();
    }

    /// `pulsar_replication_rate_in` and `_throughput_in`, by source
    /// cluster, over the last minute.
    pub(crate) fn scrape<'a>(self: Arc<Self>, _cluster: &'a str) -> BoxFuture<'a, Registry> {
        Box::pin(async move {
            let totals = self
                .totals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let rates = self.rates.rates(Instant::now(), totals);
            let mut r = Registry::default();
            add_rates(
                &mut r,
                [
                    (
                        "pulsar_replication_rate_in",
                        "Messages per second stored from the remote cluster, over the last minute",
                    ),
                    (
                        "pulsar_replication_throughput_in",
                        "Bytes per second stored from the remote cluster, over the last minute",
                    ),
                ],
                rates.iter().map(|(source, v)| (self.labels(source), *v)),
            );
            r
        })
    }

    /// Registers the series with the broker's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "magnetar_replication_duplicates",
            "Replicated batches received again and not stored (resends absorbed)",
            self.duplicates.clone(),
        );
        r.register(
            "magnetar_replication_out_of_order",
            "Replicated batches refused because an earlier one was missing",
            self.out_of_order.clone(),
        );
        r.register(
            "magnetar_replication_in_bytes",
            "Bytes of replicated batches stored",
            self.stored_bytes.clone(),
        );
        r.register(
            "magnetar_replication_lag_ms",
            "From the source's append to the receipt here, in milliseconds",
            self.lag_ms.clone(),
        );
    }
}

/// A pair of per-second gauges (messages, bytes), one row per label set.
fn add_rates(
    r: &mut Registry,
    names: [(&'static str, &'static str); 2],
    rows: impl Iterator<Item = (Vec<(&'static str, String)>, [f64; 2])>,
) {
    type Rate = Family<Vec<(&'static str, String)>, Gauge<f64, AtomicU64>>;
    let families: [Rate; 2] = Default::default();
    for (labels, v) in rows {
        for (f, v) in families.iter().zip(v) {
            f.get_or_create(&labels).set(v);
        }
    }
    for ((name, help), f) in names.into_iter().zip(families) {
        r.register(name, help, f);
    }
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
