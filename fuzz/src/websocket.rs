//! The WebSocket API's pure parsers: JSON frames, message ids, Pulsar's
//! timestamps, and the path and query read before the upgrade.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use magnetar_broker::Delivery;
use magnetar_websocket::frames::{ConsumerCommand, ProducerMessage};
use magnetar_websocket::mapping::{self, IdBase};
use magnetar_websocket::message_id::{MessageId, MessageIdData};
use magnetar_websocket::request::{parse_v2, parse_v3, Params};
use magnetar_websocket::time;
use prost::Message as _;

/// The last millisecond `format_ms` writes with a four-digit year
/// (9999-12-31T23:59:59.999Z): the range where formatting and parsing are
/// each other's inverse.
const MAX_FORMATTED_MS: i64 = 253_402_300_799_999;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    producer(&text);
    command(&text);
    message_id(&text);
    timestamp(&text);
    request(&text);
    // The protobuf under a message id, with and without its base64.
    message_id(&STANDARD.encode(data));
    let _ = MessageIdData::decode(data);
    if let Some(b) = data.first_chunk::<8>() {
        formatted(i64::from_le_bytes(*b));
    }
}

fn producer(text: &str) {
    let Ok(m) = ProducerMessage::parse(text) else {
        return;
    };
    let payload = m.payload_bytes();
    let Ok(record) = mapping::to_record(&m) else {
        return;
    };
    assert_eq!(
        record.value.as_deref(),
        payload.as_deref().ok(),
        "a producer message's record holds its payload"
    );
    // Delivered back to a consumer of a partition.
    let ids = IdBase {
        tag: 42,
        partition: Some(3),
    };
    let delivery = Delivery {
        offset: 7,
        redelivery_count: 1,
        message: record,
    };
    let frame = mapping::to_frame(ids, &delivery);
    let id = MessageId::decode(&frame.message_id).expect("an id the broker writes decodes");
    assert_eq!(id, ids.id(7));
    let body = STANDARD
        .decode(&frame.payload)
        .expect("a payload the broker writes is base64");
    assert_eq!(Some(&body[..]), delivery.message.value.as_deref());
    let ms = delivery.message.timestamp_ms;
    if (0..=MAX_FORMATTED_MS).contains(&ms) {
        assert_eq!(time::parse_ms(&frame.publish_time).ok(), Some(ms));
    }
}

fn command(text: &str) {
    if let Ok(ConsumerCommand::Ack(id) | ConsumerCommand::NegativeAck(id)) =
        ConsumerCommand::parse(text)
    {
        message_id(&id);
    }
}

/// An id that decodes encodes to one that decodes to the same id.
fn message_id(text: &str) {
    if let Ok(id) = MessageId::decode(text) {
        let again = MessageId::decode(&id.encode()).expect("an id the broker writes decodes");
        assert_eq!(again, id);
    }
}

fn timestamp(text: &str) {
    if let Ok(ms) = time::parse_ms(text) {
        formatted(ms);
    }
}

/// Within four-digit years, what `format_ms` writes `parse_ms` reads back.
fn formatted(ms: i64) {
    let written = time::format_ms(ms);
    if (0..=MAX_FORMATTED_MS).contains(&ms) {
        assert_eq!(
            time::parse_ms(&written).ok(),
            Some(ms),
            "{written} does not read back"
        );
    }
}

/// The first line as an upgrade request's path and query, split as the
/// server's extractors split them.
fn request(text: &str) {
    let line = text.lines().next().unwrap_or_default();
    let (path, query) = line.split_once('?').unwrap_or((line, ""));
    let params = Params(
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    );
    let path = path.trim_start_matches('/');
    let path = path.strip_prefix("ws/").unwrap_or(path);
    if let Some(subscription) = path.strip_prefix("v3/consumer/") {
        if let Ok(r) = parse_v3(subscription, &params) {
            let _ = r.namespace();
        }
    }
    let path = path.strip_prefix("v2/").unwrap_or(path);
    let mut parts = path.splitn(5, '/');
    let mut next = || parts.next().unwrap_or_default();
    let (kind, domain, tenant, ns, rest) = (next(), next(), next(), next(), next());
    if let Ok(r) = parse_v2(kind, domain, tenant, ns, rest, &params) {
        let _ = r.namespace();
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let ids = [
        MessageId::new(0, 3).encode(),
        MessageId {
            ledger: 286,
            entry: 12,
            partition: Some(2),
            batch_index: Some(5),
        }
        .encode(),
    ];
    let chunked = MessageIdData {
        ledger_id: Some(7),
        entry_id: Some(41),
        partition: Some(-1),
        batch_index: Some(-1),
        ack_set: vec![-1, 3],
        batch_size: Some(10),
        first_chunk_message_id: Some(Box::new(MessageIdData {
            ledger_id: Some(7),
            entry_id: Some(40),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let texts = [
        r#"{"payload":"aGVsbG8=","properties":{"a":"1","b":""},"context":"c1","key":"k","eventTime":"2020-11-18T09:58:23.355Z"}"#.to_owned(),
        r#"{"payload":"AAEC/w==","replicationClusters":["c1"],"deliverAt":1700000000000,"deliverAfterMs":5,"extra":{"x":[1,2]}}"#.to_owned(),
        format!(r#"{{"messageId":"{}"}}"#, ids[0]),
        format!(r#"{{"type":"negativeAcknowledge","messageId":"{}"}}"#, ids[1]),
        r#"{"type":"permit","permitMessages":5}"#.to_owned(),
        r#"{"type":"isEndOfTopic"}"#.to_owned(),
        r#"{"type":"unsubscribe"}"#.to_owned(),
        ids[0].clone(),
        ids[1].clone(),
        "2021-10-29T16:01:38.967-07:00".to_owned(),
        "2020-11-18T09:58+01:00".to_owned(),
        "/ws/v2/consumer/persistent/public/default/orders/sub-1?subscriptionType=Shared&receiverQueueSize=10&ackTimeoutMillis=1000&maxRedeliverCount=3&deadLetterTopic=dlq&subscriptionInitialPosition=Earliest&pullMode=true&priorityLevel=2&negativeAckRedeliveryDelay=500".to_owned(),
        "/ws/v2/producer/persistent/public/default/orders?producerName=p1".to_owned(),
        format!(
            "/ws/v2/reader/non-persistent/public/default/orders-partition-1?messageId={}&receiverQueueSize=5&readerName=r",
            ids[1]
        ),
        "/ws/v3/consumer/sub-1?topics=persistent://public/default/a,persistent://public/default/b&subscriptionMode=NonDurable".to_owned(),
        "/ws/v3/consumer/sub-1?topicsPattern=persistent://public/default/orders-.*&subscriptionType=Failover".to_owned(),
    ];
    let mut out: Vec<Vec<u8>> = texts.into_iter().map(String::into_bytes).collect();
    out.push(chunked);
    out
}
