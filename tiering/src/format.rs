//! The offload format, sans-I/O: records in, an Arrow IPC file and its
//! index out, and back.
//!
//! The file is a plain Arrow IPC file (`ARROW1`), so that any Arrow reader
//! opens it. Its record batches hold at most about `block_bytes` of keys,
//! values and headers each. The index lists every batch with its first
//! offset, its byte range in the file and its crc32c, so that a read
//! fetches only the batches it needs (ranged GETs), and the whole file's
//! crc32c, which is checked after an upload before the ledger counts as
//! offloaded.

use std::sync::{Arc, OnceLock};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMillisecondArray, UInt64Array,
};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_ipc::reader::FileDecoder;
use arrow_ipc::writer::FileWriter;
use arrow_ipc::{Block, MetadataVersion};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TieringError};

/// The index's format version.
pub const INDEX_FORMAT: u32 = 1;
/// Default bound on one record batch's keys, values and headers.
pub const DEFAULT_BLOCK_BYTES: usize = 1 << 20;

/// One record, as the broker stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// In order; names may repeat.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The producer of a transaction this record belongs to, so that
    /// readers of committed data can leave out aborted transactions.
    pub producer_id: Option<i64>,
    /// A transaction marker rather than data: key and value hold the
    /// marker, and analytics readers filter these rows out.
    pub control: bool,
}

impl Record {
    /// About what the record takes in memory and on the wire.
    pub fn size(&self) -> usize {
        let h: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
            .sum();
        16 + self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len) + h
    }
}

fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
    ])
}

fn header_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(header_fields()), false))
}

/// The schema of every offloaded file.
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("offset", DataType::UInt64, false),
                Field::new(
                    "timestamp",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    false,
                ),
                Field::new("key", DataType::Binary, true),
                Field::new("value", DataType::Binary, true),
                Field::new("headers", DataType::List(header_item()), false),
                Field::new("producer_id", DataType::Int64, true),
                Field::new("control", DataType::Boolean, false),
            ]))
        })
        .clone()
}

fn to_batch(records: &[Record]) -> Result<RecordBatch> {
    let offsets = UInt64Array::from_iter_values(records.iter().map(|r| r.offset));
    let timestamps =
        TimestampMillisecondArray::from_iter_values(records.iter().map(|r| r.timestamp_ms));
    let keys = BinaryArray::from_iter(records.iter().map(|r| r.key.as_deref()));
    let values = BinaryArray::from_iter(records.iter().map(|r| r.value.as_deref()));
    // Arrow's builders want sized iterators; a ledger's headers are
    // gathered first.
    let all: Vec<&(String, Option<Bytes>)> =
        records.iter().flat_map(|r| r.headers.iter()).collect();
    let names = StringArray::from_iter_values(all.iter().map(|(k, _)| k.as_str()));
    let header_values = BinaryArray::from_iter(all.iter().map(|(_, v)| v.as_deref()));
    let entries = StructArray::try_new(
        header_fields(),
        vec![Arc::new(names) as ArrayRef, Arc::new(header_values)],
        None,
    )?;
    let headers = ListArray::try_new(
        header_item(),
        OffsetBuffer::from_lengths(records.iter().map(|r| r.headers.len())),
        Arc::new(entries),
        None,
    )?;
    let producers = Int64Array::from_iter(records.iter().map(|r| r.producer_id));
    let control = BooleanArray::from_iter(records.iter().map(|r| Some(r.control)));
    Ok(RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(offsets),
            Arc::new(timestamps),
            Arc::new(keys),
            Arc::new(values),
            Arc::new(headers),
            Arc::new(producers),
            Arc::new(control),
        ],
    )?)
}

fn bytes_at(a: &BinaryArray, i: usize) -> Option<Bytes> {
    a.is_valid(i).then(|| Bytes::copy_from_slice(a.value(i)))
}

