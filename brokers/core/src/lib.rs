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
//! - [`routing`]: exchanges and bindings per namespace, RabbitMQ's model.

pub mod cursor;
pub mod error;
pub mod format;
pub mod managed_ledger;
pub mod routing;

pub use error::{BrokerError, Result};
