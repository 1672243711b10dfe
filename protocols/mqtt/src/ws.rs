//! MQTT over WebSocket at `/mqtt` on the HTTP listener, subprotocol
//! `mqtt`, as browsers' MQTT clients (and Mosquitto's `websockets`
//! listener) expect. With authentication on, the upgrade carries the
//! token (`Authorization: Bearer`, a `bearer.<jwt>` subprotocol, or
//! `?token=`) or comes with a client certificate, as every HTTP path does.
//!
//! The WebSocket carries MQTT's bytes in binary messages, which need not
//! line up with packets. The session reads and writes one end of an
//! in-memory pipe, so that it is the very code that serves TCP; the
//! bridge moves bytes between the pipe and the socket.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use magnetar_broker::http::upgrade_token;
use magnetar_broker::listener::PeerCertificate;
use magnetar_broker::BrokerError;
use magnetar_tenancy::names::NamespaceName;
use magnetar_tenancy::Credentials;

use crate::ctx::Ctx;
use crate::session::{serve, Presented};

/// Bytes the pipe holds each way.
const PIPE: usize = 16 * 1024;

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/mqtt", get(upgrade))
        .route("/mqtt/{tenant}/{namespace}", get(upgrade_in))
        .with_state(ctx)
}

/// `/mqtt`: the listener's namespace.
async fn upgrade(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    open(ctx, None, &q, &headers, cert, ws).await
}

/// `/mqtt/<tenant>/<namespace>`: another namespace, for clients whose
/// user name cannot name it.
async fn upgrade_in(
    State(ctx): State<Arc<Ctx>>,
    Path((tenant, namespace)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    match format!("{tenant}/{namespace}").parse::<NamespaceName>() {
        Ok(ns) => open(ctx, Some(ns), &q, &headers, cert, ws).await,
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn open(
    ctx: Arc<Ctx>,
    namespace: Option<NamespaceName>,
    q: &[(String, String)],
    headers: &HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    let query_token = q
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.as_str());
    let presented = Presented {
        certificate: cert.and_then(|Extension(c)| c.0),
        token: upgrade_token(headers, query_token).map(Arc::from),
        namespace,
    };
    if let Err(refused) = admit(&ctx, &presented).await {
        return refused.into_response();
    }
    let max = usize::try_from(ctx.cfg.max_packet_size).unwrap_or(usize::MAX);
    ws.protocols(["mqtt", "mqttv3.1"])
        // A message carries at most a packet's worth, plus some slack for
        // clients that send several packets in one.
        .max_message_size(max.saturating_mul(2))
        .on_upgrade(move |socket| bridge(socket, presented, ctx))
}

/// With authentication on, the upgrade is an HTTP request like the
/// others on this listener: 401 without a valid token or certificate, 403
/// for a role that may do nothing in the namespace. CONNECT checks again,
/// for the credentials it carries.
async fn admit(ctx: &Ctx, presented: &Presented) -> std::result::Result<(), (StatusCode, String)> {
    let broker = &ctx.broker;
    if !broker.auth_enabled() {
        return Ok(());
    }
    let status = |code: StatusCode, why: String| Err((code, why));
    if presented.token.is_none() && presented.certificate.is_none() {
        return status(StatusCode::UNAUTHORIZED, "authentication required".into());
    }
    let creds = Credentials {
        user: None,
        secret: presented.token.as_deref().map(str::as_bytes),
        certificate: presented.certificate.as_deref(),
    };
    let principal = match broker.authenticate(&creds) {
        Ok(p) => p,
        Err(e) => {
            broker.metrics().auth_failure("mqtt");
            return status(
                StatusCode::UNAUTHORIZED,
                format!("failed to authenticate: {e}"),
            );
        }
    };
    let ns = presented
        .namespace
        .as_ref()
        .unwrap_or(&ctx.cfg.default_namespace);
    match broker.grants(&principal, ns).await {
        Ok(g) if g.any() => Ok(()),
        Ok(_) | Err(BrokerError::NotFound(_)) => {
            status(StatusCode::FORBIDDEN, format!("not authorized in {ns}"))
        }
        Err(e) => status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn bridge(socket: WebSocket, presented: Presented, ctx: Arc<Ctx>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let session = tokio::spawn(async move {
        let (rd, wr) = tokio::io::split(ours);
        if let Err(e) = serve(rd, wr, presented, ctx).await {
            debug!("MQTT over WebSocket closed: {e}");
        }
    });
    let (mut from_session, mut to_session) = tokio::io::split(theirs);
    let (mut sink, mut stream) = socket.split();
    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    if to_session.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // MQTT travels in binary messages only (MQTT 5, 6.0).
                Message::Text(_) | Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = to_session.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; PIPE];
        loop {
            match from_session.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let b = Bytes::copy_from_slice(&buf[..n]);
                    if sink.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    // Either side ending ends the other: the session sees end of input
    // (an abrupt close, so the will goes out), or the socket closes.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    let _ = session.await;
}
