//! AMQP 0-9-1: the connection's bytes from the protocol header on, and
//! field tables, wherever they come from.

use std::collections::HashMap;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::basic::{self, AMQPProperties};
use amq_protocol::protocol::{channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use bytes::{Bytes, BytesMut};
use magnetar_amqp::channel::Assembler;
use magnetar_amqp::codec::{self, Frame};
use magnetar_amqp::deadletter::{dead_lettered, Reason};
use magnetar_amqp::props::{self, Published};
use magnetar_amqp::queue::parse_args;
use magnetar_amqp::AmqpConfig;
use magnetar_broker::Message;

/// The broker's default frame_max, which also bounds frames before tune.
const FRAME_MAX: u32 = 131_072;
/// Frames taken off one input.
const MAX_FRAMES: usize = 256;

pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(())) = codec::decode_protocol_header(&mut buf) {
        assert_eq!(
            data.get(..8),
            Some(&codec::PROTOCOL_HEADER[..]),
            "only AMQP 0-9-1's header is accepted"
        );
        assert_eq!(buf.len() + 8, data.len(), "the header is 8 bytes");
        run_frames(buf, FRAME_MAX);
    }
    // Frames from the first byte, with the broker's bound and with none.
    for frame_max in [FRAME_MAX, 0] {
        run_frames(BytesMut::from(data), frame_max);
    }
    nesting_bound();
}

fn run_frames(mut buf: BytesMut, frame_max: u32) {
    let mut channels: HashMap<u16, Assembler> = HashMap::new();
    for _ in 0..MAX_FRAMES {
        if frame_max == 0 && !whole_frame_buffered(&buf) {
            break;
        }
        match codec::decode_frame(&mut buf, frame_max) {
            Ok(Some(frame)) => {
                round_trip(&frame);
                apply(&mut channels, frame);
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.reply_code();
                break;
            }
        }
    }
}

/// Without a frame_max the decoder reserves whatever size a frame header
/// claims (up to 4 GiB) while it waits for the payload, which a broker
/// configured without a limit would do too; stopping where it would only
/// wait keeps a run inside the fuzzer's memory limit.
fn whole_frame_buffered(buf: &[u8]) -> bool {
    match buf.get(3..7) {
        Some(s) => {
            let size = u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
            buf.len() >= size + codec::FRAME_OVERHEAD
        }
        None => true,
    }
}

/// A decoded frame encodes again, that decodes, and encoding is stable
/// from then on (the first encoding may normalise: reserved bits, the
/// heartbeat's payload, type tags RabbitMQ reads as synonyms).
fn round_trip(frame: &Frame) {
    let mut first = BytesMut::new();
    codec::encode_frame(&mut first, frame);
    if first.is_empty() {
        // The generator refused (a short string over 255 bytes), which the
        // codec logs; decoded values never hold one.
        return;
    }
    let once = first.clone().freeze();
    let again = match codec::decode_frame(&mut first, 0) {
        Ok(Some(again)) => again,
        other => panic!(
            "{frame:?} encoded as {:02x?} decodes as {other:?}",
            &once[..once.len().min(64)]
        ),
    };
    assert!(
        first.is_empty(),
        "a re-encoded frame decodes with bytes to spare"
    );
    let mut second = BytesMut::new();
    codec::encode_frame(&mut second, &again);
    assert_eq!(once, second.freeze(), "frame encoding is not stable");
}

/// What the session does with a frame that needs no broker: arguments are
/// read, and content is assembled per channel into publishes.
fn apply(channels: &mut HashMap<u16, Assembler>, frame: Frame) {
    // The broker's own limit on announced bodies.
    let max_body = AmqpConfig::default().max_message_size;
    let ch = frame.channel();
    let asm = channels.entry(ch).or_default();
    let failed = match frame {
        Frame::Method(_, method) => {
            arguments(&method);
            match *method {
                AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => asm.start(p).is_err(),
                _ => false,
            }
        }
        Frame::Heartbeat(_) => false,
        content => match asm.feed(content, max_body) {
            Ok(Some(publish)) => {
                published(publish.message);
                false
            }
            Ok(None) => false,
            Err(_) => true,
        },
    };
    // A channel error closes the channel, and with it its partial content.
    if failed {
        channels.remove(&ch);
    }
}

/// The field tables of methods, read as the session reads them.
fn arguments(m: &AMQPClass) {
    let table = match m {
        AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
            let _ = parse_args(d.queue.as_str(), &d.arguments);
            &d.arguments
        }
        AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => &b.arguments,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => &d.arguments,
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(b)) => &b.arguments,
        AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => &c.arguments,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(s)) => &s.client_properties,
        _ => return,
    };
    walk(table);
}

/// Every value of a table as other protocols and the headers exchange see
/// it: text, JSON and routing values. These recurse into nested values.
fn walk(t: &FieldTable) {
    let _ = props::header_values(t);
    for v in t.inner().values() {
        let _ = props::value_text(v);
        let _ = props::json_of(v);
    }
}

