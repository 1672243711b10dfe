//! Magnetar's metadata store: a small replicated key-value store on openraft.
//!
//! It keeps everything the cluster shares (ledger metadata, topic ledger
//! lists, cursors, registrations, ownership leases, tenants, policies,
//! bindings), playing the part ZooKeeper plays for Pulsar.
//!
//! - [`MetaNode`] runs one member of a raft group; a group of one is the
//!   embedded mode used by `magnetar standalone`.
//! - [`MetaClient`] is the only way other crates reach the store. It offers
//!   get, compare-and-set put and delete, prefix listing, watches that resume
//!   from a revision, and sessions whose ephemeral keys vanish with them.
//!
//! Every key has a version: the store revision of its last change. A put or
//! delete may name the version it expects, and version 0 means "absent".

mod client;
mod error;
mod log_store;
pub mod metrics;
mod network;
mod server;
mod sm_store;
mod state;
mod types;

/// The generated gRPC types, for tools that speak the wire protocol.
pub mod proto {
    tonic::include_proto!("magnetar.metadata.v1");
}

pub use client::{parse_endpoints, ClientOptions, MetaClient, PutOptions, Session};
pub use error::{MetaError, Result};
pub use server::{
    parse_peers, MetaNode, NodeConfig, RaftTuning, LEADER_HEADER, MAX_KEY_BYTES,
    MAX_SESSION_TTL_MS, MAX_VALUE_BYTES, MIN_SESSION_TTL_MS,
};
pub use state::{Event, EventKind, KeyValue};

/// openraft's own conformance suite, run against the RocksDB log store and
/// the snapshotting state machine.
#[cfg(test)]
mod storage_suite {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use crate::log_store::LogStore;
    use crate::sm_store::StateMachineStore;
    use crate::types::TypeConfig;

    struct Builder;

    fn io(e: &(impl std::error::Error + 'static)) -> StorageError<u64> {
        openraft::StorageIOError::write(e).into()
    }

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
            let dir = tempfile::tempdir().map_err(|e| io(&e))?;
            let log = LogStore::open(&dir.path().join("log")).map_err(|e| io(&e))?;
            let sm = StateMachineStore::open(&dir.path().join("sm")).map_err(|e| io(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // openraft's error type, as the suite returns it
    fn openraft_storage_suite() -> Result<(), StorageError<u64>> {
        Suite::test_all(Builder)
    }
}
