use super::*;
use bytes::Bytes;

fn entry(ledger: u64, entry: u64, payload: &[u8]) -> StoredEntry {
    StoredEntry {
        ledger,
        entry,
        lac: entry as i64 - 1,
        crc: crate::meta::entry_crc(ledger, entry, payload),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn small() -> StorageConfig {
    StorageConfig {
        entry_log_bytes: 64 << 10,
        flush_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

async fn add_all(s: &Storage, entries: Vec<StoredEntry>, recovery: bool) -> AddOutcome {
    let mut out = s.add(entries, recovery);
    if let Some(rx) = out.durable.take() {
        rx.await.expect("journal answered").expect("durable");
    }
    out
}

#[tokio::test]
async fn adds_survive_a_crash_through_journal_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), small()).expect("open");
        let out = add_all(
            &s,
            (0..100).map(|i| entry(7, i, &[i as u8; 100])).collect(),
            false,
        )
        .await;
        assert!(out.refused.is_empty());
        assert_eq!(s.read(7, 42).expect("read").payload[0], 42);
        s.stop_threads();
    }
    let s = Storage::open(dir.path(), small()).expect("reopen");
    for i in 0..100 {
        assert_eq!(
            s.read(7, i).expect("read").payload,
            Bytes::from(vec![i as u8; 100])
        );
    }
    assert_eq!(s.ledger_info(7).expect("info").last_entry, 99);
    assert_eq!(s.ledger_info(7).expect("info").lac, 98);
    assert!(matches!(s.read(7, 100), Err(BookieError::NoEntry { .. })));
    assert!(matches!(s.read(8, 0), Err(BookieError::NoLedger(8))));
    s.close().expect("close");
}

#[tokio::test]
async fn flushed_entries_are_read_from_entry_logs_and_corruption_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), small()).expect("open");
        add_all(
            &s,
            vec![entry(1, 0, b"first entry"), entry(1, 1, b"second entry")],
            false,
        )
        .await;
        s.flush().expect("flush");
        // Flushed: journal files before the checkpoint are gone.
        s.stop_threads();
    }
    // Flip one payload byte of the second entry in its entry log.
    let logs_dir = dir.path().join("entrylogs");
    let mut hit = false;
    for id in entrylog::list_logs(&logs_dir).expect("list") {
        let path = logs_dir.join(format!("{id:010}.log"));
        let mut data = std::fs::read(&path).expect("read log");
        if let Some(pos) = data.windows(12).position(|w| w == b"second entry") {
            data[pos] ^= 0x01;
            std::fs::write(&path, &data).expect("write log");
            hit = true;
        }
    }
    assert!(hit, "entry found in an entry log");
    let s = Storage::open(dir.path(), small()).expect("reopen");
    assert_eq!(
        &s.read(1, 0).expect("intact entry").payload[..],
        b"first entry"
    );
    assert!(matches!(
        s.read(1, 1),
        Err(BookieError::Corrupt {
            ledger: 1,
            entry: 1
        })
    ));
    s.close().expect("close");
}

#[tokio::test]
async fn fencing_refuses_adds_but_not_recovery_adds_and_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), small()).expect("open");
        add_all(&s, vec![entry(3, 0, b"a")], false).await;
        let info = s.fence(3).await.expect("fence");
        assert!(info.fenced);
        assert_eq!(info.last_entry, 0);
        let out = s.add(vec![entry(3, 1, b"b")], false);
        assert!(matches!(out.refused[..], [(3, 1, BookieError::Fenced(3))]));
        let out = add_all(&s, vec![entry(3, 1, b"b")], true).await;
        assert!(out.refused.is_empty());
        s.stop_threads();
    }
    let s = Storage::open(dir.path(), small()).expect("reopen");
    assert!(s.ledger_info(3).expect("info").fenced);
    let out = s.add(vec![entry(3, 2, b"c")], false);
    assert!(matches!(out.refused[..], [(3, 2, BookieError::Fenced(3))]));
    s.flush().expect("flush");
    drop(s);
    std::thread::sleep(Duration::from_millis(50));
    let s = Storage::open(dir.path(), small()).expect("reopen after flush");
    assert!(s.ledger_info(3).expect("info").fenced);
    s.close().expect("close");
}

#[tokio::test]
async fn bad_crc_and_read_only_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Storage::open(dir.path(), small()).expect("open");
    let mut bad = entry(1, 0, b"x");
    bad.crc ^= 1;
    let out = s.add(vec![bad], false);
    assert!(matches!(
        out.refused[..],
        [(1, 0, BookieError::BadRequest(_))]
    ));
    s.set_read_only(true);
    let out = s.add(vec![entry(1, 0, b"x")], false);
    assert!(matches!(out.refused[..], [(1, 0, BookieError::ReadOnly)]));
    s.set_read_only(false);
    let out = add_all(&s, vec![entry(1, 0, b"x")], false).await;
    assert!(out.refused.is_empty());
    s.close().expect("close");
}

