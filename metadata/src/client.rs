//! The client every other crate uses to reach the metadata store.
//!
//! It follows the leader: a node that is not the leader answers `Unavailable`
//! with the leader's address, and the client moves there. Dead nodes are
//! skipped in turn. Requests are retried until `retry_for` has passed, so a
//! leader election looks like a slow request, not an error.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use magnetar_net::BearerToken;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::{MetaError, Result};
use crate::proto::metadata_client::MetadataClient;
use crate::proto::{self, watch_event};
use crate::server::LEADER_HEADER;
use crate::state::{Event, EventKind, KeyValue};

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long to keep retrying a request while no node can serve it.
    pub retry_for: Duration,
    /// Deadline of a single attempt.
    pub rpc_timeout: Duration,
    pub connect_timeout: Duration,
    /// The token every call carries (a superuser's), when the store
    /// requires one. Bookie clients made from this client carry it too.
    pub token: Option<String>,
    /// TLS of the calls, when the store listens with TLS (`--meta-tls`).
    pub tls: Option<magnetar_net::GrpcClientTls>,
    /// TLS of the bookie clients made from this client (`--bookie-tls`).
    pub bookie_tls: Option<magnetar_net::GrpcClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_millis(500),
            token: None,
            tls: None,
            bookie_tls: None,
        }
    }
}

/// A metadata RPC client whose calls carry the process's token.
type Rpc = MetadataClient<InterceptedService<Channel, BearerToken>>;

/// Conditions on a put.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// `Some(0)`: create only if absent; `Some(v)`: only if at version `v`.
    pub expected_version: Option<u64>,
    /// Bind the key to this session (0: none).
    pub session: u64,
}

#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    opts: ClientOptions,
    bearer: BearerToken,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

/// Splits `host:port,host:port`.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