/// A whole publish: stored as a record, read back for a consumer, dead-
/// lettered, and delivered.
fn published(p: Published) {
    let _ = props::expiration_ms(&p.properties);
    let record = props::to_record(&p);
    let _ = props::record_expiration_ms(&record);
    let back = props::from_record(&record, "q");
    assert_eq!(back.body, p.body, "a publish's body survives its record");
    let dead = dead_lettered(p, "q", Reason::Rejected, "dlx", Some("dead"), 1_700_000_000);
    assert_eq!(dead.exchange, "dlx");
    assert_eq!(dead.routing_key, "dead");
    assert!(
        dead.properties.expiration().is_none(),
        "a dead-lettered copy must not expire again"
    );
    delivered(dead);
}

/// What the broker sends a consumer must decode: method, content header
/// and body frames.
fn delivered(p: Published) {
    let deliver = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
        consumer_tag: "ctag".into(),
        delivery_tag: 1,
        redelivered: true,
        exchange: "dlx".into(),
        routing_key: "dead".into(),
    }));
    let mut out = BytesMut::new();
    codec::encode_content(&mut out, 1, deliver, p.properties, &p.body, 4096);
    // The content header is one frame whatever its size, so it is read
    // without a frame_max here.
    loop {
        match codec::decode_frame(&mut out, 0) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("a delivery the broker encodes does not decode: {e}"),
        }
    }
    assert!(out.is_empty(), "a delivery ends on a frame boundary");
}

pub fn field_table(data: &[u8]) {
    let table = props::decode_table(data);
    if let Some(t) = &table {
        let encoded = props::encode_table(t);
        let back = props::decode_table(&encoded).expect("a table the broker encodes decodes");
        assert_eq!(
            props::encode_table(&back),
            encoded,
            "table encoding is not stable"
        );
        walk(t);
        let _ = parse_args("q", t);
    }
    // The bytes as the typed headers of a stored record, next to plain
    // headers and a property.
    let record = Message {
        key: Some(Bytes::from_static(b"rk")),
        value: Some(Bytes::from_static(b"body")),
        headers: vec![
            ("trace".into(), Some(Bytes::from_static(b"t-1"))),
            (props::H_HEADERS.into(), Some(Bytes::copy_from_slice(data))),
            (
                "amqp.content-type".into(),
                Some(Bytes::from_static(b"text/plain")),
            ),
            ("void".into(), None),
        ],
        timestamp_ms: 0,
    };
    let delivery = props::from_record(&record, "q");
    if table.is_none() {
        // A poison table is dropped, never the delivery or its plain
        // headers.
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .expect("plain headers survive an undecodable amqp.headers");
        assert_eq!(
            headers.inner().get("trace"),
            Some(&AMQPValue::LongString("t-1".into()))
        );
    }
    published(Published {
        exchange: delivery.exchange,
        routing_key: delivery.routing_key,
        properties: delivery.properties,
        body: delivery.body,
    });
    nesting_bound();
}

/// The nesting bound of the patched field-table parser is counted per
/// thread; whatever an input did (a parse that failed deep inside), the
/// count must be back to zero: 61 levels still decode, 71 do not.
fn nesting_bound() {
    assert!(
        props::decode_table(&nested_table(60)).is_some(),
        "a table 61 levels deep must decode"
    );
    assert!(
        props::decode_table(&nested_table(70)).is_none(),
        "a table 71 levels deep must be refused"
    );
}

/// A field table of one key holding `arrays` nested field arrays, written
/// byte by byte rather than through the generator, as a peer could.
fn nested_table(arrays: usize) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::new();
    for _ in 0..arrays {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend_from_slice(&v);
        v = outer;
    }
    let mut entries = vec![1u8, b'x'];
    entries.extend_from_slice(&v);
    let mut table = (entries.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(&entries);
    table
}

/// A value `depth` field arrays deep.
fn nested(depth: usize) -> AMQPValue {
    let mut v = AMQPValue::LongString("bottom".into());
    for _ in 0..depth {
        v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
    }
    v
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn all_types() -> FieldTable {
    table(&[
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(8)),
        ("i16", AMQPValue::ShortInt(-16)),
        ("u16", AMQPValue::ShortUInt(16)),
        ("i32", AMQPValue::LongInt(-32)),
        ("u32", AMQPValue::LongUInt(32)),
        ("i64", AMQPValue::LongLongInt(-64)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12_345,
            }),
        ),
        ("text", text("hello")),
        (
            "array",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::Void,
            ])),
        ),
        ("time", AMQPValue::Timestamp(1_700_000_000)),
        (
            "table",
            AMQPValue::FieldTable(table(&[("inner", AMQPValue::Boolean(false))])),
        ),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])),
        ),
        ("void", AMQPValue::Void),
    ])
}

