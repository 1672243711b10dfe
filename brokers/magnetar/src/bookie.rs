//! `magnetar bookie`: a storage node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use magnetar_bookies::auditor::AuditorConfig;
use magnetar_bookies::storage::{JournalConfig, StorageConfig};
use magnetar_bookies::{BookieConfig, BookieServer};
use magnetar_metadata::parse_endpoints;

#[derive(Args)]
pub struct BookieArgs {
    /// This bookie's id, unique in the cluster and at least 1.
    #[arg(long, env = "MAGNETAR_BOOKIE_ID")]
    id: u64,
    /// Address to serve gRPC on.
    #[arg(long, env = "MAGNETAR_BOOKIE_LISTEN", default_value = "127.0.0.1:3181")]
    listen: SocketAddr,
    /// Address clients are told to use (default: the bound address).
    #[arg(long, env = "MAGNETAR_BOOKIE_ADVERTISED")]
    advertised: Option<String>,
    /// The HTTP listener: `/metrics`, `/health`, `/ready` (BookKeeper's
    /// `prometheusStatsHttpPort`).
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_HTTP_LISTEN",
        default_value = "127.0.0.1:8000"
    )]
    http_listen: SocketAddr,
    /// Journal, entry logs and index live here.
    #[arg(long, env = "MAGNETAR_BOOKIE_DATA_DIR")]
    data_dir: PathBuf,
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(long, env = "MAGNETAR_META", default_value = "127.0.0.1:2379")]
    meta: String,
    /// Longest a journal batch waits for more adds before its fsync.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_JOURNAL_MAX_WAIT_US",
        default_value_t = 500
    )]
    journal_max_wait_us: u64,
    /// A journal batch is written once it holds this many bytes.
    #[arg(long, env = "MAGNETAR_BOOKIE_JOURNAL_MAX_BATCH_BYTES", default_value_t = 4 << 20)]
    journal_max_batch_bytes: usize,
    /// Flush the write cache to entry logs when it holds this many MiB.
    #[arg(long, env = "MAGNETAR_BOOKIE_WRITE_CACHE_MB", default_value_t = 64)]
    write_cache_mb: usize,
    #[arg(long, env = "MAGNETAR_BOOKIE_READ_CACHE_MB", default_value_t = 64)]
    read_cache_mb: usize,
    /// Start a new entry log past this size.
    #[arg(long, env = "MAGNETAR_BOOKIE_ENTRY_LOG_MB", default_value_t = 256)]
    entry_log_mb: u64,
    /// Flush the write cache at least this often.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_FLUSH_INTERVAL_MS",
        default_value_t = 1000
    )]
    flush_interval_ms: u64,
    /// Turn read-only above this fraction of the disk in use.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD",
        default_value_t = 0.95
    )]
    disk_usage_threshold: f64,
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_DISK_CHECK_INTERVAL_MS",
        default_value_t = 10_000
    )]
    disk_check_interval_ms: u64,
    /// How often deleted ledgers are dropped and entry logs compacted.
    #[arg(long, env = "MAGNETAR_BOOKIE_GC_INTERVAL_MS", default_value_t = 60_000)]
    gc_interval_ms: u64,
    /// Compact an entry log once less than this fraction of it is live.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_COMPACTION_THRESHOLD",
        default_value_t = 0.5
    )]
    compaction_threshold: f64,
    /// TTL of the bookie's registration: how soon its death is noticed.
    #[arg(long, env = "MAGNETAR_BOOKIE_SESSION_TTL_MS", default_value_t = 5_000)]
    session_ttl_ms: u64,
    /// How long a bookie must be gone before its ledgers are re-replicated.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_REREPLICATION_GRACE_MS",
        default_value_t = 60_000
    )]
    rereplication_grace_ms: u64,
    /// How often the auditor checks for lost bookies.
    #[arg(
        long,
        env = "MAGNETAR_BOOKIE_AUDIT_INTERVAL_MS",
        default_value_t = 5_000
    )]
    audit_interval_ms: u64,
    #[command(flatten)]
    limits: crate::broker::ListenerArgs,
    #[command(flatten)]
    auth: crate::auth_args::AuthArgs,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
}

pub async fn run(args: BookieArgs) -> anyhow::Result<()> {
    let meta = parse_endpoints(&args.meta);
    anyhow::ensure!(!meta.is_empty(), "--meta names no metadata node");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.disk_usage_threshold),
        "--disk-usage-threshold must be between 0 and 1"
    );
    let mut cfg = BookieConfig::new(args.id, args.listen, args.data_dir, meta);
    cfg.advertised = args.advertised;
    cfg.storage = StorageConfig {
        journal: JournalConfig {
            max_wait: Duration::from_micros(args.journal_max_wait_us),
            max_batch_bytes: args.journal_max_batch_bytes.max(1),
            ..JournalConfig::default()
        },
        write_cache_bytes: args.write_cache_mb << 20,
        read_cache_bytes: args.read_cache_mb << 20,
        entry_log_bytes: args.entry_log_mb.max(1) << 20,
        flush_interval: Duration::from_millis(args.flush_interval_ms.max(1)),
        compaction_threshold: args.compaction_threshold,
    };
    cfg.disk_usage_threshold = args.disk_usage_threshold;
    cfg.disk_check_interval = Duration::from_millis(args.disk_check_interval_ms.max(10));
    cfg.gc_interval = Duration::from_millis(args.gc_interval_ms.max(10));
    cfg.session_ttl = Duration::from_millis(args.session_ttl_ms);
    cfg.auditor = AuditorConfig {
        grace: Duration::from_millis(args.rereplication_grace_ms),
        interval: Duration::from_millis(args.audit_interval_ms.max(10)),
    };
    cfg.limits = args.limits.limits();
    cfg.auth = args.auth.grpc()?;
    cfg.token = args.auth.internal_token()?;
    cfg.tls = args.tls.bookie_server()?;
    cfg.meta_tls = args.tls.meta_client()?;
    cfg.bookie_tls = args.tls.bookie_client()?;
    anyhow::ensure!(
        !cfg.auth.enabled() || cfg.token.is_some(),
        "authentication is on: the bookie needs --internal-token (or a secret key and a superuser role) for the metadata store"
    );
    let http_tls = args.tls.bookie_on().then(|| args.tls.https()).transpose()?;
    let (auth, limits) = (cfg.auth.clone(), cfg.limits.clone());
    let server = BookieServer::start(cfg)
        .await
        .context("starting the bookie")?;
    let metrics = server.metrics();
    let http = crate::ops::serve(
        args.http_listen,
        limits,
        http_tls,
        auth,
        metrics.registry(),
        std::sync::Arc::new(move || {
            let h = metrics.health();
            (h.live, h.ready)
        }),
    )
    .await
    .context("starting the bookie's HTTP listener")?;
    println!("bookie {} http on {}", server.id(), http.local_addr());
    // A line on stdout that harnesses and operators can wait for.
    println!(
        "bookie {} listening on {}",
        server.id(),
        server.local_addr()
    );
    crate::wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
