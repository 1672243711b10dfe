//! The HTTP listener of a metadata node or a bookie: `/metrics` for
//! Prometheus, `/health` (the process works) and `/ready` (it can serve:
//! a leader is known; registered and writable) for probes and compose
//! healthchecks.
//!
//! Under the process's listener limits, over TLS when the process's
//! gRPC plane speaks it. With authentication on, `/metrics` needs what
//! the gRPC plane needs (a token or certificate of a superuser or
//! cluster role); the probes answer anyone, and say nothing but their
//! verdict.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use magnetar_broker::listener::{PeerCertificate, TlsServer};
use magnetar_metrics::prometheus_client::registry::Registry;
use magnetar_net::{GrpcAuth, ListenerLimits, Refusal};
use tokio::net::TcpListener;

/// `(live, ready)` now.
pub type HealthFn = Arc<dyn Fn() -> (bool, bool) + Send + Sync>;

#[derive(Clone)]
struct Ops {
    registry: Arc<Registry>,
    health: HealthFn,
    auth: GrpcAuth,
}

/// A running listener; it stops when dropped.
pub struct OpsHttp {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl OpsHttp {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OpsHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `registry` and `health` on `listen`.
pub async fn serve(
    listen: SocketAddr,
    limits: ListenerLimits,
    tls: Option<TlsServer>,
    auth: GrpcAuth,
    mut registry: Registry,
    health: HealthFn,
) -> anyhow::Result<OpsHttp> {
    registry.register_collector(Box::new(magnetar_metrics::ProcessCollector));
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(Ops {
        registry: Arc::new(registry),
        health,
        auth,
    });
    let admission = magnetar_net::Admission::new("HTTP", limits);
    let task = tokio::spawn(magnetar_broker::listener::serve_http(
        listener,
        admission,
        tls,
        app,
        std::future::pending(),
    ));
    Ok(OpsHttp { addr, task })
}

fn router(ops: Ops) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(ops)
}

async fn metrics(
    State(ops): State<Ops>,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> Response {
    let token = magnetar_broker::http::bearer(&headers);
    let certified = PeerCertificate::of(&req);
    match ops.auth.caller(token, certified) {
        Ok(_) => {}
        Err(Refusal::Unauthenticated(why)) => {
            return (StatusCode::UNAUTHORIZED, why).into_response()
        }
        Err(Refusal::Forbidden(why)) => return (StatusCode::FORBIDDEN, why).into_response(),
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match magnetar_metrics::render(
        &[&ops.registry],
        magnetar_metrics::wants_openmetrics(accept),
    ) {
        Ok(e) => ([(header::CONTENT_TYPE, e.content_type)], e.body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn verdict(ok: bool) -> Response {
    if ok {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response()
    }
}

async fn health(State(ops): State<Ops>) -> Response {
    verdict((ops.health)().0)
}

async fn ready(State(ops): State<Ops>) -> Response {
    verdict((ops.health)().1)
}
