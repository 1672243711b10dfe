//! What a connection asks for, read from its path and query string before
//! the upgrade, with Pulsar's parameter names and defaults. Anything
//! unreadable is refused with HTTP 400 before a socket exists.

use std::time::Duration;

use magnetar_broker::subscription::{DeadLetterPolicy, InitialPosition, SubscriptionType};
use magnetar_tenancy::{NamespaceName, TopicDomain, TopicName};

use crate::message_id::MessageId;

/// Pulsar's cap on `receiverQueueSize` for WebSocket consumers.
pub const MAX_RECEIVER_QUEUE: u32 = 1000;
/// Pulsar's default `negativeAckRedeliveryDelay`.
pub const DEFAULT_NACK_DELAY: Duration = Duration::from_secs(60);

/// Why a request is refused before the upgrade: an HTTP status and the
/// message Pulsar would give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }

    pub fn bad_params(why: impl std::fmt::Display) -> Self {
        Refusal::new(400, format!("Invalid query params: {why}"))
    }
}

/// The query string as given: names may repeat, and the first value
/// counts, as with a servlet's `getParameter`.
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Refusal> {
        match self.get(name).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Refusal::bad_params(format!("{name}={v} is not a number"))),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }
}

/// Which topics a consumer reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topics {
    /// One topic (every partition of it, if it is partitioned).
    One(TopicName),
    /// `/ws/v3/consumer?topics=a,b`.
    List(Vec<TopicName>),
    /// `/ws/v3/consumer?topicsPattern=persistent://t/ns/regex`: the
    /// namespace's topics whose full name matches, found again as topics
    /// appear.
    Pattern {
        namespace: NamespaceName,
        domain: TopicDomain,
        regex: String,
    },
}

impl Topics {
    pub fn namespace(&self) -> Option<&NamespaceName> {
        match self {
            Topics::One(t) => Some(t.namespace()),
            Topics::List(ts) => ts.first().map(TopicName::namespace),
            Topics::Pattern { namespace, .. } => Some(namespace),
        }
    }
}

/// Flow control, as Pulsar's handler does it: in push mode at most
/// `receiver_queue_size` messages are out unacknowledged; in pull mode a
/// message goes out only against a `permit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowParams {
    pub receiver_queue_size: u32,
    pub pull_mode: bool,
}

#[derive(Clone, Debug)]
pub struct ConsumerRequest {
    pub topics: Topics,
    pub subscription: String,
    pub sub_type: SubscriptionType,
    pub flow: FlowParams,
    pub ack_timeout: Option<Duration>,
    pub nack_delay: Duration,
    pub dead_letter: Option<DeadLetterPolicy>,
    pub consumer_name: String,
    pub priority: i32,
    pub initial_position: InitialPosition,
    pub durable: bool,
}

/// Where a reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderStart {
    Earliest,
    Latest,
    /// The message after this one (Pulsar's readers start exclusive).
    After(MessageId),
}

#[derive(Clone, Debug)]
pub struct ReaderRequest {
    pub topic: TopicName,
    pub start: ReaderStart,
    pub flow: FlowParams,
    pub reader_name: String,
}

#[derive(Clone, Debug)]
pub struct ProducerRequest {
    pub topic: TopicName,
    pub producer_name: Option<String>,
}

#[derive(Clone, Debug)]
pub enum Request {
    Producer(ProducerRequest),
    Consumer(ConsumerRequest),
    Reader(ReaderRequest),
}

impl Request {
    /// The namespace whose grants apply.
    pub fn namespace(&self) -> Option<&NamespaceName> {
        match self {
            Request::Producer(p) => Some(p.topic.namespace()),
            Request::Consumer(c) => c.topics.namespace(),
            Request::Reader(r) => Some(r.topic.namespace()),
        }
    }
}

fn topic(domain: &str, tenant: &str, ns: &str, local: &str) -> Result<TopicName, Refusal> {
    let domain = TopicDomain::parse(domain).map_err(|e| Refusal::new(400, e.to_string()))?;
    NamespaceName::new(tenant, ns)
        .and_then(|n| n.topic(domain, local))
        .map_err(|e| Refusal::new(400, e.to_string()))
}

/// `/ws/v2/{producer|consumer|reader}/{domain}/{tenant}/{ns}/{rest}`: the
/// rest is the topic, and for a consumer the topic and the subscription.
pub fn parse_v2(
    kind: &str,
    domain: &str,
    tenant: &str,
    ns: &str,
    rest: &str,
    q: &Params,
) -> Result<Request, Refusal> {
    match kind {
        "producer" => Ok(Request::Producer(ProducerRequest {
            topic: topic(domain, tenant, ns, rest)?,
            producer_name: q.get("producerName").map(str::to_owned),
        })),
        "consumer" => {
            let Some((local, sub)) = rest.rsplit_once('/') else {
                return Err(Refusal::new(
                    400,
                    "the consumer path is /ws/v2/consumer/{domain}/{tenant}/{namespace}/{topic}/{subscription}",
                ));
            };
            let t = topic(domain, tenant, ns, local)?;
            Ok(Request::Consumer(consumer(Topics::One(t), sub, q)?))
        }
        "reader" => Ok(Request::Reader(reader(
            topic(domain, tenant, ns, rest)?,
            q,
        )?)),
        other => Err(Refusal::new(404, format!("no such endpoint: {other}"))),
    }
}

