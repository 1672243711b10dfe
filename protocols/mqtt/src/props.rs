//! How an MQTT publish maps onto a record, and back.
//!
//! The payload is the record value and the topic the record key (and the
//! header `mqtt.topic`). QoS, retain and the MQTT 5 properties travel as
//! `mqtt.` headers; user properties are plain headers, so that Kafka and
//! AMQP consumers see them as their own headers.

use std::num::NonZeroU32;

use bytes::Bytes;
use bytestring::ByteString;
use magnetar_broker::Message;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::PublishProperties;

use crate::topic;
use crate::EXCHANGE;

pub const PREFIX: &str = "mqtt.";
pub const H_TOPIC: &str = "mqtt.topic";
pub const H_QOS: &str = "mqtt.qos";
pub const H_RETAIN: &str = "mqtt.retain";
pub const H_CLIENT: &str = "mqtt.client-id";
pub const H_CONTENT_TYPE: &str = "mqtt.content-type";
pub const H_RESPONSE_TOPIC: &str = "mqtt.response-topic";
pub const H_CORRELATION: &str = "mqtt.correlation-data";
pub const H_PAYLOAD_FORMAT: &str = "mqtt.payload-format";
pub const H_EXPIRY: &str = "mqtt.message-expiry-interval";
/// How AMQP consumers see where a publish was routed: MQTT publishes go
/// to `amq.topic` with the topic as routing key (`/` and `.` swapped),
/// and say so in the headers AMQP reads them from.
pub const H_AMQP_EXCHANGE: &str = "amqp.exchange";
pub const H_AMQP_ROUTING_KEY: &str = "amqp.routing-key";

