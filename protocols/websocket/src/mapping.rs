//! Between Pulsar's JSON messages and the broker's records.
//!
//! | WebSocket | record |
//! |---|---|
//! | `payload` (base64) | value |
//! | `key` | key (UTF-8) |
//! | `properties` | headers, in text |
//! | `replicationClusters` | header `pulsar.replicate-to`, the names joined by commas: the record replicates to those clusters only |
//! | `eventTime` | timestamp (else stamped on append) |
//! | `publishTime` | timestamp |
//! | `messageId` | topic tag, offset and partition (see [`IdBase`]) |
//!
//! Records written by other protocols may carry bytes that are not UTF-8
//! in keys or headers; those are shown with U+FFFD, since Pulsar's JSON has
//! only strings there. A header without a value is an empty property, and
//! of repeated header names the last one wins.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use magnetar_broker::format::REPLICATE_TO_HEADER;
use magnetar_broker::subscription::Delivery;
use magnetar_broker::Message;
use magnetar_tenancy::TopicName;

use crate::frames::{ConsumerMessage, ProducerMessage};
use crate::message_id::MessageId;
use crate::{time, Result};

/// A stable 48-bit tag of a (non-partitioned or base) topic name. Message
/// ids carry it where Pulsar's carry the ledger id, so that acks on a
/// multi-topic consumer find their topic, and so that an id from one topic
/// is not taken for another's. 48 bits stay positive in Java's `long`.
pub fn topic_tag(topic: &TopicName) -> u64 {
    let s = topic.base().to_string();
    let lo = u64::from(crc32c::crc32c(s.as_bytes()));
    let hi = u64::from(crc32c::crc32c_append(0x9e37_79b9, s.as_bytes()));
    ((hi << 32) | lo) & ((1 << 48) - 1)
}

/// What a topic (a partition or a plain topic) puts in its message ids:
/// its tag as the ledger id, and the partition index for partitions; the
/// offset, the same one Kafka clients see, is the entry id. Worked out
/// once per topic, not per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdBase {
    pub tag: u64,
    pub partition: Option<u32>,
}

impl IdBase {
    pub fn of(topic: &TopicName) -> Self {
        IdBase {
            tag: topic_tag(topic),
            partition: topic.partition_index(),
        }
    }

    /// The base an id was made from.
    pub fn of_id(id: &MessageId) -> Self {
        IdBase {
            tag: id.ledger,
            partition: id.partition,
        }
    }

    pub fn id(self, offset: u64) -> MessageId {
        MessageId {
            ledger: self.tag,
            entry: offset,
            partition: self.partition,
            batch_index: None,
        }
    }
}

/// A producer's frame as a record.
pub fn to_record(m: &ProducerMessage) -> Result<Message> {
    let value = m.payload_bytes()?;
    let timestamp_ms = match m.event_time.as_deref() {
        Some(t) if !t.is_empty() => time::parse_ms(t)?,
        _ => 0,
    };
    let mut headers: Vec<_> = m
        .properties
        .iter()
        .filter(|(k, _)| m.replication_clusters.is_empty() || *k != REPLICATE_TO_HEADER)
        .map(|(k, v)| (k.clone(), Some(Bytes::from(v.clone().into_bytes()))))
        .collect();
    if !m.replication_clusters.is_empty() {
        headers.push((
            REPLICATE_TO_HEADER.to_owned(),
            Some(m.replication_clusters.join(",").into()),
        ));
    }
    Ok(Message {
        key: m.key.as_ref().map(|k| k.clone().into_bytes().into()),
        value: Some(value.into()),
        headers,
        timestamp_ms,
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A delivery from the topic of `ids` as Pulsar's consumer message.
pub fn to_frame(ids: IdBase, d: &Delivery) -> ConsumerMessage {
    let m = &d.message;
    let properties: BTreeMap<String, String> = m
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_deref().map(text).unwrap_or_default()))
        .collect();
    let when = time::format_ms(m.timestamp_ms);
    ConsumerMessage {
        message_id: ids.id(d.offset).encode(),
        payload: base64::engine::general_purpose::STANDARD
            .encode(m.value.as_deref().unwrap_or_default()),
        properties,
        publish_time: when.clone(),
        redelivery_count: d.redelivery_count,
        key: m.key.as_deref().map(text),
        event_time: Some(when),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_frames() {
        let p = ProducerMessage::parse(
            r#"{"payload":"AAEC/w==","key":"k1","properties":{"a":"1","b":""},"eventTime":"2020-11-18T09:58:23.355Z"}"#,
        )
        .expect("frame");
        let r = to_record(&p).expect("record");
        assert_eq!(r.value.as_deref(), Some(&[0u8, 1, 2, 255][..]));
        assert_eq!(r.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(r.header("a").map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(r.timestamp_ms, 1_605_693_503_355);
        let t: TopicName = "public/default/t-partition-2".parse().expect("topic");
        let f = to_frame(
            IdBase::of(&t),
            &Delivery {
                offset: 9,
                redelivery_count: 1,
                message: r,
            },
        );
        assert_eq!(f.payload, "AAEC/w==");
        assert_eq!(f.key.as_deref(), Some("k1"));
        assert_eq!(f.properties.get("b").map(String::as_str), Some(""));
        assert_eq!(f.publish_time, "2020-11-18T09:58:23.355Z");
        assert_eq!(f.redelivery_count, 1);
        let id = MessageId::decode(&f.message_id).expect("id");
        assert_eq!((id.entry, id.partition), (9, Some(2)));
        assert_eq!(
            id.ledger,
            topic_tag(&"public/default/t".parse().expect("topic"))
        );
    }

    #[test]
    fn replication_clusters_become_the_replicate_to_header() {
        let p = ProducerMessage::parse(
            r#"{"payload":"","properties":{"pulsar.replicate-to":"x"},"replicationClusters":["east","south"]}"#,
        )
        .expect("frame");
        let r = to_record(&p).expect("record");
        let to: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k == REPLICATE_TO_HEADER)
            .collect();
        assert_eq!(to.len(), 1);
        assert_eq!(
            r.header(REPLICATE_TO_HEADER).map(|v| &v[..]),
            Some(&b"east,south"[..])
        );
        let p = ProducerMessage::parse(r#"{"payload":""}"#).expect("frame");
        assert!(to_record(&p).expect("record").headers.is_empty());
    }

    #[test]
    fn bad_event_time_is_an_encoding_error() {
        let p = ProducerMessage::parse(r#"{"payload":"","eventTime":"yesterday"}"#).expect("frame");
        assert_eq!(to_record(&p).expect_err("time").code(), 7);
    }

    #[test]
    fn foreign_bytes_do_not_break_frames() {
        let m = Message {
            key: Some(vec![0xff, b'k'].into()),
            value: None,
            headers: vec![("h".into(), None), ("x".into(), Some(vec![0xc3].into()))],
            timestamp_ms: 0,
        };
        let t: TopicName = "t".parse().expect("topic");
        let f = to_frame(
            IdBase::of(&t),
            &Delivery {
                offset: 0,
                redelivery_count: 0,
                message: m,
            },
        );
        assert_eq!(f.key.as_deref(), Some("\u{fffd}k"));
        assert_eq!(f.payload, "");
        assert_eq!(f.properties["h"], "");
        serde_json::to_string(&f).expect("json");
    }
}
