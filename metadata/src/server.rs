//! A metadata node: raft, its storage, and the gRPC services.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::Stream;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::error::{MetaError, Result};
use crate::log_store::LogStore;
use crate::network::{Network, MAX_RAFT_MESSAGE};
use crate::proto::metadata_server::{Metadata, MetadataServer};
use crate::proto::raft_server::{Raft as RaftRpc, RaftServer};
use crate::proto::{self, RaftReply, RaftRequest};
use crate::sm_store::{SharedState, StateMachineStore, Update};
use crate::state::{Command, CommandResult, Event, EventKind, KeyValue};
use crate::types::{Raft, TypeConfig};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value, in bytes. Metadata is small; bulk data belongs in ledgers.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Session TTL bounds, in milliseconds.
pub const MIN_SESSION_TTL_MS: u64 = 500;
pub const MAX_SESSION_TTL_MS: u64 = 24 * 3600 * 1000;
/// Most keys in one List reply; clients page for more.
pub const LIST_PAGE: usize = 10_000;
/// The gRPC metadata key that names the leader's address when a node
/// refuses a request for not being the leader.
pub const LEADER_HEADER: &str = "x-magnetar-leader";

/// Raft timing and log compaction.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many new log entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, so that slightly
    /// lagging followers catch up without a snapshot transfer.
    pub keep_logs: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every: 10_000,
            keep_logs: 1_000,
        }
    }
}

/// How to run one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Every member of the group, this node included, by id. Empty means a
    /// single-node group at the listen address (the embedded mode).
    pub peers: BTreeMap<u64, String>,
    pub tuning: RaftTuning,
    /// Connection limits and the handshake timeout of the gRPC listener
    /// (clients and raft peers alike).
    pub limits: magnetar_net::ListenerLimits,
    /// Who may call this node (clients and raft peers alike).
    pub auth: magnetar_net::GrpcAuth,
    /// The token this node presents to its raft peers.
    pub peer_token: Option<String>,
    /// TLS of the gRPC listener, if it speaks TLS (`--meta-tls`).
    pub tls: Option<magnetar_net::TlsServer>,
    /// TLS of this node's calls to its raft peers.
    pub peer_tls: Option<magnetar_net::GrpcClientTls>,
    /// The role (token `sub` or certificate CN) each member must call
    /// with, by id: a raft message for node N from any other identity is
    /// refused, so that a holder of one member's credentials cannot speak
    /// as another. Empty: members are known by the id they send.
    pub peer_roles: BTreeMap<u64, String>,
}

impl NodeConfig {
    /// A group of one, node 1: the embedded mode of standalone and tests.
    pub fn single(listen: SocketAddr, data_dir: PathBuf) -> Self {
        NodeConfig {
            id: 1,
            listen,
            data_dir,
            peers: BTreeMap::new(),
            tuning: RaftTuning::default(),
            limits: magnetar_net::ListenerLimits::default(),
            auth: magnetar_net::GrpcAuth::default(),
            peer_token: None,
            tls: None,
            peer_tls: None,
            peer_roles: BTreeMap::new(),
        }
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            MetaError::Config(format!("peer {part:?} is not of the form ID=HOST:PORT"))
        })?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| MetaError::Config(format!("peer id {id:?} is not a number")))?;
        if id == 0 {
            return Err(MetaError::Config("peer id 0 is reserved".into()));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(MetaError::Config(format!(
                "peer {id} address {addr:?} is not HOST:PORT"
            )));
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(MetaError::Config(format!("peer id {id} is listed twice")));
        }
    }
    Ok(peers)
}

/// A running metadata node.
pub struct MetaNode {
    shared: Arc<NodeShared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    leases: tokio::task::JoinHandle<()>,
    reads: tokio::task::JoinHandle<()>,
}

pub(crate) struct NodeShared {
    pub(crate) id: u64,
    pub(crate) raft: Raft,
    pub(crate) state: Arc<SharedState>,
    log: LogStore,
    peers: BTreeMap<u64, String>,
    /// See `NodeConfig::peer_roles`.
    peer_roles: BTreeMap<u64, String>,
    /// Session deadlines, kept by the leader only. Expiry is decided here
    /// and then replicated as a `RevokeSession` command, so every node
    /// deletes the same keys at the same log position.
    deadlines: Mutex<HashMap<u64, Instant>>,
    reads: ReadBarrier,
    /// Set on shutdown; ends open watch streams so connections can close.
    pub(crate) closing: watch::Sender<bool>,
    pub(crate) proposals: crate::metrics::ProposalLatency,
}

