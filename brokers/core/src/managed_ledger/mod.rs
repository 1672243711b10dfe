//! A managed ledger: one topic partition as an ordered list of ledgers.
//!
//! Every entry is one record batch and occupies a run of per-partition
//! offsets; the batch's base offset is assigned here, in append order. The
//! ledger list lives in the metadata store under `/managed-ledgers/` and is
//! only ever changed with compare-and-set, so a broker that lost the topic
//! to another one finds out at its next change, if the bookies' fencing has
//! not told it first.
//!
//! Writes go through one actor task per managed ledger, which keeps offset
//! assignment, rollover and failure handling sequential. Reads use shared
//! state directly: an offset index of the ledgers written or recovered here
//! (binary search by reading entries for older ones), and a tail cache so
//! that consumers keeping up never touch the bookies.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use magnetar_bookies::meta::now_ms;
use magnetar_bookies::{BookieError, CreateOptions, LedgerClient, LedgerReader, LedgerWriter};
use magnetar_metadata::MetaError;
use magnetar_tiering::{LedgerFileWriter, OffloadedLedger, Tier};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{BrokerError, Result};
use crate::format::{decode_all, encode_restored, with_base_offset, BatchHeader, StoredMessage};
use crate::replicated::{is_replicated, GeoStamp, Watermark};

mod actor;

use actor::Actor;

pub const ML_PREFIX: &str = "/managed-ledgers/";
/// Entries fetched per bookie read while scanning a recovered ledger.
const SCAN_CHUNK: u64 = 1000;
/// Entries fetched per bookie read while offloading; entries may be large.
const OFFLOAD_CHUNK: u64 = 64;
/// Records read back from offloaded storage are regrouped into entries of
/// about this size.
const RESTORED_ENTRY_BYTES: usize = 256 << 10;

#[derive(Clone, Debug)]
pub struct ManagedLedgerConfig {
    pub ensemble: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    /// Roll over to a new ledger after this many entries, bytes or time.
    pub max_entries_per_ledger: u64,
    pub max_ledger_bytes: u64,
    pub max_ledger_age: Duration,
    /// Bytes of the most recent entries kept in memory for readers.
    pub cache_bytes: usize,
    /// Adds in flight to the bookies before appends wait.
    pub max_pending_adds: usize,
    /// Where closed ledgers are offloaded to, if anywhere.
    pub tier: Option<Tier>,
    /// Bound on one block of an offloaded file.
    pub offload_block_bytes: usize,
}

impl Default for ManagedLedgerConfig {
    fn default() -> Self {
        ManagedLedgerConfig {
            ensemble: 1,
            write_quorum: 1,
            ack_quorum: 1,
            max_entries_per_ledger: 50_000,
            max_ledger_bytes: 128 << 20,
            max_ledger_age: Duration::from_secs(4 * 3600),
            cache_bytes: 4 << 20,
            max_pending_adds: 1000,
            tier: None,
            offload_block_bytes: magnetar_tiering::format::DEFAULT_BLOCK_BYTES,
        }
    }
}

/// One ledger of the list, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerInfo {
    pub id: u64,
    pub first_offset: u64,
    #[serde(default)]
    pub entries: u64,
    /// Offsets the ledger's entries occupy.
    #[serde(default)]
    pub offsets: u64,
    #[serde(default)]
    pub size: u64,
    pub created_ms: u64,
    /// 0 while the ledger is being written.
    #[serde(default)]
    pub closed_ms: u64,
    /// Where the ledger was offloaded to, once the upload was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadedLedger>,
    /// The bookies' copy is deleted; reads go to the object store.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bookie_deleted: bool,
}

impl LedgerInfo {
    pub fn end_offset(&self) -> u64 {
        self.first_offset + self.offsets
    }

    pub fn is_closed(&self) -> bool {
        self.closed_ms != 0
    }
}

/// Where a partition's offload stands, as the admin API shows it
/// (Pulsar's OffloadProcessStatus).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadStatus {
    pub status: OffloadState,
    pub last_error: String,
    /// Ledgers the last run offloaded.
    pub offloaded_ledgers: Vec<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OffloadState {
    #[default]
    NotRun,
    Running,
    Success,
    Error,
}

