//! A loaded topic partition: its log and its subscriptions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_metadata::{MetaClient, MetaError};
use magnetar_tenancy::{BacklogQuota, BacklogQuotaPolicy, Policies, TopicName};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::cursor::CursorState;
use crate::error::{BrokerError, Result};
use crate::format::{encode_batch, encode_messages, validate_batch, Message, ProducerSequence};
use crate::log::PartitionLog;
use crate::managed_ledger::LedgerInfo;
use crate::metrics::{Histogram, NamespaceGauges, Traffic};
use crate::replicated::{is_replicated, GeoStamp, Verdict, Watermark};
use crate::subscription::{
    cursor_key, cursor_record, load_cursor, Consumer, ConsumerOptions, CursorStore, DeadLetterSink,
    InitialPosition, ResetTo, Subscription, SubscriptionOptions, SubscriptionSetup,
    SubscriptionStats, CURSOR_PREFIX,
};

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    pub msg_in_counter: u64,
    pub bytes_in_counter: u64,
    pub storage_size: u64,
    pub start_offset: u64,
    pub end_offset: u64,
    pub ledger_count: usize,
    pub subscriptions: BTreeMap<String, SubscriptionStats>,
    /// Per remote cluster, its replicator's stats (see
    /// [`crate::Broker::set_replication_stats`]).
    pub replication: BTreeMap<String, serde_json::Value>,
}

/// Longest a publish waits under the producer-request-hold policy.
const QUOTA_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

/// Retention applied when a namespace sets none: acknowledged data of
/// topics with user subscriptions goes at once (queue semantics); topics
/// without them keep data for this long (stream semantics). Either way no
/// data goes that a durable subscription or a retention hold (a Kafka
/// group's committed offset) still needs.
#[derive(Clone, Copy, Debug)]
pub struct RetentionDefaults {
    pub stream_minutes: i64,
    pub stream_mb: i64,
}

impl Default for RetentionDefaults {
    fn default() -> Self {
        // Kafka's default: a week, unbounded size.
        RetentionDefaults {
            stream_minutes: 7 * 24 * 60,
            stream_mb: -1,
        }
    }
}

/// Subscriptions the system keeps for itself start with this (a route's
/// `__route`) or with [`REPLICATOR_PREFIX`]. They hold data like any
/// cursor, but never turn a topic from a stream into a queue, since no
/// user asked for queue semantics by creating them.
pub const SYSTEM_SUBSCRIPTION_PREFIX: &str = "__";

/// The cursor of the replicator to cluster `c` is `pulsar.repl.c`, as in
/// Pulsar, whose tools list and clear it under that name.
pub const REPLICATOR_PREFIX: &str = "pulsar.repl.";

pub fn is_system_subscription(name: &str) -> bool {
    name.starts_with(SYSTEM_SUBSCRIPTION_PREFIX) || name.starts_with(REPLICATOR_PREFIX)
}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored; the offset of its first message.
    Stored(u64),
    /// A retry of something already stored (same producer, sequence at
    /// or below the last stored); nothing was written.
    Duplicate,
}

impl Published {
    pub fn offset(self) -> Option<u64> {
        match self {
            Published::Stored(o) => Some(o),
            Published::Duplicate => None,
        }
    }
}

pub struct Topic {
    name: TopicName,
    log: PartitionLog,
    meta: MetaClient,
    /// Epoch and next sequence expected per producer, counting appends in
    /// flight.
    in_flight: Arc<Mutex<HashMap<i64, (i16, i64)>>>,
    /// Per source cluster, the replication watermark with the batches in
    /// progress; taken from the log when first used.
    geo: Arc<Mutex<HashMap<u16, Watermark>>>,
    /// The namespace's backlog quota, refreshed whenever retention runs.
    quota: std::sync::RwLock<Option<BacklogQuota>>,
    subs: Mutex<HashMap<String, Subscription>>,
    dead_letter: Option<DeadLetterSink>,
    stats: Arc<InCounters>,
    /// When the broker last handed the topic out, in ms since the epoch:
    /// how long a non-persistent topic has been idle.
    last_used: AtomicU64,
}

/// What a publish adds to once it is durable: the topic's own counts
/// (its stats, which start again when it loads again) and its
/// namespace's. One allocation, so a write clones one handle.
#[derive(Debug)]
struct InCounters {
    msg_in: AtomicU64,
    bytes_in: AtomicU64,
    traffic: TopicTraffic,
}

