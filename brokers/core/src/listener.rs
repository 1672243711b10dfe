//! The broker's listeners: admission, limits and TLS come from
//! `magnetar-net` (shared with the metadata and bookie gRPC planes); HTTP
//! is served here with hyper, so that header reads are bounded by the
//! handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use magnetar_net::{accept_loop, Admission, Conn, ListenerLimits, Ticket, TlsServer};

/// The TLS listeners a protocol server runs next to its plain one, on
/// the same state: each an accept loop in a task of its own.
#[derive(Debug, Default)]
pub struct TlsListeners(Vec<(SocketAddr, tokio::task::JoinHandle<()>)>);

impl TlsListeners {
    /// Runs `accept`, the accept loop of the listener on `addr`.
    pub fn spawn(
        &mut self,
        protocol: &str,
        addr: SocketAddr,
        accept: impl Future<Output = ()> + Send + 'static,
    ) -> SocketAddr {
        self.0.push((addr, tokio::spawn(accept)));
        tracing::info!(local_addr = %addr, "{protocol} TLS listener started");
        addr
    }

    /// Where the first one listens, if there is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.0.first().map(|(a, _)| *a)
    }

    pub fn stop(&self) {
        for (_, t) in &self.0 {
            t.abort();
        }
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

/// Serves HTTP/1.1 (with upgrades to WebSocket) on `listener` under
/// `admission`, over TLS with `tls`: a request's headers must arrive
/// within the handshake timeout, which also closes idle keep-alive
/// connections, so that a client trickling header bytes (slowloris)
/// holds nothing for long.
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
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout);
            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await
        }
    };
    tokio::select! {
        () = accept_loop(listener, admission, tls, serve) => {}
        () = shutdown => {}
    }
}
