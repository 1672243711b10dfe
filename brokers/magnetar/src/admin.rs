//! `magnetar admin`: operator commands.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use magnetar_metadata::{parse_endpoints, EventKind, KeyValue, MetaClient, PutOptions};

#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Read and write the metadata store directly, in the spirit of etcdctl.
    Metadata(MetadataArgs),
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
    match args.command {
        AdminCommand::Metadata(m) => run_metadata(m).await,
    }
}

async fn run_metadata(args: MetadataArgs) -> anyhow::Result<()> {
    let client = MetaClient::new(&parse_endpoints(&args.meta))?;
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
