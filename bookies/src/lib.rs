//! Magnetar's storage tier, after Apache BookKeeper.
//!
//! A ledger is an append-only sequence of entries with one writer, striped
//! over an ensemble of E bookies: each entry goes to Qw of them and is
//! acknowledged once Qa have made it durable. This crate holds both sides:
//!
//! - [`server`]: the bookie, with its journal, entry logs, RocksDB index and
//!   caches ([`storage`]), served over gRPC, and the auditor that
//!   re-replicates the ledgers of a lost bookie;
//! - [`client`]: the ledger client the broker uses: create, pipelined add,
//!   read, ensemble change, fencing and recovery, close and delete.
//!
//! Ledger and bookie metadata live in the metadata store ([`meta`]).

pub mod auditor;
pub mod client;
pub mod error;
pub mod meta;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod storage;

#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("magnetar.bookie");
}

pub use client::{CreateOptions, LedgerClient, LedgerEntry, LedgerReader, LedgerWriter};
pub use error::{BookieError, Result};
pub use meta::{BookieInfo, LedgerMetadata, LedgerState, Segment};
pub use server::{BookieConfig, BookieServer};
