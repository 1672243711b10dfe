//! `magnetar admin`: operator commands.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use magnetar_bookies::{CreateOptions, LedgerClient};
use magnetar_metadata::{parse_endpoints, EventKind, KeyValue, MetaClient, PutOptions};

#[derive(Args)]
pub struct AdminArgs {
    /// A broker's HTTP listener, for the commands that use the REST API.
    #[arg(
        long,
        env = "MAGNETAR_ADMIN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Token for the admin API when the brokers authenticate (sent as
    /// `Authorization: Bearer`), and for the metadata store and bookies
    /// (`metadata`, `bookies`, `ledgers`: a superuser's).
    #[arg(long, env = "MAGNETAR_AUTH_TOKEN", global = true)]
    auth_token: Option<String>,
    /// `--meta-tls`, `--bookie-tls` and `--tls-ca-file` (and a client
    /// certificate) when the internal planes speak TLS.
    #[command(flatten)]
    tls: magnetar::tls::TlsArgs,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Read and write the metadata store directly, in the spirit of etcdctl.
    Metadata(MetadataArgs),
    /// Registered bookies and their state.
    Bookies(BookiesArgs),
    /// Inspect, write, recover and delete ledgers.
    Ledgers(LedgersArgs),
    #[command(flatten)]
    Rest(crate::admin_rest::RestCommand),
}

#[derive(Args)]
struct BookiesArgs {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(
        long,
        env = "MAGNETAR_META",
        default_value = "127.0.0.1:2379",
        global = true
    )]
    meta: String,
    #[command(subcommand)]
    command: BookiesCommand,
}

#[derive(Subcommand)]
enum BookiesCommand {
    /// Every bookie that ever registered, with whether it runs now.
    List,
}

#[derive(Args)]
struct LedgersArgs {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(
        long,
        env = "MAGNETAR_META",
        default_value = "127.0.0.1:2379",
        global = true
    )]
    meta: String,
    #[command(subcommand)]
    command: LedgersCommand,
}

#[derive(Subcommand)]
enum LedgersCommand {
    /// Ledger ids.
    List,
    /// A ledger's metadata as JSON.
    Show {
        id: u64,
    },
    /// Create a ledger and add entries, printing each acknowledged entry id
    /// as `acked N`; then close it.
    Write {
        #[arg(long, default_value_t = 3)]
        ensemble: usize,
        #[arg(long, default_value_t = 3)]
        write_quorum: usize,
        #[arg(long, default_value_t = 2)]
        ack_quorum: usize,
        #[arg(long, default_value_t = 1000)]
        entries: u64,
        #[arg(long, default_value_t = 1024)]
        entry_size: usize,
        #[arg(long, default_value_t = 100)]
        max_in_flight: usize,
    },
    /// Print entries FIRST..=LAST as `ENTRY<TAB>BYTES<TAB>CRC32C`, the
    /// checksum each entry is stored with.
    Read {
        id: u64,
        first: u64,
        last: u64,
    },
    /// Fence and recover a ledger whose writer is gone, and close it.
    Recover {
        id: u64,
    },
    Delete {
        id: u64,
    },
}

#[derive(Args)]
struct MetadataArgs {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(
        long,
        env = "MAGNETAR_META",
        default_value = "127.0.0.1:2379",
        global = true
    )]
    meta: String,
    #[command(subcommand)]
    command: MetadataCommand,
}

#[derive(Subcommand)]
enum MetadataCommand {
    /// Print a key's value (and, with --verbose, its versions).
    Get {
        key: String,
        #[arg(long, short)]
        verbose: bool,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Write only if the key is at this version (0: only if absent).
        #[arg(long)]
        expect_version: Option<u64>,
        /// Make the key ephemeral: bind it to a new session with this TTL,
        /// kept alive until this command is interrupted (implies --hold).
        #[arg(long)]
        session_ttl_ms: Option<u64>,
    },
    /// Delete a key.
    Delete {
        key: String,
        /// Delete only if the key is at this version.
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// List the keys under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// Print only the keys.
        #[arg(long)]
        keys_only: bool,
    },
    /// Print changes under a prefix as they happen.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision (0: from now).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print every node's raft status.
    Status,
}

fn print_kv(out: &mut impl Write, kv: &KeyValue, verbose: bool) -> std::io::Result<()> {
    if verbose {
        writeln!(
            out,
            "{}\tversion={} create_revision={} session={}",
            kv.key, kv.version, kv.create_revision, kv.session
        )?;
    }
    out.write_all(&kv.value)?;
    writeln!(out)
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    // The internal planes' client, with the token and TLS they take.
    let meta = |endpoints: &str| {
        magnetar::broker::meta_client(
            &parse_endpoints(endpoints),
            args.auth_token.clone(),
            &args.tls,
        )
    };
    match args.command {
        AdminCommand::Metadata(m) => run_metadata(meta(&m.meta)?, m).await,
        AdminCommand::Bookies(b) => run_bookies(LedgerClient::new(meta(&b.meta)?), b).await,
        AdminCommand::Ledgers(l) => run_ledgers(LedgerClient::new(meta(&l.meta)?), l).await,
        AdminCommand::Rest(c) => crate::admin_rest::run(args.url, args.auth_token, c).await,
    }
}

