//! Kafka record batches: the stored entry format, which producers write
//! and every protocol reads back.

use bytes::Bytes;
use kafka_protocol::records::Compression;
use magnetar_broker::format::{self, BatchHeader, ProducerSequence, HEADER_LEN};
use magnetar_broker::{Message, StoredMessage};

/// A small cap for inflating arbitrary bytes, so that a bomb costs little
/// (the broker's own cap is 64 MiB).
const SMALL_LIMIT: usize = 1 << 20;

const CODECS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

/// Seed timestamps: fixed, so that the seeds (and the mutants made from
/// them) are the same on every run.
const BASE_TS: i64 = 1_700_000_000_000;

pub fn run(data: &[u8]) {
    check_record_set(&Bytes::copy_from_slice(data));
    // The bytes as a compressed stream, and as the records section of a
    // batch (what the broker actually inflates).
    let records = data.get(HEADER_LEN..).unwrap_or_default();
    for codec in CODECS {
        for input in [data, records] {
            let Ok(out) = format::inflate(codec, input, SMALL_LIMIT) else {
                continue;
            };
            // Uncompressed records are stored as they came: nothing to cap.
            if codec != Compression::None {
                assert!(
                    out.len() <= SMALL_LIMIT,
                    "{codec:?} inflated {} bytes past the limit of {SMALL_LIMIT}",
                    out.len()
                );
            }
        }
    }
}

/// What the broker does with a record set from a produce request, and with
/// an entry read back from a bookie.
pub fn check_record_set(set: &Bytes) {
    if let Ok(batches) = format::split_batches(set.clone()) {
        assert_eq!(
            batches.iter().map(Bytes::len).sum::<usize>(),
            set.len(),
            "split_batches must account for every byte"
        );
        for b in &batches {
            let h = match BatchHeader::parse(b) {
                Ok(h) => h,
                Err(e) => panic!("split_batches returned a batch whose header does not parse: {e}"),
            };
            assert_eq!(
                h.size,
                b.len(),
                "a split batch is exactly its declared size"
            );
            check_batch(b);
        }
        if batches.len() == 1 {
            return;
        }
    }
    // A stored entry is one batch as the bookie returned it; whatever the
    // split says, the whole input is also read as one.
    check_batch(set);
}

fn check_batch(b: &Bytes) {
    let parsed = BatchHeader::parse(b).ok();
    if let Ok(h) = format::validate_batch(b) {
        assert_eq!(
            parsed,
            Some(h),
            "validate_batch and BatchHeader::parse disagree"
        );
        assert_eq!(h.size, b.len());
        recompressed(b, &h);
    }
    let _ = format::check_inflated(b);
    if let Some(h) = parsed {
        let _ = format::replicable_to(b, &h, "west");
    }
    let entry = format::decode_entry(b);
    let all = format::decode_all(b);
    let control = format::control_type(b);
    let Some(h) = parsed else {
        assert!(
            entry.is_err() && all.is_err() && control.is_none(),
            "a batch without a header must not decode"
        );
        return;
    };
    if let Ok((h2, _)) = &all {
        assert_eq!(*h2, h, "decode_all returned another header");
    }
    if h.is_control() {
        if let Ok(messages) = &entry {
            assert!(messages.is_empty(), "a control batch holds no messages");
        }
    } else {
        assert!(control.is_none(), "a data batch is not a marker");
        if let (Ok(messages), Ok((_, records))) = (&entry, &all) {
            assert_eq!(messages, records, "decode_entry and decode_all disagree");
        }
    }
    if let Ok(messages) = &entry {
        re_encoded(messages);
    }
}

/// Messages read from any batch are written again as the broker writes
/// them (for AMQP, MQTT and WebSocket publishes), and read back the same.
fn re_encoded(messages: &[StoredMessage]) {
    if messages.is_empty() {
        return;
    }
    let plain: Vec<Message> = messages.iter().map(|m| m.message.clone()).collect();
    let batch = match format::encode_messages(&plain) {
        Ok(batch) => batch,
        Err(e) => panic!("decoded messages do not encode again: {e}"),
    };
    if let Err(e) = format::validate_batch(&batch) {
        panic!("a batch the broker wrote does not validate: {e}");
    }
    let back = match format::decode_entry(&batch) {
        Ok(back) => back,
        Err(e) => panic!("a batch the broker wrote does not decode: {e}"),
    };
    assert_eq!(back.len(), plain.len());
    for (i, (b, m)) in back.iter().zip(&plain).enumerate() {
        assert_eq!(b.offset, i as u64);
        assert_eq!(b.message.key, m.key);
        assert_eq!(b.message.value, m.value);
        assert_eq!(b.message.headers, m.headers);
        // Only a message without a time is stamped on encoding.
        if m.timestamp_ms > 0 {
            assert_eq!(b.message.timestamp_ms, m.timestamp_ms);
        }
    }
}

