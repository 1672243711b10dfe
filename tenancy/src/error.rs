//! The crate's one error type.

use magnetar_metadata::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// A name that can never be valid; REST answers 400.
    #[error("invalid name: {0}")]
    InvalidName(String),

    /// A policy value out of range; REST answers 400.
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),

    #[error("{0} does not exist")]
    NotFound(String),

    /// A policy names a cluster nobody registered; REST answers 412, as
    /// Pulsar does.
    #[error("invalid cluster id: {0}")]
    UnknownCluster(String),

    /// A policy names a cluster the tenant may not use; REST answers 403.
    #[error("cluster {cluster} is not in the allowed clusters of tenant {tenant}")]
    ClusterNotAllowed { cluster: String, tenant: String },

    #[error("{0} already exists")]
    AlreadyExists(String),

    /// Deleting something that still has children (a tenant with
    /// namespaces, say); REST answers 409.
    #[error("{0} is not empty")]
    NotEmpty(String),

    /// Concurrent updates kept winning a compare-and-set race.
    #[error("concurrent modification of {0}; retry")]
    Conflict(String),

    /// Credentials missing, malformed, expired or not signed by our key.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),

    /// A key for signing or checking tokens that cannot be used.
    #[error("invalid key: {0}")]
    InvalidKey(String),

    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },

    #[error(transparent)]
    Meta(#[from] MetaError),
}

pub type Result<T, E = TenancyError> = std::result::Result<T, E>;
