//! How an AMQP message maps onto a stored record, and back.
//!
//! A record is what every protocol reads (ARCHITECTURE.md, "Message
//! mapping"):
//! - the body is the record value;
//! - the routing key is the record key, and also the header
//!   `amqp.routing-key`, with the exchange in `amqp.exchange`;
//! - each basic property is a header `amqp.<property>` in text
//!   (`amqp.content-type`, `amqp.delivery-mode`, `amqp.timestamp`, ...);
//! - each application header is a record header of the same name, its
//!   value in text: strings as they are, numbers in decimal, booleans as
//!   `true`/`false`, byte arrays raw, tables and arrays as JSON. When any
//!   value is not a string, the whole table is also kept in
//!   `amqp.headers` (AMQP wire encoding), so that AMQP consumers get back
//!   the exact types their publisher sent.
//!
//! Records written by other protocols reach AMQP consumers with their
//! headers as long strings, their key as the routing key, and no
//! properties beyond those they carry under `amqp.`.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use magnetar_broker::routing::HeaderValue;
use magnetar_broker::Message;

pub const PREFIX: &str = "amqp.";
pub const H_ROUTING_KEY: &str = "amqp.routing-key";
pub const H_EXCHANGE: &str = "amqp.exchange";
pub const H_HEADERS: &str = "amqp.headers";
pub const H_EXPIRATION: &str = "amqp.expiration";
pub const H_DELIVERY_MODE: &str = "amqp.delivery-mode";
pub const H_PRIORITY: &str = "amqp.priority";

/// A message as published: where to, its properties and its body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    pub body: Bytes,
}

/// The parts of a stored record an AMQP delivery is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivered {
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    pub body: Bytes,
}

fn text(v: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(v.as_bytes()))
}

/// A field value in text, for protocols without AMQP's types.
pub fn value_text(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
        AMQPValue::Float(f) => f.to_string().into_bytes(),
        AMQPValue::Double(f) => f.to_string().into_bytes(),
        AMQPValue::Timestamp(t) => t.to_string().into_bytes(),
        AMQPValue::DecimalValue(d) => {
            let v = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            v.to_string().into_bytes()
        }
        AMQPValue::Void => Vec::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => json_of(v).to_string().into_bytes(),
    }
}

/// JSON for nested values, so that Kafka and MQTT readers can parse them.
pub fn json_of(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::FieldTable(t) => J::Object(
            t.into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), json_of(v)))
                .collect(),
        ),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(json_of).collect()),
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::Void => J::Null,
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        AMQPValue::ShortShortInt(n) => J::from(*n),
        AMQPValue::ShortShortUInt(n) => J::from(*n),
        AMQPValue::ShortInt(n) => J::from(*n),
        AMQPValue::ShortUInt(n) => J::from(*n),
        AMQPValue::LongInt(n) => J::from(*n),
        AMQPValue::LongUInt(n) => J::from(*n),
        AMQPValue::LongLongInt(n) => J::from(*n),
        AMQPValue::Timestamp(n) => J::from(*n),
        other => J::String(String::from_utf8_lossy(&value_text(other)).into_owned()),
    }
}

/// The typed value a headers exchange matches on.
pub fn header_value(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongLongInt(n) => HeaderValue::Int(*n),
        AMQPValue::Timestamp(n) => HeaderValue::Int(i64::try_from(*n).unwrap_or(i64::MAX)),
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => HeaderValue::Str(s.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => HeaderValue::Void,
        other => HeaderValue::Str(String::from_utf8_lossy(&value_text(other)).into_owned()),
    }
}

/// A field table as routing headers (binding arguments or message headers).
pub fn header_values(t: &FieldTable) -> Vec<(String, HeaderValue)> {
    t.into_iter()
        .map(|(k, v)| (k.as_str().to_owned(), header_value(v)))
        .collect()
}

pub fn encode_table(t: &FieldTable) -> Vec<u8> {
    match gen_field_table(t)(WriteContext::from(Vec::new())) {
        Ok(ctx) => ctx.write,
        Err(_) => Vec::new(),
    }
}

