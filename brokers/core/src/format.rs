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
const LOG_APPEND_TIME_FLAG: u16 = 0x08;

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

/// Returns `batch`, which [`validate_batch`] passed with header `h`, with
/// the producer fields of a record replicated from another cluster, and no
/// longer transactional (only committed data is replicated); the records
/// themselves, compressed or not, are untouched, and the CRC covers the
/// new header.
pub fn with_geo_stamp(
    batch: Bytes,
    h: &BatchHeader,
    stamp: crate::replicated::GeoStamp,
) -> Result<Bytes> {
    if h.size != batch.len() {
        return Err(BrokerError::CorruptBatch(format!(
            "batch says {} bytes but {} were given",
            h.size,
            batch.len()
        )));
    }
    let mut m = BytesMut::from(batch);
    let attributes = h.attributes & !TRANSACTIONAL_FLAG;
    m[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    m[43..51].copy_from_slice(&stamp.producer_id.to_be_bytes());
    m[51..53].copy_from_slice(&stamp.epoch.to_be_bytes());
    m[53..57].copy_from_slice(&stamp.base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&m[ATTRIBUTES_AT..]);
    m[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(m.freeze())
}

/// Milliseconds since the epoch, the timestamps of records and of
/// protocol state (0 before 1970, saturating far after).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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

/// Writes a zig-zag varint, as record fields are written. (kafka-protocol
/// keeps its varint codec crate-private, and prost's is not public API.)
fn put_varint(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn varint_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    (64 - z.leading_zeros() as usize).max(1).div_ceil(7)
}

fn put_bytes_field(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.put_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

/// Data batches are written here rather than through kafka-protocol's
/// encoder: its records keep headers in a map, which costs a map per
/// record and would fold header names that repeat, as Kafka allows.
fn encode_records(
    messages: &[Message],
    producer: Option<ProducerSequence>,
    transactional: bool,
) -> Result<Bytes> {
    let attributes = if transactional { TRANSACTIONAL_FLAG } else { 0 };
    encode_with(messages.iter(), |i| i as i64, producer, attributes)
}

/// Records at the offset deltas `delta(i)`, which must rise.
fn encode_with<'a, I>(
    messages: I,
    delta: impl Fn(usize) -> i64,
    producer: Option<ProducerSequence>,
    attributes: u16,
) -> Result<Bytes>
where
    I: ExactSizeIterator<Item = &'a Message> + Clone,
{
    if messages.len() == 0 {
        return Err(BrokerError::InvalidArgument(
            "no messages to publish".into(),
        ));
    }
    let count = i32::try_from(messages.len())
        .map_err(|_| BrokerError::InvalidArgument("too many messages for a batch".into()))?;
    let now = now_ms();
    let stamp = |m: &Message| {
        if m.timestamp_ms > 0 {
            m.timestamp_ms
        } else {
            now
        }
    };
    let first_ts = messages.clone().next().map_or(now, stamp);
    let max_ts = messages.clone().map(stamp).max().unwrap_or(first_ts);
    let mut buf = BytesMut::with_capacity(
        HEADER_LEN + messages.clone().map(|m| m.size() + 24).sum::<usize>(),
    );
    buf.put_i64(0);
    buf.put_i32(0); // batch length, filled in below
    buf.put_i32(NO_PARTITION_LEADER_EPOCH);
    buf.put_i8(2);
    buf.put_u32(0); // CRC, filled in below
    buf.put_i16(attributes as i16);
    buf.put_i32(delta(messages.len() - 1) as i32);
    buf.put_i64(first_ts);
    buf.put_i64(max_ts);
    buf.put_i64(producer.map_or(NO_PRODUCER_ID, |p| p.producer_id));
    buf.put_i16(producer.map_or(NO_PRODUCER_EPOCH, |p| p.epoch));
    buf.put_i32(producer.map_or(NO_SEQUENCE, |p| p.base_sequence));
    buf.put_i32(count);
    for (i, m) in messages.enumerate() {
        let ts_delta = stamp(m) - first_ts;
        let offset_delta = delta(i);
        let field =
            |b: Option<&[u8]>| b.map_or(varint_len(-1), |b| varint_len(b.len() as i64) + b.len());
        let body = 1
            + varint_len(ts_delta)
            + varint_len(offset_delta)
            + field(m.key.as_deref())
            + field(m.value.as_deref())
            + varint_len(m.headers.len() as i64)
            + m.headers
                .iter()
                .map(|(k, v)| field(Some(k.as_bytes())) + field(v.as_deref()))
                .sum::<usize>();
        put_varint(&mut buf, body as i64);
        buf.put_i8(0);
        put_varint(&mut buf, ts_delta);
        put_varint(&mut buf, offset_delta);
        put_bytes_field(&mut buf, m.key.as_deref());
        put_bytes_field(&mut buf, m.value.as_deref());
        put_varint(&mut buf, m.headers.len() as i64);
        for (k, v) in &m.headers {
            put_bytes_field(&mut buf, Some(k.as_bytes()));
            put_bytes_field(&mut buf, v.as_deref());
        }
    }
    let length = i32::try_from(buf.len() - LENGTH_END)
        .map_err(|_| BrokerError::InvalidArgument("batch over 2 GiB".into()))?;
    buf[8..LENGTH_END].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&buf[ATTRIBUTES_AT..]);
    buf[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
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
    let set = decode_capped(&mut buf).ok()?;
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

/// The most a compressed batch may inflate to: the largest entry a bookie
/// stores, so that whatever would be accepted uncompressed also decodes
/// compressed. A batch of a few kilobytes can claim gigabytes (a
/// decompression bomb); past this it is refused, never inflated further.
pub const MAX_INFLATED_BATCH: usize = 64 << 20;

/// The inflated bytes of a batch's records, or an error once they pass
/// `limit`: readers stop at the cap, and snappy's declared lengths are
/// checked before anything is allocated.
pub fn inflate(compression: Compression, data: &[u8], limit: usize) -> std::io::Result<Bytes> {
    use std::io::Read;
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("records inflate past {limit} bytes"),
        )
    };
    let read_capped = |mut r: Box<dyn Read + '_>| -> std::io::Result<Bytes> {
        let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
        (&mut r).take(limit as u64 + 1).read_to_end(&mut out)?;
        if out.len() > limit {
            return Err(too_big());
        }
        Ok(Bytes::from(out))
    };
    match compression {
        // Stored as it is: nothing to amplify.
        Compression::None => Ok(Bytes::copy_from_slice(data)),
        Compression::Gzip => read_capped(Box::new(flate2::read::GzDecoder::new(data))),
        Compression::Zstd => read_capped(Box::new(zstd::stream::read::Decoder::new(data)?)),
        Compression::Lz4 => read_capped(Box::new(lz4::Decoder::new(data)?)),
        Compression::Snappy => inflate_snappy(data, limit).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("snappy records are malformed or inflate past {limit} bytes"),
            )
        }),
    }
}

