//! The crate's errors, and the MQTT 5 reason code each closes with.

use magnetar_broker::BrokerError;
use rmqtt_codec::error::{DecodeError, EncodeError};
use rmqtt_codec::v5::DisconnectReasonCode;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet too large: {0}")]
    TooLarge(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("invalid topic name: {0}")]
    TopicName(String),
    #[error("invalid topic filter: {0}")]
    TopicFilter(String),
    #[error("receive maximum exceeded")]
    ReceiveMaximum,
    #[error("topic alias invalid: {0}")]
    TopicAlias(String),
    #[error("keep-alive timeout")]
    KeepAlive,
    #[error("the token the connection logged in with expired")]
    TokenExpired,
    #[error("session taken over")]
    TakenOver,
    /// CONNECT with a client id the server will not take (3.1.1: empty
    /// without a clean session); answered with CONNACK, not a close.
    #[error("client identifier not valid")]
    ClientIdRejected,
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl MqttError {
    /// Whether the broker refused for a quota: what a v5 client is told
    /// per publish, with 0x97.
    pub fn is_quota(&self) -> bool {
        matches!(self, MqttError::Broker(BrokerError::QuotaExceeded(_)))
    }

    /// The reason an MQTT 5 client is told in DISCONNECT.
    pub fn reason(&self) -> DisconnectReasonCode {
        use DisconnectReasonCode as R;
        match self {
            MqttError::Malformed(_) => R::MalformedPacket,
            MqttError::TooLarge(_) => R::PacketTooLarge,
            MqttError::Protocol(_) => R::ProtocolError,
            MqttError::TopicName(_) => R::TopicNameInvalid,
            MqttError::TopicFilter(_) => R::TopicFilterInvalid,
            MqttError::ReceiveMaximum => R::ReceiveMaximumExceeded,
            MqttError::TopicAlias(_) => R::TopicAliasInvalid,
            MqttError::KeepAlive => R::KeepAliveTimeout,
            MqttError::TokenExpired => R::NotAuthorized,
            MqttError::TakenOver => R::SessionTakenOver,
            MqttError::ClientIdRejected => R::ProtocolError,
            MqttError::Broker(BrokerError::QuotaExceeded(_)) => R::QuotaExceeded,
            MqttError::Broker(BrokerError::AccessRefused(_)) => R::NotAuthorized,
            MqttError::Broker(_) | MqttError::Encode(_) | MqttError::Io(_) => {
                R::ImplementationSpecificError
            }
        }
    }
}

impl From<DecodeError> for MqttError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::MaxSizeExceeded { .. } => MqttError::TooLarge(e.to_string()),
            DecodeError::InvalidClientId => MqttError::ClientIdRejected,
            DecodeError::InvalidTopicName => MqttError::TopicName(e.to_string()),
            DecodeError::InvalidTopicFilter => MqttError::TopicFilter(e.to_string()),
            DecodeError::InvalidProtocol
            | DecodeError::UnsupportedProtocolLevel
            | DecodeError::UnsupportedPacketType
            | DecodeError::ConnectReservedFlagSet
            | DecodeError::PacketIdRequired => MqttError::Protocol(e.to_string()),
            DecodeError::Io(s) => MqttError::Io(std::io::Error::other(s.to_string())),
            _ => MqttError::Malformed(e.to_string()),
        }
    }
}

impl From<EncodeError> for MqttError {
    fn from(e: EncodeError) -> Self {
        MqttError::Encode(e.to_string())
    }
}

pub type Result<T, E = MqttError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_map_to_mqtt5_reasons() {
        let e: MqttError = DecodeError::MaxSizeExceeded { size: 10, max: 5 }.into();
        assert_eq!(e.reason(), DisconnectReasonCode::PacketTooLarge);
        let e: MqttError = DecodeError::InvalidTopicName.into();
        assert_eq!(e.reason(), DisconnectReasonCode::TopicNameInvalid);
        let e: MqttError = DecodeError::Utf8Error.into();
        assert_eq!(e.reason(), DisconnectReasonCode::MalformedPacket);
        let e: MqttError = DecodeError::ConnectReservedFlagSet.into();
        assert_eq!(e.reason(), DisconnectReasonCode::ProtocolError);
    }
}
