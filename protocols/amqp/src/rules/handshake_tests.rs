//! The handshake machine, step by step: each test feeds methods and the
//! broker's answers and checks the steps that come out.

use amq_protocol::protocol::connection::{self, AMQPMethod as M};
use amq_protocol::protocol::AMQPClass;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use magnetar_broker::{BrokerError, Grants};
use magnetar_tenancy::NamespaceName;

use super::handshake::{Handshake, Input, Limits, Step, Tuned};
use crate::error::{self, Exception};

const LIMITS: Limits = Limits {
    frame_max: 131_072,
    channel_max: 2047,
    heartbeat: 60,
};

fn start_ok(mechanism: &str, response: &[u8], props: FieldTable) -> M {
    M::StartOk(connection::StartOk {
        client_properties: props,
        mechanism: ShortString::from(mechanism),
        response: LongString::from(response.to_vec()),
        locale: ShortString::from("en_US"),
    })
}

fn plain(user: &str, password: &str) -> M {
    start_ok(
        "PLAIN",
        format!("\0{user}\0{password}").as_bytes(),
        FieldTable::default(),
    )
}

fn tune_ok(frame_max: u32, channel_max: u16, heartbeat: u16) -> M {
    M::TuneOk(connection::TuneOk {
        channel_max,
        frame_max,
        heartbeat,
    })
}

fn open(vhost: &str) -> M {
    M::Open(connection::Open {
        virtual_host: ShortString::from(vhost),
    })
}

fn method(h: &mut Handshake, m: &M) -> Result<Vec<Step>, Exception> {
    h.on(Input::Method(m))
}

fn refusal<T: std::fmt::Debug>(r: Result<T, Exception>) -> (u16, u16, u16) {
    let e = r.expect_err("refused");
    (e.code, e.class_id, e.method_id)
}

/// A handshake through login and tuning, waiting for connection.open.
fn tuned() -> Handshake {
    let mut h = Handshake::new(LIMITS, None);
    method(&mut h, &plain("alice", "pw")).expect("start-ok");
    h.on(Input::Judged { accepted: true }).expect("tune");
    method(&mut h, &tune_ok(0, 0, 30)).expect("tuned");
    h
}

#[test]
fn a_full_handshake_logs_in_tunes_and_opens() {
    let mut h = Handshake::new(LIMITS, None);
    assert!(!h.is_open());
    assert_eq!(
        method(&mut h, &plain("alice", "pw")).expect("start-ok"),
        vec![Step::Authenticate {
            user: "alice".into(),
            password: Some(b"pw".to_vec()),
            blockable: false,
        }]
    );
    assert_eq!(
        h.on(Input::Judged { accepted: true }).expect("tune"),
        vec![Step::Send(AMQPClass::Connection(M::Tune(
            connection::Tune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            }
        )))]
    );
    assert_eq!(
        method(&mut h, &tune_ok(65_536, 100, 30)).expect("tuned"),
        vec![Step::Tune(Tuned {
            frame_max: 65_536,
            channel_max: 100,
            heartbeat: 30,
        })]
    );
    assert!(!h.is_open());
    let ns: NamespaceName = "acme/orders".parse().expect("ns");
    assert_eq!(
        method(&mut h, &open("acme/orders")).expect("open"),
        vec![Step::LookUpGrants(ns.clone())]
    );
    assert!(!h.is_open(), "not open before the grants are known");
    assert_eq!(
        h.on(Input::Granted(Ok(Grants::ALL))).expect("open-ok"),
        vec![
            Step::Opened {
                vhost: "acme/orders".into(),
                ns,
                grants: Grants::ALL,
            },
            Step::Send(AMQPClass::Connection(M::OpenOk(connection::OpenOk {}))),
        ]
    );
    assert!(h.is_open());
}

#[test]
fn the_client_capabilities_say_whether_it_takes_connection_blocked() {
    let mut caps = FieldTable::default();
    caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    let mut h = Handshake::new(LIMITS, None);
    let steps = method(&mut h, &start_ok("PLAIN", b"\0u\0p", props)).expect("start-ok");
    assert!(matches!(
        steps.as_slice(),
        [Step::Authenticate {
            blockable: true,
            ..
        }]
    ));
}

#[test]
fn a_refused_login_closes_with_access_refused_on_start_ok() {
    let mut h = Handshake::new(LIMITS, None);
    method(&mut h, &plain("mallory", "guess")).expect("start-ok");
    let e = h
        .on(Input::Judged { accepted: false })
        .expect_err("refused");
    assert_eq!(
        (e.code, e.class_id, e.method_id),
        (error::ACCESS_REFUSED, 10, 11)
    );
    assert_eq!(
        e.text,
        "Login was refused using authentication mechanism PLAIN"
    );
}

