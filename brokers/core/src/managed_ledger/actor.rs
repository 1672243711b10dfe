//! A managed ledger's writer: one task that appends batches to the
//! current ledger with several adds in flight, rolls ledgers over, and
//! applies trims, offloads and closes in order with the writes.

use super::*;

struct InFlight {
    base: u64,
    offsets: u64,
    header: BatchHeader,
    data: Bytes,
    reply: oneshot::Sender<Result<u64>>,
}

type AddFuture = BoxFuture<'static, (InFlight, std::result::Result<u64, BookieError>)>;

pub(super) struct Actor {
    inner: Arc<Inner>,
    rx: mpsc::Receiver<Cmd>,
    writer: Option<LedgerWriter>,
    opened_at: Instant,
    /// Next offset to hand out; ahead of the durable end by what is in
    /// flight.
    assigned: u64,
    inflight: FuturesOrdered<AddFuture>,
    /// A rollover waits for the adds in flight, then runs.
    rolling: bool,
    /// An add failed; the rest in flight fail too, then the ledger closes
    /// at its last confirmed entry and writing resumes on a new one.
    failing: bool,
}

impl Actor {
    /// The writer of `inner`, whose next offset is `assigned`, taking
    /// commands from `rx`.
    pub(super) fn new(inner: Arc<Inner>, rx: mpsc::Receiver<Cmd>, assigned: u64) -> Actor {
        Actor {
            inner,
            rx,
            writer: None,
            opened_at: Instant::now(),
            assigned,
            inflight: FuturesOrdered::new(),
            rolling: false,
            failing: false,
        }
    }

