//! The rules, verdict by verdict.

use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use magnetar_broker::{BrokerError, Grants};
use magnetar_tenancy::names::NamespaceName;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, ConnectAckReason as Reason, RetainHandling};

use super::connect::{self, KeepAlive, Resume};
use super::inbound::{self, AliasesIn, Receiving};
use super::subscriptions::{self, plan, Plan, Sub, Verdict};
use crate::error::MqttError;
use crate::topic;

fn ns(s: &str) -> NamespaceName {
    s.parse().expect("a valid namespace")
}

fn sub(filter: &str, qos: u8) -> Sub {
    Sub {
        filter: filter.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        id: None,
    }
}

fn will(topic: &str) -> v5::LastWill {
    v5::LastWill {
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        message: Bytes::from_static(b"bye"),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    }
}

fn publish(topic: &str, alias: Option<u16>) -> Publish {
    Publish {
        dup: false,
        retain: false,
        qos: QoS::AtLeastOnce,
        topic: topic.into(),
        packet_id: NonZeroU16::new(1),
        payload: Bytes::new(),
        properties: Some(v5::PublishProperties {
            topic_alias: alias.and_then(NonZeroU16::new),
            ..Default::default()
        }),
    }
}

fn auth(method: Option<&str>, reason: v5::AuthReasonCode) -> v5::Auth {
    v5::Auth {
        reason_code: reason,
        auth_method: method.map(ByteString::from),
        auth_data: None,
        reason_string: None,
        user_properties: Vec::new(),
    }
}

// ---- CONNECT ----

#[test]
fn only_the_token_method_of_enhanced_authentication_is_known() {
    assert_eq!(connect::auth_method(None), Ok(()));
    assert_eq!(connect::auth_method(Some("token")), Ok(()));
    assert_eq!(
        connect::auth_method(Some("SCRAM-SHA-256")),
        Err(Reason::BadAuthenticationMethod)
    );
}

#[test]
fn the_password_carries_the_token_and_the_upgrades_token_stands_in() {
    let mut c = v5::Connect {
        password: Some(Bytes::from_static(b"pw")),
        ..Default::default()
    };
    assert_eq!(connect::secret(&c, Some("up")), Some(&b"pw"[..]));
    c.password = None;
    assert_eq!(connect::secret(&c, Some("up")), Some(&b"up"[..]));
    assert_eq!(connect::secret(&c, None), None);
}

#[test]
fn with_an_authentication_method_its_data_is_the_secret() {
    let c = v5::Connect {
        auth_method: Some("token".into()),
        auth_data: Some(Bytes::from_static(b"jwt")),
        password: Some(Bytes::from_static(b"pw")),
        ..Default::default()
    };
    assert_eq!(connect::secret(&c, Some("up")), Some(&b"jwt"[..]));
}

#[test]
fn failed_authentication_with_nothing_presented_is_not_authorized() {
    assert_eq!(connect::auth_refusal(false, false), Reason::NotAuthorized);
    assert_eq!(
        connect::auth_refusal(true, false),
        Reason::BadUserNameOrPassword
    );
    assert_eq!(
        connect::auth_refusal(false, true),
        Reason::BadUserNameOrPassword
    );
}

#[test]
fn a_user_name_with_a_slash_names_the_namespace() {
    let default = ns("public/default");
    assert_eq!(
        connect::namespace(Some("acme/iot"), None, &default),
        Ok((ns("acme/iot"), true))
    );
    assert_eq!(
        connect::namespace(Some("a/b/c"), None, &default),
        Err(Reason::BadUserNameOrPassword)
    );
}

#[test]
fn without_one_the_upgrades_namespace_or_the_default_holds() {
    let default = ns("public/default");
    let path = ns("acme/ws");
    assert_eq!(
        connect::namespace(Some("alice"), Some(&path), &default),
        Ok((path.clone(), true))
    );
    assert_eq!(
        connect::namespace(None, None, &default),
        Ok((default.clone(), false))
    );
}

#[test]
fn a_role_needs_some_grant_in_the_namespace() {
    let none = Grants {
        produce: false,
        consume: false,
        admin: false,
    };
    assert_eq!(connect::grants(Ok(none), false), Err(Reason::NotAuthorized));
    assert_eq!(connect::grants(Ok(Grants::ALL), false), Ok(Grants::ALL));
}

