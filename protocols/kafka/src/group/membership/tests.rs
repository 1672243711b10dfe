//! The membership rules, call by call, with `now` given.

use super::*;

const SESSION: Duration = Duration::from_secs(10);
const REBALANCE: Duration = Duration::from_secs(30);

fn code(r: &Reply<JoinGroupResponse>) -> i16 {
    match r {
        Reply::Now(resp) => resp.error_code,
        Reply::Wait(_) => panic!("parked, not answered"),
    }
}

fn sync_code(r: &Reply<SyncGroupResponse>) -> i16 {
    match r {
        Reply::Now(resp) => resp.error_code,
        Reply::Wait(_) => panic!("parked, not answered"),
    }
}

fn group(delay: Duration, now: Instant) -> Group {
    let ns = NamespaceName::new("t", "n").expect("a valid name");
    Group::restore(ns, "g".into(), None, delay, now)
}

fn join(member: &str, fresh: &str) -> Join {
    Join {
        member_id: member.into(),
        instance_id: None,
        client_id: "c".into(),
        client_host: "h".into(),
        session_timeout: SESSION,
        rebalance_timeout: REBALANCE,
        protocol_type: "consumer".into(),
        protocols: vec![("range".into(), Bytes::from_static(b"r"))],
        version: 5,
        fresh_id: fresh.into(),
    }
}

fn with_protocols(mut j: Join, names: &[&str]) -> Join {
    j.protocols = names
        .iter()
        .map(|n| ((*n).to_string(), Bytes::from(n.as_bytes().to_vec())))
        .collect();
    j
}

fn static_join(member: &str, fresh: &str, instance: &str) -> Join {
    let mut j = join(member, fresh);
    j.instance_id = Some(instance.into());
    j
}

/// The join responses among `fx`'s answers, by member id.
fn joins(fx: &Effects) -> BTreeMap<String, &JoinGroupResponse> {
    fx.answers
        .iter()
        .filter_map(|a| match a {
            Answer::Join(id, r) => Some((id.clone(), r)),
            Answer::Sync(..) => None,
        })
        .collect()
}

fn syncs(fx: &Effects) -> BTreeMap<String, &SyncGroupResponse> {
    fx.answers
        .iter()
        .filter_map(|a| match a {
            Answer::Sync(id, r) => Some((id.clone(), r)),
            Answer::Join(..) => None,
        })
        .collect()
}

fn sync(member: &str, generation: i32, assignments: &[(&str, &'static [u8])]) -> Sync {
    Sync {
        member_id: member.into(),
        generation,
        assignments: assignments
            .iter()
            .map(|(m, a)| ((*m).to_string(), Bytes::from_static(a)))
            .collect(),
        ..Sync::default()
    }
}

/// A group without initial delay whose only member `a` has joined
/// and synced: Stable at generation 1.
fn stable_with_a(now: Instant) -> Group {
    let mut g = group(Duration::ZERO, now);
    let (r, fx) = g.join(join("", "a"), now);
    assert_eq!(code(&r), E::MemberIdRequired.code());
    assert!(fx.answers.is_empty());
    let (r, fx) = g.join(join("a", "x"), now);
    assert!(matches!(r, Reply::Wait(ref m) if m == "a"));
    assert_eq!(joins(&fx)["a"].generation_id, 1);
    let (r, _) = g.sync(sync("a", 1, &[("a", b"A")]), now);
    assert_eq!(sync_code(&r), 0);
    assert_eq!(g.state, State::Stable);
    g
}

/// `stable_with_a`, then `b` joins and both rejoin: CompletingRebalance
/// at generation 2, `a` leading.
fn completing_with_a_and_b(now: Instant) -> Group {
    let mut g = stable_with_a(now);
    let (r, _) = g.join(join("", "b"), now);
    assert_eq!(code(&r), E::MemberIdRequired.code());
    let (r, fx) = g.join(join("b", "x"), now);
    assert!(matches!(r, Reply::Wait(_)));
    assert!(fx.timer.is_some(), "a rebalance began");
    assert_eq!(g.state, State::PreparingRebalance);
    let (r, fx) = g.join(join("a", "x"), now);
    assert!(matches!(r, Reply::Wait(_)));
    let answered = joins(&fx);
    assert_eq!(answered.len(), 2);
    assert_eq!(g.state, State::CompletingRebalance);
    assert_eq!(g.generation, 2);
    g
}

#[test]
fn a_new_member_from_version_4_is_first_handed_its_id() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    let (r, _) = g.join(join("", "fresh"), now);
    let Reply::Now(resp) = r else {
        panic!("answered at once")
    };
    assert_eq!(resp.error_code, E::MemberIdRequired.code());
    assert_eq!(resp.member_id.as_str(), "fresh");
    assert!(
        g.members.is_empty(),
        "not a member before it joins with the id"
    );
}

#[test]
fn before_version_4_a_new_member_joins_at_once() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    let mut j = join("", "fresh");
    j.version = 3;
    let (r, fx) = g.join(j, now);
    assert!(matches!(r, Reply::Wait(ref m) if m == "fresh"));
    assert_eq!(joins(&fx)["fresh"].leader.as_str(), "fresh");
}

