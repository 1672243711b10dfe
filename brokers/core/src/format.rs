//! The entry format: one Kafka RecordBatch v2 per ledger entry.
//!
//! Kafka produce requests arrive as record batches and fetch responses are
//! record batches, so storing that exact form lets the Kafka protocol pass
//! them through without re-encoding. Other protocols hand the broker
//! [`Message`]s, which become records with headers.
//!
//! The batch's base offset is rewritten when the broker assigns offsets.
//! Kafka's CRC covers the bytes from the attributes field on, not the base
//! offset, so the rewrite needs no re-checksum.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType, NO_PARTITION_LEADER_EPOCH, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};

use crate::error::{BrokerError, Result};

/// Size of the v2 batch header, up to and including the record count.
pub const HEADER_LEN: usize = 61;
const LENGTH_END: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const CONTROL_FLAG: u16 = 0x20;
const TRANSACTIONAL_FLAG: u16 = 0x10;

/// A message as a protocol hands it to the broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In order; names may repeat, as Kafka allows.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch; 0 means "stamp on append".
    pub timestamp_ms: i64,
}

impl Message {
    pub fn new(value: impl Into<Bytes>) -> Self {
        Message {
            value: Some(value.into()),
            ..Message::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
    }

    /// Payload plus key and header bytes: what quotas and stats count.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}

/// A message read back, with its place in the partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub offset: u64,
    pub message: Message,
}

/// The fixed fields of a batch, read without touching its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes of the whole batch, header included.
    pub size: usize,
    pub attributes: u16,
    pub last_offset_delta: i32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Parses the header of the batch at the start of `b`. Checks lengths
    /// and the magic byte only; [`validate_batch`] also checks the CRC.
    pub fn parse(b: &[u8]) -> Result<BatchHeader> {
        let bad = |why: String| BrokerError::CorruptBatch(why);
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than a batch header",
                b.len()
            )));
        }
        if b[MAGIC_AT] != 2 {
            return Err(bad(format!(
                "magic {} (only record batch v2 is supported)",
                b[MAGIC_AT]
            )));
        }
        let batch_length = be_i32(b, 8);
        let size = usize::try_from(batch_length)
            .ok()
            .and_then(|l| l.checked_add(LENGTH_END))
            .filter(|&s| s >= HEADER_LEN)
            .ok_or_else(|| bad(format!("batch length {batch_length}")))?;
        let h = BatchHeader {
            base_offset: be_i64(b, 0),
            size,
            attributes: be_i16(b, ATTRIBUTES_AT) as u16,
            last_offset_delta: be_i32(b, 23),
            first_timestamp: be_i64(b, 27),
            max_timestamp: be_i64(b, 35),
            producer_id: be_i64(b, 43),
            producer_epoch: be_i16(b, 51),
            base_sequence: be_i32(b, 53),
            record_count: be_i32(b, 57),
        };
        if h.record_count < 0 || h.last_offset_delta < 0 {
            return Err(bad(format!(
                "record count {} / last offset delta {}",
                h.record_count, h.last_offset_delta
            )));
        }
        Ok(h)
    }

    /// How many offsets the batch occupies. Kafka counts the span of
    /// offset deltas, which compaction may leave larger than the records.
    pub fn offset_count(&self) -> u64 {
        self.last_offset_delta as u64 + 1
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_FLAG != 0
    }

    pub fn compression(&self) -> u16 {
        self.attributes & 0x07
    }
}

