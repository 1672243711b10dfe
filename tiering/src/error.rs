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
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T, E = TieringError> = std::result::Result<T, E>;