/// Coalesces linearizable reads: one quorum check serves every read that
/// arrived before the check started, as etcd batches ReadIndex requests.
/// Without it, concurrent reads queue one heartbeat round each.
struct ReadBarrier {
    /// Tickets handed out to reads so far.
    tickets: AtomicU64,
    /// The highest ticket whose check has finished, and its outcome.
    done: watch::Sender<(u64, Option<Status>)>,
    kick: Notify,
}

impl ReadBarrier {
    fn new() -> Self {
        Self {
            tickets: AtomicU64::new(0),
            done: watch::channel((0, None)).0,
            kick: Notify::new(),
        }
    }

    async fn wait(&self) -> Result<(), Status> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut done = self.done.subscribe();
        self.kick.notify_one();
        let outcome = done
            .wait_for(|(upto, _)| *upto >= ticket)
            .await
            .map_err(|_| Status::unavailable("node is stopping"))?;
        match &outcome.1 {
            None => Ok(()),
            Some(status) => Err(status.clone()),
        }
    }
}

/// Longest a quorum check may take before the reads waiting on it fail with
/// `UNAVAILABLE` (and the client retries), e.g. when a new leader is cut off
/// before its first entry commits.
const READ_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the quorum checks that [`ReadBarrier::wait`] asks for, one at a time.
async fn read_barrier_loop(node: Arc<NodeShared>) {
    loop {
        node.reads.kick.notified().await;
        loop {
            // Every ticket up to here was taken before this check starts,
            // so the check's outcome is valid for all of them.
            let upto = node.reads.tickets.load(Ordering::SeqCst);
            if upto <= node.reads.done.borrow().0 {
                break;
            }
            let outcome = match tokio::time::timeout(READ_CHECK_TIMEOUT, node.read_barrier()).await
            {
                Ok(r) => r.err(),
                Err(_) => Some(Status::unavailable(
                    "leadership check timed out; the group may be electing a leader",
                )),
            };
            node.reads.done.send_replace((upto, outcome));
        }
    }
}

