//! Dead-lettering as RabbitMQ does it: a message rejected without requeue,
//! expired, pushed out by a length limit or past its delivery limit is
//! republished to the queue's dead-letter exchange, with its history in
//! the `x-death` header.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use crate::props::Published;

/// Why a message left its queue, in RabbitMQ's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn text_of(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(l) => Some(String::from_utf8_lossy(l.as_bytes()).into_owned()),
        AMQPValue::ShortString(x) => Some(x.as_str().to_owned()),
        _ => None,
    }
}

/// The message as it goes to the dead-letter exchange: `x-death` gains or
/// bumps the entry for this queue and reason (moved to the front), the
/// `x-first-death-*` headers are set once, `x-last-death-*` every time,
/// and a per-message expiration moves into the entry so that the copy
/// does not expire again.
pub fn dead_lettered(
    mut msg: Published,
    queue: &str,
    reason: Reason,
    dlx: &str,
    dlrk: Option<&str>,
    now_s: u64,
) -> Published {
    let props = msg.properties.clone();
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        text_of(t.inner().get("queue")).as_deref() == Some(queue)
            && text_of(t.inner().get("reason")).as_deref() == Some(reason.as_str())
    };
    let existing = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => same(t),
        _ => false,
    });
    let entry = match existing.map(|i| deaths.remove(i)) {
        Some(AMQPValue::FieldTable(mut t)) => {
            let count = match t.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => *n,
                Some(AMQPValue::LongInt(n)) => i64::from(*n),
                _ => 0,
            };
            t.insert(
                "count".into(),
                AMQPValue::LongLongInt(count.saturating_add(1)),
            );
            t.insert("time".into(), AMQPValue::Timestamp(now_s));
            t
        }
        _ => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), s(reason.as_str()));
            t.insert("queue".into(), s(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now_s));
            t.insert("exchange".into(), s(&msg.exchange));
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![s(&msg.routing_key)])),
            );
            if let Some(exp) = props.expiration() {
                t.insert("original-expiration".into(), s(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), s(reason.as_str()));
        headers.insert("x-first-death-queue".into(), s(queue));
        headers.insert("x-first-death-exchange".into(), s(&msg.exchange));
    }
    headers.insert("x-last-death-reason".into(), s(reason.as_str()));
    headers.insert("x-last-death-queue".into(), s(queue));
    headers.insert("x-last-death-exchange".into(), s(&msg.exchange));
    msg.properties = without_expiration(props).with_headers(headers);
    if let Some(k) = dlrk {
        msg.routing_key = k.to_owned();
    }
    msg.exchange = dlx.to_owned();
    msg
}

/// The properties minus `expiration`; the generated type has setters only.
fn without_expiration(p: AMQPProperties) -> AMQPProperties {
    let mut out = AMQPProperties::default();
    let sh = |v: &Option<ShortString>| v.clone();
    if let Some(v) = sh(p.content_type()) {
        out = out.with_content_type(v);
    }
    if let Some(v) = sh(p.content_encoding()) {
        out = out.with_content_encoding(v);
    }
    if let Some(v) = *p.delivery_mode() {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = *p.priority() {
        out = out.with_priority(v);
    }
    if let Some(v) = sh(p.correlation_id()) {
        out = out.with_correlation_id(v);
    }
    if let Some(v) = sh(p.reply_to()) {
        out = out.with_reply_to(v);
    }
    if let Some(v) = sh(p.message_id()) {
        out = out.with_message_id(v);
    }
    if let Some(v) = *p.timestamp() {
        out = out.with_timestamp(v);
    }
    if let Some(v) = sh(p.kind()) {
        out = out.with_type(v);
    }
    if let Some(v) = sh(p.user_id()) {
        out = out.with_user_id(v);
    }
    if let Some(v) = sh(p.app_id()) {
        out = out.with_app_id(v);
    }
    if let Some(v) = sh(p.cluster_id()) {
        out = out.with_cluster_id(v);
    }
    if let Some(h) = p.headers() {
        out = out.with_headers(h.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg() -> Published {
        Published {
            exchange: "work".into(),
            routing_key: "jobs".into(),
            properties: AMQPProperties::default().with_expiration("5000".into()),
            body: Bytes::from_static(b"x"),
        }
    }

    fn death(p: &Published, i: usize) -> FieldTable {
        match p
            .properties
            .headers()
            .as_ref()
            .expect("ok")
            .inner()
            .get("x-death")
        {
            Some(AMQPValue::FieldArray(a)) => match &a.as_slice()[i] {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_death_records_everything() {
        let d = dead_lettered(msg(), "q1", Reason::Rejected, "dlx", None, 100);
        assert_eq!(d.exchange, "dlx");
        assert_eq!(d.routing_key, "jobs");
        assert!(d.properties.expiration().is_none());
        let t = death(&d, 0);
        assert_eq!(t.inner()["count"], AMQPValue::LongLongInt(1));
        assert_eq!(t.inner()["reason"], s("rejected"));
        assert_eq!(t.inner()["queue"], s("q1"));
        assert_eq!(t.inner()["exchange"], s("work"));
        assert_eq!(t.inner()["original-expiration"], s("5000"));
        assert_eq!(t.inner()["time"], AMQPValue::Timestamp(100));
        let h = d.properties.headers().clone().expect("ok");
        assert_eq!(h.inner()["x-first-death-reason"], s("rejected"));
        assert_eq!(h.inner()["x-first-death-queue"], s("q1"));
    }

    #[test]
    fn repeated_deaths_count_and_move_to_the_front() {
        let a = dead_lettered(msg(), "q1", Reason::Rejected, "dlx", Some("retry"), 1);
        assert_eq!(a.routing_key, "retry");
        let b = dead_lettered(a, "q2", Reason::Expired, "back", None, 2);
        let c = dead_lettered(b, "q1", Reason::Rejected, "dlx", None, 3);
        let first = death(&c, 0);
        assert_eq!(first.inner()["queue"], s("q1"));
        assert_eq!(first.inner()["count"], AMQPValue::LongLongInt(2));
        assert_eq!(death(&c, 1).inner()["reason"], s("expired"));
        let h = c.properties.headers().clone().expect("ok");
        assert_eq!(h.inner()["x-first-death-queue"], s("q1"));
        assert_eq!(h.inner()["x-last-death-reason"], s("rejected"));
        assert_eq!(h.inner()["x-first-death-reason"], s("rejected"));
    }
}