/// Kafka's snappy: xerial-framed blocks (a magic header, then length-
/// prefixed blocks), or one raw block as some clients send.
fn inflate_snappy(data: &[u8], limit: usize) -> Option<Bytes> {
    const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
    const XERIAL_HEADER: usize = 16;
    let mut blocks: Vec<&[u8]> = Vec::new();
    if data.starts_with(XERIAL_MAGIC) && data.len() >= XERIAL_HEADER {
        let mut rest = &data[XERIAL_HEADER..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            blocks.push(rest.get(4..4usize.checked_add(len)?)?);
            rest = &rest[4 + len..];
        }
    } else {
        blocks.push(data);
    }
    let mut total = 0usize;
    for b in &blocks {
        total = total.checked_add(snap::raw::decompress_len(b).ok()?)?;
        if total > limit {
            return None;
        }
    }
    let mut out = vec![0u8; total];
    let mut at = 0;
    let mut d = snap::raw::Decoder::new();
    for b in blocks {
        at += d.decompress(b, &mut out[at..]).ok()?;
    }
    out.truncate(at);
    Some(Bytes::from(out))
}

/// Checks, as a Kafka broker does on produce, that a compressed batch's
/// records inflate to no more than [`MAX_INFLATED_BATCH`]; a bomb is
/// refused here, before it is stored for every reader to trip over.
pub fn check_inflated(batch: &[u8]) -> Result<()> {
    let h = BatchHeader::parse(batch)?;
    let Some(compression) = compression_of(h.compression()) else {
        return Err(BrokerError::CorruptBatch(format!(
            "unknown compression codec {}",
            h.compression()
        )));
    };
    if compression == Compression::None {
        return Ok(());
    }
    let records = batch
        .get(HEADER_LEN..h.size.min(batch.len()))
        .unwrap_or_default();
    inflated_len(compression, records, MAX_INFLATED_BATCH)
        .map(|_| ())
        .map_err(|e| BrokerError::CorruptBatch(format!("decompressing records: {e}")))
}

