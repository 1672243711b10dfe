//! The ledger client: what the broker uses to write and read ledgers.
//!
//! A [`LedgerWriter`] is an actor task. `add` queues an entry and returns at
//! once; the actor stripes it to the entry's write set over one pipelined
//! stream per bookie, counts acknowledgements, and completes adds in entry
//! order once Qa bookies have each made the entry durable. A bookie that
//! fails is replaced (ensemble change): the new ensemble is recorded in the
//! ledger's metadata from LAC+1 on, and the unacknowledged entries are sent
//! to the replacement.
//!
//! [`LedgerClient::open_and_recover`] is how the next owner takes over a
//! ledger whose writer died: it fences the ledger on its bookies, so that
//! the old writer cannot complete another add, reads forward from the
//! highest LAC any bookie knows, re-writes each entry it finds, and closes
//! the ledger at the last one.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use magnetar_metadata::{MetaClient, MetaError};
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::error::{BookieError, Result};
use crate::meta::{self, LedgerMetadata, LedgerState, Segment};
use crate::pool::BookiePool;
use crate::proto::{self, Code};

/// Entries per read request to one bookie.
const READ_BATCH: usize = 1000;
/// Entries per add message to one bookie.
const ADD_BATCH: usize = 512;
/// How long a bookie may leave an add unanswered before it is replaced.
const ADD_TIMEOUT: Duration = Duration::from_secs(10);
/// Ledger ids reserved per round trip to the metadata store.
const ID_RANGE: u64 = 100;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub ensemble: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub custom: std::collections::BTreeMap<String, String>,
}

impl CreateOptions {
    pub fn new(ensemble: usize, write_quorum: usize, ack_quorum: usize) -> Self {
        Self {
            ensemble,
            write_quorum,
            ack_quorum,
            custom: Default::default(),
        }
    }
}

/// One entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub entry_id: u64,
    pub payload: Bytes,
}

#[derive(Clone)]
pub struct LedgerClient {
    pool: BookiePool,
    ids: Arc<Mutex<(u64, u64)>>,
}

impl std::fmt::Debug for LedgerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerClient").finish_non_exhaustive()
    }
}

fn parse_md(value: &[u8]) -> Result<LedgerMetadata> {
    serde_json::from_slice(value).map_err(|e| BookieError::Storage(format!("ledger metadata: {e}")))
}

impl LedgerClient {
    pub fn new(meta: MetaClient) -> Self {
        Self {
            pool: BookiePool::new(meta),
            ids: Arc::default(),
        }
    }

    pub fn pool(&self) -> &BookiePool {
        &self.pool
    }

    fn meta(&self) -> &MetaClient {
        self.pool.meta()
    }

