//! The bookie process: storage served over gRPC, registration in the
//! metadata store, the disk-usage watch, garbage collection of deleted
//! ledgers, and the auditor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use magnetar_metadata::MetaClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{BookieError, Result};
use crate::meta::{self, BookieInfo};
use crate::proto::bookie_server::{Bookie, BookieServer as BookieGrpc};
use crate::proto::{self, Code};
use crate::storage::{Storage, StorageConfig, StoredEntry};

/// Most entries one read request may ask for.
pub const MAX_READ_BATCH: usize = 10_000;
/// Largest gRPC message a bookie accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct BookieConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// The address registered for clients; `listen`'s bound address if
    /// unset.
    pub advertised: Option<String>,
    pub data_dir: PathBuf,
    pub meta: Vec<String>,
    pub storage: StorageConfig,
    /// Fraction of the disk in use above which the bookie turns read-only.
    pub disk_usage_threshold: f64,
    pub disk_check_interval: Duration,
    /// How often deleted ledgers are looked for and entry logs compacted.
    pub gc_interval: Duration,
    /// TTL of the registration: how soon a dead bookie is noticed.
    pub session_ttl: Duration,
    pub auditor: crate::auditor::AuditorConfig,
    /// Connection limits and the handshake timeout of the gRPC listener.
    pub limits: magnetar_net::ListenerLimits,
    /// Who may call this bookie.
    pub auth: magnetar_net::GrpcAuth,
    /// The token this bookie presents to the metadata store (and to other
    /// bookies, when it re-replicates).
    pub token: Option<String>,
    /// TLS of the gRPC listener, if it speaks TLS (`--bookie-tls`).
    pub tls: Option<magnetar_net::TlsServer>,
    /// TLS of this bookie's calls to the metadata store and to other
    /// bookies, when they listen with TLS.
    pub meta_tls: Option<magnetar_net::GrpcClientTls>,
    pub bookie_tls: Option<magnetar_net::GrpcClientTls>,
}

impl BookieConfig {
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf, meta: Vec<String>) -> Self {
        Self {
            id,
            listen,
            advertised: None,
            data_dir,
            meta,
            storage: StorageConfig::default(),
            disk_usage_threshold: 0.95,
            disk_check_interval: Duration::from_secs(10),
            gc_interval: Duration::from_secs(60),
            session_ttl: Duration::from_secs(5),
            auditor: crate::auditor::AuditorConfig::default(),
            limits: magnetar_net::ListenerLimits::default(),
            auth: magnetar_net::GrpcAuth::default(),
            token: None,
            tls: None,
            meta_tls: None,
            bookie_tls: None,
        }
    }
}

