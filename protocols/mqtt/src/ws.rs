//! MQTT over WebSocket at `/mqtt` on the HTTP listener, subprotocol
//! `mqtt`, as browsers' MQTT clients (and Mosquitto's `websockets`
//! listener) expect.
//!
//! The WebSocket carries MQTT's bytes in binary messages, which need not
//! line up with packets. The session reads and writes one end of an
//! in-memory pipe, so that it is the very code that serves TCP; the
//! bridge moves bytes between the pipe and the socket.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use magnetar_broker::listener::PeerCertificate;

use crate::session::{serve, Ctx};

/// Bytes the pipe holds each way.
const PIPE: usize = 16 * 1024;

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new().route("/mqtt", get(upgrade)).with_state(ctx)
}

async fn upgrade(
    State(ctx): State<Arc<Ctx>>,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    // The role of a WSS client's certificate, for a CONNECT without a
    // password.
    let certificate = cert.and_then(|Extension(c)| c.0);
    let max = usize::try_from(ctx.cfg.max_packet_size).unwrap_or(usize::MAX);
    ws.protocols(["mqtt", "mqttv3.1"])
        // A message carries at most a packet's worth, plus some slack for
        // clients that send several packets in one.
        .max_message_size(max.saturating_mul(2))
        .on_upgrade(move |socket| bridge(socket, certificate, ctx))
}

async fn bridge(socket: WebSocket, certificate: Option<Arc<str>>, ctx: Arc<Ctx>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let session = tokio::spawn(async move {
        if let Err(e) = serve(ours, certificate, ctx).await {
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
