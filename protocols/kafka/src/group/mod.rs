//! The classic consumer-group protocol: a coordinator per group, the
//! join/sync rebalance, heartbeats and session expiry, static membership,
//! and committed offsets.
//!
//! A group's coordinator is the broker owning the bundle of a synthetic
//! topic name (`__consumer_offsets-partition-N` in the namespace), so a
//! group moves with bundle ownership when its broker dies. Membership is
//! kept in memory and written through at every settled state (stable or
//! empty), so that a new coordinator takes the group over where the old
//! one left it: members heartbeating with their id and generation carry on
//! without a rebalance. Committed offsets are not cached; they are read
//! and written through the broker's state store, compare-and-set.

mod membership;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use magnetar_broker::service::resolve_in;
use magnetar_broker::{Broker, BrokerError, BrokerInfo, RetentionHold, StateStore};
use magnetar_tenancy::names::encode_segment;
use magnetar_tenancy::{NamespaceName, TopicName as StoredTopic};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Mutex};
use tracing::debug;

use crate::coordinator::{self, Kind};
use crate::error::code_of;
use crate::handler::{str, Caller, Ctx};
use crate::KafkaConfig;
use magnetar_broker::format::now_ms;
use membership::{Answer, Effects, Group, GroupRecord, Join, Reply, TimerStep};

/// Committed offsets of a group: topic, partition, offset.
#[derive(Debug, Default, Serialize, Deserialize)]
struct OffsetsRecord {
    topics: BTreeMap<String, BTreeMap<i32, Committed>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Committed {
    offset: i64,
    #[serde(default)]
    metadata: Option<String>,
    #[serde(default = "minus_one")]
    leader_epoch: i32,
    timestamp_ms: i64,
}

fn minus_one() -> i32 {
    -1
}

type GroupKey = (NamespaceName, String);

/// A topic and the partitions an OffsetFetch asks for.
type TopicAsk = (TopicName, Vec<i32>);

/// Partition, offset, metadata, leader epoch, error code.
type FetchedOffset = (i32, i64, Option<String>, i32, i16);

pub(crate) struct GroupCoordinator {
    broker: Broker,
    cfg: KafkaConfig,
    store: StateStore,
    quota: magnetar_broker::KeyQuota,
    groups: std::sync::Mutex<HashMap<GroupKey, Arc<Mutex<Slot>>>>,
}

/// A group in memory: its rules' state and the requests parked on it, by
/// member id (a later park of a member replaces, and so answers, an
/// earlier one).
struct Slot {
    g: Group,
    joins: HashMap<String, oneshot::Sender<JoinGroupResponse>>,
    syncs: HashMap<String, oneshot::Sender<SyncGroupResponse>>,
}

impl Slot {
    fn answer(&mut self, answers: Vec<Answer>) {
        for a in answers {
            match a {
                Answer::Join(id, resp) => {
                    if let Some(tx) = self.joins.remove(&id) {
                        let _ = tx.send(resp);
                    }
                }
                Answer::Sync(id, resp) => {
                    if let Some(tx) = self.syncs.remove(&id) {
                        let _ = tx.send(resp);
                    }
                }
            }
        }
    }
}

/// The response of `reply` now, or the receiver of the one it parks in
/// `waiters` (replacing, and so answering, an earlier park of the member).
fn park<T>(
    reply: Reply<T>,
    waiters: &mut HashMap<String, oneshot::Sender<T>>,
) -> Result<T, oneshot::Receiver<T>> {
    match reply {
        Reply::Now(resp) => Ok(resp),
        Reply::Wait(member) => {
            let (tx, rx) = oneshot::channel();
            waiters.insert(member, tx);
            Err(rx)
        }
    }
}

/// Writes a settled group (see [`Group::record`]) to the store.
async fn store_settled(store: &StateStore, g: &Group) {
    let Some(record) = g.record() else {
        return;
    };
    let key = format!("{}/meta", group_path(&g.ns, &g.id));
    if let Ok(bytes) = serde_json::to_vec(&record) {
        if let Err(e) = store.put(&key, bytes).await {
            tracing::warn!("group {}: state not stored: {e}", g.id);
        }
    }
}

fn group_path(ns: &NamespaceName, group: &str) -> String {
    format!("{}/{}", ns, encode_segment(group))
}

/// Committed offsets hold the data they point at, as durable cursors do,
/// so that retention never deletes what a group has yet to read.
struct OffsetHolds {
    store: StateStore,
    retention: Duration,
}

impl RetentionHold for OffsetHolds {
    fn holds<'a>(
        &'a self,
        ns: &'a NamespaceName,
    ) -> futures::future::BoxFuture<'a, magnetar_broker::Result<HashMap<StoredTopic, u64>>> {
        Box::pin(async move {
            let oldest = now_ms()
                .saturating_sub(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX));
            let mut holds: HashMap<StoredTopic, u64> = HashMap::new();
            for (key, v) in self.store.list(&format!("{ns}/")).await? {
                if !key.ends_with("/offsets") {
                    continue;
                }
                let Ok(rec) = serde_json::from_slice::<OffsetsRecord>(&v.value) else {
                    continue;
                };
                for (topic, partitions) in &rec.topics {
                    let Ok(base) = resolve_in(ns, topic) else {
                        continue;
                    };
                    for (&index, c) in partitions {
                        let (Ok(i), Ok(offset)) = (u32::try_from(index), u64::try_from(c.offset))
                        else {
                            continue;
                        };
                        if c.timestamp_ms < oldest {
                            continue;
                        }
                        // Partition 0 of a Kafka topic is the topic itself
                        // when it is not partitioned.
                        let mut names = vec![base.partition(i)];
                        if i == 0 {
                            names.push(base.clone());
                        }
                        for n in names {
                            let e = holds.entry(n).or_insert(offset);
                            *e = (*e).min(offset);
                        }
                    }
                }
            }
            Ok(holds)
        })
    }
}

