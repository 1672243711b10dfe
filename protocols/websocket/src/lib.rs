//! Magnetar's WebSocket API, compatible on the wire with Pulsar's WebSocket
//! API (v2 producer, consumer and reader, v3 multi-topic consumer), so that
//! clients written for Pulsar work unchanged.
//!
//! The sans-I/O parts: the JSON frames ([`frames`]), message ids as
//! Pulsar encodes them ([`message_id`]), Pulsar's timestamp format
//! ([`time`]), requests read from path and query ([`request`]), the
//! mapping to and from records ([`mapping`]) and flow control
//! ([`flow`]). [`server`] serves them on the HTTP listener through the
//! broker's protocol-neutral API.

pub mod flow;
pub mod frames;
pub mod mapping;
pub mod message_id;
pub mod request;
pub mod server;
pub mod time;

pub use server::{routes, WsConfig};

/// Pulsar's WebSocketError 8 (UnknownError): what a failed publish is
/// answered with.
pub const SEND_FAILED: u16 = 8;

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