/// The namespace's counters a topic adds to: what it stores, and what
/// its subscriptions deliver. They outlive the topic, so a namespace's
/// totals hold when it unloads.
#[derive(Clone, Debug)]
pub struct TopicTraffic {
    pub inbound: Traffic,
    pub outbound: Traffic,
    /// From a write's submission to its durability on a quorum.
    pub write_latency: Histogram,
}

/// A write's counters, and when it was submitted.
struct Counters(Arc<InCounters>, std::time::Instant);

impl Counters {
    fn add(&self, messages: u64, bytes: u64) {
        let c = &self.0;
        c.msg_in.fetch_add(messages, Ordering::Relaxed);
        c.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        c.traffic.inbound.add(messages, bytes);
        c.traffic
            .write_latency
            .observe(self.1.elapsed().as_secs_f64());
    }
}

/// What became of a replicated batch.
pub enum ReplicatedAppend {
    /// Being stored: resolves to its offset here once durable.
    Pending(BoxFuture<'static, Result<u64>>),
    /// Stored before: nothing to do.
    Duplicate,
    /// It does not continue what was sent before: send again from `next`.
    OutOfOrder { next: u64 },
}

/// A publish whose place is fixed, resolving when it is durable.
pub type PendingPublish = BoxFuture<'static, Result<Published>>;

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).finish()
    }
}

impl Topic {
    /// Wraps an opened log and restarts the durable subscriptions stored
    /// for it, so that acknowledgement-based retention sees them even
    /// before their consumers return.
    pub async fn load(
        name: TopicName,
        log: PartitionLog,
        meta: MetaClient,
        dead_letter: Option<DeadLetterSink>,
        traffic: TopicTraffic,
    ) -> Result<Arc<Topic>> {
        let topic = Arc::new(Topic {
            name,
            log,
            meta,
            in_flight: Arc::default(),
            geo: Arc::default(),
            quota: std::sync::RwLock::new(None),
            subs: Mutex::new(HashMap::new()),
            dead_letter,
            stats: Arc::new(InCounters {
                msg_in: AtomicU64::new(0),
                bytes_in: AtomicU64::new(0),
                traffic,
            }),
            last_used: AtomicU64::new(magnetar_bookies::meta::now_ms()),
        });
        if topic.log.is_persistent() {
            let prefix = format!("{CURSOR_PREFIX}{}/", topic.name.path());
            let keys = topic.meta.list_keys(&prefix).await?;
            let mut subs = topic.subs.lock().await;
            for key in keys {
                let Some(enc) = key.strip_prefix(&prefix) else {
                    continue;
                };
                let sub = magnetar_tenancy::names::decode_segment(enc)?;
                if let Some(c) = load_cursor(&topic.meta, &key).await? {
                    let opts = SubscriptionOptions {
                        sub_type: c.sub_type,
                        priority: c.priority,
                        ..SubscriptionOptions::default()
                    };
                    let s = topic.start_subscription(&sub, c.state, opts, Some(c.version), key);
                    subs.insert(sub, s);
                }
            }
        }
        Ok(topic)
    }

    pub fn name(&self) -> &TopicName {
        &self.name
    }

    pub(crate) fn touch(&self) {
        self.last_used
            .store(magnetar_bookies::meta::now_ms(), Ordering::Relaxed);
    }

