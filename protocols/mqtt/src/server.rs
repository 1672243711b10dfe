//! The MQTT listener: one task per connection.

use std::sync::Arc;

use magnetar_broker::listener::ProtocolListeners;
use magnetar_broker::Broker;
use tokio::net::TcpListener;

use crate::ctx::Ctx;
use crate::session::{serve, Presented};
use crate::MqttConfig;

/// A running MQTT listener.
pub struct MqttServer {
    ctx: Arc<Ctx>,
    /// This one and the MQTT-over-TLS (8883) listeners, sharing the
    /// sessions and the connection budget; TLS ones are added here.
    pub listeners: ProtocolListeners,
    /// The session sweeper and the owner watch, which go with the
    /// listener.
    _background: [AbortOnDrop; 2],
}

impl MqttServer {
    /// Serves MQTT clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: MqttConfig) -> std::io::Result<Self> {
        let admission = broker.admission("MQTT");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.broker
            .metrics()
            .add_source(Arc::new(magnetar_broker::metrics::WeakSource(
                Arc::downgrade(&ctx),
                crate::ctx::mqtt_gauges,
            )));
        let ctx_accept = Arc::clone(&ctx);
        let owners = if ctx.cfg.takeover_across_brokers {
            tokio::spawn(Ctx::watch_owners(Arc::downgrade(&ctx)))
        } else {
            tokio::spawn(async {})
        };
        let sweeper = tokio::spawn(Ctx::sweep_sessions(Arc::downgrade(&ctx)));
        let mut listeners = ProtocolListeners::new("MQTT", admission, move |stream, _| {
            let presented = Presented {
                certificate: stream.certificate_role().cloned(),
                ..Presented::default()
            };
            let (rd, wr) = stream.into_split();
            serve(rd, wr, presented, Arc::clone(&ctx_accept))
        })
        .with_io_runtime(crate::order::reading_runtime());
        listeners.serve_plain(listener)?;
        Ok(MqttServer {
            ctx,
            listeners,
            _background: [AbortOnDrop(owners), AbortOnDrop(sweeper)],
        })
    }

    /// MQTT over WebSocket (`/mqtt`), to merge into the HTTP listener's
    /// routes.
    pub fn websocket_routes(&self) -> axum::Router {
        crate::ws::router(Arc::clone(&self.ctx))
    }
}

impl std::fmt::Debug for MqttServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttServer")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

/// Ends a task when dropped: the owner watch goes with the listener.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
