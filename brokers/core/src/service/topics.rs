//! Topics: loading and creating them (partitioned too), listing,
//! deleting, unloading idle ones, their stats.

use super::*;

impl Broker {
    pub(super) fn ml_key(topic: &TopicName) -> String {
        format!("{ML_PREFIX}{}", topic.path())
    }

    /// Whether the topic exists: stored data for a persistent topic,
    /// partition metadata for a partitioned one.
    pub async fn topic_exists(&self, topic: &TopicName) -> Result<bool> {
        if self.inner.topics.lock().await.contains_key(topic) {
            return Ok(true);
        }
        if self.partitions(topic).await?.is_some() {
            return Ok(true);
        }
        Ok(topic.is_persistent() && self.inner.meta.get(&Self::ml_key(topic)).await?.is_some())
    }

    /// The loaded topic, loading it if this broker owns it.
    pub async fn topic(&self, name: &TopicName, create: bool) -> Result<Arc<Topic>> {
        let cell = {
            let mut topics = self.inner.topics.lock().await;
            topics.entry(name.clone()).or_default().clone()
        };
        let loaded = cell.get_or_try_init(|| self.load_topic(name, create)).await;
        match loaded {
            Ok(t) => {
                t.touch();
                Ok(t.clone())
            }
            Err(e) => {
                let mut topics = self.inner.topics.lock().await;
                if topics.get(name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    topics.remove(name);
                }
                Err(e)
            }
        }
    }

    pub(super) async fn load_topic(&self, name: &TopicName, create: bool) -> Result<Arc<Topic>> {
        if *self.inner.shutdown.borrow() {
            return Err(BrokerError::ShuttingDown);
        }
        let policies = self.policies(name.namespace()).await?;
        self.ensure_owner(name).await?;
        if self.partitions(name).await?.is_some() {
            return Err(BrokerError::InvalidArgument(format!(
                "{name} is a partitioned topic; use its partitions"
            )));
        }
        let log = match name.domain() {
            TopicDomain::Persistent => {
                let exists = self.inner.meta.get(&Self::ml_key(name)).await?.is_some();
                let may_create = create && self.inner.cfg.auto_create_topics;
                if !exists && !may_create {
                    return Err(BrokerError::NotFound(format!("topic {name}")));
                }
                if !exists {
                    self.check_topic_quota(name, &policies).await?;
                }
                let ml = ManagedLedger::open(
                    self.inner.ledgers.clone(),
                    &name.path(),
                    self.inner.cfg.managed_ledger.clone(),
                )
                .await?;
                if !exists {
                    self.inner.topics_created.send_modify(|n| *n += 1);
                }
                PartitionLog::Managed(ml)
            }
            TopicDomain::NonPersistent => PartitionLog::Memory(MemoryLog::new(
                &name.to_string(),
                self.inner.cfg.memory_topic_bytes,
            )),
        };
        let topic = Topic::load(
            name.clone(),
            log,
            self.inner.meta.clone(),
            Some(self.dead_letter_sink(name.namespace().clone())),
            crate::topic::TopicTraffic {
                inbound: self.inner.metrics.inbound(name.namespace()),
                outbound: self.inner.metrics.outbound(name.namespace()),
                write_latency: self.inner.metrics.write_latency(name.namespace()),
            },
        )
        .await?;
        topic.set_policies(&policies);
        // The namespace's offload counters, from 0, before its first
        // offload: a series that appears at its first increment hides that
        // increment from `rate()`.
        let _ = self.inner.metrics.offload(name.namespace());
        Ok(topic)
    }

    pub(super) async fn check_topic_quota(
        &self,
        name: &TopicName,
        policies: &Policies,
    ) -> Result<()> {
        if let Some(max) = policies.max_topics_per_namespace.filter(|&m| m > 0) {
            let n = self.list_topics(name.namespace()).await?.len();
            if n >= max as usize {
                return Err(BrokerError::QuotaExceeded(format!(
                    "namespace {} already has {n} topics (max {max})",
                    name.namespace()
                )));
            }
        }
        Ok(())
    }

    pub(super) fn dead_letter_sink(&self, ns: NamespaceName) -> DeadLetterSink {
        let weak = Arc::downgrade(&self.inner);
        Arc::new(move |topic: String, msg: Message| {
            let weak = weak.clone();
            let ns = ns.clone();
            Box::pin(async move {
                let inner = weak.upgrade().ok_or(BrokerError::ShuttingDown)?;
                let broker = Broker { inner };
                let name = resolve_in(&ns, &topic)?;
                broker.publish(&name, vec![msg]).await.map(drop)
            })
        })
    }