#[tokio::test]
async fn deleted_ledgers_are_reclaimed_by_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A new entry log after every flush.
    let cfg = StorageConfig {
        entry_log_bytes: 16 << 10,
        ..small()
    };
    let s = Storage::open(dir.path(), cfg.clone()).expect("open");
    // Ledgers 1 and 2 interleaved over several entry logs; 1 is mostly
    // what they hold.
    for round in 0..8u64 {
        let mut batch: Vec<StoredEntry> = (0..30)
            .map(|i| entry(1, round * 30 + i, &[1u8; 1000]))
            .collect();
        batch.push(entry(2, round, &[2u8; 1000]));
        add_all(&s, batch, false).await;
        s.flush().expect("flush");
    }
    let before = s.stats();
    assert!(before.entry_logs >= 3, "{before:?}");
    s.delete_ledger(1).expect("delete");
    assert!(matches!(s.read(1, 0), Err(BookieError::NoLedger(1))));
    let reclaimed = s.compact().expect("compact");
    let after = s.stats();
    assert!(reclaimed >= 7, "reclaimed {reclaimed}");
    assert!(
        after.entry_log_bytes * 4 < before.entry_log_bytes,
        "before {before:?} after {after:?}"
    );
    for round in 0..8 {
        assert_eq!(s.read(2, round).expect("survivor").payload[0], 2);
    }
    // Adds to a deleted ledger are refused, and it stays deleted.
    let out = s.add(vec![entry(1, 1000, b"late")], false);
    assert!(matches!(
        out.refused[..],
        [(1, 1000, BookieError::NoLedger(1))]
    ));
    s.stop_threads();
    drop(s);
    let s = Storage::open(dir.path(), cfg).expect("reopen");
    for round in 0..8 {
        assert_eq!(
            s.read(2, round).expect("survivor after restart").payload[0],
            2
        );
    }
    assert!(matches!(s.read(1, 5), Err(BookieError::NoLedger(1))));
    s.close().expect("close");
}

/// Turns on a storage fail point for the storage under `dir` only.
#[cfg(feature = "failpoints")]
fn inject(name: &str, dir: &std::path::Path) {
    fail::cfg(name, &format!("return({})", dir.display())).expect("fail point");
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_failed_journal_sync_stops_the_journal_and_replay_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), small()).expect("open");
        add_all(
            &s,
            (0..50).map(|i| entry(7, i, &[i as u8; 100])).collect(),
            false,
        )
        .await;
        inject("bookie::journal::sync", dir.path());
        let mut out = s.add(
            (50..60).map(|i| entry(7, i, &[i as u8; 100])).collect(),
            false,
        );
        let done = out
            .durable
            .take()
            .expect("journaled")
            .await
            .expect("answered");
        assert!(
            done.is_err(),
            "the batch whose fsync failed is not acknowledged"
        );
        fail::remove("bookie::journal::sync");
        assert!(s.io_failed() && s.is_read_only());
        // Nothing more is taken, not even once the disk answers again.
        let out = s.add(vec![entry(7, 60, b"later")], false);
        assert!(matches!(out.refused[..], [(7, 60, BookieError::ReadOnly)]));
        let mut out = s.add(vec![entry(7, 60, b"later")], true);
        let done = out
            .durable
            .take()
            .expect("journaled")
            .await
            .expect("answered");
        assert!(
            done.is_err(),
            "a recovery add is not appended after the failure either"
        );
        s.stop_threads();
    }
    let s = Storage::open(dir.path(), small()).expect("reopen");
    assert!(!s.is_read_only());
    for i in 0..50 {
        assert_eq!(
            s.read(7, i).expect("acknowledged").payload,
            Bytes::from(vec![i as u8; 100])
        );
    }
    assert!(matches!(s.read(7, 60), Err(BookieError::NoEntry { .. })));
    s.close().expect("close");
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_failed_entry_log_sync_leaves_the_log_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), small()).expect("open");
        add_all(
            &s,
            (0..100).map(|i| entry(7, i, &[i as u8; 100])).collect(),
            false,
        )
        .await;
        let log_before = lock(&s.inner.logs).current();
        inject("bookie::entrylog::sync", dir.path());
        assert!(s.flush().is_err());
        fail::remove("bookie::entrylog::sync");
        assert!(s.io_failed() && s.is_read_only());
        assert_eq!(lock(&s.inner.logs).current(), log_before + 1, "a new log");
        // Everything is still read, from the cache the flush gave back.
        for i in 0..100 {
            assert_eq!(s.read(7, i).expect("read").payload[0], i as u8);
        }
        // A later flush writes to the new log.
        s.flush().expect("flush to the new log");
        for i in 0..100 {
            assert_eq!(s.read(7, i).expect("read").payload[0], i as u8);
        }
        s.stop_threads();
    }
    let s = Storage::open(dir.path(), small()).expect("reopen");
    for i in 0..100 {
        assert_eq!(
            s.read(7, i).expect("read").payload,
            Bytes::from(vec![i as u8; 100])
        );
    }
    s.close().expect("close");
}
