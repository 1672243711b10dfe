//! Work on stored data: retention and TTL passes, retention holds,
//! offloading to object storage, and listener admission.

use super::*;

impl Broker {
    /// Expires messages past the namespace's message TTL, then runs
    /// retention, over every loaded persistent topic now. A topic that
    /// fails does not stop the pass: it is reported, and the rest are
    /// trimmed. A namespace whose retention holds cannot be read keeps
    /// all its data this pass, since what its consumers need is unknown.
    pub async fn run_retention(&self) -> RetentionRun {
        let mut run = RetentionRun::default();
        let mut by_ns: BTreeMap<NamespaceName, Vec<Arc<Topic>>> = BTreeMap::new();
        for t in self.loaded_topics().await {
            if t.log().is_persistent() {
                by_ns
                    .entry(t.name().namespace().clone())
                    .or_default()
                    .push(t);
            }
        }
        let holders: Vec<Arc<dyn RetentionHold>> = self
            .inner
            .retention_holds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (ns, topics) in by_ns {
            let mut holds: Option<HashMap<TopicName, u64>> = Some(HashMap::new());
            for h in &holders {
                match h.holds(&ns).await {
                    Ok(more) => {
                        if let Some(all) = holds.as_mut() {
                            for (t, o) in more {
                                let e = all.entry(t).or_insert(o);
                                *e = (*e).min(o);
                            }
                        }
                    }
                    Err(e) => {
                        holds = None;
                        for t in &topics {
                            run.failed.push((t.name().clone(), e.to_string()));
                        }
                        break;
                    }
                }
            }
            let Some(holds) = holds else {
                continue;
            };
            for t in topics {
                let hold = holds.get(t.name()).copied();
                match self.retain(&t, hold).await {
                    Ok(ids) => run.deleted.extend(ids),
                    Err(e) => run.failed.push((t.name().clone(), e.to_string())),
                }
            }
        }
        run
    }

    pub(super) async fn retain(&self, t: &Topic, hold: Option<u64>) -> Result<Vec<u64>> {
        let policies = self.effective_policies(t.name()).await?;
        t.set_policies(&policies);
        if let Some(ttl) = policies.message_ttl_in_seconds.filter(|&s| s > 0) {
            t.expire_messages(Duration::from_secs(u64::from(ttl)))
                .await?;
        }
        t.evict_backlog().await?;
        t.apply_retention(&policies, self.inner.cfg.retention, hold)
            .await
    }

    /// Admission for a new client listener of `protocol`, under this
    /// broker's listener limits.
    pub fn admission(&self, protocol: &'static str) -> Arc<crate::listener::Admission> {
        let a = crate::listener::Admission::new(protocol, self.inner.cfg.listener_limits.clone());
        self.inner.metrics.watch_admission(&a);
        a
    }

    /// The broker's metrics: what protocols and the process add their
    /// collectors to.
    pub fn metrics(&self) -> &Arc<crate::metrics::BrokerMetrics> {
        &self.inner.metrics
    }

    /// Whether enough bookies are writable for a new ledger's ensemble:
    /// without them, persistent writes fail once the open ledgers roll.
    pub async fn bookies_writable(&self) -> bool {
        match self.inner.ledgers.pool().writable(&[]).await {
            Ok(w) => w.len() >= self.inner.cfg.managed_ledger.ensemble,
            Err(_) => false,
        }
    }

    /// The topic if this broker has it loaded now; never loads it.
    pub async fn loaded_topic(&self, name: &TopicName) -> Option<Arc<Topic>> {
        self.inner
            .topics
            .lock()
            .await
            .get(name)
            .and_then(|c| c.get().cloned())
    }