#[test]
fn an_unknown_member_id_is_refused() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    let (r, _) = g.join(join("nobody", "x"), now);
    assert_eq!(code(&r), E::UnknownMemberId.code());
}

#[test]
fn session_timeouts_outside_the_brokers_range_are_refused() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    for t in [
        Duration::from_millis(999),
        MAX_SESSION_TIMEOUT + Duration::from_millis(1),
    ] {
        let mut j = join("", "x");
        j.session_timeout = t;
        assert_eq!(code(&g.join(j, now).0), E::InvalidSessionTimeout.code());
    }
}

#[test]
fn a_join_without_protocols_or_type_is_inconsistent() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    let j = with_protocols(join("", "x"), &[]);
    assert_eq!(code(&g.join(j, now).0), E::InconsistentGroupProtocol.code());
    let mut j = join("", "x");
    j.protocol_type = String::new();
    assert_eq!(code(&g.join(j, now).0), E::InconsistentGroupProtocol.code());
}

#[test]
fn another_protocol_type_than_the_groups_is_inconsistent() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let mut j = join("", "b");
    j.protocol_type = "connect".into();
    assert_eq!(code(&g.join(j, now).0), E::InconsistentGroupProtocol.code());
}

#[test]
fn a_member_sharing_no_protocol_with_the_group_is_inconsistent() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let j = with_protocols(join("", "b"), &["roundrobin"]);
    assert_eq!(code(&g.join(j, now).0), E::InconsistentGroupProtocol.code());
}

#[test]
fn the_first_rebalance_waits_for_the_initial_delay() {
    let now = Instant::now();
    let delay = Duration::from_secs(3);
    let mut g = group(delay, now);
    g.join(join("", "a"), now);
    let (r, fx) = g.join(join("a", "x"), now);
    assert!(matches!(r, Reply::Wait(_)));
    assert!(fx.answers.is_empty(), "not before the delay");
    let timer = fx.timer.expect("a timer");
    assert_eq!(timer.not_before, now + delay);
    assert_eq!(timer.deadline, now + REBALANCE);
    let TimerStep::Done(fx) = g.rebalance_due(timer.round, false, now + delay) else {
        panic!("the join completes at the delay")
    };
    assert_eq!(joins(&fx)["a"].generation_id, 1);
    assert!(fx.persist);
}

#[test]
fn the_initial_delay_is_at_most_the_rebalance_timeout() {
    let now = Instant::now();
    let mut g = group(Duration::from_secs(600), now);
    g.join(join("", "a"), now);
    let timer = g.join(join("a", "x"), now).1.timer.expect("a timer");
    assert_eq!(timer.not_before, now + REBALANCE);
}

#[test]
fn the_leader_hears_every_member_and_followers_none() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    g.join(join("b", "x"), now);
    let (_, fx) = g.join(join("a", "x"), now);
    let answered = joins(&fx);
    assert_eq!(answered["a"].leader.as_str(), "a");
    assert_eq!(answered["a"].members.len(), 2);
    assert!(answered["b"].members.is_empty());
    assert_eq!(answered["b"].leader.as_str(), "a");
    assert_eq!(answered["b"].protocol_name.as_deref(), Some("range"));
}