#[test]
fn a_will_needs_the_produce_grant() {
    let consume_only = Grants {
        produce: false,
        consume: true,
        admin: false,
    };
    assert_eq!(connect::grants(Ok(consume_only), false), Ok(consume_only));
    assert_eq!(
        connect::grants(Ok(consume_only), true),
        Err(Reason::NotAuthorized)
    );
}

#[test]
fn a_missing_namespace_is_a_bad_user_name_and_a_store_error_unavailable() {
    let missing = BrokerError::NotFound("acme/nope".into());
    assert_eq!(
        connect::grants(Err(&missing), false),
        Err(Reason::BadUserNameOrPassword)
    );
    let failed = BrokerError::InvalidArgument("store".into());
    assert_eq!(
        connect::grants(Err(&failed), false),
        Err(Reason::ServerUnavailable)
    );
}

#[test]
fn a_sent_client_id_is_kept() {
    assert_eq!(
        connect::client_id("dev-1", false, false, 7),
        Ok(("dev-1".into(), false))
    );
}

#[test]
fn an_empty_client_id_is_assigned() {
    assert_eq!(
        connect::client_id("", true, false, 0xab),
        Ok(("magnetar-00000000000000ab".into(), true))
    );
    assert_eq!(
        connect::client_id("", false, true, 1),
        Ok(("magnetar-0000000000000001".into(), true))
    );
}

#[test]
fn a_311_client_without_id_needs_a_clean_session() {
    assert_eq!(
        connect::client_id("", false, false, 1),
        Err(Reason::ClientIdentifierNotValid)
    );
}

#[test]
fn a_will_needs_a_valid_topic_name() {
    assert_eq!(connect::will(None), Ok(()));
    assert_eq!(connect::will(Some(&will("dev/1/status"))), Ok(()));
    assert_eq!(
        connect::will(Some(&will("dev/+/status"))),
        Err(Reason::TopicNameInvalid)
    );
    assert_eq!(
        connect::will(Some(&will(""))),
        Err(Reason::TopicNameInvalid)
    );
}

#[test]
fn the_keep_alive_asked_for_holds_without_a_maximum() {
    for asked in [0, 30, u16::MAX] {
        assert_eq!(
            connect::keep_alive(asked, u16::MAX, false),
            Ok(KeepAlive {
                secs: asked,
                server: None
            })
        );
    }
}

#[test]
fn a_v5_client_over_the_maximum_is_told_the_servers_keep_alive() {
    let told = Ok(KeepAlive {
        secs: 60,
        server: Some(60),
    });
    assert_eq!(connect::keep_alive(120, 60, true), told);
    assert_eq!(
        connect::keep_alive(0, 60, true),
        told,
        "none is over it too"
    );
    assert_eq!(
        connect::keep_alive(30, 60, true),
        Ok(KeepAlive {
            secs: 30,
            server: None
        })
    );
}

#[test]
fn a_311_client_over_the_maximum_is_refused() {
    assert_eq!(
        connect::keep_alive(120, 60, false),
        Err(Reason::ClientIdentifierNotValid)
    );
    assert_eq!(
        connect::keep_alive(0, 60, false),
        Err(Reason::ClientIdentifierNotValid)
    );
}

#[test]
fn a_connection_may_be_silent_one_and_a_half_keep_alives() {
    let ka = |secs| KeepAlive { secs, server: None };
    assert_eq!(ka(10).idle_limit(), Some(Duration::from_secs(15)));
    assert_eq!(ka(0).idle_limit(), None);
}

#[test]
fn a_clean_start_discards_a_stored_session() {
    assert_eq!(
        connect::resume(true, Some(vec![sub("a", 1)]), true),
        Resume {
            present: false,
            subs: Vec::new(),
            discard: true
        }
    );
    assert!(!connect::resume(true, None, true).discard);
}

#[test]
fn a_stored_session_resumes_with_its_subscriptions() {
    let r = connect::resume(false, Some(vec![sub("a", 1)]), true);
    assert!(r.present);
    assert_eq!(r.subs, vec![sub("a", 1)]);
    assert!(!connect::resume(false, None, true).present);
}

