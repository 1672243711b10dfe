//! The Kafka listener: one task reads and decodes a connection's requests,
//! another writes the responses back in request order.
//!
//! Requests are started in the order they arrive, and a produce request
//! fixes its batches' places in their partitions before the next request
//! is read, so that a client pipelining produce requests (librdkafka keeps
//! up to five in flight) gets them appended in order. Everything after
//! that point runs concurrently; responses still leave in order, as Kafka
//! requires.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::codec::{self, DecodeError};
use crate::handler::{Ctx, Session};
use crate::KafkaConfig;
use magnetar_broker::listener::{Conn, ProtocolListeners};
use magnetar_broker::Broker;

/// Requests of one connection started but not yet answered.
const MAX_IN_FLIGHT: usize = 32;
/// Bytes of those requests, in KiB: a produce request's batches stay in
/// memory until the bookies have them, so a connection pipelining large
/// requests waits here (one larger than this still goes, alone).
const IN_FLIGHT_KIB: u32 = 128 * 1024;
/// Largest request before authentication, as Kafka's
/// `sasl.server.max.receive.size`.
const PRE_AUTH_MAX_REQUEST: usize = 512 * 1024;
/// Read buffer of a connection past its handshake.
const READ_BUFFER: usize = 64 * 1024;

/// A running Kafka listener.
#[derive(Debug)]
pub struct KafkaServer {
    /// This one and the SSL / SASL_SSL listeners, sharing the groups and
    /// the connection budget; TLS ones are added here, and the broker's
    /// registration advertises them under [`TLS_LISTENER`].
    pub listeners: ProtocolListeners,
}

/// The name under which a broker advertises its Kafka TLS listener.
pub const TLS_LISTENER: &str = "kafka-tls";

impl KafkaServer {
    /// Serves Kafka clients on `listener` for `broker`. The broker's
    /// registration should already advertise this listener under
    /// `kafka`, since Metadata answers send clients there.
    pub fn start(listener: TcpListener, broker: Broker, cfg: KafkaConfig) -> std::io::Result<Self> {
        let admission = broker.admission("Kafka");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_background();
        let mut listeners = ProtocolListeners::new("Kafka", admission, move |stream, peer| {
            let name = if stream.is_tls() {
                TLS_LISTENER
            } else {
                "kafka"
            };
            serve_connection(stream, peer, name, Arc::clone(&ctx))
        });
        listeners.serve_plain(listener)?;
        Ok(KafkaServer { listeners })
    }
}

/// What the writer waits for: a response, or nothing (acks=0 produce).
type Pending = BoxFuture<'static, Option<Bytes>>;

async fn serve_connection(
    stream: Conn,
    peer: SocketAddr,
    listener: &'static str,
    ctx: Arc<Ctx>,
) -> std::io::Result<()> {
    let certificate = stream.certificate_role().cloned();
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Pending>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(pending) = rx.recv().await {
            if let Some(bytes) = pending.await {
                wr.write_all(&bytes).await?;
            }
        }
        wr.shutdown().await
    });
    let mut session = Session::new(&ctx, peer, listener);
    if let Some(role) = certificate {
        crate::sasl::certificate_login(&ctx, &mut session, &role).await;
    }
    let limits = ctx.broker.config().listener_limits.clone();
    let handshake_deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // Until a request has been served to an authenticated client, the
    // connection is held to the handshake deadline and a small frame cap
    // (Kafka's `sasl.server.max.receive.size`), and holds no large buffer.
    let mut handshaken = false;
    let mut buf = BytesMut::new();
    let budget = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_KIB as usize));
    let result = 'read: loop {
        loop {
            let max = if session.authenticated {
                ctx.cfg.max_request_bytes
            } else {
                PRE_AUTH_MAX_REQUEST
            };
            let frame = match codec::split_frame(&mut buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    warn!(%peer, "closing Kafka connection: {e}");
                    break 'read Ok(());
                }
            };
            let kib = u32::try_from(frame.len().div_ceil(1024))
                .unwrap_or(u32::MAX)
                .clamp(1, IN_FLIGHT_KIB);
            let Ok(permit) = Arc::clone(&budget).acquire_many_owned(kib).await else {
                break 'read Ok(());
            };
            let pending: Pending = match codec::decode_request(frame) {
                Ok(req) => match ctx.start(&mut session, req).await {
                    Some(p) => p,
                    None => continue,
                },
                Err(DecodeError::Respond {
                    api_key: ApiKey::ApiVersions,
                    correlation_id,
                    code,
                }) => {
                    let r = codec::unsupported_api_versions(correlation_id, code).ok();
                    Box::pin(async move { r })
                }
                Err(DecodeError::Respond { .. }) => break 'read Ok(()),
                Err(DecodeError::Close(why)) => {
                    warn!(%peer, "closing Kafka connection: {why}");
                    break 'read Ok(());
                }
            };
            let pending: Pending = Box::pin(async move {
                let out = pending.await;
                drop(permit);
                out
            });
            if tx.send(pending).await.is_err() {
                break 'read Ok(());
            }
            if session.closing {
                break 'read Ok(());
            }
            handshaken |= session.authenticated;
        }
        let deadline = if handshaken {
            let idle = tokio::time::Instant::now() + limits.idle_timeout;
            session.expires.map_or(idle, |e| e.min(idle))
        } else {
            handshake_deadline
        };
        if handshaken && buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_BUFFER);
        }
        match tokio::time::timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e),
            Err(_) => {
                let expired = session
                    .expires
                    .is_some_and(|e| e <= tokio::time::Instant::now());
                let what = if expired {
                    "token expiry"
                } else if handshaken {
                    "idle"
                } else {
                    "handshake"
                };
                debug!(%peer, "closing Kafka connection: {what} timeout");
                break Ok(());
            }
        }
    };
    drop(tx);
    // Answers already started still go out before the close.
    match writer.await {
        Ok(Err(e)) => debug!(%peer, "Kafka write failed: {e}"),
        Err(e) => debug!(%peer, "Kafka writer ended: {e}"),
        Ok(Ok(())) => {}
    }
    result
}
