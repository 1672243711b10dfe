//! Magnetar's Kafka wire protocol.
//!
//! Unchanged Kafka clients produce, fetch, join consumer groups, commit
//! offsets and administer topics. The crate has three layers:
//!
//! - [`codec`]: sans-I/O framing on the `kafka-protocol` crate, with the
//!   served APIs and versions in [`versions`];
//! - the handlers, which turn requests into calls on the broker's
//!   protocol-neutral API ([`magnetar_broker::Broker`]) and nothing else:
//!   topics are partitioned topics of a namespace, partition leaders are
//!   the owners of their bundles, record batches are stored as they came;
//! - [`server`]: the TCP listener, with per-connection pipelining that
//!   keeps produce order and answers in request order.

pub mod codec;
pub mod error;
pub mod server;
pub mod versions;

mod acl;
mod admin;
mod cluster;
mod coordinator;
mod group;
mod handler;
mod sasl;
mod txn;

use std::time::Duration;

use magnetar_tenancy::NamespaceName;

pub use error::{KafkaError, Result};
pub use server::KafkaServer;

/// Kafka's default `message.max.bytes`: 1 MiB and a batch header's
/// 12-byte prefix.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_048_588;

/// How the Kafka listener behaves.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Where topics of clients that do not name a namespace (through
    /// their SASL user) live.
    pub default_namespace: NamespaceName,
    /// Partitions of topics created by auto-creation or without a count.
    pub default_partitions: u32,
    /// Largest request accepted; larger frames close the connection.
    pub max_request_bytes: usize,
    /// How long a new group waits for more members before its first
    /// rebalance (Kafka's `group.initial.rebalance.delay.ms`).
    pub group_initial_rebalance_delay: Duration,
    /// How long a group's committed offset keeps holding a partition's
    /// data after its last commit (Kafka's `offsets.retention.minutes`).
    pub offsets_retention: Duration,
    /// Largest record batch a produce may store, unless the topic's
    /// `max.message.bytes` says otherwise (Kafka's `message.max.bytes`).
    pub message_max_bytes: usize,
    /// Consumer groups (with stored members or offsets) a namespace may
    /// hold; a new one past it is refused (0: no limit).
    pub max_groups_per_namespace: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            default_namespace: NamespaceName::new(
                magnetar_tenancy::DEFAULT_TENANT,
                magnetar_tenancy::DEFAULT_NAMESPACE,
            )
            .unwrap_or_else(|_| unreachable!("public/default is a valid namespace")),
            default_partitions: 1,
            max_request_bytes: codec::DEFAULT_MAX_REQUEST,
            group_initial_rebalance_delay: Duration::from_millis(3000),
            offsets_retention: Duration::from_secs(7 * 24 * 3600),
            message_max_bytes: DEFAULT_MESSAGE_MAX_BYTES,
            max_groups_per_namespace: 100_000,
        }
    }
}
