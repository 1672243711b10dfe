//! The crate's error type, and how broker errors become Kafka error codes.

use kafka_protocol::ResponseError as E;
use magnetar_broker::BrokerError;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("frame of {size} bytes is outside 0..={max}")]
    FrameTooLarge { size: i64, max: usize },

    #[error("malformed request: {0}")]
    Malformed(String),

    #[error("cannot encode response: {0}")]
    Encode(String),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Broker(#[from] BrokerError),
}

pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

/// The Kafka error code for a broker error on a partition operation.
pub fn code_of(e: &BrokerError) -> i16 {
    match e {
        BrokerError::NotFound(_) => E::UnknownTopicOrPartition.code(),
        BrokerError::AlreadyExists(_) => E::TopicAlreadyExists.code(),
        BrokerError::AccessRefused(_) => E::TopicAuthorizationFailed.code(),
        BrokerError::Unauthenticated(_) => E::SaslAuthenticationFailed.code(),
        BrokerError::InvalidArgument(_) => E::InvalidRequest.code(),
        BrokerError::PreconditionFailed(_) => E::InvalidRequest.code(),
        BrokerError::Conflict(_) => E::PolicyViolation.code(),
        BrokerError::CorruptBatch(_) => E::CorruptMessage.code(),
        BrokerError::NotOwner { .. } => E::NotLeaderOrFollower.code(),
        BrokerError::TopicUnavailable(_) | BrokerError::ShuttingDown => {
            E::LeaderNotAvailable.code()
        }
        // Kafka's error for a log it cannot read right now; clients retry.
        BrokerError::OffloadUnavailable(_) => E::KafkaStorageError.code(),
        BrokerError::ConsumerBusy(_) => E::InvalidRequest.code(),
        BrokerError::OutOfOrderSequence(_) => E::OutOfOrderSequenceNumber.code(),
        BrokerError::ProducerFenced(_) => E::InvalidProducerEpoch.code(),
        BrokerError::QuotaExceeded(_) => E::PolicyViolation.code(),
        // Writes that did not reach the bookie quorum: retriable, and the
        // idempotent producer's sequence keeps the retry from duplicating.
        BrokerError::Bookie(_) => E::NotEnoughReplicas.code(),
        BrokerError::Meta(_) | BrokerError::Tenancy(_) => E::RequestTimedOut.code(),
        BrokerError::CorruptMetadata { .. } => E::UnknownServerError.code(),
    }
}
