//! Which broker owns a topic: lookups through the namespace's bundle
//! owners, topic policies and routes, partitions.

use super::*;

impl Broker {
    pub(super) async fn policies(&self, ns: &NamespaceName) -> Result<Policies> {
        match self.inner.tenancy.get_policies(ns).await {
            Ok(p) => Ok(p),
            Err(magnetar_tenancy::TenancyError::NotFound(_)) => {
                Err(BrokerError::NotFound(format!("namespace {ns}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn owner_key(topic: &TopicName, policies: &Policies) -> String {
        format!(
            "{OWNER_PREFIX}{}/{}",
            topic.namespace(),
            bundle_of(topic, policies.bundles.num_bundles)
        )
    }

    /// The broker owning `topic`'s bundle, taking the bundle if nobody
    /// holds it.
    pub async fn lookup(&self, topic: &TopicName) -> Result<BrokerInfo> {
        let policies = self.policies(topic.namespace()).await?;
        let key = Self::owner_key(topic, &policies);
        loop {
            if let Some(kv) = self.inner.meta.get(&key).await? {
                return parse(&key, &kv.value);
            }
            let session = self.inner.session.read().await;
            match session.create(&key, json(&self.inner.cfg.info)).await {
                Ok(_) => return Ok(self.inner.cfg.info.clone()),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) fn topic_policies_key(topic: &TopicName) -> String {
        format!("{TOPIC_POLICIES_PREFIX}{}", topic.base().path())
    }

    /// The topic's own policies (for a partition: its topic's).
    pub async fn topic_policies(&self, topic: &TopicName) -> Result<TopicPolicies> {
        let key = Self::topic_policies_key(topic);
        match self.inner.meta.get(&key).await? {
            Some(kv) => parse(&key, &kv.value),
            None => Ok(TopicPolicies::default()),
        }
    }

    /// The clusters the topic replicates to: its own policy, else its
    /// namespace's.
    pub async fn replication_clusters(
        &self,
        topic: &TopicName,
    ) -> Result<std::collections::BTreeSet<String>> {
        if let Some(c) = self.topic_policies(topic).await?.replication_clusters {
            return Ok(c);
        }
        Ok(self
            .inner
            .tenancy
            .get_policies(topic.namespace())
            .await?
            .replication_clusters)
    }

    /// Changes one of the topic's own policies with compare-and-set, so
    /// that concurrent changes of different policies (a route, retention,
    /// replication) all land. Nothing left set removes the record, and the
    /// namespace's policies apply again; retention picks a change up at
    /// its next run.
    pub async fn modify_topic_policies(
        &self,
        topic: &TopicName,
        f: impl Fn(&mut TopicPolicies),
    ) -> Result<()> {
        let key = Self::topic_policies_key(topic);
        for _ in 0..16 {
            let (mut p, version) = match self.inner.meta.get(&key).await? {
                Some(kv) => (parse::<TopicPolicies>(&key, &kv.value)?, Some(kv.version)),
                None => (TopicPolicies::default(), None),
            };
            f(&mut p);
            let done = match (version, p == TopicPolicies::default()) {
                (None, true) => return Ok(()),
                (None, false) => self.inner.meta.create(&key, json(&p)).await.map(drop),
                (Some(v), true) => self.inner.meta.compare_and_delete(&key, v).await.map(drop),
                (Some(v), false) => self
                    .inner
                    .meta
                    .compare_and_put(&key, v, json(&p))
                    .await
                    .map(drop),
            };
            match done {
                Ok(()) => return Ok(()),
                Err(magnetar_metadata::MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(magnetar_tenancy::TenancyError::Conflict(format!("the policies of {topic}")).into())
    }

    /// Where the topic's records are routed, if anywhere.
    pub async fn topic_route(&self, topic: &TopicName) -> Result<Option<TopicRoute>> {
        Ok(self.topic_policies(topic).await?.route)
    }

    /// Routes the topic's records (every partition's) through an exchange
    /// of its namespace from now on, or stops routing them. Partitions
    /// owned here start at once: what is written after this returns is
    /// routed. The owners of the others pick the route up within
    /// [`ROUTE_RESCAN`].
    pub async fn set_topic_route(
        &self,
        topic: &TopicName,
        route: Option<TopicRoute>,
    ) -> Result<()> {
        let topic = topic.base();
        if let Some(r) = &route {
            if !topic.is_persistent() {
                return Err(BrokerError::InvalidArgument(format!(
                    "{topic} is not persistent; only persistent topics can be routed"
                )));
            }
            if !self.topic_exists(&topic).await? {
                return Err(BrokerError::NotFound(format!("topic {topic} not found")));
            }
            let routing = self.routing(topic.namespace()).await?;
            if !routing.lock().await.table.has_exchange(&r.exchange) {
                return Err(BrokerError::NotFound(format!(
                    "no exchange {:?} in {}",
                    r.exchange,
                    topic.namespace()
                )));
            }
            for t in self.partitions_of(&topic).await? {
                if self.lookup(&t).await?.id == self.inner.cfg.info.id {
                    self.topic(&t, true)
                        .await?
                        .get_or_create_subscription(
                            ROUTE_SUBSCRIPTION,
                            crate::topic_route::subscription_options(
                                crate::subscription::InitialPosition::Latest,
                            ),
                        )
                        .await?;
                }
            }
        }
        self.modify_topic_policies(&topic, |p| p.route = route.clone())
            .await
    }

    /// A topic's partitions, or the topic itself when it has none.
    pub(super) async fn partitions_of(&self, topic: &TopicName) -> Result<Vec<TopicName>> {
        Ok(match self.partitions(topic).await? {
            Some(n) => (0..n).map(|i| topic.partition(i)).collect(),
            None => vec![topic.clone()],
        })
    }

    /// The topics whose own policy replicates to `cluster`.
    pub async fn topics_replicating_to(&self, cluster: &str) -> Result<Vec<TopicName>> {
        Ok(self
            .topic_replication_overrides()
            .await?
            .into_iter()
            .filter(|(_, c)| c.contains(cluster))
            .map(|(t, _)| t)
            .collect())
    }

    /// Every topic whose own policy sets its replication clusters, with
    /// them (one metadata listing, for the replicators' rescans).
    pub async fn topic_replication_overrides(
        &self,
    ) -> Result<HashMap<TopicName, std::collections::BTreeSet<String>>> {
        let mut out = HashMap::new();
        for kv in self.inner.meta.list(TOPIC_POLICIES_PREFIX).await? {
            let Some(path) = kv.key.strip_prefix(TOPIC_POLICIES_PREFIX) else {
                continue;
            };
            let (Ok(topic), Ok(p)) = (
                TopicName::from_path(path),
                parse::<TopicPolicies>(&kv.key, &kv.value),
            ) else {
                continue;
            };
            if let Some(c) = p.replication_clusters {
                out.insert(topic, c);
            }
        }
        Ok(out)
    }

    /// Every routed partition, and those of them this broker owns.
    pub(super) async fn routed_partitions(
        &self,
    ) -> Result<(HashSet<TopicName>, HashMap<TopicName, TopicRoute>)> {
        let mut all = HashSet::new();
        let mut mine = HashMap::new();
        for kv in self.inner.meta.list(TOPIC_POLICIES_PREFIX).await? {
            let Some(path) = kv.key.strip_prefix(TOPIC_POLICIES_PREFIX) else {
                continue;
            };
            let Ok(topic) = TopicName::from_path(path) else {
                continue;
            };
            let Ok(TopicPolicies {
                route: Some(route), ..
            }) = parse::<TopicPolicies>(&kv.key, &kv.value)
            else {
                continue;
            };
            for t in self.partitions_of(&topic).await? {
                all.insert(t.clone());
                match self.lookup(&t).await {
                    Ok(owner) if owner.id == self.inner.cfg.info.id => {
                        mine.insert(t, route.clone());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(topic = %t, "route owner: {e}"),
                }
            }
        }
        Ok((all, mine))
    }

    /// The namespace's policies with the topic's own laid over them.
    pub(super) async fn effective_policies(&self, topic: &TopicName) -> Result<Policies> {
        let mut p = self.policies(topic.namespace()).await?;
        let own = self.topic_policies(topic).await?;
        if own.retention_policies.is_some() {
            p.retention_policies = own.retention_policies;
        }
        Ok(p)
    }

    pub(super) async fn ensure_owner(&self, topic: &TopicName) -> Result<()> {
        let owner = self.lookup(topic).await?;
        if owner.id == self.inner.cfg.info.id {
            Ok(())
        } else {
            Err(BrokerError::NotOwner {
                topic: topic.to_string(),
                owner: Some(owner.http_url),
            })
        }
    }
}