fn text(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

/// The record a publish is stored as. `topic` is the publish's topic
/// after any alias was resolved.
pub fn to_record(p: &Publish, topic: &str, client_id: &str) -> Message {
    let mut headers: Vec<(String, Option<Bytes>)> = vec![
        (H_TOPIC.into(), text(topic)),
        (H_QOS.into(), text(&p.qos.value().to_string())),
        (H_CLIENT.into(), text(client_id)),
        (H_AMQP_EXCHANGE.into(), text(EXCHANGE)),
        (H_AMQP_ROUTING_KEY.into(), text(&topic::routing_key(topic))),
    ];
    if p.retain {
        headers.push((H_RETAIN.into(), text("true")));
    }
    if let Some(props) = &p.properties {
        if let Some(ct) = &props.content_type {
            headers.push((H_CONTENT_TYPE.into(), text(ct)));
        }
        if let Some(rt) = &props.response_topic {
            headers.push((H_RESPONSE_TOPIC.into(), text(rt)));
        }
        if let Some(cd) = &props.correlation_data {
            headers.push((H_CORRELATION.into(), Some(cd.clone())));
        }
        if props.is_utf8_payload {
            headers.push((H_PAYLOAD_FORMAT.into(), text("1")));
        }
        if let Some(e) = props.message_expiry_interval {
            headers.push((H_EXPIRY.into(), text(&e.get().to_string())));
        }
        // The `mqtt.` headers are ours: a user property of that name would
        // otherwise stand in for the topic, QoS or retain flag that
        // readers take from the record.
        for (k, v) in props
            .user_properties
            .iter()
            .filter(|(k, _)| !k.starts_with(PREFIX))
        {
            headers.push((k.to_string(), text(v)));
        }
    }
    Message {
        key: text(topic),
        value: Some(p.payload.clone()),
        headers,
        timestamp_ms: 0,
    }
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a [u8]> {
    m.headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

fn header_text(m: &Message, name: &str) -> Option<String> {
    header(m, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A stored record as MQTT sees it.
pub struct Stored {
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub publisher: Option<String>,
    /// Seconds left of its message expiry, if it has one; None if none.
    pub expiry_left: Option<u32>,
    pub expired: bool,
}

/// What MQTT needs of a record: its topic (the `mqtt.topic` header, or
/// the key of a record routed by another protocol, with `.` and `/`
/// swapped back), QoS (at most 1 for records from elsewhere) and expiry.
pub fn read(m: &Message, now_ms: i64) -> Option<Stored> {
    let topic = match header_text(m, H_TOPIC) {
        Some(t) => t,
        None => topic::topic_of_key(std::str::from_utf8(m.key.as_deref()?).ok()?),
    };
    let qos = match header_text(m, H_QOS).as_deref() {
        Some("0") => QoS::AtMostOnce,
        Some("2") => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    };
    let mut expiry_left = None;
    let mut expired = false;
    if let Some(e) = header_text(m, H_EXPIRY).and_then(|e| e.parse::<u64>().ok()) {
        let age_s = u64::try_from(now_ms.saturating_sub(m.timestamp_ms).max(0) / 1000).unwrap_or(0);
        expired = age_s >= e;
        expiry_left = Some(u32::try_from(e.saturating_sub(age_s)).unwrap_or(u32::MAX));
    }
    Some(Stored {
        topic,
        qos,
        retain: header(m, H_RETAIN) == Some(b"true"),
        publisher: header_text(m, H_CLIENT),
        expiry_left,
        expired,
    })
}

/// The MQTT 5 properties of a delivery of `m`.
pub fn properties(m: &Message, s: &Stored, subscription_ids: Vec<NonZeroU32>) -> PublishProperties {
    let bs = |name: &str| header_text(m, name).map(ByteString::from);
    PublishProperties {
        topic_alias: None,
        correlation_data: header(m, H_CORRELATION).map(Bytes::copy_from_slice),
        message_expiry_interval: s.expiry_left.and_then(|l| NonZeroU32::new(l.max(1))),
        content_type: bs(H_CONTENT_TYPE),
        user_properties: m
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(PREFIX) && !k.starts_with("amqp."))
            .map(|(k, v)| {
                (
                    ByteString::from(k.as_str()),
                    ByteString::from(
                        String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned(),
                    ),
                )
            })
            .collect(),
        is_utf8_payload: header(m, H_PAYLOAD_FORMAT) == Some(b"1"),
        response_topic: bs(H_RESPONSE_TOPIC),
        subscription_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_round_trips_through_a_record() {
        let p = Publish {
            dup: false,
            retain: true,
            qos: QoS::ExactlyOnce,
            topic: "a/b".into(),
            packet_id: None,
            payload: Bytes::from_static(b"hi"),
            properties: Some(PublishProperties {
                content_type: Some("text/plain".into()),
                response_topic: Some("re/ply".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                is_utf8_payload: true,
                message_expiry_interval: NonZeroU32::new(60),
                ..Default::default()
            }),
        };
        let mut m = to_record(&p, "a/b", "dev");
        assert_eq!(m.key.as_deref(), Some(&b"a/b"[..]));
        m.timestamp_ms = 1_000;
        let s = read(&m, 11_000).expect("readable");
        assert_eq!(s.topic, "a/b");
        assert_eq!(s.qos, QoS::ExactlyOnce);
        assert!(s.retain && !s.expired);
        assert_eq!(s.expiry_left, Some(50));
        assert_eq!(s.publisher.as_deref(), Some("dev"));
        let props = properties(&m, &s, vec![]);
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.response_topic.as_deref(), Some("re/ply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
        assert_eq!(props.user_properties.len(), 2);
        assert!(props.is_utf8_payload);
        assert!(read(&m, 61_000).expect("readable").expired);
    }

    #[test]
    fn user_properties_cannot_stand_in_for_the_topic_qos_or_retain() {
        let p = Publish {
            dup: false,
            retain: false,
            qos: QoS::AtMostOnce,
            topic: "a/b".into(),
            packet_id: None,
            payload: Bytes::from_static(b"hi"),
            properties: Some(PublishProperties {
                user_properties: vec![
                    ("mqtt.topic".into(), "admin/secret".into()),
                    ("mqtt.qos".into(), "2".into()),
                    ("mqtt.retain".into(), "true".into()),
                    ("k".into(), "v".into()),
                ],
                ..Default::default()
            }),
        };
        let m = to_record(&p, "a/b", "dev");
        let s = read(&m, 0).expect("readable");
        assert_eq!(s.topic, "a/b");
        assert_eq!(s.qos, QoS::AtMostOnce);
        assert!(!s.retain);
        assert!(m.headers.iter().any(|(k, _)| k == "k"));
    }

    #[test]
    fn records_from_other_protocols_take_their_topic_from_the_key() {
        let m = Message::new("x").with_key("sensors.room2.temp");
        let s = read(&m, 0).expect("readable");
        assert_eq!(s.topic, "sensors/room2/temp");
        assert_eq!(s.qos, QoS::AtLeastOnce);
    }
}