    fn state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(lock_err)
    }

    fn failed(&self) -> Option<BrokerError> {
        self.state()
            .failed
            .as_ref()
            .map(|_| BrokerError::TopicUnavailable(self.inner.name.clone()))
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accept = !self.rolling
                && !self.failing
                && self.inflight.len() < self.inner.cfg.max_pending_adds;
            tokio::select! {
                biased;
                Some((f, res)) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.complete(f, res);
                }
                cmd = self.rx.recv(), if accept => match cmd {
                    Some(Cmd::Append { batch, reply }) => self.append(batch, reply).await,
                    Some(Cmd::Trim { keep_from, reply }) => {
                        let r = self.trim(keep_from).await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::DeleteBefore { offset, reply }) => {
                        let r = self.delete_before(offset).await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::SetProperties { props, reply }) => {
                        self.state().properties = props;
                        let r = self.persist().await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::SetGeoIncarnation { source, incarnation, reply }) => {
                        self.state().geo.entry(source).or_default().incarnation = incarnation;
                        let r = self.persist().await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::MarkOffloaded { ledger_id, object, reply }) => {
                        let r = self.mark_offloaded(ledger_id, object).await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::DropBookieCopies { offloaded_before_ms, reply }) => {
                        let r = self.drop_bookie_copies(offloaded_before_ms).await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Close { delete, reply }) => {
                        let r = self.close(delete).await;
                        let _ = reply.send(r);
                        return;
                    }
                    None => {
                        let _ = self.close(false).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    let has_entries = self.current().is_some_and(|l| l.entries > 0);
                    if self.writer.is_some()
                        && has_entries
                        && self.opened_at.elapsed() >= self.inner.cfg.max_ledger_age
                    {
                        self.rolling = true;
                    }
                }
            }
            if self.inflight.is_empty() {
                if self.failing {
                    self.failing = false;
                    if let Err(e) = self.close_current().await {
                        tracing::warn!(ml = %self.inner.name, "closing a failed ledger: {e}");
                    }
                } else if self.rolling {
                    self.rolling = false;
                    if let Err(e) = self.rollover().await {
                        tracing::warn!(ml = %self.inner.name, "rollover: {e}");
                    }
                }
            }
        }
    }

    fn current(&self) -> Option<LedgerInfo> {
        let st = self.inner.state.read().unwrap_or_else(lock_err);
        st.ledgers.last().filter(|l| !l.is_closed()).cloned()
    }

    async fn append(&mut self, batch: Bytes, reply: oneshot::Sender<Result<u64>>) {
        if let Some(e) = self.failed() {
            let _ = reply.send(Err(e));
            return;
        }
        if self.writer.is_none() {
            if let Err(e) = self.start_ledger().await {
                let _ = reply.send(Err(e));
                return;
            }
        }
        let Some(writer) = &self.writer else {
            let _ = reply.send(Err(BrokerError::TopicUnavailable(self.inner.name.clone())));
            return;
        };
        let h = match BatchHeader::parse(&batch) {
            Ok(h) => h,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let base = self.assigned;
        self.assigned += h.offset_count();
        let data = with_base_offset(batch, base);
        let add = writer.add(data.clone());
        let f = InFlight {
            base,
            offsets: h.offset_count(),
            header: h,
            data,
            reply,
        };
        self.inflight
            .push_back(async move { (f, add.await) }.boxed());
    }

    fn complete(&mut self, f: InFlight, res: std::result::Result<u64, BookieError>) {
        let entry_id = match res {
            Ok(id) if !self.failing => id,
            Ok(_) => {
                // Cannot happen with an in-order writer; refusing keeps the
                // offsets of the new ledger contiguous all the same.
                let _ = f
                    .reply
                    .send(Err(BrokerError::TopicUnavailable(self.inner.name.clone())));
                return;
            }
            Err(e) => {
                if matches!(e, BookieError::Fenced(_)) {
                    self.state().failed = Some(format!("fenced: {e}"));
                    self.writer = None;
                    let _ = f.reply.send(Err(BrokerError::NotOwner {
                        topic: self.inner.name.clone(),
                        owner: None,
                    }));
                } else {
                    self.failing = true;
                    let _ = f.reply.send(Err(e.into()));
                }
                return;
            }
        };
        let cfg = &self.inner.cfg;
        let mut roll = false;
        {
            let mut st = self.inner.state.write().unwrap_or_else(lock_err);
            let st = &mut *st;
            // Before the data moves into the cache: markers are read here.
            st.txns.note(&f.header, &f.data, f.base);
            if let Some(cur) = st.ledgers.last_mut() {
                cur.entries += 1;
                cur.offsets = f.base + f.offsets - cur.first_offset;
                cur.size += f.data.len() as u64;
                roll =
                    cur.entries >= cfg.max_entries_per_ledger || cur.size >= cfg.max_ledger_bytes;
                st.indexes.entry(cur.id).or_default().push(f.base);
                st.cache_bytes += f.data.len();
                st.cache.push_back(Entry {
                    ledger_id: cur.id,
                    entry_id,
                    base_offset: f.base,
                    offsets: f.offsets,
                    data: f.data,
                });
                while st.cache_bytes > cfg.cache_bytes && st.cache.len() > 1 {
                    if let Some(old) = st.cache.pop_front() {
                        st.cache_bytes -= old.data.len();
                    }
                }
            }
            st.next_offset = f.base + f.offsets;
            note_batch(&mut st.producers, &mut st.geo, &f.header, f.base);
        }
        self.inner.end_tx.send_replace(f.base + f.offsets);
        let _ = f.reply.send(Ok(f.base));
        if roll {
            self.rolling = true;
        }
    }

    /// Writes the ledger list; losing the compare-and-set means another
    /// broker owns the topic now.
    async fn persist(&mut self) -> Result<()> {
        let (record, version) = {
            let st = self.inner.state.read().unwrap_or_else(lock_err);
            (st.record(), st.version)
        };
        let json = serde_json::to_vec(&record).map_err(|e| corrupt(&self.inner.key, e))?;
        let meta = self.inner.client.pool().meta();
        match meta.compare_and_put(&self.inner.key, version, json).await {
            Ok(kv) => {
                self.state().version = kv.version;
                Ok(())
            }
            Err(MetaError::Conflict { .. }) => {
                self.state().failed = Some("ledger list changed by another broker".into());
                Err(BrokerError::NotOwner {
                    topic: self.inner.name.clone(),
                    owner: None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn start_ledger(&mut self) -> Result<()> {
        let cfg = &self.inner.cfg;
        let mut opts = CreateOptions::new(cfg.ensemble, cfg.write_quorum, cfg.ack_quorum);
        opts.custom
            .insert("managed-ledger".into(), self.inner.name.clone());
        let writer = self.inner.client.create(opts).await?;
        let first_offset = self.assigned;
        self.state().ledgers.push(LedgerInfo {
            id: writer.id(),
            first_offset,
            entries: 0,
            offsets: 0,
            size: 0,
            created_ms: now_ms(),
            closed_ms: 0,
            offload: None,
            bookie_deleted: false,
        });
        if let Err(e) = self.persist().await {
            self.state().ledgers.pop();
            let _ = self.inner.client.delete(writer.id()).await;
            return Err(e);
        }
        self.writer = Some(writer);
        self.opened_at = Instant::now();
        Ok(())
    }

    /// Closes the ledger being written at its last confirmed entry. An
    /// empty one is dropped from the list instead.
    async fn close_current(&mut self) -> Result<()> {
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        if let Err(e) = writer.close().await {
            // The list below still ends this ledger where its confirmed
            // entries end; nothing reads past that.
            tracing::warn!(ml = %self.inner.name, ledger = writer.id(), "close: {e}");
        }
        let empty = {
            let mut st = self.state();
            let next = st.next_offset;
            let empty = st.ledgers.last().is_some_and(|l| l.entries == 0);
            if empty {
                st.ledgers.pop();
            } else if let Some(cur) = st.ledgers.last_mut() {
                cur.closed_ms = now_ms();
            }
            empty.then_some(next)
        };
        self.assigned = self.inner.state.read().unwrap_or_else(lock_err).next_offset;
        self.persist().await?;
        if empty.is_some() {
            let _ = self.inner.client.delete(writer.id()).await;
        }
        Ok(())
    }

    async fn rollover(&mut self) -> Result<()> {
        self.close_current().await?;
        self.start_ledger().await
    }

    async fn mark_offloaded(&mut self, id: u64, object: OffloadedLedger) -> Result<()> {
        {
            let mut st = self.state();
            let Some(l) = st.ledgers.iter_mut().find(|l| l.id == id) else {
                return Err(BrokerError::NotFound(format!(
                    "ledger {id} of {}",
                    self.inner.name
                )));
            };
            if l.offload.is_some() {
                return Err(BrokerError::PreconditionFailed(format!(
                    "ledger {id} is offloaded already"
                )));
            }
            l.offload = Some(object);
        }
        if let Err(e) = self.persist().await {
            if let Some(l) = self.state().ledgers.iter_mut().find(|l| l.id == id) {
                l.offload = None;
            }
            return Err(e);
        }
        Ok(())
    }

    /// The list says "read from the object store" before the bookies'
    /// copy goes, so a crash in between leaves an orphan on the bookies,
    /// never a ledger without data.
    async fn drop_bookie_copies(&mut self, before_ms: u64) -> Result<Vec<u64>> {
        let ids: Vec<u64> = {
            let mut st = self.state();
            st.ledgers
                .iter_mut()
                .filter(|l| {
                    !l.bookie_deleted
                        && l.offload
                            .as_ref()
                            .is_some_and(|o| o.offloaded_ms <= before_ms)
                })
                .map(|l| {
                    l.bookie_deleted = true;
                    l.id
                })
                .collect()
        };
        if ids.is_empty() {
            return Ok(ids);
        }
        if let Err(e) = self.persist().await {
            let mut st = self.state();
            for l in st.ledgers.iter_mut().filter(|l| ids.contains(&l.id)) {
                l.bookie_deleted = false;
            }
            return Err(e);
        }
        for &id in &ids {
            self.forget_ledger(id);
            if let Err(e) = delete_bookie_copy(&self.inner, id).await {
                tracing::warn!(ml = %self.inner.name, ledger = id, "deleting the bookie copy: {e}");
            }
        }
        Ok(ids)
    }

    /// Drops what is cached for reading a ledger from the bookies.
    fn forget_ledger(&self, id: u64) {
        self.state().indexes.remove(&id);
        self.inner
            .readers
            .lock()
            .unwrap_or_else(lock_err)
            .remove(&id);
    }

    async fn delete_before(&mut self, offset: u64) -> Result<u64> {
        let previous = {
            let mut st = self.state();
            if offset > st.next_offset {
                return Err(BrokerError::InvalidArgument(format!(
                    "offset {offset} is past the end {}",
                    st.next_offset
                )));
            }
            if offset <= st.start_offset() {
                return Ok(st.start_offset());
            }
            std::mem::replace(&mut st.low_watermark, offset)
        };
        if let Err(e) = self.persist().await {
            self.state().low_watermark = previous;
            return Err(e);
        }
        self.trim(offset).await?;
        Ok(self.state().start_offset())
    }

    async fn trim(&mut self, keep_from: u64) -> Result<Vec<u64>> {
        let removed: Vec<LedgerInfo> = {
            let mut st = self.state();
            let n = st
                .ledgers
                .iter()
                .take_while(|l| l.is_closed() && l.end_offset() <= keep_from)
                .count();
            st.ledgers.drain(..n).collect()
        };
        if removed.is_empty() {
            return Ok(Vec::new());
        }
        {
            let mut st = self.state();
            let start = st.start_offset();
            st.txns.trim(start);
        }
        if let Err(e) = self.persist().await {
            let mut st = self.state();
            for (i, l) in removed.into_iter().enumerate() {
                st.ledgers.insert(i, l);
            }
            return Err(e);
        }
        let mut ids = Vec::with_capacity(removed.len());
        for l in removed {
            self.forget_ledger(l.id);
            if let Err(e) = delete_ledger_data(&self.inner, &l).await {
                tracing::warn!(ml = %self.inner.name, ledger = l.id, "delete: {e}");
            }
            ids.push(l.id);
        }
        Ok(ids)
    }

    async fn close(&mut self, delete: bool) -> Result<()> {
        while let Some((f, res)) = self.inflight.next().await {
            self.complete(f, res);
        }
        let closed = if self.failed().is_none() {
            self.close_current().await
        } else {
            Ok(())
        };
        self.state().failed = Some("closed".into());
        if !delete {
            return closed;
        }
        let ledgers: Vec<LedgerInfo> = self.state().ledgers.clone();
        for l in &ledgers {
            delete_ledger_data(&self.inner, l).await?;
        }
        self.inner
            .client
            .pool()
            .meta()
            .delete(&self.inner.key)
            .await?;
        Ok(())
    }
}
