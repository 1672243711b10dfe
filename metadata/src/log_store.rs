//! The raft log and vote, kept in RocksDB.
//!
//! RocksDB rather than hand-rolled segment files: the log needs durable
//! appends, range truncation and range purging, which are one synced
//! `WriteBatch` and one `delete_range` each. The bookies keep their entry
//! index in RocksDB too, so the node carries one storage engine, not two.
//! Entries are keyed by big-endian index so that key order is log order.

// openraft's trait methods return its own large `StorageError`; the helpers
// here return it too rather than converting back and forth.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::types::TypeConfig;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

type StoreResult<T> = Result<T, StorageError<u64>>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

fn io_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<u64> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn read_logs_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_be_bytes(b)
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl LogStore {
    pub fn open(dir: &Path) -> Result<Self, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The log is small and short-lived: purged soon after each snapshot.
        // Small memtables and a WAL cap keep its bytes on disk bounded too,
        // not only its entry count.
        opts.set_max_total_wal_size(32 << 20);
        let mut logs = Options::default();
        logs.set_write_buffer_size(8 << 20);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_LOGS, logs),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn logs(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_LOGS)
            .expect("column family created at open")
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_META)
            .expect("column family created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<u64>,
    ) -> StoreResult<Option<T>> {
        let raw = self
            .db
            .get_cf(self.meta(), key)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        raw.map(|b| postcard::from_bytes(&b).map_err(|e| io_err(subject, ErrorVerb::Read, e)))
            .transpose()
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<u64>,
    ) -> StoreResult<()> {
        let bytes = postcard::to_allocvec(value)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        self.db
            .put_cf_opt(self.meta(), key, bytes, &synced())
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }

    fn last_purged(&self) -> StoreResult<Option<LogId<u64>>> {
        self.get_meta(KEY_PURGED, ErrorSubject::Logs)
    }

    /// The first and last index of the entries kept on disk.
    pub fn bounds(&self) -> StoreResult<Option<(u64, u64)>> {
        let first = self.db.iterator_cf(self.logs(), IteratorMode::Start).next();
        let last = self.db.iterator_cf(self.logs(), IteratorMode::End).next();
        match (first, last) {
            (Some(f), Some(l)) => {
                let (fk, _) = f.map_err(read_logs_err)?;
                let (lk, _) = l.map_err(read_logs_err)?;
                Ok(Some((key_index(&fk), key_index(&lk))))
            }
            _ => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let from = index_key(start);
        let iter = self.db.iterator_cf(
            self.logs(),
            IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(read_logs_err)?;
            if !range.contains(&key_index(&k)) {
                break;
            }
            out.push(postcard::from_bytes(&v).map_err(read_logs_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.db.iterator_cf(self.logs(), IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(read_logs_err)?;
                let entry: Entry<TypeConfig> = postcard::from_bytes(&v).map_err(read_logs_err)?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StoreResult<()> {
        self.put_meta(KEY_VOTE, vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<u64>>> {
        self.get_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StoreResult<()> {
        // Not synced: openraft can always recompute the committed index.
        let bytes = postcard::to_allocvec(&committed).map_err(write_logs_err)?;
        self.db
            .put_cf(self.meta(), KEY_COMMITTED, bytes)
            .map_err(write_logs_err)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<u64>>> {
        Ok(self
            .get_meta::<Option<LogId<u64>>>(KEY_COMMITTED, ErrorSubject::Logs)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry).map_err(write_logs_err)?;
            batch.put_cf(self.logs(), index_key(entry.log_id.index), bytes);
        }
        // One synced batch per append call: openraft hands over everything
        // that queued up meanwhile, so this is group commit for free.
        let res = self.db.write_opt(batch, &synced());
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.logs(), index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(self.logs(), index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(write_logs_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        // Record the purge point first: a crash in between leaves entries
        // that are merely ignored, never a gap.
        self.put_meta(KEY_PURGED, &log_id, ErrorSubject::Logs)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.logs(), index_key(0), index_key(log_id.index + 1));
        self.db.write(batch).map_err(write_logs_err)?;
        // Let RocksDB drop the tombstoned range from its files, so that the
        // log's footprint on disk follows its logical size.
        self.db.compact_range_cf(
            self.logs(),
            None::<&[u8]>,
            Some(&index_key(log_id.index + 1)),
        );
        Ok(())
    }
}
