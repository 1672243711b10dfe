//! The data path: publishing here or forwarded to the owner, fetching,
//! subscribing, and the state stores protocols keep beside their data.

use super::*;

impl Broker {
    /// Publishes messages to one partition (or non-partitioned topic) as
    /// one batch; returns the first message's offset.
    pub async fn publish(&self, topic: &TopicName, messages: Vec<Message>) -> Result<u64> {
        let batch = crate::format::encode_messages(&messages)?;
        match self.publish_batch(topic, batch).await? {
            Published::Stored(o) => Ok(o),
            // A batch without a producer id is never a duplicate.
            Published::Duplicate => Err(BrokerError::TopicUnavailable(topic.to_string())),
        }
    }

    /// Publishes with a producer's sequence numbers; retries of stored
    /// batches come back as [`Published::Duplicate`].
    pub async fn publish_idempotent(
        &self,
        topic: &TopicName,
        messages: Vec<Message>,
        producer: ProducerSequence,
    ) -> Result<Published> {
        let batch = crate::format::encode_batch(&messages, Some(producer))?;
        self.publish_batch(topic, batch).await
    }

    /// Appends a record batch (a Kafka client's, or one encoded here)
    /// unchanged but for its base offset; batches of idempotent producers
    /// are deduplicated. A topic owned by another broker gets the batch
    /// forwarded; the owner is remembered until a forward to it fails.
    pub async fn publish_batch(&self, topic: &TopicName, batch: Bytes) -> Result<Published> {
        let cached = self.remote_owners().get(topic).cloned();
        if let Some(url) = cached {
            match self.forward(&url, topic, batch.clone()).await {
                Ok(p) => return Ok(p),
                Err(e @ (BrokerError::InvalidArgument(_) | BrokerError::NotFound(_))) => {
                    return Err(e)
                }
                // Moved or gone: ask again below.
                Err(_) => {
                    self.remote_owners().remove(topic);
                }
            }
        }
        match self.topic(topic, true).await {
            Ok(t) => t.publish_batch(batch).await,
            Err(BrokerError::NotOwner {
                owner: Some(url), ..
            }) => {
                let r = self.forward(&url, topic, batch).await;
                if r.is_ok() {
                    self.remote_owners().insert(topic.clone(), url);
                }
                r
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn remote_owners(&self) -> std::sync::MutexGuard<'_, HashMap<TopicName, String>> {
        self.inner
            .remote_owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Durable state for one protocol's sessions, under its own area.
    pub fn state(&self, area: &str) -> StateStore {
        StateStore::new(self.inner.meta.clone(), area)
    }

    /// Reserves `count` ids of the cluster-wide sequence `name`; returns
    /// the first. Ids are unique across brokers and restarts.
    pub async fn reserve_ids(&self, name: &str, count: u64) -> Result<u64> {
        crate::state::reserve_ids(&self.inner.meta, name, count).await
    }

    /// A publisher for one-message-at-a-time protocols that gathers what
    /// arrives while earlier appends are in flight into one batch.
    pub fn coalescer(&self, topic: &TopicName) -> crate::Coalescer {
        crate::Coalescer::start(self.clone(), topic.clone())
    }

    /// Appends a batch here only, never forwarding: what a forwarded
    /// publish arrives as.
    pub async fn publish_batch_local(&self, topic: &TopicName, batch: Bytes) -> Result<Published> {
        self.topic(topic, true).await?.publish_batch(batch).await
    }

    /// Sends a batch to the owning broker's internal endpoint. One hop
    /// only: the owner appends it or refuses.
    pub(super) async fn forward(
        &self,
        owner_url: &str,
        topic: &TopicName,
        batch: Bytes,
    ) -> Result<Published> {
        let url = format!(
            "{}{FORWARD_PATH}{}",
            owner_url.trim_end_matches('/'),
            topic.path()
        );
        let unavailable = |why: String| BrokerError::TopicUnavailable(format!("{topic}: {why}"));
        let req = self
            .internal_request(reqwest::Method::POST, &url)
            .header("content-type", "application/octet-stream");
        let resp = req
            .body(batch)
            .send()
            .await
            .map_err(|e| unavailable(format!("forwarding to {owner_url}: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| unavailable(format!("reply of {owner_url}: {e}")))?;
        if !status.is_success() {
            let reason = body["reason"].as_str().unwrap_or("no reason").to_string();
            return Err(match status.as_u16() {
                400 => BrokerError::InvalidArgument(reason),
                404 => BrokerError::NotFound(reason),
                _ => unavailable(reason),
            });
        }
        match body["offset"].as_u64() {
            Some(o) => Ok(Published::Stored(o)),
            None if body["duplicate"].as_bool() == Some(true) => Ok(Published::Duplicate),
            None => Err(unavailable(format!("unreadable reply of {owner_url}"))),
        }
    }

    /// A request to another broker, as this broker: with the internal
    /// token when authentication is on.
    pub(super) fn internal_request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> reqwest::RequestBuilder {
        let req = self.inner.http.request(method, url);
        match self
            .config()
            .auth
            .as_ref()
            .and_then(|a| a.internal_token.as_ref())
        {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends an admin request to another broker (`path` from `/admin` on,
    /// with `body` as JSON unless empty), as this broker, with the
    /// internal token; its status and body.
    pub async fn admin_request(
        &self,
        owner: &BrokerInfo,
        method: reqwest::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let url = format!("{}{path}", owner.http_url.trim_end_matches('/'));
        let unavailable = |why: String| BrokerError::TopicUnavailable(format!("{url}: {why}"));
        let mut req = self.internal_request(method, &url);
        if !body.is_empty() {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req.send().await.map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        Ok((status, body))
    }

    /// Reads entries from `offset` on, up to about `max_bytes`; with
    /// `wait`, waits that long for data when there is none yet.
    pub async fn fetch(
        &self,
        topic: &TopicName,
        offset: u64,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<FetchResult> {
        let t = self.topic(topic, false).await?;
        let log = t.log();
        let mut end_rx = log.watch_end();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let entries = log.read(offset, 1000, max_bytes).await?;
            if !entries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(FetchResult {
                    entries,
                    start_offset: log.start_offset(),
                    end_offset: log.end_offset(),
                });
            }
            if *end_rx.borrow_and_update() > offset {
                continue;
            }
            if tokio::time::timeout_at(deadline, end_rx.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    pub async fn subscribe(
        &self,
        topic: &TopicName,
        subscription: &str,
        opts: SubscriptionOptions,
        consumer: ConsumerOptions,
    ) -> Result<Consumer> {
        self.topic(topic, true)
            .await?
            .subscribe(subscription, opts, consumer)
            .await
    }

    pub async fn unsubscribe(
        &self,
        topic: &TopicName,
        subscription: &str,
        force: bool,
    ) -> Result<()> {
        self.topic(topic, false)
            .await?
            .unsubscribe(subscription, force)
            .await
    }
}
