//! Magnetar's WebSocket API, compatible on the wire with Pulsar's WebSocket
//! API (v2 producer, consumer and reader, v3 multi-topic consumer), so that
//! clients written for Pulsar work unchanged.
//!
//! This crate is sans-I/O so far: the JSON frames ([`frames`]), message ids
//! as Pulsar encodes them ([`message_id`]) and Pulsar's timestamp format
//! ([`time`]). The handlers on the HTTP listener build on these.

pub mod frames;
pub mod message_id;
pub mod time;

/// What a frame or id could not be read as.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// Pulsar's WebSocketError 3.
    #[error("Failed to de-serialize from JSON: {0}")]
    Json(String),
    /// Pulsar's WebSocketError 7.
    #[error("Invalid payload encoding: {0}")]
    Encoding(String),
    #[error("invalid message id: {0}")]
    MessageId(String),
    #[error("invalid time: {0}")]
    Time(String),
}

impl WsError {
    /// Pulsar's WebSocketError code: the number after `send-error:` and the
    /// close code.
    pub fn code(&self) -> u16 {
        match self {
            WsError::Json(_) => 3,
            WsError::Encoding(_) | WsError::Time(_) => 7,
            WsError::MessageId(_) => 3,
        }
    }
}

pub type Result<T, E = WsError> = std::result::Result<T, E>;