/// Closed, not yet offloaded ledgers to offload, oldest first: while the
/// bookies hold more than `threshold` bytes of ledgers not offloaded
/// (0 offloads every closed ledger), and those closed before `closed_before_ms`.
pub fn offload_candidates(
    ledgers: &[LedgerInfo],
    threshold: Option<u64>,
    closed_before_ms: Option<u64>,
) -> Vec<u64> {
    let mut on_bookies: u64 = ledgers
        .iter()
        .filter(|l| l.offload.is_none())
        .map(|l| l.size)
        .sum();
    let mut out = Vec::new();
    for l in ledgers {
        if !l.is_closed() || l.entries == 0 || l.offload.is_some() {
            continue;
        }
        let by_size = threshold.is_some_and(|t| on_bookies > t);
        let by_age = closed_before_ms.is_some_and(|c| l.closed_ms < c);
        if by_size || by_age {
            on_bookies -= l.size;
            out.push(l.id);
        }
    }
    out
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    ledgers: Vec<LedgerInfo>,
    /// The end of the partition, for when trimming left no ledger with data.
    #[serde(default)]
    next_offset: u64,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    /// Last sequence per idempotent producer, for deduplication.
    #[serde(default)]
    producers: BTreeMap<i64, ProducerSeq>,
    /// Offsets below this are deleted even inside a kept ledger (Kafka's
    /// DeleteRecords).
    #[serde(default)]
    low_watermark: u64,
    #[serde(default)]
    txns: TxnIndex,
    /// Per source cluster (its `geoId`), the replication watermark: never
    /// evicted, unlike `producers`, however long a region is away.
    #[serde(default)]
    geo: BTreeMap<u16, Watermark>,
}

/// Transactions seen in the partition's batches: where each producer's
/// open transaction began, and the aborted ones, as Kafka's read-committed
/// consumers need them (last stable offset, aborted-transaction lists).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnIndex {
    #[serde(default)]
    pub open: BTreeMap<i64, u64>,
    #[serde(default)]
    pub aborted: Vec<AbortedTxn>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: u64,
    /// Offset of the abort marker.
    pub last_offset: u64,
}

impl TxnIndex {
    /// Takes a stored batch into account, in offset order.
    fn note(&mut self, h: &BatchHeader, data: &Bytes, offset: u64) {
        if !h.is_transactional() || h.producer_id < 0 {
            return;
        }
        if !h.is_control() {
            self.open.entry(h.producer_id).or_insert(offset);
            return;
        }
        // A marker for a partition the transaction never wrote to leaves
        // nothing to skip.
        let Some(first) = self.open.remove(&h.producer_id) else {
            return;
        };
        if crate::format::control_type(data) == Some(crate::format::ControlType::Abort) {
            self.aborted.push(AbortedTxn {
                producer_id: h.producer_id,
                first_offset: first,
                last_offset: offset,
            });
        }
    }

    /// Forgets aborted transactions wholly below `start`.
    fn trim(&mut self, start: u64) {
        self.aborted.retain(|a| a.last_offset >= start);
    }
}

/// The last batch an idempotent producer wrote: Kafka's producer id,
/// epoch and sequence numbers, taken from the stored batch headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSeq {
    pub epoch: i16,
    /// Sequence of the producer's last record.
    pub last_sequence: i64,
    /// Offset of that batch.
    pub offset: u64,
}

/// Producers remembered per partition; the least recently seen go first.
const MAX_PRODUCERS: usize = 10_000;

/// Takes a stored batch's producer fields into account: a replicated
/// batch moves its source cluster's watermark, any other its idempotent
/// producer's sequence.
fn note_batch(
    producers: &mut BTreeMap<i64, ProducerSeq>,
    geo: &mut BTreeMap<u16, Watermark>,
    h: &BatchHeader,
    offset: u64,
) {
    match GeoStamp::decode(h.producer_id, h.producer_epoch, h.base_sequence) {
        Some((source, base)) => geo
            .entry(source)
            .or_default()
            .recovered(base.saturating_add(h.offset_count())),
        None if is_replicated(h.producer_id) => {}
        None => note_producer(producers, h, offset),
    }
}

fn note_producer(map: &mut BTreeMap<i64, ProducerSeq>, h: &BatchHeader, offset: u64) {
    if h.is_control() && h.producer_id >= 0 {
        // A marker written with a newer epoch fences the older one: its
        // writes are refused from now on, and the new epoch starts at 0.
        let newer = map
            .get(&h.producer_id)
            .is_none_or(|e| h.producer_epoch > e.epoch);
        if newer {
            map.insert(
                h.producer_id,
                ProducerSeq {
                    epoch: h.producer_epoch,
                    last_sequence: -1,
                    offset,
                },
            );
        }
        return;
    }
    if h.producer_id < 0 || h.base_sequence < 0 {
        return;
    }
    let last_sequence = i64::from(h.base_sequence) + i64::from(h.record_count.max(1)) - 1;
    let e = map.entry(h.producer_id).or_insert(ProducerSeq {
        epoch: h.producer_epoch,
        last_sequence,
        offset,
    });
    if (h.producer_epoch, last_sequence) >= (e.epoch, e.last_sequence) {
        *e = ProducerSeq {
            epoch: h.producer_epoch,
            last_sequence,
            offset,
        };
    }
    if map.len() > MAX_PRODUCERS {
        if let Some((&oldest, _)) = map.iter().min_by_key(|(_, p)| p.offset) {
            map.remove(&oldest);
        }
    }
}

/// One entry read back: a record batch and the offsets it occupies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub base_offset: u64,
    pub offsets: u64,
    pub data: Bytes,
}