fn from_batch(batch: &RecordBatch) -> Result<Vec<Record>> {
    if batch.schema() != schema() {
        return Err(TieringError::Corrupt(format!(
            "unexpected schema {:?}",
            batch.schema()
        )));
    }
    let offsets = batch.column(0).as_primitive::<UInt64Type>();
    let timestamps = batch.column(1).as_primitive::<TimestampMillisecondType>();
    let keys = batch.column(2).as_binary::<i32>();
    let values = batch.column(3).as_binary::<i32>();
    let headers = batch.column(4).as_list::<i32>();
    let entries = headers.values().as_struct();
    let names = entries.column(0).as_string::<i32>();
    let header_values = entries.column(1).as_binary::<i32>();
    let producers = batch.column(5).as_primitive::<Int64Type>();
    let control = batch.column(6).as_boolean();
    let bounds = headers.value_offsets();
    (0..batch.num_rows())
        .map(|i| {
            let (from, to) = (bounds[i], bounds[i + 1]);
            let from = usize::try_from(from)
                .map_err(|_| TieringError::Corrupt("header offsets".into()))?;
            let to =
                usize::try_from(to).map_err(|_| TieringError::Corrupt("header offsets".into()))?;
            if from > to || to > names.len() {
                return Err(TieringError::Corrupt("header offsets".into()));
            }
            Ok(Record {
                offset: offsets.value(i),
                timestamp_ms: timestamps.value(i),
                key: bytes_at(keys, i),
                value: bytes_at(values, i),
                headers: (from..to)
                    .map(|j| (names.value(j).to_owned(), bytes_at(header_values, j)))
                    .collect(),
                producer_id: producers.is_valid(i).then(|| producers.value(i)),
                control: control.value(i),
            })
        })
        .collect()
}

/// One record batch of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockIndex {
    pub first_offset: u64,
    /// Offsets may have gaps (a transaction's markers take offsets too).
    pub last_offset: u64,
    pub records: u32,
    /// Where the batch's message starts in the file.
    pub start: u64,
    pub meta_len: u32,
    pub body_len: u64,
    /// crc32c of the batch's bytes (`meta_len + body_len` from `start`).
    pub crc32c: u32,
    /// The newest record timestamp, for lookups by time.
    #[serde(default)]
    pub max_timestamp_ms: i64,
}

impl BlockIndex {
    pub fn len(&self) -> u64 {
        u64::from(self.meta_len).saturating_add(self.body_len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The byte range to fetch.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.start..self.start.saturating_add(self.len())
    }

    /// One past the last offset it holds.
    pub fn end_offset(&self) -> u64 {
        self.last_offset.saturating_add(1)
    }

    /// The batch's records, from exactly the bytes of [`Self::range`];
    /// refused unless they match the checksum.
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<Record>> {
        if bytes.len() as u64 != self.len() || crc32c::crc32c(bytes) != self.crc32c {
            return Err(TieringError::Corrupt(format!(
                "block at offset {} does not match its checksum",
                self.first_offset
            )));
        }
        let decoder = FileDecoder::new(schema(), MetadataVersion::V5);
        let block = Block::new(
            0,
            i32::try_from(self.meta_len).map_err(|_| TieringError::Corrupt("block".into()))?,
            i64::try_from(self.body_len).map_err(|_| TieringError::Corrupt("block".into()))?,
        );
        let buffer = Buffer::from_vec(bytes.to_vec());
        let batch = arrow_guard("block", || decoder.read_record_batch(&block, &buffer))??
            .ok_or_else(|| TieringError::Corrupt("block holds no record batch".into()))?;
        let records = from_batch(&batch)?;
        if records.len() != self.records as usize
            || records.first().map(|r| r.offset) != Some(self.first_offset)
            || records.last().map(|r| r.offset) != Some(self.last_offset)
        {
            return Err(TieringError::Corrupt(format!(
                "block at offset {} holds other records than its index says",
                self.first_offset
            )));
        }
        Ok(records)
    }
}

/// What is known of one offloaded ledger's file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerIndex {
    pub format: u32,
    pub ledger_id: u64,
    /// The first offset it holds and one past its last.
    pub first_offset: u64,
    pub end_offset: u64,
    pub records: u64,
    pub file_len: u64,
    pub crc32c: u32,
    pub blocks: Vec<BlockIndex>,
}

impl LedgerIndex {
    /// The blocks holding offsets from `from` on, in order.
    pub fn blocks_from(&self, from: u64) -> &[BlockIndex] {
        let i = self.blocks.partition_point(|b| b.end_offset() <= from);
        &self.blocks[i..]
    }

