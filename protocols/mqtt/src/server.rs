//! The MQTT listener: one task per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_broker::listener::{ProtocolListeners, TlsServer};
use magnetar_broker::Broker;
use tokio::net::TcpListener;
use tracing::info;

use crate::ctx::Ctx;
use crate::session::{serve, Presented};
use crate::MqttConfig;

/// A running MQTT listener.
pub struct MqttServer {
    local_addr: SocketAddr,
    ctx: Arc<Ctx>,
    task: tokio::task::JoinHandle<()>,
    /// This one and the MQTT-over-TLS listeners, sharing the sessions and
    /// the connection budget.
    listeners: ProtocolListeners,
}

impl MqttServer {
    /// Serves MQTT clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: MqttConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = broker.admission("MQTT");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        let ctx_accept = Arc::clone(&ctx);
        let owners = if ctx.cfg.takeover_across_brokers {
            tokio::spawn(Ctx::watch_owners(Arc::downgrade(&ctx)))
        } else {
            tokio::spawn(async {})
        };
        let sweeper = tokio::spawn(Ctx::sweep_sessions(Arc::downgrade(&ctx)));
        let listeners = ProtocolListeners::new("MQTT", admission, move |stream, _| {
            let presented = Presented {
                certificate: stream.certificate_role().cloned(),
                ..Presented::default()
            };
            let (rd, wr) = stream.into_split();
            serve(rd, wr, presented, Arc::clone(&ctx_accept))
        })
        .with_io_runtime(crate::order::reading_runtime());
        let plain = listeners.accept(listener, None);
        let task = tokio::spawn(async move {
            let _owners = AbortOnDrop(owners);
            let _sweeper = AbortOnDrop(sweeper);
            plain.await;
        });
        info!(%local_addr, "MQTT listener started");
        Ok(MqttServer {
            local_addr,
            ctx,
            task,
            listeners,
        })
    }

    /// Serves MQTT over TLS on `listener` too (8883), with these sessions.
    pub fn add_tls_listener(
        &mut self,
        listener: TcpListener,
        tls: TlsServer,
    ) -> std::io::Result<SocketAddr> {
        self.listeners.add_tls(listener, tls)
    }

    /// Where MQTT over TLS listens, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.listeners.tls_addr()
    }

    /// MQTT over WebSocket (`/mqtt`), to merge into the HTTP listener's
    /// routes.
    pub fn websocket_routes(&self) -> axum::Router {
        crate::ws::router(Arc::clone(&self.ctx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.task.abort();
        self.listeners.stop_tls();
    }
}

impl std::fmt::Debug for MqttServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for MqttServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends a task when dropped: the owner watch goes with the listener.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