/// A valid batch recompressed, as a topic with its own compression type
/// stores it, keeps its records.
fn recompressed(b: &Bytes, h: &BatchHeader) {
    // One codec per input, picked by the input, keeps the cost of a run
    // to one compression.
    let codec = (b.len() % CODECS.len()) as u16;
    let Ok(out) = format::recompress(b.clone(), codec) else {
        return;
    };
    if h.compression() == codec || h.is_control() {
        assert_eq!(
            &out, b,
            "a batch needing no recompression comes back as it was"
        );
        return;
    }
    let h2 = match format::validate_batch(&out) {
        Ok(h2) => h2,
        Err(e) => panic!("a recompressed batch does not validate: {e}"),
    };
    assert_eq!(h2.compression(), codec);
    if let (Ok(before), Ok(after)) = (format::decode_entry(b), format::decode_entry(&out)) {
        assert_eq!(
            before.len(),
            after.len(),
            "recompression changed the record count"
        );
        for (x, y) in before.iter().zip(&after) {
            // Headers are not compared: kafka-protocol folds repeated
            // header names, which recompression goes through.
            assert_eq!(x.message.key, y.message.key);
            assert_eq!(x.message.value, y.message.value);
        }
    }
}

fn sample_messages() -> Vec<Message> {
    vec![
        Message {
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"hello")),
            headers: vec![
                ("trace".into(), Some(Bytes::from_static(b"t-1"))),
                ("trace".into(), None),
                (
                    "amqp.content-type".into(),
                    Some(Bytes::from_static(b"text/plain")),
                ),
            ],
            timestamp_ms: BASE_TS,
        },
        Message {
            key: None,
            value: None,
            headers: Vec::new(),
            timestamp_ms: BASE_TS + 5,
        },
        Message {
            key: Some(Bytes::new()),
            value: Some(Bytes::from(vec![0xAB; 300])),
            headers: vec![("mqtt.topic".into(), Some(Bytes::from_static(b"a/b")))],
            timestamp_ms: BASE_TS + 1_000,
        },
    ]
}

fn stored(offset: u64, message: Message) -> StoredMessage {
    StoredMessage { offset, message }
}

/// A record set of two batches, plain and gzip, as a producer sends it.
pub fn record_set() -> Bytes {
    let Ok(plain) = format::encode_messages(&sample_messages()) else {
        return Bytes::new();
    };
    let mut set = plain.to_vec();
    if let Ok(gzip) = format::recompress(plain, 1) {
        set.extend_from_slice(&gzip);
    }
    Bytes::from(set)
}

pub fn seeds() -> Vec<Vec<u8>> {
    let sample = sample_messages();
    let Ok(plain) = format::encode_messages(&sample) else {
        return Vec::new();
    };
    let producer = ProducerSequence {
        producer_id: 1000,
        epoch: 2,
        base_sequence: 7,
    };
    let mut out = vec![plain.to_vec()];
    for codec in 1..=4 {
        if let Ok(b) = format::recompress(plain.clone(), codec) {
            out.push(b.to_vec());
        }
    }
    let batches = [
        format::encode_batch(&sample, Some(producer)),
        format::encode_transactional(&sample, producer),
        // A commit marker, written with a fixed time (encode_control
        // stamps the wall clock).
        format::encode_restored(
            &[stored(
                9,
                Message {
                    key: Some(Bytes::from_static(&[0, 0, 0, 1])),
                    value: Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0])),
                    headers: Vec::new(),
                    timestamp_ms: BASE_TS,
                },
            )],
            Some(1000),
            true,
        ),
        // Offsets with gaps, as compaction and transactions leave them.
        format::encode_restored(
            &[
                stored(100, sample[0].clone()),
                stored(105, sample[1].clone()),
                stored(106, sample[2].clone()),
            ],
            None,
            false,
        ),
    ];
    out.extend(batches.into_iter().flatten().map(|b| b.to_vec()));
    out.push(record_set().to_vec());
    // A batch whose records inflate past the small cap of the raw inflate
    // calls, and under the broker's.
    let big = [Message {
        key: None,
        value: Some(Bytes::from(vec![0u8; SMALL_LIMIT + (SMALL_LIMIT >> 2)])),
        headers: Vec::new(),
        timestamp_ms: BASE_TS,
    }];
    if let Ok(b) = format::encode_messages(&big).and_then(|b| format::recompress(b, 4)) {
        out.push(b.to_vec());
    }
    out
}