/// Consumer-group lag (high watermark minus committed offset) of the
/// partitions this broker has loaded, read at each scrape: each partition
/// is loaded on one broker, so a cluster's brokers together report every
/// group once. On by default, as users of every Kafka-compatible system
/// ask for it.
struct GroupLag {
    store: StateStore,
    broker: Broker,
}

impl magnetar_broker::metrics::ScrapeSource for GroupLag {
    fn scrape<'a>(
        &'a self,
        cluster: &'a str,
    ) -> futures::future::BoxFuture<'a, magnetar_broker::metrics::Registry> {
        Box::pin(async move {
            let mut lag = Vec::new();
            let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
            for (key, v) in self.store.list("").await.unwrap_or_default() {
                let Some((ns, group)) = key
                    .strip_suffix("/offsets")
                    .and_then(|k| k.rsplit_once('/'))
                else {
                    continue;
                };
                let (Ok(ns), Ok(group)) = (
                    ns.parse::<NamespaceName>(),
                    magnetar_tenancy::names::decode_segment(group),
                ) else {
                    continue;
                };
                let Ok(rec) = serde_json::from_slice::<OffsetsRecord>(&v.value) else {
                    continue;
                };
                for (topic, partitions) in &rec.topics {
                    let Ok(base) = resolve_in(&ns, topic) else {
                        continue;
                    };
                    for (&index, c) in partitions {
                        let Ok(i) = u32::try_from(index) else {
                            continue;
                        };
                        // Partition 0 of a Kafka topic is the topic itself
                        // when it is not partitioned.
                        let mut t = self.broker.loaded_topic(&base.partition(i)).await;
                        if t.is_none() && i == 0 {
                            t = self.broker.loaded_topic(&base).await;
                        }
                        let Some(t) = t else {
                            continue;
                        };
                        let end = i64::try_from(t.log().end_offset()).unwrap_or(i64::MAX);
                        let n = end.saturating_sub(c.offset).max(0);
                        *sums.entry((ns.to_string(), group.clone())).or_default() += n;
                        lag.push((
                            vec![
                                ("cluster", cluster.to_owned()),
                                ("namespace", ns.to_string()),
                                ("group", group.clone()),
                                ("topic", topic.clone()),
                                ("partition", index.to_string()),
                            ],
                            n,
                        ));
                    }
                }
            }
            let mut r = magnetar_broker::metrics::Registry::default();
            magnetar_broker::metrics::add_gauges(
                &mut r,
                "magnetar_kafka_consumer_group_lag",
                "Records between a group's committed offset and the partition's high watermark",
                lag,
            );
            magnetar_broker::metrics::add_gauges(
                &mut r,
                "magnetar_kafka_consumer_group_lag_sum",
                "A group's lag over the partitions this broker has loaded",
                sums.into_iter().map(|((ns, group), n)| {
                    (
                        vec![
                            ("cluster", cluster.to_owned()),
                            ("namespace", ns),
                            ("group", group),
                        ],
                        n,
                    )
                }),
            );
            r
        })
    }
}

