//! The roles of a Magnetar deployment put together into processes:
//! standalone, broker, bookie and metadata node, with their command-line
//! settings, TLS and authentication. The `magnetar` binary runs them;
//! `magnetar-perf` embeds a standalone from here for its in-process
//! benches, so the server itself links no client library.

pub mod auth_args;
pub mod bookie;
pub mod broker;
pub mod ops;
pub mod tls;

/// The payload `magnetar-perf ledger` and `magnetar admin ledgers write`
/// give an entry: its id, then bytes that depend on it, so that a
/// read-back can be checked.
pub fn entry_payload(entry: u64, size: usize) -> bytes::Bytes {
    let mut v = Vec::with_capacity(size.max(8));
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend((8..size).map(|i| (entry as usize).wrapping_add(i) as u8));
    bytes::Bytes::from(v)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr, filtered by `MAGNETAR_LOG` (`info` by default).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAGNETAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