#[test]
fn a_role_that_lost_its_consume_grant_resumes_without_subscriptions() {
    let r = connect::resume(false, Some(vec![sub("a", 1)]), false);
    assert!(r.present);
    assert!(r.subs.is_empty());
}

// ---- after CONNECT ----

#[test]
fn an_alias_with_a_topic_sets_it_and_one_without_uses_it() {
    let mut aliases = AliasesIn::new(10);
    let mut p = publish("a/b", Some(3));
    aliases.resolve(&mut p).expect("set");
    assert_eq!(p.topic, "a/b");
    assert!(p
        .properties
        .as_ref()
        .is_some_and(|pr| pr.topic_alias.is_none()));
    let mut p = publish("", Some(3));
    aliases.resolve(&mut p).expect("used");
    assert_eq!(p.topic, "a/b");
}

#[test]
fn an_alias_may_be_set_again() {
    let mut aliases = AliasesIn::new(10);
    aliases.resolve(&mut publish("a", Some(1))).expect("set");
    aliases
        .resolve(&mut publish("b", Some(1)))
        .expect("set again");
    let mut p = publish("", Some(1));
    aliases.resolve(&mut p).expect("used");
    assert_eq!(p.topic, "b");
}

#[test]
fn an_unset_alias_or_one_over_the_maximum_is_an_error() {
    let mut aliases = AliasesIn::new(2);
    assert!(matches!(
        aliases.resolve(&mut publish("", Some(1))),
        Err(MqttError::TopicAlias(_))
    ));
    assert!(matches!(
        aliases.resolve(&mut publish("a", Some(3))),
        Err(MqttError::TopicAlias(_))
    ));
    let mut p = publish("a", None);
    aliases.resolve(&mut p).expect("no alias");
    assert_eq!(p.topic, "a");
}

#[test]
fn a_v5_client_over_the_receive_maximum_is_disconnected() {
    let mut r = Receiving::new(2, true);
    r.start().expect("1");
    r.start().expect("2");
    assert!(matches!(r.start(), Err(MqttError::ReceiveMaximum)));
}

#[test]
fn acknowledged_publishes_free_the_receive_maximum() {
    let mut r = Receiving::new(1, true);
    r.start().expect("1");
    r.finish();
    r.start().expect("room again");
    r.finish();
    r.finish();
    r.start()
        .expect("finishing more than started does not go negative");
    assert!(r.start().is_err());
}

#[test]
fn a_311_client_is_slowed_down_rather_than_refused() {
    let mut r = Receiving::new(1, false);
    for _ in 0..5 {
        r.start().expect("never refused");
    }
    assert!(r.has_room(0));
    assert!(!r.has_room(1), "no more is read while a store is out");
}

#[test]
fn disconnect_may_change_a_session_expiry_but_not_set_one_after_zero() {
    assert_eq!(inbound::disconnect_expiry(60, None).ok(), Some(60));
    assert_eq!(inbound::disconnect_expiry(60, Some(0)).ok(), Some(0));
    assert_eq!(inbound::disconnect_expiry(60, Some(600)).ok(), Some(600));
    assert_eq!(inbound::disconnect_expiry(0, Some(0)).ok(), Some(0));
    assert!(matches!(
        inbound::disconnect_expiry(0, Some(60)),
        Err(MqttError::Protocol(_))
    ));
}

#[test]
fn reauthentication_keeps_connects_method() {
    let method = ByteString::from("token");
    let ok = auth(Some("token"), v5::AuthReasonCode::ReAuth);
    assert_eq!(
        inbound::reauth(Some(&method), &ok).ok(),
        Some(method.clone())
    );
    for bad in [
        auth(Some("other"), v5::AuthReasonCode::ReAuth),
        auth(None, v5::AuthReasonCode::ReAuth),
        auth(Some("token"), v5::AuthReasonCode::ContinueAuth),
    ] {
        assert!(inbound::reauth(Some(&method), &bad).is_err());
    }
    assert!(inbound::reauth(None, &ok).is_err(), "no method on CONNECT");
}

// ---- subscriptions ----

