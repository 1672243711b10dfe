//! The crate's one error type.

use crate::state::KeyValue;

/// Everything the metadata store's client and node can report.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A compare-and-set or versioned delete found another version.
    #[error(
        "version conflict on {key:?}: expected version {expected}, found {}",
        current.as_ref().map_or("no key".to_string(), |kv| format!("version {}", kv.version))
    )]
    Conflict {
        key: String,
        expected: u64,
        current: Option<Box<KeyValue>>,
    },

    #[error("session {0} does not exist or has expired")]
    SessionNotFound(u64),

    /// A watch asked for events the node no longer keeps.
    #[error("watch cannot resume: {0}")]
    Compacted(String),

    /// No node could serve the request before the retry deadline.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),

    /// Any other error a node reported, with its gRPC code.
    #[error("metadata server error ({code:?}): {message}")]
    Server { code: tonic::Code, message: String },

    #[error("configuration: {0}")]
    Config(String),

    #[error("storage: {0}")]
    Storage(String),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl MetaError {
    pub(crate) fn from_status(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => MetaError::InvalidArgument(message),
            tonic::Code::OutOfRange => MetaError::Compacted(message),
            tonic::Code::Unavailable => MetaError::Unavailable(message),
            code => MetaError::Server { code, message },
        }
    }
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;