/// `/ws/v3/consumer/{subscription}?topics=…` or `?topicsPattern=…`.
pub fn parse_v3(subscription: &str, q: &Params) -> Result<Request, Refusal> {
    let topics = match (q.get("topics"), q.get("topicsPattern")) {
        (Some(list), None) => {
            let mut ts = Vec::new();
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let t: TopicName = name
                    .parse()
                    .map_err(|e| Refusal::bad_params(format!("topics: {e}")))?;
                if !ts.contains(&t) {
                    ts.push(t);
                }
            }
            if ts.is_empty() {
                return Err(Refusal::bad_params("topics is empty"));
            }
            if ts.iter().any(|t| t.namespace() != ts[0].namespace()) {
                return Err(Refusal::bad_params(
                    "the topics of one consumer must be in one namespace",
                ));
            }
            Topics::List(ts)
        }
        (None, Some(pattern)) => parse_pattern(pattern)?,
        _ => {
            return Err(Refusal::bad_params(
                "exactly one of topics and topicsPattern must be given",
            ))
        }
    };
    Ok(Request::Consumer(consumer(topics, subscription, q)?))
}

/// `domain://tenant/namespace/regex`; the regex is matched against whole
/// topic names, as Pulsar's pattern consumers do.
fn parse_pattern(p: &str) -> Result<Topics, Refusal> {
    let bad = |why: &str| Refusal::bad_params(format!("topicsPattern {p:?}: {why}"));
    let (domain, rest) = match p.split_once("://") {
        Some((d, rest)) => (
            TopicDomain::parse(d).map_err(|e| bad(&e.to_string()))?,
            rest,
        ),
        None => (TopicDomain::Persistent, p),
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(tenant), Some(ns), Some(local)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected domain://tenant/namespace/regex"));
    };
    let namespace = NamespaceName::new(tenant, ns).map_err(|e| bad(&e.to_string()))?;
    let regex = format!("^{}://{namespace}/(?:{local})$", domain.as_str());
    regex::Regex::new(&regex).map_err(|e| bad(&e.to_string()))?;
    Ok(Topics::Pattern {
        namespace,
        domain,
        regex,
    })
}

fn flow(q: &Params) -> Result<FlowParams, Refusal> {
    let size = q.number::<i64>("receiverQueueSize")?.unwrap_or(1000);
    Ok(FlowParams {
        receiver_queue_size: u32::try_from(size.clamp(1, i64::from(MAX_RECEIVER_QUEUE)))
            .unwrap_or(MAX_RECEIVER_QUEUE),
        pull_mode: q.flag("pullMode"),
    })
}

fn consumer(topics: Topics, subscription: &str, q: &Params) -> Result<ConsumerRequest, Refusal> {
    if subscription.is_empty() {
        return Err(Refusal::bad_params("the subscription name is empty"));
    }
    let sub_type = match q.get("subscriptionType") {
        None | Some("") => SubscriptionType::Exclusive,
        Some(s) => SubscriptionType::parse(s).map_err(|e| Refusal::bad_params(e.to_string()))?,
    };
    let ack_timeout = q
        .number::<u64>("ackTimeoutMillis")?
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis);
    let nack_delay = q
        .number::<u64>("negativeAckRedeliveryDelay")?
        .map_or(DEFAULT_NACK_DELAY, Duration::from_millis);
    let dead_letter = match q.number::<i64>("maxRedeliverCount")? {
        Some(n) if n > 0 => Some(DeadLetterPolicy {
            max_redeliveries: u32::try_from(n).unwrap_or(u32::MAX),
            topic: q
                .get("deadLetterTopic")
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        }),
        _ => None,
    };
    let initial_position = match q.get("subscriptionInitialPosition") {
        None | Some("") => InitialPosition::Latest,
        Some(p) if p.eq_ignore_ascii_case("latest") => InitialPosition::Latest,
        Some(p) if p.eq_ignore_ascii_case("earliest") => InitialPosition::Earliest,
        Some(p) => {
            return Err(Refusal::bad_params(format!(
                "subscriptionInitialPosition={p}: expected Earliest or Latest"
            )))
        }
    };
    let durable = match q.get("subscriptionMode") {
        None | Some("") => true,
        Some(m) if m.eq_ignore_ascii_case("durable") => true,
        Some(m) if m.eq_ignore_ascii_case("nondurable") => false,
        Some(m) => {
            return Err(Refusal::bad_params(format!(
                "subscriptionMode={m}: expected Durable or NonDurable"
            )))
        }
    };
    Ok(ConsumerRequest {
        topics,
        subscription: subscription.to_owned(),
        sub_type,
        flow: flow(q)?,
        ack_timeout,
        nack_delay,
        dead_letter,
        consumer_name: q.get("consumerName").unwrap_or_default().to_owned(),
        priority: q.number::<i32>("priorityLevel")?.unwrap_or(0),
        initial_position,
        durable,
    })
}

