//! The receiving side: the `Replication` gRPC service on the broker's
//! HTTP listener. It makes the target topic as the source has it, and
//! appends each stream's batches through the log's exactly-once path
//! ([`magnetar_broker::replicated`]), answering in order while writes
//! are still pipelined.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, Stream, StreamExt};
use magnetar_broker::format::BatchHeader;
use magnetar_broker::listener::PeerCertificate;
use magnetar_broker::topic::ReplicatedAppend;
use magnetar_broker::{Broker, BrokerError};
use magnetar_tenancy::TopicName;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::handshake_reply::Reply as Hs;
use crate::proto::replicate_reply::Reply as Rr;
use crate::proto::replication_server::{Replication, ReplicationServer};
use crate::proto::{HandshakeReply, HandshakeRequest, ReplicateReply, ReplicateRequest};
use crate::remote::MAX_MESSAGE_BYTES;

/// Call metadata naming a `Replicate` stream's target partition.
pub const TOPIC_HEADER: &str = "x-magnetar-topic";
/// Call metadata naming the cluster a `Replicate` stream comes from.
pub const SOURCE_HEADER: &str = "x-magnetar-source";

/// Replies held back at most, per stream, while earlier writes finish.
const MAX_PENDING: usize = 4096;

/// The service, for [`crate::router`].
#[derive(Clone)]
pub struct Receiver {
    broker: Broker,
    /// Roles besides superusers that may replicate into this cluster.
    peer_roles: Arc<BTreeSet<String>>,
    metrics: Arc<crate::stats::ReceiverMetrics>,
}

impl Receiver {
    pub fn new(
        broker: Broker,
        peer_roles: BTreeSet<String>,
        metrics: Arc<crate::stats::ReceiverMetrics>,
    ) -> Self {
        Receiver {
            broker,
            peer_roles: Arc::new(peer_roles),
            metrics,
        }
    }

    pub fn into_server(self) -> ReplicationServer<Receiver> {
        ReplicationServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Superusers and `--geo-peer-roles` only: a replicated batch skips
    /// the producer's checks of a client.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.broker.auth_enabled() {
            return Ok(());
        }
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let certificate = req
            .extensions()
            .get::<PeerCertificate>()
            .and_then(|p| p.0.as_deref());
        if token.is_none() && certificate.is_none() {
            return Err(Status::unauthenticated("authentication required"));
        }
        let creds = magnetar_tenancy::Credentials {
            user: None,
            secret: token.map(str::as_bytes),
            certificate,
        };
        let principal = self.broker.authenticate(&creds).map_err(|e| {
            self.broker.metrics().auth_failure("geo");
            Status::unauthenticated(e.to_string())
        })?;
        let peer = match &principal {
            magnetar_broker::Principal::Role(r) => self.peer_roles.contains(r),
            magnetar_broker::Principal::Anonymous => true,
        };
        if peer || self.broker.is_superuser(&principal) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "replication takes a superuser or a --geo-peer-roles role",
            ))
        }
    }

    /// The source cluster's id in this region's registry.
    async fn source_id(&self, cluster: &str) -> Result<u16, Status> {
        let data = self
            .broker
            .tenancy()
            .get_cluster(cluster)
            .await
            .map_err(|e| Status::failed_precondition(format!("refused: {e}")))?;
        data.geo_id.ok_or_else(|| {
            Status::failed_precondition(format!("refused: cluster {cluster} has no geoId"))
        })
    }

    /// Makes the topic as the source has it (`partitions` 0: not
    /// partitioned); `Err` names why it cannot be.
    async fn ensure_topic(&self, topic: &TopicName, partitions: u32) -> Result<(), String> {
        let b = &self.broker;
        let err = |e: BrokerError| format!("error: {e}");
        let base = topic.base();
        let missing = match partitions {
            0 => !b.topic_exists(&base).await.map_err(err)?,
            _ => b.partitions(&base).await.map_err(err)?.is_none(),
        };
        if missing && b.tombstoned(&base).await.map_err(err)? {
            return Err(format!(
                "remoteTopicDeleted: {base} was deleted here; create it here to replicate it again"
            ));
        }
        let mut last = None;
        for _ in 0..3 {
            let local = b.partitions(&base).await.map_err(err)?;
            let done = match (partitions, local) {
                (0, None) => return Ok(()),
                (0, Some(n)) => {
                    return Err(format!(
                        "partitionMismatch: {base} is partitioned here ({n}), not at the source"
                    ))
                }
                (n, Some(m)) if m == n => return Ok(()),
                (n, Some(m)) if m > n => {
                    return Err(format!(
                        "partitionMismatch: {base} has {m} partitions here, {n} at the source"
                    ))
                }
                (n, Some(_)) => b.update_partitions(&base, n).await,
                (n, None) => {
                    if b.topic_exists(&base).await.map_err(err)? {
                        return Err(format!(
                            "partitionMismatch: {base} is not partitioned here, {n} partitions at the source"
                        ));
                    }
                    b.create_partitioned_topic(&base, n).await
                }
            };
            // Another partition's stream may have changed it first: look
            // again.
            match done {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| format!("error: {base} keeps changing"), err))
    }

    fn topic_of<T>(req: &Request<T>, key: &str) -> Result<String, Status> {
        req.metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Status::invalid_argument(format!("missing {key}")))
    }
}