    /// Checks a whole uploaded file against the index.
    pub fn verify(&self, file: &[u8]) -> Result<()> {
        if file.len() as u64 != self.file_len || crc32c::crc32c(file) != self.crc32c {
            return Err(TieringError::Corrupt(format!(
                "file of ledger {} does not match its checksum",
                self.ledger_id
            )));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn from_json(b: &[u8]) -> Result<LedgerIndex> {
        let index: LedgerIndex =
            serde_json::from_slice(b).map_err(|e| TieringError::Corrupt(format!("index: {e}")))?;
        if index.format != INDEX_FORMAT {
            return Err(TieringError::Corrupt(format!(
                "index format {} is not {INDEX_FORMAT}",
                index.format
            )));
        }
        Ok(index)
    }
}

/// Builds one ledger's file from its records, in offset order.
pub struct LedgerFileWriter {
    ledger_id: u64,
    block_bytes: usize,
    writer: FileWriter<Vec<u8>>,
    pending: Vec<Record>,
    pending_bytes: usize,
    /// First and last offset, count and newest timestamp of each batch
    /// written.
    written: Vec<(u64, u64, u32, i64)>,
    next_offset: Option<u64>,
}

impl LedgerFileWriter {
    pub fn new(ledger_id: u64, block_bytes: usize) -> Result<Self> {
        if block_bytes == 0 {
            return Err(TieringError::InvalidArgument("block size is 0".into()));
        }
        Ok(LedgerFileWriter {
            ledger_id,
            block_bytes,
            writer: FileWriter::try_new(Vec::new(), &schema())?,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            next_offset: None,
        })
    }

    pub fn push(&mut self, record: Record) -> Result<()> {
        if let Some(next) = self.next_offset {
            if record.offset < next {
                return Err(TieringError::InvalidArgument(format!(
                    "offset {} after {}",
                    record.offset,
                    next - 1
                )));
            }
        }
        self.next_offset = Some(record.offset + 1);
        self.pending_bytes += record.size();
        self.pending.push(record);
        if self.pending_bytes >= self.block_bytes {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.pending)?;
        self.writer.write(&batch)?;
        let count = u32::try_from(self.pending.len())
            .map_err(|_| TieringError::InvalidArgument("too many records in a block".into()))?;
        let last = self.pending[self.pending.len() - 1].offset;
        let newest = self
            .pending
            .iter()
            .map(|r| r.timestamp_ms)
            .max()
            .unwrap_or(i64::MIN);
        self.written
            .push((self.pending[0].offset, last, count, newest));
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// The file and its index.
    pub fn finish(mut self) -> Result<(Bytes, LedgerIndex)> {
        self.flush()?;
        self.writer.finish()?;
        let file = Bytes::from(self.writer.into_inner()?);
        let blocks = footer_blocks(&file)?;
        if blocks.len() != self.written.len() {
            return Err(TieringError::Corrupt(format!(
                "{} batches written, {} in the footer",
                self.written.len(),
                blocks.len()
            )));
        }
        let blocks = blocks
            .into_iter()
            .zip(&self.written)
            .map(
                |((start, meta_len, body_len), &(first_offset, last_offset, records, newest))| {
                    let from = usize::try_from(start).unwrap_or(usize::MAX);
                    let to = from.saturating_add(
                        usize::try_from(u64::from(meta_len) + body_len).unwrap_or(usize::MAX),
                    );
                    let bytes = file
                        .get(from..to)
                        .ok_or_else(|| TieringError::Corrupt("block outside the file".into()))?;
                    Ok(BlockIndex {
                        first_offset,
                        last_offset,
                        records,
                        start,
                        meta_len,
                        body_len,
                        crc32c: crc32c::crc32c(bytes),
                        max_timestamp_ms: newest,
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let first_offset = blocks.first().map_or(0, |b| b.first_offset);
        let end_offset = blocks.last().map_or(0, BlockIndex::end_offset);
        let index = LedgerIndex {
            format: INDEX_FORMAT,
            ledger_id: self.ledger_id,
            first_offset,
            end_offset,
            records: blocks.iter().map(|b| u64::from(b.records)).sum(),
            file_len: file.len() as u64,
            crc32c: crc32c::crc32c(&file),
            blocks,
        };
        Ok((file, index))
    }
}

/// The record batches' (start, metadata length, body length) from the
/// file's footer.
fn footer_blocks(file: &[u8]) -> Result<Vec<(u64, u32, u64)>> {
    let corrupt = || TieringError::Corrupt("not an Arrow IPC file".into());
    let trailer_start = file.len().checked_sub(10).ok_or_else(corrupt)?;
    let trailer: [u8; 10] = file[trailer_start..].try_into().map_err(|_| corrupt())?;
    let footer_len = arrow_ipc::reader::read_footer_length(trailer)?;
    let footer_start = trailer_start.checked_sub(footer_len).ok_or_else(corrupt)?;
    let footer = arrow_ipc::root_as_footer(&file[footer_start..trailer_start])
        .map_err(|e| TieringError::Corrupt(format!("footer: {e}")))?;
    footer
        .recordBatches()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    Ok((
                        u64::try_from(b.offset()).map_err(|_| corrupt())?,
                        u32::try_from(b.metaDataLength()).map_err(|_| corrupt())?,
                        u64::try_from(b.bodyLength()).map_err(|_| corrupt())?,
                    ))
                })
                .collect()
        })
        .unwrap_or_else(|| Ok(Vec::new()))
}

/// Refuses a file whose footer places a block (record batch or
/// dictionary) past its end: Arrow's file reader allocates a block's
/// announced length before reading it, and a failed allocation aborts the
/// process, which no guard catches.
fn check_footer_blocks(file: &[u8]) -> Result<()> {
    let corrupt = || TieringError::Corrupt("an Arrow IPC block lies past the file's end".into());
    let trailer_start = file.len().checked_sub(10).ok_or_else(corrupt)?;
    let trailer: [u8; 10] = file[trailer_start..].try_into().map_err(|_| corrupt())?;
    let footer_len = arrow_ipc::reader::read_footer_length(trailer)?;
    let footer_start = trailer_start.checked_sub(footer_len).ok_or_else(corrupt)?;
    let footer = arrow_ipc::root_as_footer(&file[footer_start..trailer_start])
        .map_err(|e| TieringError::Corrupt(format!("footer: {e}")))?;
    let blocks = footer
        .recordBatches()
        .into_iter()
        .flatten()
        .chain(footer.dictionaries().into_iter().flatten());
    for b in blocks {
        let end = u64::try_from(b.offset())
            .ok()
            .zip(u64::try_from(b.metaDataLength()).ok())
            .zip(u64::try_from(b.bodyLength()).ok())
            .and_then(|((o, m), l)| o.checked_add(m)?.checked_add(l));
        if end.is_none_or(|end| end > footer_start as u64) {
            return Err(corrupt());
        }
    }
    Ok(())
}

/// Every record of a whole file, through Arrow's own file reader: what an
/// analytics tool sees.
pub fn read_file(file: Bytes) -> Result<Vec<Record>> {
    check_footer_blocks(&file)?;
    arrow_guard("file", || {
        let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(file), None)?;
        let mut out = Vec::new();
        for batch in reader {
            out.extend(from_batch(&batch?)?);
        }
        Ok(out)
    })?
}

/// Runs an Arrow IPC read. The reader asserts on some malformed buffer
/// layouts instead of returning an error; bytes that pass their checksum
/// but were written by someone else must still come back as an error,
/// never as a panic in the broker.
fn arrow_guard<T>(what: &str, read: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
        .map_err(|_| TieringError::Corrupt(format!("{what} is not valid Arrow IPC")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(offset: u64, size: usize) -> Record {
        Record {
            offset,
            timestamp_ms: 1_700_000_000_000 + offset as i64,
            key: (!offset.is_multiple_of(3)).then(|| Bytes::from(format!("k{offset}"))),
            value: Some(Bytes::from(vec![(offset % 251) as u8; size])),
            headers: match offset % 4 {
                0 => vec![],
                1 => vec![("a".into(), Some(Bytes::from_static(b"1")))],
                2 => vec![
                    ("a".into(), None),
                    ("a".into(), Some(Bytes::from_static(&[0xff]))),
                ],
                _ => vec![("ü".into(), Some(Bytes::new()))],
            },
            producer_id: offset.is_multiple_of(5).then_some(offset as i64 * 1000),
            control: offset.is_multiple_of(10),
        }
    }

    fn write(records: &[Record], block_bytes: usize) -> (Bytes, LedgerIndex) {
        let mut w = LedgerFileWriter::new(7, block_bytes).expect("writer");
        for r in records {
            w.push(r.clone()).expect("push");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn blocks_are_bounded_and_each_decodes_from_its_own_range() {
        let records: Vec<Record> = (100..1100).map(|o| record(o, 100)).collect();
        let (file, index) = write(&records, 10_000);
        assert_eq!(
            (index.first_offset, index.end_offset, index.records),
            (100, 1100, 1000)
        );
        assert!(index.blocks.len() >= 10, "{} blocks", index.blocks.len());
        index.verify(&file).expect("verify");
        let mut back = Vec::new();
        for b in &index.blocks {
            let range = b.range();
            back.extend(
                b.decode(&file[range.start as usize..range.end as usize])
                    .expect("decode"),
            );
        }
        assert_eq!(back, records);
        // What any Arrow reader sees.
        assert_eq!(read_file(file).expect("read"), records);
        // A read from the middle starts at the block holding it.
        let from = index.blocks_from(555);
        assert!(from[0].first_offset <= 555 && 555 < from[0].end_offset());
        assert!(index.blocks_from(1100).is_empty());
        assert_eq!(index.blocks_from(0).len(), index.blocks.len());
    }

    #[test]
    fn the_index_round_trips_and_is_checked() {
        let (_, index) = write(&[record(0, 10), record(1, 10)], 1);
        assert_eq!(
            LedgerIndex::from_json(&index.to_json()).expect("json"),
            index
        );
        let mut other = index.clone();
        other.format = 99;
        assert!(LedgerIndex::from_json(&other.to_json()).is_err());
        assert!(LedgerIndex::from_json(b"{").is_err());
    }

    #[test]
    fn corruption_is_detected_never_served() {
        let (file, index) = write(&(0..50).map(|o| record(o, 50)).collect::<Vec<_>>(), 500);
        let mut bad = file.to_vec();
        let b = &index.blocks[1];
        bad[(b.start + b.len() / 2) as usize] ^= 0x40;
        assert!(index.verify(&bad).is_err());
        let range = b.range();
        assert!(matches!(
            b.decode(&bad[range.start as usize..range.end as usize]),
            Err(TieringError::Corrupt(_))
        ));
        // A range of the wrong length.
        assert!(b
            .decode(&file[range.start as usize..range.end as usize - 1])
            .is_err());
    }

    #[test]
    fn offsets_must_rise_and_an_empty_ledger_is_an_empty_file() {
        let mut w = LedgerFileWriter::new(1, 100).expect("writer");
        w.push(record(5, 1)).expect("push");
        assert!(w.push(record(5, 1)).is_err());
        let (file, index) = write(&[], 100);
        assert_eq!((index.records, index.blocks.len()), (0, 0));
        assert!(read_file(file).expect("read").is_empty());
        assert!(LedgerFileWriter::new(1, 0).is_err());
    }

    /// A record (offset 0) and the gap before its offset.
    fn arb_record() -> impl Strategy<Value = (u8, Record)> {
        let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from);
        (
            0u8..4,
            proptest::option::of(bytes(40)),
            proptest::option::of(bytes(200)),
            proptest::collection::vec(("[a-z]{0,6}", proptest::option::of(bytes(10))), 0..4),
            any::<i64>(),
            proptest::option::of(any::<i64>()),
            any::<bool>(),
        )
            .prop_map(
                |(gap, key, value, headers, timestamp_ms, producer_id, control)| {
                    let record = Record {
                        offset: 0,
                        timestamp_ms,
                        key,
                        value,
                        headers,
                        producer_id,
                        control,
                    };
                    (gap, record)
                },
            )
    }

    proptest! {
        #[test]
        fn any_records_round_trip(
            raw in proptest::collection::vec(arb_record(), 0..60),
            block_bytes in 1usize..2_000,
        ) {
            let mut offset = 0u64;
            let records: Vec<Record> = raw
                .into_iter()
                .map(|(gap, mut r)| {
                    offset += u64::from(gap);
                    r.offset = offset;
                    offset += 1;
                    r
                })
                .collect();
            let (file, index) = write(&records, block_bytes);
            let mut back = Vec::new();
            for b in &index.blocks {
                let range = b.range();
                back.extend(b.decode(&file[range.start as usize..range.end as usize]).expect("decode"));
            }
            prop_assert_eq!(&back, &records);
            prop_assert_eq!(read_file(file).expect("read"), records);
        }
    }
}