/// How many bytes `data` inflates to, counted without keeping them.
fn inflated_len(compression: Compression, data: &[u8], limit: usize) -> std::io::Result<u64> {
    use std::io::Read;
    let mut r: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(data)?),
        Compression::Lz4 => Box::new(lz4::Decoder::new(data)?),
        Compression::None | Compression::Snappy => {
            return inflate(compression, data, limit).map(|b| b.len() as u64)
        }
    };
    let n = std::io::copy(&mut (&mut r).take(limit as u64 + 1), &mut std::io::sink())?;
    if n > limit as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("records inflate past {limit} bytes"),
        ));
    }
    Ok(n)
}

/// Decodes one batch's records, inflating them no further than
/// [`MAX_INFLATED_BATCH`].
fn decode_capped(buf: &mut Bytes) -> Result<kafka_protocol::records::RecordSet> {
    RecordBatchDecoder::decode_with_custom_compression(
        buf,
        Some(|b: &mut Bytes, c: Compression| match c {
            Compression::None => Ok(b.clone()),
            c => inflate(c, b, MAX_INFLATED_BATCH).map_err(Into::into),
        }),
    )
    .map_err(|e| BrokerError::CorruptBatch(format!("decoding records: {e}")))
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
    let set = decode_capped(&mut buf)?;
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

/// The record header that limits which clusters a record replicates to:
/// Pulsar's per-message `replicationClusters`, as cluster names separated
/// by commas. A record without it replicates wherever its topic does; one
/// whose value names no other cluster stays where it was written.
pub const REPLICATE_TO_HEADER: &str = "pulsar.replicate-to";

/// What of a stored batch replicates to one cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Replicable {
    /// All of it, as it is stored.
    Whole,
    /// None of it.
    Nothing,
    /// Some records only: one batch per run of neighbouring records that
    /// go, each at its own base offset and in the stored batch's
    /// compression.
    Runs(Vec<Bytes>),
}

