//! A bookie's storage: journal, write cache, entry logs, RocksDB index and
//! read cache, as in BookKeeper's DbLedgerStorage.
//!
//! An add is journaled first and acknowledged after the fsync that covers
//! it; only then does it enter the write cache. The flush writes the cache
//! to an entry log, fsyncs it, and commits the index together with a
//! checkpoint (the journal position everything before which is now in entry
//! logs) in one synced RocksDB batch. Journal files behind the checkpoint are
//! deleted; on restart the journal is replayed from the checkpoint.
//!
//! Lock order: `flush_lock`, then `state`, then `logs`.

pub mod entrylog;
pub(crate) mod fault;
pub mod journal;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use magnetar_metrics::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::error::{BookieError, Result};
use entrylog::{EntryLogs, Location, LogUsage};
pub use journal::{JournalConfig, JournalPos, Record, StoredEntry};
use journal::{JournalReq, JournalWriter};

const CF_INDEX: &str = "index";
const CF_LEDGERS: &str = "ledgers";
const CF_DELETED: &str = "deleted";
const CF_LOGS: &str = "logs";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub journal: JournalConfig,
    /// Flush once the write cache holds this much.
    pub write_cache_bytes: usize,
    pub read_cache_bytes: usize,
    /// Start a new entry log past this size.
    pub entry_log_bytes: u64,
    /// Flush at least this often.
    pub flush_interval: Duration,
    /// Compact a full entry log whose live fraction falls below this.
    pub compaction_threshold: f64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            journal: JournalConfig::default(),
            write_cache_bytes: 64 << 20,
            read_cache_bytes: 64 << 20,
            entry_log_bytes: 256 << 20,
            flush_interval: Duration::from_secs(1),
            compaction_threshold: 0.5,
        }
    }
}

/// What a bookie knows of one ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerInfo {
    pub fenced: bool,
    pub lac: i64,
    pub last_entry: i64,
}

impl Default for LedgerInfo {
    fn default() -> Self {
        Self {
            fenced: false,
            lac: -1,
            last_entry: -1,
        }
    }
}

impl LedgerInfo {
    fn encode(&self) -> [u8; 17] {
        let mut b = [0u8; 17];
        b[0] = self.fenced as u8;
        b[1..9].copy_from_slice(&self.lac.to_le_bytes());
        b[9..].copy_from_slice(&self.last_entry.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 17 {
            return None;
        }
        let mut lac = [0u8; 8];
        let mut last = [0u8; 8];
        lac.copy_from_slice(&b[1..9]);
        last.copy_from_slice(&b[9..]);
        Some(Self {
            fenced: b[0] != 0,
            lac: i64::from_le_bytes(lac),
            last_entry: i64::from_le_bytes(last),
        })
    }
}

fn index_key(ledger: u64, entry: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ledger.to_be_bytes());
    k[8..].copy_from_slice(&entry.to_be_bytes());
    k
}

type Key = (u64, u64);

#[derive(Default)]
struct State {
    write_cache: BTreeMap<Key, StoredEntry>,
    write_cache_bytes: usize,
    /// The cache being flushed; readable until the index points at its logs.
    flushing: Option<Arc<BTreeMap<Key, StoredEntry>>>,
    ledgers: HashMap<u64, LedgerInfo>,
    dirty: HashSet<u64>,
    deleted: HashSet<u64>,
    /// Journal position up to which every record is in the write cache or
    /// in entry logs.
    applied: JournalPos,
    checkpoint: JournalPos,
}

#[derive(Default)]
struct ReadCache {
    map: HashMap<Key, StoredEntry>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl ReadCache {
    fn insert(&mut self, e: &StoredEntry, cap: usize) {
        let key = (e.ledger, e.entry);
        if cap == 0 || self.map.contains_key(&key) {
            return;
        }
        self.bytes += e.payload.len();
        self.map.insert(key, e.clone());
        self.order.push_back(key);
        while self.bytes > cap {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.payload.len();
            }
        }
    }

