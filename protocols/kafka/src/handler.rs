//! Request handling: from decoded requests to responses, through the
//! broker's protocol-neutral API only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use kafka_protocol::messages::api_versions_response::ApiVersionsResponse;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError as E;
use magnetar_broker::format::{check_inflated, recompress, split_batches, BatchHeader};
use magnetar_broker::service::resolve_in;
use magnetar_broker::topic::Topic;
use magnetar_broker::{Broker, BrokerError, BrokerInfo, Grants, PendingPublish, Published};
use magnetar_tenancy::{NamespaceName, TopicName as Name};
use tracing::{debug, Instrument};

use crate::codec::{self, Request};
use crate::error::code_of;
use crate::group::GroupCoordinator;
use crate::txn::TxnCoordinator;
use crate::{versions, KafkaConfig};

/// What the connection writer waits for.
pub(crate) type Pending = BoxFuture<'static, Option<Bytes>>;

/// How long a partition layout (partition count) is trusted.
const LAYOUT_TTL: Duration = Duration::from_secs(5);

/// Per-connection state.
#[derive(Debug)]
pub(crate) struct Session {
    pub ns: NamespaceName,
    pub peer: SocketAddr,
    pub sasl_mechanism: Option<String>,
    /// False until SASL succeeds, when the broker checks credentials.
    pub authenticated: bool,
    /// What the SASL user's role may do in `ns`.
    pub grants: Grants,
    /// Set when the connection must close after the current answer.
    pub closing: bool,
    /// When the SASL token expires: the connection closes then, unless
    /// the client re-authenticates first (KIP-368).
    pub expires: Option<tokio::time::Instant>,
    /// Who logged in by SASL; a re-authentication must prove the same
    /// principal, as Kafka requires. (A client certificate's login is
    /// replaced by SASL, as on a SASL_SSL listener.)
    pub principal: Option<magnetar_broker::Principal>,
    /// The broker listener name the client came in on (`kafka`,
    /// `kafka-tls`): Metadata and FindCoordinator send it to the same
    /// listener of other brokers.
    pub listener: &'static str,
    /// Set at the first produce: the connection counts as a producer of
    /// its namespace from then on.
    pub producer: std::sync::OnceLock<magnetar_broker::metrics::ProducerGuard>,
}

impl Session {
    pub fn new(ctx: &Ctx, peer: SocketAddr, listener: &'static str) -> Self {
        Session {
            ns: ctx.cfg.default_namespace.clone(),
            peer,
            listener,
            sasl_mechanism: None,
            authenticated: !ctx.broker.auth_enabled(),
            grants: Grants::ALL,
            closing: false,
            expires: None,
            principal: None,
            producer: std::sync::OnceLock::new(),
        }
    }
}

/// A Kafka topic as stored: partitioned (each partition a topic), or one
/// plain topic seen as a single partition (an AMQP queue, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Partitioned(u32),
    Single,
}

impl Layout {
    pub fn count(self) -> u32 {
        match self {
            Layout::Partitioned(n) => n,
            Layout::Single => 1,
        }
    }

    pub fn partition(self, base: &Name, index: i32) -> Option<Name> {
        let i = u32::try_from(index).ok().filter(|&i| i < self.count())?;
        Some(match self {
            Layout::Partitioned(_) => base.partition(i),
            Layout::Single => base.clone(),
        })
    }
}

/// The most one Fetch response carries (Kafka's broker default for
/// `fetch.max.bytes`, 55 MiB).
const FETCH_MAX_BYTES: usize = 55 << 20;

/// State shared by every connection of the listener.
pub(crate) struct Ctx {
    pub broker: Broker,
    pub cfg: KafkaConfig,
    layouts: Mutex<HashMap<Name, (Layout, Instant)>>,
    /// Each topic's `compression.type` as a codec (`None`: the
    /// producer's), cached like layouts.
    pub(crate) codecs: Mutex<HashMap<Name, (crate::admin::ProduceConfigs, Instant)>>,
    pub groups: Arc<GroupCoordinator>,
    pub txns: TxnCoordinator,
    /// A produce request from its arrival to its response.
    produce_latency: magnetar_broker::metrics::Histogram,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

pub(crate) fn str(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// A stable Kafka node id for a broker.
pub(crate) fn node_id(broker_id: &str) -> i32 {
    (crc32c::crc32c(broker_id.as_bytes()) & 0x7fff_ffff) as i32
}

/// The advertised Kafka endpoint of a broker on `listener`, if it has one.
pub(crate) fn endpoint(b: &BrokerInfo, listener: &str) -> Option<(i32, String, i32)> {
    let addr = b.listeners.get(listener)?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((node_id(&b.id), host.to_string(), port.parse().ok()?))
}

fn respond(api: ApiKey, version: i16, correlation_id: i32, body: ResponseKind) -> Option<Bytes> {
    match codec::encode_response(api, version, correlation_id, &body) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!("{api:?} v{version} response did not encode: {e}");
            None
        }
    }
}