#[test]
fn a_malformed_plain_response_is_refused_before_the_broker_is_asked() {
    let mut h = Handshake::new(LIMITS, None);
    assert_eq!(
        refusal(method(
            &mut h,
            &start_ok("PLAIN", b"no-nuls", FieldTable::default())
        )),
        (error::ACCESS_REFUSED, 10, 11)
    );
}

#[test]
fn external_logs_in_as_the_certificate_role_and_needs_a_certificate() {
    let mut h = Handshake::new(LIMITS, Some("device-42".into()));
    assert_eq!(h.mechanisms(), "PLAIN AMQPLAIN EXTERNAL");
    assert_eq!(
        method(&mut h, &start_ok("EXTERNAL", b"", FieldTable::default())).expect("start-ok"),
        vec![Step::Authenticate {
            user: "device-42".into(),
            password: None,
            blockable: false,
        }]
    );
    let mut h = Handshake::new(LIMITS, None);
    assert_eq!(
        refusal(method(
            &mut h,
            &start_ok("EXTERNAL", b"", FieldTable::default())
        )),
        (error::ACCESS_REFUSED, 10, 11)
    );
}

#[test]
fn methods_out_of_order_are_command_invalid_with_their_ids() {
    // tune-ok before start-ok
    let mut h = Handshake::new(LIMITS, None);
    assert_eq!(
        refusal(method(&mut h, &tune_ok(0, 0, 0))),
        (error::COMMAND_INVALID, 10, 31)
    );
    // open before tune-ok
    let mut h = Handshake::new(LIMITS, None);
    method(&mut h, &plain("u", "p")).expect("start-ok");
    h.on(Input::Judged { accepted: true }).expect("tune");
    assert_eq!(
        refusal(method(&mut h, &open("/"))),
        (error::COMMAND_INVALID, 10, 40)
    );
    // a second start-ok
    let mut h = tuned();
    assert_eq!(
        refusal(method(&mut h, &plain("u", "p"))),
        (error::COMMAND_INVALID, 10, 11)
    );
}

#[test]
fn an_answer_the_machine_did_not_ask_for_is_an_internal_error() {
    let mut h = Handshake::new(LIMITS, None);
    assert_eq!(
        refusal(h.on(Input::Judged { accepted: true })).0,
        error::INTERNAL_ERROR
    );
    let mut h = tuned();
    assert_eq!(
        refusal(h.on(Input::Granted(Ok(Grants::ALL)))).0,
        error::INTERNAL_ERROR
    );
}

#[test]
fn tune_ok_outside_the_offered_limits_is_not_allowed() {
    let mut h = Handshake::new(LIMITS, None);
    method(&mut h, &plain("u", "p")).expect("start-ok");
    h.on(Input::Judged { accepted: true }).expect("tune");
    assert_eq!(
        refusal(method(&mut h, &tune_ok(LIMITS.frame_max + 1, 0, 0))).0,
        error::NOT_ALLOWED
    );
}

#[test]
fn zero_in_tune_ok_keeps_the_brokers_limits() {
    let mut h = Handshake::new(LIMITS, None);
    method(&mut h, &plain("u", "p")).expect("start-ok");
    h.on(Input::Judged { accepted: true }).expect("tune");
    assert_eq!(
        method(&mut h, &tune_ok(0, 0, 0)).expect("tuned"),
        vec![Step::Tune(Tuned {
            frame_max: LIMITS.frame_max,
            channel_max: LIMITS.channel_max,
            heartbeat: 0,
        })]
    );
}

#[test]
fn an_unknown_or_forbidden_vhost_does_not_open() {
    let mut h = tuned();
    let e = method(&mut h, &open("not-a-namespace")).expect_err("refused");
    assert_eq!(
        (e.code, e.text.as_str()),
        (error::NOT_ALLOWED, "vhost not-a-namespace not found")
    );

    let mut h = tuned();
    method(&mut h, &open("acme/x")).expect("look up");
    let missing = BrokerError::NotFound("acme/x".into());
    let e = h.on(Input::Granted(Err(&missing))).expect_err("refused");
    assert_eq!(
        (e.code, e.text.as_str()),
        (error::NOT_ALLOWED, "vhost acme/x not found")
    );
    assert!(!h.is_open());

    let mut h = tuned();
    method(&mut h, &open("/")).expect("look up");
    let none = Grants {
        produce: false,
        consume: false,
        admin: false,
    };
    let e = h.on(Input::Granted(Ok(none))).expect_err("refused");
    assert_eq!(
        (e.code, e.text.as_str()),
        (
            error::NOT_ALLOWED,
            "access to vhost '/' refused for user 'alice'"
        )
    );
}

#[test]
fn the_root_vhost_opens_the_default_namespace() {
    let mut h = tuned();
    assert_eq!(
        method(&mut h, &open("/")).expect("look up"),
        vec![Step::LookUpGrants(NamespaceName::default_namespace())]
    );
}