#[test]
fn a_session_has_a_queue_per_qos_class_and_shares_their_groups() {
    assert_eq!(sub("a/#", 0).queue("dev"), "mqtt-subscription-devqos0");
    assert_eq!(sub("a/#", 1).queue("dev"), "mqtt-subscription-devqos1");
    assert_eq!(sub("a/#", 2).queue("dev"), "mqtt-subscription-devqos1");
    let shared = sub("$share/g1/a/+", 0);
    assert_eq!(shared.queue("dev"), "mqtt-share-g1");
    assert_eq!(shared.pattern(), "a/+");
}

#[test]
fn queue_names_escape_the_client_id() {
    assert_eq!(
        subscriptions::session_queue("a/b", 1),
        "mqtt-subscription-a%2Fbqos1"
    );
}

#[test]
fn filters_are_checked_before_grants() {
    assert_eq!(
        subscriptions::verdict("a/#/b", false, false).ok(),
        Some(Verdict::Invalid)
    );
    assert_eq!(
        subscriptions::verdict("a/#", false, false).ok(),
        Some(Verdict::NotAuthorized)
    );
    assert_eq!(
        subscriptions::verdict("a/#", true, true).ok(),
        Some(Verdict::Accepted { shared: false })
    );
    assert_eq!(
        subscriptions::verdict("$share/g/a/#", false, true).ok(),
        Some(Verdict::Accepted { shared: true })
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    assert!(matches!(
        subscriptions::verdict("$share/g/a", true, true),
        Err(MqttError::Protocol(_))
    ));
}

#[test]
fn retained_messages_follow_by_retain_handling_and_never_to_shares() {
    use RetainHandling::*;
    assert!(subscriptions::sends_retained(false, AtSubscribe, true));
    assert!(subscriptions::sends_retained(false, AtSubscribeNew, false));
    assert!(!subscriptions::sends_retained(false, AtSubscribeNew, true));
    assert!(!subscriptions::sends_retained(false, NoAtSubscribe, false));
    assert!(!subscriptions::sends_retained(true, AtSubscribe, false));
}

fn send(qos: QoS, ids: &[u32], rap: bool) -> Plan {
    Plan::Send {
        qos,
        ids: ids.iter().filter_map(|i| NonZeroU32::new(*i)).collect(),
        retain_as_published: rap,
    }
}

const Q0: &str = "mqtt-subscription-devqos0";
const Q1: &str = "mqtt-subscription-devqos1";

#[test]
fn a_message_goes_out_at_the_lower_of_its_qos_and_the_subscriptions() {
    let subs = [sub("a/+", 1)];
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::ExactlyOnce, false),
        send(QoS::AtLeastOnce, &[], false)
    );
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::AtMostOnce, false),
        send(QoS::AtMostOnce, &[], false)
    );
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos_with_every_id() {
    let mut a = sub("a/#", 1);
    a.id = Some(1);
    let mut b = sub("a/+", 2);
    b.id = Some(2);
    b.retain_as_published = true;
    let subs = [a, b, sub("other", 2)];
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::ExactlyOnce, false),
        send(QoS::ExactlyOnce, &[1, 2], true)
    );
}

#[test]
fn the_qos0_queues_copy_of_a_message_the_durable_queue_carries_is_dropped() {
    let subs = [sub("a/#", 0), sub("a/+", 1)];
    assert_eq!(
        plan(&subs, "dev", Q0, "a/b", None, QoS::AtLeastOnce, false),
        Plan::Drop
    );
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::AtLeastOnce, false),
        send(QoS::AtLeastOnce, &[], false)
    );
    let only_qos0 = [sub("a/#", 0)];
    assert_eq!(
        plan(&only_qos0, "dev", Q0, "a/b", None, QoS::AtLeastOnce, false),
        send(QoS::AtMostOnce, &[], false)
    );
}

#[test]
fn no_local_subscriptions_skip_the_sessions_own_publishes() {
    let mut own = sub("a/#", 1);
    own.no_local = true;
    let subs = [own];
    assert_eq!(
        plan(
            &subs,
            "dev",
            Q1,
            "a/b",
            Some("dev"),
            QoS::AtLeastOnce,
            false
        ),
        Plan::Drop
    );
    assert_eq!(
        plan(
            &subs,
            "dev",
            Q1,
            "a/b",
            Some("other"),
            QoS::AtLeastOnce,
            false
        ),
        send(QoS::AtLeastOnce, &[], false)
    );
}

