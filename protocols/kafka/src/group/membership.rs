//! The membership rules of a classic consumer group, apart from any I/O:
//! join and sync with their rebalance, heartbeats, leaving, session
//! expiry and static members. Every call takes `now` and returns what
//! the coordinator must do ([`Effects`]): answer requests it parked, write
//! the group through, arm the rebalance timer. The coordinator owns the
//! parked requests (one per member at most, by member id) and the store;
//! the rules here are tested without either.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::consumer_protocol_subscription::ConsumerProtocolSubscription;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{JoinGroupResponse, LeaveGroupResponse, SyncGroupResponse};
use kafka_protocol::protocol::Decodable;
use kafka_protocol::ResponseError as E;
use magnetar_tenancy::NamespaceName;
use serde::{Deserialize, Serialize};

use crate::handler::str;

pub(super) const MIN_SESSION_TIMEOUT: Duration = Duration::from_millis(1000);
pub(super) const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a member id handed out with MEMBER_ID_REQUIRED waits for
/// its join.
pub(super) const PENDING_MEMBER_TTL: Duration = Duration::from_secs(300);
/// The rebalance timeout of a group without members.
const DEFAULT_REBALANCE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    pub(super) fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

pub(super) struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    pub last_seen: Instant,
    /// A JoinGroup of this member is parked, waiting for the rebalance.
    joining: bool,
    /// A SyncGroup of this member is parked, waiting for the leader.
    syncing: bool,
}

impl Member {
    pub(super) fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn expired(&self, now: Instant) -> bool {
        !self.joining && now.saturating_duration_since(self.last_seen) > self.session_timeout
    }
}

pub(super) struct Group {
    pub ns: NamespaceName,
    pub id: String,
    pub state: State,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not yet joined.
    pending: HashMap<String, Instant>,
    /// Counts rebalances, so that a timer of an old one does nothing.
    round: u64,
    join_not_before: Instant,
    /// How long the first rebalance of an empty group waits for more
    /// members (`group.initial.rebalance.delay.ms`).
    initial_delay: Duration,
}

/// What is stored per group.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct GroupRecord {
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

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Bytes {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// A JoinGroup as the rules see it.
pub(super) struct Join {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// From version 4 a new member is first handed its id.
    pub version: i16,
    /// The id a new member gets: random in the coordinator, fixed in
    /// tests.
    pub fresh_id: String,
}

/// A SyncGroup as the rules see it.
#[derive(Default)]
pub(super) struct Sync {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignments: Vec<(String, Bytes)>,
}

/// A response to a request parked earlier, for the member it names.
#[derive(Debug)]
pub(super) enum Answer {
    Join(String, JoinGroupResponse),
    Sync(String, SyncGroupResponse),
}

/// When to call [`Group::rebalance_due`]: at `not_before`, and unless
/// that completed the join, with `force` at `deadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RebalanceTimer {
    pub round: u64,
    pub not_before: Instant,
    pub deadline: Instant,
}

/// What the coordinator does after a call, in this order: answer, then
/// write through, then arm the timer.
#[derive(Debug, Default)]
pub(super) struct Effects {
    pub answers: Vec<Answer>,
    /// The group may have reached a settled state: write it through
    /// ([`Group::record`] says whether there is one to write).
    pub persist: bool,
    pub timer: Option<RebalanceTimer>,
}

/// A request's outcome: a response now, or parked until an [`Answer`]
/// for this member comes (a dropped park answers the Kafka way for a
/// superseded request).
#[derive(Debug)]
pub(super) enum Reply<T> {
    Now(T),
    Wait(String),
}

/// What a rebalance timer finds.
#[derive(Debug)]
pub(super) enum TimerStep {
    /// Another rebalance began, or this one is over: the timer ends.
    Stale,
    /// Members are still to join: wait for the deadline.
    Pending,
    Done(Effects),
}

fn join_error(code: i16, member: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(code)
        .with_generation_id(-1)
        .with_member_id(str(member))
        .with_protocol_name(Some(str("")))
}

fn sync_error(code: i16) -> SyncGroupResponse {
    SyncGroupResponse::default().with_error_code(code)
}