async fn run_metadata(client: MetaClient, args: MetadataArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        MetadataCommand::Get { key, verbose } => match client.get(&key).await? {
            Some(kv) => print_kv(&mut out, &kv, verbose)?,
            None => anyhow::bail!("key {key:?} not found"),
        },
        MetadataCommand::Put {
            key,
            value,
            expect_version,
            session_ttl_ms,
        } => {
            let session = match session_ttl_ms {
                Some(ttl) => Some(client.grant_session(Duration::from_millis(ttl)).await?),
                None => None,
            };
            let kv = client
                .put_with(
                    &key,
                    value.into_bytes(),
                    PutOptions {
                        expected_version: expect_version,
                        session: session.as_ref().map_or(0, |s| s.id()),
                    },
                )
                .await?;
            writeln!(out, "OK version={}", kv.version)?;
            out.flush()?;
            if let Some(mut session) = session {
                writeln!(out, "holding session {} until interrupted", session.id())?;
                out.flush()?;
                drop(out);
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        session.revoke().await?;
                    }
                    _ = session.expired() => anyhow::bail!("session expired"),
                }
            }
        }
        MetadataCommand::Delete {
            key,
            expect_version,
        } => {
            let deleted = match expect_version {
                Some(v) => client.compare_and_delete(&key, v).await?,
                None => client.delete(&key).await?,
            };
            match deleted {
                Some(kv) => writeln!(out, "deleted {} (was version {})", kv.key, kv.version)?,
                None => writeln!(out, "no such key")?,
            }
        }
        MetadataCommand::List { prefix, keys_only } => {
            if keys_only {
                for key in client.list_keys(&prefix).await? {
                    writeln!(out, "{key}")?;
                }
            } else {
                for kv in client.list(&prefix).await? {
                    write!(out, "{}\t", kv.key)?;
                    out.write_all(&kv.value)?;
                    writeln!(out)?;
                }
            }
        }
        MetadataCommand::Watch {
            prefix,
            from_revision,
            count,
        } => {
            let mut events = client.watch(&prefix, from_revision);
            let mut seen = 0usize;
            while count.is_none_or(|c| seen < c) {
                let Some(ev) = events.next().await else { break };
                let ev = ev.context("watch")?;
                let kind = match ev.kind {
                    EventKind::Put => "PUT",
                    EventKind::Delete => "DELETE",
                };
                write!(out, "{} {kind} {}", ev.revision, ev.kv.key)?;
                if ev.kind == EventKind::Put {
                    write!(out, "\t")?;
                    out.write_all(&ev.kv.value)?;
                }
                writeln!(out)?;
                out.flush()?;
                seen += 1;
            }
        }
        MetadataCommand::Status => {
            for ep in client.endpoints() {
                match client.node_status(ep).await {
                    Ok(s) => writeln!(
                        out,
                        "{ep}\tid={} state={} leader={} term={} last_log={} applied={} snapshot={} log_entries={} revision={} keys={}",
                        s.id,
                        s.state,
                        s.leader.map_or("-".into(), |l| l.to_string()),
                        s.term,
                        s.last_log_index,
                        s.last_applied,
                        s.snapshot_index,
                        s.log_entries,
                        s.revision,
                        s.keys
                    )?,
                    Err(e) => writeln!(out, "{ep}\tunreachable: {e}")?,
                }
            }
        }
    }
    Ok(())
}

async fn run_bookies(client: LedgerClient, args: BookiesArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        BookiesCommand::List => {
            let running = client.pool().available().await?;
            for b in client.pool().known().await? {
                let state = match running.iter().find(|r| r.id == b.id) {
                    Some(r) if r.read_only => "read-only",
                    Some(_) => "writable",
                    None => "down",
                };
                writeln!(out, "{}\t{}\t{state}", b.id, b.addr)?;
            }
        }
    }
    Ok(())
}

async fn run_ledgers(client: LedgerClient, args: LedgersArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        LedgersCommand::List => {
            for id in client.list().await? {
                writeln!(out, "{id}")?;
            }
        }
        LedgersCommand::Show { id } => {
            let (md, version) = client.metadata(id).await?;
            out.write_all(&md.to_json())?;
            writeln!(out, "\nversion={version}")?;
        }
        LedgersCommand::Write {
            ensemble,
            write_quorum,
            ack_quorum,
            entries,
            entry_size,
            max_in_flight,
        } => {
            let w = client
                .create(CreateOptions::new(ensemble, write_quorum, ack_quorum))
                .await?;
            writeln!(out, "ledger {}", w.id())?;
            out.flush()?;
            let mut in_flight = futures::stream::FuturesOrdered::new();
            for i in 0..entries {
                if in_flight.len() >= max_in_flight.max(1) {
                    if let Some(r) = in_flight.next().await {
                        let e: u64 = r?;
                        writeln!(out, "acked {e}")?;
                        out.flush()?;
                    }
                }
                in_flight.push_back(w.add(magnetar::entry_payload(i, entry_size)));
            }
            while let Some(r) = in_flight.next().await {
                writeln!(out, "acked {}", r?)?;
                out.flush()?;
            }
            let md = w.close().await?;
            writeln!(out, "closed last_entry={}", md.last_entry)?;
        }
        LedgersCommand::Read { id, first, last } => {
            let r = client.open(id).await?;
            let mut next = first;
            while next <= last {
                let hi = (next + 999).min(last);
                for e in r.read(next, hi).await? {
                    writeln!(
                        out,
                        "{}\t{}\t{:08x}",
                        e.entry_id,
                        e.payload.len(),
                        magnetar_bookies::meta::entry_crc(id, e.entry_id, &e.payload)
                    )?;
                }
                next = hi + 1;
            }
        }
        LedgersCommand::Recover { id } => {
            let r = client.open_and_recover(id).await?;
            writeln!(
                out,
                "ledger {id} closed at entry {}",
                r.last_add_confirmed()
            )?;
        }
        LedgersCommand::Delete { id } => {
            client.delete(id).await?;
            writeln!(out, "ledger {id} deleted")?;
        }
    }
    Ok(())
}
