//! Queue definitions: the flags and `x-` arguments of `queue.declare`, how
//! RabbitMQ checks a redeclare against them, and where they are kept.
//!
//! A queue's messages live in the broker: the queue is a topic of its
//! namespace, read through the shared subscription
//! [`QUEUE_SUBSCRIPTION`]. What is AMQP's own is kept here: durable queues'
//! definitions in the broker's state store (area `amqp-queues`), so that a
//! redeclare after a restart is checked against what was declared.

use amq_protocol::types::{AMQPValue, FieldTable};
use magnetar_broker::StateStore;
use magnetar_tenancy::NamespaceName;
use serde::{Deserialize, Serialize};

use crate::error::{Exception, PRECONDITION_FAILED};
use crate::props::value_text;

/// The subscription AMQP consumers of a queue share.
pub const QUEUE_SUBSCRIPTION: &str = "amqp";
pub const STATE_AREA: &str = "amqp-queues";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
    Stream,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// The `x-` arguments this broker acts on, parsed and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueArgs {
    pub message_ttl_ms: Option<u64>,
    pub expires_ms: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub delivery_limit: Option<u64>,
    pub single_active_consumer: bool,
    pub max_priority: Option<u8>,
    pub queue_type: QueueType,
}

/// What `queue.declare` created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// The declare's arguments as sent, for equivalence checks.
    pub arguments: FieldTable,
    pub args: QueueArgs,
}

/// The arguments RabbitMQ compares on redeclare; others are ignored there.
const COMPARED: [&str; 11] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-single-active-consumer",
    "x-max-priority",
    "x-queue-type",
];

fn precondition(text: String) -> Exception {
    Exception::new(PRECONDITION_FAILED, text)
}

/// RabbitMQ's name of a field type, for error texts.
fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongLongInt(_) => "signedint",
        AMQPValue::ShortShortUInt(_) | AMQPValue::ShortUInt(_) | AMQPValue::LongUInt(_) => {
            "unsignedint"
        }
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "double",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::Void => "void",
    }
}

fn as_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

fn as_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            Some(String::from_utf8_lossy(&value_text(v)).into_owned())
        }
        _ => None,
    }
}

/// Parses and checks the arguments of a declare, with RabbitMQ's texts.
pub fn parse_args(queue: &str, t: &FieldTable) -> Result<QueueArgs, Exception> {
    let mut a = QueueArgs::default();
    let bad = |arg: &str, v: &AMQPValue, why: &str| {
        precondition(format!(
            "invalid arg '{arg}' for queue '{queue}': {why} ({} of type '{}')",
            String::from_utf8_lossy(&value_text(v)),
            type_name(v)
        ))
    };
    let non_negative = |arg: &str, v: &AMQPValue| -> Result<u64, Exception> {
        match as_int(v) {
            Some(n) if n >= 0 => Ok(n as u64),
            Some(_) => Err(bad(arg, v, "negative value")),
            None => Err(bad(arg, v, "unacceptable type")),
        }
    };
    for (k, v) in t {
        let k = k.as_str();
        match k {
            "x-message-ttl" => a.message_ttl_ms = Some(non_negative(k, v)?),
            "x-expires" => {
                let n = non_negative(k, v)?;
                if n == 0 {
                    return Err(bad(k, v, "value must be positive"));
                }
                a.expires_ms = Some(n);
            }
            "x-max-length" => a.max_length = Some(non_negative(k, v)?),
            "x-max-length-bytes" => a.max_length_bytes = Some(non_negative(k, v)?),
            "x-delivery-limit" => a.delivery_limit = Some(non_negative(k, v)?),
            "x-max-priority" => {
                let n = non_negative(k, v)?;
                if n > 255 {
                    return Err(bad(k, v, "max value is 255"));
                }
                a.max_priority = Some(n as u8);
            }
            "x-overflow" => {
                a.overflow = match as_str(v).as_deref() {
                    Some("drop-head") => Overflow::DropHead,
                    Some("reject-publish") => Overflow::RejectPublish,
                    Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                    _ => return Err(bad(k, v, "unknown overflow behaviour")),
                }
            }
            "x-dead-letter-exchange" => {
                a.dead_letter_exchange =
                    Some(as_str(v).ok_or_else(|| bad(k, v, "unacceptable type"))?);
            }
            "x-dead-letter-routing-key" => {
                a.dead_letter_routing_key =
                    Some(as_str(v).ok_or_else(|| bad(k, v, "unacceptable type"))?);
            }
            "x-single-active-consumer" => match v {
                AMQPValue::Boolean(b) => a.single_active_consumer = *b,
                _ => return Err(bad(k, v, "unacceptable type")),
            },
            "x-queue-type" => {
                a.queue_type = match as_str(v).as_deref() {
                    Some("classic") => QueueType::Classic,
                    Some("quorum") => QueueType::Quorum,
                    Some("stream") => QueueType::Stream,
                    _ => return Err(bad(k, v, "unsupported queue type")),
                }
            }
            _ => {}
        }
    }
    if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
        return Err(precondition(format!(
            "invalid arg 'x-dead-letter-routing-key' for queue '{queue}': \
             routing key specified without a dead letter exchange"
        )));
    }
    Ok(a)
}

