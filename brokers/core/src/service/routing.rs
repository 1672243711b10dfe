//! Exchanges, queues and bindings: each namespace's routing table, its
//! changes stored in order, and routing a publish.

use super::*;

impl Broker {
    pub(super) async fn routing(&self, ns: &NamespaceName) -> Result<Arc<Mutex<NamespaceRouting>>> {
        if let Some(r) = self.inner.routing.lock().await.get(ns) {
            return Ok(r.clone());
        }
        self.policies(ns).await?;
        let key = format!("{ROUTING_PREFIX}{ns}");
        let (table, version) = match self.inner.meta.get(&key).await? {
            Some(kv) => (
                RoutingTable::from_snapshot(parse::<RoutingSnapshot>(&key, &kv.value)?)?,
                kv.version,
            ),
            None => (RoutingTable::new(), 0),
        };
        let r = Arc::new(Mutex::new(NamespaceRouting::new(table, version)));
        let mut all = self.inner.routing.lock().await;
        Ok(all.entry(ns.clone()).or_insert(r).clone())
    }

    /// Runs `f` on the namespace's table and waits for the durable part to
    /// be stored. Routing follows the change at once; see
    /// [`Broker::apply_routing`].
    pub(super) async fn modify_routing<T>(
        &self,
        ns: &NamespaceName,
        f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (out, stored) = self.apply_routing(ns, None, f).await?;
        stored.await?;
        Ok(out)
    }