impl MetaClient {
    /// A client of the group reachable at `endpoints` (`host:port` each).
    /// Connections are made lazily, so this succeeds while nodes are down.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self> {
        Self::with_options(endpoints, ClientOptions::default())
    }

    pub fn with_options<S: AsRef<str>>(endpoints: &[S], opts: ClientOptions) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(MetaError::Config("no metadata endpoints given".into()));
        }
        let bearer = BearerToken::new(opts.token.as_deref()).map_err(MetaError::Config)?;
        let mut channels = Vec::new();
        let mut names = Vec::new();
        for e in endpoints {
            let e = e.as_ref().trim();
            let ep = magnetar_net::grpc_endpoint(e, opts.tls.as_ref())
                .map_err(|err| MetaError::Config(format!("metadata endpoint: {err}")))?
                .connect_timeout(opts.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            channels.push(ep.connect_lazy());
            names.push(
                e.trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .to_string(),
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints: names,
                channels,
                current: AtomicUsize::new(0),
                opts,
                bearer,
            }),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The token this client's calls carry, for clients of the other
    /// internal planes made next to it.
    pub fn token(&self) -> Option<&str> {
        self.inner.opts.token.as_deref()
    }

    /// The TLS of bookie clients made next to this one, if the bookies
    /// listen with TLS.
    pub fn bookie_tls(&self) -> Option<&magnetar_net::GrpcClientTls> {
        self.inner.opts.bookie_tls.as_ref()
    }

    fn rpc(&self, idx: usize) -> Rpc {
        MetadataClient::with_interceptor(
            self.inner.channels[idx].clone(),
            self.inner.bearer.clone(),
        )
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
    }

    /// Picks the next node to try after `status` from node `idx`.
    fn redirect(&self, idx: usize, status: &Status) -> bool {
        let hinted = status
            .metadata()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|addr| self.inner.endpoints.iter().position(|e| e == addr))
            .filter(|&i| i != idx);
        let next = hinted.unwrap_or((idx + 1) % self.inner.endpoints.len());
        let _ =
            self.inner
                .current
                .compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed);
        hinted.is_some()
    }

    /// Runs `f` against the current node, following the leader and retrying
    /// until `retry_for` is spent.
    async fn call<T, F, Fut>(&self, retry_for: Duration, f: F) -> Result<T>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + retry_for;
        let mut delay = Duration::from_millis(20);
        let mut tried = 0usize;
        loop {
            let idx = self.inner.current.load(Ordering::Relaxed);
            // No single attempt may outlast the whole retry budget.
            let attempt = self
                .inner
                .opts
                .rpc_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(50));
            let res = tokio::time::timeout(attempt, f(self.rpc(idx))).await;
            let status = match res {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) if retryable(&status) => status,
                Ok(Err(status)) => return Err(MetaError::from_status(status)),
                Err(_) => Status::deadline_exceeded(format!(
                    "no reply from {} within {attempt:?}",
                    self.inner.endpoints[idx]
                )),
            };
            if Instant::now() >= deadline {
                return Err(MetaError::Unavailable(format!(
                    "gave up after {retry_for:?}; last error from {}: {}",
                    self.inner.endpoints[idx],
                    status.message()
                )));
            }
            tried += 1;
            let hinted = self.redirect(idx, &status);
            // Go straight to a named leader; back off once every node has
            // been tried, since then an election is probably under way.
            if !hinted || tried.is_multiple_of(self.inner.endpoints.len()) {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call(self.inner.opts.retry_for, |mut c| async move {
                c.get(proto::GetRequest { key: key.into() }).await
            })
            .await?;
        Ok(resp.into_inner().kv.map(kv_from_proto))
    }

    /// Writes unconditionally.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<KeyValue> {
        self.put_with(key, value, PutOptions::default()).await
    }

    /// Writes only if the key does not exist yet.
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<KeyValue> {
        self.put_with(
            key,
            value,
            PutOptions {
                expected_version: Some(0),
                session: 0,
            },
        )
        .await
    }

    /// Writes only if the key is at `version`.
    pub async fn compare_and_put(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Bytes>,
    ) -> Result<KeyValue> {
        self.put_with(
            key,
            value,
            PutOptions {
                expected_version: Some(version),
                session: 0,
            },
        )
        .await
    }

    pub async fn put_with(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        opts: PutOptions,
    ) -> Result<KeyValue> {
        let value: Bytes = value.into();
        let resp = self
            .call(self.inner.opts.retry_for, |mut c| {
                let req = proto::PutRequest {
                    key: key.into(),
                    value: value.clone(),
                    expected_version: opts.expected_version,
                    session: opts.session,
                };
                async move { c.put(req).await }
            })
            .await
            .map_err(|e| match e {
                MetaError::Server {
                    code: Code::NotFound,
                    ..
                } => MetaError::SessionNotFound(opts.session),
                e => e,
            })?
            .into_inner();
        if resp.succeeded {
            resp.kv
                .map(kv_from_proto)
                .ok_or_else(|| MetaError::Storage("put succeeded without a key".into()))
        } else {
            Err(MetaError::Conflict {
                key: key.into(),
                expected: opts.expected_version.unwrap_or(0),
                current: resp.kv.map(|kv| Box::new(kv_from_proto(kv))),
            })
        }
    }

    /// Deletes unconditionally; returns the deleted key, if there was one.
    pub async fn delete(&self, key: &str) -> Result<Option<KeyValue>> {
        self.delete_with(key, None).await
    }

    /// Deletes only if the key is at `version`.
    pub async fn compare_and_delete(&self, key: &str, version: u64) -> Result<Option<KeyValue>> {
        self.delete_with(key, Some(version)).await
    }

    async fn delete_with(
        &self,
        key: &str,
        expected_version: Option<u64>,
    ) -> Result<Option<KeyValue>> {
        let resp = self
            .call(self.inner.opts.retry_for, |mut c| async move {
                c.delete(proto::DeleteRequest {
                    key: key.into(),
                    expected_version,
                })
                .await
            })
            .await?
            .into_inner();
        if resp.succeeded {
            Ok(resp.kv.map(kv_from_proto))
        } else {
            Err(MetaError::Conflict {
                key: key.into(),
                expected: expected_version.unwrap_or(0),
                current: resp.kv.map(|kv| Box::new(kv_from_proto(kv))),
            })
        }
    }

    /// Every key under `prefix`, in key order, fetched page by page.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        self.list_with(prefix, false).await
    }

    /// Like [`list`](Self::list), without values.
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_with(prefix, true)
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect())
    }

    async fn list_with(&self, prefix: &str, keys_only: bool) -> Result<Vec<KeyValue>> {
        let mut out: Vec<KeyValue> = Vec::new();
        loop {
            let start_after = out.last().map(|kv| kv.key.clone()).unwrap_or_default();
            let resp = self
                .call(self.inner.opts.retry_for, |mut c| {
                    let req = proto::ListRequest {
                        prefix: prefix.into(),
                        start_after: start_after.clone(),
                        limit: 0,
                        keys_only,
                    };
                    async move { c.list(req).await }
                })
                .await?
                .into_inner();
            out.extend(resp.kvs.into_iter().map(kv_from_proto));
            if !resp.more {
                return Ok(out);
            }
        }
    }

    /// Changes under `prefix` from `start_revision` on (0: from now). The
    /// stream survives node failures by resuming elsewhere after the last
    /// revision it delivered; it ends with [`MetaError::Compacted`] only when
    /// every node in turn says it no longer keeps the events it needs.
    pub fn watch(
        &self,
        prefix: &str,
        start_revision: u64,
    ) -> impl Stream<Item = Result<Event>> + Send + Unpin + 'static {
        let (tx, rx) = mpsc::channel(256);
        let client = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move { client.run_watch(prefix, start_revision, tx).await });
        ReceiverStream::new(rx)
    }

    async fn run_watch(&self, prefix: String, start: u64, tx: mpsc::Sender<Result<Event>>) {
        let mut next = start;
        let mut delay = Duration::from_millis(50);
        // Nodes in a row that no longer keep the events at `next`: a node
        // restored from a snapshot has a shorter history than its peers.
        let mut compacted = 0usize;
        loop {
            let idx = self.inner.current.load(Ordering::Relaxed);
            let req = proto::WatchRequest {
                prefix: prefix.clone(),
                start_revision: next,
            };
            let mut rpc = self.rpc(idx);
            let opened = tokio::select! {
                _ = tx.closed() => return,
                r = rpc.watch(req) => r,
            };
            // Whatever ends this node's stream (or refuses to open it).
            let ended = match opened {
                Err(status) => status,
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        let item = tokio::select! {
                            _ = tx.closed() => return,
                            i = stream.next() => i,
                        };
                        let resp = match item {
                            Some(Ok(resp)) => resp,
                            Some(Err(status)) => break status,
                            None => break Status::unavailable("watch stream ended"),
                        };
                        delay = Duration::from_millis(50);
                        compacted = 0;
                        if next == 0 && resp.events.is_empty() {
                            next = resp.start_after + 1;
                        }
                        for ev in resp.events.into_iter().filter_map(event_from_proto) {
                            if ev.revision < next {
                                continue;
                            }
                            next = ev.revision + 1;
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            if ended.code() == Code::OutOfRange {
                compacted += 1;
                if compacted >= self.inner.endpoints.len() {
                    let _ = tx
                        .send(Err(MetaError::Compacted(ended.message().into())))
                        .await;
                    return;
                }
            }
            tracing::debug!(error = %ended, node = %self.inner.endpoints[idx], "watch: resuming elsewhere");
            self.redirect(idx, &ended);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Opens a session whose ephemeral keys vanish when it expires. A
    /// background task keeps it alive until the [`Session`] is dropped.
    pub async fn grant_session(&self, ttl: Duration) -> Result<Session> {
        let ttl_ms = ttl.as_millis() as u64;
        let resp = self
            .call(self.inner.opts.retry_for, |mut c| async move {
                c.grant_session(proto::GrantSessionRequest { ttl_ms }).await
            })
            .await?
            .into_inner();
        let (alive_tx, alive_rx) = watch::channel(true);
        let client = self.clone();
        let id = resp.session;
        let ttl = Duration::from_millis(resp.ttl_ms);
        let task = tokio::spawn(async move { client.keep_alive_loop(id, ttl, alive_tx).await });
        Ok(Session {
            id,
            ttl,
            alive: alive_rx,
            task,
            client: self.clone(),
        })
    }

    async fn keep_alive_loop(&self, id: u64, ttl: Duration, alive: watch::Sender<bool>) {
        let period = ttl / 3;
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            let res = self
                .call(period, |mut c| async move {
                    c.keep_alive(proto::KeepAliveRequest { session: id }).await
                })
                .await;
            if last_ok.elapsed() >= ttl && res.is_err() {
                // The store may already have expired it: claim nothing more.
                tracing::warn!(session = id, "no keep-alive succeeded for a whole TTL");
                let _ = alive.send(false);
                return;
            }
            match res {
                Ok(_) => last_ok = Instant::now(),
                Err(MetaError::Server {
                    code: Code::NotFound,
                    ..
                }) => {
                    tracing::warn!(session = id, "metadata session expired");
                    let _ = alive.send(false);
                    return;
                }
                Err(e) => tracing::warn!(session = id, error = %e, "session keep-alive failed"),
            }
        }
    }

    /// Ends a session now, deleting its keys.
    pub async fn revoke_session(&self, session: u64) -> Result<bool> {
        let resp = self
            .call(self.inner.opts.retry_for, |mut c| async move {
                c.revoke_session(proto::RevokeSessionRequest { session })
                    .await
            })
            .await?;
        Ok(resp.into_inner().existed)
    }

    /// The raft status of one node, asked directly, without retries.
    pub async fn node_status(&self, endpoint: &str) -> Result<proto::StatusResponse> {
        let idx = self
            .inner
            .endpoints
            .iter()
            .position(|e| e == endpoint)
            .ok_or_else(|| {
                MetaError::Config(format!("{endpoint} is not one of this client's endpoints"))
            })?;
        let mut rpc = self.rpc(idx);
        let fut = rpc.status(proto::StatusRequest {});
        match tokio::time::timeout(self.inner.opts.rpc_timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(MetaError::from_status(status)),
            Err(_) => Err(MetaError::Unavailable(format!("{endpoint} did not answer"))),
        }
    }
}

/// A liveness session. Keys put with its id are deleted when it ends: on
/// [`revoke`](Session::revoke), or when its keep-alives stop for longer than
/// its TTL (the process died, or lost the metadata store).
pub struct Session {
    id: u64,
    ttl: Duration,
    alive: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    client: MetaClient,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Session {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Resolves once the store has expired this session.
    pub async fn expired(&mut self) {
        while *self.alive.borrow_and_update() {
            if self.alive.changed().await.is_err() {
                return;
            }
        }
    }

    /// Puts `key` as an ephemeral key of this session.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<KeyValue> {
        self.put_owned(key, value, None).await
    }

    /// Creates `key` as an ephemeral key of this session, if it is absent.
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<KeyValue> {
        self.put_owned(key, value, Some(0)).await
    }

    async fn put_owned(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        expected_version: Option<u64>,
    ) -> Result<KeyValue> {
        let opts = PutOptions {
            expected_version,
            session: self.id,
        };
        self.client.put_with(key, value, opts).await
    }

    pub async fn revoke(self) -> Result<bool> {
        self.task.abort();
        self.client.revoke_session(self.id).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn kv_from_proto(kv: proto::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        create_revision: kv.create_revision,
        session: kv.session,
    }
}

fn event_from_proto(ev: proto::WatchEvent) -> Option<Event> {
    let kind = match watch_event::Kind::try_from(ev.kind).ok()? {
        watch_event::Kind::Put => EventKind::Put,
        watch_event::Kind::Delete => EventKind::Delete,
    };
    Some(Event {
        kind,
        kv: kv_from_proto(ev.kv?),
        revision: ev.revision,
    })
}
