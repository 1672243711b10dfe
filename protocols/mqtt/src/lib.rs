//! Magnetar's MQTT 3.1, 3.1.1 and 5.0, as Mosquitto serves it.
//!
//! Devices publish and subscribe unchanged; their messages route through
//! the namespace's `amq.topic` exchange, RabbitMQ's MQTT mapping, so AMQP
//! queues and Kafka consumers see the same data. The crate's parts:
//!
//! - [`codec`]: sans-I/O framing on `rmqtt-codec`, every level lifted to
//!   MQTT 5's packet model;
//! - [`topic`]: names, filters, shared subscriptions and the mapping onto
//!   routing keys;
//! - [`props`]: how a publish maps onto a record and back;
//! - [`retained`]: how retained messages are kept;
//! - [`state`]: packet ids, the in-flight window and QoS 2, without I/O;
//! - the session, which turns packets into calls on
//!   [`magnetar_broker::Broker`] and nothing else, and [`server`], the
//!   listener, TCP or WebSocket at `/mqtt`.

pub mod codec;
pub mod error;
pub mod props;
pub mod retained;
pub mod server;
pub mod state;
pub mod topic;

mod ctx;
mod order;
mod rules;
mod session;
mod ws;

use std::time::Duration;

use magnetar_tenancy::names::NamespaceName;

pub use error::{MqttError, Result};
pub use server::MqttServer;

/// The exchange MQTT publishes through, as RabbitMQ's plugin does.
pub const EXCHANGE: &str = "amq.topic";

/// How the MQTT listener behaves.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Namespace of connections (until users carry their own).
    pub default_namespace: NamespaceName,
    /// Largest packet accepted, offered as Maximum Packet Size (v5).
    pub max_packet_size: u32,
    /// QoS 1 and 2 publishes a client may have unacknowledged (v5
    /// Receive Maximum); more is a protocol error (0x93).
    pub receive_max: u16,
    /// Topic aliases a client may set (v5).
    pub topic_alias_max: u16,
    /// How long a client has from connecting to CONNECT.
    pub connect_timeout: Duration,
    /// Longest keep-alive a client may ask for, in seconds. A v5 client
    /// asking for more (or for none) is given this one (Server Keep
    /// Alive); a v3 client is refused, as Mosquitto's `max_keepalive`
    /// does. 65535: no limit.
    pub max_keep_alive: u16,
    /// Whether other brokers may serve the same client ids: then every
    /// connection writes its owner record, which they watch for takeover
    /// (a metadata write per connect). Standalone, the only broker of its
    /// store, needs none.
    pub takeover_across_brokers: bool,
    /// Retained messages a namespace may hold; a publish that would
    /// retain one more is refused (0: no limit).
    pub max_retained_per_namespace: usize,
    /// Persistent sessions (session expiry above 0) a namespace may
    /// hold; a CONNECT that would start one more gets CONNACK Quota
    /// exceeded (0: no limit).
    pub max_sessions_per_namespace: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            default_namespace: NamespaceName::new(
                magnetar_tenancy::DEFAULT_TENANT,
                magnetar_tenancy::DEFAULT_NAMESPACE,
            )
            .unwrap_or_else(|_| unreachable!("public/default is a valid namespace")),
            max_packet_size: 1 << 20,
            receive_max: 1024,
            topic_alias_max: 64,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: u16::MAX,
            takeover_across_brokers: true,
            max_retained_per_namespace: 100_000,
            max_sessions_per_namespace: 100_000,
        }
    }
}
