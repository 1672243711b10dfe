//! Admission for every listener of a Magnetar process: the client
//! protocols and HTTP of the broker, and the gRPC planes of metadata
//! nodes and bookies. A connection is counted against its listener's
//! limits before any protocol sees a byte, then served in a task of its
//! own with Nagle off, since every protocol batches its own writes.
//!
//! So a flood of connections that never speak costs a file descriptor and
//! a few hundred bytes each, for at most the handshake timeout, and can
//! never take the descriptors the process's own storage needs.
//!
//! [`tls`] is the TLS of every listener and internal client, and
//! [`grpc_auth`] holds who may call the gRPC planes.

pub mod grpc_auth;
pub mod tls;

pub use grpc_auth::{BearerToken, CallerRole, GrpcAuth, Refusal, TokenVerifier};
pub use tls::{grpc_endpoint, Conn, GrpcClientTls, TlsError, TlsFiles, TlsServer};

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// Connections admitted and refused since the listener started: the
    /// connection counters of the metrics.
    admitted: AtomicU64,
    refused: AtomicU64,
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
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
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

    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Connections admitted so far.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Connections refused at a limit so far.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
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
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            admission: Arc::clone(self),
            ip,
        })
    }

    fn refused(&self, peer: SocketAddr, limit: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
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
/// one with `serve` in a task of its own (see `accept_admitted`). With
/// `tls`, the TLS handshake comes first, bounded by the handshake
/// timeout, in the connection's task so that a slow one holds up no
/// other. With `io`, each connection is registered with that runtime's
/// I/O driver instead of the caller's, for a protocol that reads its
/// connections on a runtime of its own and must see their readiness
/// there, in the order the kernel reports it.
pub async fn accept_loop<F, Fut, E>(
    listener: TcpListener,
    admission: Arc<Admission>,
    tls: Option<TlsServer>,
    io: Option<tokio::runtime::Handle>,
    serve: F,
) where
    F: Fn(Conn, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    let protocol = admission.protocol;
    let timeout = admission.limits.handshake_timeout;
    let serve = Arc::new(serve);
    loop {
        let (stream, peer, ticket) = accept_admitted(&listener, &admission).await;
        let stream = match &io {
            Some(io) => match register_with(stream, io) {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%peer, "{protocol} connection dropped: {e}");
                    continue;
                }
            },
            None => stream,
        };
        let Some(tls) = tls.clone() else {
            let served = serve(Conn::plain(stream), peer);
            tokio::spawn(async move {
                if let Err(e) = served.await {
                    debug!(%peer, "{protocol} connection closed: {e}");
                }
                drop(ticket);
            });
            continue;
        };
        let serve = Arc::clone(&serve);
        tokio::spawn(async move {
            let conn = match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    debug!(%peer, "{protocol} TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "{protocol} TLS handshake timed out");
                    return;
                }
            };
            if let Err(e) = serve(conn, peer).await {
                debug!(%peer, "{protocol} connection closed: {e}");
            }
            drop(ticket);
        });
    }
}

/// `stream`, registered with `io`'s I/O driver.
fn register_with(stream: TcpStream, io: &tokio::runtime::Handle) -> std::io::Result<TcpStream> {
    let stream = stream.into_std()?;
    let _entered = io.enter();
    TcpStream::from_std(stream)
}

/// The next connection `admission` lets in, with Nagle off. Those over a
/// limit are closed at once; an accept error (out of file descriptors,
/// say) is logged and retried after a pause rather than ending the
/// listener.
async fn accept_admitted(
    listener: &TcpListener,
    admission: &Arc<Admission>,
) -> (TcpStream, SocketAddr, Ticket) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(ticket) = admission.admit(peer) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                return (stream, peer, ticket);
            }
            Err(e) => {
                warn!("{} accept failed: {e}", admission.protocol);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The bytes of the HTTP/2 connection preface every gRPC client sends
/// first.
const H2_PREFACE_LEN: usize = 24;

/// The connections of a gRPC listener, for tonic's
/// `serve_with_incoming_shutdown`: each one admitted under `admission`,
/// with Nagle off and TCP keep-alive at `keepalive` (if any), through the
/// TLS handshake with `tls` (if any), and dropped unless the handshake and
/// then the HTTP/2 preface arrive within the handshake timeout. hyper has
/// no such timeout of its own, and after the preface tonic's HTTP/2
/// keep-alive pings find dead peers. Accept errors are logged and retried
/// after a pause, never passed on, since tonic would stop serving on
/// them. Accepting ends when tonic drops the stream.
pub fn grpc_incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
    keepalive: Option<Duration>,
    tls: Option<TlsServer>,
) -> impl futures::Stream<Item = Result<GrpcConn, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<GrpcConn>(64);
    let timeout = admission.limits.handshake_timeout;
    tokio::spawn(async move {
        loop {
            let (stream, peer, ticket) = tokio::select! {
                next = accept_admitted(&listener, &admission) => next,
                () = tx.closed() => return,
            };
            if let Some(time) = keepalive {
                let ka = socket2::TcpKeepalive::new().with_time(time);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
            }
            let Some(tls) = tls.clone() else {
                if tx
                    .send(GrpcConn::admitted(Conn::plain(stream), timeout, ticket))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, tls.accept(stream)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(GrpcConn::admitted(conn, timeout, ticket)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, "gRPC TLS handshake failed: {e}"),
                    Err(_) => debug!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|conn| (Ok(conn), rx))
    })
}