/// Checks a whole batch as a Kafka broker does on produce: one batch
/// exactly, magic 2, and a CRC32C that matches.
pub fn validate_batch(b: &[u8]) -> Result<BatchHeader> {
    let h = BatchHeader::parse(b)?;
    if h.size != b.len() {
        return Err(BrokerError::CorruptBatch(format!(
            "batch says {} bytes but {} were given",
            h.size,
            b.len()
        )));
    }
    let stored = be_i32(b, CRC_AT) as u32;
    let actual = crc32c::crc32c(&b[ATTRIBUTES_AT..]);
    if stored != actual {
        return Err(BrokerError::CorruptBatch(format!(
            "CRC mismatch: stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    Ok(h)
}

/// Splits a Kafka record set (several batches back to back) into batches.
pub fn split_batches(mut b: Bytes) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let h = BatchHeader::parse(&b)?;
        if h.size > b.len() {
            return Err(BrokerError::CorruptBatch(format!(
                "batch of {} bytes truncated to {}",
                h.size,
                b.len()
            )));
        }
        out.push(b.split_to(h.size));
    }
    Ok(out)
}

/// Returns `batch` with its base offset set to `offset`.
pub fn with_base_offset(batch: Bytes, offset: u64) -> Bytes {
    if batch.len() < 8 {
        return batch;
    }
    // Avoids a copy when the caller holds the only reference.
    let mut m = BytesMut::from(batch);
    m[..8].copy_from_slice(&(offset as i64).to_be_bytes());
    m.freeze()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An idempotent producer's identity and the sequence number of the first
/// message of a batch, as Kafka's idempotent producers send them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerSequence {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

/// Encodes messages as one uncompressed batch with base offset 0; the
/// managed ledger assigns the real offset on append.
pub fn encode_messages(messages: &[Message]) -> Result<Bytes> {
    encode_batch(messages, None)
}

/// As [`encode_messages`], stamped with a producer's sequence numbers so
/// that the partition can drop retried duplicates.
pub fn encode_batch(messages: &[Message], producer: Option<ProducerSequence>) -> Result<Bytes> {
    encode_records(messages, producer, false)
}

/// A batch of a producer's open transaction.
pub fn encode_transactional(messages: &[Message], producer: ProducerSequence) -> Result<Bytes> {
    encode_records(messages, Some(producer), true)
}

/// A transaction marker: a control batch of one record whose key is
/// version 0 and the marker type, and whose value is Kafka's
/// EndTxnMarker (version 0, coordinator epoch).
pub fn encode_control(producer_id: i64, epoch: i16, kind: ControlType) -> Result<Bytes> {
    let mut key = BytesMut::with_capacity(4);
    key.put_i16(0);
    key.put_i16(match kind {
        ControlType::Abort => 0,
        ControlType::Commit => 1,
    });
    let mut value = BytesMut::with_capacity(6);
    value.put_i16(0);
    value.put_i32(0);
    let record = Record {
        transactional: true,
        control: true,
        delete_horizon: false,
        partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
        producer_id,
        producer_epoch: epoch,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: NO_SEQUENCE,
        timestamp: now_ms(),
        key: Some(key.freeze()),
        value: Some(value.freeze()),
        headers: Default::default(),
    };
    let mut buf = BytesMut::with_capacity(HEADER_LEN + 32);
    RecordBatchEncoder::encode(
        &mut buf,
        std::slice::from_ref(&record),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| BrokerError::InvalidArgument(format!("encoding a marker: {e}")))?;
    Ok(buf.freeze())
}

fn encode_records(
    messages: &[Message],
    producer: Option<ProducerSequence>,
    transactional: bool,
) -> Result<Bytes> {
    if messages.is_empty() {
        return Err(BrokerError::InvalidArgument(
            "no messages to publish".into(),
        ));
    }
    let now = now_ms();
    let records: Vec<Record> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut headers = kafka_protocol::indexmap::IndexMap::new();
            for (name, value) in &m.headers {
                headers.insert(StrBytes::from_string(name.clone()), value.clone());
            }
            Record {
                transactional,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: producer.map_or(NO_PRODUCER_ID, |p| p.producer_id),
                producer_epoch: producer.map_or(NO_PRODUCER_EPOCH, |p| p.epoch),
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder keeps records in one batch while offset minus
                // sequence stays constant; this makes the base sequence -1,
                // Kafka's "no sequence".
                sequence: producer
                    .map_or(NO_SEQUENCE, |p| p.base_sequence)
                    .wrapping_add(i as i32),
                timestamp: if m.timestamp_ms > 0 {
                    m.timestamp_ms
                } else {
                    now
                },
                key: m.key.clone(),
                value: m.value.clone(),
                headers,
            }
        })
        .collect();
    let mut buf =
        BytesMut::with_capacity(HEADER_LEN + messages.iter().map(|m| m.size() + 16).sum::<usize>());
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| BrokerError::InvalidArgument(format!("encoding records: {e}")))?;
    Ok(buf.freeze())
}