    async fn next_ledger_id(&self) -> Result<u64> {
        {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            if ids.0 < ids.1 {
                ids.0 += 1;
                return Ok(ids.0 - 1);
            }
        }
        // Reserve a range by compare-and-set on the counter.
        let (start, end) = loop {
            let cur = self.meta().get(meta::LEDGER_IDGEN_KEY).await?;
            let (next, version) = match &cur {
                Some(kv) => (
                    std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| BookieError::Storage("bad ledger id counter".into()))?,
                    kv.version,
                ),
                None => (1, 0),
            };
            let end = next + ID_RANGE;
            match self
                .meta()
                .compare_and_put(meta::LEDGER_IDGEN_KEY, version, end.to_string())
                .await
            {
                Ok(_) => break (next, end),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        *ids = (start + 1, end);
        Ok(start)
    }

    /// Creates a ledger on `ensemble` live, writable bookies chosen at
    /// random, and returns its writer.
    pub async fn create(&self, opts: CreateOptions) -> Result<LedgerWriter> {
        let (e, qw, qa) = (opts.ensemble, opts.write_quorum, opts.ack_quorum);
        if e == 0 || qw == 0 || qa == 0 || qw > e || qa > qw || e > 64 {
            return Err(BookieError::BadRequest(format!(
                "need 1 <= ack quorum ({qa}) <= write quorum ({qw}) <= ensemble ({e}) <= 64"
            )));
        }
        let mut candidates = self.pool.writable(&[]).await?;
        if candidates.len() < e {
            return Err(BookieError::NotEnoughBookies {
                needed: e,
                available: candidates.len(),
            });
        }
        candidates.shuffle(&mut rand::rng());
        candidates.truncate(e);
        let id = self.next_ledger_id().await?;
        let md = LedgerMetadata {
            id,
            ensemble_size: e,
            write_quorum: qw,
            ack_quorum: qa,
            state: LedgerState::Open,
            last_entry: -1,
            segments: vec![Segment {
                first_entry: 0,
                bookies: candidates,
            }],
            created_ms: meta::now_ms(),
            custom: opts.custom,
        };
        let kv = self
            .meta()
            .create(&meta::ledger_key(id), md.to_json())
            .await?;
        Ok(LedgerWriter::spawn(self.clone(), md, kv.version, -1, false))
    }

    /// The ledger's metadata and its version in the store.
    pub async fn metadata(&self, id: u64) -> Result<(LedgerMetadata, u64)> {
        let kv = self
            .meta()
            .get(&meta::ledger_key(id))
            .await?
            .ok_or(BookieError::NoLedger(id))?;
        Ok((parse_md(&kv.value)?, kv.version))
    }

    /// Ids of every ledger in the store.
    pub async fn list(&self) -> Result<Vec<u64>> {
        Ok(self
            .meta()
            .list_keys(meta::LEDGER_META_PREFIX)
            .await?
            .iter()
            .filter_map(|k| meta::ledger_id_from_key(k))
            .collect())
    }

    /// Opens a ledger for reading without disturbing its writer. For an
    /// open ledger the readable end is the highest LAC its bookies report.
    pub async fn open(&self, id: u64) -> Result<LedgerReader> {
        let (md, _) = self.metadata(id).await?;
        let mut r = LedgerReader {
            client: self.clone(),
            lac: md.last_entry,
            md,
        };
        if r.md.state != LedgerState::Closed {
            r.refresh_lac().await?;
        }
        Ok(r)
    }

    /// Takes over a ledger: fences it, recovers its last entry and closes
    /// it. Every entry the old writer had acknowledged is in the result.
    pub async fn open_and_recover(&self, id: u64) -> Result<LedgerReader> {
        loop {
            let (mut md, version) = self.metadata(id).await?;
            if md.state == LedgerState::Closed {
                return Ok(LedgerReader {
                    client: self.clone(),
                    lac: md.last_entry,
                    md,
                });
            }
            let mut version = version;
            if md.state == LedgerState::Open {
                md.state = LedgerState::InRecovery;
                match self
                    .meta()
                    .compare_and_put(&meta::ledger_key(id), version, md.to_json())
                    .await
                {
                    Ok(kv) => version = kv.version,
                    Err(MetaError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            return self.recover(md, version).await;
        }
    }

    async fn recover(&self, md: LedgerMetadata, version: u64) -> Result<LedgerReader> {
        let id = md.id;
        let seg = md.segments.last().cloned().ok_or(BookieError::Recovery {
            ledger: id,
            reason: "ledger has no ensemble".into(),
        })?;
        // Fence every bookie of the last ensemble.
        let answers = join_all(seg.bookies.iter().map(|&b| async move {
            let mut c = self.pool.client(b).await?;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.fence(proto::LedgerRequest { ledger_id: id }),
            )
            .await
            .map_err(|_| BookieError::Remote {
                bookie: b,
                message: "fence timed out".into(),
            })?
            .map_err(|s| BookieError::Remote {
                bookie: b,
                message: s.message().to_string(),
            })?
            .into_inner();
            match Code::try_from(r.code) {
                Ok(Code::Ok) => Ok(r.lac),
                Ok(code) => Err(BookieError::from_code(code, id, 0, b, &r.message)),
                Err(_) => Err(BookieError::Remote {
                    bookie: b,
                    message: format!("unknown code {}", r.code),
                }),
            }
        }))
        .await;
        let fenced: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        // No write set may still be able to gather Qa acknowledgements from
        // unfenced bookies: each needs Qw - Qa + 1 fenced members.
        let need = md.write_quorum - md.ack_quorum + 1;
        for start in 0..md.ensemble_size {
            let n = md
                .write_set(start as u64)
                .iter()
                .filter(|&&i| fenced[i])
                .count();
            if n < need {
                let errs: Vec<String> = answers
                    .iter()
                    .filter_map(|a| a.as_ref().err().map(|e| e.to_string()))
                    .collect();
                return Err(BookieError::Recovery {
                    ledger: id,
                    reason: format!("too few bookies fenced: {}", errs.join("; ")),
                });
            }
        }
        let max_lac = answers
            .iter()
            .filter_map(|a| a.as_ref().ok().copied())
            .max()
            .unwrap_or(-1)
            .max(seg.first_entry as i64 - 1);
        tracing::info!(
            ledger = id,
            lac = max_lac,
            "ledger fenced; recovering its tail"
        );

        let writer = LedgerWriter::spawn(self.clone(), md.clone(), version, max_lac, true);
        let mut entry = max_lac.saturating_add(1).max(0) as u64;
        // Re-writes are pipelined behind the reads; each must complete
        // before the ledger is closed.
        let mut rewrites = Vec::new();
        while let Some(payload) = self.recovery_read(&md, entry).await? {
            rewrites.push(writer.add_recovery(entry, payload));
            entry += 1;
        }
        for r in join_all(rewrites).await {
            r?;
        }
        let md = writer.close().await?;
        tracing::info!(
            ledger = id,
            last_entry = md.last_entry,
            "ledger recovered and closed"
        );
        Ok(LedgerReader {
            client: self.clone(),
            lac: md.last_entry,
            md,
        })
    }

    /// Reads `entry` from every bookie of its write set. `Some` if any has
    /// it; `None` once enough say they do not that it cannot have been
    /// acknowledged (Qw - Qa + 1 of them).
    async fn recovery_read(&self, md: &LedgerMetadata, entry: u64) -> Result<Option<Bytes>> {
        let seg = md.segment_for(entry);
        let need_missing = md.write_quorum - md.ack_quorum + 1;
        let mut last = String::new();
        for attempt in 0..20 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let bookies: Vec<u64> = md
                .write_set(entry)
                .iter()
                .map(|&i| seg.bookies[i])
                .collect();
            let answers = join_all(
                bookies
                    .iter()
                    .map(|&b| self.read_from(b, md.id, vec![entry])),
            )
            .await;
            let mut missing = 0;
            for a in answers {
                match a {
                    Ok(mut v) => match v.pop() {
                        Some(Ok(e)) => return Ok(Some(e.payload)),
                        Some(Err(BookieError::NoEntry { .. } | BookieError::NoLedger(_))) => {
                            missing += 1
                        }
                        Some(Err(e)) => last = e.to_string(),
                        None => {}
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            if missing >= need_missing {
                return Ok(None);
            }
        }
        Err(BookieError::Recovery {
            ledger: md.id,
            reason: format!("cannot tell whether entry {entry} exists: {last}"),
        })
    }

    /// Reads entries from one bookie; per-entry results, CRC-checked here
    /// as well as on the bookie.
    async fn read_from(
        &self,
        bookie: u64,
        ledger: u64,
        ids: Vec<u64>,
    ) -> Result<Vec<Result<LedgerEntry>>> {
        let mut c = self.pool.client(bookie).await?;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            c.read(proto::ReadRequest {
                ledger_id: ledger,
                entry_ids: ids,
            }),
        )
        .await
        .map_err(|_| BookieError::Remote {
            bookie,
            message: "read timed out".into(),
        })?
        .map_err(|s| {
            if s.code() == tonic::Code::Unavailable {
                self.pool.forget(bookie);
            }
            BookieError::Remote {
                bookie,
                message: s.message().to_string(),
            }
        })?
        .into_inner();
        Ok(resp
            .results
            .into_iter()
            .map(|r| {
                let code = Code::try_from(r.code).unwrap_or(Code::IoError);
                match (code, r.entry) {
                    (Code::Ok, Some(e)) => {
                        if e.entry_id != r.entry_id
                            || meta::entry_crc(ledger, e.entry_id, &e.payload) != e.crc
                        {
                            Err(BookieError::Corrupt {
                                ledger,
                                entry: r.entry_id,
                            })
                        } else {
                            Ok(LedgerEntry {
                                entry_id: e.entry_id,
                                payload: e.payload,
                            })
                        }
                    }
                    (code, _) => Err(BookieError::from_code(
                        code, ledger, r.entry_id, bookie, &r.message,
                    )),
                }
            })
            .collect())
    }

    /// Deletes a ledger: its metadata first (so that every bookie's garbage
    /// collection will drop it), then its entries on each bookie that is up.
    pub async fn delete(&self, id: u64) -> Result<()> {
        let (md, _) = match self.metadata(id).await {
            Ok(m) => m,
            Err(BookieError::NoLedger(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.meta().delete(&meta::ledger_key(id)).await?;
        join_all(md.all_bookies().into_iter().map(|b| async move {
            if let Ok(mut c) = self.pool.client(b).await {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.delete(proto::LedgerRequest { ledger_id: id }),
                )
                .await;
            }
        }))
        .await;
        Ok(())
    }

    /// Writes entries of a closed ledger to `bookie` as recovery adds, as
    /// re-replication does. Completes once the bookie has them durable.
    pub(crate) async fn replicate_to(
        &self,
        bookie: u64,
        ledger: u64,
        entries: Vec<LedgerEntry>,
    ) -> Result<()> {
        let mut c = self.pool.client(bookie).await?;
        let n = entries.len();
        let req = proto::AddRequest {
            entries: entries
                .into_iter()
                .map(|e| proto::Entry {
                    ledger_id: ledger,
                    entry_id: e.entry_id,
                    lac: -1,
                    crc: meta::entry_crc(ledger, e.entry_id, &e.payload),
                    payload: e.payload,
                })
                .collect(),
            recovery: true,
            ledger_id: ledger,
            lac: -1,
        };
        let mut resp = c
            .add(tokio_stream::once(req))
            .await
            .map_err(|s| BookieError::Remote {
                bookie,
                message: s.message().to_string(),
            })?
            .into_inner();
        let mut acked = 0;
        while acked < n {
            let msg = resp
                .message()
                .await
                .map_err(|s| BookieError::Remote {
                    bookie,
                    message: s.message().to_string(),
                })?
                .ok_or_else(|| BookieError::Remote {
                    bookie,
                    message: "add stream ended early".into(),
                })?;
            for r in msg.results {
                let code = Code::try_from(r.code).unwrap_or(Code::IoError);
                if code != Code::Ok {
                    return Err(BookieError::from_code(
                        code, ledger, r.entry_id, bookie, &r.message,
                    ));
                }
                acked += 1;
            }
        }
        Ok(())
    }

    /// Reads entries `ids` of `md` (in that order), each from any bookie of
    /// its write set not in `avoid`, trying the others on failure or a bad
    /// CRC.
    pub(crate) async fn read_entries(
        &self,
        md: &LedgerMetadata,
        ids: &[u64],
        avoid: &[u64],
    ) -> Result<Vec<LedgerEntry>> {
        let mut out: Vec<Option<LedgerEntry>> = vec![None; ids.len()];
        let slot: std::collections::HashMap<u64, usize> =
            ids.iter().enumerate().map(|(i, &e)| (e, i)).collect();
        // First round: each entry from the first bookie of its write set,
        // batched per bookie.
        let mut per_bookie: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        for &e in ids {
            let seg = md.segment_for(e);
            let ws = md.write_set(e);
            let b = ws
                .iter()
                .map(|&i| seg.bookies[i])
                .find(|b| !avoid.contains(b))
                .unwrap_or(seg.bookies[ws[0]]);
            per_bookie.entry(b).or_default().push(e);
        }
        let mut jobs = Vec::new();
        for (b, ids) in per_bookie {
            for chunk in ids.chunks(READ_BATCH) {
                jobs.push((b, chunk.to_vec()));
            }
        }
        let results = join_all(
            jobs.into_iter()
                .map(|(b, ids)| async move { (b, self.read_from(b, md.id, ids).await) }),
        )
        .await;
        for (_, r) in results {
            if let Ok(v) = r {
                for e in v.into_iter().flatten() {
                    if let Some(&i) = slot.get(&e.entry_id) {
                        out[i] = Some(e);
                    }
                }
            }
        }
        // The rest, one by one from the other replicas.
        for (slot, &e) in out.iter_mut().zip(ids) {
            if slot.is_some() {
                continue;
            }
            let seg = md.segment_for(e);
            let mut reasons = Vec::new();
            for &idx in md.write_set(e).iter() {
                let b = seg.bookies[idx];
                if avoid.contains(&b) {
                    continue;
                }
                match self.read_from(b, md.id, vec![e]).await {
                    Ok(mut v) => match v.pop() {
                        Some(Ok(entry)) => {
                            *slot = Some(entry);
                            break;
                        }
                        Some(Err(err)) => reasons.push(format!("bookie {b}: {err}")),
                        None => reasons.push(format!("bookie {b}: no answer")),
                    },
                    Err(err) => reasons.push(err.to_string()),
                }
            }
            if slot.is_none() {
                return Err(BookieError::Unreadable {
                    ledger: md.id,
                    entry: e,
                    reason: reasons.join("; "),
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Reads a ledger, never past its last add confirmed.
#[derive(Debug, Clone)]
pub struct LedgerReader {
    client: LedgerClient,
    md: LedgerMetadata,
    lac: i64,
}

impl LedgerReader {
    pub fn id(&self) -> u64 {
        self.md.id
    }

    pub fn metadata(&self) -> &LedgerMetadata {
        &self.md
    }

    pub fn is_closed(&self) -> bool {
        self.md.state == LedgerState::Closed
    }

    /// The last readable entry; -1 when there is none.
    pub fn last_add_confirmed(&self) -> i64 {
        self.lac
    }

    /// Raises the readable end to `lac`, which the caller knows to be
    /// confirmed: it is the ledger's writer, or learned it from the writer.
    /// Saves a round of LAC reads on every poll of a ledger being written.
    pub fn assume_confirmed(&mut self, lac: i64) {
        self.lac = self.lac.max(lac);
    }

    /// Asks the bookies of an open ledger how far its writer has confirmed.
    pub async fn refresh_lac(&mut self) -> Result<i64> {
        let (md, _) = self.client.metadata(self.md.id).await?;
        self.md = md;
        if self.md.state == LedgerState::Closed {
            self.lac = self.md.last_entry;
            return Ok(self.lac);
        }
        let id = self.md.id;
        let bookies = self.md.all_bookies();
        let pool = self.client.pool.clone();
        let answers = join_all(bookies.into_iter().map(|b| {
            let pool = pool.clone();
            async move {
                let mut c = pool.client(b).await.ok()?;
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.read_lac(proto::LedgerRequest { ledger_id: id }),
                )
                .await
                .ok()?
                .ok()?
                .into_inner();
                (r.code == Code::Ok as i32).then_some(r.lac)
            }
        }))
        .await;
        self.lac = self
            .lac
            .max(answers.into_iter().flatten().max().unwrap_or(-1));
        Ok(self.lac)
    }

    /// Entries `first..=last`.
    pub async fn read(&self, first: u64, last: u64) -> Result<Vec<LedgerEntry>> {
        if last as i64 > self.lac {
            return Err(BookieError::PastLac {
                ledger: self.md.id,
                entry: last,
                lac: self.lac,
            });
        }
        let ids: Vec<u64> = (first..=last).collect();
        self.client.read_entries(&self.md, &ids, &[]).await
    }
}

enum Cmd {
    Add {
        /// Set by recovery, which re-writes entries under their ids.
        entry: Option<u64>,
        payload: Bytes,
        done: oneshot::Sender<Result<u64>>,
    },
    Close(oneshot::Sender<Result<LedgerMetadata>>),
    Acks {
        idx: usize,
        gen: u64,
        results: Vec<proto::AddResult>,
    },
    StreamDown {
        idx: usize,
        gen: u64,
        error: String,
    },
    RetryEnsemble,
    /// Periodic check for bookies that accept adds but never answer.
    Tick,
}

/// Writes one ledger. Cheap to clone; adds from clones are ordered by the
/// moment `add` is called.
#[derive(Clone)]
pub struct LedgerWriter {
    id: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    lac: watch::Receiver<i64>,
}

impl std::fmt::Debug for LedgerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerWriter")
            .field("id", &self.id)
            .finish()
    }
}

impl LedgerWriter {
    fn spawn(
        client: LedgerClient,
        md: LedgerMetadata,
        version: u64,
        lac: i64,
        recovery: bool,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (lac_tx, lac_rx) = watch::channel(lac);
        let e = md.ensemble_size;
        let id = md.id;
        let actor = Writer {
            ensemble: md
                .segments
                .last()
                .map(|s| s.bookies.clone())
                .unwrap_or_default(),
            client,
            md_version: version,
            streams: (0..e).map(|_| None).collect(),
            failed: vec![false; e],
            gen: 0,
            pending: VecDeque::new(),
            next_entry: (lac + 1) as u64,
            lac,
            lac_tx,
            lac_sent: lac,
            error: None,
            closing: Vec::new(),
            recovery,
            retry_scheduled: false,
            tx: tx.downgrade(),
            md,
        };
        let ticker = tx.downgrade();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ADD_TIMEOUT / 4);
            loop {
                every.tick().await;
                match ticker.upgrade() {
                    Some(t) if t.send(Cmd::Tick).is_ok() => {}
                    _ => return,
                }
            }
        });
        tokio::spawn(actor.run(rx));
        Self {
            id,
            tx,
            lac: lac_rx,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Last add confirmed: every entry up to it is acknowledged.
    pub fn last_add_confirmed(&self) -> i64 {
        *self.lac.borrow()
    }

    /// Queues an entry. The returned future resolves to its entry id once
    /// Qa bookies have it durable and every earlier entry has completed.
    pub fn add(&self, payload: Bytes) -> impl Future<Output = Result<u64>> + Send + 'static {
        self.queue(None, payload)
    }

    fn add_recovery(&self, entry: u64, payload: Bytes) -> impl Future<Output = Result<u64>> {
        self.queue(Some(entry), payload)
    }

    fn queue(
        &self,
        entry: Option<u64>,
        payload: Bytes,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Add {
            entry,
            payload,
            done,
        });
        let id = self.id;
        async move {
            sent.map_err(|_| BookieError::LedgerClosed(id))?;
            rx.await.map_err(|_| BookieError::LedgerClosed(id))?
        }
    }

    /// Waits for outstanding adds, then closes the ledger at its LAC.
    pub async fn close(&self) -> Result<LedgerMetadata> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Close(done))
            .map_err(|_| BookieError::LedgerClosed(self.id))?;
        rx.await.map_err(|_| BookieError::LedgerClosed(self.id))?
    }
}

struct Pending {
    entry: u64,
    payload: Bytes,
    crc: u32,
    /// Ensemble positions that have acknowledged, as bits.
    acked: u64,
    done: Option<oneshot::Sender<Result<u64>>>,
    /// When it was (last) sent to its write set.
    sent: tokio::time::Instant,
}

struct AddStream {
    tx: mpsc::UnboundedSender<proto::AddRequest>,
    gen: u64,
    batch: Vec<proto::Entry>,
}

/// Why a metadata update did not happen.
enum Lost {
    /// Another client moved the ledger out of this writer's state.
    Taken(Box<LedgerMetadata>),
    Meta(String),
}

/// Why a writer can take no more adds.
#[derive(Clone)]
enum Stop {
    Fenced,
    Closed,
    Failed(String),
}

struct Writer {
    client: LedgerClient,
    md: LedgerMetadata,
    md_version: u64,
    ensemble: Vec<u64>,
    streams: Vec<Option<AddStream>>,
    /// Positions whose bookie failed and has not been replaced yet.
    failed: Vec<bool>,
    gen: u64,
    pending: VecDeque<Pending>,
    next_entry: u64,
    lac: i64,
    lac_tx: watch::Sender<i64>,
    lac_sent: i64,
    error: Option<Stop>,
    closing: Vec<oneshot::Sender<Result<LedgerMetadata>>>,
    recovery: bool,
    retry_scheduled: bool,
    tx: mpsc::WeakUnboundedSender<Cmd>,
}

impl Writer {
    fn stop_error(&self, stop: &Stop) -> BookieError {
        match stop {
            Stop::Fenced => BookieError::Fenced(self.md.id),
            Stop::Closed => BookieError::LedgerClosed(self.md.id),
            Stop::Failed(m) => BookieError::WriterFailed(m.clone()),
        }
    }

    /// The state the metadata must still be in for this writer to own it.
    fn owned_state(&self) -> LedgerState {
        if self.recovery {
            LedgerState::InRecovery
        } else {
            LedgerState::Open
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd).await;
            // Take whatever else is queued before sending, so that one
            // message per bookie carries many entries.
            for _ in 0..ADD_BATCH * 4 {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd).await,
                    Err(_) => break,
                }
            }
            self.flush_streams();
            self.complete();
            self.send_lac();
            if !self.closing.is_empty() && self.pending.is_empty() && self.error.is_none() {
                self.finish_close().await;
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Add {
                entry,
                payload,
                done,
            } => self.enqueue(entry, payload, done),
            Cmd::Close(done) => match &self.error {
                Some(Stop::Closed) => {
                    let _ = done.send(Ok(self.md.clone()));
                }
                Some(stop) => {
                    let _ = done.send(Err(self.stop_error(stop)));
                }
                None => self.closing.push(done),
            },
            Cmd::Acks { idx, gen, results } => {
                if !self.current(idx, gen) {
                    return;
                }
                for r in results {
                    match Code::try_from(r.code).unwrap_or(Code::IoError) {
                        Code::Ok => self.ack(idx, r.entry_id),
                        Code::Fenced => {
                            self.terminate(Stop::Fenced);
                            return;
                        }
                        code => {
                            tracing::warn!(
                                ledger = self.md.id,
                                bookie = self.ensemble[idx],
                                ?code,
                                message = %r.message,
                                "bookie refused an add"
                            );
                            self.bookie_failed(idx).await;
                            return;
                        }
                    }
                }
            }
            Cmd::StreamDown { idx, gen, error } => {
                if self.current(idx, gen) {
                    tracing::warn!(
                        ledger = self.md.id,
                        bookie = self.ensemble[idx],
                        %error,
                        "lost the add stream to a bookie"
                    );
                    self.bookie_failed(idx).await;
                }
            }
            Cmd::RetryEnsemble => {
                self.retry_scheduled = false;
                self.change_ensemble().await;
            }
            Cmd::Tick => self.check_timeouts().await,
        }
    }

    fn current(&self, idx: usize, gen: u64) -> bool {
        self.streams
            .get(idx)
            .and_then(|s| s.as_ref())
            .is_some_and(|s| s.gen == gen)
    }

    fn enqueue(&mut self, entry: Option<u64>, payload: Bytes, done: oneshot::Sender<Result<u64>>) {
        if let Some(stop) = &self.error {
            let _ = done.send(Err(self.stop_error(stop)));
            return;
        }
        if !self.closing.is_empty() {
            let _ = done.send(Err(BookieError::LedgerClosed(self.md.id)));
            return;
        }
        if entry.is_some_and(|e| e != self.next_entry) {
            let _ = done.send(Err(BookieError::BadRequest(format!(
                "recovery add of entry {entry:?}, expected {}",
                self.next_entry
            ))));
            return;
        }
        let entry = self.next_entry;
        self.next_entry += 1;
        let crc = meta::entry_crc(self.md.id, entry, &payload);
        self.pending.push_back(Pending {
            entry,
            payload,
            crc,
            acked: 0,
            done: Some(done),
            sent: tokio::time::Instant::now(),
        });
        let slot = self.pending.len() - 1;
        for idx in self.md.write_set(entry) {
            self.send(idx, slot);
        }
    }

    /// Queues pending entry `slot` for the bookie at position `idx`.
    fn send(&mut self, idx: usize, slot: usize) {
        if self.failed[idx] {
            return;
        }
        if self.streams[idx].is_none() {
            self.open_stream(idx);
        }
        let p = &self.pending[slot];
        let e = proto::Entry {
            ledger_id: self.md.id,
            entry_id: p.entry,
            lac: self.lac,
            crc: p.crc,
            payload: p.payload.clone(),
        };
        let full = if let Some(s) = self.streams[idx].as_mut() {
            s.batch.push(e);
            s.batch.len() >= ADD_BATCH
        } else {
            false
        };
        if full {
            self.flush_stream(idx);
        }
    }

    fn flush_stream(&mut self, idx: usize) {
        let recovery = self.recovery;
        if let Some(s) = self.streams[idx].as_mut() {
            if !s.batch.is_empty() {
                let entries = std::mem::take(&mut s.batch);
                // A closed channel means the stream task is ending; it
                // reports that itself.
                let _ = s.tx.send(proto::AddRequest {
                    entries,
                    recovery,
                    ledger_id: 0,
                    lac: -1,
                });
            }
        }
    }

    /// Tells the bookies the LAC once the writer is idle, so that readers
    /// see the tail of an idle ledger. While adds flow, each entry carries
    /// the LAC and no extra message is needed.
    fn send_lac(&mut self) {
        if self.lac <= self.lac_sent || self.error.is_some() || !self.pending.is_empty() {
            return;
        }
        self.lac_sent = self.lac;
        for s in self.streams.iter().flatten() {
            let _ = s.tx.send(proto::AddRequest {
                entries: Vec::new(),
                recovery: self.recovery,
                ledger_id: self.md.id,
                lac: self.lac,
            });
        }
    }

    fn flush_streams(&mut self) {
        for idx in 0..self.streams.len() {
            self.flush_stream(idx);
        }
    }

    fn open_stream(&mut self, idx: usize) {
        self.gen += 1;
        let gen = self.gen;
        let bookie = self.ensemble[idx];
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams[idx] = Some(AddStream {
            tx,
            gen,
            batch: Vec::new(),
        });
        let pool = self.client.pool.clone();
        let actor = self.tx.clone();
        tokio::spawn(async move {
            let res: Result<(), String> = async {
                let mut c = pool.client(bookie).await.map_err(|e| e.to_string())?;
                let mut s = c
                    .add(UnboundedReceiverStream::new(rx))
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
                while let Some(msg) = s.next().await {
                    let msg = msg.map_err(|s| s.message().to_string())?;
                    let Some(actor) = actor.upgrade() else {
                        return Ok(());
                    };
                    if actor
                        .send(Cmd::Acks {
                            idx,
                            gen,
                            results: msg.results,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Err("stream ended".to_string())
            }
            .await;
            let error = res.err().unwrap_or_else(|| "closed".into());
            if let Some(actor) = actor.upgrade() {
                let _ = actor.send(Cmd::StreamDown { idx, gen, error });
            }
        });
    }

    fn ack(&mut self, idx: usize, entry: u64) {
        let Some(front) = self.pending.front() else {
            return;
        };
        if entry < front.entry {
            return;
        }
        if let Some(p) = self.pending.get_mut((entry - front.entry) as usize) {
            p.acked |= 1 << idx;
        }
    }

    /// Completes adds in entry order while the oldest has Qa acks.
    fn complete(&mut self) {
        let qa = self.md.ack_quorum as u32;
        let before = self.lac;
        while self
            .pending
            .front()
            .is_some_and(|p| p.acked.count_ones() >= qa)
        {
            let Some(mut p) = self.pending.pop_front() else {
                break;
            };
            self.lac = p.entry as i64;
            if let Some(done) = p.done.take() {
                let _ = done.send(Ok(p.entry));
            }
        }
        if self.lac != before {
            let _ = self.lac_tx.send(self.lac);
        }
    }

    fn terminate(&mut self, stop: Stop) {
        if self.error.is_some() {
            return;
        }
        if matches!(stop, Stop::Fenced) {
            tracing::warn!(ledger = self.md.id, "ledger fenced by another client");
        }
        let pending: Vec<_> = self.pending.drain(..).collect();
        for mut p in pending {
            if let Some(done) = p.done.take() {
                let _ = done.send(Err(self.stop_error(&stop)));
            }
        }
        let closing: Vec<_> = self.closing.drain(..).collect();
        for done in closing {
            let _ = done.send(Err(self.stop_error(&stop)));
        }
        self.streams.iter_mut().for_each(|s| *s = None);
        self.error = Some(stop);
    }

    async fn bookie_failed(&mut self, idx: usize) {
        if self.failed[idx] || self.error.is_some() {
            return;
        }
        self.failed[idx] = true;
        self.streams[idx] = None;
        self.client.pool.forget(self.ensemble[idx]);
        for p in self.pending.iter_mut() {
            p.acked &= !(1 << idx);
        }
        self.change_ensemble().await;
    }

    /// A bookie that has held the oldest pending add unanswered for
    /// `ADD_TIMEOUT` is treated as failed (a hung process or a silent
    /// network keeps the stream open without answering).
    async fn check_timeouts(&mut self) {
        let Some(front) = self.pending.front() else {
            return;
        };
        if front.sent.elapsed() < ADD_TIMEOUT || self.error.is_some() {
            return;
        }
        let entry = front.entry;
        let acked = front.acked;
        for idx in self.md.write_set(entry) {
            if acked & (1 << idx) == 0 && !self.failed[idx] {
                tracing::warn!(
                    ledger = self.md.id,
                    bookie = self.ensemble[idx],
                    entry,
                    "add timed out on a bookie"
                );
                self.bookie_failed(idx).await;
            }
        }
        self.restart_clocks();
    }

    /// Resent entries get a fresh add timeout.
    fn restart_clocks(&mut self) {
        let now = tokio::time::Instant::now();
        for p in self.pending.iter_mut() {
            p.sent = now;
        }
    }

    fn schedule_retry(&mut self) {
        if self.retry_scheduled {
            return;
        }
        self.retry_scheduled = true;
        let actor = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(a) = actor.upgrade() {
                let _ = a.send(Cmd::RetryEnsemble);
            }
        });
    }

    /// Replaces every failed bookie, records the new ensemble from LAC+1 on,
    /// and sends the unacknowledged entries to the replacements.
    async fn change_ensemble(&mut self) {
        if self.error.is_some() {
            return;
        }
        let failed: Vec<usize> = (0..self.failed.len()).filter(|&i| self.failed[i]).collect();
        if failed.is_empty() {
            return;
        }
        let mut candidates = match self.client.pool.writable(&self.ensemble).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(ledger = self.md.id, error = %e, "ensemble change: cannot list bookies");
                self.schedule_retry();
                return;
            }
        };
        if candidates.len() < failed.len() && self.retry_failed_in_place(&failed).await {
            return;
        }
        if candidates.len() < failed.len() {
            // Adds whose other bookies still make Qa go on; the rest wait.
            tracing::warn!(
                ledger = self.md.id,
                needed = failed.len(),
                available = candidates.len(),
                "no spare bookie for an ensemble change yet"
            );
            self.schedule_retry();
            return;
        }
        candidates.shuffle(&mut rand::rng());
        let mut ensemble = self.ensemble.clone();
        for (k, &idx) in failed.iter().enumerate() {
            ensemble[idx] = candidates[k];
        }
        let first = (self.lac + 1) as u64;
        let update = self
            .update_metadata(|md| match md.segments.last_mut() {
                Some(last) if last.first_entry == first => last.bookies = ensemble.clone(),
                _ => md.segments.push(Segment {
                    first_entry: first,
                    bookies: ensemble.clone(),
                }),
            })
            .await;
        match update {
            Ok(()) => {}
            Err(Lost::Taken(_)) => {
                self.terminate(Stop::Fenced);
                return;
            }
            Err(Lost::Meta(e)) => {
                tracing::warn!(error = %e, "ensemble change: metadata update failed");
                self.schedule_retry();
                return;
            }
        }
        tracing::info!(
            ledger = self.md.id,
            from_entry = first,
            old = ?self.ensemble,
            new = ?ensemble,
            "ensemble changed"
        );
        self.ensemble = ensemble;
        self.resend_to(&failed);
    }

    /// Clears the failed mark of ensemble positions `to` and sends them
    /// every unacknowledged add they are in the write set of.
    fn resend_to(&mut self, to: &[usize]) {
        for &idx in to {
            self.failed[idx] = false;
        }
        for slot in 0..self.pending.len() {
            let ws = self.md.write_set(self.pending[slot].entry);
            for &idx in to {
                if ws.contains(&idx) {
                    self.send(idx, slot);
                }
            }
        }
        self.restart_clocks();
    }

    /// With no spare bookie to replace them (one bookie, as in standalone,
    /// or every other one down), failed bookies that are registered and
    /// writable again are given the unacknowledged adds once more, in
    /// place: their silence may have been a stall, and waiting for a spare
    /// that never comes would wedge the ledger. Bookies store a re-sent
    /// entry again, unchanged. True when none is left failed.
    async fn retry_failed_in_place(&mut self, failed: &[usize]) -> bool {
        let Ok(writable) = self.client.pool.writable(&[]).await else {
            return false;
        };
        let back: Vec<usize> = failed
            .iter()
            .copied()
            .filter(|&idx| writable.contains(&self.ensemble[idx]))
            .collect();
        if back.is_empty() {
            return false;
        }
        tracing::warn!(
            ledger = self.md.id,
            bookies = ?back.iter().map(|&i| self.ensemble[i]).collect::<Vec<_>>(),
            "no spare bookie; sending the unacknowledged adds to the same bookies again"
        );
        self.resend_to(&back);
        back.len() == failed.len()
    }

    /// Applies `change` to the ledger's metadata by compare-and-set,
    /// re-reading and re-applying while the ledger is still this writer's.
    async fn update_metadata(&mut self, change: impl Fn(&mut LedgerMetadata)) -> Result<(), Lost> {
        loop {
            let mut md = self.md.clone();
            change(&mut md);
            let key = meta::ledger_key(md.id);
            match self
                .client
                .meta()
                .compare_and_put(&key, self.md_version, md.to_json())
                .await
            {
                Ok(kv) => {
                    self.md = md;
                    self.md_version = kv.version;
                    return Ok(());
                }
                Err(MetaError::Conflict { .. }) => match self.client.metadata(self.md.id).await {
                    Ok((cur, v)) if cur.state == self.owned_state() => {
                        self.md = cur;
                        self.md_version = v;
                    }
                    Ok((cur, _)) => return Err(Lost::Taken(Box::new(cur))),
                    Err(e) => return Err(Lost::Meta(e.to_string())),
                },
                Err(e) => return Err(Lost::Meta(e.to_string())),
            }
        }
    }

    async fn finish_close(&mut self) {
        let lac = self.lac;
        let update = self
            .update_metadata(|md| {
                md.state = LedgerState::Closed;
                md.last_entry = lac;
            })
            .await;
        match update {
            Ok(()) => {}
            // Closed by a recovery that found exactly what was written.
            Err(Lost::Taken(cur)) if cur.state == LedgerState::Closed && cur.last_entry == lac => {
                self.md = *cur;
            }
            Err(Lost::Taken(_)) => {
                self.terminate(Stop::Fenced);
                return;
            }
            Err(Lost::Meta(e)) => {
                self.terminate(Stop::Failed(format!("closing: {e}")));
                return;
            }
        }
        for done in self.closing.drain(..) {
            let _ = done.send(Ok(self.md.clone()));
        }
        self.streams.iter_mut().for_each(|s| *s = None);
        self.error = Some(Stop::Closed);
    }
}