/// Which records of `batch`, a data batch with header `h`, replicate to
/// `cluster` by their [`REPLICATE_TO_HEADER`]. The header is expected to
/// be rare: a batch whose (inflated) bytes do not hold its name is not
/// decoded, and only a batch that mixes records that go with ones that
/// stay is encoded again.
pub fn replicable_to(batch: &Bytes, h: &BatchHeader, cluster: &str) -> Result<Replicable> {
    let name = REPLICATE_TO_HEADER.as_bytes();
    let records = batch
        .get(HEADER_LEN..h.size.min(batch.len()))
        .unwrap_or_default();
    let compression = compression_of(h.compression()).ok_or_else(|| {
        BrokerError::CorruptBatch(format!("unknown compression codec {}", h.compression()))
    })?;
    let named = match compression {
        Compression::None => memchr::memmem::find(records, name).is_some(),
        c => {
            let inflated = inflate(c, records, MAX_INFLATED_BATCH)
                .map_err(|e| BrokerError::CorruptBatch(format!("decompressing records: {e}")))?;
            memchr::memmem::find(&inflated, name).is_some()
        }
    };
    if !named {
        return Ok(Replicable::Whole);
    }
    let all = decode_records(h, batch)?;
    let goes: Vec<bool> = all
        .iter()
        .map(|r| {
            match r
                .message
                .headers
                .iter()
                .find(|(n, _)| n == REPLICATE_TO_HEADER)
            {
                None => true,
                Some((_, v)) => v
                    .as_deref()
                    .unwrap_or_default()
                    .split(|&c| c == b',')
                    .any(|c| c.trim_ascii() == cluster.as_bytes()),
            }
        })
        .collect();
    if goes.iter().all(|&g| g) {
        return Ok(Replicable::Whole);
    }
    let mut runs = Vec::new();
    let mut i = 0;
    while i < all.len() {
        if !goes[i] {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < all.len() && goes[i] && all[i].offset == all[i - 1].offset + 1 {
            i += 1;
        }
        let run = &all[start..i];
        let plain = encode_with(run.iter().map(|r| &r.message), |j| j as i64, None, 0)?;
        let batch = match compression {
            Compression::None => plain,
            _ => recompress(plain, h.compression())?,
        };
        runs.push(with_base_offset(batch, run[0].offset));
    }
    Ok(if runs.is_empty() {
        Replicable::Nothing
    } else {
        Replicable::Runs(runs)
    })
}

/// Decodes the records of one stored batch (any compression). Control
/// records (transaction markers) are not messages and are skipped.
pub fn decode_entry(entry: &Bytes) -> Result<Vec<StoredMessage>> {
    let h = BatchHeader::parse(entry)?;
    if h.is_control() {
        return Ok(Vec::new());
    }
    decode_records(&h, entry)
}

/// Every record of a stored batch, transaction markers included: what
/// offload keeps.
pub fn decode_all(entry: &Bytes) -> Result<(BatchHeader, Vec<StoredMessage>)> {
    let h = BatchHeader::parse(entry)?;
    let records = decode_records(&h, entry)?;
    Ok((h, records))
}

fn decode_records(h: &BatchHeader, entry: &Bytes) -> Result<Vec<StoredMessage>> {
    let mut buf = entry.slice(..h.size.min(entry.len()));
    if h.compression() == 0 {
        return decode_plain(h, buf);
    }
    let set = decode_capped(&mut buf)?;
    Ok(set
        .records
        .into_iter()
        .filter(|r| r.control == h.is_control())
        .map(stored_of)
        .collect())
}

/// A batch rebuilt from records read back from offloaded storage, at their
/// own offsets: a transaction's records keep their producer, so that
/// read-committed readers can leave out aborted ones, and markers stay
/// markers.
pub fn encode_restored(
    records: &[StoredMessage],
    producer_id: Option<i64>,
    control: bool,
) -> Result<Bytes> {
    let Some(first) = records.first() else {
        return Err(BrokerError::InvalidArgument("no records to restore".into()));
    };
    let base = first.offset;
    let mut attributes = 0;
    if producer_id.is_some() {
        attributes |= TRANSACTIONAL_FLAG;
    }
    if control {
        attributes |= CONTROL_FLAG;
    }
    let producer = producer_id.map(|producer_id| ProducerSequence {
        producer_id,
        epoch: 0,
        base_sequence: NO_SEQUENCE,
    });
    let messages = records.iter().map(|r| &r.message);
    let batch = encode_with(
        messages,
        |i| records[i].offset.saturating_sub(base) as i64,
        producer,
        attributes,
    )?;
    Ok(with_base_offset(batch, base))
}

/// A record kafka-protocol decoded, as the broker hands it out.
fn stored_of(r: Record) -> StoredMessage {
    StoredMessage {
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
    }
}

/// Reads the records of an uncompressed batch straight from its bytes:
/// keys, values and header values stay slices of the entry, and repeated
/// header names survive.
fn decode_plain(h: &BatchHeader, batch: Bytes) -> Result<Vec<StoredMessage>> {
    let bad = |why: &str| BrokerError::CorruptBatch(format!("decoding records: {why}"));
    let mut r = Reader {
        b: &batch,
        at: HEADER_LEN,
    };
    let count = usize::try_from(h.record_count).map_err(|_| bad("record count"))?;
    // Every record takes at least 7 bytes, so a count the bytes cannot
    // hold is refused before anything is allocated for it.
    if count > batch.len().saturating_sub(HEADER_LEN) / 7 + 1 {
        return Err(bad("record count larger than the batch"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::try_from(r.varint()?).map_err(|_| bad("record length"))?;
        let end =
            r.at.checked_add(len)
                .filter(|&e| e <= batch.len())
                .ok_or_else(|| bad("record past the batch"))?;
        r.at += 1; // attributes
        let ts_delta = r.varint()?;
        let offset_delta = r.varint()?;
        let key = r.bytes()?;
        let value = r.bytes()?;
        let n = usize::try_from(r.varint()?).map_err(|_| bad("header count"))?;
        if n > end.saturating_sub(r.at) / 2 {
            return Err(bad("header count larger than the record"));
        }
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.bytes()?.ok_or_else(|| bad("null header name"))?;
            let name =
                String::from_utf8(name.to_vec()).map_err(|_| bad("header name not UTF-8"))?;
            headers.push((name, r.bytes()?));
        }
        if r.at != end {
            return Err(bad("record length does not match its fields"));
        }
        out.push(StoredMessage {
            offset: (h.base_offset.max(0) as u64).wrapping_add(offset_delta.max(0) as u64),
            message: Message {
                key,
                value,
                headers,
                // Log-append time stamps the whole batch, as Kafka reads it.
                timestamp_ms: if h.attributes & LOG_APPEND_TIME_FLAG != 0 {
                    h.max_timestamp
                } else {
                    h.first_timestamp.wrapping_add(ts_delta)
                },
            },
        });
    }
    Ok(out)
}

struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<i64> {
        let mut z: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *self.b.get(self.at).ok_or_else(|| {
                BrokerError::CorruptBatch("decoding records: truncated varint".into())
            })?;
            self.at += 1;
            if shift == 63 && byte > 1 {
                break;
            }
            z |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(BrokerError::CorruptBatch(
            "decoding records: varint too long".into(),
        ))
    }

    /// A length-prefixed field as a slice of the batch; -1 is null.
    fn bytes(&mut self) -> Result<Option<Bytes>> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.at.checked_add(l))
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                BrokerError::CorruptBatch("decoding records: field past the batch".into())
            })?;
        let out = self.b.slice(self.at..end);
        self.at = end;
        Ok(Some(out))
    }
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
    use kafka_protocol::protocol::StrBytes;

    /// One record of `n` zero bytes, compressed with `codec`: a few
    /// kilobytes that inflate to `n`.
    fn bomb(codec: u16, n: usize) -> Bytes {
        let plain = encode_messages(&[Message::new(vec![0u8; n])]).expect("encodes");
        recompress(plain, codec).expect("compresses")
    }

    #[test]
    fn decompression_bombs_are_refused_at_the_cap() {
        for codec in [1u16, 2, 3, 4] {
            let small = bomb(codec, 1 << 20);
            check_inflated(&small).expect("a 1 MiB batch passes");
            assert_eq!(decode_entry(&small).expect("decodes").len(), 1);

            let big = bomb(codec, MAX_INFLATED_BATCH + (1 << 20));
            assert!(big.len() < 8 << 20, "codec {codec}: {} bytes", big.len());
            let e = check_inflated(&big).expect_err("refused at produce");
            assert!(matches!(e, BrokerError::CorruptBatch(_)), "{e}");
            let e = decode_entry(&big).expect_err("refused when read");
            assert!(matches!(e, BrokerError::CorruptBatch(_)), "{e}");
        }
    }

    #[test]
    fn snappy_lengths_are_checked_before_allocation() {
        // A raw snappy block whose varint claims 4 GiB.
        let claim = [0x80u8, 0x80, 0x80, 0x80, 0x0f, 0x00];
        assert!(inflate(Compression::Snappy, &claim, MAX_INFLATED_BATCH).is_err());
        // A xerial frame of blocks that each claim 60 MiB.
        let mut framed = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
        for _ in 0..3 {
            let block = [0x80u8, 0x80, 0x80, 0x1e, 0x00];
            framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
            framed.extend_from_slice(&block);
        }
        assert!(inflate(Compression::Snappy, &framed, MAX_INFLATED_BATCH).is_err());
    }

    proptest::proptest! {
        /// Whatever the bytes, inflation returns at most the limit or an
        /// error, never panics.
        #[test]
        fn inflation_of_arbitrary_bytes_stays_under_the_limit(
            codec in 1u16..5,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let c = compression_of(codec).expect("codec");
            if let Ok(b) = inflate(c, &data, 4096) {
                proptest::prop_assert!(b.len() <= 4096);
            }
        }
    }

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
    fn per_message_replication_splits_a_mixed_batch_into_runs() {
        let to = |v: &str| {
            (
                REPLICATE_TO_HEADER.to_string(),
                Some(Bytes::from(v.to_owned())),
            )
        };
        let mut msgs = sample(6);
        msgs[1].headers.push(to("east"));
        msgs[2].headers.push(to(" east , mars "));
        msgs[4].headers.push(to("east,west"));
        msgs[5].headers.push(to(""));
        for codec in [0u16, 3] {
            let plain = with_base_offset(encode_messages(&msgs).expect("encode"), 100);
            let batch = recompress(plain, codec).expect("recompress");
            let h = validate_batch(&batch).expect("valid");
            let offsets = |r: Replicable| -> Vec<Vec<u64>> {
                let Replicable::Runs(runs) = r else {
                    panic!("expected runs, got {r:?}")
                };
                runs.iter()
                    .map(|b| {
                        let rh = validate_batch(b).expect("a run is a valid batch");
                        assert_eq!(rh.compression(), codec);
                        assert_eq!(rh.offset_count(), rh.record_count as u64);
                        decode_entry(b)
                            .expect("decode")
                            .iter()
                            .map(|m| m.offset)
                            .collect()
                    })
                    .collect()
            };
            let west = replicable_to(&batch, &h, "west").expect("select");
            assert_eq!(offsets(west), vec![vec![100], vec![103, 104]]);
            let mars = replicable_to(&batch, &h, "mars").expect("select");
            assert_eq!(offsets(mars), vec![vec![100], vec![102, 103]]);
            // What stays whole is sent as it is stored.
            let all = encode_messages(&sample(3)).expect("encode");
            let ah = validate_batch(&all).expect("valid");
            assert_eq!(
                replicable_to(&all, &ah, "west").expect("select"),
                Replicable::Whole
            );
            let local: Vec<Message> = sample(2)
                .into_iter()
                .map(|mut m| {
                    m.headers.push(to("east"));
                    m
                })
                .collect();
            let local =
                recompress(encode_messages(&local).expect("encode"), codec).expect("recompress");
            let lh = validate_batch(&local).expect("valid");
            assert_eq!(
                replicable_to(&local, &lh, "west").expect("select"),
                Replicable::Nothing
            );
            assert_eq!(
                replicable_to(&local, &lh, "east").expect("select"),
                Replicable::Whole
            );
        }
        // The records of a run keep their keys, headers and timestamps.
        let batch = with_base_offset(encode_messages(&msgs).expect("encode"), 100);
        let h = validate_batch(&batch).expect("valid");
        let Replicable::Runs(runs) = replicable_to(&batch, &h, "west").expect("select") else {
            panic!("runs")
        };
        let before = decode_entry(&batch).expect("decode");
        let after = decode_entry(&runs[1]).expect("decode");
        assert_eq!(after[0], before[3]);
        assert_eq!(after[1], before[4]);
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
    fn a_geo_stamp_changes_the_producer_fields_and_nothing_else() {
        let producer = ProducerSequence {
            producer_id: 7,
            epoch: 1,
            base_sequence: 3,
        };
        let batch = encode_transactional(&sample(4), producer).expect("batch");
        let stamp = crate::replicated::GeoStamp::new(2, 5_000_000_000).expect("stamp");
        let h = validate_batch(&batch).expect("valid");
        let stamped = with_geo_stamp(batch.clone(), &h, stamp).expect("stamped");
        let h = validate_batch(&stamped).expect("its CRC holds");
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (stamp.producer_id, stamp.epoch, stamp.base_sequence)
        );
        assert!(!h.is_transactional());
        assert_eq!(
            crate::replicated::GeoStamp::decode(h.producer_id, h.producer_epoch, h.base_sequence),
            Some((2, 5_000_000_000))
        );
        let before = decode_entry(&batch).expect("decodes");
        let after = decode_entry(&stamped).expect("decodes");
        assert_eq!(before, after);
        assert_eq!(stamped[HEADER_LEN..], batch[HEADER_LEN..]);
        assert!(with_geo_stamp(batch.slice(..batch.len() - 1), &h, stamp).is_err());
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

    /// Decodes with kafka-protocol's reader, as a second opinion.
    fn reference_decode(batch: &Bytes) -> Vec<StoredMessage> {
        let mut buf = batch.clone();
        let set = RecordBatchDecoder::decode(&mut buf).expect("reference decodes");
        set.records.into_iter().map(stored_of).collect()
    }

    fn arb_message() -> impl proptest::strategy::Strategy<Value = Message> {
        use proptest::prelude::*;
        let field = proptest::option::of(
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from),
        );
        (
            field.clone(),
            field.clone(),
            // Distinct names: kafka-protocol folds repeats, which the
            // next test covers on our side alone.
            proptest::collection::btree_map("[a-z.-]{1,12}", field, 0..6),
            prop_oneof![Just(0i64), 1i64..4_000_000_000_000],
        )
            .prop_map(|(key, value, headers, timestamp_ms)| Message {
                key,
                value,
                headers: headers.into_iter().collect(),
                timestamp_ms,
            })
    }

    proptest::proptest! {
        #[test]
        fn written_batches_read_back_and_agree_with_kafka_protocol(
            msgs in proptest::collection::vec(arb_message(), 1..20),
            base in 0u64..1 << 40,
        ) {
            let batch = with_base_offset(encode_messages(&msgs).expect("encodes"), base);
            validate_batch(&batch).expect("valid batch");
            let ours = decode_entry(&batch).expect("decodes");
            let theirs = reference_decode(&batch);
            proptest::prop_assert_eq!(ours.len(), msgs.len());
            for (i, ((m, o), t)) in msgs.iter().zip(&ours).zip(&theirs).enumerate() {
                proptest::prop_assert_eq!(o.offset, base + i as u64);
                proptest::prop_assert_eq!(&o.message.key, &m.key);
                proptest::prop_assert_eq!(&o.message.value, &m.value);
                proptest::prop_assert_eq!(&o.message.headers, &m.headers);
                if m.timestamp_ms > 0 {
                    proptest::prop_assert_eq!(o.message.timestamp_ms, m.timestamp_ms);
                }
                proptest::prop_assert_eq!(t, o);
            }
        }

        #[test]
        fn damaged_batches_are_refused_or_read_never_panicked_on(
            msgs in proptest::collection::vec(arb_message(), 1..5),
            cuts in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..8),
            truncate in 0usize..4096,
        ) {
            let mut b = encode_messages(&msgs).expect("encodes").to_vec();
            for (at, v) in cuts {
                if b.len() > HEADER_LEN {
                    let at = HEADER_LEN + at % (b.len() - HEADER_LEN);
                    b[at] = v;
                }
            }
            if truncate < b.len() {
                b.truncate(truncate.max(HEADER_LEN));
            }
            let _ = decode_entry(&Bytes::from(b));
        }
    }

    #[test]
    fn repeated_header_names_survive() {
        let m = Message::new("v")
            .with_header("h", "1")
            .with_header("h", "2");
        let back = decode_entry(&encode_messages(std::slice::from_ref(&m)).expect("encodes"))
            .expect("decodes");
        assert_eq!(back[0].message.headers, m.headers);
    }

    #[test]
    fn batches_kafka_protocol_writes_read_back() {
        let records: Vec<Record> = (0..4)
            .map(|i| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: NO_PARTITION_LEADER_EPOCH,
                producer_id: NO_PRODUCER_ID,
                producer_epoch: NO_PRODUCER_EPOCH,
                timestamp_type: TimestampType::Creation,
                offset: i,
                // One batch needs offset minus sequence constant.
                sequence: NO_SEQUENCE.wrapping_add(i as i32),
                timestamp: 1_700_000_000_000 + i * 10,
                key: (i != 2).then(|| Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("v{i}"))),
                headers: [
                    (StrBytes::from_static_str("a"), Some(Bytes::from("x"))),
                    (StrBytes::from_static_str("n"), None),
                ]
                .into_iter()
                .collect(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .expect("encodes");
        let back = decode_entry(&buf.freeze()).expect("decodes");
        assert_eq!(back.len(), 4);
        for (r, m) in records.iter().zip(&back) {
            assert_eq!(m.offset, r.offset as u64);
            assert_eq!(m.message.key, r.key);
            assert_eq!(m.message.value, r.value);
            assert_eq!(m.message.timestamp_ms, r.timestamp);
            assert_eq!(
                m.message.headers,
                vec![
                    ("a".to_string(), Some(Bytes::from("x"))),
                    ("n".to_string(), None)
                ]
            );
        }
    }
}
