//! Offloaded ledgers as they come back from object storage: the index,
//! the whole Arrow IPC file, and single blocks fetched by byte range.

use bytes::Bytes;
use magnetar_tiering::format::{self, BlockIndex, LedgerFileWriter, LedgerIndex, Record};

/// A block input starts with what the index would say of it: metadata
/// length and record count (u32 LE each), first and last offset (u64 LE
/// each); the block's bytes follow.
const BLOCK_PREFIX: usize = 24;
/// Records read back are written again only up to this many, to keep a run
/// cheap.
const MAX_REWRITE: usize = 256;

pub fn run(data: &[u8]) {
    index(data);
    if let Ok(records) = format::read_file(Bytes::copy_from_slice(data)) {
        rewrite(&records);
    }
    block(data);
}

/// The index as the tier reads it before any block, and the lookups a read
/// makes on it.
fn index(data: &[u8]) {
    let Ok(index) = LedgerIndex::from_json(data) else {
        return;
    };
    let again =
        LedgerIndex::from_json(&index.to_json()).expect("an index the broker writes reads back");
    assert_eq!(again, index);
    let _ = index.verify(data);
    for b in &index.blocks {
        let _ = b.range();
        let _ = b.end_offset();
    }
    for from in [0, index.first_offset, index.end_offset, u64::MAX] {
        let _ = index.blocks_from(from);
    }
}

/// One block decoded from its own bytes, as a ranged read fetches it. The
/// checksum is made to match, so that the Arrow decoder behind it is
/// reached by every input; the checksum check itself is one comparison.
fn block(data: &[u8]) {
    let Some((head, bytes)) = data.split_first_chunk::<BLOCK_PREFIX>() else {
        return;
    };
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let long = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let meta_len = word(0);
    let Some(body_len) = bytes.len().checked_sub(meta_len as usize) else {
        return;
    };
    let b = BlockIndex {
        first_offset: long(8),
        last_offset: long(16),
        records: word(4),
        start: 0,
        meta_len,
        body_len: body_len as u64,
        crc32c: crc32c::crc32c(bytes),
        max_timestamp_ms: 0,
    };
    if let Ok(records) = b.decode(bytes) {
        assert_eq!(records.len(), b.records as usize);
        assert_eq!(records.first().map(|r| r.offset), Some(b.first_offset));
        assert_eq!(records.last().map(|r| r.offset), Some(b.last_offset));
        rewrite(&records);
    }
}

/// Records read back are written again as offload writes them, and read
/// back the same, whole and block by block.
fn rewrite(records: &[Record]) {
    if records.is_empty() || records.len() > MAX_REWRITE {
        return;
    }
    // The writer takes rising offsets, as a ledger has them; a file read
    // back from the store may hold anything.
    if records.windows(2).any(|w| w[0].offset >= w[1].offset)
        || records.iter().any(|r| r.offset == u64::MAX)
    {
        return;
    }
    let Ok(mut writer) = LedgerFileWriter::new(1, 512) else {
        return;
    };
    for r in records {
        if let Err(e) = writer.push(r.clone()) {
            panic!("rising records are refused: {e}");
        }
    }
    let (file, index) = match writer.finish() {
        Ok(done) => done,
        Err(e) => panic!("records read back do not write again: {e}"),
    };
    if let Err(e) = index.verify(&file) {
        panic!("a written file does not match its index: {e}");
    }
    match format::read_file(file.clone()) {
        Ok(back) => assert_eq!(back, records, "a rewritten file reads back other records"),
        Err(e) => panic!("a written file does not read back: {e}"),
    }
    let mut back = Vec::new();
    for b in &index.blocks {
        let range = b.range();
        let Some(bytes) = file.get(range.start as usize..range.end as usize) else {
            panic!(
                "block {range:?} lies outside the file of {} bytes",
                file.len()
            );
        };
        match b.decode(bytes) {
            Ok(block) => back.extend(block),
            Err(e) => panic!("block {range:?} does not decode from its range: {e}"),
        }
    }
    assert_eq!(
        back, records,
        "the blocks of a rewritten file hold other records"
    );
}

fn record(offset: u64) -> Record {
    Record {
        offset,
        timestamp_ms: 1_700_000_000_000 + offset as i64,
        key: (!offset.is_multiple_of(3)).then(|| Bytes::from(format!("k{offset}"))),
        value: Some(Bytes::from(vec![(offset % 251) as u8; 40])),
        headers: match offset % 4 {
            0 => Vec::new(),
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

pub fn seeds() -> Vec<Vec<u8>> {
    // Offsets with gaps, as a transaction's markers leave them.
    let records: Vec<Record> = (100..112).map(|o| record(o * 2)).collect();
    let Ok(mut writer) = LedgerFileWriter::new(7, 300) else {
        return Vec::new();
    };
    for r in records {
        if writer.push(r).is_err() {
            return Vec::new();
        }
    }
    let Ok((file, index)) = writer.finish() else {
        return Vec::new();
    };
    let mut out = vec![file.to_vec(), index.to_json().to_vec()];
    for b in &index.blocks {
        let range = b.range();
        let Some(bytes) = file.get(range.start as usize..range.end as usize) else {
            continue;
        };
        let mut one = Vec::with_capacity(BLOCK_PREFIX + bytes.len());
        one.extend_from_slice(&b.meta_len.to_le_bytes());
        one.extend_from_slice(&b.records.to_le_bytes());
        one.extend_from_slice(&b.first_offset.to_le_bytes());
        one.extend_from_slice(&b.last_offset.to_le_bytes());
        one.extend_from_slice(bytes);
        out.push(one);
    }
    // An empty ledger's file.
    if let Ok((empty, _)) = LedgerFileWriter::new(8, 300).and_then(LedgerFileWriter::finish) {
        out.push(empty.to_vec());
    }
    out
}
