//! The broker's listeners: admission and limits come from `magnetar-net`
//! (shared with the metadata and bookie gRPC planes); HTTP is served here
//! with hyper, so that header reads are bounded by the handshake timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

pub use magnetar_net::{accept_loop, Admission, ListenerLimits, Ticket};

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
    let timeout = admission.limits().handshake_timeout;
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