    /// How long since the broker last handed the topic out.
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        let last = self.last_used.load(Ordering::Relaxed);
        std::time::Duration::from_millis(magnetar_bookies::meta::now_ms().saturating_sub(last))
    }

    pub(crate) async fn has_subscriptions(&self) -> bool {
        !self.subs.lock().await.is_empty()
    }

    pub fn log(&self) -> &PartitionLog {
        &self.log
    }

    fn start_subscription(
        &self,
        sub: &str,
        cursor: CursorState,
        opts: SubscriptionOptions,
        version: Option<u64>,
        key: String,
    ) -> Subscription {
        let store = (opts.durable && self.log.is_persistent()).then(|| CursorStore {
            meta: self.meta.clone(),
            key,
            version: version.unwrap_or(0),
        });
        Subscription::start(SubscriptionSetup {
            topic: self.name.to_string(),
            name: sub.into(),
            log: self.log.clone(),
            cursor,
            opts,
            store,
            dead_letter: self.dead_letter.clone(),
            partition: self.name.partition_index().unwrap_or(0),
            delivered: self.stats.traffic.outbound.clone(),
        })
    }

    pub async fn publish(&self, messages: &[Message]) -> Result<u64> {
        let batch = encode_messages(messages)?;
        self.append(batch, messages.len() as u64).await
    }

    /// Publishes with a producer's sequence numbers: a batch whose
    /// sequence the partition already stored is acknowledged again without
    /// being written twice, so that retries after a broker failure do not
    /// duplicate.
    pub async fn publish_idempotent(
        &self,
        messages: &[Message],
        producer: ProducerSequence,
    ) -> Result<Published> {
        let batch = encode_batch(messages, Some(producer))?;
        self.submit_idempotent(batch, producer, messages.len() as u64)
            .await?
            .await
    }

    /// Appends a Kafka record batch as it came from the client, after
    /// checking it as a Kafka broker would. Batches from idempotent
    /// producers are deduplicated.
    pub async fn publish_batch(&self, batch: Bytes) -> Result<Published> {
        self.submit_batch(batch).await?.await
    }

    /// Like [`Topic::publish_batch`], in two steps: returns once the
    /// batch's place in the partition is fixed (and its sequence checked),
    /// with a future that resolves when it is durable. A connection that
    /// pipelines requests submits them in order and awaits them in any.
    pub async fn submit_batch(&self, batch: Bytes) -> Result<PendingPublish> {
        let h = validate_batch(&batch)?;
        if is_replicated(h.producer_id) {
            return Err(BrokerError::InvalidArgument(format!(
                "producer id {} is in the range of records replicated from other clusters",
                h.producer_id
            )));
        }
        let count = h.record_count.max(0) as u64;
        if h.producer_id >= 0 && h.base_sequence >= 0 {
            let p = ProducerSequence {
                producer_id: h.producer_id,
                epoch: h.producer_epoch,
                base_sequence: h.base_sequence,
            };
            return self.submit_idempotent(batch, p, count).await;
        }
        self.check_quota().await?;
        let stats = self.counters();
        let pending = self.log.submit(batch.clone()).await?;
        let len = batch.len() as u64;
        Ok(async move {
            let offset = pending.await?;
            stats.add(count, len);
            Ok(Published::Stored(offset))
        }
        .boxed())
    }

    /// Which life of this persistent topic it is (see
    /// [`crate::managed_ledger::ManagedLedger::incarnation`]).
    pub fn incarnation(&self) -> Result<u64> {
        Ok(self.replicable()?.incarnation())
    }

    /// Where replication from cluster `source` (its `geoId`) stands for
    /// the source topic's `incarnation`: the source offset to send from.
    /// Refused for another life of the source topic than the one this
    /// partition holds records of.
    pub async fn replication_handshake(&self, source: u16, incarnation: u64) -> Result<u64> {
        let ml = self.replicable()?;
        let mut geo = self.geo.lock().await;
        let w = Self::watermark(&mut geo, ml, source);
        match w.handshake(incarnation) {
            Ok(next) => {
                // Durable before the first batch of this life is taken, so
                // that a restart cannot forget which life it was.
                ml.set_geo_incarnation(source, incarnation).await?;
                Ok(next)
            }
            Err(known) => Err(BrokerError::PreconditionFailed(format!(
                "{} holds records of another life of the source topic ({known}, not {incarnation}); delete it first",
                self.name
            ))),
        }
    }

    /// Appends a batch replicated from cluster `source`, exactly once: it
    /// covers the source offsets its header names, and was sent after a
    /// batch that ended at `prev` (see [`crate::replicated`]). The batch is
    /// stored as it came, its records untouched, with its source range in
    /// its producer fields.
    pub async fn submit_replicated(
        &self,
        source: u16,
        prev: u64,
        batch: Bytes,
    ) -> Result<ReplicatedAppend> {
        let ml = self.replicable()?;
        let h = validate_batch(&batch)?;
        let base = u64::try_from(h.base_offset).unwrap_or(u64::MAX);
        let (count, len, end) = (
            h.record_count.max(0) as u64,
            batch.len() as u64,
            base.saturating_add(h.offset_count()),
        );
        let stamp = GeoStamp::new(source, base)
            .filter(|_| !h.is_control())
            .ok_or_else(|| {
                BrokerError::InvalidArgument(format!(
                    "{}: a replicated batch must be data, at a source offset below 2^46",
                    self.name
                ))
            })?;
        let pending = {
            let mut geo = self.geo.lock().await;
            let w = Self::watermark(&mut geo, ml, source);
            match w.offer(prev, base, h.offset_count()) {
                Verdict::Append => {}
                Verdict::Duplicate => return Ok(ReplicatedAppend::Duplicate),
                Verdict::OutOfOrder { next } => return Ok(ReplicatedAppend::OutOfOrder { next }),
                Verdict::Invalid => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "{}: source range {base}+{} after {prev}",
                        self.name,
                        h.offset_count()
                    )))
                }
            }
            // Stamped only once accepted: a duplicate costs no copy.
            let stored = match crate::format::with_geo_stamp(batch, &h, stamp) {
                Ok(stamped) => self.log.submit(stamped).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(p) => p,
                Err(e) => {
                    w.failed();
                    return Err(e);
                }
            }
        };
        let stats = self.counters();
        let geo = Arc::clone(&self.geo);
        // The watermark follows the write whether or not the sender still
        // waits for it: a stream that breaks must not leave the next one
        // waiting on an append nobody settles.
        let (done, settled) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let stored = pending.await;
            let mut geo = geo.lock().await;
            let w = geo.entry(source).or_default();
            let r = match stored {
                Ok(offset) => {
                    w.stored(end);
                    stats.add(count, len);
                    Ok(offset)
                }
                Err(e) => {
                    w.failed();
                    Err(e)
                }
            };
            let _ = done.send(r);
        });
        let name = self.name.to_string();
        Ok(ReplicatedAppend::Pending(
            async move {
                settled
                    .await
                    .unwrap_or_else(|_| Err(BrokerError::TopicUnavailable(name)))
            }
            .boxed(),
        ))
    }

    fn replicable(&self) -> Result<&crate::managed_ledger::ManagedLedger> {
        match &self.log {
            PartitionLog::Managed(ml) => Ok(ml),
            PartitionLog::Memory(_) => Err(BrokerError::InvalidArgument(format!(
                "{} is not persistent; only persistent topics replicate",
                self.name
            ))),
        }
    }

    fn watermark<'a>(
        geo: &'a mut HashMap<u16, Watermark>,
        ml: &crate::managed_ledger::ManagedLedger,
        source: u16,
    ) -> &'a mut Watermark {
        geo.entry(source).or_insert_with(|| {
            ml.geo_watermarks()
                .get(&source)
                .copied()
                .unwrap_or_default()
        })
    }

    fn counters(&self) -> Counters {
        Counters(self.stats.clone(), std::time::Instant::now())
    }

    /// Checks a producer's sequence as Kafka does, per partition: a
    /// sequence already stored is a duplicate, a gap is out of order, an
    /// older epoch is fenced, and a new epoch starts again at zero.
    async fn submit_idempotent(
        &self,
        batch: Bytes,
        p: ProducerSequence,
        count: u64,
    ) -> Result<PendingPublish> {
        let PartitionLog::Managed(ml) = &self.log else {
            // Nothing survives a restart of a non-persistent topic, so
            // there is nothing to deduplicate against.
            let pending = self.log.submit(batch).await?;
            return Ok(async move { pending.await.map(Published::Stored) }.boxed());
        };
        self.check_quota().await?;
        let base = i64::from(p.base_sequence);
        let len = batch.len() as u64;
        let pending = {
            let mut in_flight = self.in_flight.lock().await;
            let stored = ml.producer(p.producer_id);
            if let Some(s) = stored.filter(|s| p.epoch < s.epoch) {
                return Err(BrokerError::ProducerFenced(format!(
                    "{}: producer {} has epoch {}, the partition has seen {}",
                    self.name, p.producer_id, p.epoch, s.epoch
                )));
            }
            let stored_last = stored
                .filter(|s| s.epoch == p.epoch)
                .map(|s| s.last_sequence);
            if stored_last.is_some_and(|last| base <= last) {
                return Ok(async { Ok(Published::Duplicate) }.boxed());
            }
            let expected = in_flight
                .get(&p.producer_id)
                .filter(|(epoch, _)| *epoch == p.epoch)
                .map(|&(_, next)| next)
                .or(stored_last.map(|last| last + 1))
                .or(stored.map(|_| 0));
            match expected {
                Some(next) if base < next => {
                    return Err(BrokerError::TopicUnavailable(format!(
                        "{}: an earlier send of sequence {base} is still in flight",
                        self.name
                    )))
                }
                Some(next) if base > next => {
                    return Err(BrokerError::OutOfOrderSequence(format!(
                        "{}: producer {} sent sequence {base}, expected {next}",
                        self.name, p.producer_id
                    )))
                }
                _ => {}
            }
            in_flight.insert(p.producer_id, (p.epoch, base + count.max(1) as i64));
            self.log.submit(batch).await?
        };
        let stats = self.counters();
        let in_flight = Arc::clone(&self.in_flight);
        let producer_id = p.producer_id;
        Ok(async move {
            match pending.await {
                Ok(offset) => {
                    stats.add(count, len);
                    Ok(Published::Stored(offset))
                }
                Err(e) => {
                    // Later sends of this producer fail too; it starts
                    // again from what the partition stored.
                    in_flight.lock().await.remove(&producer_id);
                    Err(e)
                }
            }
        }
        .boxed())
    }

    async fn append(&self, batch: Bytes, messages: u64) -> Result<u64> {
        self.check_quota().await?;
        let len = batch.len() as u64;
        let stats = self.counters();
        let base = self.log.append(batch).await?;
        stats.add(messages, len);
        Ok(base)
    }

    /// Attaches a consumer, creating the subscription if needed.
    pub async fn subscribe(
        &self,
        sub: &str,
        opts: SubscriptionOptions,
        consumer: ConsumerOptions,
    ) -> Result<Consumer> {
        if sub.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "subscription name is empty".into(),
            ));
        }
        let s = self.get_or_create_subscription(sub, opts).await?;
        s.add_consumer(consumer).await
    }

    pub async fn get_or_create_subscription(
        &self,
        sub: &str,
        opts: SubscriptionOptions,
    ) -> Result<Subscription> {
        let mut subs = self.subs.lock().await;
        if let Some(s) = subs.get(sub) {
            if s.is_running() {
                if s.sub_type() != opts.sub_type {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "subscription {sub} is of type {:?}, not {:?}",
                        s.sub_type(),
                        opts.sub_type
                    )));
                }
                return Ok(s.clone());
            }
            subs.remove(sub);
        }
        let key = cursor_key(&self.name.path(), sub);
        let durable = opts.durable && self.log.is_persistent();
        let (state, version) = match durable.then_some(()) {
            Some(()) => match load_cursor(&self.meta, &key).await? {
                Some(c) => (c.state, Some(c.version)),
                None => (self.new_cursor(opts.initial_position), None),
            },
            None => (self.new_cursor(opts.initial_position), None),
        };
        // A durable subscription exists from its creation on, even before
        // its first acknowledgement.
        let version = match (durable, version) {
            (true, None) => {
                match self
                    .meta
                    .create(
                        &key,
                        cursor_record(opts.sub_type, opts.priority.as_ref(), &state),
                    )
                    .await
                {
                    Ok(kv) => Some(kv.version),
                    Err(MetaError::Conflict { .. }) => {
                        return Err(BrokerError::TopicUnavailable(self.name.to_string()))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            (_, v) => v,
        };
        let s = self.start_subscription(sub, state, opts, version, key);
        subs.insert(sub.into(), s.clone());
        Ok(s)
    }

    fn new_cursor(&self, at: InitialPosition) -> CursorState {
        let start = match at {
            InitialPosition::Latest => self.log.end_offset(),
            InitialPosition::Earliest => self.log.start_offset(),
            InitialPosition::Offset(o) => o.clamp(self.log.start_offset(), self.log.end_offset()),
        };
        CursorState::new(start, magnetar_bookies::meta::now_ms())
    }

    pub async fn subscription(&self, sub: &str) -> Result<Subscription> {
        self.subs
            .lock()
            .await
            .get(sub)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("subscription {sub} on {}", self.name)))
    }

    pub async fn subscriptions(&self) -> Vec<String> {
        let mut v: Vec<String> = self.subs.lock().await.keys().cloned().collect();
        v.sort();
        v
    }

    /// Deletes a subscription and its cursor; refused while consumers are
    /// attached unless `force`.
    pub async fn unsubscribe(&self, sub: &str, force: bool) -> Result<()> {
        let s = self.subscription(sub).await?;
        if !force && !s.stats().await?.consumers.is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "subscription {sub} has active consumers"
            )));
        }
        s.delete().await?;
        self.subs.lock().await.remove(sub);
        Ok(())
    }

    pub async fn reset_subscription(&self, sub: &str, to: ResetTo) -> Result<()> {
        self.subscription(sub).await?.reset(to).await
    }

    /// The subscriptions, copied out so that no lock is held while asking
    /// their dispatchers.
    async fn subscription_list(&self) -> Vec<(String, Subscription)> {
        self.subs
            .lock()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub async fn stats(&self) -> Result<TopicStats> {
        let subs = self.subscription_list().await;
        let mut out = BTreeMap::new();
        for (name, s) in subs {
            if let Ok(st) = s.stats().await {
                out.insert(name, st);
            }
        }
        let ledgers = self.ledgers();
        Ok(TopicStats {
            msg_in_counter: self.stats.msg_in.load(Ordering::Relaxed),
            bytes_in_counter: self.stats.bytes_in.load(Ordering::Relaxed),
            storage_size: self.log.size(),
            start_offset: self.log.start_offset(),
            end_offset: self.log.end_offset(),
            ledger_count: ledgers.len(),
            subscriptions: out,
            replication: BTreeMap::new(),
        })
    }

    /// This topic's part of its namespace's gauges. System
    /// subscriptions (`__…`) count as neither subscriptions nor backlog.
    pub async fn gauges(&self) -> NamespaceGauges {
        let mut g = NamespaceGauges {
            topics: 1,
            storage_size: i64::try_from(self.log.size()).unwrap_or(i64::MAX),
            offloaded_size: self
                .ledgers()
                .iter()
                .filter(|l| l.offload.is_some())
                .map(|l| i64::try_from(l.size).unwrap_or(i64::MAX))
                .sum(),
            backlog_size: i64::try_from(self.backlog_bytes().await).unwrap_or(i64::MAX),
            ..NamespaceGauges::default()
        };
        for (name, s) in self.subscription_list().await {
            if is_system_subscription(&name) {
                continue;
            }
            let Ok(st) = s.stats().await else {
                continue;
            };
            g.subscriptions += 1;
            g.consumers += st.consumers.len() as i64;
            g.msg_backlog += i64::try_from(st.msg_backlog).unwrap_or(i64::MAX);
            g.unacked += i64::try_from(st.unacked_messages).unwrap_or(i64::MAX);
        }
        g
    }

    pub fn ledgers(&self) -> Vec<LedgerInfo> {
        match &self.log {
            PartitionLog::Managed(ml) => ml.ledgers(),
            PartitionLog::Memory(_) => Vec::new(),
        }
    }

    /// Expires messages older than `ttl` from every subscription, as
    /// Pulsar's message TTL does: they count as acknowledged. Returns the
    /// offset before which messages expired.
    pub async fn expire_messages(&self, ttl: std::time::Duration) -> Result<u64> {
        let cutoff = magnetar_bookies::meta::now_ms().saturating_sub(ttl.as_millis() as u64);
        let boundary = self.log.offset_for_timestamp(cutoff as i64).await?;
        for (_, s) in self.subscription_list().await {
            s.expire_before(boundary);
        }
        Ok(boundary)
    }

    /// Offset of the first batch with a timestamp at or after `ts_ms`.
    pub async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64> {
        self.log.offset_for_timestamp(ts_ms).await
    }

    /// Takes the namespace's current policies (the backlog quota).
    pub fn set_policies(&self, policies: &Policies) {
        *self.quota.write().unwrap_or_else(|p| p.into_inner()) = policies.backlog_quota().copied();
    }

    fn quota(&self) -> Option<BacklogQuota> {
        *self.quota.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the slowest durable subscription stands, if there is one.
    async fn slowest_mark_delete(&self) -> Option<u64> {
        let subs = self.subs.lock().await;
        subs.values()
            .filter(|s| s.is_durable())
            .map(Subscription::mark_delete)
            .min()
    }

    /// Bytes the slowest subscription has not acknowledged: the ledgers
    /// after its position, and of the ledger it is in the share of its
    /// offsets still ahead (Pulsar's estimated backlog size). Counting
    /// the whole ledger instead would keep a topic over its quota until
    /// the ledger rolls, long after the backlog drained.
    pub async fn backlog_bytes(&self) -> u64 {
        let Some(slowest) = self.slowest_mark_delete().await else {
            return 0;
        };
        self.ledgers()
            .iter()
            .filter(|l| l.end_offset() > slowest)
            .map(|l| {
                if l.first_offset >= slowest || l.offsets == 0 {
                    l.size
                } else {
                    let ahead = l.end_offset() - slowest;
                    (u128::from(l.size) * u128::from(ahead) / u128::from(l.offsets)) as u64
                }
            })
            .sum()
    }

    /// Refuses (or holds) a publish while the backlog is over the quota.
    async fn check_quota(&self) -> Result<()> {
        let Some(q) = self.quota().filter(|q| q.limit_size >= 0) else {
            return Ok(());
        };
        if !self.log.is_persistent() || q.policy == BacklogQuotaPolicy::ConsumerBacklogEviction {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + QUOTA_HOLD;
        loop {
            let backlog = self.backlog_bytes().await;
            if backlog <= q.limit_size as u64 {
                return Ok(());
            }
            if q.policy == BacklogQuotaPolicy::ProducerException
                || tokio::time::Instant::now() >= deadline
            {
                return Err(BrokerError::QuotaExceeded(format!(
                    "{}: backlog of {backlog} bytes is over the quota of {} bytes",
                    self.name, q.limit_size
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// With the consumer-backlog-eviction policy, moves subscriptions that
    /// are too far behind forward to the oldest ledger the quota allows.
    pub async fn evict_backlog(&self) -> Result<()> {
        let Some(q) = self.quota().filter(|q| {
            q.limit_size >= 0 && q.policy == BacklogQuotaPolicy::ConsumerBacklogEviction
        }) else {
            return Ok(());
        };
        if self.backlog_bytes().await <= q.limit_size as u64 {
            return Ok(());
        }
        // The newest ledgers that fit in the quota stay; the ledger being
        // written always does.
        let ledgers = self.ledgers();
        let mut kept = 0u64;
        let mut boundary = ledgers.last().map_or(0, |l| l.first_offset);
        for l in ledgers.iter().rev().skip(1) {
            kept += l.size;
            if kept > q.limit_size as u64 {
                break;
            }
            boundary = l.first_offset;
        }
        for (_, s) in self.subscription_list().await {
            s.expire_before(boundary);
        }
        Ok(())
    }

    /// Deletes the ledgers retention no longer keeps; returns their ids.
    /// `hold` is the first offset that consumers outside the subscriptions
    /// (Kafka groups) still need.
    pub async fn apply_retention(
        &self,
        policies: &Policies,
        defaults: RetentionDefaults,
        hold: Option<u64>,
    ) -> Result<Vec<u64>> {
        let PartitionLog::Managed(ml) = &self.log else {
            return Ok(Vec::new());
        };
        let (slowest, queue) = {
            let subs = self.subs.lock().await;
            let durable = || subs.iter().filter(|(_, s)| s.is_durable());
            let slowest = durable().map(|(_, s)| s.mark_delete()).min();
            // Replication's own topics are queues for the other clusters:
            // once they and the local reader have a record, it goes.
            let capture = slowest.is_some()
                && self
                    .name
                    .local_name()
                    .starts_with(crate::service::GEO_TOPIC_PREFIX);
            (
                slowest,
                capture || durable().any(|(n, _)| !is_system_subscription(n)),
            )
        };
        let acked_limit = match (slowest, hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (minutes, mb) = match (&policies.retention_policies, queue) {
            (Some(r), _) => (r.retention_time_in_minutes, r.retention_size_in_mb),
            (None, true) => (0, 0),
            (None, false) => (defaults.stream_minutes, defaults.stream_mb),
        };
        let keep_from = deletable_prefix(
            &ml.ledgers(),
            acked_limit,
            minutes,
            mb,
            magnetar_bookies::meta::now_ms(),
        );
        match keep_from {
            Some(k) => ml.trim(k).await,
            None => Ok(Vec::new()),
        }
    }

    /// Stops the subscriptions (writing their cursors) and closes the log.
    pub async fn close(&self) -> Result<()> {
        let subs: Vec<Subscription> = self.subs.lock().await.drain().map(|(_, s)| s).collect();
        for s in subs {
            let _ = s.close().await;
        }
        match &self.log {
            PartitionLog::Managed(ml) => ml.close().await,
            PartitionLog::Memory(m) => {
                m.close();
                Ok(())
            }
        }
    }

    /// Deletes the topic's data and cursors. Refused while consumers are
    /// attached unless `force`.
    pub async fn delete(&self, force: bool) -> Result<()> {
        let subs = self.subscription_list().await;
        if !force {
            for (name, s) in &subs {
                if s.stats().await.is_ok_and(|st| !st.consumers.is_empty()) {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "topic {} has consumers on subscription {name}",
                        self.name
                    )));
                }
            }
        }
        for (_, s) in subs {
            match s.delete().await {
                Ok(()) | Err(BrokerError::TopicUnavailable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.subs.lock().await.clear();
        // Cursors of subscriptions that were not loaded.
        let prefix = format!("{CURSOR_PREFIX}{}/", self.name.path());
        for key in self.meta.list_keys(&prefix).await? {
            self.meta.delete(&key).await?;
        }
        match &self.log {
            PartitionLog::Managed(ml) => ml.delete().await,
            PartitionLog::Memory(m) => {
                m.close();
                Ok(())
            }
        }
    }
}

/// The offset before which every closed ledger may go, or `None`.
///
/// A ledger may go when it is wholly acknowledged (`acked_limit`, when
/// subscriptions count) and retention no longer holds it: its age exceeds
/// `minutes`, or the data after it alone already fills `mb`. -1 means no
/// limit on that dimension.
pub fn deletable_prefix(
    ledgers: &[LedgerInfo],
    acked_limit: Option<u64>,
    minutes: i64,
    mb: i64,
    now_ms: u64,
) -> Option<u64> {
    let total: u64 = ledgers.iter().map(|l| l.size).sum();
    let mut remaining = total;
    let mut keep_from = None;
    for l in ledgers {
        if !l.is_closed() || acked_limit.is_some_and(|a| l.end_offset() > a) {
            break;
        }
        let expired = minutes >= 0 && now_ms.saturating_sub(l.closed_ms) >= minutes as u64 * 60_000;
        let over_size = mb >= 0 && remaining > (mb as u64) << 20;
        if !(expired || over_size) {
            break;
        }
        remaining -= l.size;
        keep_from = Some(l.end_offset());
    }
    keep_from
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(first: u64, n: u64, size: u64, closed_ms: u64) -> LedgerInfo {
        LedgerInfo {
            id: first,
            first_offset: first,
            entries: n,
            offsets: n,
            size,
            created_ms: 1,
            closed_ms,
            offload: None,
            bookie_deleted: false,
        }
    }

    #[test]
    fn retention_rules() {
        let min = 60_000;
        let ls = vec![
            ledger(0, 10, 1 << 20, 1),
            ledger(10, 10, 1 << 20, 5 * min),
            ledger(20, 10, 1 << 20, 0),
        ];
        // Acked up to 15: only the first ledger is wholly acknowledged.
        assert_eq!(deletable_prefix(&ls, Some(15), 0, 0, 10 * min), Some(10));
        assert_eq!(deletable_prefix(&ls, Some(30), 0, 0, 10 * min), Some(20));
        // Nothing acknowledged, nothing goes.
        assert_eq!(deletable_prefix(&ls, Some(0), 0, 0, 10 * min), None);
        // Time: ten minutes keeps everything at minute 10 but the first.
        assert_eq!(deletable_prefix(&ls, None, 9, -1, 10 * min), Some(10));
        assert_eq!(deletable_prefix(&ls, None, -1, -1, 10 * min), None);
        // Size: 2 MB of retention lets the first ledger go (3 MB total).
        assert_eq!(deletable_prefix(&ls, None, -1, 2, 10 * min), Some(10));
        assert_eq!(deletable_prefix(&ls, None, -1, 1, 10 * min), Some(20));
        // The ledger being written never goes.
        assert_eq!(deletable_prefix(&ls, None, 0, 0, 10 * min), Some(20));
    }
}