    /// Creates a non-partitioned persistent topic (idempotent for
    /// protocols; the admin API checks existence first).
    pub async fn create_topic(&self, name: &TopicName) -> Result<()> {
        self.topic(name, true).await.map(drop)
    }

    pub async fn partitions(&self, base: &TopicName) -> Result<Option<u32>> {
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        match self.inner.meta.get(&key).await? {
            Some(kv) => Ok(Some(
                parse::<PartitionedMetadata>(&key, &kv.value)?.partitions,
            )),
            None => Ok(None),
        }
    }

    /// Creates a partitioned topic: partition metadata only; partitions are
    /// created on first use, as in Pulsar.
    pub async fn create_partitioned_topic(&self, base: &TopicName, partitions: u32) -> Result<()> {
        if partitions == 0 || partitions > 10_000 {
            return Err(BrokerError::InvalidArgument(
                "partitions must be between 1 and 10000".into(),
            ));
        }
        if base.partition_index().is_some() {
            return Err(BrokerError::InvalidArgument(format!(
                "{base} names a partition"
            )));
        }
        self.policies(base.namespace()).await?;
        if self.inner.meta.get(&Self::ml_key(base)).await?.is_some() {
            return Err(BrokerError::AlreadyExists(format!("topic {base}")));
        }
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        match self
            .inner
            .meta
            .create(&key, json(&PartitionedMetadata { partitions }))
            .await
        {
            Ok(_) => Ok(()),
            Err(MetaError::Conflict { .. }) => Err(BrokerError::AlreadyExists(format!(
                "partitioned topic {base}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises the partition count; Kafka and Pulsar only ever add.
    pub async fn update_partitions(&self, base: &TopicName, partitions: u32) -> Result<()> {
        let key = format!("{PARTITIONED_PREFIX}{}", base.path());
        let kv = self
            .inner
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("partitioned topic {base}")))?;
        let cur: PartitionedMetadata = parse(&key, &kv.value)?;
        if partitions <= cur.partitions {
            return Err(BrokerError::InvalidArgument(format!(
                "partitions can only grow (now {})",
                cur.partitions
            )));
        }
        self.inner
            .meta
            .compare_and_put(&key, kv.version, json(&PartitionedMetadata { partitions }))
            .await?;
        Ok(())
    }

    /// Persistent topics stored in a namespace (partitions included).
    pub async fn list_topics(&self, ns: &NamespaceName) -> Result<Vec<TopicName>> {
        let prefix = format!("{ML_PREFIX}{ns}/persistent/");
        let mut out = Vec::new();
        for key in self.inner.meta.list_keys(&prefix).await? {
            if let Some(path) = key.strip_prefix(ML_PREFIX) {
                out.push(TopicName::from_path(path)?);
            }
        }
        Ok(out)
    }

    pub async fn list_partitioned_topics(&self, ns: &NamespaceName) -> Result<Vec<TopicName>> {
        let prefix = format!("{PARTITIONED_PREFIX}{ns}/persistent/");
        let mut out = Vec::new();
        for key in self.inner.meta.list_keys(&prefix).await? {
            if let Some(path) = key.strip_prefix(PARTITIONED_PREFIX) {
                out.push(TopicName::from_path(path)?);
            }
        }
        Ok(out)
    }

    /// Deletes a topic, or every partition of a partitioned one. A topic
    /// that replicates to other clusters (it has `pulsar.repl.*` cursors)
    /// goes only with `force`, and leaves a tombstone so that the other
    /// clusters' replication does not make it again; their copies stay.
    pub async fn delete_topic(&self, name: &TopicName, force: bool) -> Result<()> {
        let replicated = self.has_replicators(name).await?;
        if replicated && !force {
            return Err(BrokerError::Conflict(format!(
                "topic {name} is replicated to other clusters; delete it with force=true, \
                 which leaves a tombstone so that their replication does not make it again"
            )));
        }
        self.delete_topic_data(name, force).await?;
        if replicated {
            let tombstone = serde_json::json!({ "deletedAtMs": crate::format::now_ms() });
            self.inner
                .meta
                .put(
                    &format!("{GEO_TOMBSTONE_PREFIX}{}", name.base().path()),
                    tombstone.to_string(),
                )
                .await?;
        }
        Ok(())
    }

    /// Whether a replicated topic was deleted here and not created again
    /// explicitly since.
    pub async fn tombstoned(&self, base: &TopicName) -> Result<bool> {
        let key = format!("{GEO_TOMBSTONE_PREFIX}{}", base.base().path());
        Ok(self.inner.meta.get(&key).await?.is_some())
    }

    /// Forgets a deleted topic's tombstone: it is being created
    /// explicitly.
    pub async fn clear_tombstone(&self, base: &TopicName) -> Result<()> {
        if self.tombstoned(base).await? {
            let key = format!("{GEO_TOMBSTONE_PREFIX}{}", base.base().path());
            self.inner.meta.delete(&key).await?;
        }
        Ok(())
    }

    /// Whether any partition of the topic has a replicator's cursor.
    async fn has_replicators(&self, name: &TopicName) -> Result<bool> {
        let parts = match self.partitions(name).await? {
            Some(n) => (0..n).map(|i| name.partition(i)).collect(),
            None => vec![name.clone()],
        };
        for p in parts {
            let prefix = format!(
                "{}{}/{}",
                crate::subscription::CURSOR_PREFIX,
                p.path(),
                crate::topic::REPLICATOR_PREFIX
            );
            if !self.inner.meta.list_keys(&prefix).await?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn delete_topic_data(&self, name: &TopicName, force: bool) -> Result<()> {
        if let Some(n) = self.partitions(name).await? {
            for i in 0..n {
                let p = name.partition(i);
                if self.topic_exists(&p).await? {
                    self.delete_partition(&p, force).await?;
                }
            }
            self.inner
                .meta
                .delete(&format!("{PARTITIONED_PREFIX}{}", name.path()))
                .await?;
        } else {
            self.delete_partition(name, force).await?;
        }
        self.inner
            .meta
            .delete(&Self::topic_policies_key(name))
            .await?;
        Ok(())
    }

    pub(super) async fn delete_partition(&self, name: &TopicName, force: bool) -> Result<()> {
        let topic = self.topic(name, false).await?;
        topic.delete(force).await?;
        self.inner.topics.lock().await.remove(name);
        Ok(())
    }

    /// Closes a loaded topic here (its cursors written, its ledger
    /// closed), so that any broker can load it next.
    pub async fn unload_topic(&self, name: &TopicName) -> Result<()> {
        let cell = self.inner.topics.lock().await.remove(name);
        if let Some(t) = cell.and_then(|c| c.get().cloned()) {
            t.close().await?;
        }
        Ok(())
    }

    /// Unloads non-persistent topics that nobody has used for
    /// `memory_topic_idle` and that have no subscriptions (as Pulsar's
    /// `delete_when_no_subscriptions`): their messages would reach
    /// nobody, and each may hold up to `memory_topic_bytes`.
    pub(super) async fn unload_idle_topics(&self) -> Result<()> {
        let idle = self.inner.cfg.memory_topic_idle;
        if idle.is_zero() {
            return Ok(());
        }
        let candidates: Vec<Arc<Topic>> = self
            .loaded_topics()
            .await
            .into_iter()
            .filter(|t| !t.log().is_persistent() && t.idle_for() >= idle)
            .collect();
        for t in candidates {
            if t.has_subscriptions().await {
                continue;
            }
            // A transient queue keeps its messages for consumers to come,
            // as RabbitMQ's do, until it is deleted.
            let ns = t.name().namespace().clone();
            if self
                .queue_exists(&ns, t.name().base().local_name())
                .await
                .unwrap_or(true)
            {
                continue;
            }
            let name = t.name().clone();
            let unloaded = {
                let mut topics = self.inner.topics.lock().await;
                // Still idle, and held by no one but the table and `t`.
                let still = topics
                    .get(&name)
                    .and_then(|c| c.get())
                    .is_some_and(|held| Arc::ptr_eq(held, &t) && Arc::strong_count(&t) <= 2)
                    && t.idle_for() >= idle;
                still.then(|| topics.remove(&name)).flatten()
            };
            if unloaded.is_some() {
                tracing::debug!("unloading idle non-persistent topic {name}");
                let _ = t.close().await;
            }
        }
        Ok(())
    }

    pub async fn loaded_topics(&self) -> Vec<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .await
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    pub async fn topic_stats(&self, name: &TopicName) -> Result<TopicStats> {
        let mut stats = self.topic(name, false).await?.stats().await?;
        self.add_replication_stats(name, &mut stats);
        Ok(stats)
    }

    /// Changes whenever this broker makes a persistent topic (for
    /// replication, which starts on it at once).
    pub fn topics_created(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.topics_created.subscribe()
    }

    /// Reports replicators' stats in `topics stats` from now on.
    pub fn set_replication_stats(&self, f: super::ReplicationStats) {
        *self
            .inner
            .replication_stats
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Fills `stats.replication` for the topic; the replicators' cursors
    /// are shown there rather than among the subscriptions, as in Pulsar
    /// (internal stats list them with the other cursors).
    pub fn add_replication_stats(&self, name: &TopicName, stats: &mut TopicStats) {
        stats
            .subscriptions
            .retain(|s, _| !s.starts_with(crate::topic::REPLICATOR_PREFIX));
        let f = self
            .inner
            .replication_stats
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            stats.replication = f(name);
        }
    }
}
