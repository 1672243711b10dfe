//! Magnetar's AMQP 0-9-1 protocol, as RabbitMQ speaks it.
//!
//! Unchanged RabbitMQ clients (pika, lapin, amqp091-go, the Java client)
//! declare exchanges and queues, publish with confirms, and consume with
//! prefetch and acknowledgements. Queues are topics of the vhost's
//! namespace, so Kafka and MQTT clients read and write the same data. The
//! crate's parts:
//!
//! - [`codec`]: sans-I/O framing on `amq-protocol`'s generated methods;
//! - [`channel`]: content assembly and delivery-tag bookkeeping, without
//!   I/O;
//! - [`props`]: how AMQP properties and headers map onto record headers;
//! - [`queue`]: queue definitions, their `x-` arguments and RabbitMQ's
//!   redeclare rules;
//! - the session, which turns methods into calls on
//!   [`magnetar_broker::Broker`] and nothing else, and [`server`], the
//!   listener.

pub mod channel;
pub mod codec;
pub mod deadletter;
pub mod error;
pub mod props;
pub mod queue;
pub mod server;

mod rules;
mod session;

use std::time::Duration;

pub use error::{AmqpError, Exception, Result};
pub use server::AmqpServer;

/// How the AMQP listener behaves; the defaults are RabbitMQ's.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// Largest frame, offered in connection.tune.
    pub frame_max: u32,
    pub channel_max: u16,
    /// Heartbeat interval offered, in seconds (0: none).
    pub heartbeat: u16,
    /// Largest message body accepted.
    pub max_message_size: u64,
    /// How long a client has from connecting to connection.open.
    pub handshake_timeout: Duration,
    /// Resident memory above which publishers are blocked
    /// (connection.blocked); 0: never.
    pub memory_limit_bytes: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_message_size: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
            memory_limit_bytes: 0,
        }
    }
}
