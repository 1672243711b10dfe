//! The JSON frames of Pulsar's WebSocket API, field for field. Unknown
//! fields are ignored and absent optional ones left out, as Pulsar's JSON
//! mapper does.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::{Result, WsError};

/// What a producer sends.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducerMessage {
    /// Base64.
    pub payload: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub context: Option<String>,
    pub key: Option<String>,
    #[serde(default)]
    pub replication_clusters: Vec<String>,
    /// ISO-8601 with an offset.
    pub event_time: Option<String>,
    pub deliver_at: Option<i64>,
    pub deliver_after_ms: Option<i64>,
}

impl ProducerMessage {
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| WsError::Json(e.to_string()))
    }

    /// The decoded payload; a missing one is an encoding error, as in
    /// Pulsar.
    pub fn payload_bytes(&self) -> Result<Vec<u8>> {
        let p = self
            .payload
            .as_deref()
            .ok_or_else(|| WsError::Encoding("no payload".into()))?;
        base64::engine::general_purpose::STANDARD
            .decode(p)
            .map_err(|e| WsError::Encoding(format!("Invalid Base64 message-payload error={e}")))
    }
}

/// The answer to each producer message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducerAck {
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_msg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    pub error_code: i32,
    pub schema_version: i64,
}

impl ProducerAck {
    pub fn ok(message_id: String, context: Option<String>) -> Self {
        ProducerAck {
            result: "ok".into(),
            error_msg: None,
            message_id: Some(message_id),
            context,
            error_code: 0,
            schema_version: 0,
        }
    }

    /// `send-error:N` with Pulsar's WebSocketError code.
    pub fn error(code: u16, msg: String, context: Option<String>) -> Self {
        ProducerAck {
            result: format!("send-error:{code}"),
            error_msg: Some(msg),
            message_id: None,
            context,
            error_code: 0,
            schema_version: 0,
        }
    }
}

/// A message to a consumer or reader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerMessage {
    pub message_id: String,
    /// Base64.
    pub payload: String,
    pub properties: BTreeMap<String, String>,
    pub publish_time: String,
    pub redelivery_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
}

/// What a consumer or reader sends. Anything without a known `type` is an
/// ack, as in Pulsar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerCommand {
    Ack(String),
    NegativeAck(String),
    Permit(u32),
    Unsubscribe,
    IsEndOfTopic,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCommand {
    #[serde(rename = "type")]
    kind: Option<String>,
    message_id: Option<String>,
    permit_messages: Option<i64>,
}

impl ConsumerCommand {
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawCommand =
            serde_json::from_str(text).map_err(|e| WsError::Json(e.to_string()))?;
        let id = |raw: RawCommand| {
            raw.message_id
                .ok_or_else(|| WsError::Json("messageId is missing".into()))
        };
        Ok(match raw.kind.as_deref() {
            Some("permit") => {
                let n = raw
                    .permit_messages
                    .ok_or_else(|| WsError::Json("permitMessages is missing".into()))?;
                ConsumerCommand::Permit(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
            }
            Some("unsubscribe") => ConsumerCommand::Unsubscribe,
            Some("isEndOfTopic") => ConsumerCommand::IsEndOfTopic,
            Some("negativeAcknowledge") => ConsumerCommand::NegativeAck(id(raw)?),
            _ => ConsumerCommand::Ack(id(raw)?),
        })
    }
}

/// The answer to `isEndOfTopic`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndOfTopic {
    pub end_of_topic: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_frames_read_and_answer_as_pulsar_does() {
        let m = ProducerMessage::parse(
            r#"{"payload":"aGVsbG8=","properties":{"a":"1"},"context":"c1","key":"k","extra":7}"#,
        )
        .expect("frame");
        assert_eq!(m.payload_bytes().expect("payload"), b"hello");
        assert_eq!(m.context.as_deref(), Some("c1"));
        let ack = serde_json::to_string(&ProducerAck::ok("CPEKEINF".into(), Some("1".into())))
            .expect("json");
        assert_eq!(
            ack,
            r#"{"result":"ok","messageId":"CPEKEINF","context":"1","errorCode":0,"schemaVersion":0}"#
        );
        let bad = ProducerMessage::parse(r#"{"payload":"not base64!"}"#).expect("frame");
        let e = bad.payload_bytes().expect_err("bad base64");
        assert_eq!(e.code(), 7);
        let e = ProducerMessage::parse("{not json").expect_err("bad json");
        assert_eq!(e.code(), 3);
        let err = ProducerAck::error(e.code(), e.to_string(), None);
        assert_eq!(err.result, "send-error:3");
    }

    #[test]
    fn consumer_commands() {
        use ConsumerCommand as C;
        assert_eq!(
            C::parse(r#"{"messageId":"CAAQAw=="}"#).expect("ack"),
            C::Ack("CAAQAw==".into())
        );
        assert_eq!(
            C::parse(r#"{"type":"negativeAcknowledge","messageId":"x"}"#).expect("nack"),
            C::NegativeAck("x".into())
        );
        assert_eq!(
            C::parse(r#"{"type":"permit","permitMessages":5}"#).expect("permit"),
            C::Permit(5)
        );
        assert_eq!(
            C::parse(r#"{"type":"isEndOfTopic"}"#).expect("eot"),
            C::IsEndOfTopic
        );
        assert_eq!(
            C::parse(r#"{"type":"unsubscribe"}"#).expect("unsub"),
            C::Unsubscribe
        );
        for bad in [r#"{"type":"permit"}"#, "{}", "[1]", "nope"] {
            assert_eq!(C::parse(bad).expect_err(bad).code(), 3);
        }
        assert_eq!(
            serde_json::to_string(&EndOfTopic { end_of_topic: true }).expect("json"),
            r#"{"endOfTopic":true}"#
        );
    }
}