impl QueueDef {
    pub fn new(
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<Self, Exception> {
        let args = parse_args(name, &arguments)?;
        if args.queue_type != QueueType::Classic && (exclusive || auto_delete || !durable) {
            return Err(precondition(format!(
                "invalid property '{}' for queue '{name}'",
                if !durable {
                    "non-durable"
                } else if exclusive {
                    "exclusive"
                } else {
                    "auto-delete"
                }
            )));
        }
        Ok(QueueDef {
            name: name.to_owned(),
            durable,
            exclusive,
            auto_delete,
            arguments,
            args,
        })
    }

    /// A queue the broker knows but AMQP did not declare (MQTT's, the
    /// admin API's): no arguments.
    pub fn implicit(name: &str, durable: bool) -> Self {
        QueueDef {
            name: name.to_owned(),
            durable,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
            args: QueueArgs::default(),
        }
    }

    /// RabbitMQ's redeclare check: the flags, then each compared argument.
    pub fn check_equivalent(&self, other: &QueueDef, vhost: &str) -> Result<(), Exception> {
        let flag = |name: &str, now: bool, got: bool| {
            if now == got {
                return Ok(());
            }
            Err(precondition(format!(
                "inequivalent arg '{name}' for queue '{}' in vhost '{vhost}': received '{got}' but current is '{now}'",
                self.name
            )))
        };
        flag("durable", self.durable, other.durable)?;
        flag("exclusive", self.exclusive, other.exclusive)?;
        flag("auto_delete", self.auto_delete, other.auto_delete)?;
        for arg in COMPARED {
            let now = self.arguments.inner().get(arg);
            let got = other.arguments.inner().get(arg);
            let same = match (now, got) {
                (Some(a), Some(b)) => match (as_int(a), as_int(b)) {
                    (Some(x), Some(y)) => x == y,
                    _ => value_text(a) == value_text(b) && type_name(a) == type_name(b),
                },
                (None, None) => true,
                // x-queue-type classic is what a queue without it is.
                (None, Some(v)) | (Some(v), None) => {
                    arg == "x-queue-type" && as_str(v).as_deref() == Some("classic")
                }
            };
            if same {
                continue;
            }
            let describe = |v: Option<&AMQPValue>| match v {
                Some(v) => format!(
                    "the value '{}' of type '{}'",
                    String::from_utf8_lossy(&value_text(v)),
                    type_name(v)
                ),
                None => "none".to_owned(),
            };
            return Err(precondition(format!(
                "inequivalent arg '{arg}' for queue '{}' in vhost '{vhost}': received {} but current is {}",
                self.name,
                describe(got),
                describe(now)
            )));
        }
        Ok(())
    }
}

fn key(ns: &NamespaceName, queue: &str) -> String {
    format!("{}/{}", ns, magnetar_tenancy::names::encode_segment(queue))
}

pub async fn load(
    store: &StateStore,
    ns: &NamespaceName,
    queue: &str,
) -> magnetar_broker::Result<Option<QueueDef>> {
    let Some(v) = store.get(&key(ns, queue)).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&v.value).ok())
}

