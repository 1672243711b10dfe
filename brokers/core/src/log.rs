//! Where a partition's entries live: a managed ledger for persistent
//! topics, or a bounded in-memory log for non-persistent ones. Dispatchers
//! and fetches read both the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::format::{with_base_offset, BatchHeader};
use crate::managed_ledger::{Entry, ManagedLedger};

#[derive(Clone, Debug)]
pub enum PartitionLog {
    Managed(ManagedLedger),
    Memory(MemoryLog),
}

impl PartitionLog {
    pub async fn append(&self, batch: Bytes) -> Result<u64> {
        self.submit(batch).await?.await
    }

    /// See [`ManagedLedger::submit`].
    pub async fn submit(&self, batch: Bytes) -> Result<BoxFuture<'static, Result<u64>>> {
        match self {
            PartitionLog::Managed(ml) => Ok(ml.submit(batch).await?.boxed()),
            PartitionLog::Memory(m) => {
                let r = m.append(batch);
                Ok(async move { r }.boxed())
            }
        }
    }

    pub async fn read(
        &self,
        offset: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>> {
        match self {
            PartitionLog::Managed(ml) => ml.read(offset, max_entries, max_bytes).await,
            PartitionLog::Memory(m) => Ok(m.read(offset, max_entries, max_bytes)),
        }
    }

    /// See [`ManagedLedger::last_stable_offset`]; non-persistent logs
    /// take no transactions.
    pub fn last_stable_offset(&self) -> u64 {
        match self {
            PartitionLog::Managed(ml) => ml.last_stable_offset(),
            PartitionLog::Memory(_) => self.end_offset(),
        }
    }

    /// See [`ManagedLedger::aborted_between`].
    pub fn aborted_between(&self, from: u64, to: u64) -> Vec<crate::managed_ledger::AbortedTxn> {
        match self {
            PartitionLog::Managed(ml) => ml.aborted_between(from, to),
            PartitionLog::Memory(_) => Vec::new(),
        }
    }

    /// See [`ManagedLedger::delete_before`]. Non-persistent logs keep no
    /// such mark.
    pub async fn delete_before(&self, offset: u64) -> Result<u64> {
        match self {
            PartitionLog::Managed(ml) => ml.delete_before(offset).await,
            PartitionLog::Memory(_) => Err(BrokerError::InvalidArgument(
                "records of a non-persistent topic cannot be deleted".into(),
            )),
        }
    }

    /// See [`ManagedLedger::offset_for_timestamp`].
    pub async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64> {
        match self {
            PartitionLog::Managed(ml) => ml.offset_for_timestamp(ts_ms).await,
            PartitionLog::Memory(m) => Ok(m.offset_for_timestamp(ts_ms)),
        }
    }

    /// The first record at or after `ts_ms` and its own timestamp, as
    /// Kafka's ListOffsets answers; `None` when no record is that recent.
    pub async fn record_for_timestamp(&self, ts_ms: i64) -> Result<Option<(u64, i64)>> {
        let at = self.offset_for_timestamp(ts_ms).await?;
        self.first_record(at, |t| t >= ts_ms).await
    }

    /// The record with the greatest timestamp in the newest batch (Kafka's
    /// MAX_TIMESTAMP), earliest on ties; `None` for an empty log.
    pub async fn newest_by_timestamp(&self) -> Result<Option<(u64, i64)>> {
        let end = self.end_offset();
        if end == self.start_offset() {
            return Ok(None);
        }
        let Some(entry) = self.read(end - 1, 1, usize::MAX).await?.pop() else {
            return Ok(None);
        };
        let records = crate::format::decode_entry(&entry.data)?;
        Ok(records
            .iter()
            .fold(None, |best: Option<(u64, i64)>, r| match best {
                Some((_, t)) if t >= r.message.timestamp_ms => best,
                _ => Some((r.offset, r.message.timestamp_ms)),
            }))
    }

    /// The first record at or after `from` whose timestamp passes `want`,
    /// within the batch that holds `from`.
    async fn first_record(
        &self,
        from: u64,
        want: impl Fn(i64) -> bool,
    ) -> Result<Option<(u64, i64)>> {
        if from >= self.end_offset() {
            return Ok(None);
        }
        let Some(entry) = self.read(from, 1, usize::MAX).await?.pop() else {
            return Ok(None);
        };
        Ok(crate::format::decode_entry(&entry.data)?
            .iter()
            .find(|r| r.offset >= from && want(r.message.timestamp_ms))
            .map(|r| (r.offset, r.message.timestamp_ms)))
    }

    /// Where the data still on the bookies starts (Kafka's local log start
    /// offset): past every ledger offloaded and deleted from the bookies.
    pub fn local_start_offset(&self) -> u64 {
        match self {
            PartitionLog::Managed(ml) => ml
                .ledgers()
                .iter()
                .filter(|l| l.bookie_deleted)
                .map(|l| l.end_offset())
                .max()
                .unwrap_or(0)
                .max(ml.start_offset()),
            PartitionLog::Memory(m) => m.start_offset(),
        }
    }

    /// The last offset held in offload storage (Kafka's latest tiered
    /// offset), if any ledger was offloaded.
    pub fn last_offloaded_offset(&self) -> Option<u64> {
        match self {
            PartitionLog::Managed(ml) => ml
                .ledgers()
                .iter()
                .filter(|l| l.offload.is_some() && l.end_offset() > l.first_offset)
                .map(|l| l.end_offset() - 1)
                .max(),
            PartitionLog::Memory(_) => None,
        }
    }

    /// See [`ManagedLedger::producers`]; non-persistent logs keep no
    /// producer state.
    pub fn producers(&self) -> Vec<(i64, crate::managed_ledger::ProducerSeq, Option<u64>)> {
        match self {
            PartitionLog::Managed(ml) => ml.producers(),
            PartitionLog::Memory(_) => Vec::new(),
        }
    }

    pub fn start_offset(&self) -> u64 {
        match self {
            PartitionLog::Managed(ml) => ml.start_offset(),
            PartitionLog::Memory(m) => m.start_offset(),
        }
    }

    pub fn end_offset(&self) -> u64 {
        match self {
            PartitionLog::Managed(ml) => ml.end_offset(),
            PartitionLog::Memory(m) => m.end_offset(),
        }
    }

    pub fn watch_end(&self) -> watch::Receiver<u64> {
        match self {
            PartitionLog::Managed(ml) => ml.watch_end(),
            PartitionLog::Memory(m) => m.end_tx.subscribe(),
        }
    }

    pub fn is_persistent(&self) -> bool {
        matches!(self, PartitionLog::Managed(_))
    }

    pub fn size(&self) -> u64 {
        match self {
            PartitionLog::Managed(ml) => ml.size(),
            PartitionLog::Memory(m) => m.inner().bytes as u64,
        }
    }
}

