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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Decodable;
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

const MIN_SESSION_TIMEOUT: Duration = Duration::from_millis(1000);
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a member id handed out with MEMBER_ID_REQUIRED waits for
/// its join.
const PENDING_MEMBER_TTL: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_seen: Instant,
    join_waiter: Option<oneshot::Sender<JoinGroupResponse>>,
    sync_waiter: Option<oneshot::Sender<SyncGroupResponse>>,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn expired(&self, now: Instant) -> bool {
        self.join_waiter.is_none() && now.duration_since(self.last_seen) > self.session_timeout
    }
}

struct Group {
    ns: NamespaceName,
    id: String,
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not yet joined.
    pending: HashMap<String, Instant>,
    /// Counts rebalances, so that a timer of an old one does nothing.
    round: u64,
    join_not_before: Instant,
    join_deadline: Instant,
}

/// What is stored per group.
#[derive(Debug, Default, Serialize, Deserialize)]
struct GroupRecord {
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: Vec<MemberRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MemberRecord {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout_ms: u64,
    rebalance_timeout_ms: u64,
    protocol_type: String,
    protocols: Vec<(String, String)>,
    assignment: String,
}

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

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Bytes {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(Bytes::from)
        .unwrap_or_default()
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
    groups: std::sync::Mutex<HashMap<GroupKey, Arc<Mutex<Group>>>>,
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

impl GroupCoordinator {
    pub fn new(broker: Broker, cfg: KafkaConfig) -> Self {
        let store = broker.state("kafka-groups");
        broker.add_retention_hold(Arc::new(OffsetHolds {
            store: store.clone(),
            retention: cfg.offsets_retention,
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

    fn groups_lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Arc<Mutex<Group>>>> {
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
                    let mut g = g.lock().await;
                    this.expire_members(&mut g).await;
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

    async fn group(&self, ns: &NamespaceName, id: &str) -> Result<Arc<Mutex<Group>>, i16> {
        let key = (ns.clone(), id.to_string());
        if let Some(g) = self.groups_lock().get(&key) {
            return Ok(Arc::clone(g));
        }
        let record = self.load_record(ns, id).await?;
        let now = Instant::now();
        let mut g = Group {
            ns: ns.clone(),
            id: id.to_string(),
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            round: 0,
            join_not_before: now,
            join_deadline: now,
        };
        if let Some(r) = record {
            g.generation = r.generation;
            g.protocol_type = r.protocol_type;
            g.protocol = r.protocol;
            g.leader = r.leader;
            for m in r.members {
                g.members.insert(
                    m.id.clone(),
                    Member {
                        id: m.id,
                        instance_id: m.instance_id,
                        client_id: m.client_id,
                        client_host: m.client_host,
                        session_timeout: Duration::from_millis(m.session_timeout_ms),
                        rebalance_timeout: Duration::from_millis(m.rebalance_timeout_ms),
                        protocol_type: m.protocol_type,
                        protocols: m
                            .protocols
                            .into_iter()
                            .map(|(n, d)| (n, unb64(&d)))
                            .collect(),
                        assignment: unb64(&m.assignment),
                        // A taken-over member gets a full session to find
                        // the new coordinator.
                        last_seen: now,
                        join_waiter: None,
                        sync_waiter: None,
                    },
                );
            }
            if !g.members.is_empty() {
                g.state = State::Stable;
            }
        }
        let arc = Arc::new(Mutex::new(g));
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

    /// Writes the group's membership through, at settled states.
    async fn persist(&self, g: &Group) {
        store_settled(&self.store, g).await;
    }

    // ---- membership ----

    pub async fn join(&self, c: &Caller, r: JoinGroupRequest, v: i16) -> JoinGroupResponse {
        let err = |code: i16, member: &str| {
            JoinGroupResponse::default()
                .with_error_code(code)
                .with_generation_id(-1)
                .with_member_id(str(member))
                .with_protocol_name(Some(str("")))
        };
        let group_id = r.group_id.0.to_string();
        let member_id = r.member_id.to_string();
        if let Err(code) = self.check_coordinator(c, &group_id).await {
            return err(code, &member_id);
        }
        if let Err(code) = self.admit(&c.ns, &group_id).await {
            return err(code, &member_id);
        }
        let session_timeout = Duration::from_millis(r.session_timeout_ms.max(0) as u64);
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&session_timeout) {
            return err(E::InvalidSessionTimeout.code(), &member_id);
        }
        let rebalance_timeout = if v >= 1 {
            Duration::from_millis(r.rebalance_timeout_ms.max(0) as u64)
        } else {
            session_timeout
        };
        let protocols: Vec<(String, Bytes)> = r
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        let protocol_type = r.protocol_type.to_string();
        if protocols.is_empty() || protocol_type.is_empty() {
            return err(E::InconsistentGroupProtocol.code(), &member_id);
        }
        let instance_id = r.group_instance_id.as_ref().map(|s| s.to_string());
        let arc = match self.group(&c.ns, &group_id).await {
            Ok(g) => g,
            Err(code) => return err(code, &member_id),
        };
        let rx = {
            let mut g = arc.lock().await;
            if !g.members.is_empty() {
                if g.protocol_type.as_deref() != Some(protocol_type.as_str()) {
                    return err(E::InconsistentGroupProtocol.code(), &member_id);
                }
                let all_support = |name: &str| {
                    g.members
                        .values()
                        .filter(|m| m.id != member_id)
                        .all(|m| m.protocols.iter().any(|(n, _)| n == name))
                };
                if !protocols.iter().any(|(n, _)| all_support(n)) {
                    return err(E::InconsistentGroupProtocol.code(), &member_id);
                }
            }
            let now = Instant::now();
            let mut member_id = member_id;
            if member_id.is_empty() {
                let fresh = format!("{}-{}", c.client, uuid_like());
                if let Some(inst) = &instance_id {
                    // A static member coming back: it takes over its old
                    // member id's place and assignment.
                    let old = g
                        .members
                        .values()
                        .find(|m| m.instance_id.as_ref() == Some(inst))
                        .map(|m| m.id.clone());
                    if let Some(old) = old {
                        if let Some(mut m) = g.members.remove(&old) {
                            if let Some(w) = m.join_waiter.take() {
                                let _ = w.send(err(E::FencedInstanceId.code(), &old));
                            }
                            if let Some(w) = m.sync_waiter.take() {
                                let _ = w.send(
                                    SyncGroupResponse::default()
                                        .with_error_code(E::FencedInstanceId.code()),
                                );
                            }
                            let unchanged = m.protocols == protocols;
                            m.id = fresh.clone();
                            m.last_seen = now;
                            m.protocols = protocols.clone();
                            m.session_timeout = session_timeout;
                            m.rebalance_timeout = rebalance_timeout;
                            if g.leader.as_deref() == Some(old.as_str()) {
                                g.leader = Some(fresh.clone());
                            }
                            g.members.insert(fresh.clone(), m);
                            if g.state == State::Stable && unchanged {
                                let resp = self.join_response(&g, &fresh, false);
                                self.persist(&g).await;
                                return resp;
                            }
                        }
                    }
                } else if v >= 4 {
                    g.pending.insert(fresh.clone(), now);
                    return err(E::MemberIdRequired.code(), &fresh);
                }
                member_id = fresh;
            } else {
                let known =
                    g.members.contains_key(&member_id) || g.pending.contains_key(&member_id);
                if !known {
                    return err(E::UnknownMemberId.code(), &member_id);
                }
                if let (Some(inst), Some(m)) = (&instance_id, g.members.get(&member_id)) {
                    if m.instance_id.as_ref() != Some(inst) {
                        return err(E::FencedInstanceId.code(), &member_id);
                    }
                }
            }
            g.pending.remove(&member_id);
            let (tx, rx) = oneshot::channel();
            let existing = g.members.get(&member_id).map(|m| m.protocols == protocols);
            let member = g
                .members
                .entry(member_id.clone())
                .or_insert_with(|| Member {
                    id: member_id.clone(),
                    instance_id: instance_id.clone(),
                    client_id: c.client.clone(),
                    client_host: c.host.clone(),
                    session_timeout,
                    rebalance_timeout,
                    protocol_type: protocol_type.clone(),
                    protocols: protocols.clone(),
                    assignment: Bytes::new(),
                    last_seen: now,
                    join_waiter: None,
                    sync_waiter: None,
                });
            member.protocols = protocols;
            member.session_timeout = session_timeout;
            member.rebalance_timeout = rebalance_timeout;
            member.last_seen = now;
            // A repeated join replaces the earlier one, whose caller then
            // hears UNKNOWN_MEMBER_ID, as a superseded request.
            member.join_waiter = Some(tx);
            g.protocol_type = Some(protocol_type);
            let is_leader = g.leader.as_deref() == Some(member_id.as_str());
            match g.state {
                State::Stable if existing == Some(true) && !is_leader => {
                    // Nothing changed for a follower: tell it the current
                    // generation, as Kafka does.
                    let resp = self.join_response(&g, &member_id, false);
                    if let Some(m) = g.members.get_mut(&member_id) {
                        m.join_waiter = None;
                    }
                    return resp;
                }
                State::PreparingRebalance => {}
                _ => self.prepare_rebalance(&arc, &mut g),
            }
            self.try_complete_join(&mut g, false).await;
            rx
        };
        rx.await
            .unwrap_or_else(|_| err(E::UnknownMemberId.code(), &r.member_id))
    }

    fn join_response(&self, g: &Group, member_id: &str, with_members: bool) -> JoinGroupResponse {
        let protocol = g.protocol.clone().unwrap_or_default();
        let members = if with_members {
            g.members
                .values()
                .map(|m| {
                    JoinGroupResponseMember::default()
                        .with_member_id(str(m.id.clone()))
                        .with_group_instance_id(m.instance_id.clone().map(str))
                        .with_metadata(m.metadata_for(&protocol))
                })
                .collect()
        } else {
            Vec::new()
        };
        JoinGroupResponse::default()
            .with_generation_id(g.generation)
            .with_protocol_type(g.protocol_type.clone().map(str))
            .with_protocol_name(Some(str(protocol)))
            .with_leader(str(g.leader.clone().unwrap_or_default()))
            .with_member_id(str(member_id))
            .with_members(members)
    }

    fn prepare_rebalance(&self, arc: &Arc<Mutex<Group>>, g: &mut Group) {
        let initial = g.state == State::Empty;
        g.state = State::PreparingRebalance;
        g.round += 1;
        for m in g.members.values_mut() {
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(
                    SyncGroupResponse::default().with_error_code(E::RebalanceInProgress.code()),
                );
            }
        }
        let now = Instant::now();
        let timeout = g
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60));
        g.join_deadline = now + timeout;
        g.join_not_before = if initial {
            now + self.cfg.group_initial_rebalance_delay.min(timeout)
        } else {
            now
        };
        let round = g.round;
        let (not_before, deadline) = (g.join_not_before, g.join_deadline);
        let weak = Arc::downgrade(arc);
        let store = self.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(not_before.into()).await;
            for force in [false, true] {
                let Some(arc) = weak.upgrade() else { return };
                {
                    let mut g = arc.lock().await;
                    if g.round != round || g.state != State::PreparingRebalance {
                        return;
                    }
                    if complete_join_if_ready(&mut g, force) {
                        store_settled(&store, &g).await;
                        return;
                    }
                }
                drop(arc);
                tokio::time::sleep_until(deadline.into()).await;
            }
        });
    }

    async fn try_complete_join(&self, g: &mut Group, force: bool) {
        if complete_join_if_ready(g, force) {
            self.persist(g).await;
        }
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
        let member_id = r.member_id.to_string();
        let rx = {
            let mut g = arc.lock().await;
            let Some(m) = g.members.get_mut(&member_id) else {
                return err(E::UnknownMemberId.code());
            };
            if r.group_instance_id.is_some()
                && m.instance_id.as_deref() != r.group_instance_id.as_deref()
            {
                return err(E::FencedInstanceId.code());
            }
            m.last_seen = Instant::now();
            if r.generation_id != g.generation {
                return err(E::IllegalGeneration.code());
            }
            if r.protocol_type
                .as_ref()
                .is_some_and(|t| Some(t.to_string()) != g.protocol_type)
                || r.protocol_name
                    .as_ref()
                    .is_some_and(|p| Some(p.to_string()) != g.protocol)
            {
                return err(E::InconsistentGroupProtocol.code());
            }
            let ok = |g: &Group, a: Bytes| {
                SyncGroupResponse::default()
                    .with_protocol_type(g.protocol_type.clone().map(str))
                    .with_protocol_name(g.protocol.clone().map(str))
                    .with_assignment(a)
            };
            match g.state {
                State::Empty | State::PreparingRebalance => {
                    return err(E::RebalanceInProgress.code())
                }
                State::Stable => {
                    let a = g.members.get(&member_id).map(|m| m.assignment.clone());
                    return ok(&g, a.unwrap_or_default());
                }
                State::CompletingRebalance => {}
            }
            if g.leader.as_deref() == Some(member_id.as_str()) {
                let assignments: HashMap<String, Bytes> = r
                    .assignments
                    .into_iter()
                    .map(|a| (a.member_id.to_string(), a.assignment))
                    .collect();
                g.state = State::Stable;
                let resp_of = |g: &Group, a: &Bytes| ok(g, a.clone());
                let mut answers = Vec::new();
                for m in g.members.values_mut() {
                    m.assignment = assignments.get(&m.id).cloned().unwrap_or_default();
                    if let Some(w) = m.sync_waiter.take() {
                        answers.push((w, m.assignment.clone()));
                    }
                }
                for (w, a) in answers {
                    let _ = w.send(resp_of(&g, &a));
                }
                self.persist(&g).await;
                let a = g.members.get(&member_id).map(|m| m.assignment.clone());
                return ok(&g, a.unwrap_or_default());
            }
            let (tx, rx) = oneshot::channel();
            if let Some(m) = g.members.get_mut(&member_id) {
                m.sync_waiter = Some(tx);
            }
            rx
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
        let mut g = arc.lock().await;
        let generation = g.generation;
        let state = g.state;
        let Some(m) = g.members.get_mut(r.member_id.as_str()) else {
            return E::UnknownMemberId.code();
        };
        if r.group_instance_id.is_some()
            && m.instance_id.as_deref() != r.group_instance_id.as_deref()
        {
            return E::FencedInstanceId.code();
        }
        m.last_seen = Instant::now();
        if r.generation_id != generation {
            return E::IllegalGeneration.code();
        }
        match state {
            State::PreparingRebalance => E::RebalanceInProgress.code(),
            _ => 0,
        }
    }

    pub async fn leave(&self, c: &Caller, r: LeaveGroupRequest, v: i16) -> LeaveGroupResponse {
        use kafka_protocol::messages::leave_group_response::MemberResponse;
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
        let mut g = arc.lock().await;
        let mut results = Vec::new();
        let mut removed = Vec::new();
        for (mid, inst) in leaving {
            // Static members may leave by instance id alone.
            let id = match (&inst, mid.is_empty()) {
                (Some(i), true) => g
                    .members
                    .values()
                    .find(|m| m.instance_id.as_ref() == Some(i))
                    .map(|m| m.id.clone()),
                _ => Some(mid.clone()),
            };
            let code = match id.as_ref().and_then(|id| g.members.get(id)) {
                None => E::UnknownMemberId.code(),
                Some(m) if inst.is_some() && m.instance_id != inst => E::FencedInstanceId.code(),
                Some(_) => {
                    removed.extend(id.clone());
                    0
                }
            };
            results.push(
                MemberResponse::default()
                    .with_member_id(str(mid))
                    .with_group_instance_id(inst.map(str))
                    .with_error_code(code),
            );
        }
        if v < 3 && results.iter().any(|m| m.error_code != 0) {
            return LeaveGroupResponse::default().with_error_code(E::UnknownMemberId.code());
        }
        if !removed.is_empty() {
            self.remove_members(&arc, &mut g, &removed).await;
        }
        LeaveGroupResponse::default().with_members(if v >= 3 { results } else { Vec::new() })
    }

    async fn remove_members(&self, arc: &Arc<Mutex<Group>>, g: &mut Group, ids: &[String]) {
        for id in ids {
            if let Some(mut m) = g.members.remove(id) {
                if let Some(w) = m.join_waiter.take() {
                    let _ = w.send(
                        JoinGroupResponse::default().with_error_code(E::UnknownMemberId.code()),
                    );
                }
                if let Some(w) = m.sync_waiter.take() {
                    let _ = w.send(
                        SyncGroupResponse::default().with_error_code(E::UnknownMemberId.code()),
                    );
                }
            }
        }
        if g.leader
            .as_ref()
            .is_some_and(|l| !g.members.contains_key(l))
        {
            g.leader = None;
        }
        if g.members.is_empty() {
            g.state = State::Empty;
            g.generation += 1;
            g.round += 1;
            g.protocol = None;
            self.persist(g).await;
        } else if g.state == State::PreparingRebalance {
            self.try_complete_join(g, false).await;
        } else {
            self.prepare_rebalance(arc, g);
            self.try_complete_join(g, false).await;
        }
    }

    async fn expire_members(&self, g: &mut Group) {
        let now = Instant::now();
        g.pending
            .retain(|_, at| now.duration_since(*at) < PENDING_MEMBER_TTL);
        let expired: Vec<String> = g
            .members
            .values()
            .filter(|m| m.expired(now))
            .map(|m| m.id.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        debug!(group = %g.id, ?expired, "member sessions expired");
        let key = (g.ns.clone(), g.id.clone());
        let arc = self.groups_lock().get(&key).cloned();
        if let Some(arc) = arc {
            self.remove_members(&arc, g, &expired).await;
        }
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
        let mut g = arc.lock().await;
        if generation < 0 && member_id.is_empty() {
            // A consumer outside any group (assign(), not subscribe()).
            return if g.members.is_empty() {
                Ok(())
            } else {
                Err(E::UnknownMemberId.code())
            };
        }
        let g_generation = g.generation;
        let state = g.state;
        let Some(m) = g.members.get_mut(member_id) else {
            return Err(E::UnknownMemberId.code());
        };
        m.last_seen = Instant::now();
        if generation != g_generation {
            return Err(E::IllegalGeneration.code());
        }
        if state == State::CompletingRebalance {
            return Err(E::RebalanceInProgress.code());
        }
        Ok(())
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
            Ok(arc) => subscribed_topics(&*arc.lock().await),
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
                    let g = arc.lock().await;
                    let known = !g.members.is_empty() || g.generation > 0;
                    if known {
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
            let g = arc.lock().await;
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
        let g = arc.lock().await;
        if !g.members.is_empty() {
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
        drop(g);
        self.groups_lock().remove(&(ns.clone(), group.to_string()));
        if meta || offsets {
            Ok(())
        } else {
            Err(E::GroupIdNotFound.code())
        }
    }
}

/// Completes the join phase when every member has rejoined (and any
/// initial delay is over), or, with `force`, at the rebalance deadline,
/// dropping members that did not rejoin. Returns whether it completed.
fn complete_join_if_ready(g: &mut Group, force: bool) -> bool {
    if g.state != State::PreparingRebalance {
        return false;
    }
    let all_joined = g.members.values().all(|m| m.join_waiter.is_some());
    if !force && (!all_joined || Instant::now() < g.join_not_before) {
        return false;
    }
    g.members.retain(|_, m| m.join_waiter.is_some());
    g.generation += 1;
    if g.members.is_empty() {
        g.state = State::Empty;
        g.leader = None;
        g.protocol = None;
        return true;
    }
    // The first protocol of the leader's list that every member speaks.
    if g.leader.as_ref().is_none_or(|l| !g.members.contains_key(l)) {
        g.leader = g.members.keys().next().cloned();
    }
    let leader = g.leader.clone().unwrap_or_default();
    let candidates: Vec<String> = g
        .members
        .get(&leader)
        .map(|m| m.protocols.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    g.protocol = candidates.into_iter().find(|p| {
        g.members
            .values()
            .all(|m| m.protocols.iter().any(|(n, _)| n == p))
    });
    g.state = State::CompletingRebalance;
    let protocol = g.protocol.clone().unwrap_or_default();
    let all: Vec<JoinGroupResponseMember> = g
        .members
        .values()
        .map(|m| {
            JoinGroupResponseMember::default()
                .with_member_id(str(m.id.clone()))
                .with_group_instance_id(m.instance_id.clone().map(str))
                .with_metadata(m.metadata_for(&protocol))
        })
        .collect();
    let base = JoinGroupResponse::default()
        .with_generation_id(g.generation)
        .with_protocol_type(g.protocol_type.clone().map(str))
        .with_protocol_name(Some(str(protocol)))
        .with_leader(str(leader.clone()));
    for m in g.members.values_mut() {
        m.assignment = Bytes::new();
        m.last_seen = Instant::now();
        if let Some(w) = m.join_waiter.take() {
            let mut resp = base.clone().with_member_id(str(m.id.clone()));
            if m.id == leader {
                resp.members = all.clone();
            }
            let _ = w.send(resp);
        }
    }
    true
}

/// Writes a settled group (stable, or empty) to the store. A group
/// between join and sync is not settled: its members hold a generation
/// whose assignments do not exist yet, and a coordinator taking over must
/// not hand them out empty, so such a group keeps its last settled record.
async fn store_settled(store: &StateStore, g: &Group) {
    if !matches!(g.state, State::Stable | State::Empty) {
        return;
    }
    let record = GroupRecord {
        generation: g.generation,
        protocol_type: g.protocol_type.clone(),
        protocol: g.protocol.clone(),
        leader: g.leader.clone(),
        members: g
            .members
            .values()
            .map(|m| MemberRecord {
                id: m.id.clone(),
                instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                session_timeout_ms: m.session_timeout.as_millis() as u64,
                rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                protocol_type: m.protocol_type.clone(),
                protocols: m
                    .protocols
                    .iter()
                    .map(|(n, d)| (n.clone(), b64(d)))
                    .collect(),
                assignment: b64(&m.assignment),
            })
            .collect(),
    };
    let key = format!("{}/meta", group_path(&g.ns, &g.id));
    if let Ok(bytes) = serde_json::to_vec(&record) {
        if let Err(e) = store.put(&key, bytes).await {
            tracing::warn!("group {}: state not stored: {e}", g.id);
        }
    }
}

/// Topics the group's consumers subscribe to, from their metadata.
fn subscribed_topics(g: &Group) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    if g.protocol_type.as_deref() != Some("consumer") {
        return out;
    }
    let protocol = g.protocol.clone().unwrap_or_default();
    for m in g.members.values() {
        let mut meta = m.metadata_for(&protocol);
        if meta.len() < 2 {
            continue;
        }
        let version = i16::from_be_bytes([meta[0], meta[1]]);
        let _ = bytes::Buf::get_i16(&mut meta);
        if let Ok(s) = ConsumerProtocolSubscription::decode(&mut meta, version.clamp(0, 3)) {
            out.extend(s.topics.iter().map(|t| t.to_string()));
        }
    }
    out
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
