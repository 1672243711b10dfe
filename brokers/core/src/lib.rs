//! The broker core: everything between the wire protocols and storage.
//!
//! Protocol crates see only the protocol-neutral API of this crate; the
//! broker itself knows no wire format. Its parts:
//!
//! - [`format`]: the entry format (Kafka RecordBatch v2), so that Kafka
//!   batches pass through unchanged and other protocols map to records;
//! - [`managed_ledger`]: a topic partition as an ordered list of ledgers,
//!   with per-partition offsets and a tail cache;
//! - [`cursor`]: durable cursors (mark-delete offset, acknowledged ranges,
//!   redelivery counts);
//! - [`routing`]: exchanges and bindings per namespace, RabbitMQ's model;
//! - [`topic_route`]: routes out of a topic into an exchange, so that
//!   records written straight to a topic reach bound queues;
//! - [`subscription`]: dispatchers with credit-based flow control, acks,
//!   redelivery and dead-lettering;
//! - [`service`]: [`Broker`], the protocol-neutral API, with topic loading,
//!   bundle ownership through metadata leases, routing and retention;
//! - [`state`]: durable per-protocol state (group offsets, sessions);
//! - [`coalesce`]: single-message publishes gathered into record batches;
//! - [`http`]: the admin REST API, after Pulsar's;
//! - [`auth`]: the auth hook every protocol calls, and per-connection grants.

pub mod auth;
pub mod coalesce;
pub mod cursor;
pub mod error;
pub mod format;
pub mod http;
pub mod listener;
pub mod log;
pub mod managed_ledger;
pub mod metrics;
pub mod replicated;
pub mod routing;
pub mod service;
pub mod state;
pub mod subscription;
pub mod topic;
pub mod topic_route;
pub mod trace;

pub use auth::{AuthConfig, Grants, Principal};
pub use coalesce::Coalescer;
pub use error::{BrokerError, Result};
pub use format::{Message, ProducerSequence, StoredMessage};
pub use service::{
    Broker, BrokerConfig, BrokerInfo, FetchResult, MetadataQuorum, OffloadDefaults, QuorumVoter,
    RetentionHold, RetentionRun, RoutingStored, TopicPolicies, WeakBroker,
};
pub use state::{KeyQuota, StateChange, StateStore, Versioned};
pub use subscription::{
    Consumer, ConsumerControl, ConsumerOptions, DeadLetterPolicy, Delivery, InitialPosition,
    ResetTo, SubscriptionOptions, SubscriptionType,
};
pub use topic::{PendingPublish, Published};
pub use topic_route::TopicRoute;
