//! MQTT 3.1, 3.1.1 and 5.0: the connection's framing, and what a session
//! makes of publishes and subscriptions without a broker.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use magnetar_mqtt::codec::{ack, ack2, Framing, LEVEL_31, LEVEL_311, LEVEL_5};
use magnetar_mqtt::{props, retained, topic};
use rmqtt_codec::types::{Protocol, Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, Packet};
use tokio_util::codec::Encoder;

/// The broker's default Maximum Packet Size.
const MAX_PACKET: u32 = 1 << 20;
/// Packets taken off one input.
const MAX_PACKETS: usize = 64;
/// "Now" for message expiry: fixed, so that runs repeat.
const NOW_MS: i64 = 1_700_000_000_000;

pub fn run(data: &[u8]) {
    // As the first bytes of a connection, where the level is not known yet.
    session(&[], data);
    // After a valid CONNECT of each level, so that every packet decoder is
    // reached.
    for level in [LEVEL_31, LEVEL_311, LEVEL_5] {
        session(&connect(level), data);
    }
}

fn session(prefix: &[u8], data: &[u8]) {
    let mut framing = Framing::new(MAX_PACKET);
    let mut buf = BytesMut::with_capacity(prefix.len() + data.len());
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(data);
    let mut packets = Vec::new();
    for _ in 0..MAX_PACKETS {
        match framing.decode(&mut buf) {
            Ok(Some(p)) => {
                inspect(&p);
                round_trip(framing.level(), &p);
                packets.push(p);
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The codec keeps state between reads (a fixed header taken before its
    // body arrived), so the same stream read a byte at a time must give the
    // same packets.
    assert_eq!(
        byte_by_byte(prefix, data),
        packets,
        "framing depends on where reads split the stream"
    );
}

/// The packets of a stream that arrives one byte per read.
fn byte_by_byte(prefix: &[u8], data: &[u8]) -> Vec<Packet> {
    let mut framing = Framing::new(MAX_PACKET);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for &b in prefix.iter().chain(data) {
        buf.extend_from_slice(&[b]);
        loop {
            match framing.decode(&mut buf) {
                Ok(Some(p)) => {
                    out.push(p);
                    if out.len() == MAX_PACKETS {
                        return out;
                    }
                }
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    out
}

fn inspect(p: &Packet) {
    match p {
        Packet::Publish(publish) => published(publish),
        Packet::Subscribe(s) => {
            for (f, _) in &s.topic_filters {
                filter(f);
            }
        }
        Packet::Unsubscribe(u) => {
            for f in &u.topic_filters {
                filter(f);
            }
        }
        Packet::Connect(c) => {
            if let Some(w) = &c.last_will {
                name(&w.topic);
            }
        }
        _ => {}
    }
}

/// A publish as the session stores it, and as a subscriber and the
/// retained store read it back.
fn published(p: &Publish) {
    let t: &str = &p.topic;
    name(t);
    let record = props::to_record(p, t, "fuzz-client");
    let stored = props::read(&record, NOW_MS).expect("a publish's record reads back");
    assert_eq!(stored.topic, t, "a publish's record keeps its topic");
    assert_eq!(stored.qos, p.qos, "a publish's record keeps its QoS");
    assert_eq!(
        stored.retain, p.retain,
        "a publish's record keeps its retain flag"
    );
    let _ = props::properties(&record, &stored, Vec::new());
    if let Ok(value) = retained::encode(&record) {
        let back = retained::decode(&value).expect("a retained message decodes");
        assert_eq!(back.key, record.key);
        assert_eq!(back.value, record.value);
        assert_eq!(back.headers, record.headers);
    }
}

/// A topic name: its routing key maps back to it, and a valid name is a
/// filter that matches itself.
fn name(t: &str) {
    assert_eq!(topic::topic_of_key(&topic::routing_key(t)), t);
    if topic::check_name(t).is_ok() {
        assert!(
            topic::check_filter(t).is_ok(),
            "a valid name is a valid filter"
        );
        assert!(topic::matches(t, t), "{t:?} does not match itself");
        assert_eq!(
            topic::matches("#", t),
            !t.starts_with('$'),
            "'#' matches every topic but those starting with '$'"
        );
    }
}

fn filter(f: &str) {
    let _ = topic::binding_key(f);
    if let Ok(Some((group, inner))) = topic::parse_share(f) {
        assert!(!group.is_empty());
        assert!(topic::check_filter(inner).is_ok());
    }
    if topic::check_filter(f).is_ok() {
        let _ = topic::matches(f, "a/b/c");
        let _ = topic::matches(f, "$SYS/broker");
    }
}

/// Packets the broker both receives and sends: encoded for the level they
/// were read at, they decode, and their encoding is stable from then on.
fn round_trip(level: u8, p: &Packet) {
    if !matches!(
        p,
        Packet::Publish(_)
            | Packet::PublishAck(_)
            | Packet::PublishReceived(_)
            | Packet::PublishRelease(_)
            | Packet::PublishComplete(_)
            | Packet::PingRequest
            | Packet::PingResponse
    ) {
        return;
    }
    let Some(mut encoder) = connected(level) else {
        return;
    };
    let mut first = BytesMut::new();
    if !matches!(encoder.encode(p.clone(), &mut first), Ok(true)) {
        return;
    }
    let Some(mut decoder) = connected(level) else {
        return;
    };
    let mut buf = first.clone();
    let again = match decoder.decode(&mut buf) {
        Ok(Some(again)) => again,
        other => panic!(
            "{p:?} encoded at level {level} as {:02x?} decodes as {other:?}",
            &first[..first.len().min(64)]
        ),
    };
    assert!(
        buf.is_empty(),
        "a re-encoded packet decodes with bytes to spare"
    );
    let mut second = BytesMut::new();
    let _ = encoder.encode(again, &mut second);
    assert_eq!(
        first, second,
        "packet encoding at level {level} is not stable"
    );
}

/// A framing past a CONNECT of `level`, without a size limit of its own.
fn connected(level: u8) -> Option<Framing> {
    let mut f = Framing::new(u32::MAX);
    let mut b = BytesMut::from(&connect(level)[..]);
    match f.decode(&mut b) {
        Ok(Some(Packet::Connect(_))) => Some(f),
        _ => None,
    }
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap_or(NonZeroU16::MIN)
}

/// A CONNECT of `level`, as a client encodes it.
pub fn connect(level: u8) -> Vec<u8> {
    if level == LEVEL_5 {
        v5_bytes(Packet::Connect(Box::new(v5::Connect {
            clean_start: true,
            keep_alive: 30,
            client_id: "fuzz-5".into(),
            ..Default::default()
        })))
    } else {
        v3_bytes(v3::Packet::Connect(Box::new(v3::Connect {
            protocol: Protocol(level),
            clean_session: true,
            keep_alive: 30,
            client_id: "fuzz-3".into(),
            ..Default::default()
        })))
    }
}

fn v3_bytes(p: v3::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    match v3::Codec::new(0).encode(p, &mut out) {
        Ok(()) => out.to_vec(),
        Err(_) => Vec::new(),
    }
}

fn v5_bytes(p: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    match v5::Codec::new(0, 0).encode(p, &mut out) {
        Ok(()) => out.to_vec(),
        Err(_) => Vec::new(),
    }
}

fn publish(qos: QoS, id: Option<u16>, properties: Option<v5::PublishProperties>) -> Publish {
    Publish {
        dup: false,
        retain: qos == QoS::ExactlyOnce,
        qos,
        topic: "sensors/room1/temp".into(),
        packet_id: id.map(pid),
        payload: Bytes::from_static(b"21.5"),
        properties,
    }
}

/// What a 3.1/3.1.1 client sends after CONNECT.
fn v3_packets() -> Vec<Vec<u8>> {
    let last_will = v3::LastWill {
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "status/device-1".into(),
        message: Bytes::from_static(b"offline"),
    };
    let with_will = v3::Connect {
        protocol: Protocol(LEVEL_311),
        clean_session: false,
        keep_alive: 60,
        last_will: Some(last_will),
        client_id: "device-1".into(),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"secret")),
        ..Default::default()
    };
    [
        v3::Packet::Connect(Box::new(with_will)),
        v3::Packet::Publish(Box::new(publish(QoS::AtMostOnce, None, None))),
        v3::Packet::Publish(Box::new(publish(QoS::AtLeastOnce, Some(1), None))),
        v3::Packet::Publish(Box::new(publish(QoS::ExactlyOnce, Some(2), None))),
        v3::Packet::Subscribe {
            packet_id: pid(3),
            topic_filters: vec![
                ("sensors/+/temp".into(), QoS::AtLeastOnce),
                ("$share/group/alerts/#".into(), QoS::AtMostOnce),
            ],
        },
        v3::Packet::Unsubscribe {
            packet_id: pid(4),
            topic_filters: vec!["sensors/+/temp".into()],
        },
        v3::Packet::PublishAck { packet_id: pid(1) },
        v3::Packet::PublishReceived { packet_id: pid(2) },
        v3::Packet::PublishRelease { packet_id: pid(2) },
        v3::Packet::PublishComplete { packet_id: pid(2) },
        v3::Packet::PingRequest,
        v3::Packet::Disconnect,
    ]
    .into_iter()
    .map(v3_bytes)
    .collect()
}

/// What an MQTT 5 client sends after CONNECT, properties included.
fn v5_packets() -> Vec<Vec<u8>> {
    let properties = v5::PublishProperties {
        topic_alias: NonZeroU16::new(1),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        message_expiry_interval: NonZeroU32::new(60),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        is_utf8_payload: true,
        response_topic: Some("re/ply".into()),
        subscription_ids: Vec::new(),
    };
    [
        Packet::Connect(Box::new(v5::Connect {
            clean_start: false,
            keep_alive: 60,
            session_expiry_interval_secs: 3600,
            receive_max: NonZeroU16::new(16),
            topic_alias_max: 8,
            max_packet_size: NonZeroU32::new(1 << 16),
            user_properties: vec![("app".into(), "fuzz".into())],
            client_id: "device-5".into(),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"secret")),
            ..Default::default()
        })),
        Packet::Publish(Box::new(publish(
            QoS::AtMostOnce,
            None,
            Some(properties.clone()),
        ))),
        Packet::Publish(Box::new(publish(
            QoS::AtLeastOnce,
            Some(1),
            Some(properties),
        ))),
        Packet::Publish(Box::new(publish(
            QoS::ExactlyOnce,
            Some(2),
            Some(v5::PublishProperties::default()),
        ))),
        Packet::Subscribe(v5::Subscribe {
            packet_id: pid(3),
            id: NonZeroU32::new(7),
            user_properties: Vec::new(),
            topic_filters: vec![
                (
                    "sensors/+/temp".into(),
                    v5::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: v5::RetainHandling::AtSubscribeNew,
                    },
                ),
                (
                    "$share/group/alerts/#".into(),
                    v5::SubscriptionOptions::default(),
                ),
            ],
        }),
        Packet::Unsubscribe(v5::Unsubscribe {
            packet_id: pid(4),
            user_properties: Vec::new(),
            topic_filters: vec!["sensors/+/temp".into()],
        }),
        Packet::PublishAck(ack(pid(1))),
        Packet::PublishReceived(ack(pid(2))),
        Packet::PublishRelease(ack2(pid(2))),
        Packet::PublishComplete(ack2(pid(2))),
        Packet::PingRequest,
        Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            session_expiry_interval_secs: Some(0),
            server_reference: None,
            reason_string: Some("bye".into()),
            user_properties: Vec::new(),
        }),
    ]
    .into_iter()
    .map(v5_bytes)
    .collect()
}

pub fn seeds() -> Vec<Vec<u8>> {
    let three = v3_packets();
    let five = v5_packets();
    let mut out: Vec<Vec<u8>> = [LEVEL_31, LEVEL_311, LEVEL_5]
        .into_iter()
        .map(connect)
        .collect();
    // Whole connections: CONNECT, then every packet after it.
    for (level, packets) in [(LEVEL_31, &three), (LEVEL_311, &three), (LEVEL_5, &five)] {
        let mut whole = connect(level);
        for p in packets.iter().skip(1) {
            whole.extend_from_slice(p);
        }
        out.push(whole);
    }
    // Single packets, as they follow the CONNECT the target puts first.
    out.extend(three);
    out.extend(five);
    out
}
