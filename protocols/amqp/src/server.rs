//! The AMQP listener: one task per connection.

use std::sync::Arc;

use magnetar_broker::listener::ProtocolListeners;
use magnetar_broker::Broker;
use tokio::net::TcpListener;

use crate::session::{serve, Ctx};
use crate::AmqpConfig;

/// A running AMQP listener.
#[derive(Debug)]
pub struct AmqpServer {
    /// This one and the AMQPS (5671) listeners, sharing the queues' state
    /// and the connection budget; TLS ones are added here.
    pub listeners: ProtocolListeners,
}

impl AmqpServer {
    /// Serves AMQP 0-9-1 clients on `listener` for `broker`.
    pub fn start(listener: TcpListener, broker: Broker, cfg: AmqpConfig) -> std::io::Result<Self> {
        let admission = broker.admission("AMQP");
        let ctx = Arc::new(Ctx::new(broker, cfg));
        ctx.start_alarms();
        let mut listeners = ProtocolListeners::new("AMQP", admission, move |stream, _| {
            let certificate = stream.certificate_role().cloned();
            serve(stream, certificate, Arc::clone(&ctx))
        });
        listeners.serve_plain(listener)?;
        Ok(AmqpServer { listeners })
    }
}