impl MetaNode {
    pub async fn start(cfg: NodeConfig) -> Result<Self> {
        if cfg.id == 0 {
            return Err(MetaError::Config("node id must be at least 1".into()));
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let mut peers = cfg.peers.clone();
        if peers.is_empty() {
            peers.insert(cfg.id, addr.to_string());
        }
        if !peers.contains_key(&cfg.id) {
            return Err(MetaError::Config(format!(
                "--peers must include this node's own id {}",
                cfg.id
            )));
        }

        std::fs::create_dir_all(&cfg.data_dir)?;
        let log = LogStore::open(&cfg.data_dir.join("raft-log"))
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        let sm = StateMachineStore::open(&cfg.data_dir.join("state"))?;
        let state = sm.shared();

        let t = &cfg.tuning;
        let config = Config {
            cluster_name: "magnetar-meta".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: t.keep_logs,
            purge_batch_size: 64,
            max_payload_entries: 64,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::Config(e.to_string()))?;

        let raft = Raft::new(
            cfg.id,
            Arc::new(config),
            Network {
                id: cfg.id,
                bearer: magnetar_net::BearerToken::new(cfg.peer_token.as_deref())
                    .map_err(MetaError::Config)?,
                tls: cfg.peer_tls.clone(),
            },
            log.clone(),
            sm,
        )
        .await
        .map_err(|e| MetaError::Storage(e.to_string()))?;

        let shared = Arc::new(NodeShared {
            id: cfg.id,
            raft: raft.clone(),
            state,
            log,
            peers: peers.clone(),
            peer_roles: cfg.peer_roles.clone(),
            deadlines: Mutex::new(HashMap::new()),
            reads: ReadBarrier::new(),
            closing: watch::channel(false).0,
            proposals: Default::default(),
        });

        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let metadata = MetadataServer::new(MetaService {
            node: shared.clone(),
        })
        // Room above the value limit, so that an oversized value is refused
        // with our own message rather than a decoder error.
        .max_decoding_message_size(MAX_VALUE_BYTES * 8)
        .max_encoding_message_size(usize::MAX);
        let raft_rpc = RaftServer::new(RaftService {
            node: shared.clone(),
        })
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
        // Socket options are set on each accepted stream: the builder's own
        // `tcp_nodelay` only applies to listeners tonic binds itself, and
        // without it every reply waits out a delayed ACK (~40 ms).
        let incoming = magnetar_net::grpc_incoming(
            listener,
            magnetar_net::Admission::new("metadata gRPC", cfg.limits.clone()),
            Some(Duration::from_secs(10)),
            cfg.tls.clone(),
        );
        let auth = cfg.auth.clone();
        let server = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                .add_service(InterceptedService::new(metadata, auth.clone()))
                .add_service(InterceptedService::new(raft_rpc, auth))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "metadata gRPC server stopped");
            }
        });

        if !raft
            .is_initialized()
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))?
        {
            let members: BTreeMap<u64, BasicNode> = peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            // Every node initialises with the same membership, which openraft
            // allows; whichever wins the election leads.
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(MetaError::Config(e.to_string())),
            }
        }

        let leases = tokio::spawn(lease_keeper(shared.clone()));
        let reads = tokio::spawn(read_barrier_loop(shared.clone()));
        tracing::info!(id = cfg.id, %addr, "metadata node started");
        Ok(Self {
            shared,
            addr,
            shutdown: Some(shutdown_tx),
            server,
            leases,
            reads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// This node's metrics and health, for an HTTP listener.
    pub fn metrics(&self) -> crate::metrics::MetaMetrics {
        crate::metrics::MetaMetrics {
            node: Arc::clone(&self.shared),
        }
    }

    /// Waits until the group has a leader that this node knows of.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let mut metrics = self.shared.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = metrics.borrow().current_leader {
                    return Ok(l);
                }
                if metrics.changed().await.is_err() {
                    return Err(MetaError::Unavailable("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| MetaError::Unavailable(format!("no leader within {timeout:?}")))?
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.shared.closing.send_replace(true);
        self.leases.abort();
        self.reads.abort();
        // Graceful stop waits for clients to hang up; do not wait forever.
        if tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        if let Err(e) = self.shared.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

impl Drop for MetaNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.leases.abort();
        self.reads.abort();
    }
}

impl NodeShared {
    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    fn not_leader(&self, leader: Option<u64>, node: Option<&BasicNode>) -> Status {
        let addr = node
            .map(|n| n.addr.clone())
            .or_else(|| leader.and_then(|l| self.peers.get(&l).cloned()));
        let msg = match (leader, &addr) {
            (Some(l), Some(a)) => format!("node {} is not the leader; node {l} at {a} is", self.id),
            _ => format!("node {} is not the leader and knows of none yet", self.id),
        };
        let mut status = Status::unavailable(msg);
        if let Some(v) = addr.and_then(|a| a.parse().ok()) {
            status.metadata_mut().insert(LEADER_HEADER, v);
        }
        status
    }

    fn current_not_leader(&self) -> Status {
        let leader = self.raft.metrics().borrow().current_leader;
        self.not_leader(leader, None)
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, Status> {
        let start = std::time::Instant::now();
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                self.proposals.since(start);
                Ok(resp.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(self.not_leader(f.leader_id, f.leader_node.as_ref()))
            }
            Err(RaftError::APIError(e)) => Err(Status::internal(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(Status::unavailable(format!("raft stopped: {e}"))),
        }
    }

    /// Confirms leadership with a quorum and waits until everything committed
    /// before the read is applied here.
    async fn read_barrier(&self) -> Result<(), Status> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(self.not_leader(f.leader_id, f.leader_node.as_ref()))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Status::unavailable(format!("no quorum: {e}")))
            }
            Err(RaftError::Fatal(e)) => Err(Status::unavailable(format!("raft stopped: {e}"))),
        }
    }
}