fn reader(topic: TopicName, q: &Params) -> Result<ReaderRequest, Refusal> {
    let start = match q.get("messageId").map(str::trim) {
        None | Some("") | Some("latest") => ReaderStart::Latest,
        Some("earliest") => ReaderStart::Earliest,
        Some(id) => ReaderStart::After(
            MessageId::decode(id).map_err(|e| Refusal::bad_params(format!("messageId: {e}")))?,
        ),
    };
    Ok(ReaderRequest {
        topic,
        start,
        flow: FlowParams {
            // Readers have no pull mode.
            pull_mode: false,
            ..flow(q)?
        },
        reader_name: q.get("readerName").unwrap_or_default().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Params {
        Params(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn consumer_options_follow_pulsar() {
        let r = parse_v2(
            "consumer",
            "persistent",
            "public",
            "default",
            "orders/sub-1",
            &q(&[
                ("subscriptionType", "Key_Shared"),
                ("receiverQueueSize", "5000"),
                ("ackTimeoutMillis", "1500"),
                ("maxRedeliverCount", "3"),
                ("pullMode", "true"),
                ("receiverQueueSize", "7"),
            ]),
        )
        .expect("request");
        let Request::Consumer(c) = r else {
            panic!("not a consumer: {r:?}")
        };
        assert_eq!(c.subscription, "sub-1");
        assert_eq!(
            c.topics,
            Topics::One("public/default/orders".parse().expect("topic"))
        );
        assert_eq!(c.sub_type, SubscriptionType::KeyShared);
        // The first value counts, and the size is capped.
        assert_eq!(c.flow.receiver_queue_size, MAX_RECEIVER_QUEUE);
        assert!(c.flow.pull_mode);
        assert_eq!(c.ack_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.nack_delay, DEFAULT_NACK_DELAY);
        let dl = c.dead_letter.expect("dead letter");
        assert_eq!((dl.max_redeliveries, dl.topic), (3, None));
    }

    #[test]
    fn bad_parameters_are_refused_with_400() {
        let bad = [
            q(&[("receiverQueueSize", "many")]),
            q(&[("subscriptionType", "Sometimes")]),
            q(&[("ackTimeoutMillis", "-")]),
        ];
        for p in bad {
            let e = parse_v2("consumer", "persistent", "public", "default", "t/s", &p)
                .expect_err("refused");
            assert_eq!(e.status, 400);
            assert!(e.message.starts_with("Invalid query params: "), "{e:?}");
        }
        let e = parse_v2(
            "producer",
            "durable",
            "public",
            "default",
            "t",
            &Params::default(),
        )
        .expect_err("domain");
        assert_eq!(e.status, 400);
        let e = parse_v2(
            "consumer",
            "persistent",
            "public",
            "default",
            "t",
            &Params::default(),
        )
        .expect_err("no subscription");
        assert_eq!(e.status, 400);
        let e = parse_v2(
            "reader",
            "persistent",
            "public",
            "default",
            "t",
            &q(&[("messageId", "%%")]),
        )
        .expect_err("bad id");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn v3_takes_topics_or_a_pattern() {
        let Request::Consumer(c) =
            parse_v3("s", &q(&[("topics", "a, persistent://public/default/b,a")])).expect("list")
        else {
            panic!("not a consumer")
        };
        let Topics::List(ts) = c.topics else {
            panic!("not a list")
        };
        assert_eq!(ts.len(), 2);
        let Request::Consumer(c) = parse_v3(
            "s",
            &q(&[("topicsPattern", "persistent://public/default/my-.*")]),
        )
        .expect("pattern") else {
            panic!("not a consumer")
        };
        let Topics::Pattern { regex, .. } = c.topics else {
            panic!("not a pattern")
        };
        let re = regex::Regex::new(&regex).expect("regex");
        assert!(re.is_match("persistent://public/default/my-topic"));
        assert!(!re.is_match("persistent://public/default/other"));
        assert!(!re.is_match("persistent://public/other/my-topic"));
        for p in [
            q(&[]),
            q(&[("topics", "a"), ("topicsPattern", "public/default/.*")]),
            q(&[("topicsPattern", "public/default/(")]),
            q(&[("topics", "a,other/ns/b")]),
        ] {
            assert_eq!(parse_v3("s", &p).expect_err("refused").status, 400);
        }
    }

    #[test]
    fn reader_start() {
        let id = MessageId::new(7, 41);
        for (v, want) in [
            ("earliest", ReaderStart::Earliest),
            ("latest", ReaderStart::Latest),
            (id.encode().as_str(), ReaderStart::After(id)),
        ] {
            let Request::Reader(r) = parse_v2(
                "reader",
                "persistent",
                "public",
                "default",
                "t",
                &q(&[("messageId", v)]),
            )
            .expect("reader") else {
                panic!("not a reader")
            };
            assert_eq!(r.start, want);
        }
    }
}
