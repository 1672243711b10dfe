//! The rules, verdict by verdict.

use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use magnetar_broker::routing::ExchangeKind;
use magnetar_broker::{BrokerError, Grants, Message};
use magnetar_tenancy::NamespaceName;

use super::channels::{self, Prefetch};
use super::handshake::{self, Mechanism, Tuned};
use crate::codec::FRAME_MIN_SIZE;
use crate::deadletter::Reason;
use crate::error;

fn code<T: std::fmt::Debug>(r: Result<T, crate::error::Exception>) -> u16 {
    r.expect_err("refused").code
}

/// An AMQPLAIN response: a field table of long strings, without its
/// length prefix.
fn amqplain(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in entries {
        out.push(u8::try_from(k.len()).expect("a short key"));
        out.extend_from_slice(k.as_bytes());
        out.push(b'S');
        out.extend_from_slice(&u32::try_from(v.len()).expect("short").to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

// ---- handshake ----

#[test]
fn plain_and_amqplain_log_in_with_a_password() {
    assert_eq!(
        handshake::mechanism("PLAIN", false),
        Ok(Mechanism::Password)
    );
    assert_eq!(
        handshake::mechanism("AMQPLAIN", true),
        Ok(Mechanism::Password)
    );
}

#[test]
fn external_needs_a_client_certificate() {
    assert_eq!(
        handshake::mechanism("EXTERNAL", true),
        Ok(Mechanism::Certificate)
    );
    assert_eq!(
        code(handshake::mechanism("EXTERNAL", false)),
        error::ACCESS_REFUSED
    );
}

#[test]
fn other_mechanisms_are_refused() {
    let e = handshake::mechanism("SCRAM-SHA-256", true).expect_err("refused");
    assert_eq!(e.code, error::ACCESS_REFUSED);
    assert!(e.text.contains("SCRAM-SHA-256"));
}

#[test]
fn a_plain_response_is_authzid_user_and_password() {
    assert_eq!(
        handshake::login("PLAIN", b"\0alice\0s3cret"),
        Some(("alice".into(), b"s3cret".to_vec()))
    );
    assert_eq!(
        handshake::login("PLAIN", b"admin\0alice\0pw"),
        Some(("alice".into(), b"pw".to_vec()))
    );
}

#[test]
fn a_malformed_plain_response_logs_nobody_in() {
    assert_eq!(handshake::login("PLAIN", b"alice"), None);
    assert_eq!(handshake::login("PLAIN", b"\0alice"), None);
    assert_eq!(handshake::login("PLAIN", b"\0a\0b\0c"), None);
    assert_eq!(handshake::login("PLAIN", b"\0\xff\xfe\0pw"), None);
}

#[test]
fn an_amqplain_response_is_a_login_and_password_table() {
    let r = amqplain(&[("LOGIN", "bob"), ("PASSWORD", "pw")]);
    assert_eq!(
        handshake::login("AMQPLAIN", &r),
        Some(("bob".into(), b"pw".to_vec()))
    );
}

#[test]
fn an_amqplain_response_without_a_password_logs_nobody_in() {
    let r = amqplain(&[("LOGIN", "bob")]);
    assert_eq!(handshake::login("AMQPLAIN", &r), None);
    assert_eq!(handshake::login("AMQPLAIN", b"\x01garbage"), None);
}

#[test]
fn a_refused_login_names_the_mechanism_as_rabbitmq_does() {
    let e = handshake::login_refused("PLAIN");
    assert_eq!(e.code, error::ACCESS_REFUSED);
    assert_eq!(
        e.text,
        "Login was refused using authentication mechanism PLAIN"
    );
}

#[test]
fn clients_that_say_so_take_connection_blocked() {
    let mut caps = FieldTable::default();
    caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    assert!(handshake::blockable(&props));
    assert!(!handshake::blockable(&FieldTable::default()));
    let mut off = FieldTable::default();
    off.insert("connection.blocked".into(), AMQPValue::Boolean(false));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(off));
    assert!(!handshake::blockable(&props));
}

#[test]
fn tune_ok_zeros_keep_the_brokers_limits() {
    assert_eq!(
        handshake::tune(0, 0, 60, 131_072, 2047),
        Ok(Tuned {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60
        })
    );
}

#[test]
fn tune_ok_may_lower_the_limits() {
    assert_eq!(
        handshake::tune(8192, 10, 0, 131_072, 2047),
        Ok(Tuned {
            frame_max: 8192,
            channel_max: 10,
            heartbeat: 0
        })
    );
}

#[test]
fn a_channel_max_above_the_brokers_is_capped() {
    let tuned = handshake::tune(0, 65_535, 0, 131_072, 2047).expect("tuned");
    assert_eq!(tuned.channel_max, 2047);
}

#[test]
fn a_frame_max_outside_the_limits_is_not_allowed() {
    assert_eq!(
        code(handshake::tune(FRAME_MIN_SIZE - 1, 0, 0, 131_072, 2047)),
        error::NOT_ALLOWED
    );
    assert_eq!(
        code(handshake::tune(131_073, 0, 0, 131_072, 2047)),
        error::NOT_ALLOWED
    );
    assert!(handshake::tune(FRAME_MIN_SIZE, 0, 0, 131_072, 2047).is_ok());
}

#[test]
fn the_root_vhost_is_the_default_namespace() {
    let default = Some(NamespaceName::default_namespace());
    assert_eq!(handshake::vhost_namespace("/"), default);
    assert_eq!(handshake::vhost_namespace(""), default);
}

#[test]
fn a_vhost_names_its_namespace_with_or_without_a_slash() {
    let ns: NamespaceName = "acme/orders".parse().expect("valid");
    assert_eq!(handshake::vhost_namespace("acme/orders"), Some(ns.clone()));
    assert_eq!(handshake::vhost_namespace("/acme/orders"), Some(ns));
    assert_eq!(handshake::vhost_namespace("just-one-part"), None);
}

#[test]
fn opening_a_vhost_needs_some_grant_in_it() {
    assert_eq!(handshake::open("v", "u", Ok(Grants::ALL)), Ok(Grants::ALL));
    let none = Grants {
        produce: false,
        consume: false,
        admin: false,
    };
    let e = handshake::open("v", "u", Ok(none)).expect_err("refused");
    assert_eq!(e.code, error::NOT_ALLOWED);
    assert_eq!(e.text, "access to vhost 'v' refused for user 'u'");
}

#[test]
fn a_missing_vhost_is_not_found_and_other_failures_map_to_their_codes() {
    let missing = BrokerError::NotFound("ns".into());
    let e = handshake::open("acme/x", "u", Err(&missing)).expect_err("refused");
    assert_eq!(
        (e.code, e.text.as_str()),
        (error::NOT_ALLOWED, "vhost acme/x not found")
    );
    let refused = BrokerError::AccessRefused("no".into());
    assert_eq!(
        code(handshake::open("v", "u", Err(&refused))),
        error::ACCESS_REFUSED
    );
}

// ---- channels ----

#[test]
fn a_channel_opens_once_under_channel_max() {
    assert!(channels::open(1, 10, false).is_ok());
    assert!(channels::open(10, 10, false).is_ok());
    assert_eq!(code(channels::open(11, 10, false)), error::NOT_ALLOWED);
    assert_eq!(code(channels::open(1, 10, true)), error::CHANNEL_ERROR);
}

#[test]
fn flow_cannot_pause_deliveries() {
    assert!(channels::flow(true).is_ok());
    assert_eq!(code(channels::flow(false)), error::NOT_IMPLEMENTED);
}

#[test]
fn confirm_and_tx_modes_exclude_each_other() {
    assert!(channels::confirm_select(false).is_ok());
    assert!(channels::tx_select(false).is_ok());
    assert_eq!(
        code(channels::confirm_select(true)),
        error::PRECONDITION_FAILED
    );
    assert_eq!(code(channels::tx_select(true)), error::PRECONDITION_FAILED);
    assert_eq!(
        channels::not_transactional().code,
        error::PRECONDITION_FAILED
    );
}

#[test]
fn an_empty_queue_name_is_the_last_declared_queue() {
    assert_eq!(channels::queue_name("", "q1").ok(), Some("q1".into()));
    assert_eq!(channels::queue_name("q2", "q1").ok(), Some("q2".into()));
    assert_eq!(code(channels::queue_name("", "")), error::NOT_FOUND);
}

#[test]
fn exchange_types_are_parsed() {
    for (kind, want) in [
        ("direct", ExchangeKind::Direct),
        ("fanout", ExchangeKind::Fanout),
        ("topic", ExchangeKind::Topic),
        ("headers", ExchangeKind::Headers),
    ] {
        assert_eq!(
            channels::exchange_kind("x", kind, false, "/").ok(),
            Some(want)
        );
    }
}

#[test]
fn an_unknown_exchange_type_fails_the_precondition_unless_passive() {
    let e = channels::exchange_kind("x", "x-nope", false, "/").expect_err("refused");
    assert_eq!(e.code, error::PRECONDITION_FAILED);
    assert_eq!(e.text, "unknown exchange type 'x-nope'");
    assert!(channels::exchange_kind("x", "x-nope", true, "/").is_ok());
}

#[test]
fn the_amq_prefix_is_reserved_but_for_the_predeclared_exchanges() {
    assert_eq!(
        code(channels::exchange_kind("amq.mine", "direct", false, "/")),
        error::ACCESS_REFUSED
    );
    assert!(channels::exchange_kind("amq.topic", "topic", false, "/").is_ok());
    assert!(channels::exchange_kind("amq.mine", "direct", true, "/").is_ok());
}

#[test]
fn qos_sets_the_per_consumer_or_the_channel_wide_limit() {
    let mut p = Prefetch::default();
    p.qos(10, false);
    assert_eq!(p.per_consumer, 10);
    p.qos(50, true);
    assert_eq!(
        p,
        Prefetch {
            per_consumer: 10,
            global: 50
        }
    );
    p.qos(0, false);
    assert_eq!(p.per_consumer, 0, "0 lifts the limit");
}

#[test]
fn the_channel_wide_limit_counts_every_unacknowledged_delivery() {
    let p = Prefetch {
        per_consumer: 0,
        global: 2,
    };
    assert!(!p.at_global_limit(1));
    assert!(p.at_global_limit(2));
    assert!(!Prefetch::default().at_global_limit(1_000_000));
}

#[test]
fn a_consumers_credit_is_the_lower_of_both_limits() {
    let credit = |per_consumer, global| {
        Prefetch {
            per_consumer,
            global,
        }
        .consumer_credit()
    };
    assert_eq!(credit(0, 0), 0);
    assert_eq!(credit(10, 0), 10);
    assert_eq!(credit(0, 5), 5);
    assert_eq!(credit(10, 5), 5);
    assert_eq!(credit(3, 5), 3);
}

#[test]
fn deliveries_wait_in_order_at_the_channel_limit_except_for_no_ack_consumers() {
    assert!(!channels::waits(false, false, false));
    assert!(channels::waits(false, true, false));
    assert!(channels::waits(true, false, false), "none overtakes");
    assert!(!channels::waits(true, true, true));
}

#[test]
fn expired_or_over_delivered_messages_are_dead_lettered() {
    assert_eq!(channels::dead_letter_instead(None, 100, false), None);
    assert_eq!(channels::dead_letter_instead(Some(3), 3, false), None);
    assert_eq!(
        channels::dead_letter_instead(Some(3), 4, false),
        Some(Reason::DeliveryLimit)
    );
    assert_eq!(
        channels::dead_letter_instead(Some(3), 4, true),
        Some(Reason::Expired),
        "expiry first"
    );
    assert_eq!(
        channels::dead_letter_instead(None, 0, true),
        Some(Reason::Expired)
    );
}

fn published_at(ms: i64, expiration: Option<&str>) -> Message {
    Message {
        key: None,
        value: Some(Bytes::from_static(b"m")),
        headers: expiration
            .map(|e| {
                (
                    crate::props::H_EXPIRATION.to_string(),
                    Some(Bytes::from(e.to_owned())),
                )
            })
            .into_iter()
            .collect(),
        timestamp_ms: ms,
    }
}

#[test]
fn a_message_without_any_ttl_never_expires() {
    assert!(!channels::expired(&published_at(0, None), None, i64::MAX));
}

#[test]
fn the_queues_message_ttl_counts_from_publication() {
    let m = published_at(1_000, None);
    assert!(!channels::expired(&m, Some(500), 1_499));
    assert!(channels::expired(&m, Some(500), 1_500));
}

#[test]
fn a_messages_own_expiration_counts_too() {
    let m = published_at(1_000, Some("200"));
    assert!(!channels::expired(&m, None, 1_199));
    assert!(channels::expired(&m, None, 1_200));
}

#[test]
fn the_lower_of_both_ttls_holds() {
    let m = published_at(0, Some("200"));
    assert!(channels::expired(&m, Some(1_000), 200));
    let m = published_at(0, Some("5000"));
    assert!(channels::expired(&m, Some(1_000), 1_000));
    assert!(!channels::expired(&m, Some(1_000), 999));
}

#[test]
fn a_zero_ttl_expires_at_once_and_a_garbled_expiration_is_none() {
    assert!(channels::expired(&published_at(10, None), Some(0), 10));
    assert!(!channels::expired(
        &published_at(10, Some("soon")),
        None,
        i64::MAX
    ));
}