impl Ctx {
    pub fn new(broker: Broker, cfg: KafkaConfig) -> Self {
        Ctx {
            groups: Arc::new(GroupCoordinator::new(broker.clone(), cfg.clone())),
            txns: TxnCoordinator::new(broker.clone()),
            produce_latency: broker.metrics().publish_latency("kafka"),
            broker,
            cfg,
            layouts: Mutex::new(HashMap::new()),
            codecs: Mutex::new(HashMap::new()),
        }
    }

    pub fn start_background(self: &Arc<Self>) {
        self.groups.start_background();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(ctx) = weak.upgrade() else { return };
                ctx.txns.expire(&ctx).await;
            }
        });
    }

    pub fn node_id(&self) -> i32 {
        node_id(&self.broker.info().id)
    }

    /// The stored topic behind a Kafka topic name, in the session's
    /// namespace.
    pub fn topic_name(&self, ns: &NamespaceName, name: &str) -> Result<Name, i16> {
        if name.is_empty()
            || name.len() > 249
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(E::InvalidTopicException.code());
        }
        resolve_in(ns, name).map_err(|_| E::InvalidTopicException.code())
    }

    /// How the topic is partitioned, if it exists.
    pub async fn layout(&self, base: &Name) -> Result<Option<Layout>, BrokerError> {
        if let Some((l, at)) = self.layouts_lock().get(base).copied() {
            if at.elapsed() < LAYOUT_TTL {
                return Ok(Some(l));
            }
        }
        let layout = match self.broker.partitions(base).await? {
            Some(n) => Some(Layout::Partitioned(n)),
            None if self.broker.topic_exists(base).await? => Some(Layout::Single),
            None => None,
        };
        if let Some(l) = layout {
            self.layouts_lock()
                .insert(base.clone(), (l, Instant::now()));
        }
        Ok(layout)
    }

    pub fn forget_layout(&self, base: &Name) {
        self.layouts_lock().remove(base);
    }

    fn layouts_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Name, (Layout, Instant)>> {
        self.layouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a Kafka topic: a partitioned topic, even with one
    /// partition, so that CreatePartitions can grow it later.
    pub async fn create_topic(&self, base: &Name, partitions: u32) -> Result<(), BrokerError> {
        self.broker
            .create_partitioned_topic(base, partitions)
            .await?;
        self.forget_layout(base);
        Ok(())
    }

    /// The partition's topic, loaded on this broker (which must own it).
    pub async fn partition(
        &self,
        ns: &NamespaceName,
        topic: &str,
        index: i32,
    ) -> Result<Arc<Topic>, i16> {
        let name = self.partition_name(ns, topic, index).await?;
        self.broker
            .topic(&name, true)
            .await
            .map_err(|e| code_of(&e))
    }

    /// The stored topic of a Kafka partition, without loading it.
    pub async fn partition_name(
        &self,
        ns: &NamespaceName,
        topic: &str,
        index: i32,
    ) -> Result<Name, i16> {
        let base = self.topic_name(ns, topic)?;
        let layout = self
            .layout(&base)
            .await
            .map_err(|e| code_of(&e))?
            .ok_or(E::UnknownTopicOrPartition.code())?;
        layout
            .partition(&base, index)
            .ok_or(E::UnknownTopicOrPartition.code())
    }

    /// Starts a request. Produce requests fix their batches' order here,
    /// before the next request of the connection is read; everything
    /// else runs in its own task.
    pub async fn start(self: &Arc<Self>, s: &mut Session, req: Request) -> Option<Pending> {
        let api = req.api_key;
        let v = req.version();
        let cid = req.correlation_id();
        if !s.authenticated
            && !matches!(
                req.body,
                RequestKind::ApiVersions(_)
                    | RequestKind::SaslHandshake(_)
                    | RequestKind::SaslAuthenticate(_)
            )
        {
            // As a Kafka SASL listener does: nothing before authentication.
            debug!(peer = %s.peer, "{api:?} before SASL authentication; closing");
            s.closing = true;
            return Some(async { None }.boxed());
        }
        match req.body {
            RequestKind::Produce(r) => {
                let started = std::time::Instant::now();
                // A request holds batches of many records, each with its own
                // trace context: the span stands alone.
                let span = tracing::debug_span!("produce", otel.kind = "server");
                let fut = self.produce(s, r).instrument(span.clone()).await;
                let latency = self.produce_latency.clone();
                Some(
                    async move {
                        let body = fut.await?;
                        latency.observe(started.elapsed().as_secs_f64());
                        respond(api, v, cid, ResponseKind::Produce(body))
                    }
                    .instrument(span)
                    .boxed(),
                )
            }
            RequestKind::ApiVersions(_) => {
                let body = ApiVersionsResponse::default().with_api_keys(versions::api_versions());
                let r = respond(api, v, cid, ResponseKind::ApiVersions(body));
                Some(async move { r }.boxed())
            }
            RequestKind::SaslHandshake(r) => {
                let body = crate::sasl::handshake(s, r);
                let r = respond(api, v, cid, ResponseKind::SaslHandshake(body));
                Some(async move { r }.boxed())
            }
            RequestKind::SaslAuthenticate(r) => {
                let body = crate::sasl::authenticate(self, s, r).await;
                let r = respond(api, v, cid, ResponseKind::SaslAuthenticate(body));
                Some(async move { r }.boxed())
            }
            body => {
                let ctx = Arc::clone(self);
                let ns = s.ns.clone();
                let grants = s.grants;
                let client = req
                    .header
                    .client_id
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                let host = s.peer.ip().to_string();
                let listener = s.listener;
                let task = tokio::spawn(async move {
                    let caller = Caller {
                        ns,
                        client,
                        host,
                        grants,
                        listener,
                    };
                    ctx.handle(&caller, body, v).await
                });
                Some(
                    async move {
                        match task.await {
                            Ok(Some(body)) => respond(api, v, cid, body),
                            Ok(None) => None,
                            Err(e) => {
                                tracing::error!("{api:?} handler failed: {e}");
                                None
                            }
                        }
                    }
                    .boxed(),
                )
            }
        }
    }

    async fn handle(&self, c: &Caller, body: RequestKind, v: i16) -> Option<ResponseKind> {
        use RequestKind as Q;
        use ResponseKind as A;
        Some(match body {
            Q::Metadata(r) => A::Metadata(self.metadata(c, r, v).await),
            Q::Fetch(r) => A::Fetch(self.fetch(c, r).await),
            Q::ListOffsets(r) => A::ListOffsets(self.list_offsets(c, r).await),
            Q::OffsetForLeaderEpoch(r) => A::OffsetForLeaderEpoch(self.leader_epochs(c, r).await),
            Q::DescribeCluster(_) => A::DescribeCluster(self.describe_cluster(c).await),
            Q::InitProducerId(r) => A::InitProducerId(self.txns.init_producer_id(self, c, r).await),
            Q::AddPartitionsToTxn(r) => {
                A::AddPartitionsToTxn(self.txns.add_partitions(self, c, r).await)
            }
            Q::AddOffsetsToTxn(r) => A::AddOffsetsToTxn(self.txns.add_offsets(c, r).await),
            Q::EndTxn(r) => A::EndTxn(self.txns.end(self, c, r).await),
            Q::TxnOffsetCommit(r) => A::TxnOffsetCommit(self.groups.txn_commit(c, r).await),
            Q::FindCoordinator(r) => A::FindCoordinator(self.find_coordinator(c, r, v).await),
            Q::JoinGroup(r) => A::JoinGroup(self.groups.join(c, r, v).await),
            Q::SyncGroup(r) => A::SyncGroup(self.groups.sync(c, r).await),
            Q::Heartbeat(r) => A::Heartbeat(self.groups.heartbeat(c, r).await),
            Q::LeaveGroup(r) => A::LeaveGroup(self.groups.leave(c, r, v).await),
            Q::OffsetCommit(r) => A::OffsetCommit(self.groups.commit(self, c, r).await),
            Q::OffsetFetch(r) => A::OffsetFetch(self.groups.fetch_offsets(c, r, v).await),
            Q::OffsetDelete(r) => A::OffsetDelete(self.groups.delete_offsets(c, r).await),
            Q::DescribeGroups(r) => A::DescribeGroups(self.groups.describe(c, r).await),
            Q::ListGroups(r) => A::ListGroups(self.groups.list(c, r).await),
            Q::DeleteGroups(r) => A::DeleteGroups(self.groups.delete(c, r).await),
            Q::CreateTopics(r) => A::CreateTopics(self.create_topics(c, r).await),
            Q::DeleteTopics(r) => A::DeleteTopics(self.delete_topics(c, r, v).await),
            Q::CreatePartitions(r) => A::CreatePartitions(self.create_partitions(c, r).await),
            Q::DeleteRecords(r) => A::DeleteRecords(self.delete_records(c, r).await),
            Q::DescribeConfigs(r) => A::DescribeConfigs(self.describe_configs(c, r).await),
            Q::AlterConfigs(r) => A::AlterConfigs(self.alter_configs(c, r).await),
            Q::IncrementalAlterConfigs(r) => {
                A::IncrementalAlterConfigs(self.incremental_alter_configs(c, r).await)
            }
            Q::DescribeTopicPartitions(r) => {
                A::DescribeTopicPartitions(self.describe_topic_partitions(c, r).await)
            }
            Q::DescribeLogDirs(r) => A::DescribeLogDirs(self.describe_log_dirs(c, r).await),
            Q::AlterReplicaLogDirs(r) => {
                A::AlterReplicaLogDirs(self.alter_replica_log_dirs(c, r).await)
            }
            Q::ElectLeaders(r) => A::ElectLeaders(self.elect_leaders(c, r).await),
            Q::ListPartitionReassignments(r) => {
                A::ListPartitionReassignments(self.list_partition_reassignments(c, r).await)
            }
            Q::AlterPartitionReassignments(r) => {
                A::AlterPartitionReassignments(self.alter_partition_reassignments(c, r).await)
            }
            Q::DescribeQuorum(r) => A::DescribeQuorum(self.describe_quorum(c, r).await),
            Q::DescribeProducers(r) => A::DescribeProducers(self.describe_producers(c, r).await),
            Q::DescribeTransactions(r) => A::DescribeTransactions(self.txns.describe(c, r).await),
            Q::ListTransactions(r) => A::ListTransactions(self.txns.list(c, r).await),
            Q::DescribeAcls(r) => A::DescribeAcls(self.describe_acls(c, r).await),
            Q::CreateAcls(r) => A::CreateAcls(self.create_acls(c, r).await),
            Q::DeleteAcls(r) => A::DeleteAcls(self.delete_acls(c, r).await),
            other => {
                debug!("request {other:?} is not served");
                return None;
            }
        })
    }

    // ---- produce ----

    /// Submits every partition's batches in request order, then returns
    /// the future that waits for them and builds the response (none for
    /// acks=0).
    async fn produce(
        self: &Arc<Self>,
        s: &Session,
        r: ProduceRequest,
    ) -> BoxFuture<'static, Option<ProduceResponse>> {
        let acks = r.acks;
        if s.grants.produce {
            s.producer
                .get_or_init(|| self.broker.metrics().producer(&s.ns));
        }
        let txn_id = r.transactional_id.as_ref().map(|t| t.0.to_string());
        let mut topics = Vec::with_capacity(r.topic_data.len());
        for td in r.topic_data {
            let mut parts = Vec::with_capacity(td.partition_data.len());
            for pd in td.partition_data {
                let submitted = if s.grants.produce {
                    self.submit_partition(
                        &s.ns,
                        &td.name.0,
                        pd.index,
                        pd.records,
                        txn_id.as_deref(),
                    )
                    .await
                } else {
                    Err(E::TopicAuthorizationFailed.code())
                };
                parts.push((pd.index, submitted));
            }
            topics.push((td.name, parts));
        }
        async move {
            let mut responses = Vec::with_capacity(topics.len());
            for (name, parts) in topics {
                let mut partition_responses = Vec::with_capacity(parts.len());
                for (index, submitted) in parts {
                    let mut p = PartitionProduceResponse::default()
                        .with_index(index)
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1);
                    match submitted {
                        Err(code) => p.error_code = code,
                        Ok((pending, topic)) => {
                            let (code, base) = wait_all(pending).await;
                            p.error_code = code;
                            p.base_offset = base;
                            p.log_start_offset = topic.log().start_offset() as i64;
                        }
                    }
                    partition_responses.push(p);
                }
                responses.push(
                    TopicProduceResponse::default()
                        .with_name(name)
                        .with_partition_responses(partition_responses),
                );
            }
            (acks != 0).then(|| ProduceResponse::default().with_responses(responses))
        }
        .boxed()
    }

    async fn submit_partition(
        &self,
        ns: &NamespaceName,
        topic: &str,
        index: i32,
        records: Option<Bytes>,
        txn_id: Option<&str>,
    ) -> Result<(Vec<PendingPublish>, Arc<Topic>), i16> {
        let transactional = txn_id.is_some();
        let t = self.partition(ns, topic, index).await?;
        let mut batches = split_batches(records.unwrap_or_default()).map_err(|e| code_of(&e))?;
        if batches.is_empty() {
            return Err(E::CorruptMessage.code());
        }
        for b in &batches {
            // A decompression bomb goes no further than here.
            check_inflated(b).map_err(|e| code_of(&e))?;
        }
        let configs = self.produce_configs(&t.name().base()).await;
        if let Some(codec) = configs.codec {
            batches = batches
                .into_iter()
                .map(|b| recompress(b, codec).map_err(|e| code_of(&e)))
                .collect::<Result<_, _>>()?;
        }
        // As Kafka, the limit is on the batch as stored, after the
        // topic's own compression.
        if batches.iter().any(|b| b.len() > configs.max_message_bytes) {
            return Err(E::MessageTooLarge.code());
        }
        let mut pending = Vec::with_capacity(batches.len());
        for b in batches {
            let h = BatchHeader::parse(&b).map_err(|e| code_of(&e))?;
            if h.is_control() {
                // Only the transaction coordinator writes markers.
                return Err(E::InvalidRecord.code());
            }
            if magnetar_broker::replicated::is_replicated(h.producer_id) {
                // Only replication writes records under these producer ids.
                return Err(E::InvalidRecord.code());
            }
            if h.is_transactional() != transactional {
                // A transactional producer's batches say so, and only its.
                return Err(E::InvalidRecord.code());
            }
            // A producer's batch has one record per offset; a larger
            // lastOffsetDelta would make it claim offsets it has no
            // records for (only compaction leaves such gaps).
            if h.record_count < 1 || i64::from(h.last_offset_delta) + 1 != i64::from(h.record_count)
            {
                return Err(E::InvalidRecord.code());
            }
            if let Some(id) = txn_id {
                self.txns
                    .check_produce(
                        ns,
                        id,
                        h.producer_id,
                        h.producer_epoch,
                        &t.name().to_string(),
                    )
                    .await?;
            }
            pending.push(t.submit_batch(b).await.map_err(|e| code_of(&e))?);
        }
        Ok((pending, t))
    }

    // ---- fetch ----

    async fn fetch(&self, c: &Caller, r: FetchRequest) -> FetchResponse {
        let read_committed = r.isolation_level == 1;
        let max_wait = Duration::from_millis(r.max_wait_ms.max(0) as u64);
        let deadline = tokio::time::Instant::now() + max_wait;
        let min_bytes = r.min_bytes.max(0) as usize;
        // A client's limit, never above the broker's (Kafka's
        // `fetch.max.bytes`): a request of a few bytes must not build a
        // response of gigabytes.
        let max_bytes = match usize::try_from(r.max_bytes) {
            Ok(n) if n > 0 => n.min(FETCH_MAX_BYTES),
            _ => FETCH_MAX_BYTES,
        };
        // Resolve once; errors are answered as they are.
        struct Part {
            topic_idx: usize,
            index: i32,
            offset: i64,
            max: usize,
            topic: Result<Arc<Topic>, i16>,
        }
        let mut parts = Vec::new();
        let mut names = Vec::new();
        // A partition asked for twice is read once.
        let mut seen = std::collections::HashSet::new();
        for (ti, ft) in r.topics.iter().enumerate() {
            names.push(ft.topic.clone());
            for fp in &ft.partitions {
                if !seen.insert((ft.topic.0.clone(), fp.partition)) {
                    continue;
                }
                parts.push(Part {
                    topic_idx: ti,
                    index: fp.partition,
                    offset: fp.fetch_offset,
                    max: fp.partition_max_bytes.max(0) as usize,
                    topic: if c.grants.consume {
                        self.partition(&c.ns, &ft.topic.0, fp.partition).await
                    } else {
                        Err(E::TopicAuthorizationFailed.code())
                    },
                });
            }
        }
        let mut closed = false;
        let mut watches: Vec<_> = parts
            .iter()
            .filter_map(|p| p.topic.as_ref().ok().map(|t| t.log().watch_end()))
            .collect();
        loop {
            let mut total = 0usize;
            let mut out: Vec<PartitionData> = Vec::with_capacity(parts.len());
            // Records and bytes this round would send, per partition: the
            // namespace's delivery counters take them once the answer goes.
            let mut sent: Vec<(&Arc<Topic>, u64, u64)> = Vec::new();
            for p in &parts {
                let mut d = PartitionData::default()
                    .with_partition_index(p.index)
                    .with_high_watermark(-1)
                    .with_last_stable_offset(-1)
                    .with_log_start_offset(-1)
                    .with_preferred_read_replica(kafka_protocol::messages::BrokerId(-1));
                let t = match &p.topic {
                    Ok(t) => t,
                    Err(code) => {
                        d.error_code = *code;
                        out.push(d);
                        continue;
                    }
                };
                let log = t.log();
                let (start, end) = (log.start_offset() as i64, log.end_offset() as i64);
                let lso = log.last_stable_offset() as i64;
                // Read-committed consumers stop at the oldest open
                // transaction.
                let stable = if read_committed { lso } else { end };
                d.high_watermark = end;
                d.last_stable_offset = lso;
                d.log_start_offset = start;
                if p.offset < start || p.offset > end {
                    d.error_code = E::OffsetOutOfRange.code();
                    out.push(d);
                    continue;
                }
                let room = max_bytes.saturating_sub(total).min(p.max);
                if p.offset < stable && (room > 0 || total == 0) {
                    match log.read(p.offset as u64, 1000, room.max(1)).await {
                        Ok(entries) => {
                            let mut chunks: Vec<Bytes> = Vec::with_capacity(entries.len());
                            let mut len = 0;
                            let mut records = 0u64;
                            for e in entries {
                                if e.base_offset as i64 >= stable
                                    || (len > 0 && len + e.data.len() > room)
                                {
                                    break;
                                }
                                len += e.data.len();
                                records += magnetar_broker::format::BatchHeader::parse(&e.data)
                                    .ok()
                                    .filter(|h| !h.is_control())
                                    .map_or(0, |h| u64::try_from(h.record_count).unwrap_or(0));
                                chunks.push(e.data);
                            }
                            total += len;
                            sent.push((t, records, len as u64));
                            // One entry goes out as stored; several are
                            // joined into one record set.
                            let records = if chunks.len() == 1 {
                                chunks.pop().unwrap_or_default()
                            } else {
                                let mut buf = BytesMut::with_capacity(len);
                                for c in &chunks {
                                    buf.extend_from_slice(c);
                                }
                                buf.freeze()
                            };
                            if read_committed {
                                use kafka_protocol::messages::fetch_response::AbortedTransaction;
                                d.aborted_transactions = Some(
                                    log.aborted_between(p.offset as u64, stable as u64)
                                        .into_iter()
                                        .map(|a| {
                                            AbortedTransaction::default()
                                                .with_producer_id(ProducerId(a.producer_id))
                                                .with_first_offset(a.first_offset as i64)
                                        })
                                        .collect(),
                                );
                            }
                            d.records = Some(records);
                        }
                        Err(e) => d.error_code = code_of(&e),
                    }
                } else {
                    d.records = Some(Bytes::new());
                }
                out.push(d);
            }
            let errors = out.iter().any(|d| d.error_code != 0);
            if total >= min_bytes.max(1)
                || errors
                || closed
                || tokio::time::Instant::now() >= deadline
                || watches.is_empty()
            {
                let mut responses: Vec<FetchableTopicResponse> = names
                    .iter()
                    .map(|n| FetchableTopicResponse::default().with_topic(n.clone()))
                    .collect();
                for (p, d) in parts.iter().zip(out) {
                    responses[p.topic_idx].partitions.push(d);
                }
                for (t, records, bytes) in sent {
                    if records > 0 {
                        self.broker
                            .metrics()
                            .outbound(t.name().namespace())
                            .add(records, bytes);
                    }
                }
                return FetchResponse::default().with_responses(responses);
            }
            // Wait for any partition to grow, or the deadline. A partition
            // closed meanwhile (unloaded, deleted) ends the wait: the next
            // round answers with what it finds.
            let changed =
                futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            if let Ok((Err(_), _, _)) = tokio::time::timeout_at(deadline, changed).await {
                closed = true;
            }
        }
    }

    // ---- offsets ----

    async fn list_offsets(&self, c: &Caller, r: ListOffsetsRequest) -> ListOffsetsResponse {
        let read_committed = r.isolation_level == 1;
        let mut topics = Vec::with_capacity(r.topics.len());
        for t in r.topics {
            let mut partitions = Vec::with_capacity(t.partitions.len());
            for p in t.partitions {
                let mut out = ListOffsetsPartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_timestamp(-1)
                    .with_offset(-1)
                    .with_leader_epoch(-1);
                match self.partition(&c.ns, &t.name.0, p.partition_index).await {
                    Err(code) => out.error_code = code,
                    Ok(topic) => {
                        let log = topic.log();
                        let end = log.end_offset();
                        let latest = if read_committed {
                            log.last_stable_offset()
                        } else {
                            end
                        };
                        // Kafka's specs: -1 latest, -2 earliest, -3 the
                        // greatest timestamp, -4 earliest on local storage
                        // (the bookies), -5 the latest offloaded.
                        let found = match p.timestamp {
                            -1 => Ok(Some((latest, -1))),
                            -2 => Ok(Some((log.start_offset(), -1))),
                            -3 => log.newest_by_timestamp().await,
                            -4 => Ok(Some((log.local_start_offset(), -1))),
                            -5 => Ok(log.last_offloaded_offset().map(|o| (o, -1))),
                            ts if ts >= 0 => log.record_for_timestamp(ts).await,
                            _ => Err(BrokerError::InvalidArgument("timestamp".into())),
                        };
                        match found {
                            // A record past what read_committed may see is
                            // not found yet.
                            Ok(Some((o, ts))) if p.timestamp < 0 || o < latest => {
                                out.offset = o as i64;
                                out.timestamp = ts;
                            }
                            Ok(_) => {}
                            Err(BrokerError::InvalidArgument(_)) => {
                                out.error_code = E::InvalidRequest.code()
                            }
                            Err(e) => out.error_code = code_of(&e),
                        }
                    }
                }
                partitions.push(out);
            }
            topics.push(
                ListOffsetsTopicResponse::default()
                    .with_name(t.name)
                    .with_partitions(partitions),
            );
        }
        ListOffsetsResponse::default().with_topics(topics)
    }

    /// Leader epochs are not tracked (Metadata reports -1), so the answer
    /// for any epoch is the end of the log: nothing acknowledged is ever
    /// truncated here.
    async fn leader_epochs(
        &self,
        c: &Caller,
        r: OffsetForLeaderEpochRequest,
    ) -> OffsetForLeaderEpochResponse {
        use kafka_protocol::messages::offset_for_leader_epoch_response::{
            EpochEndOffset, OffsetForLeaderTopicResult,
        };
        let mut topics = Vec::new();
        for t in r.topics {
            let mut partitions = Vec::new();
            for p in t.partitions {
                let mut e = EpochEndOffset::default()
                    .with_partition(p.partition)
                    .with_leader_epoch(-1)
                    .with_end_offset(-1);
                match self.partition(&c.ns, &t.topic.0, p.partition).await {
                    Ok(topic) => {
                        e.leader_epoch = p.leader_epoch;
                        e.end_offset = topic.log().end_offset() as i64;
                    }
                    Err(code) => e.error_code = code,
                }
                partitions.push(e);
            }
            topics.push(
                OffsetForLeaderTopicResult::default()
                    .with_topic(t.topic)
                    .with_partitions(partitions),
            );
        }
        OffsetForLeaderEpochResponse::default().with_topics(topics)
    }

    // ---- metadata ----

    /// Brokers with a Kafka listener named `listener`, by node id.
    pub async fn kafka_brokers(&self, listener: &str) -> Vec<(i32, String, i32)> {
        let mut out: Vec<_> = match self.broker.active_brokers().await {
            Ok(bs) => bs.iter().filter_map(|b| endpoint(b, listener)).collect(),
            Err(_) => Vec::new(),
        };
        if out.is_empty() {
            out.extend(endpoint(self.broker.info(), listener));
        }
        out.sort();
        out
    }

    pub(crate) async fn leader_of(&self, name: &Name) -> Result<i32, i16> {
        let owner = self.broker.lookup(name).await.map_err(|e| code_of(&e))?;
        Ok(node_id(&owner.id))
    }

    async fn metadata(&self, c: &Caller, r: MetadataRequest, v: i16) -> MetadataResponse {
        let brokers = self
            .kafka_brokers(c.listener)
            .await
            .into_iter()
            .map(|(id, host, port)| {
                MetadataResponseBroker::default()
                    .with_node_id(kafka_protocol::messages::BrokerId(id))
                    .with_host(str(host))
                    .with_port(port)
            })
            .collect();
        // Version 0 asks for every topic with an empty list; later
        // versions with null.
        let requested: Option<Vec<String>> = match r.topics {
            None => None,
            Some(ts) if ts.is_empty() && v == 0 => None,
            Some(ts) => Some(
                ts.into_iter()
                    .filter_map(|t| t.name.map(|n| n.0.to_string()))
                    .collect(),
            ),
        };
        let auto_create =
            (v < 4 || r.allow_auto_topic_creation) && self.broker.config().auto_create_topics;
        let names = match requested {
            Some(n) => n,
            None => self.all_topics(&c.ns).await,
        };
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            topics.push(self.topic_metadata(&c.ns, &name, auto_create).await);
        }
        MetadataResponse::default()
            .with_brokers(brokers)
            .with_cluster_id(Some(str(self.broker.config().cluster.clone())))
            .with_controller_id(kafka_protocol::messages::BrokerId(self.node_id()))
            .with_topics(topics)
    }

    /// The namespace's topics as Kafka sees them: partitioned topics by
    /// their base name, plain persistent topics as themselves.
    pub async fn all_topics(&self, ns: &NamespaceName) -> Vec<String> {
        let mut out = std::collections::BTreeSet::new();
        if let Ok(ts) = self.broker.list_partitioned_topics(ns).await {
            out.extend(ts.iter().map(|t| t.local_name().to_string()));
        }
        if let Ok(ts) = self.broker.list_topics(ns).await {
            out.extend(
                ts.iter()
                    .filter(|t| t.partition_index().is_none() && t.is_persistent())
                    .map(|t| t.local_name().to_string()),
            );
        }
        out.into_iter().collect()
    }

    async fn topic_metadata(
        &self,
        ns: &NamespaceName,
        name: &str,
        auto_create: bool,
    ) -> MetadataResponseTopic {
        let mut t = MetadataResponseTopic::default()
            .with_name(Some(kafka_protocol::messages::TopicName(str(name))));
        let base = match self.topic_name(ns, name) {
            Ok(b) => b,
            Err(code) => {
                t.error_code = code;
                return t;
            }
        };
        let layout = match self.layout(&base).await {
            Ok(Some(l)) => l,
            Ok(None) if auto_create => {
                match self.create_topic(&base, self.cfg.default_partitions).await {
                    Ok(()) | Err(BrokerError::AlreadyExists(_)) => {}
                    Err(e) => {
                        t.error_code = code_of(&e);
                        return t;
                    }
                }
                match self.layout(&base).await {
                    Ok(Some(l)) => l,
                    _ => {
                        t.error_code = E::LeaderNotAvailable.code();
                        return t;
                    }
                }
            }
            Ok(None) => {
                t.error_code = E::UnknownTopicOrPartition.code();
                return t;
            }
            Err(e) => {
                t.error_code = code_of(&e);
                return t;
            }
        };
        for i in 0..layout.count() as i32 {
            let mut p = MetadataResponsePartition::default()
                .with_partition_index(i)
                .with_leader_epoch(-1);
            let Some(name) = layout.partition(&base, i) else {
                continue;
            };
            match self.leader_of(&name).await {
                Ok(leader) => {
                    let id = kafka_protocol::messages::BrokerId(leader);
                    p.leader_id = id;
                    p.replica_nodes = vec![id];
                    p.isr_nodes = vec![id];
                }
                Err(code) => {
                    p.error_code = if code == E::UnknownTopicOrPartition.code() {
                        code
                    } else {
                        E::LeaderNotAvailable.code()
                    };
                    p.leader_id = kafka_protocol::messages::BrokerId(-1);
                }
            }
            t.partitions.push(p);
        }
        t
    }

    async fn describe_cluster(&self, c: &Caller) -> DescribeClusterResponse {
        use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
        let brokers = self
            .kafka_brokers(c.listener)
            .await
            .into_iter()
            .map(|(id, host, port)| {
                DescribeClusterBroker::default()
                    .with_broker_id(kafka_protocol::messages::BrokerId(id))
                    .with_host(str(host))
                    .with_port(port)
            })
            .collect();
        DescribeClusterResponse::default()
            .with_cluster_id(str(self.broker.config().cluster.clone()))
            .with_controller_id(kafka_protocol::messages::BrokerId(self.node_id()))
            .with_brokers(brokers)
    }

    async fn find_coordinator(
        &self,
        c: &Caller,
        r: FindCoordinatorRequest,
        v: i16,
    ) -> FindCoordinatorResponse {
        use kafka_protocol::messages::find_coordinator_response::Coordinator;
        let keys = if v >= 4 {
            r.coordinator_keys.iter().map(|k| k.to_string()).collect()
        } else {
            vec![r.key.to_string()]
        };
        let mut coordinators = Vec::with_capacity(keys.len());
        for key in keys {
            let mut co = Coordinator::default()
                .with_key(str(key.clone()))
                .with_node_id(kafka_protocol::messages::BrokerId(-1))
                .with_port(-1);
            let owner = match r.key_type {
                0 => self.groups.coordinator_of(&c.ns, &key).await,
                1 => self.txns.coordinator_of(&c.ns, &key).await,
                _ => Err(E::InvalidRequest.code()),
            };
            match owner
                .and_then(|b| endpoint(&b, c.listener).ok_or(E::CoordinatorNotAvailable.code()))
            {
                Ok((id, host, port)) => {
                    co.node_id = kafka_protocol::messages::BrokerId(id);
                    co.host = str(host);
                    co.port = port;
                }
                Err(code) => co.error_code = code,
            }
            coordinators.push(co);
        }
        if v >= 4 {
            FindCoordinatorResponse::default().with_coordinators(coordinators)
        } else {
            let co = coordinators.pop().unwrap_or_default();
            FindCoordinatorResponse::default()
                .with_error_code(co.error_code)
                .with_node_id(co.node_id)
                .with_host(co.host)
                .with_port(co.port)
        }
    }
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub ns: NamespaceName,
    pub client: String,
    pub host: String,
    pub grants: Grants,
    /// See [`Session::listener`].
    pub listener: &'static str,
}

/// Waits for a partition's batches; the first error wins, and the base
/// offset is the first batch's.
async fn wait_all(pending: Vec<PendingPublish>) -> (i16, i64) {
    let mut base = -1;
    let mut code = 0;
    for (i, p) in pending.into_iter().enumerate() {
        match p.await {
            Ok(Published::Stored(o)) if i == 0 => base = o as i64,
            Ok(Published::Stored(_)) => {}
            Ok(Published::Duplicate) if i == 0 => {
                code = E::DuplicateSequenceNumber.code();
            }
            Ok(Published::Duplicate) => {}
            Err(e) if code == 0 => code = code_of(&e),
            Err(_) => {}
        }
    }
    (code, base)
}
