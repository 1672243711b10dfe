//! The crate's one error type. Each protocol maps these to its own codes.

use magnetar_bookies::BookieError;
use magnetar_metadata::MetaError;
use magnetar_tenancy::TenancyError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("not found: {0}")]
    NotFound(String),

    #[error("already exists: {0}")]
    AlreadyExists(String),

    /// Credentials missing or not accepted by the auth hook.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),

    /// Authenticated, but the role lacks the permission.
    #[error("access refused: {0}")]
    AccessRefused(String),

    /// The request contradicts existing state (an inequivalent redeclare,
    /// an exchange still in use); AMQP's PRECONDITION_FAILED.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),

    /// The request needs a decision the caller did not make (deleting a
    /// replicated topic without `force`); REST answers 409.
    #[error("conflict: {0}")]
    Conflict(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Bytes that are not a valid entry (bad magic, length or CRC).
    #[error("corrupt record batch: {0}")]
    CorruptBatch(String),

    /// Another broker owns the topic now; its address, if known.
    #[error("topic {topic} is not served here (owner: {})", owner.as_deref().unwrap_or("unknown"))]
    NotOwner {
        topic: String,
        owner: Option<String>,
    },

    /// The topic is being closed, deleted or handed over; retry shortly.
    #[error("topic {0} is unavailable; retry")]
    TopicUnavailable(String),

    /// Exclusive subscriptions admit one consumer.
    #[error("subscription {0} already has an exclusive consumer")]
    ConsumerBusy(String),

    /// An idempotent producer skipped sequence numbers.
    #[error("out-of-order sequence: {0}")]
    OutOfOrderSequence(String),

    /// A newer instance of the producer (a higher epoch) has written.
    #[error("producer fenced: {0}")]
    ProducerFenced(String),

    /// Offloaded data could not be read (the object store failed, or a
    /// block did not match its checksum); retry shortly. Never served as
    /// missing data.
    #[error("offloaded data unavailable: {0}; retry")]
    OffloadUnavailable(String),

    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),

    #[error("broker is shutting down")]
    ShuttingDown,

    #[error(transparent)]
    Tenancy(#[from] TenancyError),

    #[error(transparent)]
    Bookie(#[from] BookieError),

    #[error(transparent)]
    Meta(#[from] MetaError),

    #[error("stored record {key} is unreadable: {reason}")]
    CorruptMetadata { key: String, reason: String },
}

impl BrokerError {
    /// True when the client may simply retry the same request.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            BrokerError::TopicUnavailable(_)
                | BrokerError::OffloadUnavailable(_)
                | BrokerError::NotOwner { .. }
                | BrokerError::Bookie(_)
                | BrokerError::Meta(MetaError::Unavailable(_))
        )
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