    fn purge_ledger(&mut self, ledger: u64) {
        self.map.retain(|k, _| k.0 != ledger);
        self.order.retain(|k| k.0 != ledger);
        self.bytes = self.map.values().map(|e| e.payload.len()).sum();
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StorageStats {
    pub ledgers: u64,
    pub entry_log_bytes: u64,
    pub entry_logs: u64,
    pub journal_syncs: u64,
    pub journal_entries: u64,
    pub compacted_logs: u64,
    pub write_bytes: u64,
    pub read_bytes: u64,
    pub read_only: bool,
    /// Adds and fences waiting for the journal, or being written.
    pub journal_queue: u64,
}

struct Inner {
    cfg: StorageConfig,
    dir: PathBuf,
    db: DB,
    state: Mutex<State>,
    logs: Mutex<EntryLogs>,
    readers: entrylog::Readers,
    read_cache: Mutex<ReadCache>,
    flush_lock: Mutex<()>,
    flush_wake: Condvar,
    /// (stop, flush now) for the flush thread.
    flush_wake_lock: Mutex<(bool, bool)>,
    /// Read-only because the disk is nearly full; cleared when it is not.
    read_only: AtomicBool,
    /// Read-only because a journal or entry-log write failed; until a
    /// restart.
    io_failed: AtomicBool,
    journal_syncs: AtomicU64,
    journal_entries: AtomicU64,
    compacted_logs: AtomicU64,
    /// Bytes written to the journal, and entry bytes read back.
    write_bytes: AtomicU64,
    read_bytes: AtomicU64,
    /// One journal write and its fdatasync.
    journal_sync_latency: Histogram,
    /// Records one fdatasync covered.
    journal_batch_records: Histogram,
    /// An add or fence from its submission to its durability.
    journal_add_latency: Histogram,
    /// Requests submitted to the journal and not yet written.
    journal_queue: Arc<std::sync::atomic::AtomicI64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The storage of one bookie. Dropping it stops its threads; call
/// [`Storage::close`] first for a final flush.
pub struct Storage {
    inner: Arc<Inner>,
    journal: Mutex<Option<std::sync::mpsc::Sender<JournalReq>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The outcome of a batch of adds: per-entry refusals now, and the rest
/// acknowledged together once durable.
pub struct AddOutcome {
    pub refused: Vec<(u64, u64, BookieError)>,
    pub accepted: Vec<(u64, u64)>,
    pub durable: Option<tokio::sync::oneshot::Receiver<Result<()>>>,
}

impl Storage {
    pub fn open(dir: &Path, cfg: StorageConfig) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let jdir = journal::journal_dir(dir);
        std::fs::create_dir_all(&jdir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_INDEX, CF_LEDGERS, CF_DELETED, CF_LOGS]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir.join("index"), cfs)?;

        let mut state = State::default();
        if let Some(cp) = db.get(CHECKPOINT_KEY)? {
            state.checkpoint = JournalPos::decode(&cp)
                .ok_or_else(|| BookieError::Storage("bad checkpoint record".into()))?;
        }
        let cf = |n| {
            db.cf_handle(n)
                .ok_or_else(|| BookieError::Storage(format!("missing column family {n}")))
        };
        for item in db.iterator_cf(cf(CF_LEDGERS)?, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if let (Ok(k), Some(info)) = (<[u8; 8]>::try_from(&k[..]), LedgerInfo::decode(&v)) {
                state.ledgers.insert(u64::from_be_bytes(k), info);
            }
        }
        for item in db.iterator_cf(cf(CF_DELETED)?, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(k) = <[u8; 8]>::try_from(&k[..]) {
                state.deleted.insert(u64::from_be_bytes(k));
            }
        }
        let mut usage = BTreeMap::new();
        for item in db.iterator_cf(cf(CF_LOGS)?, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if let (Ok(k), Ok(u)) = (
                <[u8; 4]>::try_from(&k[..]),
                serde_json::from_slice::<LogUsage>(&v),
            ) {
                usage.insert(u32::from_be_bytes(k), u);
            }
        }
        let logs = EntryLogs::open(&dir.join("entrylogs"), cfg.entry_log_bytes, usage)?;

        // Replay: everything journaled after the checkpoint goes back into
        // the write cache, exactly as when it was first made durable.
        let mut replayed = 0u64;
        let last_seq = journal::replay(&jdir, state.checkpoint, |rec, _| {
            replayed += 1;
            apply_record(&mut state, rec);
        })?;
        let writer = JournalWriter::open(
            &jdir,
            last_seq.max(state.checkpoint.file),
            cfg.journal.clone(),
        )?;
        // Replayed records sit in the cache now; the next checkpoint may
        // pass the files they came from.
        state.applied = writer.position();
        tracing::info!(
            replayed,
            ledgers = state.ledgers.len(),
            cached_bytes = state.write_cache_bytes,
            "storage open"
        );

        let inner = Arc::new(Inner {
            cfg,
            dir: dir.to_path_buf(),
            db,
            state: Mutex::new(state),
            readers: logs.readers(),
            logs: Mutex::new(logs),
            read_cache: Mutex::new(ReadCache::default()),
            flush_lock: Mutex::new(()),
            flush_wake: Condvar::new(),
            flush_wake_lock: Mutex::new((false, false)),
            read_only: AtomicBool::new(false),
            io_failed: AtomicBool::new(false),
            journal_syncs: AtomicU64::new(0),
            journal_entries: AtomicU64::new(0),
            compacted_logs: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            journal_sync_latency: Histogram::new(magnetar_metrics::LATENCY_BUCKETS),
            journal_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            journal_add_latency: Histogram::new(magnetar_metrics::LATENCY_BUCKETS),
            journal_queue: Arc::default(),
        });
        let (tx, rx) = std::sync::mpsc::channel::<JournalReq>();
        let mut threads = Vec::new();
        let j_inner = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || {
                    let syncs = j_inner.clone();
                    let failed = j_inner.clone();
                    writer.run(
                        rx,
                        |batch, pos| j_inner.apply_durable(batch, pos),
                        |n, bytes, took| {
                            syncs.journal_syncs.fetch_add(1, Ordering::Relaxed);
                            syncs.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                            syncs.journal_entries.fetch_add(n as u64, Ordering::Relaxed);
                            syncs.journal_sync_latency.observe(took.as_secs_f64());
                            syncs.journal_batch_records.observe(n as f64);
                        },
                        || failed.io_failed.store(true, Ordering::Relaxed),
                    )
                })?,
        );
        let weak = Arc::downgrade(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("flush".into())
                .spawn(move || flush_loop(weak))?,
        );
        Ok(Self {
            inner,
            journal: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// The disk-usage read-only mode.
    pub fn set_read_only(&self, ro: bool) {
        self.inner.read_only.store(ro, Ordering::Relaxed);
    }

    /// Whether the disk-usage read-only mode is on.
    pub fn is_disk_read_only(&self) -> bool {
        self.inner.read_only.load(Ordering::Relaxed)
    }

    /// Whether a journal or entry-log write failed, which keeps the bookie
    /// read-only until it restarts.
    pub fn io_failed(&self) -> bool {
        self.inner.io_failed.load(Ordering::Relaxed)
    }

    pub fn is_read_only(&self) -> bool {
        self.is_disk_read_only() || self.io_failed()
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Queues records for the journal; the receiver answers once they
    /// are durable.
    fn submit(&self, records: Vec<Record>) -> Result<tokio::sync::oneshot::Receiver<Result<()>>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let req = JournalReq {
            records,
            done,
            queued: journal::Queued::new(&self.inner.journal_queue),
        };
        let tx = lock(&self.journal);
        match tx.as_ref() {
            Some(tx) => tx
                .send(req)
                .map_err(|_| BookieError::Storage("journal stopped".into()))?,
            None => return Err(BookieError::Storage("storage closed".into())),
        }
        Ok(rx)
    }

    /// Validates and journals a batch of adds. `recovery` adds are taken on
    /// fenced ledgers and on a read-only bookie.
    pub fn add(&self, entries: Vec<StoredEntry>, recovery: bool) -> AddOutcome {
        let mut refused = Vec::new();
        let mut accepted = Vec::new();
        let mut records = Vec::with_capacity(entries.len());
        let read_only = self.is_read_only();
        {
            let st = lock(&self.inner.state);
            for e in entries {
                let err = if st.deleted.contains(&e.ledger) {
                    Some(BookieError::NoLedger(e.ledger))
                } else if !recovery && st.ledgers.get(&e.ledger).is_some_and(|l| l.fenced) {
                    Some(BookieError::Fenced(e.ledger))
                } else if read_only && !recovery {
                    Some(BookieError::ReadOnly)
                } else if crate::meta::entry_crc(e.ledger, e.entry, &e.payload) != e.crc {
                    Some(BookieError::BadRequest(format!(
                        "entry {} of ledger {}: CRC32C does not match the payload",
                        e.entry, e.ledger
                    )))
                } else {
                    None
                };
                match err {
                    Some(err) => refused.push((e.ledger, e.entry, err)),
                    None => {
                        accepted.push((e.ledger, e.entry));
                        records.push(Record::Add(e));
                    }
                }
            }
        }
        if records.is_empty() {
            return AddOutcome {
                refused,
                accepted,
                durable: None,
            };
        }
        let rx = match self.submit(records) {
            Ok(rx) => rx,
            Err(e) => {
                let msg = e.to_string();
                refused.extend(
                    accepted
                        .drain(..)
                        .map(|(l, en)| (l, en, BookieError::Storage(msg.clone()))),
                );
                return AddOutcome {
                    refused,
                    accepted,
                    durable: None,
                };
            }
        };
        AddOutcome {
            refused,
            accepted,
            durable: Some(rx),
        }
    }

    /// Fences a ledger. Adds are refused from this moment; the returned
    /// future resolves once the fence is durable, with the ledger's state.
    pub async fn fence(&self, ledger: u64) -> Result<LedgerInfo> {
        {
            let mut st = lock(&self.inner.state);
            if st.deleted.contains(&ledger) {
                return Err(BookieError::NoLedger(ledger));
            }
            st.ledgers.entry(ledger).or_default().fenced = true;
        }
        let rx = self.submit(vec![Record::Fence(ledger)])?;
        rx.await
            .map_err(|_| BookieError::Storage("journal stopped".into()))??;
        Ok(self.ledger_info(ledger).unwrap_or_default())
    }

    /// Raises a ledger's LAC as the writer reports it. Not journaled: a LAC
    /// lost in a crash only makes a reader or recovery start earlier.
    pub fn update_lac(&self, ledger: u64, lac: i64) {
        let mut st = lock(&self.inner.state);
        if let Some(info) = st.ledgers.get_mut(&ledger) {
            if lac > info.lac {
                info.lac = lac;
                st.dirty.insert(ledger);
            }
        }
    }

    pub fn ledger_info(&self, ledger: u64) -> Option<LedgerInfo> {
        lock(&self.inner.state).ledgers.get(&ledger).copied()
    }

    /// Ledgers this bookie holds entries or state for.
    pub fn ledgers(&self) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&self.inner.state).ledgers.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn read(&self, ledger: u64, entry: u64) -> Result<StoredEntry> {
        let e = self.inner.read(ledger, entry)?;
        self.inner
            .read_bytes
            .fetch_add(e.payload.len() as u64, Ordering::Relaxed);
        Ok(e)
    }

    /// Drops a ledger: its index entries go now, its bytes when compaction
    /// rewrites or removes the logs that hold them.
    pub fn delete_ledger(&self, ledger: u64) -> Result<()> {
        self.inner.delete_ledger(ledger)
    }

    /// Writes the write cache to entry logs and advances the checkpoint.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Rewrites or removes entry logs that are mostly deleted ledgers.
    /// Returns how many logs were reclaimed.
    pub fn compact(&self) -> Result<usize> {
        self.inner.compact()
    }

    /// The journal's histograms: the latency of a write and its
    /// fdatasync, and the records each covered.
    /// Fsync latency, records per fsync, and add latency.
    pub fn journal_histograms(&self) -> [Histogram; 3] {
        [
            self.inner.journal_sync_latency.clone(),
            self.inner.journal_batch_records.clone(),
            self.inner.journal_add_latency.clone(),
        ]
    }

    pub fn stats(&self) -> StorageStats {
        let ledgers = lock(&self.inner.state).ledgers.len() as u64;
        let logs = lock(&self.inner.logs);
        StorageStats {
            ledgers,
            entry_log_bytes: logs.total_bytes(),
            entry_logs: logs.usage.len() as u64,
            journal_syncs: self.inner.journal_syncs.load(Ordering::Relaxed),
            journal_entries: self.inner.journal_entries.load(Ordering::Relaxed),
            compacted_logs: self.inner.compacted_logs.load(Ordering::Relaxed),
            write_bytes: self.inner.write_bytes.load(Ordering::Relaxed),
            read_bytes: self.inner.read_bytes.load(Ordering::Relaxed),
            read_only: self.is_read_only(),
            journal_queue: u64::try_from(self.inner.journal_queue.load(Ordering::Relaxed))
                .unwrap_or(0),
        }
    }

    /// Stops the journal and flushes what it holds.
    pub fn close(&self) -> Result<()> {
        self.stop_threads();
        self.inner.flush()
    }

    /// Stops the threads without a final flush: what a crash leaves behind,
    /// minus the torn writes.
    pub fn stop_threads(&self) {
        lock(&self.journal).take();
        lock(&self.inner.flush_wake_lock).0 = true;
        self.inner.flush_wake.notify_all();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Storage {
    /// Joins the threads, which hold the index: a RocksDB left open while
    /// the process exits can abort it. Neither thread holds a `Storage`, so
    /// this never joins the thread it runs on.
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn apply_record(st: &mut State, rec: Record) {
    match rec {
        Record::Add(e) => {
            if st.deleted.contains(&e.ledger) {
                return;
            }
            let info = st.ledgers.entry(e.ledger).or_default();
            // A writer's LAC never passes the entry it rides on; a larger
            // claim would make readers ask for entries nobody wrote.
            info.lac = info
                .lac
                .max(e.lac.min(i64::try_from(e.entry).unwrap_or(i64::MAX)));
            info.last_entry = info.last_entry.max(e.entry as i64);
            st.dirty.insert(e.ledger);
            st.write_cache_bytes += e.payload.len();
            if let Some(old) = st.write_cache.insert((e.ledger, e.entry), e) {
                st.write_cache_bytes -= old.payload.len();
            }
        }
        Record::Fence(ledger) => {
            if st.deleted.contains(&ledger) {
                return;
            }
            st.ledgers.entry(ledger).or_default().fenced = true;
            st.dirty.insert(ledger);
        }
    }
}

fn flush_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        {
            let mut flags = lock(&inner.flush_wake_lock);
            let deadline = std::time::Instant::now() + inner.cfg.flush_interval;
            while !flags.0 && !flags.1 {
                let now = std::time::Instant::now();
                if now >= deadline {
                    break;
                }
                flags = inner
                    .flush_wake
                    .wait_timeout(flags, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if flags.0 {
                return;
            }
            flags.1 = false;
        }
        if let Err(e) = inner.flush() {
            tracing::error!(error = %e, "flush failed; entries stay in the journal");
        }
    }
}

impl Inner {
    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| BookieError::Storage(format!("missing column family {name}")))
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// Called by the journal thread once a batch is on disk.
    fn apply_durable(&self, batch: Vec<JournalReq>, pos: JournalPos) {
        let full = {
            let mut st = lock(&self.state);
            let mut reqs = Vec::with_capacity(batch.len());
            for req in batch {
                self.journal_add_latency
                    .observe(req.queued.since.elapsed().as_secs_f64());
                for rec in req.records {
                    apply_record(&mut st, rec);
                }
                reqs.push(req.done);
            }
            st.applied = pos;
            let full = st.write_cache_bytes >= self.cfg.write_cache_bytes;
            drop(st);
            for done in reqs {
                let _ = done.send(Ok(()));
            }
            full
        };
        if full {
            lock(&self.flush_wake_lock).1 = true;
            self.flush_wake.notify_all();
        }
    }

    fn read(&self, ledger: u64, entry: u64) -> Result<StoredEntry> {
        let known = {
            let st = lock(&self.state);
            if st.deleted.contains(&ledger) {
                return Err(BookieError::NoLedger(ledger));
            }
            if let Some(e) = st.write_cache.get(&(ledger, entry)) {
                return Ok(e.clone());
            }
            if let Some(e) = st.flushing.as_ref().and_then(|f| f.get(&(ledger, entry))) {
                return Ok(e.clone());
            }
            st.ledgers.contains_key(&ledger)
        };
        if let Some(e) = lock(&self.read_cache).map.get(&(ledger, entry)) {
            return Ok(e.clone());
        }
        // The log may be compacted away between the index lookup and the
        // read; the second lookup then finds the new location.
        let mut last_err = None;
        for _ in 0..2 {
            let Some(loc) = self
                .db
                .get_cf(self.cf(CF_INDEX)?, index_key(ledger, entry))?
            else {
                return Err(if known {
                    BookieError::NoEntry { ledger, entry }
                } else {
                    BookieError::NoLedger(ledger)
                });
            };
            let loc = Location::decode(&loc).ok_or(BookieError::Corrupt { ledger, entry })?;
            let Some(file) = entrylog::reader(&self.readers, loc.log) else {
                last_err = Some(BookieError::Storage(format!(
                    "entry log {} missing",
                    loc.log
                )));
                continue;
            };
            let bytes = entrylog::read_at(&file, loc)?;
            let e = entrylog::decode_record(bytes, ledger, entry)?;
            lock(&self.read_cache).insert(&e, self.cfg.read_cache_bytes);
            return Ok(e);
        }
        Err(last_err.unwrap_or(BookieError::NoEntry { ledger, entry }))
    }

    fn flush(&self) -> Result<()> {
        let _g = lock(&self.flush_lock);
        let (cache, pos, dirty) = {
            let mut st = lock(&self.state);
            if st.write_cache.is_empty() && st.dirty.is_empty() && st.applied == st.checkpoint {
                return Ok(());
            }
            let cache = Arc::new(std::mem::take(&mut st.write_cache));
            st.write_cache_bytes = 0;
            st.flushing = Some(cache.clone());
            let st = &mut *st;
            let dirty: Vec<(u64, LedgerInfo)> = st
                .dirty
                .drain()
                .filter_map(|l| st.ledgers.get(&l).map(|i| (l, *i)))
                .collect();
            (cache, st.applied, dirty)
        };
        let res = self.write_flush(&cache, pos, &dirty);
        let mut st = lock(&self.state);
        st.flushing = None;
        match res {
            Ok(()) => {
                st.checkpoint = pos;
                drop(st);
                journal::remove_before(&journal::journal_dir(&self.dir), pos)?;
                Ok(())
            }
            Err(e) => {
                // The entry log may now end in part of a record, and its
                // buffered writer may hold the rest: nothing more goes
                // after it. Later flushes write to a new log, and the
                // bookie takes no new adds until it restarts.
                drop(st);
                if !self.io_failed.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        error = %e,
                        "entry log write failed; the bookie is read-only until it restarts"
                    );
                }
                if let Err(e) = lock(&self.logs).abandon_current() {
                    tracing::error!(error = %e, "cannot start a new entry log");
                }
                let mut st = lock(&self.state);
                // Back into the cache: the journal still holds these, and
                // readers must keep finding them.
                for (k, v) in cache.iter() {
                    if !st.write_cache.contains_key(k) {
                        st.write_cache_bytes += v.payload.len();
                        st.write_cache.insert(*k, v.clone());
                    }
                }
                st.dirty.extend(dirty.iter().map(|(l, _)| *l));
                Err(e)
            }
        }
    }

    fn write_flush(
        &self,
        cache: &BTreeMap<Key, StoredEntry>,
        pos: JournalPos,
        dirty: &[(u64, LedgerInfo)],
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        let index = self.cf(CF_INDEX)?;
        let mut logs = lock(&self.logs);
        let mut scratch = Vec::new();
        let mut touched = HashSet::new();
        for e in cache.values() {
            let loc = logs.append(e, &mut scratch)?;
            touched.insert(loc.log);
            batch.put_cf(index, index_key(e.ledger, e.entry), loc.encode());
        }
        logs.sync()?;
        let ledgers = self.cf(CF_LEDGERS)?;
        for (l, info) in dirty {
            batch.put_cf(ledgers, l.to_be_bytes(), info.encode());
        }
        self.put_usage(&mut batch, &logs, touched)?;
        batch.put(CHECKPOINT_KEY, pos.encode());
        self.db.write_opt(batch, &Self::synced())?;
        logs.maybe_roll()?;
        Ok(())
    }

    fn put_usage(
        &self,
        batch: &mut WriteBatch,
        logs: &EntryLogs,
        touched: impl IntoIterator<Item = u32>,
    ) -> Result<()> {
        let cf = self.cf(CF_LOGS)?;
        for log in touched {
            match logs.usage.get(&log) {
                Some(u) => batch.put_cf(
                    cf,
                    log.to_be_bytes(),
                    serde_json::to_vec(u).map_err(|e| BookieError::Storage(e.to_string()))?,
                ),
                None => batch.delete_cf(cf, log.to_be_bytes()),
            }
        }
        Ok(())
    }

    fn delete_ledger(&self, ledger: u64) -> Result<()> {
        let _g = lock(&self.flush_lock);
        {
            let mut st = lock(&self.state);
            let keys: Vec<Key> = st
                .write_cache
                .range((ledger, 0)..=(ledger, u64::MAX))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(e) = st.write_cache.remove(&k) {
                    st.write_cache_bytes -= e.payload.len();
                }
            }
            st.ledgers.remove(&ledger);
            st.dirty.remove(&ledger);
            st.deleted.insert(ledger);
        }
        lock(&self.read_cache).purge_ledger(ledger);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_INDEX)?,
            index_key(ledger, 0),
            index_key(ledger, u64::MAX),
        );
        batch.delete_cf(self.cf(CF_INDEX)?, index_key(ledger, u64::MAX));
        batch.delete_cf(self.cf(CF_LEDGERS)?, ledger.to_be_bytes());
        batch.put_cf(self.cf(CF_DELETED)?, ledger.to_be_bytes(), []);
        let mut logs = lock(&self.logs);
        let mut touched = Vec::new();
        for (id, u) in logs.usage.iter_mut() {
            if u.ledgers.remove(&ledger).is_some() {
                touched.push(*id);
            }
        }
        self.put_usage(&mut batch, &logs, touched)?;
        self.db.write_opt(batch, &Self::synced())?;
        Ok(())
    }

    fn compact(&self) -> Result<usize> {
        let _g = lock(&self.flush_lock);
        let deleted = lock(&self.state).deleted.clone();
        let mut logs = lock(&self.logs);
        let current = logs.current();
        let victims: Vec<(u32, u64)> = logs
            .usage
            .iter()
            .filter(|(id, u)| {
                **id != current
                    && (u.total == 0
                        || (u.live() as f64) < self.cfg.compaction_threshold * u.total as f64)
            })
            .map(|(id, u)| (*id, u.live()))
            .collect();
        let index = self.cf(CF_INDEX)?;
        let mut reclaimed = 0;
        for (log, live) in victims {
            let mut batch = WriteBatch::default();
            let mut touched = HashSet::from([log]);
            if live > 0 {
                let mut scratch = Vec::new();
                for (loc, e) in logs.scan(log)? {
                    if deleted.contains(&e.ledger) {
                        continue;
                    }
                    // Only the copy the index points at is live; older
                    // copies of a re-added entry are garbage.
                    let key = index_key(e.ledger, e.entry);
                    match self
                        .db
                        .get_cf(index, key)?
                        .and_then(|v| Location::decode(&v))
                    {
                        Some(cur) if cur == loc => {}
                        _ => continue,
                    }
                    let new = logs.append(&e, &mut scratch)?;
                    touched.insert(new.log);
                    batch.put_cf(index, key, new.encode());
                }
                logs.sync()?;
            }
            logs.usage.remove(&log);
            self.put_usage(&mut batch, &logs, touched)?;
            self.db.write_opt(batch, &Self::synced())?;
            logs.remove(log)?;
            logs.maybe_roll()?;
            reclaimed += 1;
            self.compacted_logs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(log, live_bytes = live, "entry log compacted");
        }
        Ok(reclaimed)
    }
}

#[cfg(test)]
mod tests;
