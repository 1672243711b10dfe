//! The AMQP listener: one task per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_broker::listener::{ProtocolListeners, TlsServer};
use magnetar_broker::Broker;
use tokio::net::TcpListener;
use tracing::info;

use crate::session::{serve, Ctx};
use crate::AmqpConfig;

/// A running AMQP listener.
#[derive(Debug)]
pub struct AmqpServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// This one and the AMQPS listeners, sharing the queues' state and the
    /// connection budget.
    listeners: ProtocolListeners,
}

impl AmqpServer {
    /// Serves AMQP 0-9-1 clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: AmqpConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = broker.admission("AMQP");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_alarms();
        let listeners = ProtocolListeners::new("AMQP", admission, move |stream, _| {
            let certificate = stream.certificate_role().cloned();
            serve(stream, certificate, Arc::clone(&ctx))
        });
        let task = tokio::spawn(listeners.accept(listener, None));
        info!(%local_addr, "AMQP listener started");
        Ok(AmqpServer {
            local_addr,
            task,
            listeners,
        })
    }

    /// Serves AMQP over TLS on `listener` too (AMQPS, 5671).
    pub fn add_tls_listener(
        &mut self,
        listener: TcpListener,
        tls: TlsServer,
    ) -> std::io::Result<SocketAddr> {
        self.listeners.add_tls(listener, tls)
    }

    /// Where AMQPS listens, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.listeners.tls_addr()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.task.abort();
        self.listeners.stop_tls();
    }
}

impl Drop for AmqpServer {
    fn drop(&mut self) {
        self.stop();
    }
}
