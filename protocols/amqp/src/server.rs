//! The AMQP listener: one task per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_broker::listener::accept_loop;
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
}

impl AmqpServer {
    /// Serves AMQP 0-9-1 clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: AmqpConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = broker.admission("AMQP");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_alarms();
        let task = tokio::spawn(accept_loop(listener, admission, move |stream, _| {
            serve(stream, Arc::clone(&ctx))
        }));
        info!(%local_addr, "AMQP listener started");
        Ok(AmqpServer { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for AmqpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