struct MemInner {
    entries: VecDeque<Entry>,
    bytes: usize,
    next: u64,
    closed: bool,
}

/// A non-persistent partition: the most recent entries up to a byte
/// budget. Consumers that fall behind the budget lose the oldest messages,
/// which is what non-persistent topics promise.
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Mutex<MemInner>>,
    end_tx: Arc<watch::Sender<u64>>,
    capacity: usize,
    name: Arc<str>,
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog")
            .field("name", &self.name)
            .finish()
    }
}

impl MemoryLog {
    pub fn new(name: &str, capacity: usize) -> Self {
        MemoryLog {
            inner: Arc::new(Mutex::new(MemInner {
                entries: VecDeque::new(),
                bytes: 0,
                next: 0,
                closed: false,
            })),
            end_tx: Arc::new(watch::channel(0).0),
            capacity,
            name: name.into(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn append(&self, batch: Bytes) -> Result<u64> {
        let h = BatchHeader::parse(&batch)?;
        let end = {
            let mut m = self.inner();
            if m.closed {
                return Err(BrokerError::TopicUnavailable(self.name.to_string()));
            }
            let base = m.next;
            let data = with_base_offset(batch, base);
            m.bytes += data.len();
            m.next += h.offset_count();
            m.entries.push_back(Entry {
                ledger_id: 0,
                entry_id: base,
                base_offset: base,
                offsets: h.offset_count(),
                data,
            });
            while m.bytes > self.capacity && m.entries.len() > 1 {
                if let Some(old) = m.entries.pop_front() {
                    m.bytes -= old.data.len();
                }
            }
            m.next
        };
        self.end_tx.send_replace(end);
        Ok(end - h.offset_count())
    }

    pub fn read(&self, offset: u64, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
        crate::managed_ledger::entries_from(&self.inner().entries, offset, max_entries, max_bytes)
    }

    pub fn offset_for_timestamp(&self, ts_ms: i64) -> u64 {
        let m = self.inner();
        m.entries
            .iter()
            .find(|e| BatchHeader::parse(&e.data).is_ok_and(|h| h.max_timestamp >= ts_ms))
            .map_or(m.next, |e| e.base_offset)
    }

    pub fn start_offset(&self) -> u64 {
        let m = self.inner();
        m.entries.front().map_or(m.next, |e| e.base_offset)
    }

    pub fn end_offset(&self) -> u64 {
        self.inner().next
    }

    pub fn close(&self) {
        self.inner().closed = true;
    }
}
