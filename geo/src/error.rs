use magnetar_broker::BrokerError;

/// What can go wrong replicating between clusters.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Tenancy(#[from] magnetar_tenancy::TenancyError),
    /// The remote cluster cannot be reached or dropped the stream.
    #[error("remote cluster {cluster}: {why}")]
    Remote { cluster: String, why: String },
    /// The remote cluster will not take the stream until an operator acts
    /// (`partitionMismatch`, `unauthorized`, …): the state names it.
    #[error("refused by {cluster}: {why}")]
    Refused { cluster: String, why: String },
    /// The cluster's registration cannot be used to reach it.
    #[error("cluster {cluster}: {why}")]
    Config { cluster: String, why: String },
}

pub type Result<T, E = GeoError> = std::result::Result<T, E>;
