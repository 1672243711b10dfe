use thiserror::Error;

#[derive(Debug, Error)]
pub enum TieringError {
    /// Arrow could not write or read the file.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// Bytes that do not match their checksum or do not have the shape of
    /// an offloaded ledger: never served as data.
    #[error("corrupt offloaded data: {0}")]
    Corrupt(String),
    /// The object store failed or could not be reached; worth a retry.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A read of offloaded data failed (the store, or a corrupt block):
    /// worth a retry, and never a reason to skip the data.
    #[error("offloaded data unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T, E = TieringError> = std::result::Result<T, E>;