pub fn decode_table(b: &[u8]) -> Option<FieldTable> {
    parse_field_table(b).ok().map(|(_, t)| t)
}

fn is_plain_string(v: &AMQPValue) -> bool {
    matches!(v, AMQPValue::LongString(_) | AMQPValue::ShortString(_))
}

/// The record for a published message.
pub fn to_record(p: &Published) -> Message {
    let props = &p.properties;
    let mut headers: Vec<(String, Option<Bytes>)> = Vec::with_capacity(8);
    // The default exchange is what a record without this header came by.
    if !p.exchange.is_empty() {
        headers.push((H_EXCHANGE.into(), text(&p.exchange)));
    }
    let key = Bytes::copy_from_slice(p.routing_key.as_bytes());
    headers.push((H_ROUTING_KEY.into(), Some(key.clone())));
    let mut put = |name: &str, v: Option<Bytes>| {
        if let Some(v) = v {
            headers.push((name.to_owned(), Some(v)));
        }
    };
    let s = |v: &Option<ShortString>| {
        v.as_ref()
            .map(|s| Bytes::copy_from_slice(s.as_str().as_bytes()))
    };
    let n = |v: Option<String>| v.map(|v| Bytes::from(v.into_bytes()));
    put("amqp.content-type", s(props.content_type()));
    put("amqp.content-encoding", s(props.content_encoding()));
    put(
        H_DELIVERY_MODE,
        match props.delivery_mode() {
            Some(1) => Some(Bytes::from_static(b"1")),
            Some(2) => Some(Bytes::from_static(b"2")),
            other => n(other.map(|d| d.to_string())),
        },
    );
    put(H_PRIORITY, n(props.priority().map(|d| d.to_string())));
    put("amqp.correlation-id", s(props.correlation_id()));
    put("amqp.reply-to", s(props.reply_to()));
    put(H_EXPIRATION, s(props.expiration()));
    put("amqp.message-id", s(props.message_id()));
    put(
        "amqp.timestamp",
        n(props.timestamp().map(|d| d.to_string())),
    );
    put("amqp.type", s(props.kind()));
    put("amqp.user-id", s(props.user_id()));
    put("amqp.app-id", s(props.app_id()));
    put("amqp.cluster-id", s(props.cluster_id()));
    if let Some(table) = props.headers() {
        let mut typed = table
            .into_iter()
            .any(|(k, _)| k.as_str().starts_with(PREFIX));
        // The `amqp.` headers are the mapping's own: an application header
        // of that name would stand in for the exchange, routing key or
        // properties that readers take from the record. It still reaches
        // AMQP consumers, in the typed table.
        for (k, v) in table
            .into_iter()
            .filter(|(k, _)| !k.as_str().starts_with(PREFIX))
        {
            typed |= !is_plain_string(v);
            headers.push((k.as_str().to_owned(), Some(Bytes::from(value_text(v)))));
        }
        if typed {
            headers.push((H_HEADERS.into(), Some(Bytes::from(encode_table(table)))));
        }
    }
    Message {
        key: Some(key),
        value: Some(p.body.clone()),
        headers,
        timestamp_ms: 0,
    }
}

fn header_str<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn short(v: &str) -> Option<ShortString> {
    ShortString::try_new(v).ok()
}