#[test]
fn the_protocol_is_the_leaders_first_that_every_member_speaks() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(with_protocols(join("", "a"), &["sticky", "range"]), now);
    g.join(with_protocols(join("a", "x"), &["sticky", "range"]), now);
    g.sync(sync("a", 1, &[]), now);
    g.join(with_protocols(join("", "b"), &["range"]), now);
    g.join(with_protocols(join("b", "x"), &["range"]), now);
    g.join(with_protocols(join("a", "x"), &["sticky", "range"]), now);
    assert_eq!(g.protocol.as_deref(), Some("range"));
    assert_eq!(g.leader.as_deref(), Some("a"));
}

#[test]
fn a_rebalance_is_pending_until_every_member_rejoined() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    let (_, fx) = g.join(join("b", "x"), now);
    let timer = fx.timer.expect("a timer");
    assert!(matches!(
        g.rebalance_due(timer.round, false, now),
        TimerStep::Pending
    ));
}

#[test]
fn at_the_rebalance_timeout_members_that_did_not_rejoin_are_dropped() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    let (_, fx) = g.join(join("b", "x"), now);
    let timer = fx.timer.expect("a timer");
    let TimerStep::Done(fx) = g.rebalance_due(timer.round, true, timer.deadline) else {
        panic!("forced")
    };
    assert_eq!(g.members.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(joins(&fx)["b"].leader.as_str(), "b", "a new leader");
    assert_eq!(g.generation, 2);
}

#[test]
fn a_timer_of_an_earlier_rebalance_does_nothing() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    let (_, fx) = g.join(join("b", "x"), now);
    let old = fx.timer.expect("a timer").round;
    g.join(join("a", "x"), now);
    assert!(matches!(g.rebalance_due(old, true, now), TimerStep::Stale));
    assert_eq!(g.state, State::CompletingRebalance);
}

#[test]
fn the_leaders_sync_hands_every_member_its_assignment() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    let (r, fx) = g.sync(sync("b", 2, &[]), now);
    assert!(matches!(r, Reply::Wait(ref m) if m == "b"));
    assert!(fx.answers.is_empty());
    let (r, fx) = g.sync(sync("a", 2, &[("a", b"A"), ("b", b"B")]), now);
    let Reply::Now(resp) = r else {
        panic!("the leader is answered at once")
    };
    assert_eq!(&resp.assignment[..], b"A");
    assert_eq!(&syncs(&fx)["b"].assignment[..], b"B");
    assert!(fx.persist);
    assert_eq!(g.state, State::Stable);
}

#[test]
fn a_member_the_leader_left_out_gets_an_empty_assignment() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("b", 2, &[]), now);
    let (_, fx) = g.sync(sync("a", 2, &[("a", b"A")]), now);
    assert!(syncs(&fx)["b"].assignment.is_empty());
}

#[test]
fn a_sync_of_another_generation_is_illegal() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    assert_eq!(
        sync_code(&g.sync(sync("b", 1, &[]), now).0),
        E::IllegalGeneration.code()
    );
}

#[test]
fn a_sync_of_an_unknown_member_is_refused() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    assert_eq!(
        sync_code(&g.sync(sync("z", 2, &[]), now).0),
        E::UnknownMemberId.code()
    );
}

#[test]
fn a_sync_while_members_join_hears_rebalance_in_progress() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    g.join(join("b", "x"), now);
    assert_eq!(
        sync_code(&g.sync(sync("a", 1, &[]), now).0),
        E::RebalanceInProgress.code()
    );
}

#[test]
fn a_sync_of_a_stable_group_is_answered_with_the_assignment() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let Reply::Now(resp) = g.sync(sync("a", 1, &[]), now).0 else {
        panic!("answered at once")
    };
    assert_eq!(&resp.assignment[..], b"A");
    assert_eq!(resp.protocol_type.as_deref(), Some("consumer"));
}