#[test]
fn a_message_no_subscription_matches_any_more_is_dropped() {
    let subs = [sub("x/#", 1)];
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::AtLeastOnce, false),
        Plan::Drop
    );
    assert_eq!(
        plan(&[], "dev", Q1, "a/b", None, QoS::AtLeastOnce, false),
        Plan::Drop
    );
}

#[test]
fn an_expired_message_is_dropped() {
    let subs = [sub("a/#", 1)];
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::AtLeastOnce, true),
        Plan::Drop
    );
}

#[test]
fn a_share_groups_queue_delivers_by_that_groups_subscription_only() {
    let subs = [sub("$share/g/a/#", 1), sub("a/#", 2)];
    assert_eq!(
        plan(
            &subs,
            "dev",
            "mqtt-share-g",
            "a/b",
            None,
            QoS::ExactlyOnce,
            false
        ),
        send(QoS::AtLeastOnce, &[], false)
    );
    assert_eq!(
        plan(&subs, "dev", Q1, "a/b", None, QoS::ExactlyOnce, false),
        send(QoS::ExactlyOnce, &[], false),
        "the session's own queue ignores its shares"
    );
    assert_eq!(
        plan(
            &subs,
            "dev",
            "mqtt-share-h",
            "a/b",
            None,
            QoS::ExactlyOnce,
            false
        ),
        Plan::Drop
    );
}

#[test]
fn unsubscribing_unbinds_the_filter_but_the_session_keeps_consuming_its_queue() {
    let subs = vec![sub("a/+", 1), sub("b/#", 1)];
    let r = subscriptions::release(&subs, &subs[0], &[], "dev");
    assert_eq!(
        r.unbind.as_deref(),
        Some(topic::binding_key("a/+").as_str())
    );
    assert!(!r.stop_consuming);
}

#[test]
fn a_binding_another_subscription_of_the_queue_still_needs_stays() {
    // One about to be added (`keep`) counts like one the session holds.
    let held = sub("a/+", 1);
    let coming = Sub {
        id: Some(7),
        ..sub("a/+", 2)
    };
    let r = subscriptions::release(&[], &held, &[&coming], "dev");
    assert_eq!(r.unbind, None);
    let r = subscriptions::release(
        std::slice::from_ref(&held),
        &sub("x/+", 1),
        &[&coming],
        "dev",
    );
    assert_eq!(
        r.unbind.as_deref(),
        Some(topic::binding_key("x/+").as_str())
    );
}

#[test]
fn a_filter_moving_to_the_other_qos_queue_releases_the_old_one() {
    let subs = vec![sub("a/+", 0), sub("b/+", 1)];
    let up = sub("a/+", 1);
    let old = subscriptions::moved(&subs, &up, "dev").expect("moves from qos0 to qos1");
    assert_eq!(old.queue("dev"), "mqtt-subscription-devqos0");
    let r = subscriptions::release(&subs, old, &[&up], "dev");
    assert_eq!(
        r.unbind.as_deref(),
        Some(topic::binding_key("a/+").as_str())
    );
    // QoS 1 to QoS 2 stays on the durable queue; a new filter moves nothing.
    assert!(subscriptions::moved(&subs, &sub("b/+", 2), "dev").is_none());
    assert!(subscriptions::moved(&subs, &sub("c/+", 0), "dev").is_none());
}

#[test]
fn leaving_a_share_group_keeps_its_bindings_and_stops_consuming_once_no_filter_is_left() {
    let subs = vec![sub("$share/g/a/+", 1), sub("$share/g/b/+", 1)];
    let r = subscriptions::release(&subs, &subs[0], &[], "dev");
    assert_eq!(
        r,
        subscriptions::Release {
            unbind: None,
            stop_consuming: false
        }
    );
    let r = subscriptions::release(&subs[..1], &subs[0], &[], "dev");
    assert_eq!(
        r,
        subscriptions::Release {
            unbind: None,
            stop_consuming: true
        }
    );
}