/// A running bookie.
pub struct BookieServer {
    id: u64,
    addr: SocketAddr,
    storage: Arc<Storage>,
    registered: Arc<std::sync::atomic::AtomicBool>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for BookieServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookieServer")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl BookieServer {
    pub async fn start(cfg: BookieConfig) -> Result<Self> {
        if cfg.id == 0 {
            return Err(BookieError::Config("bookie id must be at least 1".into()));
        }
        let dir = cfg.data_dir.clone();
        let scfg = cfg.storage.clone();
        let storage = Arc::new(
            tokio::task::spawn_blocking(move || Storage::open(&dir, scfg))
                .await
                .map_err(|e| BookieError::Storage(e.to_string()))??,
        );
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let advertised = cfg.advertised.clone().unwrap_or_else(|| addr.to_string());
        let meta_client = MetaClient::with_options(
            &cfg.meta,
            magnetar_metadata::ClientOptions {
                token: cfg.token.clone(),
                tls: cfg.meta_tls.clone(),
                bookie_tls: cfg.bookie_tls.clone(),
                ..Default::default()
            },
        )?;

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let svc = BookieGrpc::new(Service {
            id: cfg.id,
            storage: storage.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(ADD_IN_FLIGHT_KIB as usize)),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let incoming = magnetar_net::grpc_incoming(
            listener,
            magnetar_net::Admission::new("bookie gRPC", cfg.limits.clone()),
            Some(Duration::from_secs(10)),
            cfg.tls.clone(),
        );
        let mut srv_stop = stop_rx.clone();
        let auth = cfg.auth.clone();
        tasks.push(tokio::spawn(async move {
            // Pings find peers that went away without a FIN, so that their
            // connection slots come back.
            let res = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    svc, auth,
                ))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = srv_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "bookie gRPC server failed");
            }
        }));

        // Persistent info first: the auditor learns of every bookie that
        // ever served, so that it notices when one is gone.
        let info = BookieInfo {
            id: cfg.id,
            addr: advertised.clone(),
            read_only: storage.is_read_only(),
        };
        meta_client
            .put(
                &meta::bookie_info_key(cfg.id),
                serde_json::to_vec(&info).unwrap_or_default(),
            )
            .await?;
        let (ro_tx, ro_rx) = watch::channel(false);
        let registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.push(tokio::spawn(register_loop(
            meta_client.clone(),
            info,
            Arc::clone(&registered),
            cfg.session_ttl,
            ro_rx,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(disk_watch(
            storage.clone(),
            cfg.disk_usage_threshold,
            cfg.disk_check_interval,
            ro_tx,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(gc_loop(
            storage.clone(),
            meta_client.clone(),
            cfg.gc_interval,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::auditor::run(
            cfg.id,
            meta_client,
            cfg.auditor.clone(),
            stop_rx,
        )));
        tracing::info!(id = cfg.id, %addr, "bookie serving");
        Ok(Self {
            id: cfg.id,
            addr,
            storage,
            registered,
            stop,
            tasks,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// This bookie's metrics and health, for an HTTP listener.
    pub fn metrics(&self) -> crate::metrics::BookieMetrics {
        crate::metrics::BookieMetrics {
            storage: Arc::clone(&self.storage),
            registered: Arc::clone(&self.registered),
        }
    }

    /// Stops serving, withdraws the registration and flushes storage.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            // Graceful shutdown waits for open add streams, which writers
            // keep open; past a short grace they are cut.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let storage = self.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.close()).await;
    }
}

/// Keeps the ephemeral registration up, re-creating it if the session is
/// lost, and rewriting it when the read-only flag flips.
async fn register_loop(
    client: MetaClient,
    mut info: BookieInfo,
    registered: Arc<std::sync::atomic::AtomicBool>,
    ttl: Duration,
    mut read_only: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let key = meta::bookie_available_key(info.id);
    loop {
        let mut session = match client.grant_session(ttl).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a metadata session; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = crate::server::stopped(&mut stop) => return,
                }
            }
        };
        loop {
            info.read_only = *read_only.borrow_and_update();
            let value = serde_json::to_vec(&info).unwrap_or_default();
            if let Err(e) = session.put(&key, value).await {
                registered.store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "registration failed; retrying");
                break;
            }
            registered.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(id = info.id, read_only = info.read_only, "registered");
            tokio::select! {
                _ = session.expired() => {
                    registered.store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!("metadata session expired; registering again");
                    break;
                }
                r = read_only.changed() => if r.is_err() { return },
                _ = crate::server::stopped(&mut stop) => {
                    let _ = session.revoke().await;
                    return;
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn disk_usage(path: &std::path::Path) -> Option<f64> {
    let s = rustix::fs::statvfs(path).ok()?;
    if s.f_blocks == 0 {
        return None;
    }
    Some(1.0 - s.f_bavail as f64 / s.f_blocks as f64)
}

async fn disk_watch(
    storage: Arc<Storage>,
    threshold: f64,
    every: Duration,
    ro: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Some(used) = disk_usage(storage.data_dir()) {
            // A little hysteresis, so that a disk at the line does not flap.
            let was = storage.is_disk_read_only();
            let now = if was {
                used > threshold - 0.02
            } else {
                used > threshold
            };
            if now != was {
                tracing::warn!(
                    used,
                    threshold,
                    read_only = now,
                    "disk usage crossed the threshold"
                );
                storage.set_read_only(now);
                let _ = ro.send(now);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::server::stopped(&mut stop) => return,
        }
    }
}

/// Deletes local ledgers whose metadata is gone (a delete that missed this
/// bookie, because it was down), then compacts entry logs.
async fn gc_loop(
    storage: Arc<Storage>,
    client: MetaClient,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::server::stopped(&mut stop) => return,
        }
        // Local first, then metadata: a ledger's metadata exists before its
        // first entry, so a ledger seen locally and absent from a later
        // listing has been deleted.
        let local = storage.ledgers();
        // A store that never allocated a ledger id cannot be the one these
        // ledgers were written under (a bookie pointed at the wrong
        // metadata store must not wipe itself).
        match client.get(meta::LEDGER_IDGEN_KEY).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                if !local.is_empty() {
                    tracing::warn!(
                        ledgers = local.len(),
                        "gc: the metadata store has never allocated a ledger; keeping local ledgers"
                    );
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "gc: metadata store unreachable");
                continue;
            }
        }
        let listed = match client.list_keys(meta::LEDGER_META_PREFIX).await {
            Ok(keys) => keys
                .iter()
                .filter_map(|k| meta::ledger_id_from_key(k))
                .collect::<std::collections::HashSet<u64>>(),
            Err(e) => {
                tracing::warn!(error = %e, "gc: cannot list ledgers");
                continue;
            }
        };
        let s = storage.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(usize, usize)> {
            let mut deleted = 0;
            for l in local {
                if !listed.contains(&l) {
                    s.delete_ledger(l)?;
                    deleted += 1;
                }
            }
            Ok((deleted, s.compact()?))
        })
        .await;
        match res {
            Ok(Ok((d, c))) if d > 0 || c > 0 => {
                tracing::info!(deleted_ledgers = d, compacted_logs = c, "gc pass")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gc pass failed"),
            Err(e) => tracing::warn!(error = %e, "gc task failed"),
        }
    }
}

struct Service {
    id: u64,
    storage: Arc<Storage>,
    /// KiB of add payloads accepted and not yet answered, bounded across
    /// every stream: past it the bookie stops reading Add streams, and
    /// HTTP/2 flow control holds the writers back, instead of queueing
    /// toward the journal without end.
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Add payloads the bookie holds in memory at once, on their way through
/// the journal, in KiB.
const ADD_IN_FLIGHT_KIB: u32 = 256 * 1024;

/// Permits of `bytes` of payload: a KiB each, at least one, and never
/// more than the whole budget (a single huge add still goes, alone).
fn kib_permits(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, ADD_IN_FLIGHT_KIB)
}

fn add_result(ledger: u64, entry: u64, err: Option<&BookieError>) -> proto::AddResult {
    proto::AddResult {
        ledger_id: ledger,
        entry_id: entry,
        code: err.map_or(Code::Ok, BookieError::code) as i32,
        message: err.map(|e| e.to_string()).unwrap_or_default(),
    }
}

type AddStream = Pin<Box<dyn Stream<Item = Result<proto::AddResponse, Status>> + Send>>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl Bookie for Service {
    type AddStream = AddStream;

    async fn add(
        &self,
        req: Request<Streaming<proto::AddRequest>>,
    ) -> Result<Response<AddStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<proto::AddResponse, Status>>(4096);
        let storage = self.storage.clone();
        let budget = self.in_flight.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "add stream ended");
                        break;
                    }
                };
                if msg.lac >= 0 && msg.entries.is_empty() {
                    storage.update_lac(msg.ledger_id, msg.lac);
                    continue;
                }
                let bytes = msg.entries.iter().map(|e| e.payload.len()).sum();
                let Ok(permit) = budget.clone().acquire_many_owned(kib_permits(bytes)).await else {
                    break;
                };
                let entries = msg
                    .entries
                    .into_iter()
                    .map(|e| StoredEntry {
                        ledger: e.ledger_id,
                        entry: e.entry_id,
                        lac: e.lac,
                        crc: e.crc,
                        payload: e.payload,
                    })
                    .collect();
                let out = storage.add(entries, msg.recovery);
                let mut results: Vec<proto::AddResult> = out
                    .refused
                    .iter()
                    .map(|(l, e, err)| add_result(*l, *e, Some(err)))
                    .collect();
                match out.durable {
                    None => {
                        if tx.send(Ok(proto::AddResponse { results })).await.is_err() {
                            break;
                        }
                    }
                    Some(durable) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let res = durable.await.unwrap_or_else(|_| {
                                Err(BookieError::Storage("journal stopped".into()))
                            });
                            let err = res.err();
                            results.extend(
                                out.accepted
                                    .iter()
                                    .map(|(l, e)| add_result(*l, *e, err.as_ref())),
                            );
                            let _ = tx.send(Ok(proto::AddResponse { results })).await;
                        });
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::ReadResponse>, Status> {
        let req = req.into_inner();
        if req.entry_ids.len() > MAX_READ_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_READ_BATCH} entries per read, asked for {}",
                req.entry_ids.len()
            )));
        }
        let storage = self.storage.clone();
        let results = blocking(move || {
            req.entry_ids
                .iter()
                .map(|&id| match storage.read(req.ledger_id, id) {
                    Ok(e) => proto::ReadResult {
                        entry_id: id,
                        code: Code::Ok as i32,
                        message: String::new(),
                        entry: Some(proto::Entry {
                            ledger_id: e.ledger,
                            entry_id: e.entry,
                            lac: e.lac,
                            crc: e.crc,
                            payload: e.payload,
                        }),
                    },
                    Err(err) => {
                        if matches!(err, BookieError::Corrupt { .. }) {
                            tracing::error!(
                                ledger = req.ledger_id,
                                entry = id,
                                "stored entry failed its CRC check"
                            );
                        }
                        proto::ReadResult {
                            entry_id: id,
                            code: err.code() as i32,
                            message: err.to_string(),
                            entry: None,
                        }
                    }
                })
                .collect()
        })
        .await?;
        Ok(Response::new(proto::ReadResponse { results }))
    }

    async fn read_lac(
        &self,
        req: Request<proto::LedgerRequest>,
    ) -> Result<Response<proto::LacResponse>, Status> {
        let ledger = req.into_inner().ledger_id;
        Ok(Response::new(match self.storage.ledger_info(ledger) {
            Some(i) => proto::LacResponse {
                code: Code::Ok as i32,
                message: String::new(),
                lac: i.lac,
                last_entry: i.last_entry,
                fenced: i.fenced,
            },
            None => proto::LacResponse {
                code: Code::NoLedger as i32,
                message: format!("ledger {ledger} not found"),
                lac: -1,
                last_entry: -1,
                fenced: false,
            },
        }))
    }

    async fn fence(
        &self,
        req: Request<proto::LedgerRequest>,
    ) -> Result<Response<proto::LacResponse>, Status> {
        let ledger = req.into_inner().ledger_id;
        Ok(Response::new(match self.storage.fence(ledger).await {
            Ok(i) => proto::LacResponse {
                code: Code::Ok as i32,
                message: String::new(),
                lac: i.lac,
                last_entry: i.last_entry,
                fenced: true,
            },
            Err(e) => proto::LacResponse {
                code: e.code() as i32,
                message: e.to_string(),
                lac: -1,
                last_entry: -1,
                fenced: false,
            },
        }))
    }

    async fn delete(
        &self,
        req: Request<proto::LedgerRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let ledger = req.into_inner().ledger_id;
        let storage = self.storage.clone();
        let res = blocking(move || storage.delete_ledger(ledger)).await?;
        Ok(Response::new(proto::DeleteResponse {
            code: res.err().map_or(Code::Ok, |e| e.code()) as i32,
        }))
    }

    async fn info(
        &self,
        _req: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let s = self.storage.stats();
        Ok(Response::new(proto::InfoResponse {
            bookie_id: self.id,
            read_only: s.read_only,
            ledgers: s.ledgers,
            entry_log_bytes: s.entry_log_bytes,
            entry_logs: s.entry_logs,
            journal_syncs: s.journal_syncs,
            journal_entries: s.journal_entries,
            compacted_logs: s.compacted_logs,
        }))
    }
}