    /// A scrape of this broker's metrics: the counters, and the gauges of
    /// the topics loaded now, summed per namespace.
    pub async fn scrape_metrics(
        &self,
        openmetrics: bool,
    ) -> std::result::Result<magnetar_metrics::Exposition, magnetar_metrics::MetricsError> {
        let mut topics: Vec<Arc<Topic>> = self
            .inner
            .topics
            .lock()
            .await
            .values()
            .filter_map(|c| c.get().cloned())
            .collect();
        // The first topics by name get rows of their own, so that a
        // scrape's series stay the same from one scrape to the next.
        topics.sort_by(|a, b| a.name().cmp(b.name()));
        let mut live = std::collections::BTreeMap::<
            crate::metrics::GaugeKey,
            crate::metrics::NamespaceGauges,
        >::new();
        for (i, t) in topics.into_iter().enumerate() {
            let g = t.gauges().await;
            let topic = (i < self.inner.cfg.metrics_topics).then(|| t.name().to_string());
            let e = live
                .entry((t.name().namespace().clone(), topic))
                .or_default();
            *e = e.plus(&g);
        }
        let mut sourced = Vec::new();
        for s in self.inner.metrics.sources() {
            sourced.push(s.scrape(self.inner.metrics.cluster()).await);
        }
        self.inner.metrics.render(&live, &sourced, openmetrics)
    }

    /// Adds a consumer of topic data whose positions live outside the
    /// topics' subscriptions (Kafka groups): retention keeps what it still
    /// needs.
    pub fn add_retention_hold(&self, hold: Arc<dyn RetentionHold>) {
        self.inner
            .retention_holds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hold);
    }

    /// The managed ledger of a persistent topic this broker owns.
    pub(super) async fn managed(&self, name: &TopicName) -> Result<ManagedLedger> {
        match self.topic(name, false).await?.log() {
            PartitionLog::Managed(ml) => Ok(ml.clone()),
            PartitionLog::Memory(_) => Err(BrokerError::InvalidArgument(format!(
                "{name} is not persistent; only persistent topics are offloaded"
            ))),
        }
    }

    /// Offloads every closed ledger of the topic now, in the background
    /// (Pulsar's `PUT …/offload`); its progress is [`Self::offload_status`].
    pub async fn trigger_offload(&self, name: &TopicName) -> Result<()> {
        if self.inner.cfg.managed_ledger.tier.is_none() {
            return Err(BrokerError::PreconditionFailed(
                "no offload store is configured".into(),
            ));
        }
        let ml = self.managed(name).await?;
        if ml.offload_status().status == OffloadState::Running {
            return Err(BrokerError::AlreadyExists(format!(
                "an offload of {name} is running"
            )));
        }
        let ids = offload_candidates(&ml.ledgers(), Some(0), None);
        let attempts = self.inner.cfg.offload.attempts;
        let counted = self.inner.metrics.offload(name.namespace());
        tokio::spawn(async move {
            let _ = ml.offload(&ids, attempts, &counted).await;
        });
        Ok(())
    }

    pub async fn offload_status(&self, name: &TopicName) -> Result<OffloadStatus> {
        Ok(self.managed(name).await?.offload_status())
    }

    /// Runs the offload policy over every loaded persistent topic now:
    /// offloads what the namespace's thresholds ask for, then deletes the
    /// bookie copies of ledgers offloaded longer than the deletion lag.
    pub async fn run_offload(&self) -> Result<()> {
        let defaults = self.inner.cfg.offload.clone();
        let tier = self.inner.cfg.managed_ledger.tier.is_some();
        for t in self.loaded_topics().await {
            let PartitionLog::Managed(ml) = t.log() else {
                continue;
            };
            let p = self.policies(t.name().namespace()).await?;
            let now = magnetar_bookies::meta::now_ms();
            let bytes = p.offload_threshold.unwrap_or(defaults.threshold_bytes);
            let secs = p
                .offload_threshold_in_seconds
                .unwrap_or(defaults.threshold_seconds);
            let ids = offload_candidates(
                &ml.ledgers(),
                u64::try_from(bytes).ok(),
                u64::try_from(secs)
                    .ok()
                    .map(|s| now.saturating_sub(s.saturating_mul(1000))),
            );
            if tier && !ids.is_empty() {
                let counted = self.inner.metrics.offload(t.name().namespace());
                if let Err(e) = ml.offload(&ids, defaults.attempts, &counted).await {
                    tracing::warn!(topic = %t.name(), "offload: {e}");
                }
            }
            let lag = p
                .offload_deletion_lag_ms
                .unwrap_or(defaults.deletion_lag.as_millis() as u64);
            if let Err(e) = ml.drop_bookie_copies(now.saturating_sub(lag)).await {
                tracing::warn!(topic = %t.name(), "deleting offloaded ledgers from the bookies: {e}");
            }
        }
        Ok(())
    }
}
