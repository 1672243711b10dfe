//! The accept loop of every client listener: admission against the
//! listener's connection limits, then one task per connection, with Nagle
//! off, since protocols batch their own writes.
//!
//! Limits are applied before a protocol sees a byte, so that a flood of
//! connections that never speak costs a file descriptor and a few hundred
//! bytes each, for at most the handshake timeout, and can never take the
//! descriptors the process's own storage needs.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// What every client listener enforces, with the flags of the same names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once on one listener; 0: no limit.
    pub max_connections: usize,
    /// Connections open at once from one IP address on one listener;
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// How long a new connection has to finish its protocol's handshake
    /// (authentication included) before it is dropped.
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent where its protocol has no
    /// keep-alive of its own (Kafka's `connections.max.idle.ms`).
    pub idle_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 0,
            max_connections_per_ip: 0,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Counts one listener's open connections, in total and per address.
#[derive(Debug)]
pub struct Admission {
    protocol: &'static str,
    limits: ListenerLimits,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// When a refusal was last logged, so that a flood logs once a
    /// minute rather than once a connection.
    last_refusal_log: Mutex<Option<Instant>>,
}

/// An admitted connection; its slot is given back when it is dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
        if self.admission.limits.max_connections_per_ip > 0 {
            let mut m = self
                .admission
                .per_ip
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(protocol: &'static str, limits: ListenerLimits) -> Arc<Self> {
        Arc::new(Admission {
            protocol,
            limits,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            last_refusal_log: Mutex::new(None),
        })
    }

    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for a connection from `peer`, or `None` when a limit is
    /// reached.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Ticket> {
        let max = self.limits.max_connections;
        let admitted = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refused(peer, "max-connections");
            return None;
        }
        let ip = peer.ip();
        let per_ip = self.limits.max_connections_per_ip;
        if per_ip > 0 {
            let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= per_ip {
                drop(m);
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.refused(peer, "max-connections-per-ip");
                return None;
            }
            *n += 1;
        }
        Some(Ticket {
            admission: Arc::clone(self),
            ip,
        })
    }

    fn refused(&self, peer: SocketAddr, limit: &str) {
        let mut last = self
            .last_refusal_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            warn!(
                %peer,
                "{} connection refused: {limit} reached ({} open); further refusals are logged once a minute",
                self.protocol,
                self.open()
            );
        }
    }
}

/// Accepts connections until the task is aborted, serving each admitted
/// one with `serve` in a task of its own; connections over a limit are
/// closed at once. `protocol` names it in the logs. An accept error (out
/// of file descriptors, say) is logged and retried after a pause rather
/// than ending the listener.
pub async fn accept_loop<F, Fut, E>(listener: TcpListener, admission: Arc<Admission>, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let protocol = admission.protocol;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(ticket) = admission.admit(peer) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let served = serve(stream, peer);
                tokio::spawn(async move {
                    if let Err(e) = served.await {
                        debug!(%peer, "{protocol} connection closed: {e}");
                    }
                    drop(ticket);
                });
            }
            Err(e) => {
                warn!("{protocol} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 (with upgrades to WebSocket) on `listener` under
/// `admission`: a request's headers must arrive within the handshake
/// timeout, which also closes idle keep-alive connections, so that a
/// client trickling header bytes (slowloris) holds nothing for long.
pub async fn serve_http(
    listener: TcpListener,
    admission: Arc<Admission>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let timeout = admission.limits.handshake_timeout;
    let serve = move |stream: TcpStream, _peer: SocketAddr| {
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout);
            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await
        }
    };
    tokio::select! {
        () = accept_loop(listener, admission, serve) => {}
        () = shutdown => {}
    }
}