/// A message's death history for queue `q`, so that dead-lettering bumps
/// an entry rather than adding one.
fn x_death() -> FieldTable {
    let death = table(&[
        ("count", AMQPValue::LongLongInt(1)),
        ("reason", text("rejected")),
        ("queue", text("q")),
        ("time", AMQPValue::Timestamp(1_700_000_000)),
        ("exchange", text("")),
        (
            "routing-keys",
            AMQPValue::FieldArray(FieldArray::from(vec![text("rk")])),
        ),
    ]);
    table(&[
        (
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        ),
        ("x-first-death-reason", text("rejected")),
        ("x-first-death-queue", text("q")),
        ("x-first-death-exchange", text("")),
    ])
}

fn queue_arguments() -> FieldTable {
    table(&[
        ("x-message-ttl", AMQPValue::LongInt(60_000)),
        ("x-expires", AMQPValue::LongLongInt(3_600_000)),
        ("x-max-length", AMQPValue::ShortUInt(1_000)),
        ("x-max-priority", AMQPValue::ShortShortUInt(10)),
        ("x-delivery-limit", AMQPValue::LongInt(5)),
        ("x-dead-letter-exchange", text("dlx")),
        ("x-dead-letter-routing-key", text("dead")),
        ("x-overflow", text("reject-publish")),
        ("x-queue-type", text("quorum")),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ])
}

fn properties() -> AMQPProperties {
    AMQPProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("c-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("cluster".into())
        .with_headers(all_types())
}

fn start_ok(product: AMQPValue) -> AMQPClass {
    let client_properties = table(&[
        ("product", product),
        (
            "capabilities",
            AMQPValue::FieldTable(table(&[("publisher_confirms", AMQPValue::Boolean(true))])),
        ),
    ]);
    AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties,
        mechanism: "PLAIN".into(),
        response: "\0guest\0guest".into(),
        locale: "en_US".into(),
    }))
}

fn publish() -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "logs".into(),
        routing_key: "kern.info".into(),
        mandatory: true,
        immediate: false,
    }))
}

/// A client's methods from start-ok to close, by channel.
fn methods() -> Vec<(u16, AMQPClass)> {
    vec![
        (0, start_ok(text("magnetar-fuzz"))),
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 2047,
                frame_max: FRAME_MAX,
                heartbeat: 60,
            })),
        ),
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ),
        (
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
        (
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        ),
        (
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 10,
                global: false,
            })),
        ),
        (
            1,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: "logs".into(),
                kind: "topic".into(),
                durable: true,
                arguments: table(&[("alternate-exchange", text("ae"))]),
                ..Default::default()
            })),
        ),
        (
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "orders".into(),
                durable: true,
                arguments: queue_arguments(),
                ..Default::default()
            })),
        ),
        (
            1,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "orders".into(),
                exchange: "logs".into(),
                routing_key: "kern.*".into(),
                nowait: false,
                arguments: table(&[("x-match", text("all")), ("level", text("info"))]),
            })),
        ),
        (
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "orders".into(),
                consumer_tag: "c1".into(),
                arguments: table(&[("x-priority", AMQPValue::LongInt(5))]),
                ..Default::default()
            })),
        ),
        (
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: true,
            })),
        ),
        (
            1,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ),
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ),
    ]
}

pub fn frame_seeds() -> Vec<Vec<u8>> {
    let methods = methods();
    // A whole connection: header, handshake, two publishes (one body split
    // over frames), a heartbeat, close.
    let mut session = BytesMut::from(&codec::PROTOCOL_HEADER[..]);
    for (ch, m) in &methods {
        codec::encode_method(&mut session, *ch, m.clone());
    }
    codec::encode_content(&mut session, 1, publish(), properties(), b"hello", 4096);
    codec::encode_content(
        &mut session,
        1,
        publish(),
        AMQPProperties::default(),
        &[0x5A; 10_000],
        4096,
    );
    codec::encode_heartbeat(&mut session);
    let mut out = vec![session.to_vec()];
    for (ch, m) in methods {
        let mut one = BytesMut::new();
        codec::encode_method(&mut one, ch, m);
        out.push(one.to_vec());
    }
    // A publish with its content, without the handshake before it.
    let mut content = BytesMut::new();
    codec::encode_method(&mut content, 1, publish());
    codec::encode_frame(
        &mut content,
        &Frame::Header(
            1,
            Box::new(AMQPContentHeader {
                class_id: codec::CLASS_BASIC,
                body_size: 5,
                properties: AMQPProperties::default().with_headers(x_death()),
            }),
        ),
    );
    codec::encode_frame(&mut content, &Frame::Body(1, Bytes::from_static(b"hello")));
    out.push(content.to_vec());
    // Client properties nested just inside and past the bound, as an
    // unauthenticated peer can send them.
    for depth in [60, 70] {
        let mut one = BytesMut::from(&codec::PROTOCOL_HEADER[..]);
        codec::encode_method(&mut one, 0, start_ok(nested(depth)));
        out.push(one.to_vec());
    }
    out
}

pub fn table_seeds() -> Vec<Vec<u8>> {
    vec![
        props::encode_table(&all_types()),
        props::encode_table(&x_death()),
        props::encode_table(&queue_arguments()),
        props::encode_table(&FieldTable::default()),
        props::encode_table(&table(&[("deep", nested(60))])),
        nested_table(60),
        nested_table(70),
    ]
}