    /// Runs `f` on the namespace's table, so that routes follow it from
    /// now on, and returns with the wait for its durable part to be
    /// stored. Changes are stored in order, many in one compare-and-set;
    /// when another broker's change was stored first, they are replayed on
    /// it, and one that no longer applies, or a store that keeps failing,
    /// undoes the change and fails the wait. A change that touches only
    /// transient queues and exchanges is complete at once.
    ///
    /// `durable`: whether the change touches the stored part, when the
    /// caller can tell (a binding can); then the change costs no copy of
    /// the table, and its size is checked when it is stored.
    pub(super) async fn apply_routing<T>(
        &self,
        ns: &NamespaceName,
        durable: Option<&(dyn Fn(&NamespaceRouting) -> bool + Sync)>,
        mut f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> Result<(T, RoutingStored)> {
        use futures::FutureExt;
        let r = self.routing(ns).await?;
        let mut g = r.lock().await;
        if let Some(durable) = durable {
            let durable = durable(&g);
            let out = f(&mut g)?;
            self.bump_routing_generation();
            if !durable {
                return Ok((out, futures::future::ready(Ok(())).boxed()));
            }
            let stored = self.pend(ns, &r, &mut g, f);
            return Ok((out, stored));
        }
        let before = g.table.clone();
        let before_transient = g.transient.clone();
        let durable_before = durable_snapshot(&g);
        let out = f(&mut g)?;
        // Cached routes go stale from here on.
        self.bump_routing_generation();
        let durable = durable_snapshot(&g);
        if durable == durable_before {
            return Ok((out, futures::future::ready(Ok(())).boxed()));
        }
        let size = json(&durable).len();
        if size > magnetar_metadata::MAX_VALUE_BYTES {
            // The table is one metadata value: refusing what would not
            // fit keeps the namespace's routing as it was, so that
            // deletes and unbinds still work.
            g.table = before;
            g.transient = before_transient;
            return Err(BrokerError::QuotaExceeded(format!(
                "routing table of namespace {ns} would take {size} bytes (max {}); \
                 delete or unbind first",
                magnetar_metadata::MAX_VALUE_BYTES
            )));
        }
        let stored = self.pend(ns, &r, &mut g, f);
        Ok((out, stored))
    }

    /// Queues an applied change to be stored; the wait for it.
    pub(super) fn pend<T>(
        &self,
        ns: &NamespaceName,
        r: &Arc<Mutex<NamespaceRouting>>,
        g: &mut NamespaceRouting,
        mut f: impl FnMut(&mut NamespaceRouting) -> Result<T> + Send + 'static,
    ) -> RoutingStored {
        use futures::FutureExt;
        let (done, stored) = tokio::sync::oneshot::channel();
        let seq = g.next_seq;
        g.next_seq += 1;
        g.pending.push_back(PendingChange {
            seq,
            op: Box::new(move |r| f(r).map(drop)),
            done,
        });
        if !g.flushing {
            g.flushing = true;
            tokio::spawn(self.clone().store_routing(ns.clone(), Arc::clone(r)));
        }
        async move {
            stored
                .await
                .unwrap_or_else(|_| Err(BrokerError::ShuttingDown))
        }
        .boxed()
    }

    pub(super) fn bump_routing_generation(&self) {
        self.inner
            .routing_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Stores a namespace's pending routing changes until none is left,
    /// each write carrying all that are pending; the namespace's lock is
    /// not held while a write is in flight, so routes and new changes go
    /// on meanwhile.
    pub(super) async fn store_routing(self, ns: NamespaceName, r: Arc<Mutex<NamespaceRouting>>) {
        let key = format!("{ROUTING_PREFIX}{ns}");
        let mut conflicts = 0;
        loop {
            let (snapshot, bytes, upto, version) = {
                let mut g = r.lock().await;
                let Some(upto) = g.pending.back().map(|p| p.seq) else {
                    g.flushing = false;
                    return;
                };
                let snapshot = durable_snapshot(&g);
                let bytes = json(&snapshot);
                if bytes.len() > magnetar_metadata::MAX_VALUE_BYTES {
                    // The table is one metadata value: refusing what would
                    // not fit keeps the namespace's routing as it was, so
                    // that deletes and unbinds still work.
                    let why = format!(
                        "routing table of namespace {ns} would take {} bytes (max {}); \
                         delete or unbind first",
                        bytes.len(),
                        magnetar_metadata::MAX_VALUE_BYTES
                    );
                    for p in g.roll_back() {
                        p.fail(BrokerError::QuotaExceeded(why.clone()));
                    }
                    self.bump_routing_generation();
                    continue;
                }
                g.inflight = true;
                (snapshot, bytes, upto, g.version)
            };
            let result = self.inner.meta.compare_and_put(&key, version, bytes).await;
            let mut g = r.lock().await;
            g.inflight = false;
            let deferred = g.deferred.take();
            match result {
                Ok(kv) => {
                    conflicts = 0;
                    g.version = kv.version;
                    g.base = snapshot;
                    while g.pending.front().is_some_and(|p| p.seq <= upto) {
                        if let Some(p) = g.pending.pop_front() {
                            let _ = p.done.send(Ok(()));
                        }
                    }
                    // Another broker's change stored after this one.
                    if let Some((table, v)) = deferred.filter(|(_, v)| *v > g.version) {
                        let failed = g.adopt(table, v);
                        self.bump_routing_generation();
                        tell_failed(failed);
                    }
                }
                Err(MetaError::Conflict { current, .. }) if conflicts < 16 => {
                    conflicts += 1;
                    let stored = match current {
                        Some(kv) => parse(&key, &kv.value)
                            .and_then(RoutingTable::from_snapshot)
                            .map(|t| (t, kv.version)),
                        None => Ok((RoutingTable::new(), 0)),
                    };
                    match stored {
                        Ok((table, v)) => {
                            let failed = g.adopt(table, v);
                            self.bump_routing_generation();
                            tell_failed(failed);
                        }
                        Err(e) => {
                            let why = e.to_string();
                            for p in g.roll_back() {
                                p.fail(BrokerError::TopicUnavailable(why.clone()));
                            }
                            self.bump_routing_generation();
                        }
                    }
                }
                Err(e) => {
                    let why = match e {
                        MetaError::Conflict { .. } => format!("routing of {ns} keeps changing"),
                        e => format!("routing of {ns} not stored: {e}"),
                    };
                    for p in g.roll_back() {
                        p.fail(BrokerError::TopicUnavailable(why.clone()));
                    }
                    self.bump_routing_generation();
                }
            }
        }
    }

    pub async fn declare_exchange(
        &self,
        ns: &NamespaceName,
        def: ExchangeDef,
        passive: bool,
    ) -> Result<()> {
        if passive {
            let r = self.routing(ns).await?;
            return r.lock().await.table.declare_exchange(def, true).map(drop);
        }
        self.modify_routing(ns, move |r| r.table.declare_exchange(def.clone(), false))
            .await
            .map(drop)
    }

    pub async fn delete_exchange(
        &self,
        ns: &NamespaceName,
        name: &str,
        if_unused: bool,
    ) -> Result<()> {
        let name = name.to_owned();
        self.modify_routing(ns, move |r| r.table.delete_exchange(&name, if_unused))
            .await
            .map(drop)
    }

    /// Declares a queue: a topic named after it in the namespace. A
    /// durable queue is a persistent topic; a transient one is
    /// non-persistent and known to this broker only.
    pub async fn declare_queue(
        &self,
        ns: &NamespaceName,
        name: &str,
        durable: bool,
    ) -> Result<TopicName> {
        let topic = self.queue_topic(ns, name, durable)?;
        if durable {
            self.create_topic(&topic).await?;
        }
        let owned = name.to_owned();
        self.modify_routing(ns, move |r| {
            r.table.declare_queue(&owned)?;
            if !durable {
                r.transient.insert(owned.clone());
            }
            Ok(())
        })
        .await?;
        Ok(topic)
    }

    /// The topic behind a queue name.
    pub fn queue_topic(&self, ns: &NamespaceName, name: &str, durable: bool) -> Result<TopicName> {
        let domain = if durable {
            TopicDomain::Persistent
        } else {
            TopicDomain::NonPersistent
        };
        Ok(ns.topic(domain, name)?)
    }

    pub async fn queue_exists(&self, ns: &NamespaceName, name: &str) -> Result<bool> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.table.has_queue(name))
    }