#[test]
fn a_sync_naming_another_protocol_is_inconsistent() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let mut s = sync("a", 1, &[]);
    s.protocol_name = Some("roundrobin".into());
    assert_eq!(
        sync_code(&g.sync(s, now).0),
        E::InconsistentGroupProtocol.code()
    );
}

#[test]
fn heartbeats_of_a_stable_group_are_fine() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(g.heartbeat("a", None, 1, now), 0);
}

#[test]
fn heartbeats_during_a_rebalance_ask_members_to_rejoin() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    g.join(join("b", "x"), now);
    assert_eq!(
        g.heartbeat("a", None, 1, now),
        E::RebalanceInProgress.code()
    );
}

#[test]
fn heartbeats_of_another_generation_or_member_are_refused() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(g.heartbeat("a", None, 0, now), E::IllegalGeneration.code());
    assert_eq!(g.heartbeat("z", None, 1, now), E::UnknownMemberId.code());
}

#[test]
fn a_heartbeat_naming_another_instance_is_fenced() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(
        g.heartbeat("a", Some("i"), 1, now),
        E::FencedInstanceId.code()
    );
}

#[test]
fn a_follower_rejoining_unchanged_hears_the_current_generation_at_once() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("a", 2, &[("a", b"A"), ("b", b"B")]), now);
    let (r, fx) = g.join(join("b", "x"), now);
    let Reply::Now(resp) = r else {
        panic!("answered at once")
    };
    assert_eq!(resp.generation_id, 2);
    assert!(fx.timer.is_none(), "no rebalance");
    assert_eq!(g.state, State::Stable);
}

#[test]
fn the_leader_rejoining_starts_a_rebalance() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let (r, fx) = g.join(join("a", "x"), now);
    assert!(matches!(r, Reply::Wait(_)));
    assert_eq!(joins(&fx)["a"].generation_id, 2);
}

#[test]
fn a_member_changing_its_protocols_starts_a_rebalance() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("a", 2, &[]), now);
    let (r, fx) = g.join(with_protocols(join("b", "x"), &["range", "sticky"]), now);
    assert!(matches!(r, Reply::Wait(_)));
    assert!(fx.timer.is_some());
    assert_eq!(g.state, State::PreparingRebalance);
}

#[test]
fn a_rebalance_answers_parked_syncs_with_rebalance_in_progress() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("b", 2, &[]), now);
    g.join(join("", "c"), now);
    let (_, fx) = g.join(join("c", "x"), now);
    assert_eq!(syncs(&fx)["b"].error_code, E::RebalanceInProgress.code());
}

#[test]
fn a_join_repeated_while_joining_counts_once() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    g.join(join("b", "x"), now);
    g.join(join("b", "x"), now);
    let (_, fx) = g.join(join("a", "x"), now);
    assert_eq!(joins(&fx).len(), 2);
    assert_eq!(g.members.len(), 2);
}

#[test]
fn leaving_by_member_id_removes_the_member_and_rebalances() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("a", 2, &[]), now);
    let (resp, fx) = g.leave(vec![("b".into(), None)], 3, now);
    assert_eq!(resp.members[0].error_code, 0);
    assert!(!g.members.contains_key("b"));
    assert!(fx.timer.is_some());
}

#[test]
fn a_static_member_may_leave_by_instance_id_alone() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(static_join("", "a", "i1"), now);
    assert!(g.members.contains_key("a"));
    let (resp, _) = g.leave(vec![(String::new(), Some("i1".into()))], 3, now);
    assert_eq!(resp.members[0].error_code, 0);
    assert!(g.members.is_empty());
}

#[test]
fn leaving_as_an_unknown_member_is_an_error_per_member_from_version_3() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let (resp, _) = g.leave(vec![("z".into(), None), ("a".into(), None)], 3, now);
    assert_eq!(resp.error_code, 0);
    assert_eq!(resp.members[0].error_code, E::UnknownMemberId.code());
    assert_eq!(resp.members[1].error_code, 0);
    assert!(g.members.is_empty());
}

#[test]
fn leaving_as_an_unknown_member_before_version_3_is_one_error() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let (resp, _) = g.leave(vec![("z".into(), None)], 2, now);
    assert_eq!(resp.error_code, E::UnknownMemberId.code());
    assert!(resp.members.is_empty());
    assert!(g.members.contains_key("a"));
}

