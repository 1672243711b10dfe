//! Entry logs: where entries live once the journal has been checkpointed.
//!
//! The flush writes the write cache, sorted by ledger and entry, to the
//! current log, so that a ledger's entries lie together on disk. A record is
//! `[len u32][ledger u64][entry u64][lac i64][crc u32][payload]`; the index
//! maps (ledger, entry) to the record's log, offset and length. Per log the
//! bytes of each ledger are tracked, so that compaction knows which logs are
//! mostly garbage once ledgers are deleted.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};

use super::journal::StoredEntry;
use crate::error::{BookieError, Result};

pub const HEADER: usize = 4 + 8 + 8 + 8 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub log: u32,
    pub offset: u64,
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.log.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(mut b: &[u8]) -> Option<Self> {
        if b.len() != 16 {
            return None;
        }
        Some(Self {
            log: b.get_u32_le(),
            offset: b.get_u64_le(),
            len: b.get_u32_le(),
        })
    }
}

/// Live bytes per ledger in one log, and the log's size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogUsage {
    pub total: u64,
    pub ledgers: HashMap<u64, u64>,
}

impl LogUsage {
    pub fn live(&self) -> u64 {
        self.ledgers.values().sum()
    }
}

fn log_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.log"))
}

pub fn list_logs(dir: &Path) -> Result<Vec<u32>> {
    super::journal::list_numbered(dir)
}

pub fn encode_record(e: &StoredEntry, out: &mut Vec<u8>) {
    out.put_u32_le((HEADER - 4 + e.payload.len()) as u32);
    e.put_fields(out);
}

/// Parses one record, checking it is the entry the index said it is and
/// that its payload matches its CRC.
pub fn decode_record(record: Bytes, ledger: u64, entry: u64) -> Result<StoredEntry> {
    let corrupt = || BookieError::Corrupt { ledger, entry };
    if record.len() < HEADER || (&record[..4]).get_u32_le() as usize != record.len() - 4 {
        return Err(corrupt());
    }
    let e = StoredEntry::get_fields(record.slice(4..)).ok_or_else(corrupt)?;
    if e.ledger != ledger
        || e.entry != entry
        || crate::meta::entry_crc(ledger, entry, &e.payload) != e.crc
    {
        return Err(corrupt());
    }
    Ok(e)
}

/// Appends to the current log; read handles for every log.
pub struct EntryLogs {
    dir: PathBuf,
    max_bytes: u64,
    current: u32,
    writer: BufWriter<File>,
    offset: u64,
    pub usage: BTreeMap<u32, LogUsage>,
    readers: Readers,
}

/// Read handles of every log, shared with readers so that a read never
/// waits for the mutex a flush holds while it writes and syncs.
pub type Readers = Arc<RwLock<HashMap<u32, Arc<File>>>>;

/// A handle to read `log` with; it stays valid after the log is removed.
pub fn reader(readers: &Readers, log: u32) -> Option<Arc<File>> {
    readers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&log)
        .cloned()
}

impl EntryLogs {
    /// Opens the logs in `dir`, keeping those in `usage` (the ones the index
    /// may point into) and deleting the rest, which no index entry can
    /// reference. Writing starts in a new log.
    pub fn open(dir: &Path, max_bytes: u64, usage: BTreeMap<u32, LogUsage>) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let mut readers = HashMap::new();
        let mut last = 0;
        for id in list_logs(dir)? {
            last = last.max(id);
            if usage.contains_key(&id) {
                readers.insert(id, Arc::new(File::open(log_path(dir, id))?));
            } else {
                tracing::info!(
                    log = id,
                    "removing entry log that no index entry references"
                );
                fs::remove_file(log_path(dir, id))?;
            }
        }
        let current = last.max(usage.keys().next_back().copied().unwrap_or(0)) + 1;
        let (writer, reader) = create_log(dir, current)?;
        readers.insert(current, reader);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            current,
            writer,
            offset: 0,
            usage,
            readers: Arc::new(RwLock::new(readers)),
        })
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn append(&mut self, e: &StoredEntry, scratch: &mut Vec<u8>) -> Result<Location> {
        scratch.clear();
        encode_record(e, scratch);
        self.writer.write_all(scratch)?;
        let loc = Location {
            log: self.current,
            offset: self.offset,
            len: scratch.len() as u32,
        };
        self.offset += scratch.len() as u64;
        let u = self.usage.entry(self.current).or_default();
        u.total = self.offset;
        *u.ledgers.entry(e.ledger).or_default() += scratch.len() as u64;
        Ok(loc)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.writer.flush()?;
        crate::storage::fault::check("bookie::entrylog::sync", &self.dir)?;
        self.writer.get_ref().sync_data()?;
        Ok(())
    }

    /// Leaves the current log after a failed write or sync, without
    /// writing what its buffer still holds, and starts a new one. What the
    /// old log holds up to its last sync stays readable; nothing the index
    /// points to lies after that.
    pub fn abandon_current(&mut self) -> Result<()> {
        let (writer, reader) = create_log(&self.dir, self.current + 1)?;
        let old = std::mem::replace(&mut self.writer, writer);
        let _ = old.into_parts();
        self.current += 1;
        self.offset = 0;
        self.reader_map_mut().insert(self.current, reader);
        Ok(())
    }

    /// Starts a new log once the current one is full. Call after `sync`.
    pub fn maybe_roll(&mut self) -> Result<()> {
        if self.offset < self.max_bytes {
            return Ok(());
        }
        let (writer, reader) = create_log(&self.dir, self.current + 1)?;
        self.current += 1;
        self.writer = writer;
        self.offset = 0;
        self.reader_map_mut().insert(self.current, reader);
        Ok(())
    }

    fn reader_map_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Arc<File>>> {
        self.readers.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn readers(&self) -> Readers {
        self.readers.clone()
    }

    pub fn remove(&mut self, log: u32) -> Result<()> {
        self.reader_map_mut().remove(&log);
        self.usage.remove(&log);
        fs::remove_file(log_path(&self.dir, log))?;
        Ok(())
    }

    /// Every record of a log, with its location.
    pub fn scan(&self, log: u32) -> Result<Vec<(Location, StoredEntry)>> {
        let mut data = Vec::new();
        File::open(log_path(&self.dir, log))?.read_to_end(&mut data)?;
        let data = Bytes::from(data);
        let mut out = Vec::new();
        let mut off = 0usize;
        while off + HEADER <= data.len() {
            let len = u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize
                + 4;
            if len < HEADER || off + len > data.len() {
                break;
            }
            let Some(e) = StoredEntry::get_fields(data.slice(off + 4..off + len)) else {
                break;
            };
            out.push((
                Location {
                    log,
                    offset: off as u64,
                    len: len as u32,
                },
                e,
            ));
            off += len;
        }
        Ok(out)
    }

    pub fn total_bytes(&self) -> u64 {
        self.usage.values().map(|u| u.total).sum()
    }
}

/// Reads a record's bytes.
pub fn read_at(file: &File, loc: Location) -> Result<Bytes> {
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset)?;
    Ok(Bytes::from(buf))
}

fn create_log(dir: &Path, id: u32) -> Result<(BufWriter<File>, Arc<File>)> {
    let path = log_path(dir, id);
    let f = OpenOptions::new().create(true).append(true).open(&path)?;
    File::open(dir)?.sync_all()?;
    let reader = Arc::new(File::open(&path)?);
    Ok((BufWriter::with_capacity(1 << 20, f), reader))
}
