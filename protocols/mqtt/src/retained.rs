//! Retained messages: the last retained publish of each topic, kept per
//! namespace in the broker's durable state, so that every broker sees
//! them and they outlive restarts.
//!
//! A retained message is stored as the record it was routed as, in the
//! broker's batch format (one record, stamped with its publish time so
//! that message expiry still counts from then).

use bytes::Bytes;
use magnetar_broker::format::{decode_entry, encode_messages};
use magnetar_broker::Message;
use magnetar_tenancy::names::{encode_segment, NamespaceName};

use crate::error::{MqttError, Result};

/// Where a namespace's retained messages start.
pub fn namespace_prefix(ns: &NamespaceName) -> String {
    format!(
        "{}/{}/",
        encode_segment(ns.tenant()),
        encode_segment(ns.namespace())
    )
}

/// The key of `topic`'s retained message. The whole topic is one
/// segment, so that listing a namespace never mixes in another's.
pub fn key(ns: &NamespaceName, topic: &str) -> String {
    format!("{}{}", namespace_prefix(ns), encode_segment(topic))
}

/// The prefix every key of a topic that `filter` matches starts with: the
/// namespace's and the filter's literal start (to its first wildcard,
/// less a trailing `/`, since `a/#` matches `a` too). Keys encode byte by
/// byte, so a topic's key starts with its prefix's; a lookup lists only
/// these rather than the whole namespace.
pub fn filter_prefix(ns: &NamespaceName, filter: &str) -> String {
    let literal = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
    let literal = literal.strip_suffix('/').unwrap_or(literal);
    format!("{}{}", namespace_prefix(ns), encode_segment(literal))
}

pub fn encode(record: &Message) -> Result<Bytes> {
    encode_messages(std::slice::from_ref(record)).map_err(|e| MqttError::Encode(e.to_string()))
}

/// The record of a stored value; None if it is not one.
pub fn decode(value: &Bytes) -> Option<Message> {
    decode_entry(value)
        .ok()?
        .into_iter()
        .next()
        .map(|m| m.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_its_time() {
        let mut m = Message::new("21.5")
            .with_key("a/b")
            .with_header("mqtt.retain", "true");
        m.timestamp_ms = 1_700_000_000_000;
        let back = decode(&encode(&m).expect("encodes")).expect("decodes");
        assert_eq!(back, m);
        assert!(decode(&Bytes::from_static(b"junk")).is_none());
    }

    proptest::proptest! {
        /// Whatever the filter, every topic it matches has a key under
        /// its prefix.
        #[test]
        fn matched_topics_lie_under_the_filter_prefix(
            levels in proptest::collection::vec("[a-c/+#$ %]{0,3}", 1..4),
            topic in proptest::collection::vec("[a-c$ %]{0,3}", 1..4),
        ) {
            let ns = NamespaceName::new("t", "n").expect("valid");
            let filter = levels.join("/");
            let topic = topic.join("/");
            if crate::topic::matches(&filter, &topic) {
                proptest::prop_assert!(key(&ns, &topic).starts_with(&filter_prefix(&ns, &filter)));
            }
        }
    }

    #[test]
    fn filter_prefixes_stop_at_the_first_wildcard() {
        let ns = NamespaceName::new("t", "n").expect("valid");
        let p = namespace_prefix(&ns);
        assert_eq!(filter_prefix(&ns, "a/b/#"), format!("{p}a%2Fb"));
        assert_eq!(filter_prefix(&ns, "a/+/c"), format!("{p}a"));
        assert_eq!(filter_prefix(&ns, "#"), p);
        assert_eq!(filter_prefix(&ns, "a/b"), key(&ns, "a/b"));
    }

    #[test]
    fn keys_of_one_namespace_share_its_prefix_only() {
        let ns = NamespaceName::new("t", "n").expect("valid");
        let other = NamespaceName::new("t", "n2").expect("valid");
        assert!(key(&ns, "a/b").starts_with(&namespace_prefix(&ns)));
        assert!(!key(&other, "a/b").starts_with(&namespace_prefix(&ns)));
        assert_ne!(key(&ns, "a/b"), key(&ns, "a%2Fb"));
    }
}