/// What a control batch (a transaction marker) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

/// The marker type of a control batch: its one record's key is a version
/// (i16) and a type (i16, 0 abort, 1 commit). `None` for other batches.
pub fn control_type(batch: &Bytes) -> Option<ControlType> {
    let h = BatchHeader::parse(batch).ok()?;
    if !h.is_control() {
        return None;
    }
    let mut buf = batch.slice(..h.size.min(batch.len()));
    let set = RecordBatchDecoder::decode(&mut buf).ok()?;
    let key = set.records.first()?.key.as_ref()?;
    match key.get(2..4).map(|t| i16::from_be_bytes([t[0], t[1]])) {
        Some(0) => Some(ControlType::Abort),
        Some(1) => Some(ControlType::Commit),
        _ => None,
    }
}

/// The compression codec of Kafka's attribute bits (0 none, 1 gzip,
/// 2 snappy, 3 lz4, 4 zstd).
pub fn compression_of(codec: u16) -> Option<Compression> {
    Some(match codec {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Snappy,
        3 => Compression::Lz4,
        4 => Compression::Zstd,
        _ => return None,
    })
}

/// Re-encodes a batch with another compression codec, keeping its
/// records, producer fields, timestamps and offsets; as a Kafka broker
/// does for a topic whose `compression.type` is not the producer's. A
/// batch already in that codec, or a control batch, comes back as it was.
pub fn recompress(batch: Bytes, codec: u16) -> Result<Bytes> {
    let h = validate_batch(&batch)?;
    if h.compression() == codec || h.is_control() {
        return Ok(batch);
    }
    let compression = compression_of(codec)
        .ok_or_else(|| BrokerError::InvalidArgument(format!("compression codec {codec}")))?;
    let mut buf = batch.clone();
    let set = RecordBatchDecoder::decode(&mut buf)
        .map_err(|e| BrokerError::CorruptBatch(format!("decoding records: {e}")))?;
    let mut out = BytesMut::with_capacity(batch.len());
    RecordBatchEncoder::encode(
        &mut out,
        &set.records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .map_err(|e| BrokerError::InvalidArgument(format!("encoding records: {e}")))?;
    Ok(out.freeze())
}

/// Decodes the records of one stored batch (any compression). Control
/// records (transaction markers) are not messages and are skipped.
pub fn decode_entry(entry: &Bytes) -> Result<Vec<StoredMessage>> {
    let h = BatchHeader::parse(entry)?;
    if h.is_control() {
        return Ok(Vec::new());
    }
    let mut buf = entry.slice(..h.size.min(entry.len()));
    let set = RecordBatchDecoder::decode(&mut buf)
        .map_err(|e| BrokerError::CorruptBatch(format!("decoding records: {e}")))?;
    Ok(set
        .records
        .into_iter()
        .filter(|r| !r.control)
        .map(|r| StoredMessage {
            offset: r.offset.max(0) as u64,
            message: Message {
                key: r.key,
                value: r.value,
                headers: r
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k.as_str().to_string(), v))
                    .collect(),
                timestamp_ms: r.timestamp,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn recompression_keeps_records_and_producer_fields() {
        let msgs: Vec<Message> = (0..50)
            .map(|i| {
                Message::new(format!("value {i} ").repeat(20))
                    .with_key(format!("k{i}"))
                    .with_header("h", format!("{i}"))
            })
            .collect();
        let p = ProducerSequence {
            producer_id: 7,
            epoch: 2,
            base_sequence: 40,
        };
        let plain = with_base_offset(encode_batch(&msgs, Some(p)).expect("encodes"), 100);
        for codec in [1u16, 2, 3, 4, 0] {
            let packed = recompress(plain.clone(), codec).expect("recompresses");
            let h = validate_batch(&packed).expect("valid");
            assert_eq!(h.compression(), codec);
            assert_eq!(
                (h.producer_id, h.producer_epoch, h.base_sequence),
                (7, 2, 40)
            );
            assert_eq!(h.base_offset, 100);
            if codec != 0 {
                assert!(packed.len() < plain.len(), "codec {codec}");
            }
            let back = decode_entry(&packed).expect("decodes");
            assert_eq!(back.len(), 50);
            assert_eq!(back[3].offset, 103);
            assert_eq!(back[3].message.value, msgs[3].value);
            assert_eq!(back[3].message.key, msgs[3].key);
            assert_eq!(back[3].message.headers, msgs[3].headers);
        }
    }

    use super::*;

    fn sample(n: usize) -> Vec<Message> {
        (0..n)
            .map(|i| {
                Message::new(format!("value-{i}"))
                    .with_key(format!("k{}", i % 3))
                    .with_header("h", format!("{i}"))
            })
            .collect()
    }

    #[test]
    fn encode_assign_offset_decode() {
        let msgs = sample(5);
        let batch = encode_messages(&msgs).expect("encode");
        let h = validate_batch(&batch).expect("valid");
        assert_eq!(h.record_count, 5);
        assert_eq!(h.offset_count(), 5);
        let batch = with_base_offset(batch, 1000);
        // The CRC does not cover the base offset.
        let h = validate_batch(&batch).expect("still valid");
        assert_eq!(h.base_offset, 1000);
        let back = decode_entry(&batch).expect("decode");
        assert_eq!(back.len(), 5);
        for (i, m) in back.iter().enumerate() {
            assert_eq!(m.offset, 1000 + i as u64);
            assert_eq!(m.message.value, msgs[i].value);
            assert_eq!(m.message.key, msgs[i].key);
            assert_eq!(m.message.headers, msgs[i].headers);
            assert!(m.message.timestamp_ms > 0);
        }
    }

    #[test]
    fn corrupt_batches_are_refused_not_panicked_on() {
        let batch = encode_messages(&sample(3)).expect("encode");
        let mut flipped = batch.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            validate_batch(&flipped),
            Err(BrokerError::CorruptBatch(_))
        ));
        assert!(validate_batch(&batch[..batch.len() - 1]).is_err());
        let mut magic = batch.to_vec();
        magic[MAGIC_AT] = 1;
        assert!(validate_batch(&magic).is_err());
        let mut len = batch.to_vec();
        len[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(validate_batch(&len).is_err());
        // Every prefix of a valid batch, and random bytes, fail cleanly.
        for cut in 0..batch.len() {
            let _ = validate_batch(&batch[..cut]);
            let _ = decode_entry(&batch.slice(..cut));
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = validate_batch(&junk);
            let _ = split_batches(Bytes::from(junk.clone()));
            let _ = decode_entry(&Bytes::from(junk));
        }
    }

    #[test]
    fn record_sets_split_into_batches() {
        let a = encode_messages(&sample(2)).expect("a");
        let b = encode_messages(&sample(3)).expect("b");
        let mut set = BytesMut::new();
        set.extend_from_slice(&a);
        set.extend_from_slice(&b);
        let parts = split_batches(set.freeze()).expect("split");
        assert_eq!(parts, vec![a.clone(), b]);
        assert!(split_batches(a.slice(..a.len() - 3)).is_err());
    }
}
