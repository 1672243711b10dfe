//! The broker's listeners: admission, limits and TLS come from
//! `magnetar-net` (shared with the metadata and bookie gRPC planes); HTTP
//! is served here with hyper, so that header reads are bounded by the
//! handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use magnetar_net::{accept_loop, Admission, Conn, ListenerLimits, Ticket, TlsServer};

/// How a protocol serves one accepted connection.
type ServeFn = dyn Fn(Conn, SocketAddr) -> futures::future::BoxFuture<'static, Result<(), String>>
    + Send
    + Sync;

/// The listeners of one protocol: its plain one and any TLS twins, all
/// serving connections the same way on the same state and counted
/// against one admission, so that adding TLS takes no descriptors from
/// the budget of the others. Every accept loop is its own task, stopped
/// by [`ProtocolListeners::stop`] or when this is dropped.
pub struct ProtocolListeners {
    protocol: &'static str,
    admission: Arc<Admission>,
    serve: Arc<ServeFn>,
    plain: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    tls: Vec<(SocketAddr, tokio::task::JoinHandle<()>)>,
    io: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for ProtocolListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtocolListeners")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl ProtocolListeners {
    /// `serve` runs once per connection (see [`Conn::is_tls`] and
    /// [`Conn::certificate_role`] for what it may ask of it).
    pub fn new<F, Fut, E>(protocol: &'static str, admission: Arc<Admission>, serve: F) -> Self
    where
        F: Fn(Conn, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let serve: Arc<ServeFn> = Arc::new(move |conn, peer| {
            let served = serve(conn, peer);
            Box::pin(async move { served.await.map_err(|e| e.to_string()) })
        });
        ProtocolListeners {
            protocol,
            admission,
            serve,
            plain: None,
            tls: Vec::new(),
            io: None,
        }
    }

    /// Registers the connections with `io`'s I/O driver (see
    /// [`accept_loop`]).
    #[must_use]
    pub fn with_io_runtime(mut self, io: Option<tokio::runtime::Handle>) -> Self {
        self.io = io;
        self
    }

    /// Serves `listener` (plain TCP) in a task of its own.
    pub fn serve_plain(&mut self, listener: TcpListener) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let accept = self.accept(listener, None);
        if let Some((_, old)) = self.plain.replace((addr, tokio::spawn(accept))) {
            old.abort();
        }
        tracing::info!(local_addr = %addr, "{} listener started", self.protocol);
        Ok(addr)
    }

    /// Where the plain listener listens (unspecified before
    /// [`ProtocolListeners::serve_plain`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.plain
            .as_ref()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |(a, _)| *a)
    }

    /// The accept loop of `listener`, over TLS with `tls`, for the caller
    /// to run.
    pub fn accept(
        &self,
        listener: TcpListener,
        tls: Option<TlsServer>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let serve = Arc::clone(&self.serve);
        accept_loop(
            listener,
            Arc::clone(&self.admission),
            tls,
            self.io.clone(),
            move |conn, peer| serve(conn, peer),
        )
    }

    /// Serves `listener` over TLS too, in a task of its own.
    pub fn add_tls(
        &mut self,
        listener: TcpListener,
        tls: TlsServer,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let accept = self.accept(listener, Some(tls));
        self.tls.push((addr, tokio::spawn(accept)));
        tracing::info!(local_addr = %addr, "{} TLS listener started", self.protocol);
        Ok(addr)
    }

    /// Where the first TLS listener listens, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.first().map(|(a, _)| *a)
    }

    /// Stops accepting, on every listener. Connections already served
    /// are their own tasks and go on.
    pub fn stop(&self) {
        for (_, t) in self.plain.iter().chain(&self.tls) {
            t.abort();
        }
    }
}

impl Drop for ProtocolListeners {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The CN of the client certificate an HTTPS request came with (None
/// over plain HTTP, or without one): in every request's extensions, for
/// the handlers that authenticate.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificate(pub Option<Arc<str>>);

impl PeerCertificate {
    /// The role of the request's certificate, if any.
    pub fn of<B>(req: &axum::http::Request<B>) -> Option<&str> {
        req.extensions()
            .get::<PeerCertificate>()
            .and_then(|p| p.0.as_deref())
    }
}

/// HTTP/2 flow-control windows of the HTTP listener (see `serve_http`).
const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
const HTTP2_CONNECTION_WINDOW: u32 = 16 << 20;

/// Serves HTTP/1.1 (with upgrades to WebSocket) and HTTP/2 (gRPC between
/// clusters; h2c, or `h2` by ALPN over TLS) on `listener` under
/// `admission`, over TLS with `tls`. A connection's first bytes, and then
/// an HTTP/1.1 request's headers, must arrive within the handshake
/// timeout, which also closes idle keep-alive connections, so that a
/// client trickling bytes (slowloris) holds nothing for long; HTTP/2
/// connections are kept in check by keep-alive pings.
pub async fn serve_http(
    listener: TcpListener,
    admission: Arc<Admission>,
    tls: Option<TlsServer>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let timeout = admission.limits().handshake_timeout;
    let serve = move |stream: Conn, _peer: SocketAddr| {
        let peer = PeerCertificate(stream.certificate_role().cloned());
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let service = hyper::service::service_fn(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                hyper::service::Service::call(&inner, req)
            },
        );
        async move {
            let mut http =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            http.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout);
            // A stream from another region moves at most window / round
            // trip. The windows are fixed rather than adaptive: hyper's
            // estimate samples less and less often while a rate holds, so
            // after a quiet minute a link took tens of seconds to open up
            // to a higher rate. The stream window holds a replicator's
            // whole pipeline (8 MiB in flight), and the connection window
            // is the 16 MiB ceiling the adaptive one could be driven to by
            // any peer anyway; data is held only while a handler has not
            // read it, and every handler reads or drops its body at once.
            http.http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
                .keep_alive_timeout(std::time::Duration::from_secs(20))
                .initial_stream_window_size(HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
                .max_concurrent_streams(1024);
            // The shortest HTTP/1.1 request line ("GET / HTTP/1.1") and
            // the start of the HTTP/2 preface are this long.
            let stream = magnetar_net::Prefaced::new(stream, 14, timeout);
            http.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await
                .map_err(|e| e.to_string())
        }
    };
    tokio::select! {
        () = accept_loop(listener, admission, tls, None, serve) => {}
        () = shutdown => {}
    }
}