#[test]
fn leaving_with_another_instance_id_is_fenced() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(static_join("", "a", "i1"), now);
    let (resp, _) = g.leave(vec![("a".into(), Some("i2".into()))], 3, now);
    assert_eq!(resp.members[0].error_code, E::FencedInstanceId.code());
}

#[test]
fn the_last_member_leaving_empties_the_group_into_a_new_generation() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let (_, fx) = g.leave(vec![("a".into(), None)], 3, now);
    assert!(fx.persist);
    assert_eq!(g.state, State::Empty);
    assert_eq!(g.generation, 2);
    assert!(g.protocol.is_none());
    assert!(g.known(), "a group that had members is not Dead");
    let record = g.record().expect("an empty group is settled");
    assert!(record.members.is_empty());
}

#[test]
fn a_leaving_member_s_parked_requests_hear_unknown_member() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("b", 2, &[]), now);
    let (_, fx) = g.leave(vec![("b".into(), None)], 3, now);
    assert_eq!(syncs(&fx)["b"].error_code, E::UnknownMemberId.code());
}

#[test]
fn sessions_expire_after_their_timeout_without_heartbeats() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    let fx = g.expire(now + SESSION);
    assert!(g.members.contains_key("a"), "not yet");
    assert!(!fx.persist);
    let fx = g.expire(now + SESSION + Duration::from_millis(1));
    assert!(g.members.is_empty());
    assert!(fx.persist);
}

#[test]
fn heartbeats_keep_a_session_alive() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(g.heartbeat("a", None, 1, now + Duration::from_secs(8)), 0);
    g.expire(now + Duration::from_secs(15));
    assert!(g.members.contains_key("a"));
}

#[test]
fn a_member_waiting_in_join_does_not_expire() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    g.join(join("", "b"), now);
    g.join(join("b", "x"), now);
    g.expire(now + SESSION * 2);
    assert!(g.members.contains_key("b"));
    assert!(!g.members.contains_key("a"));
}

#[test]
fn a_handed_out_member_id_lapses_unless_used() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(join("", "p"), now);
    g.expire(now + PENDING_MEMBER_TTL);
    assert_eq!(
        code(&g.join(join("p", "x"), now + PENDING_MEMBER_TTL).0),
        E::UnknownMemberId.code()
    );
}

#[test]
fn a_handed_out_member_id_joins_within_its_time() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(join("", "p"), now);
    g.expire(now + Duration::from_secs(10));
    assert!(matches!(g.join(join("p", "x"), now).0, Reply::Wait(_)));
}

#[test]
fn a_static_member_coming_back_unchanged_keeps_its_place_without_a_rebalance() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(static_join("", "a", "i1"), now);
    g.sync(sync("a", 1, &[("a", b"A")]), now);
    let (r, fx) = g.join(static_join("", "a2", "i1"), now);
    let Reply::Now(resp) = r else {
        panic!("answered at once")
    };
    assert_eq!(resp.member_id.as_str(), "a2");
    assert_eq!(resp.generation_id, 1);
    assert!(fx.persist);
    assert_eq!(g.leader.as_deref(), Some("a2"), "it led and leads");
    assert_eq!(&g.members["a2"].assignment[..], b"A");
    assert!(!g.members.contains_key("a"));
}

#[test]
fn a_static_member_coming_back_fences_its_old_ids_parked_join() {
    let now = Instant::now();
    let mut g = group(Duration::from_secs(3), now);
    g.join(static_join("", "a", "i1"), now);
    let (_, fx) = g.join(static_join("", "a2", "i1"), now);
    assert_eq!(joins(&fx)["a"].error_code, E::FencedInstanceId.code());
    assert!(g.members.contains_key("a2"));
}

#[test]
fn a_join_with_a_member_id_of_another_instance_is_fenced() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(static_join("", "a", "i1"), now);
    assert_eq!(
        code(&g.join(static_join("a", "x", "i2"), now).0),
        E::FencedInstanceId.code()
    );
}