/// Runs on every node; acts only while this node leads.
async fn lease_keeper(node: Arc<NodeShared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = 0;
    loop {
        tick.tick().await;
        let current_term = node.raft.metrics().borrow().current_term;
        if !node.is_leader() || current_term != term {
            term = current_term;
            // A new leader starts every session's clock afresh, as etcd does,
            // so that a failover never expires a healthy client.
            node.deadlines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            if !node.is_leader() {
                continue;
            }
        }
        let sessions: Vec<(u64, u64)> = node
            .state
            .read()
            .kv
            .data
            .sessions
            .iter()
            .map(|(id, s)| (*id, s.ttl_ms))
            .collect();
        let now = Instant::now();
        let expired: Vec<u64> = {
            let mut deadlines = node
                .deadlines
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let live: std::collections::HashSet<u64> = sessions.iter().map(|s| s.0).collect();
            deadlines.retain(|id, _| live.contains(id));
            sessions
                .iter()
                .filter(|(id, ttl)| {
                    *deadlines
                        .entry(*id)
                        .or_insert(now + Duration::from_millis(*ttl))
                        <= now
                })
                .map(|s| s.0)
                .collect()
        };
        for session in expired {
            tracing::info!(session, "session expired");
            if let Err(e) = node.write(Command::RevokeSession { session }).await {
                tracing::warn!(session, error = %e, "could not revoke expired session");
            }
        }
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Status::invalid_argument(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

pub(crate) fn kv_to_proto(kv: KeyValue) -> proto::KeyValue {
    proto::KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        create_revision: kv.create_revision,
        session: kv.session,
    }
}

fn event_to_proto(ev: &Event) -> proto::WatchEvent {
    proto::WatchEvent {
        kind: match ev.kind {
            EventKind::Put => proto::watch_event::Kind::Put as i32,
            EventKind::Delete => proto::watch_event::Kind::Delete as i32,
        },
        kv: Some(kv_to_proto(ev.kv.clone())),
        revision: ev.revision,
    }
}

fn unexpected(r: CommandResult) -> Status {
    Status::internal(format!("unexpected command result {r:?}"))
}

struct MetaService {
    node: Arc<NodeShared>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchResponse, Status>> + Send>>;

/// Events sent to one watcher in one reply, at most.
const WATCH_BATCH: usize = 1000;

#[tonic::async_trait]
impl Metadata for MetaService {
    async fn get(
        &self,
        req: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let req = req.into_inner();
        check_key(&req.key)?;
        self.node.reads.wait().await?;
        let st = self.node.state.read();
        Ok(Response::new(proto::GetResponse {
            kv: st.kv.get(&req.key).cloned().map(kv_to_proto),
            revision: st.kv.revision(),
        }))
    }

    async fn put(
        &self,
        req: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let req = req.into_inner();
        check_key(&req.key)?;
        if req.value.len() > MAX_VALUE_BYTES {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                req.value.len()
            )));
        }
        let cmd = Command::Put {
            key: req.key,
            value: req.value,
            expected_version: req.expected_version,
            session: req.session,
        };
        match self.node.write(cmd).await? {
            CommandResult::Put {
                succeeded,
                kv,
                revision,
            } => Ok(Response::new(proto::PutResponse {
                succeeded,
                kv: kv.map(kv_to_proto),
                revision,
            })),
            CommandResult::SessionNotFound { session } => Err(Status::not_found(format!(
                "session {session} does not exist or has expired"
            ))),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let req = req.into_inner();
        check_key(&req.key)?;
        let cmd = Command::Delete {
            key: req.key,
            expected_version: req.expected_version,
        };
        match self.node.write(cmd).await? {
            CommandResult::Delete {
                succeeded,
                kv,
                revision,
            } => Ok(Response::new(proto::DeleteResponse {
                succeeded,
                kv: kv.map(kv_to_proto),
                revision,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn list(
        &self,
        req: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let req = req.into_inner();
        if req.prefix.len() > MAX_KEY_BYTES {
            return Err(Status::invalid_argument(
                "prefix is longer than a key may be",
            ));
        }
        let limit = match req.limit as usize {
            0 => LIST_PAGE,
            n => n.min(LIST_PAGE),
        };
        self.node.reads.wait().await?;
        let st = self.node.state.read();
        let (kvs, more) = st.kv.list(&req.prefix, &req.start_after, limit);
        Ok(Response::new(proto::ListResponse {
            kvs: kvs
                .into_iter()
                .map(|mut kv| {
                    if req.keys_only {
                        kv.value = bytes::Bytes::new();
                    }
                    kv_to_proto(kv)
                })
                .collect(),
            more,
            revision: st.kv.revision(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let prefix = req.prefix;
        let (rx, backlog, next) = {
            let st = self.node.state.read();
            let rx = self.node.state.subscribe(&st);
            let now = st.kv.revision() + 1;
            let start = if req.start_revision == 0 {
                now
            } else {
                req.start_revision
            };
            let backlog = st.kv.history.since(start, &prefix).map_err(|oldest| {
                Status::out_of_range(format!(
                    "revision {start} is compacted on node {}; the oldest available is {oldest}",
                    self.node.id
                ))
            })?;
            (rx, backlog, start)
        };
        let (tx, out) = mpsc::channel(16);
        let node = self.node.clone();
        let first = proto::WatchResponse {
            events: Vec::new(),
            start_after: next - 1,
        };
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() || send_events(&tx, &backlog).await.is_err() {
                return;
            }
            forward_updates(node, prefix, rx, next, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn grant_session(
        &self,
        req: Request<proto::GrantSessionRequest>,
    ) -> Result<Response<proto::GrantSessionResponse>, Status> {
        let ttl_ms = req.into_inner().ttl_ms;
        if !(MIN_SESSION_TTL_MS..=MAX_SESSION_TTL_MS).contains(&ttl_ms) {
            return Err(Status::invalid_argument(format!(
                "session TTL {ttl_ms} ms is outside {MIN_SESSION_TTL_MS}..={MAX_SESSION_TTL_MS} ms"
            )));
        }
        match self.node.write(Command::GrantSession { ttl_ms }).await? {
            CommandResult::SessionGranted { session, ttl_ms } => {
                self.node
                    .deadlines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(session, Instant::now() + Duration::from_millis(ttl_ms));
                Ok(Response::new(proto::GrantSessionResponse {
                    session,
                    ttl_ms,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn keep_alive(
        &self,
        req: Request<proto::KeepAliveRequest>,
    ) -> Result<Response<proto::KeepAliveResponse>, Status> {
        let session = req.into_inner().session;
        // A quorum check, not local belief: a leader cut off from the group
        // must not keep sessions alive that the new leader is expiring. The
        // check also waits until this node has applied every committed
        // grant, so a new leader does not report a live session missing.
        self.node.reads.wait().await?;
        if !self.node.is_leader() {
            return Err(self.node.current_not_leader());
        }
        let ttl_ms = self
            .node
            .state
            .read()
            .kv
            .data
            .sessions
            .get(&session)
            .map(|s| s.ttl_ms)
            .ok_or_else(|| {
                Status::not_found(format!("session {session} does not exist or has expired"))
            })?;
        self.node
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session, Instant::now() + Duration::from_millis(ttl_ms));
        Ok(Response::new(proto::KeepAliveResponse { ttl_ms }))
    }

    async fn revoke_session(
        &self,
        req: Request<proto::RevokeSessionRequest>,
    ) -> Result<Response<proto::RevokeSessionResponse>, Status> {
        let session = req.into_inner().session;
        match self.node.write(Command::RevokeSession { session }).await? {
            CommandResult::SessionRevoked { existed } => {
                Ok(Response::new(proto::RevokeSessionResponse { existed }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow().clone();
        let bounds = self
            .node
            .log
            .bounds()
            .map_err(|e| Status::internal(e.to_string()))?;
        let members: Vec<proto::Member> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| proto::Member {
                id: *id,
                addr: n.addr.clone(),
            })
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| members.iter().find(|x| x.id == l).map(|x| x.addr.clone()))
            .unwrap_or_default();
        let st = self.node.state.read();
        Ok(Response::new(proto::StatusResponse {
            id: self.node.id,
            leader: m.current_leader,
            leader_addr,
            state: format!("{:?}", m.state),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            log_entries: bounds.map_or(0, |(first, last)| last - first + 1),
            revision: st.kv.revision(),
            keys: st.kv.data.kvs.len() as u64,
            members,
        }))
    }
}

async fn send_events(
    tx: &mpsc::Sender<Result<proto::WatchResponse, Status>>,
    events: &[Event],
) -> Result<(), ()> {
    for chunk in events.chunks(WATCH_BATCH) {
        let resp = proto::WatchResponse {
            events: chunk.iter().map(event_to_proto).collect(),
            start_after: 0,
        };
        tx.send(Ok(resp)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Streams applied changes to one watcher from revision `next` on, until the
/// watcher goes away.
async fn forward_updates(
    node: Arc<NodeShared>,
    prefix: String,
    mut rx: broadcast::Receiver<Update>,
    mut next: u64,
    tx: mpsc::Sender<Result<proto::WatchResponse, Status>>,
) {
    let mut closing = node.closing.subscribe();
    loop {
        let update = tokio::select! {
            _ = tx.closed() => return,
            _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                let _ = tx.send(Err(Status::unavailable("metadata node is shutting down"))).await;
                return;
            }
            u = rx.recv() => u,
        };
        let events: Vec<Event> = match update {
            Ok(Update::Events(evs)) => evs
                .iter()
                .filter(|e| e.revision >= next && e.kv.key.starts_with(&prefix))
                .cloned()
                .collect(),
            Ok(Update::Reset { compacted }) => {
                if next <= compacted {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "node {} installed a snapshot past revision {next}; resume the watch elsewhere",
                            node.id
                        ))))
                        .await;
                    return;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Too slow for the live feed: catch up from the history.
                let caught_up = {
                    let st = node.state.read();
                    rx = node.state.subscribe(&st);
                    st.kv
                        .history
                        .since(next, &prefix)
                        .map(|evs| (evs, st.kv.revision() + 1))
                };
                match caught_up {
                    Ok((evs, after)) => {
                        next = after;
                        if send_events(&tx, &evs).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(oldest) => {
                        let _ = tx
                            .send(Err(Status::out_of_range(format!(
                                "watcher fell behind: revision {next} is compacted; the oldest available is {oldest}"
                            ))))
                            .await;
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Some(last) = events.last() {
            next = last.revision + 1;
            if send_events(&tx, &events).await.is_err() {
                return;
            }
        }
    }
}

struct RaftService {
    node: Arc<NodeShared>,
}

impl RaftService {
    /// Refuses a message for a member sent by another member's identity
    /// (see `NodeConfig::peer_roles`), then senders outside the group, and
    /// decodes the payload.
    fn accept<T: DeserializeOwned>(&self, req: Request<RaftRequest>) -> Result<T, Status> {
        if let Some(want) = self.node.peer_roles.get(&req.get_ref().from) {
            let caller = req.extensions().get::<magnetar_net::CallerRole>();
            if caller.map(|c| &*c.0) != Some(want.as_str()) {
                return Err(Status::permission_denied(format!(
                    "raft messages of node {} come from role {want:?} only",
                    req.get_ref().from
                )));
            }
        }
        let req = req.into_inner();
        let known = self.node.peers.contains_key(&req.from)
            || self
                .node
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&req.from)
                .is_some();
        if !known {
            return Err(Status::permission_denied(format!(
                "unknown peer {}: node {} serves the group of nodes {:?}",
                req.from,
                self.node.id,
                self.node.peers.keys().collect::<Vec<_>>()
            )));
        }
        postcard::from_bytes(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
    }

    fn check_sender(from: u64, claimed: u64) -> Result<(), Status> {
        if from != claimed {
            return Err(Status::invalid_argument(format!(
                "raft message from node {from} claims to come from node {claimed}"
            )));
        }
        Ok(())
    }

    fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftReply>, Status> {
        postcard::to_allocvec(v)
            .map(|payload| {
                Response::new(RaftReply {
                    payload: payload.into(),
                })
            })
            .map_err(|e| Status::internal(format!("encoding raft reply: {e}")))
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let from = req.get_ref().from;
        let rpc: openraft::raft::AppendEntriesRequest<TypeConfig> = self.accept(req)?;
        Self::check_sender(from, rpc.vote.leader_id.node_id)?;
        Self::reply(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let from = req.get_ref().from;
        let rpc: openraft::raft::VoteRequest<u64> = self.accept(req)?;
        Self::check_sender(from, rpc.vote.leader_id.node_id)?;
        Self::reply(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let from = req.get_ref().from;
        let rpc: openraft::raft::InstallSnapshotRequest<TypeConfig> = self.accept(req)?;
        Self::check_sender(from, rpc.vote.leader_id.node_id)?;
        Self::reply(&self.node.raft.install_snapshot(rpc).await)
    }
}