/// One admitted gRPC connection: its slot is held until tonic drops it,
/// and reads fail with `TimedOut` if the preface is late.
pub type GrpcConn = Prefaced<Conn>;

impl GrpcConn {
    fn admitted(stream: Conn, timeout: Duration, ticket: Ticket) -> Self {
        let mut c = Prefaced::new(stream, H2_PREFACE_LEN, timeout);
        c.ticket = Some(ticket);
        c
    }
}

/// Who is at the other end of a gRPC call, for the services and
/// [`GrpcAuth`] (in the request's extensions).
#[derive(Clone, Debug)]
pub struct GrpcPeer {
    pub remote: Option<SocketAddr>,
    /// The CN of the client certificate the CA verified, if any.
    pub certificate_role: Option<Arc<str>>,
}

/// A stream whose reads fail with `TimedOut` unless its first `len` bytes
/// arrive within a timeout: for servers (hyper's) that wait for a
/// connection's first bytes without a limit, which would let a client
/// that connects and says nothing hold its slot for good.
#[derive(Debug)]
pub struct Prefaced<S> {
    stream: S,
    /// Until the first bytes have arrived: when they must have.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    left: usize,
    /// The admission slot the connection holds, if any, given back when
    /// it is dropped.
    ticket: Option<Ticket>,
}

impl<S> Prefaced<S> {
    pub fn new(stream: S, len: usize, timeout: Duration) -> Self {
        Prefaced {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            left: len,
            ticket: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefaced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let Poll::Ready(Ok(())) = res {
                this.left = this.left.saturating_sub(buf.filled().len() - before);
                if this.left == 0 {
                    this.deadline = None;
                }
                return res;
            }
            // Polled while the read is pending, so that the timer wakes
            // the task even if the peer never sends a byte.
            if res.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the first bytes did not arrive within the handshake timeout",
                )));
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefaced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = GrpcPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        GrpcPeer {
            remote: self.stream.tcp().peer_addr().ok(),
            certificate_role: self.stream.certificate_role().cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max: usize, per_ip: usize) -> ListenerLimits {
        ListenerLimits {
            max_connections: max,
            max_connections_per_ip: per_ip,
            handshake_timeout: Duration::from_millis(200),
            ..ListenerLimits::default()
        }
    }

    #[test]
    fn admission_counts_per_listener_and_per_address_and_gives_slots_back() {
        let a = Admission::new("test", limits(3, 2));
        let p1: SocketAddr = "10.0.0.1:1000".parse().expect("value");
        let p2: SocketAddr = "10.0.0.2:1000".parse().expect("value");
        let t1 = a.admit(p1);
        let t2 = a.admit(p1);
        assert!(t1.is_some() && t2.is_some());
        assert!(a.admit(p1).is_none(), "third from one address");
        let t3 = a.admit(p2);
        assert!(t3.is_some());
        assert!(a.admit(p2).is_none(), "over the listener's limit");
        assert_eq!(a.open(), 3);
        drop(t1);
        assert_eq!(a.open(), 2);
        assert!(a.admit(p1).is_some(), "a slot given back is free again");
    }

    async fn grpc_listener(
        limits: ListenerLimits,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::Receiver<GrpcConn>,
        Arc<Admission>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("io");
        let admission = Admission::new("grpc-test", limits);
        let incoming = grpc_incoming(listener, Arc::clone(&admission), None, None);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut incoming = std::pin::pin!(incoming);
            while let Some(Ok(conn)) = incoming.next().await {
                if tx.send(conn).await.is_err() {
                    break;
                }
            }
        });
        (addr, rx, admission)
    }

    #[tokio::test]
    async fn a_silent_grpc_connection_fails_after_the_handshake_timeout() {
        let (addr, mut rx, admission) = grpc_listener(limits(0, 0)).await;
        let _client = TcpStream::connect(addr).await.expect("io");
        let mut conn = rx.recv().await.expect("a connection");
        assert_eq!(admission.open(), 1);
        let mut buf = [0u8; 8];
        let err = conn
            .read(&mut buf)
            .await
            .expect_err("a silent peer times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(conn);
        assert_eq!(admission.open(), 0);
    }

    #[tokio::test]
    async fn a_grpc_connection_that_sent_its_preface_may_then_stay_quiet() {
        let (addr, mut rx, _) = grpc_listener(limits(0, 0)).await;
        let mut client = TcpStream::connect(addr).await.expect("io");
        let mut conn = rx.recv().await.expect("a connection");
        // The preface in two pieces: the deadline holds until all of it.
        client.write_all(b"PRI * HTTP/2.0\r\n").await.expect("io");
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).await.expect("io");
        assert_eq!(n, 16);
        client.write_all(b"\r\nSM\r\n\r\n").await.expect("io");
        let n = conn.read(&mut buf).await.expect("io");
        assert_eq!(n, 8);
        let quiet = tokio::time::timeout(Duration::from_millis(600), conn.read(&mut buf)).await;
        assert!(quiet.is_err(), "no timeout once the preface is in");
    }

    #[tokio::test]
    async fn a_grpc_connection_over_the_limit_is_closed_at_once() {
        let (addr, mut rx, _) = grpc_listener(limits(1, 0)).await;
        let _first = TcpStream::connect(addr).await.expect("io");
        let _held = rx.recv().await.expect("a connection");
        let mut second = TcpStream::connect(addr).await.expect("io");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
