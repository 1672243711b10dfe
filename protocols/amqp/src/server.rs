//! The AMQP listener: one task per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_broker::listener::{accept_loop, Admission, TlsListeners, TlsServer};
use magnetar_broker::Broker;
use tokio::net::TcpListener;
use tracing::info;

use crate::session::{serve, Ctx};
use crate::AmqpConfig;

/// A running AMQP listener.
pub struct AmqpServer {
    local_addr: SocketAddr,
    ctx: Arc<Ctx>,
    admission: Arc<Admission>,
    task: tokio::task::JoinHandle<()>,
    /// The AMQPS listeners, sharing the queues' state and the connection
    /// budget.
    tls: TlsListeners,
}

impl AmqpServer {
    /// Serves AMQP 0-9-1 clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: AmqpConfig) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let admission = broker.admission("AMQP");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_alarms();
        let task = tokio::spawn(Self::accept(
            listener,
            Arc::clone(&admission),
            None,
            Arc::clone(&ctx),
        ));
        info!(%local_addr, "AMQP listener started");
        Ok(AmqpServer {
            local_addr,
            ctx,
            admission,
            task,
            tls: TlsListeners::default(),
        })
    }

    fn accept(
        listener: TcpListener,
        admission: Arc<Admission>,
        tls: Option<TlsServer>,
        ctx: Arc<Ctx>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        accept_loop(listener, admission, tls, move |stream, _| {
            let certificate = stream.certificate_role().cloned();
            serve(stream, certificate, Arc::clone(&ctx))
        })
    }

    /// Serves AMQP over TLS on `listener` too (AMQPS, 5671).
    pub fn add_tls_listener(
        &mut self,
        listener: TcpListener,
        tls: TlsServer,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let accept = Self::accept(
            listener,
            Arc::clone(&self.admission),
            Some(tls),
            Arc::clone(&self.ctx),
        );
        Ok(self.tls.spawn("AMQP", addr, accept))
    }

    /// Where AMQPS listens, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.addr()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.task.abort();
        self.tls.stop();
    }
}

impl std::fmt::Debug for AmqpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for AmqpServer {
    fn drop(&mut self) {
        self.stop();
    }
}