impl Entry {
    pub fn end_offset(&self) -> u64 {
        self.base_offset + self.offsets
    }
}

struct State {
    ledgers: Vec<LedgerInfo>,
    version: u64,
    /// Everything below is durable and readable.
    next_offset: u64,
    properties: BTreeMap<String, String>,
    /// Base offset of every entry, for ledgers written or scanned here.
    indexes: HashMap<u64, Vec<u64>>,
    cache: VecDeque<Entry>,
    cache_bytes: usize,
    /// Set when the ledger can take no more writes (fenced, closed).
    failed: Option<String>,
    producers: BTreeMap<i64, ProducerSeq>,
    low_watermark: u64,
    txns: TxnIndex,
    geo: BTreeMap<u16, Watermark>,
}

impl State {
    fn start_offset(&self) -> u64 {
        self.ledgers
            .first()
            .map_or(self.next_offset, |l| l.first_offset)
            .max(self.low_watermark.min(self.next_offset))
    }

    fn record(&self) -> Record {
        Record {
            ledgers: self.ledgers.clone(),
            next_offset: self.next_offset,
            properties: self.properties.clone(),
            producers: self.producers.clone(),
            low_watermark: self.low_watermark,
            txns: self.txns.clone(),
            geo: self.geo.clone(),
        }
    }
}

struct Inner {
    name: String,
    key: String,
    /// The revision that created the ledger's record: which life of the
    /// topic this is, as replication tells a topic made again apart.
    incarnation: u64,
    client: LedgerClient,
    cfg: ManagedLedgerConfig,
    state: RwLock<State>,
    end_tx: watch::Sender<u64>,
    readers: Mutex<HashMap<u64, LedgerReader>>,
    /// One offload run at a time.
    offloading: tokio::sync::Mutex<()>,
    offload_status: Mutex<OffloadStatus>,
}