#[test]
fn a_sync_naming_another_instance_is_fenced() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    g.join(static_join("", "a", "i1"), now);
    let mut s = sync("a", 1, &[]);
    s.instance_id = Some("i2".into());
    assert_eq!(sync_code(&g.sync(s, now).0), E::FencedInstanceId.code());
}

#[test]
fn commits_outside_a_group_are_allowed_only_while_it_has_no_members() {
    let now = Instant::now();
    let mut g = group(Duration::ZERO, now);
    assert_eq!(g.commit_allowed("", -1, now), Ok(()));
    let mut g = stable_with_a(now);
    assert_eq!(
        g.commit_allowed("", -1, now),
        Err(E::UnknownMemberId.code())
    );
}

#[test]
fn commits_need_a_member_of_the_current_generation() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(g.commit_allowed("a", 1, now), Ok(()));
    assert_eq!(
        g.commit_allowed("a", 0, now),
        Err(E::IllegalGeneration.code())
    );
    assert_eq!(
        g.commit_allowed("z", 1, now),
        Err(E::UnknownMemberId.code())
    );
}

#[test]
fn commits_between_join_and_sync_wait_for_the_assignment() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    assert_eq!(
        g.commit_allowed("a", 2, now),
        Err(E::RebalanceInProgress.code())
    );
}

#[test]
fn a_commit_counts_as_a_sign_of_life() {
    let now = Instant::now();
    let mut g = stable_with_a(now);
    assert_eq!(
        g.commit_allowed("a", 1, now + Duration::from_secs(8)),
        Ok(())
    );
    g.expire(now + Duration::from_secs(15));
    assert!(g.members.contains_key("a"));
}

#[test]
fn a_group_between_join_and_sync_is_not_written_through() {
    let now = Instant::now();
    let g = completing_with_a_and_b(now);
    assert!(g.record().is_none());
}

#[test]
fn a_stored_group_comes_back_stable_with_its_members_and_assignments() {
    let now = Instant::now();
    let mut g = completing_with_a_and_b(now);
    g.sync(sync("a", 2, &[("a", b"A"), ("b", b"B")]), now);
    let bytes = serde_json::to_vec(&g.record().expect("settled")).expect("encodes");
    let record: GroupRecord = serde_json::from_slice(&bytes).expect("decodes");
    let later = now + Duration::from_secs(60);
    let mut back = Group::restore(
        g.ns.clone(),
        "g".into(),
        Some(record),
        Duration::ZERO,
        later,
    );
    assert_eq!(back.state, State::Stable);
    assert_eq!(back.generation, 2);
    assert_eq!(back.leader.as_deref(), Some("a"));
    assert_eq!(&back.members["b"].assignment[..], b"B");
    assert_eq!(back.members["b"].session_timeout, SESSION);
    // Members carry on with their generation, and get a full session.
    assert_eq!(back.heartbeat("b", None, 2, later), 0);
    back.expire(later + SESSION);
    assert_eq!(back.members.len(), 2);
}

#[test]
fn a_group_that_never_had_members_is_unknown() {
    let now = Instant::now();
    let g = group(Duration::ZERO, now);
    assert!(!g.known());
    assert_eq!(g.state.name(), "Empty");
}

#[test]
fn subscribed_topics_come_from_the_consumers_metadata() {
    use kafka_protocol::protocol::{Encodable, StrBytes};
    let now = Instant::now();
    let mut meta = bytes::BytesMut::new();
    bytes::BufMut::put_i16(&mut meta, 1);
    ConsumerProtocolSubscription::default()
        .with_topics(vec![StrBytes::from_static_str("orders")])
        .encode(&mut meta, 1)
        .expect("encodes");
    let mut g = group(Duration::ZERO, now);
    let mut j = join("", "a");
    j.version = 3;
    j.protocols = vec![("range".into(), meta.freeze())];
    g.join(j, now);
    assert_eq!(g.subscribed_topics(), HashSet::from(["orders".to_string()]));
    g.protocol_type = Some("connect".into());
    assert!(g.subscribed_topics().is_empty(), "only consumer groups");
}