impl Group {
    /// A group as its stored record left it (a new one without), loaded by
    /// the coordinator that takes it over.
    pub(super) fn restore(
        ns: NamespaceName,
        id: String,
        record: Option<GroupRecord>,
        initial_delay: Duration,
        now: Instant,
    ) -> Group {
        let mut g = Group {
            ns,
            id,
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            round: 0,
            join_not_before: now,
            initial_delay,
        };
        let Some(r) = record else {
            return g;
        };
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
                    // A taken-over member gets a full session to find the
                    // new coordinator.
                    last_seen: now,
                    joining: false,
                    syncing: false,
                },
            );
        }
        if !g.members.is_empty() {
            g.state = State::Stable;
        }
        g
    }

    /// The record to write through: only of a settled group (stable, or
    /// empty). A group between join and sync is not settled: its members
    /// hold a generation whose assignments do not exist yet, and a
    /// coordinator taking over must not hand them out empty, so such a
    /// group keeps its last settled record.
    pub(super) fn record(&self) -> Option<GroupRecord> {
        if !matches!(self.state, State::Stable | State::Empty) {
            return None;
        }
        Some(GroupRecord {
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            members: self
                .members
                .values()
                .map(|m| MemberRecord {
                    id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    session_timeout_ms: u64::try_from(m.session_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                    rebalance_timeout_ms: u64::try_from(m.rebalance_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                    protocol_type: m.protocol_type.clone(),
                    protocols: m
                        .protocols
                        .iter()
                        .map(|(n, d)| (n.clone(), b64(d)))
                        .collect(),
                    assignment: b64(&m.assignment),
                })
                .collect(),
        })
    }

    /// Whether the group ever had members (DescribeGroups calls one that
    /// did not Dead).
    pub(super) fn known(&self) -> bool {
        !self.members.is_empty() || self.generation > 0
    }

    // ---- join ----

    pub(super) fn join(&mut self, j: Join, now: Instant) -> (Reply<JoinGroupResponse>, Effects) {
        let mut fx = Effects::default();
        let now_reply = |code: i16, member: &str| Reply::Now(join_error(code, member));
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&j.session_timeout) {
            return (now_reply(E::InvalidSessionTimeout.code(), &j.member_id), fx);
        }
        if j.protocols.is_empty() || j.protocol_type.is_empty() {
            return (
                now_reply(E::InconsistentGroupProtocol.code(), &j.member_id),
                fx,
            );
        }
        if !self.members.is_empty() {
            let all_support = |name: &str| {
                self.members
                    .values()
                    .filter(|m| m.id != j.member_id)
                    .all(|m| m.protocols.iter().any(|(n, _)| n == name))
            };
            if self.protocol_type.as_deref() != Some(j.protocol_type.as_str())
                || !j.protocols.iter().any(|(n, _)| all_support(n))
            {
                return (
                    now_reply(E::InconsistentGroupProtocol.code(), &j.member_id),
                    fx,
                );
            }
        }
        let mut member_id = j.member_id;
        if member_id.is_empty() {
            let fresh = j.fresh_id;
            if let Some(inst) = &j.instance_id {
                // A static member coming back: it takes over its old
                // member id's place and assignment.
                let old = self
                    .members
                    .values()
                    .find(|m| m.instance_id.as_ref() == Some(inst))
                    .map(|m| m.id.clone());
                if let Some(mut m) = old.as_ref().and_then(|o| self.members.remove(o)) {
                    let old = m.id.clone();
                    if std::mem::take(&mut m.joining) {
                        fx.answers.push(Answer::Join(
                            old.clone(),
                            join_error(E::FencedInstanceId.code(), &old),
                        ));
                    }
                    if std::mem::take(&mut m.syncing) {
                        fx.answers.push(Answer::Sync(
                            old.clone(),
                            sync_error(E::FencedInstanceId.code()),
                        ));
                    }
                    let unchanged = m.protocols == j.protocols;
                    m.id = fresh.clone();
                    m.last_seen = now;
                    m.protocols = j.protocols.clone();
                    m.session_timeout = j.session_timeout;
                    m.rebalance_timeout = j.rebalance_timeout;
                    if self.leader.as_deref() == Some(old.as_str()) {
                        self.leader = Some(fresh.clone());
                    }
                    self.members.insert(fresh.clone(), m);
                    if self.state == State::Stable && unchanged {
                        fx.persist = true;
                        return (Reply::Now(self.join_response(&fresh, false)), fx);
                    }
                }
            } else if j.version >= 4 {
                self.pending.insert(fresh.clone(), now);
                return (now_reply(E::MemberIdRequired.code(), &fresh), fx);
            }
            member_id = fresh;
        } else {
            let known =
                self.members.contains_key(&member_id) || self.pending.contains_key(&member_id);
            if !known {
                return (now_reply(E::UnknownMemberId.code(), &member_id), fx);
            }
            if let (Some(inst), Some(m)) = (&j.instance_id, self.members.get(&member_id)) {
                if m.instance_id.as_ref() != Some(inst) {
                    return (now_reply(E::FencedInstanceId.code(), &member_id), fx);
                }
            }
        }
        self.pending.remove(&member_id);
        let existing = self
            .members
            .get(&member_id)
            .map(|m| m.protocols == j.protocols);
        let member = self
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                id: member_id.clone(),
                instance_id: j.instance_id.clone(),
                client_id: j.client_id.clone(),
                client_host: j.client_host.clone(),
                session_timeout: j.session_timeout,
                rebalance_timeout: j.rebalance_timeout,
                protocol_type: j.protocol_type.clone(),
                protocols: Vec::new(),
                assignment: Bytes::new(),
                last_seen: now,
                joining: false,
                syncing: false,
            });
        member.protocols = j.protocols;
        member.session_timeout = j.session_timeout;
        member.rebalance_timeout = j.rebalance_timeout;
        member.last_seen = now;
        // A repeated join replaces the earlier one, whose caller then
        // hears UNKNOWN_MEMBER_ID, as a superseded request.
        member.joining = true;
        self.protocol_type = Some(j.protocol_type);
        let is_leader = self.leader.as_deref() == Some(member_id.as_str());
        match self.state {
            State::Stable if existing == Some(true) && !is_leader => {
                // Nothing changed for a follower: tell it the current
                // generation, as Kafka does.
                if let Some(m) = self.members.get_mut(&member_id) {
                    m.joining = false;
                }
                return (Reply::Now(self.join_response(&member_id, false)), fx);
            }
            State::PreparingRebalance => {}
            _ => self.prepare_rebalance(now, &mut fx),
        }
        self.complete_join(false, now, &mut fx);
        (Reply::Wait(member_id), fx)
    }

    fn join_response(&self, member_id: &str, with_members: bool) -> JoinGroupResponse {
        let protocol = self.protocol.clone().unwrap_or_default();
        let members = if with_members {
            self.members
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
            .with_generation_id(self.generation)
            .with_protocol_type(self.protocol_type.clone().map(str))
            .with_protocol_name(Some(str(protocol)))
            .with_leader(str(self.leader.clone().unwrap_or_default()))
            .with_member_id(str(member_id))
            .with_members(members)
    }

    fn prepare_rebalance(&mut self, now: Instant, fx: &mut Effects) {
        let initial = self.state == State::Empty;
        self.state = State::PreparingRebalance;
        self.round += 1;
        for m in self.members.values_mut() {
            if std::mem::take(&mut m.syncing) {
                fx.answers.push(Answer::Sync(
                    m.id.clone(),
                    sync_error(E::RebalanceInProgress.code()),
                ));
            }
        }
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(DEFAULT_REBALANCE_TIMEOUT);
        self.join_not_before = if initial {
            now + self.initial_delay.min(timeout)
        } else {
            now
        };
        fx.timer = Some(RebalanceTimer {
            round: self.round,
            not_before: self.join_not_before,
            deadline: now + timeout,
        });
    }

    /// Completes the join phase once every member has joined and the
    /// initial delay passed, or at once with `force` (the rebalance
    /// timeout: members that did not join are dropped). True if it did.
    fn complete_join(&mut self, force: bool, now: Instant, fx: &mut Effects) -> bool {
        if self.state != State::PreparingRebalance {
            return false;
        }
        let all_joined = self.members.values().all(|m| m.joining);
        if !force && (!all_joined || now < self.join_not_before) {
            return false;
        }
        self.members.retain(|_, m| m.joining);
        self.generation += 1;
        fx.persist = true;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.leader = None;
            self.protocol = None;
            return true;
        }
        // The first protocol of the leader's list that every member speaks.
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.clone().unwrap_or_default();
        let candidates: Vec<String> = self
            .members
            .get(&leader)
            .map(|m| m.protocols.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        self.protocol = candidates.into_iter().find(|p| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == p))
        });
        self.state = State::CompletingRebalance;
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
            m.last_seen = now;
            m.joining = false;
        }
        for id in self.members.keys() {
            fx.answers.push(Answer::Join(
                id.clone(),
                self.join_response(id, *id == leader),
            ));
        }
        true
    }

    /// The rebalance timer of `round` fired: at its first time, or with
    /// `force` at the rebalance timeout.
    pub(super) fn rebalance_due(&mut self, round: u64, force: bool, now: Instant) -> TimerStep {
        if self.round != round || self.state != State::PreparingRebalance {
            return TimerStep::Stale;
        }
        let mut fx = Effects::default();
        if self.complete_join(force, now, &mut fx) {
            TimerStep::Done(fx)
        } else {
            TimerStep::Pending
        }
    }

    // ---- sync ----

    pub(super) fn sync(&mut self, s: Sync, now: Instant) -> (Reply<SyncGroupResponse>, Effects) {
        let mut fx = Effects::default();
        let Some(m) = self.members.get_mut(&s.member_id) else {
            return (Reply::Now(sync_error(E::UnknownMemberId.code())), fx);
        };
        if s.instance_id.is_some() && m.instance_id != s.instance_id {
            return (Reply::Now(sync_error(E::FencedInstanceId.code())), fx);
        }
        m.last_seen = now;
        if s.generation != self.generation {
            return (Reply::Now(sync_error(E::IllegalGeneration.code())), fx);
        }
        if s.protocol_type
            .as_ref()
            .is_some_and(|t| Some(t) != self.protocol_type.as_ref())
            || s.protocol_name
                .as_ref()
                .is_some_and(|p| Some(p) != self.protocol.as_ref())
        {
            return (
                Reply::Now(sync_error(E::InconsistentGroupProtocol.code())),
                fx,
            );
        }
        match self.state {
            State::Empty | State::PreparingRebalance => {
                return (Reply::Now(sync_error(E::RebalanceInProgress.code())), fx)
            }
            State::Stable => return (Reply::Now(self.assigned(&s.member_id)), fx),
            State::CompletingRebalance => {}
        }
        if self.leader.as_deref() != Some(s.member_id.as_str()) {
            if let Some(m) = self.members.get_mut(&s.member_id) {
                m.syncing = true;
            }
            return (Reply::Wait(s.member_id), fx);
        }
        let assignments: HashMap<String, Bytes> = s.assignments.into_iter().collect();
        self.state = State::Stable;
        for m in self.members.values_mut() {
            m.assignment = assignments.get(&m.id).cloned().unwrap_or_default();
        }
        let waiting: Vec<String> = self
            .members
            .values_mut()
            .filter_map(|m| std::mem::take(&mut m.syncing).then(|| m.id.clone()))
            .collect();
        for id in waiting {
            let answer = self.assigned(&id);
            fx.answers.push(Answer::Sync(id, answer));
        }
        fx.persist = true;
        (Reply::Now(self.assigned(&s.member_id)), fx)
    }

    fn assigned(&self, member_id: &str) -> SyncGroupResponse {
        SyncGroupResponse::default()
            .with_protocol_type(self.protocol_type.clone().map(str))
            .with_protocol_name(self.protocol.clone().map(str))
            .with_assignment(
                self.members
                    .get(member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default(),
            )
    }

    // ---- heartbeats, commits, leaving, expiry ----

    /// A heartbeat's error code (0: carry on).
    pub(super) fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: Instant,
    ) -> i16 {
        let Some(m) = self.members.get_mut(member_id) else {
            return E::UnknownMemberId.code();
        };
        if instance_id.is_some() && m.instance_id.as_deref() != instance_id {
            return E::FencedInstanceId.code();
        }
        m.last_seen = now;
        if generation != self.generation {
            return E::IllegalGeneration.code();
        }
        match self.state {
            State::PreparingRebalance => E::RebalanceInProgress.code(),
            _ => 0,
        }
    }

    /// Whether an OffsetCommit from this member and generation is
    /// accepted (it counts as a sign of life).
    pub(super) fn commit_allowed(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), i16> {
        if generation < 0 && member_id.is_empty() {
            // A consumer outside any group (assign(), not subscribe()).
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(E::UnknownMemberId.code())
            };
        }
        let (current, state) = (self.generation, self.state);
        let Some(m) = self.members.get_mut(member_id) else {
            return Err(E::UnknownMemberId.code());
        };
        m.last_seen = now;
        if generation != current {
            return Err(E::IllegalGeneration.code());
        }
        if state == State::CompletingRebalance {
            return Err(E::RebalanceInProgress.code());
        }
        Ok(())
    }

    /// A LeaveGroup of `leaving` (member id, instance id); before version
    /// 3, one member and a single error code.
    pub(super) fn leave(
        &mut self,
        leaving: Vec<(String, Option<String>)>,
        version: i16,
        now: Instant,
    ) -> (LeaveGroupResponse, Effects) {
        let mut fx = Effects::default();
        let mut results = Vec::new();
        let mut removed = Vec::new();
        for (mid, inst) in leaving {
            // Static members may leave by instance id alone.
            let id = match (&inst, mid.is_empty()) {
                (Some(i), true) => self
                    .members
                    .values()
                    .find(|m| m.instance_id.as_ref() == Some(i))
                    .map(|m| m.id.clone()),
                _ => Some(mid.clone()),
            };
            let code = match id.as_ref().and_then(|id| self.members.get(id)) {
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
        if version < 3 && results.iter().any(|m| m.error_code != 0) {
            let resp = LeaveGroupResponse::default().with_error_code(E::UnknownMemberId.code());
            return (resp, fx);
        }
        if !removed.is_empty() {
            self.remove_members(&removed, now, &mut fx);
        }
        let resp = LeaveGroupResponse::default().with_members(if version >= 3 {
            results
        } else {
            Vec::new()
        });
        (resp, fx)
    }

    fn remove_members(&mut self, ids: &[String], now: Instant, fx: &mut Effects) {
        for id in ids {
            if let Some(m) = self.members.remove(id) {
                if m.joining {
                    fx.answers.push(Answer::Join(
                        id.clone(),
                        JoinGroupResponse::default().with_error_code(E::UnknownMemberId.code()),
                    ));
                }
                if m.syncing {
                    fx.answers.push(Answer::Sync(
                        id.clone(),
                        sync_error(E::UnknownMemberId.code()),
                    ));
                }
            }
        }
        if self
            .leader
            .as_ref()
            .is_some_and(|l| !self.members.contains_key(l))
        {
            self.leader = None;
        }
        if self.members.is_empty() {
            self.state = State::Empty;
            self.generation += 1;
            self.round += 1;
            self.protocol = None;
            fx.persist = true;
            return;
        }
        if self.state != State::PreparingRebalance {
            self.prepare_rebalance(now, fx);
        }
        self.complete_join(false, now, fx);
    }

    /// Drops members whose session ran out and member ids handed out
    /// long ago but never joined.
    pub(super) fn expire(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.pending
            .retain(|_, at| now.saturating_duration_since(*at) < PENDING_MEMBER_TTL);
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.expired(now))
            .map(|m| m.id.clone())
            .collect();
        if !expired.is_empty() {
            tracing::debug!(group = %self.id, ?expired, "member sessions expired");
            self.remove_members(&expired, now, &mut fx);
        }
        fx
    }

    /// Topics the group's consumers subscribe to, from their metadata.
    pub(super) fn subscribed_topics(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        if self.protocol_type.as_deref() != Some("consumer") {
            return out;
        }
        let protocol = self.protocol.clone().unwrap_or_default();
        for m in self.members.values() {
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
}

#[cfg(test)]
mod tests;