impl GroupCoordinator {
    pub fn new(broker: Broker, cfg: KafkaConfig) -> Self {
        let store = broker.state("kafka-groups");
        broker.add_retention_hold(Arc::new(OffsetHolds {
            store: store.clone(),
            retention: cfg.offsets_retention,
        }));
        broker.metrics().add_source(Arc::new(GroupLag {
            store: store.clone(),
            broker: broker.clone(),
        }));
        GroupCoordinator {
            quota: magnetar_broker::KeyQuota::new(
                store.clone(),
                cfg.max_groups_per_namespace,
                "consumer groups",
            ),
            store,
            broker,
            cfg,
            groups: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn groups_lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Arc<Mutex<Slot>>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expires members whose sessions ran out, a few times a second.
    pub fn start_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let groups: Vec<_> = this.groups_lock().values().cloned().collect();
                for g in groups {
                    this.expire_members(&g).await;
                }
            }
        });
    }

    pub async fn coordinator_of(&self, ns: &NamespaceName, group: &str) -> Result<BrokerInfo, i16> {
        coordinator::owner(&self.broker, ns, Kind::Group, group).await
    }

    /// GROUP_AUTHORIZATION_FAILED unless the caller may consume in its
    /// namespace (Kafka's Read on a group), then NOT_COORDINATOR unless
    /// this broker coordinates `group`.
    async fn check_coordinator(&self, c: &Caller, group: &str) -> Result<(), i16> {
        if !c.grants.consume {
            return Err(E::GroupAuthorizationFailed.code());
        }
        coordinator::check_local(&self.broker, &c.ns, Kind::Group, group).await
    }

    async fn group(&self, ns: &NamespaceName, id: &str) -> Result<Arc<Mutex<Slot>>, i16> {
        let key = (ns.clone(), id.to_string());
        if let Some(g) = self.groups_lock().get(&key) {
            return Ok(Arc::clone(g));
        }
        let record = self.load_record(ns, id).await?;
        let g = Group::restore(
            ns.clone(),
            id.to_string(),
            record,
            self.cfg.group_initial_rebalance_delay,
            Instant::now(),
        );
        let arc = Arc::new(Mutex::new(Slot {
            g,
            joins: HashMap::new(),
            syncs: HashMap::new(),
        }));
        Ok(Arc::clone(self.groups_lock().entry(key).or_insert(arc)))
    }

    /// Whether state for `group` may be written: always for a group that
    /// has some, for a new one while the namespace is under its quota.
    async fn admit(&self, ns: &NamespaceName, group: &str) -> Result<(), i16> {
        self.quota
            .admit(&format!("{ns}/"), &encode_segment(group))
            .await
            .map_err(|e| {
                tracing::warn!("group {group} of {ns} refused: {e}");
                code_of(&e)
            })
    }

    async fn load_record(&self, ns: &NamespaceName, id: &str) -> Result<Option<GroupRecord>, i16> {
        let key = format!("{}/meta", group_path(ns, id));
        match self.store.get(&key).await {
            Ok(Some(v)) => Ok(serde_json::from_slice(&v.value).ok()),
            Ok(None) => Ok(None),
            Err(e) => {
                debug!("group {id}: load failed: {e}");
                Err(E::CoordinatorLoadInProgress.code())
            }
        }
    }

    /// Carries out what a membership rule decided: answers the parked
    /// requests, writes the group through, arms the rebalance timer.
    async fn apply(&self, arc: &Arc<Mutex<Slot>>, slot: &mut Slot, fx: Effects) {
        slot.answer(fx.answers);
        if fx.persist {
            store_settled(&self.store, &slot.g).await;
        }
        if let Some(timer) = fx.timer {
            let weak = Arc::downgrade(arc);
            let store = self.store.clone();
            tokio::spawn(async move {
                for (at, force) in [(timer.not_before, false), (timer.deadline, true)] {
                    tokio::time::sleep_until(at.into()).await;
                    let Some(arc) = weak.upgrade() else { return };
                    let mut slot = arc.lock().await;
                    match slot.g.rebalance_due(timer.round, force, Instant::now()) {
                        TimerStep::Stale => return,
                        TimerStep::Pending => {}
                        TimerStep::Done(fx) => {
                            slot.answer(fx.answers);
                            store_settled(&store, &slot.g).await;
                            return;
                        }
                    }
                }
            });
        }
    }

    // ---- membership ----

    pub async fn join(&self, c: &Caller, r: JoinGroupRequest, v: i16) -> JoinGroupResponse {
        let err = |code: i16| {
            JoinGroupResponse::default()
                .with_error_code(code)
                .with_generation_id(-1)
                .with_member_id(r.member_id.clone())
                .with_protocol_name(Some(str("")))
        };
        let group_id = r.group_id.0.to_string();
        if let Err(code) = self.check_coordinator(c, &group_id).await {
            return err(code);
        }
        if let Err(code) = self.admit(&c.ns, &group_id).await {
            return err(code);
        }
        let arc = match self.group(&c.ns, &group_id).await {
            Ok(g) => g,
            Err(code) => return err(code),
        };
        let session_timeout =
            Duration::from_millis(u64::try_from(r.session_timeout_ms).unwrap_or(0));
        let join = Join {
            member_id: r.member_id.to_string(),
            instance_id: r.group_instance_id.as_ref().map(|s| s.to_string()),
            client_id: c.client.clone(),
            client_host: c.host.clone(),
            session_timeout,
            rebalance_timeout: if v >= 1 {
                Duration::from_millis(u64::try_from(r.rebalance_timeout_ms).unwrap_or(0))
            } else {
                session_timeout
            },
            protocol_type: r.protocol_type.to_string(),
            protocols: r
                .protocols
                .iter()
                .map(|p| (p.name.to_string(), p.metadata.clone()))
                .collect(),
            version: v,
            fresh_id: format!("{}-{}", c.client, uuid_like()),
        };
        let rx = {
            let mut slot = arc.lock().await;
            let (reply, fx) = slot.g.join(join, Instant::now());
            let parked = park(reply, &mut slot.joins);
            self.apply(&arc, &mut slot, fx).await;
            match parked {
                Ok(resp) => return resp,
                Err(rx) => rx,
            }
        };
        rx.await.unwrap_or_else(|_| err(E::UnknownMemberId.code()))
    }

    pub async fn sync(&self, c: &Caller, r: SyncGroupRequest) -> SyncGroupResponse {
        let err = |code: i16| SyncGroupResponse::default().with_error_code(code);
        let group_id = r.group_id.0.to_string();
        if let Err(code) = self.check_coordinator(c, &group_id).await {
            return err(code);
        }
        let arc = match self.group(&c.ns, &group_id).await {
            Ok(g) => g,
            Err(code) => return err(code),
        };
        let sync = membership::Sync {
            member_id: r.member_id.to_string(),
            instance_id: r.group_instance_id.as_ref().map(|s| s.to_string()),
            generation: r.generation_id,
            protocol_type: r.protocol_type.as_ref().map(|s| s.to_string()),
            protocol_name: r.protocol_name.as_ref().map(|s| s.to_string()),
            assignments: r
                .assignments
                .into_iter()
                .map(|a| (a.member_id.to_string(), a.assignment))
                .collect(),
        };
        let rx = {
            let mut slot = arc.lock().await;
            let (reply, fx) = slot.g.sync(sync, Instant::now());
            let parked = park(reply, &mut slot.syncs);
            self.apply(&arc, &mut slot, fx).await;
            match parked {
                Ok(resp) => return resp,
                Err(rx) => rx,
            }
        };
        rx.await
            .unwrap_or_else(|_| err(E::RebalanceInProgress.code()))
    }

    pub async fn heartbeat(&self, c: &Caller, r: HeartbeatRequest) -> HeartbeatResponse {
        let code = self.heartbeat_code(c, &r).await;
        HeartbeatResponse::default().with_error_code(code)
    }

    async fn heartbeat_code(&self, c: &Caller, r: &HeartbeatRequest) -> i16 {
        let group_id = r.group_id.0.to_string();
        if let Err(code) = self.check_coordinator(c, &group_id).await {
            return code;
        }
        let arc = match self.group(&c.ns, &group_id).await {
            Ok(g) => g,
            Err(code) => return code,
        };
        let mut slot = arc.lock().await;
        slot.g.heartbeat(
            r.member_id.as_str(),
            r.group_instance_id.as_deref(),
            r.generation_id,
            Instant::now(),
        )
    }

    pub async fn leave(&self, c: &Caller, r: LeaveGroupRequest, v: i16) -> LeaveGroupResponse {
        let group_id = r.group_id.0.to_string();
        if let Err(code) = self.check_coordinator(c, &group_id).await {
            return LeaveGroupResponse::default().with_error_code(code);
        }
        let arc = match self.group(&c.ns, &group_id).await {
            Ok(g) => g,
            Err(code) => return LeaveGroupResponse::default().with_error_code(code),
        };
        let leaving: Vec<(String, Option<String>)> = if v >= 3 {
            r.members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|s| s.to_string()),
                    )
                })
                .collect()
        } else {
            vec![(r.member_id.to_string(), None)]
        };
        let mut slot = arc.lock().await;
        let (resp, fx) = slot.g.leave(leaving, v, Instant::now());
        self.apply(&arc, &mut slot, fx).await;
        resp
    }

    async fn expire_members(&self, arc: &Arc<Mutex<Slot>>) {
        let mut slot = arc.lock().await;
        let fx = slot.g.expire(Instant::now());
        self.apply(arc, &mut slot, fx).await;
    }

    // ---- offsets ----

    fn offsets_key(ns: &NamespaceName, group: &str) -> String {
        format!("{}/offsets", group_path(ns, group))
    }

    async fn read_offsets(
        &self,
        ns: &NamespaceName,
        group: &str,
    ) -> Result<(OffsetsRecord, u64), i16> {
        match self.store.get(&Self::offsets_key(ns, group)).await {
            Ok(Some(v)) => Ok((
                serde_json::from_slice(&v.value).unwrap_or_default(),
                v.version,
            )),
            Ok(None) => Ok((OffsetsRecord::default(), 0)),
            Err(e) => Err(code_of(&e)),
        }
    }

    /// Changes the stored offsets with compare-and-set, retrying on races.
    async fn modify_offsets(
        &self,
        ns: &NamespaceName,
        group: &str,
        f: impl Fn(&mut OffsetsRecord),
    ) -> Result<(), i16> {
        self.admit(ns, group).await?;
        loop {
            let (mut rec, version) = self.read_offsets(ns, group).await?;
            f(&mut rec);
            let bytes = serde_json::to_vec(&rec).map_err(|_| E::UnknownServerError.code())?;
            match self
                .store
                .compare_and_put(&Self::offsets_key(ns, group), version, bytes)
                .await
            {
                Ok(_) => return Ok(()),
                Err(BrokerError::PreconditionFailed(_)) => continue,
                Err(e) => return Err(code_of(&e)),
            }
        }
    }

    /// Whether a commit from this member and generation is accepted.
    async fn commit_allowed(
        &self,
        c: &Caller,
        group: &str,
        member_id: &str,
        generation: i32,
    ) -> Result<(), i16> {
        self.check_coordinator(c, group).await?;
        let arc = self.group(&c.ns, group).await?;
        let mut slot = arc.lock().await;
        slot.g.commit_allowed(member_id, generation, Instant::now())
    }

    pub async fn commit(
        &self,
        ctx: &Ctx,
        c: &Caller,
        r: OffsetCommitRequest,
    ) -> OffsetCommitResponse {
        use kafka_protocol::messages::offset_commit_response::{
            OffsetCommitResponsePartition, OffsetCommitResponseTopic,
        };
        // As Kafka, a partition that does not exist gets its own error and
        // nothing is stored for it; the others commit.
        let mut missing = HashMap::new();
        for t in &r.topics {
            for p in &t.partitions {
                if let Err(code) = ctx
                    .partition_name(&c.ns, t.name.0.as_str(), p.partition_index)
                    .await
                {
                    missing.insert((t.name.0.to_string(), p.partition_index), code);
                }
            }
        }
        let missing_code = |t: &str, p: i32| missing.get(&(t.to_string(), p)).copied();
        let group = r.group_id.0.to_string();
        let allowed = self
            .commit_allowed(
                c,
                &group,
                r.member_id.as_str(),
                r.generation_id_or_member_epoch,
            )
            .await;
        let stored = match allowed {
            Ok(()) => {
                let now = now_ms();
                self.modify_offsets(&c.ns, &group, |rec| {
                    for t in &r.topics {
                        let name = t.name.0.to_string();
                        for p in &t.partitions {
                            if missing_code(&name, p.partition_index).is_some() {
                                continue;
                            }
                            rec.topics.entry(name.clone()).or_default().insert(
                                p.partition_index,
                                Committed {
                                    offset: p.committed_offset,
                                    metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                                    leader_epoch: p.committed_leader_epoch,
                                    timestamp_ms: now,
                                },
                            );
                        }
                    }
                })
                .await
            }
            Err(code) => Err(code),
        };
        let code = stored.err().unwrap_or(0);
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(
                                missing_code(t.name.0.as_str(), p.partition_index).unwrap_or(code),
                            )
                    })
                    .collect();
                OffsetCommitResponseTopic::default()
                    .with_name(t.name)
                    .with_partitions(partitions)
            })
            .collect();
        OffsetCommitResponse::default().with_topics(topics)
    }

    pub async fn fetch_offsets(
        &self,
        c: &Caller,
        r: OffsetFetchRequest,
        v: i16,
    ) -> OffsetFetchResponse {
        use kafka_protocol::messages::offset_fetch_response::*;
        // Version 8 batches groups; earlier versions ask for one.
        let asks: Vec<(String, Option<Vec<TopicAsk>>)> = if v >= 8 {
            r.groups
                .into_iter()
                .map(|g| {
                    (
                        g.group_id.0.to_string(),
                        g.topics.map(|ts| {
                            ts.into_iter()
                                .map(|t| (t.name, t.partition_indexes))
                                .collect()
                        }),
                    )
                })
                .collect()
        } else {
            vec![(
                r.group_id.0.to_string(),
                r.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name, t.partition_indexes))
                        .collect()
                }),
            )]
        };
        let mut groups = Vec::new();
        for (group, topics) in asks {
            let mut out_topics: Vec<(TopicName, Vec<FetchedOffset>)> = Vec::new();
            let result = match self.check_coordinator(c, &group).await {
                Err(code) => Err(code),
                Ok(()) => self.read_offsets(&c.ns, &group).await.map(|(rec, _)| rec),
            };
            let group_code = match result {
                Err(code) => code,
                Ok(rec) => {
                    match topics {
                        Some(ts) => {
                            for (name, parts) in ts {
                                let stored = rec.topics.get(name.0.as_str());
                                let ps = parts
                                    .into_iter()
                                    .map(|i| match stored.and_then(|s| s.get(&i)) {
                                        Some(cm) => {
                                            (i, cm.offset, cm.metadata.clone(), cm.leader_epoch, 0)
                                        }
                                        None => (i, -1, Some(String::new()), -1, 0),
                                    })
                                    .collect();
                                out_topics.push((name, ps));
                            }
                        }
                        None => {
                            for (name, parts) in &rec.topics {
                                let ps = parts
                                    .iter()
                                    .map(|(&i, cm)| {
                                        (i, cm.offset, cm.metadata.clone(), cm.leader_epoch, 0)
                                    })
                                    .collect();
                                out_topics.push((TopicName(str(name.clone())), ps));
                            }
                        }
                    }
                    0
                }
            };
            groups.push((group, group_code, out_topics));
        }
        if v >= 8 {
            let groups = groups
                .into_iter()
                .map(|(g, code, ts)| {
                    OffsetFetchResponseGroup::default()
                        .with_group_id(GroupId(str(g)))
                        .with_error_code(code)
                        .with_topics(
                            ts.into_iter()
                                .map(|(name, ps)| {
                                    OffsetFetchResponseTopics::default()
                                        .with_name(name)
                                        .with_partitions(
                                            ps.into_iter()
                                                .map(|(i, o, m, e, code)| {
                                                    OffsetFetchResponsePartitions::default()
                                                        .with_partition_index(i)
                                                        .with_committed_offset(o)
                                                        .with_metadata(m.map(str))
                                                        .with_committed_leader_epoch(e)
                                                        .with_error_code(code)
                                                })
                                                .collect(),
                                        )
                                })
                                .collect(),
                        )
                })
                .collect();
            return OffsetFetchResponse::default().with_groups(groups);
        }
        let (_, code, ts) = groups.pop().unwrap_or_default();
        let topics = ts
            .into_iter()
            .map(|(name, ps)| {
                OffsetFetchResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        ps.into_iter()
                            .map(|(i, o, m, e, pcode)| {
                                OffsetFetchResponsePartition::default()
                                    .with_partition_index(i)
                                    .with_committed_offset(o)
                                    .with_metadata(m.map(str))
                                    .with_committed_leader_epoch(e)
                                    // Before version 2 errors are per partition.
                                    .with_error_code(if v < 2 && code != 0 { code } else { pcode })
                            })
                            .collect(),
                    )
            })
            .collect();
        OffsetFetchResponse::default()
            .with_topics(topics)
            .with_error_code(code)
    }

    pub async fn delete_offsets(&self, c: &Caller, r: OffsetDeleteRequest) -> OffsetDeleteResponse {
        use kafka_protocol::messages::offset_delete_response::*;
        let group = r.group_id.0.to_string();
        let mut resp = OffsetDeleteResponse::default();
        if let Err(code) = self.check_coordinator(c, &group).await {
            return resp.with_error_code(code);
        }
        let subscribed = match self.group(&c.ns, &group).await {
            Ok(arc) => arc.lock().await.g.subscribed_topics(),
            Err(code) => return resp.with_error_code(code),
        };
        let (rec, _) = match self.read_offsets(&c.ns, &group).await {
            Ok(r) => r,
            Err(code) => return resp.with_error_code(code),
        };
        if rec.topics.is_empty() && subscribed.is_empty() {
            return resp.with_error_code(E::GroupIdNotFound.code());
        }
        let deletable: Vec<(String, Vec<i32>)> = r
            .topics
            .iter()
            .filter(|t| !subscribed.contains(t.name.0.as_str()))
            .map(|t| {
                (
                    t.name.0.to_string(),
                    t.partitions.iter().map(|p| p.partition_index).collect(),
                )
            })
            .collect();
        let code = self
            .modify_offsets(&c.ns, &group, |rec| {
                for (t, ps) in &deletable {
                    if let Some(parts) = rec.topics.get_mut(t) {
                        for p in ps {
                            parts.remove(p);
                        }
                        if parts.is_empty() {
                            rec.topics.remove(t);
                        }
                    }
                }
            })
            .await
            .err()
            .unwrap_or(0);
        resp.topics = r
            .topics
            .into_iter()
            .map(|t| {
                let pcode = if subscribed.contains(t.name.0.as_str()) {
                    E::GroupSubscribedToTopic.code()
                } else {
                    code
                };
                OffsetDeleteResponseTopic::default()
                    .with_name(t.name)
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                OffsetDeleteResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(pcode)
                            })
                            .collect(),
                    )
            })
            .collect();
        resp
    }

    // ---- transactional offsets ----

    fn txn_key(ns: &NamespaceName, group: &str, pid: i64) -> String {
        format!("{}/txn/{pid}", group_path(ns, group))
    }

    /// TxnOffsetCommit: offsets held aside until the transaction ends.
    pub async fn txn_commit(
        &self,
        c: &Caller,
        r: TxnOffsetCommitRequest,
    ) -> TxnOffsetCommitResponse {
        use kafka_protocol::messages::txn_offset_commit_response::{
            TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
        };
        let group = r.group_id.0.to_string();
        let pid = r.producer_id.0;
        let mut code = if c.grants.produce {
            self.check_coordinator(c, &group).await.err().unwrap_or(0)
        } else {
            E::TransactionalIdAuthorizationFailed.code()
        };
        if code == 0 && !r.member_id.is_empty() {
            code = self
                .commit_allowed(c, &group, r.member_id.as_str(), r.generation_id)
                .await
                .err()
                .unwrap_or(0);
        }
        if code == 0 {
            let now = now_ms();
            let key = Self::txn_key(&c.ns, &group, pid);
            code = loop {
                if let Err(code) = self.admit(&c.ns, &group).await {
                    break code;
                }
                let (mut rec, version) = match self.store.get(&key).await {
                    Ok(Some(v)) => (
                        serde_json::from_slice::<OffsetsRecord>(&v.value).unwrap_or_default(),
                        v.version,
                    ),
                    Ok(None) => (OffsetsRecord::default(), 0),
                    Err(e) => break code_of(&e),
                };
                for t in &r.topics {
                    let parts = rec.topics.entry(t.name.0.to_string()).or_default();
                    for p in &t.partitions {
                        parts.insert(
                            p.partition_index,
                            Committed {
                                offset: p.committed_offset,
                                metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                                leader_epoch: p.committed_leader_epoch,
                                timestamp_ms: now,
                            },
                        );
                    }
                }
                let Ok(bytes) = serde_json::to_vec(&rec) else {
                    break E::UnknownServerError.code();
                };
                match self.store.compare_and_put(&key, version, bytes).await {
                    Ok(_) => break 0,
                    Err(BrokerError::PreconditionFailed(_)) => continue,
                    Err(e) => break code_of(&e),
                }
            };
        }
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                TxnOffsetCommitResponseTopic::default()
                    .with_name(t.name)
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                TxnOffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        TxnOffsetCommitResponse::default().with_topics(topics)
    }

    /// At the end of a transaction: its held offsets become the group's
    /// committed offsets (commit) or are dropped (abort).
    pub async fn settle_txn_offsets(
        &self,
        ns: &NamespaceName,
        group: &str,
        pid: i64,
        commit: bool,
    ) -> Result<(), i16> {
        let key = Self::txn_key(ns, group, pid);
        let held = match self.store.get(&key).await {
            Ok(Some(v)) => serde_json::from_slice::<OffsetsRecord>(&v.value).unwrap_or_default(),
            Ok(None) => return Ok(()),
            Err(e) => return Err(code_of(&e)),
        };
        if commit {
            self.modify_offsets(ns, group, |rec| {
                for (t, parts) in &held.topics {
                    let mine = rec.topics.entry(t.clone()).or_default();
                    for (p, c) in parts {
                        mine.insert(*p, c.clone());
                    }
                }
            })
            .await?;
        }
        self.store
            .delete(&key)
            .await
            .map(drop)
            .map_err(|e| code_of(&e))
    }

    // ---- administration ----

    pub async fn describe(&self, c: &Caller, r: DescribeGroupsRequest) -> DescribeGroupsResponse {
        use kafka_protocol::messages::describe_groups_response::*;
        let mut out = Vec::new();
        for gid in r.groups {
            let mut d = DescribedGroup::default()
                .with_group_id(gid.clone())
                .with_group_state(str("Dead"));
            if let Err(code) = self.check_coordinator(c, &gid.0).await {
                out.push(d.with_error_code(code));
                continue;
            }
            match self.group(&c.ns, &gid.0).await {
                Err(code) => d.error_code = code,
                Ok(arc) => {
                    let slot = arc.lock().await;
                    let g = &slot.g;
                    if g.known() {
                        let protocol = g.protocol.clone().unwrap_or_default();
                        d.group_state = str(g.state.name());
                        d.protocol_type = str(g.protocol_type.clone().unwrap_or_default());
                        d.protocol_data = str(protocol.clone());
                        d.members = g
                            .members
                            .values()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(str(m.id.clone()))
                                    .with_group_instance_id(m.instance_id.clone().map(str))
                                    .with_client_id(str(m.client_id.clone()))
                                    .with_client_host(str(format!("/{}", m.client_host)))
                                    .with_member_metadata(m.metadata_for(&protocol))
                                    .with_member_assignment(m.assignment.clone())
                            })
                            .collect();
                    }
                }
            }
            out.push(d);
        }
        DescribeGroupsResponse::default().with_groups(out)
    }

    /// Groups this broker coordinates in the caller's namespace.
    pub async fn list(&self, c: &Caller, r: ListGroupsRequest) -> ListGroupsResponse {
        use kafka_protocol::messages::list_groups_response::ListedGroup;
        let prefix = format!("{}/", c.ns);
        let keys = match self.store.list(&prefix).await {
            Ok(kvs) => kvs,
            Err(e) => return ListGroupsResponse::default().with_error_code(code_of(&e)),
        };
        let mut ids: Vec<String> = keys
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix)?.split('/').next().map(String::from))
            .filter_map(|seg| magnetar_tenancy::names::decode_segment(&seg).ok())
            .collect();
        ids.sort();
        ids.dedup();
        let filter: Vec<String> = r.states_filter.iter().map(|s| s.to_lowercase()).collect();
        let mut groups = Vec::new();
        for id in ids {
            if self.check_coordinator(c, &id).await.is_err() {
                continue;
            }
            let Ok(arc) = self.group(&c.ns, &id).await else {
                continue;
            };
            let slot = arc.lock().await;
            let g = &slot.g;
            let state = g.state.name();
            if !filter.is_empty() && !filter.contains(&state.to_lowercase()) {
                continue;
            }
            groups.push(
                ListedGroup::default()
                    .with_group_id(GroupId(str(id.clone())))
                    .with_protocol_type(str(g
                        .protocol_type
                        .clone()
                        .unwrap_or_else(|| "consumer".into())))
                    .with_group_state(str(state))
                    .with_group_type(str("classic")),
            );
        }
        ListGroupsResponse::default().with_groups(groups)
    }

    pub async fn delete(&self, c: &Caller, r: DeleteGroupsRequest) -> DeleteGroupsResponse {
        use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
        let mut results = Vec::new();
        for gid in r.groups_names {
            let code = self.delete_one(c, &gid.0).await.err().unwrap_or(0);
            results.push(
                DeletableGroupResult::default()
                    .with_group_id(gid)
                    .with_error_code(code),
            );
        }
        DeleteGroupsResponse::default().with_results(results)
    }

    async fn delete_one(&self, c: &Caller, group: &str) -> Result<(), i16> {
        self.check_coordinator(c, group).await?;
        let ns = &c.ns;
        let arc = self.group(ns, group).await?;
        let slot = arc.lock().await;
        if !slot.g.members.is_empty() {
            return Err(E::NonEmptyGroup.code());
        }
        let path = group_path(ns, group);
        let meta = self
            .store
            .delete(&format!("{path}/meta"))
            .await
            .map_err(|e| code_of(&e))?;
        let offsets = self
            .store
            .delete(&format!("{path}/offsets"))
            .await
            .map_err(|e| code_of(&e))?;
        drop(slot);
        self.groups_lock().remove(&(ns.clone(), group.to_string()));
        if meta || offsets {
            Ok(())
        } else {
            Err(E::GroupIdNotFound.code())
        }
    }
}

/// A random member-id suffix, as Kafka's are UUIDs.
fn uuid_like() -> String {
    let a: u128 = rand::random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
