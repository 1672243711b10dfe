//! The bookie: its on-disk journal and entry logs, read back at start and
//! by compaction, and its gRPC messages.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use magnetar_bookies::meta::entry_crc;
use magnetar_bookies::proto;
use magnetar_bookies::storage::entrylog::{self, EntryLogs, Location, LogUsage};
use magnetar_bookies::storage::journal::{self, JournalPos, Record, StoredEntry};
use prost::Message as _;

use crate::proto_round_trip;

thread_local! {
    /// One scratch directory per thread, reused by every input: creating
    /// one per input would cost more than the decoding it serves. It goes
    /// when the thread ends (a fuzzer process that exits leaves it in the
    /// temporary directory).
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

pub fn files(data: &[u8]) {
    positions(data);
    entry_record(data);
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.is_none() {
            *scratch = tempfile::tempdir().ok();
        }
        if let Some(dir) = scratch.as_ref() {
            replay(dir.path(), data);
            scan(dir.path(), data);
        }
    });
}

/// The bytes as the only journal file, replayed as at a bookie's start.
fn replay(root: &Path, data: &[u8]) {
    let dir = root.join("journal");
    let file = dir.join("000000000001.log");
    if std::fs::create_dir_all(&dir).is_err() || std::fs::write(&file, data).is_err() {
        return;
    }
    let mut seen: Vec<(Record, JournalPos)> = Vec::new();
    let Ok(last) = journal::replay(&dir, JournalPos::default(), |r, pos| seen.push((r, pos)))
    else {
        // An I/O error of the scratch directory, not of the decoder.
        return;
    };
    assert_eq!(last, 1, "the only journal file is number 1");
    // What replay yields, encoded again, is exactly the prefix of the file
    // it read, and the file is cut to that prefix.
    let mut kept = Vec::new();
    for (r, pos) in &seen {
        r.encode_into(&mut kept);
        assert_eq!(
            *pos,
            JournalPos {
                file: 1,
                offset: kept.len() as u64
            },
            "a record's position is just past it"
        );
    }
    assert_eq!(
        data.get(..kept.len()),
        Some(&kept[..]),
        "replay yields records other than those written"
    );
    assert_eq!(
        std::fs::metadata(&file).map(|m| m.len()).ok(),
        Some(kept.len() as u64),
        "a torn tail is cut at the last whole record"
    );
    // A second replay finds nothing to cut, and one from a checkpoint
    // skips what lies before it.
    let mut again = 0;
    if journal::replay(&dir, JournalPos::default(), |_, _| again += 1).is_ok() {
        assert_eq!(again, seen.len(), "a replayed journal replays the same");
    }
    if let Some((_, first)) = seen.first() {
        let mut after = 0;
        if journal::replay(&dir, *first, |_, _| after += 1).is_ok() {
            assert_eq!(after, seen.len() - 1, "replay from a checkpoint");
        }
    }
}

/// The bytes as an entry log, scanned as compaction scans it.
fn scan(root: &Path, data: &[u8]) {
    let dir = root.join("entrylogs");
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join("0000000001.log"), data).is_err()
    {
        return;
    }
    // Log 1 is in use, so it is kept; the log opened for writing (and any
    // left by the previous input) are not.
    let usage = BTreeMap::from([(1u32, LogUsage::default())]);
    let Ok(logs) = EntryLogs::open(&dir, 1 << 30, usage) else {
        return;
    };
    let Ok(found) = logs.scan(1) else {
        return;
    };
    let mut at = 0usize;
    for (loc, e) in &found {
        assert_eq!(loc.log, 1);
        assert_eq!(loc.offset, at as u64, "scan skipped bytes");
        let mut rec = Vec::new();
        entrylog::encode_record(e, &mut rec);
        assert_eq!(rec.len(), loc.len as usize);
        assert_eq!(
            data.get(at..at + rec.len()),
            Some(&rec[..]),
            "scan yields records other than those written"
        );
        at += rec.len();
        let _ = entrylog::decode_record(Bytes::from(rec), e.ledger, e.entry);
    }
}

/// One entry-log record, as a read through the index fetches it: once as
/// it is, and once with its length and checksum made right, when it must
/// decode to exactly what it holds.
fn entry_record(data: &[u8]) {
    if data.len() < entrylog::HEADER {
        return;
    }
    let Ok(body) = u32::try_from(data.len() - 4) else {
        return;
    };
    let id = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(b)
    };
    // The ids the index would ask for: those of the record, so that the
    // checks behind the id check are reached.
    let (ledger, entry) = (id(4), id(12));
    let _ = entrylog::decode_record(Bytes::copy_from_slice(data), ledger, entry);
    let mut fixed = data.to_vec();
    fixed[..4].copy_from_slice(&body.to_le_bytes());
    let crc = entry_crc(ledger, entry, &fixed[entrylog::HEADER..]);
    fixed[28..32].copy_from_slice(&crc.to_le_bytes());
    let e = match entrylog::decode_record(Bytes::from(fixed.clone()), ledger, entry) {
        Ok(e) => e,
        Err(e) => panic!("a well-formed entry-log record is refused: {e}"),
    };
    let mut again = Vec::new();
    entrylog::encode_record(&e, &mut again);
    assert_eq!(
        again, fixed,
        "an entry-log record encodes back to its bytes"
    );
}