enum Cmd {
    Append {
        batch: Bytes,
        reply: oneshot::Sender<Result<u64>>,
    },
    Trim {
        keep_from: u64,
        reply: oneshot::Sender<Result<Vec<u64>>>,
    },
    DeleteBefore {
        offset: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    SetProperties {
        props: BTreeMap<String, String>,
        reply: oneshot::Sender<Result<()>>,
    },
    SetGeoIncarnation {
        source: u16,
        incarnation: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    MarkOffloaded {
        ledger_id: u64,
        object: OffloadedLedger,
        reply: oneshot::Sender<Result<()>>,
    },
    DropBookieCopies {
        offloaded_before_ms: u64,
        reply: oneshot::Sender<Result<Vec<u64>>>,
    },
    Close {
        delete: bool,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to a managed ledger; cheap to clone.
#[derive(Clone)]
pub struct ManagedLedger {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for ManagedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedLedger")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::CorruptMetadata {
        key: key.into(),
        reason: e.to_string(),
    }
}

fn lock_err<T>(p: std::sync::PoisonError<T>) -> T {
    p.into_inner()
}

impl ManagedLedger {
    /// Opens (or creates) the managed ledger `name` for writing: recovers
    /// the last ledger a previous owner left open, then starts a new one.
    pub async fn open(client: LedgerClient, name: &str, cfg: ManagedLedgerConfig) -> Result<Self> {
        let key = format!("{ML_PREFIX}{name}");
        let meta = client.pool().meta().clone();
        let (mut record, mut version, mut incarnation) = match meta.get(&key).await? {
            Some(kv) => (
                serde_json::from_slice::<Record>(&kv.value).map_err(|e| corrupt(&key, e))?,
                kv.version,
                kv.create_revision,
            ),
            None => (Record::default(), 0, 0),
        };
        let mut indexes = HashMap::new();
        let mut dropped = Vec::new();
        if let Some(last) = record.ledgers.last().cloned() {
            if !last.is_closed() {
                match recover_ledger(
                    &client,
                    &last,
                    &mut record.producers,
                    &mut record.geo,
                    &mut record.txns,
                )
                .await?
                {
                    Some((info, index)) => {
                        indexes.insert(info.id, index);
                        if let Some(l) = record.ledgers.last_mut() {
                            *l = info;
                        }
                    }
                    None => {
                        record.ledgers.pop();
                        dropped.push(last.id);
                    }
                }
            }
        }
        let next_offset = record
            .ledgers
            .last()
            .map_or(0, LedgerInfo::end_offset)
            .max(record.next_offset);
        record.next_offset = next_offset;
        if !dropped.is_empty() || version == 0 {
            let json = serde_json::to_vec(&record).map_err(|e| corrupt(&key, e))?;
            version = match meta.compare_and_put(&key, version, json).await {
                Ok(kv) => {
                    incarnation = kv.create_revision;
                    kv.version
                }
                Err(MetaError::Conflict { .. }) => {
                    return Err(BrokerError::TopicUnavailable(name.into()))
                }
                Err(e) => return Err(e.into()),
            };
        }
        for id in dropped {
            if let Err(e) = client.delete(id).await {
                tracing::warn!(ledger = id, "deleting an empty ledger: {e}");
            }
        }
        let (end_tx, _) = watch::channel(next_offset);
        let inner = Arc::new(Inner {
            name: name.into(),
            key,
            incarnation,
            client,
            state: RwLock::new(State {
                ledgers: record.ledgers,
                version,
                next_offset,
                properties: record.properties,
                producers: record.producers,
                low_watermark: record.low_watermark,
                txns: record.txns,
                geo: record.geo,
                indexes,
                cache: VecDeque::new(),
                cache_bytes: 0,
                failed: None,
            }),
            end_tx,
            readers: Mutex::default(),
            offloading: tokio::sync::Mutex::new(()),
            offload_status: Mutex::default(),
            cfg,
        });
        let (tx, rx) = mpsc::channel(inner.cfg.max_pending_adds.max(16));
        let mut actor = Actor::new(inner.clone(), rx, next_offset);
        // A ledger ready before the first append keeps that append quick
        // and surfaces a lack of bookies at open time.
        actor.start_ledger().await?;
        tokio::spawn(actor.run());
        Ok(ManagedLedger { inner, tx })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Which life of the topic this is: it changes only when the topic is
    /// deleted and made again.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(lock_err)
    }

    /// The first offset still stored.
    pub fn start_offset(&self) -> u64 {
        self.state().start_offset()
    }

    /// One past the last durable offset: Kafka's high watermark.
    pub fn end_offset(&self) -> u64 {
        self.state().next_offset
    }

    /// The first offset of the oldest open transaction, or the end: what
    /// Kafka's read-committed consumers may read up to.
    pub fn last_stable_offset(&self) -> u64 {
        let st = self.state();
        st.txns
            .open
            .values()
            .copied()
            .min()
            .unwrap_or(st.next_offset)
            .min(st.next_offset)
    }

    /// Aborted transactions with data in `[from, to)`.
    pub fn aborted_between(&self, from: u64, to: u64) -> Vec<AbortedTxn> {
        self.state()
            .txns
            .aborted
            .iter()
            .filter(|a| a.last_offset >= from && a.first_offset < to)
            .copied()
            .collect()
    }

    /// Follows [`ManagedLedger::end_offset`] as appends complete.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.inner.end_tx.subscribe()
    }

    pub fn ledgers(&self) -> Vec<LedgerInfo> {
        self.state().ledgers.clone()
    }

    /// Bytes stored in all ledgers.
    pub fn size(&self) -> u64 {
        self.state().ledgers.iter().map(|l| l.size).sum()
    }

    pub fn properties(&self) -> BTreeMap<String, String> {
        self.state().properties.clone()
    }

    /// What the partition last stored from an idempotent producer.
    pub fn producer(&self, producer_id: i64) -> Option<ProducerSeq> {
        self.state().producers.get(&producer_id).copied()
    }

    /// The replication watermark of each source cluster (by `geoId`), as
    /// stored: the source offsets below `next` are in this partition.
    pub fn geo_watermarks(&self) -> BTreeMap<u16, Watermark> {
        self.state().geo.clone()
    }

    /// Records, durably, which life of the source topic cluster
    /// `source`'s records come from, before any of them is taken.
    pub async fn set_geo_incarnation(&self, source: u16, incarnation: u64) -> Result<()> {
        let stored = self.state().geo.get(&source).map(|w| w.incarnation);
        if stored == Some(incarnation) {
            return Ok(());
        }
        self.call(|reply| Cmd::SetGeoIncarnation {
            source,
            incarnation,
            reply,
        })
        .await
    }

    /// Every idempotent producer the partition remembers, with where its
    /// open transaction began, if it has one (Kafka's DescribeProducers).
    pub fn producers(&self) -> Vec<(i64, ProducerSeq, Option<u64>)> {
        let st = self.state();
        st.producers
            .iter()
            .map(|(&id, &seq)| (id, seq, st.txns.open.get(&id).copied()))
            .collect()
    }

    /// Why the ledger takes no more writes, if it does not.
    pub fn failure(&self) -> Option<String> {
        self.state().failed.clone()
    }

    async fn call<T>(&self, cmd: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let gone = || BrokerError::TopicUnavailable(self.inner.name.clone());
        self.tx.send(cmd(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Appends one record batch and returns its base offset once it is
    /// durable. Appends complete in the order they were called.
    pub fn append(&self, batch: Bytes) -> impl std::future::Future<Output = Result<u64>> + Send {
        let this = self.clone();
        async move { this.submit(batch).await?.await }
    }

    /// Queues an append and returns once its place in the order is fixed;
    /// the returned future resolves when it is durable. Lets a caller
    /// decide order-sensitive things (deduplication) under its own lock
    /// without holding that lock until the bookies answer.
    pub async fn submit(
        &self,
        batch: Bytes,
    ) -> Result<impl std::future::Future<Output = Result<u64>> + Send + 'static> {
        let (reply, rx) = oneshot::channel();
        let name = self.inner.name.clone();
        let gone = move || BrokerError::TopicUnavailable(name.clone());
        self.tx
            .send(Cmd::Append { batch, reply })
            .await
            .map_err(|_| gone())?;
        Ok(async move { rx.await.map_err(|_| gone())? })
    }

    /// Deletes whole ledgers that end at or before `keep_from`; the ledger
    /// being written is kept. Returns the deleted ledger ids.
    pub async fn trim(&self, keep_from: u64) -> Result<Vec<u64>> {
        self.call(|reply| Cmd::Trim { keep_from, reply }).await
    }

    /// Deletes every message below `offset` (at most the end): reads
    /// start there from now on, and ledgers wholly below it go. Returns
    /// the new start. Kafka's DeleteRecords.
    pub async fn delete_before(&self, offset: u64) -> Result<u64> {
        self.call(|reply| Cmd::DeleteBefore { offset, reply }).await
    }

    pub async fn set_properties(&self, props: BTreeMap<String, String>) -> Result<()> {
        self.call(|reply| Cmd::SetProperties { props, reply }).await
    }

    /// Waits for outstanding appends, closes the current ledger and stops
    /// taking writes, so that the next owner needs no recovery.
    pub async fn close(&self) -> Result<()> {
        self.call(|reply| Cmd::Close {
            delete: false,
            reply,
        })
        .await
    }

    /// Closes, then deletes every ledger and the ledger list.
    pub async fn delete(&self) -> Result<()> {
        self.call(|reply| Cmd::Close {
            delete: true,
            reply,
        })
        .await
    }

    /// Reads entries from the one holding `offset` onwards, within one
    /// ledger, up to `max_entries` and about `max_bytes` (at least one
    /// entry). Offsets before the start read from the start; an empty
    /// result means nothing at or past `offset` is durable yet.
    pub async fn read(
        &self,
        offset: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>> {
        let max_entries = max_entries.max(1);
        let (offset, ledger, known) = {
            let st = self.state();
            let offset = offset.max(st.start_offset());
            if offset >= st.next_offset {
                return Ok(Vec::new());
            }
            if let Some(hit) = from_cache(&st.cache, offset, max_entries, max_bytes) {
                return Ok(hit);
            }
            let Some(ledger) = st
                .ledgers
                .iter()
                .rev()
                .find(|l| l.first_offset <= offset && l.end_offset() > offset)
                .cloned()
            else {
                return Ok(Vec::new());
            };
            let known = st
                .indexes
                .get(&ledger.id)
                .map(|idx| idx.partition_point(|&b| b <= offset).saturating_sub(1) as u64);
            (offset, ledger, known)
        };
        let offset = offset.max(ledger.first_offset);
        if ledger.bookie_deleted {
            return self
                .read_offloaded(&ledger, offset, max_entries, max_bytes)
                .await;
        }
        let first = match known {
            Some(e) => e,
            None => self.search(&ledger, offset).await?,
        };
        // Read about max_bytes, judged by the ledger's mean entry size,
        // rather than max_entries: a catch-up reader asking for 1 MiB must
        // not pull a thousand large entries off the bookies to use a few.
        let mean = ledger.size.checked_div(ledger.entries).unwrap_or(0).max(1);
        let by_bytes = (max_bytes as u64 / mean).saturating_add(1);
        let count = (max_entries as u64).min(by_bytes).max(1);
        let last = (first + count - 1).min(ledger.entries.saturating_sub(1));
        let entries = self.read_range(&ledger, first, last).await?;
        Ok(take_within(entries.into_iter(), max_entries, max_bytes))
    }

    /// The first offset of the earliest entry whose newest timestamp is at
    /// or after `ts_ms`, or the end when there is none: Kafka's lookup by
    /// timestamp, at batch granularity. Binary search by reading one
    /// entry per step, first over ledgers, then within one.
    pub async fn offset_for_timestamp(&self, ts_ms: i64) -> Result<u64> {
        let ledgers: Vec<LedgerInfo> = self
            .ledgers()
            .into_iter()
            .filter(|l| l.entries > 0)
            .collect();
        let newest =
            |entry: Entry| -> Result<i64> { Ok(BatchHeader::parse(&entry.data)?.max_timestamp) };
        let (mut lo, mut hi) = (0usize, ledgers.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let l = &ledgers[mid];
            let last = if l.bookie_deleted {
                let (tier, object) = self.tier_of(l)?;
                let index = tier.index(object).await.map_err(|e| unavailable(l, e))?;
                index
                    .blocks
                    .iter()
                    .map(|b| b.max_timestamp_ms)
                    .max()
                    .unwrap_or(i64::MIN)
            } else {
                newest(self.entry(l, l.entries - 1).await?)?
            };
            if last >= ts_ms {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let Some(l) = ledgers.get(lo) else {
            return Ok(self.end_offset());
        };
        if l.bookie_deleted {
            return self.offloaded_offset_for(l, ts_ms).await;
        }
        let (mut a, mut b) = (0u64, l.entries - 1);
        while a < b {
            let mid = a + (b - a) / 2;
            if newest(self.entry(l, mid).await?)? >= ts_ms {
                b = mid;
            } else {
                a = mid + 1;
            }
        }
        Ok(self.entry(l, a).await?.base_offset)
    }

    fn tier_of<'a>(&'a self, l: &'a LedgerInfo) -> Result<(&'a Tier, &'a OffloadedLedger)> {
        match (&self.inner.cfg.tier, &l.offload) {
            (Some(t), Some(o)) => Ok((t, o)),
            _ => Err(BrokerError::OffloadUnavailable(format!(
                "ledger {} of {} is offloaded, and no offload store is configured",
                l.id, self.inner.name
            ))),
        }
    }

    async fn offloaded_offset_for(&self, l: &LedgerInfo, ts_ms: i64) -> Result<u64> {
        let (tier, object) = self.tier_of(l)?;
        let index = tier.index(object).await.map_err(|e| unavailable(l, e))?;
        let Some(block) = index.blocks.iter().find(|b| b.max_timestamp_ms >= ts_ms) else {
            return Ok(l.end_offset());
        };
        let records = tier
            .read(object, block.first_offset, usize::MAX)
            .await
            .map_err(|e| unavailable(l, e))?;
        Ok(records
            .iter()
            .find(|r| r.timestamp_ms >= ts_ms && !r.control)
            .map_or(l.end_offset(), |r| r.offset))
    }

    /// Reads from an offloaded ledger: ranged GETs through the tier's
    /// block cache, regrouped into entries.
    async fn read_offloaded(
        &self,
        l: &LedgerInfo,
        offset: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>> {
        let (tier, object) = self.tier_of(l)?;
        let records = tier
            .read(object, offset, max_bytes)
            .await
            .map_err(|e| unavailable(l, e))?;
        if records.is_empty() {
            // The index ends before the ledger does: nothing to serve, and
            // skipping ahead would lose data.
            return Err(unavailable(l, "the offloaded file ends early"));
        }
        // Re-encoding is CPU work, kept off the async workers as decoding is.
        let id = l.id;
        tokio::task::spawn_blocking(move || restore_entries(id, records, max_entries))
            .await
            .map_err(|e| unavailable(l, e))?
    }

    /// What this partition's offload did last.
    pub fn offload_status(&self) -> OffloadStatus {
        self.inner
            .offload_status
            .lock()
            .unwrap_or_else(lock_err)
            .clone()
    }

    /// Offloads the ledgers `ids` (closed ones not offloaded yet), oldest
    /// first. An upload that fails is retried `attempts` times with
    /// backoff; the ledger stays on the bookies until its upload is
    /// verified. Returns the ledgers offloaded, or the first error once a
    /// ledger has used up its attempts.
    pub async fn offload(
        &self,
        ids: &[u64],
        attempts: u32,
        counted: &crate::metrics::OffloadTraffic,
    ) -> Result<Vec<u64>> {
        let _running = self.inner.offloading.lock().await;
        let set = |st: OffloadStatus| {
            *self.inner.offload_status.lock().unwrap_or_else(lock_err) = st;
        };
        set(OffloadStatus {
            status: OffloadState::Running,
            ..OffloadStatus::default()
        });
        let mut done = Vec::new();
        for &id in ids {
            let mut delay = Duration::from_millis(500);
            let mut attempt = 1;
            loop {
                let outcome = self.offload_one(id).await;
                counted.count(&outcome);
                match outcome {
                    Ok(Some(_)) => {
                        done.push(id);
                        break;
                    }
                    Ok(None) => break,
                    Err(e) if attempt < attempts.max(1) && e.is_retriable() => {
                        tracing::warn!(ml = %self.inner.name, ledger = id, attempt, "offload: {e}; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                        attempt += 1;
                    }
                    Err(e) => {
                        tracing::warn!(ml = %self.inner.name, ledger = id, "offload: {e}");
                        set(OffloadStatus {
                            status: OffloadState::Error,
                            last_error: e.to_string(),
                            offloaded_ledgers: done,
                        });
                        return Err(e);
                    }
                }
            }
        }
        set(OffloadStatus {
            status: OffloadState::Success,
            last_error: String::new(),
            offloaded_ledgers: done.clone(),
        });
        Ok(done)
    }

    /// Writes one closed ledger to the object store and records it in the
    /// ledger list; its size, or `None` when there is nothing to do.
    async fn offload_one(&self, id: u64) -> Result<Option<u64>> {
        let Some(l) = self
            .ledgers()
            .into_iter()
            .find(|l| l.id == id && l.is_closed() && l.offload.is_none() && l.entries > 0)
        else {
            return Ok(None);
        };
        let Some(tier) = self.inner.cfg.tier.clone() else {
            return Err(BrokerError::InvalidArgument(
                "no offload store is configured".into(),
            ));
        };
        let mut w = LedgerFileWriter::new(l.id, self.inner.cfg.offload_block_bytes)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let mut next = 0;
        while next < l.entries {
            let last = (next + OFFLOAD_CHUNK - 1).min(l.entries - 1);
            for e in self.read_range(&l, next, last).await? {
                let (h, records) = decode_all(&e.data)?;
                let producer_id = Some(h.producer_id).filter(|&p| h.is_transactional() && p >= 0);
                for r in records {
                    w.push(magnetar_tiering::Record {
                        offset: r.offset,
                        timestamp_ms: r.message.timestamp_ms,
                        key: r.message.key,
                        value: r.message.value,
                        headers: r.message.headers,
                        producer_id,
                        control: h.is_control(),
                    })
                    .map_err(|e| BrokerError::CorruptBatch(format!("ledger {}: {e}", l.id)))?;
                }
            }
            next = last + 1;
        }
        let (file, index) = w
            .finish()
            .map_err(|e| BrokerError::CorruptBatch(format!("ledger {}: {e}", l.id)))?;
        let object = tier
            .upload(&self.inner.name, file, &index)
            .await
            .map_err(|e| unavailable(&l, e))?;
        let marked = self
            .call(|reply| Cmd::MarkOffloaded {
                ledger_id: id,
                object: object.clone(),
                reply,
            })
            .await;
        match marked {
            Ok(()) => Ok(Some(l.size)),
            Err(e) => {
                if let Err(d) = tier.delete(&object).await {
                    tracing::warn!(ml = %self.inner.name, ledger = id, "removing an unused upload: {d}");
                }
                Err(e)
            }
        }
    }

    /// Deletes the bookies' copy of ledgers offloaded before
    /// `offloaded_before_ms` (the deletion lag); reads of them go to the
    /// object store from then on. Returns their ids.
    pub async fn drop_bookie_copies(&self, offloaded_before_ms: u64) -> Result<Vec<u64>> {
        self.call(|reply| Cmd::DropBookieCopies {
            offloaded_before_ms,
            reply,
        })
        .await
    }

    async fn entry(&self, ledger: &LedgerInfo, id: u64) -> Result<Entry> {
        self.read_range(ledger, id, id)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| BrokerError::TopicUnavailable(self.inner.name.clone()))
    }

    async fn reader(&self, ledger: &LedgerInfo, fresh: bool) -> Result<LedgerReader> {
        let cached = if fresh {
            None
        } else {
            self.inner
                .readers
                .lock()
                .unwrap_or_else(lock_err)
                .get(&ledger.id)
                .cloned()
        };
        let mut r = match cached {
            Some(r) => r,
            None => {
                let r = self.inner.client.open(ledger.id).await?;
                self.inner
                    .readers
                    .lock()
                    .unwrap_or_else(lock_err)
                    .insert(ledger.id, r.clone());
                r
            }
        };
        r.assume_confirmed(ledger.entries as i64 - 1);
        Ok(r)
    }

    async fn read_range(&self, ledger: &LedgerInfo, first: u64, last: u64) -> Result<Vec<Entry>> {
        let raw = match self.reader(ledger, false).await?.read(first, last).await {
            Ok(v) => v,
            // The cached reader's ensemble may predate a replacement.
            Err(_) => self.reader(ledger, true).await?.read(first, last).await?,
        };
        raw.into_iter()
            .map(|e| {
                let h = BatchHeader::parse(&e.payload)?;
                Ok(Entry {
                    ledger_id: ledger.id,
                    entry_id: e.entry_id,
                    base_offset: h.base_offset.max(0) as u64,
                    offsets: h.offset_count(),
                    data: e.payload,
                })
            })
            .collect()
    }

    /// Binary search by reading entries, for ledgers without an index.
    async fn search(&self, ledger: &LedgerInfo, offset: u64) -> Result<u64> {
        let (mut lo, mut hi) = (0u64, ledger.entries.saturating_sub(1));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            let e = self.read_range(ledger, mid, mid).await?;
            match e.first() {
                Some(e) if e.base_offset <= offset => lo = mid,
                Some(_) => hi = mid - 1,
                None => return Err(BrokerError::TopicUnavailable(self.inner.name.clone())),
            }
        }
        Ok(lo)
    }
}

/// Deletes a ledger's data wherever it is: on the bookies, and in the
/// object store.
async fn delete_ledger_data(inner: &Inner, l: &LedgerInfo) -> Result<()> {
    if !l.bookie_deleted {
        delete_bookie_copy(inner, l.id).await?;
    }
    if let (Some(tier), Some(object)) = (&inner.cfg.tier, &l.offload) {
        tier.delete(object)
            .await
            .map_err(|e| BrokerError::OffloadUnavailable(e.to_string()))?;
    }
    Ok(())
}

/// Deletes a ledger from the bookies; one already gone is fine.
async fn delete_bookie_copy(inner: &Inner, id: u64) -> Result<()> {
    match inner.client.delete(id).await {
        Ok(()) | Err(BookieError::NoLedger(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn unavailable(l: &LedgerInfo, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::OffloadUnavailable(format!("ledger {}: {e}", l.id))
}

/// Records read back from the object store as entries: runs of records
/// with the same producer and kind, of about [`RESTORED_ENTRY_BYTES`].
fn restore_entries(
    ledger_id: u64,
    records: Vec<magnetar_tiering::Record>,
    max_entries: usize,
) -> Result<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    let mut run: Vec<StoredMessage> = Vec::new();
    let mut run_kind = (None, false);
    let mut run_bytes = 0;
    let flush = |run: &mut Vec<StoredMessage>, kind: (Option<i64>, bool), out: &mut Vec<Entry>| {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(());
        };
        let (base, end) = (first.offset, last.offset + 1);
        let data = encode_restored(run, kind.0, kind.1)?;
        out.push(Entry {
            ledger_id,
            entry_id: base,
            base_offset: base,
            offsets: end - base,
            data,
        });
        run.clear();
        Ok::<(), BrokerError>(())
    };
    for r in records {
        let kind = (r.producer_id, r.control);
        if !run.is_empty() && (kind != run_kind || run_bytes >= RESTORED_ENTRY_BYTES) {
            flush(&mut run, run_kind, &mut out)?;
            run_bytes = 0;
            if out.len() >= max_entries.max(1) {
                return Ok(out);
            }
        }
        run_kind = kind;
        run_bytes += r.size();
        run.push(StoredMessage {
            offset: r.offset,
            message: crate::format::Message {
                key: r.key,
                value: r.value,
                headers: r.headers,
                timestamp_ms: r.timestamp_ms,
            },
        });
    }
    flush(&mut run, run_kind, &mut out)?;
    Ok(out)
}

fn from_cache(
    cache: &VecDeque<Entry>,
    offset: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Option<Vec<Entry>> {
    if cache.front()?.base_offset > offset {
        return None;
    }
    let out = entries_from(cache, offset, max_entries, max_bytes);
    (!out.is_empty()).then_some(out)
}

/// Entries of an in-memory run holding `offset` and on.
pub(crate) fn entries_from(
    entries: &VecDeque<Entry>,
    offset: u64,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Entry> {
    let at = entries.partition_point(|e| e.end_offset() <= offset);
    take_within(entries.iter().skip(at).cloned(), max_entries, max_bytes)
}

/// Up to `max_entries` entries and about `max_bytes`: always at least one.
fn take_within(
    entries: impl Iterator<Item = Entry>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for e in entries.take(max_entries.max(1)) {
        if !out.is_empty() && bytes + e.data.len() > max_bytes {
            break;
        }
        bytes += e.data.len();
        out.push(e);
    }
    out
}

/// Fences and closes a ledger a previous owner left open, and scans it for
/// its offsets and size. `None` when it holds no entry.
async fn recover_ledger(
    client: &LedgerClient,
    info: &LedgerInfo,
    producers: &mut BTreeMap<i64, ProducerSeq>,
    geo: &mut BTreeMap<u16, Watermark>,
    txns: &mut TxnIndex,
) -> Result<Option<(LedgerInfo, Vec<u64>)>> {
    let reader = match client.open_and_recover(info.id).await {
        Ok(r) => r,
        Err(BookieError::NoLedger(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let lac = reader.last_add_confirmed();
    if lac < 0 {
        return Ok(None);
    }
    let mut out = info.clone();
    out.entries = 0;
    out.offsets = 0;
    out.size = 0;
    // The LAC comes from the bookies; reserve by what is plausible, not by
    // what they claim, so that a wild value cannot abort on allocation.
    let mut index =
        Vec::with_capacity(usize::try_from(lac).map_or(0, |l| l.min(SCAN_CHUNK as usize * 16)) + 1);
    let mut first = 0u64;
    while first as i64 <= lac {
        let last = (first + SCAN_CHUNK - 1).min(lac as u64);
        for e in reader.read(first, last).await? {
            let h = BatchHeader::parse(&e.payload)?;
            note_batch(producers, geo, &h, h.base_offset.max(0) as u64);
            txns.note(&h, &e.payload, h.base_offset.max(0) as u64);
            index.push(h.base_offset.max(0) as u64);
            out.entries += 1;
            out.offsets = (h.base_offset.max(0) as u64)
                .saturating_add(h.offset_count())
                .saturating_sub(out.first_offset);
            out.size += e.payload.len() as u64;
        }
        first = last + 1;
    }
    out.closed_ms = now_ms();
    Ok(Some((out, index)))
}