/// The delivery for a stored record, from any protocol. `queue` names the
/// routing key of records that carry neither a routing key nor a key.
/// One pass over the headers: `amqp.` ones fill the properties, the rest
/// become the headers table.
pub fn from_record(m: &Message, queue: &str) -> Delivered {
    let mut exchange = String::new();
    let mut routing_key: Option<String> = None;
    let mut props = AMQPProperties::default();
    let mut typed: Option<FieldTable> = None;
    let mut plain: Vec<(&str, &Option<Bytes>)> = Vec::new();
    for (k, v) in &m.headers {
        let Some(prop) = k.strip_prefix(PREFIX) else {
            plain.push((k.as_str(), v));
            continue;
        };
        let Some(raw) = v.as_deref() else {
            continue;
        };
        if prop == "headers" {
            typed = decode_table(raw);
            continue;
        }
        let Ok(val) = std::str::from_utf8(raw) else {
            continue;
        };
        let sh = || short(val);
        props = match prop {
            "exchange" => {
                exchange = val.to_owned();
                props
            }
            "routing-key" => {
                routing_key = Some(val.to_owned());
                props
            }
            "content-type" => match sh() {
                Some(v) => props.with_content_type(v),
                None => props,
            },
            "content-encoding" => match sh() {
                Some(v) => props.with_content_encoding(v),
                None => props,
            },
            "delivery-mode" => match val.parse() {
                Ok(v) => props.with_delivery_mode(v),
                Err(_) => props,
            },
            "priority" => match val.parse() {
                Ok(v) => props.with_priority(v),
                Err(_) => props,
            },
            "correlation-id" => match sh() {
                Some(v) => props.with_correlation_id(v),
                None => props,
            },
            "reply-to" => match sh() {
                Some(v) => props.with_reply_to(v),
                None => props,
            },
            "expiration" => match sh() {
                Some(v) => props.with_expiration(v),
                None => props,
            },
            "message-id" => match sh() {
                Some(v) => props.with_message_id(v),
                None => props,
            },
            "timestamp" => match val.parse() {
                Ok(v) => props.with_timestamp(v),
                Err(_) => props,
            },
            "type" => match sh() {
                Some(v) => props.with_type(v),
                None => props,
            },
            "user-id" => match sh() {
                Some(v) => props.with_user_id(v),
                None => props,
            },
            "app-id" => match sh() {
                Some(v) => props.with_app_id(v),
                None => props,
            },
            "cluster-id" => match sh() {
                Some(v) => props.with_cluster_id(v),
                None => props,
            },
            _ => props,
        };
    }
    let routing_key = routing_key
        .or_else(|| {
            m.key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .unwrap_or_else(|| queue.to_owned());
    let had_typed = typed.is_some();
    let mut table = typed.unwrap_or_default();
    for (k, v) in plain {
        let Ok(name) = ShortString::try_new(k) else {
            continue;
        };
        if had_typed && table.contains_key(k) {
            continue;
        }
        let value = match v {
            Some(v) => AMQPValue::LongString(LongString::from(v.to_vec())),
            None => AMQPValue::Void,
        };
        table.insert(name, value);
    }
    if !table.inner().is_empty() {
        props = props.with_headers(table);
    }
    Delivered {
        exchange,
        routing_key,
        properties: props,
        body: m.value.clone().unwrap_or_default(),
    }
}

/// RabbitMQ's per-message TTL: `expiration` is milliseconds in decimal.
pub fn expiration_ms(props: &AMQPProperties) -> Option<Result<u64, String>> {
    props.expiration().as_ref().map(|e| {
        e.as_str()
            .parse::<u64>()
            .map_err(|_| format!("invalid expiration '{}'", e.as_str()))
    })
}

/// The stored record's expiration, if it has one.
pub fn record_expiration_ms(m: &Message) -> Option<u64> {
    header_str(m, H_EXPIRATION).and_then(|v| v.parse().ok())
}

/// A record header's text value.
pub fn record_header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    header_str(m, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> Published {
        let mut h = FieldTable::default();
        h.insert("trace".into(), AMQPValue::LongString("abc".into()));
        h.insert("count".into(), AMQPValue::LongInt(3));
        h.insert("ok".into(), AMQPValue::Boolean(true));
        Published {
            exchange: "logs".into(),
            routing_key: "kern.info".into(),
            properties: AMQPProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_correlation_id("c-1".into())
                .with_reply_to("replies".into())
                .with_timestamp(1_700_000_000)
                .with_headers(h),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn amqp_round_trip_keeps_types_and_properties() {
        let p = published();
        let rec = to_record(&p);
        assert_eq!(rec.key.as_deref(), Some(&b"kern.info"[..]));
        let d = from_record(&rec, "q");
        assert_eq!(d.exchange, "logs");
        assert_eq!(d.routing_key, "kern.info");
        assert_eq!(d.properties, p.properties);
        assert_eq!(d.body, p.body);
    }

    #[test]
    fn a_poison_headers_table_is_dropped_not_recursed_into() {
        // 200,000 nested arrays (1 MB), as a Kafka producer can store them:
        // each an 'A' and the length of the ones inside, written outermost
        // first in one pass.
        let levels = 200_000u32;
        let mut v: Vec<u8> = Vec::with_capacity(5 * levels as usize);
        for inside in (0..levels).rev() {
            v.push(b'A');
            v.extend_from_slice(&(5 * inside).to_be_bytes());
        }
        let mut table = vec![1u8, b'x'];
        table.extend_from_slice(&v);
        let mut raw = (table.len() as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&table);
        let rec = Message {
            key: None,
            value: Some(Bytes::from_static(b"body")),
            headers: vec![
                ("trace".into(), Some(Bytes::from_static(b"t-1"))),
                (H_HEADERS.into(), Some(Bytes::from(raw))),
            ],
            timestamp_ms: 0,
        };
        let d = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || from_record(&rec, "q"))
            .expect("spawn")
            .join()
            .expect("no stack overflow");
        let headers = d.properties.headers().clone().expect("plain headers");
        assert_eq!(
            headers.inner().get("trace"),
            Some(&AMQPValue::LongString("t-1".into()))
        );
        assert_eq!(headers.inner().len(), 1);
        assert_eq!(d.body, Bytes::from_static(b"body"));
    }

    #[test]
    fn application_headers_cannot_stand_in_for_the_mapping() {
        let mut h = FieldTable::default();
        h.insert(
            "amqp.exchange".into(),
            AMQPValue::LongString("spoofed".into()),
        );
        h.insert(
            "amqp.routing-key".into(),
            AMQPValue::LongString("other".into()),
        );
        let p = Published {
            exchange: "logs".into(),
            routing_key: "kern.info".into(),
            properties: AMQPProperties::default().with_headers(h.clone()),
            body: Bytes::from_static(b"{}"),
        };
        let d = from_record(&to_record(&p), "q");
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("logs", "kern.info")
        );
        // AMQP consumers still get them, as the publisher sent them.
        assert_eq!(d.properties.headers().as_ref(), Some(&h));
    }

    #[test]
    fn other_protocols_see_text_headers() {
        let rec = to_record(&published());
        let get = |n: &str| record_header(&rec, n).map(str::to_owned);
        assert_eq!(get("count").as_deref(), Some("3"));
        assert_eq!(get("ok").as_deref(), Some("true"));
        assert_eq!(get("trace").as_deref(), Some("abc"));
        assert_eq!(
            get("amqp.content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(get("amqp.delivery-mode").as_deref(), Some("2"));
    }

    #[test]
    fn plain_string_headers_are_not_stored_twice() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::LongString("x".into()));
        let p = Published {
            properties: AMQPProperties::default().with_headers(h.clone()),
            ..Published::default()
        };
        let rec = to_record(&p);
        assert!(record_header(&rec, H_HEADERS).is_none());
        assert_eq!(from_record(&rec, "q").properties.headers(), &Some(h));
    }

    #[test]
    fn records_from_other_protocols_become_deliveries() {
        let rec = Message {
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"v")),
            headers: vec![("h".into(), Some(Bytes::from_static(b"1")))],
            timestamp_ms: 5,
        };
        let d = from_record(&rec, "q");
        assert_eq!(d.exchange, "");
        assert_eq!(d.routing_key, "k1");
        let h = d.properties.headers().clone().expect("ok");
        assert_eq!(
            h.inner().get("h"),
            Some(&AMQPValue::LongString(LongString::from("1")))
        );
        let bare = Message::new("x");
        assert_eq!(from_record(&bare, "orders").routing_key, "orders");
    }
}