pub async fn save(
    store: &StateStore,
    ns: &NamespaceName,
    def: &QueueDef,
) -> magnetar_broker::Result<()> {
    let json = serde_json::to_vec(def).unwrap_or_default();
    store.put(&key(ns, &def.name), json).await.map(drop)
}

pub async fn remove(
    store: &StateStore,
    ns: &NamespaceName,
    queue: &str,
) -> magnetar_broker::Result<()> {
    store.delete(&key(ns, queue)).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::LongString;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn arguments_are_parsed_and_checked() {
        let t = table(&[
            ("x-message-ttl", AMQPValue::LongInt(500)),
            ("x-max-length", AMQPValue::ShortShortUInt(3)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString("dlx".into()),
            ),
            (
                "x-queue-type",
                AMQPValue::LongString(LongString::from("quorum")),
            ),
        ]);
        let a = parse_args("q", &t).expect("ok");
        assert_eq!(a.message_ttl_ms, Some(500));
        assert_eq!(a.max_length, Some(3));
        assert_eq!(a.overflow, Overflow::RejectPublish);
        assert_eq!(a.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(a.queue_type, QueueType::Quorum);
        let e = parse_args("q", &table(&[("x-message-ttl", AMQPValue::LongInt(-1))]))
            .expect_err("an error");
        assert_eq!(e.code, 406);
        let e = parse_args(
            "q",
            &table(&[("x-overflow", AMQPValue::LongString("x".into()))]),
        )
        .expect_err("an error");
        assert_eq!(e.code, 406);
    }

    #[test]
    fn redeclare_must_be_equivalent() {
        let a = QueueDef::new(
            "q",
            true,
            false,
            false,
            table(&[("x-message-ttl", AMQPValue::LongInt(500))]),
        )
        .expect("ok");
        let same_value_other_width = QueueDef::new(
            "q",
            true,
            false,
            false,
            table(&[("x-message-ttl", AMQPValue::LongLongInt(500))]),
        )
        .expect("ok");
        a.check_equivalent(&same_value_other_width, "/")
            .expect("ok");
        let other_ttl = QueueDef::new(
            "q",
            true,
            false,
            false,
            table(&[("x-message-ttl", AMQPValue::LongInt(2000))]),
        )
        .expect("ok");
        let e = a.check_equivalent(&other_ttl, "/").expect_err("an error");
        assert_eq!(e.code, 406);
        assert!(
            e.text.contains("inequivalent arg 'x-message-ttl'"),
            "{}",
            e.text
        );
        let not_durable = QueueDef::new("q", false, false, false, a.arguments.clone()).expect("ok");
        let e = a.check_equivalent(&not_durable, "/").expect_err("an error");
        assert!(e.text.contains("'durable'"), "{}", e.text);
    }

    #[test]
    fn quorum_and_stream_queues_must_be_durable_and_shared() {
        let t = table(&[("x-queue-type", AMQPValue::LongString("stream".into()))]);
        assert!(QueueDef::new("s", true, false, false, t.clone()).is_ok());
        assert_eq!(
            QueueDef::new("s", false, false, false, t.clone())
                .expect_err("an error")
                .code,
            406
        );
        assert_eq!(
            QueueDef::new("s", true, true, false, t)
                .expect_err("an error")
                .code,
            406
        );
    }
}