fn parse_topic(s: &str) -> Result<TopicName, Status> {
    let t: TopicName = s
        .parse()
        .map_err(|e| Status::invalid_argument(format!("topic {s:?}: {e}")))?;
    if !t.is_persistent() {
        return Err(Status::invalid_argument(format!(
            "{t} is not persistent; only persistent topics replicate"
        )));
    }
    Ok(t)
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ReplicateReply, Status>> + Send>>;

fn reply(r: Rr) -> ReplicateReply {
    ReplicateReply { reply: Some(r) }
}

#[tonic::async_trait]
impl Replication for Receiver {
    async fn handshake(
        &self,
        req: Request<HandshakeRequest>,
    ) -> Result<Response<HandshakeReply>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let topic = parse_topic(&r.topic)?;
        let answer = |r: Hs| Ok(Response::new(HandshakeReply { reply: Some(r) }));
        let source = match self.source_id(&r.source_cluster).await {
            Ok(s) => s,
            Err(e) => return answer(Hs::Refused(e.message().to_owned())),
        };
        match self.broker.lookup(&topic).await {
            Ok(owner) if owner.id != self.broker.info().id => {
                return answer(Hs::NotOwner(owner.http_url))
            }
            Ok(_) => {}
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        if let Err(why) = self.ensure_topic(&topic, r.partitions).await {
            return answer(Hs::Refused(why));
        }
        let t = self
            .broker
            .topic(&topic, true)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match t.replication_handshake(source, r.incarnation).await {
            Ok(next) => answer(Hs::Next(next)),
            Err(BrokerError::PreconditionFailed(why)) => {
                answer(Hs::Refused(format!("refused: {why}")))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    type ReplicateStream = ReplyStream;

    async fn replicate(
        &self,
        req: Request<Streaming<ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        self.authorize(&req)?;
        let topic = parse_topic(&Self::topic_of(&req, TOPIC_HEADER)?)?;
        let source_name = Self::topic_of(&req, SOURCE_HEADER)?;
        let source = self.source_id(&source_name).await?;
        let t = match self.broker.topic(&topic, false).await {
            Ok(t) => t,
            Err(BrokerError::NotOwner { owner, .. }) => {
                return Err(Status::failed_precondition(format!(
                    "not owner: {}",
                    owner.unwrap_or_default()
                )))
            }
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ReplicateReply, Status>>(256);
        let metrics = Arc::clone(&self.metrics);
        let cluster = source_name.clone();
        tokio::spawn(async move {
            let mut pending = FuturesOrdered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    // Replies first: they free the window.
                    biased;
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        let (r, last): (ReplicateReply, bool) = r;
                        if tx.send(Ok(r)).await.is_err() || last {
                            return;
                        }
                    }
                    m = inbound.next(), if reading && pending.len() < MAX_PENDING => {
                        let m: ReplicateRequest = match m {
                            Some(Ok(m)) => m,
                            // The sender went away or the stream broke:
                            // what was taken still gets written, in order.
                            Some(Err(_)) | None => { reading = false; continue; }
                        };
                        metrics.lag(&cluster, m.source_append_ms);
                        let len = m.batch.len() as u64;
                        let records = BatchHeader::parse(&m.batch).map_or(0, |h| h.record_count.max(0) as u64);
                        match t.submit_replicated(source, m.prev, m.batch).await {
                            Ok(ReplicatedAppend::Pending(p)) => {
                                let metrics = Arc::clone(&metrics);
                                let cluster = cluster.clone();
                                pending.push_back(async move {
                                    match p.await {
                                        Ok(at) => {
                                            metrics.stored(&cluster, records, len);
                                            (reply(Rr::StoredAt(at)), false)
                                        }
                                        Err(e) => (reply(Rr::Error(e.to_string())), true),
                                    }
                                }.boxed());
                            }
                            Ok(ReplicatedAppend::Duplicate) => {
                                metrics.duplicate(&cluster);
                                pending.push_back(futures::future::ready((reply(Rr::Duplicate(true)), false)).boxed());
                            }
                            Ok(ReplicatedAppend::OutOfOrder { next }) => {
                                metrics.out_of_order(&cluster);
                                pending.push_back(futures::future::ready((reply(Rr::OutOfOrderNext(next)), false)).boxed());
                            }
                            Err(e) => {
                                pending.push_back(futures::future::ready((reply(Rr::Error(e.to_string())), true)).boxed());
                                reading = false;
                            }
                        }
                    }
                    else => return,
                }
            }
        });
        let out: ReplyStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(Response::new(out))
    }
}