/// Journal positions (the checkpoint) and index locations, as RocksDB
/// hands them back.
fn positions(data: &[u8]) {
    for w in data.chunks_exact(16).take(4) {
        let p = JournalPos::decode(w).expect("16 bytes are a journal position");
        assert_eq!(&p.encode()[..], w);
        let l = Location::decode(w).expect("16 bytes are an index location");
        assert_eq!(&l.encode()[..], w);
    }
    assert_eq!(JournalPos::decode(data).is_some(), data.len() == 16);
    assert_eq!(Location::decode(data).is_some(), data.len() == 16);
}

pub fn messages(data: &[u8]) {
    proto_round_trip::<proto::AddRequest>(data);
    proto_round_trip::<proto::ReadRequest>(data);
    proto_round_trip::<proto::LedgerRequest>(data);
    proto_round_trip::<proto::InfoRequest>(data);
    proto_round_trip::<proto::Entry>(data);
    // Responses, as the ledger client reads them from other bookies.
    proto_round_trip::<proto::AddResponse>(data);
    proto_round_trip::<proto::ReadResponse>(data);
    proto_round_trip::<proto::LacResponse>(data);
    proto_round_trip::<proto::DeleteResponse>(data);
    proto_round_trip::<proto::InfoResponse>(data);
}

fn entry(ledger: u64, id: u64, payload: &'static [u8]) -> StoredEntry {
    StoredEntry {
        ledger,
        entry: id,
        lac: id as i64 - 1,
        crc: entry_crc(ledger, id, payload),
        payload: Bytes::from_static(payload),
    }
}

pub fn file_seeds() -> Vec<Vec<u8>> {
    let entries = [
        entry(1, 0, b"hello"),
        entry(1, 1, b""),
        entry(2, 5, &[0xAB; 64]),
    ];
    let records = [
        Record::Add(entries[0].clone()),
        Record::Fence(1),
        Record::Add(entries[1].clone()),
        Record::Add(entries[2].clone()),
    ];
    let mut journal = Vec::new();
    for r in &records {
        r.encode_into(&mut journal);
    }
    // A crash mid-write leaves half a record behind.
    let mut torn = journal.clone();
    let mut extra = Vec::new();
    Record::Add(entry(3, 0, b"torn record")).encode_into(&mut extra);
    torn.extend_from_slice(&extra[..extra.len() / 2]);
    let mut log = Vec::new();
    for e in &entries {
        entrylog::encode_record(e, &mut log);
    }
    let mut single = Vec::new();
    entrylog::encode_record(&entries[0], &mut single);
    let position = JournalPos {
        file: 3,
        offset: 900,
    }
    .encode()
    .to_vec();
    let location = Location {
        log: 2,
        offset: 4096,
        len: 37,
    }
    .encode()
    .to_vec();
    vec![journal, torn, log, single, position, location]
}

pub fn proto_seeds() -> Vec<Vec<u8>> {
    let entry = proto::Entry {
        ledger_id: 1,
        entry_id: 0,
        lac: -1,
        crc: entry_crc(1, 0, b"hello"),
        payload: Bytes::from_static(b"hello"),
    };
    vec![
        proto::AddRequest {
            entries: vec![
                entry.clone(),
                proto::Entry {
                    entry_id: 1,
                    ..entry.clone()
                },
            ],
            recovery: false,
            ledger_id: 1,
            lac: 0,
        }
        .encode_to_vec(),
        proto::AddRequest {
            ledger_id: 1,
            lac: 5,
            ..Default::default()
        }
        .encode_to_vec(),
        proto::ReadRequest {
            ledger_id: 1,
            entry_ids: vec![0, 1, 2],
        }
        .encode_to_vec(),
        proto::LedgerRequest { ledger_id: 7 }.encode_to_vec(),
        proto::AddResponse {
            results: vec![proto::AddResult {
                ledger_id: 1,
                entry_id: 0,
                code: proto::Code::Fenced as i32,
                message: "fenced".into(),
            }],
        }
        .encode_to_vec(),
        proto::ReadResponse {
            results: vec![proto::ReadResult {
                entry_id: 0,
                code: proto::Code::Ok as i32,
                message: String::new(),
                entry: Some(entry),
            }],
        }
        .encode_to_vec(),
        proto::LacResponse {
            code: proto::Code::Ok as i32,
            message: String::new(),
            lac: 4,
            last_entry: 5,
            fenced: true,
        }
        .encode_to_vec(),
        proto::DeleteResponse {
            code: proto::Code::NoLedger as i32,
        }
        .encode_to_vec(),
        proto::InfoResponse {
            bookie_id: 3,
            read_only: true,
            ledgers: 10,
            ..Default::default()
        }
        .encode_to_vec(),
    ]
}
