//! `magnetar`: one binary for every role of a Magnetar deployment and the
//! operator CLI. The load generators are `magnetar-perf` (`bench/perf`).

mod admin;
mod admin_rest;
mod tokens;

use magnetar::{auth_args, bookie, broker, tls};

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use magnetar_metadata::{parse_peers, MetaNode, NodeConfig, RaftTuning};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "magnetar", version, about = "Multi-protocol streaming gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: metadata node, bookie and broker.
    Standalone(broker::StandaloneArgs),
    /// Run a broker against an existing metadata group and bookies.
    Broker(broker::BrokerArgs),
    /// Run a metadata node (a member of the raft group).
    Meta(MetaArgs),
    /// Run a bookie: a storage node for replicated ledgers.
    Bookie(bookie::BookieArgs),
    /// Operator commands.
    Admin(admin::AdminArgs),
    /// Secret keys and tokens for token authentication.
    Tokens(tokens::TokensArgs),
    /// A CA and certificates for TLS, for tests and development.
    Tls(tls::TlsCommand),
}

#[derive(Args)]
struct MetaArgs {
    /// This node's id, unique in the group and at least 1.
    #[arg(long, env = "MAGNETAR_META_ID")]
    id: u64,
    /// Address to serve gRPC on.
    #[arg(long, env = "MAGNETAR_META_LISTEN", default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Where the raft log, vote and snapshots are kept.
    #[arg(long, env = "MAGNETAR_META_DATA_DIR")]
    data_dir: PathBuf,
    /// Every member as ID=HOST:PORT, comma-separated, this node included.
    /// Omit for a group of one.
    #[arg(long, env = "MAGNETAR_META_PEERS", default_value = "")]
    peers: String,
    /// Raft heartbeat interval.
    #[arg(long, env = "MAGNETAR_META_HEARTBEAT_MS", default_value_t = RaftTuning::default().heartbeat_ms)]
    heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout.
    #[arg(long, env = "MAGNETAR_META_ELECTION_MIN_MS", default_value_t = RaftTuning::default().election_timeout_min_ms)]
    election_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    #[arg(long, env = "MAGNETAR_META_ELECTION_MAX_MS", default_value_t = RaftTuning::default().election_timeout_max_ms)]
    election_max_ms: u64,
    /// Take a snapshot after this many log entries.
    #[arg(long, env = "MAGNETAR_META_SNAPSHOT_EVERY", default_value_t = RaftTuning::default().snapshot_every)]
    snapshot_every: u64,
    /// Log entries kept behind the last snapshot.
    #[arg(long, env = "MAGNETAR_META_KEEP_LOGS", default_value_t = RaftTuning::default().keep_logs)]
    keep_logs: u64,
    /// The role each member calls its peers with, as ID=ROLE,
    /// comma-separated (its token's `sub`, or its certificate's CN): raft
    /// messages of a member from any other identity are refused. Omit to
    /// know members by the id they send.
    #[arg(long, env = "MAGNETAR_META_PEER_ROLES", default_value = "")]
    peer_roles: String,
    /// The HTTP listener: `/metrics`, `/health`, `/ready` (ZooKeeper's
    /// `metricsProvider.httpPort`).
    #[arg(
        long,
        env = "MAGNETAR_META_HTTP_LISTEN",
        default_value = "127.0.0.1:7000"
    )]
    http_listen: std::net::SocketAddr,
    #[command(flatten)]
    limits: broker::ListenerArgs,
    #[command(flatten)]
    auth: auth_args::AuthArgs,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

async fn run_meta(args: MetaArgs) -> anyhow::Result<()> {
    let http_tls = args.tls.meta_on().then(|| args.tls.https()).transpose()?;
    let peers = parse_peers(&args.peers)?;
    let node = MetaNode::start(NodeConfig {
        id: args.id,
        listen: args.listen,
        data_dir: args.data_dir,
        peers,
        tuning: RaftTuning {
            heartbeat_ms: args.heartbeat_ms,
            election_timeout_min_ms: args.election_min_ms,
            election_timeout_max_ms: args.election_max_ms,
            snapshot_every: args.snapshot_every,
            keep_logs: args.keep_logs,
        },
        limits: args.limits.limits(),
        auth: args.auth.grpc()?,
        peer_token: args.auth.internal_token()?,
        tls: args.tls.meta_server()?,
        peer_tls: args.tls.meta_client()?,
        peer_roles: parse_peer_roles(&args.peer_roles)?,
    })
    .await
    .context("starting the metadata node")?;
    let metrics = node.metrics();
    let http = magnetar::ops::serve(
        args.http_listen,
        args.limits.limits(),
        http_tls,
        args.auth.grpc()?,
        metrics.registry(),
        std::sync::Arc::new(move || {
            let h = metrics.health();
            (h.live, h.ready)
        }),
    )
    .await
    .context("starting the metadata node's HTTP listener")?;
    println!("metadata node {} http on {}", node.id(), http.local_addr());
    // A line on stdout that harnesses and operators can wait for.
    println!(
        "metadata node {} listening on {}",
        node.id(),
        node.local_addr()
    );
    magnetar::wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// `1=meta-1,2=meta-2`: a role by member id.
fn parse_peer_roles(s: &str) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, role) = p
                .split_once('=')
                .with_context(|| format!("--peer-roles: {p:?} is not ID=ROLE"))?;
            let id = id
                .trim()
                .parse()
                .with_context(|| format!("--peer-roles: {id:?} is not a member id"))?;
            Ok((id, role.trim().to_string()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    magnetar::init_tracing();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Standalone(args) => broker::run_standalone(args).await,
        Command::Broker(args) => broker::run_broker(args).await,
        Command::Meta(args) => run_meta(args).await,
        Command::Bookie(args) => bookie::run(args).await,
        Command::Admin(args) => admin::run(args).await,
        Command::Tokens(args) => tokens::run(args),
        Command::Tls(args) => tls::run(args),
    };
    magnetar::flush_tracing();
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