    /// Deletes a queue, its bindings and its topic.
    pub async fn delete_queue(&self, ns: &NamespaceName, name: &str) -> Result<()> {
        let durable = {
            let r = self.routing(ns).await?;
            let g = r.lock().await;
            !g.transient.contains(name)
        };
        let owned = name.to_owned();
        self.modify_routing(ns, move |r| {
            r.transient.remove(&owned);
            Ok(r.table.delete_queue(&owned))
        })
        .await?;
        let topic = self.queue_topic(ns, name, durable)?;
        match self.delete_topic(&topic, true).await {
            Ok(()) | Err(BrokerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn bind(&self, ns: &NamespaceName, binding: Binding) -> Result<()> {
        self.bind_now(ns, binding).await?.await
    }

    pub async fn unbind(&self, ns: &NamespaceName, binding: &Binding) -> Result<()> {
        self.unbind_now(ns, binding.clone()).await?.await
    }

    /// Binds at once: routes follow the binding when this returns, and the
    /// returned wait ends when it is stored (a failure there undoes it).
    /// A front end may answer its client before that, as long as it drops
    /// the client if the wait fails.
    pub async fn bind_now(&self, ns: &NamespaceName, binding: Binding) -> Result<RoutingStored> {
        let b = binding.clone();
        let durable = move |g: &NamespaceRouting| binding_is_durable(g, &b);
        let (_, stored) = self
            .apply_routing(ns, Some(&durable), move |r| r.table.bind(binding.clone()))
            .await?;
        Ok(stored)
    }

    /// Unbinds at once; see [`Broker::bind_now`].
    pub async fn unbind_now(&self, ns: &NamespaceName, binding: Binding) -> Result<RoutingStored> {
        let b = binding.clone();
        let durable = move |g: &NamespaceRouting| binding_is_durable(g, &b);
        let (_, stored) = self
            .apply_routing(ns, Some(&durable), move |r| r.table.unbind(&binding))
            .await?;
        Ok(stored)
    }

    pub async fn routing_snapshot(&self, ns: &NamespaceName) -> Result<RoutingSnapshot> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.table.to_snapshot())
    }

    /// The queues a message would reach through `exchange`, with their
    /// topics, without publishing: for front ends that apply per-queue
    /// rules (length limits, confirms) before they append. In a namespace
    /// replicated to other clusters, what enters a durable exchange is
    /// also kept for them (RabbitMQ's exchange federation): the list then
    /// ends with the exchange's capture topic, under its own name. The
    /// other clusters route it through their own exchange of that name;
    /// queues stay regional.
    pub async fn route(
        &self,
        ns: &NamespaceName,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<Vec<(String, TopicName)>> {
        let (mut out, durable) = self.route_here(ns, exchange, routing_key, headers).await?;
        if durable && !exchange.is_empty() && self.replicates(ns).await? {
            let name = format!("{GEO_EXCHANGE_PREFIX}{exchange}");
            if let Ok(t) = ns.topic(TopicDomain::Persistent, &name) {
                out.push((name, t));
            }
        }
        Ok(out)
    }

    /// As [`Self::route`], this region's queues only (what replication
    /// routes in must not be captured again), and whether the exchange
    /// is durable.
    pub async fn route_here(
        &self,
        ns: &NamespaceName,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<(Vec<(String, TopicName)>, bool)> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        let routed = g.table.route(exchange, routing_key, headers)?;
        let durable = g.table.exchange(exchange).is_some_and(|x| x.durable);
        let out = routed
            .queues
            .into_iter()
            .map(|q| {
                let t = self.queue_topic(ns, &q, !g.transient.contains(&q))?;
                Ok((q, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((out, durable))
    }

    /// Whether the namespace replicates to another cluster.
    pub async fn replicates(&self, ns: &NamespaceName) -> Result<bool> {
        let clusters = self.policies(ns).await?.replication_clusters;
        Ok(clusters.len() > 1 && clusters.contains(&self.inner.cfg.cluster))
    }

    /// Makes front ends route afresh (a namespace's replication changed).
    pub fn invalidate_routes(&self) {
        self.inner
            .routing_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever routing changes on this broker; a route computed
    /// under one value holds while the value stays the same.
    pub fn routing_generation(&self) -> u64 {
        self.inner
            .routing_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a queue was declared non-durable (held in memory).
    pub async fn queue_is_transient(&self, ns: &NamespaceName, name: &str) -> Result<bool> {
        let r = self.routing(ns).await?;
        let g = r.lock().await;
        Ok(g.transient.contains(name))
    }

    /// Routes a message through an exchange and publishes it to every
    /// queue it reaches. Returns the queues; empty means unroutable.
    pub async fn route_publish(
        &self,
        ns: &NamespaceName,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
        message: Message,
    ) -> Result<Routed> {
        // The queues' topics are named under the lock; the message is
        // encoded once and the same batch appended to each.
        let (routed, topics) = {
            let r = self.routing(ns).await?;
            let g = r.lock().await;
            let routed = g.table.route(exchange, routing_key, headers)?;
            let topics = routed
                .queues
                .iter()
                .map(|q| self.queue_topic(ns, q, !g.transient.contains(q)))
                .collect::<Result<Vec<_>>>()?;
            (routed, topics)
        };
        if topics.is_empty() {
            return Ok(routed);
        }
        let batch = crate::format::encode_messages(std::slice::from_ref(&message))?;
        let publishes = topics.iter().map(|t| self.publish_batch(t, batch.clone()));
        for r in futures::future::join_all(publishes).await {
            r?;
        }
        Ok(routed)
    }
}
