//! Message ids as Pulsar's clients see them: base64 (standard, padded) of
//! the `MessageIdData` protobuf. A Magnetar entry is a (ledger, entry) pair
//! already, so ids map one to one.

use base64::Engine;
use prost::Message;

use crate::{Result, WsError};

/// `MessageIdData` of PulsarApi.proto (proto2), field for field. Its two
/// required fields are declared optional here, because prost does not
/// check presence and a decoder must refuse ids without them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MessageIdData {
    #[prost(uint64, optional, tag = "1")]
    pub ledger_id: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    pub entry_id: Option<u64>,
    #[prost(int32, optional, tag = "3", default = "-1")]
    pub partition: Option<i32>,
    #[prost(int32, optional, tag = "4", default = "-1")]
    pub batch_index: Option<i32>,
    #[prost(int64, repeated, packed = "false", tag = "5")]
    pub ack_set: Vec<i64>,
    #[prost(int32, optional, tag = "6")]
    pub batch_size: Option<i32>,
    #[prost(message, optional, boxed, tag = "7")]
    pub first_chunk_message_id: Option<Box<MessageIdData>>,
}

/// A position: the ledger and entry, the partition of a partitioned topic,
/// and the index within a batch entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageId {
    pub ledger: u64,
    pub entry: u64,
    pub partition: Option<u32>,
    pub batch_index: Option<u32>,
}

impl MessageId {
    pub fn new(ledger: u64, entry: u64) -> Self {
        MessageId {
            ledger,
            entry,
            partition: None,
            batch_index: None,
        }
    }

    /// As current Java clients write it: `batch_size` 0 on plain ids too.
    pub fn encode(&self) -> String {
        let data = MessageIdData {
            ledger_id: Some(self.ledger),
            entry_id: Some(self.entry),
            partition: self.partition.and_then(|p| i32::try_from(p).ok()),
            batch_index: self.batch_index.and_then(|b| i32::try_from(b).ok()),
            ack_set: Vec::new(),
            batch_size: Some(0),
            first_chunk_message_id: None,
        };
        base64::engine::general_purpose::STANDARD.encode(data.encode_to_vec())
    }

    /// Reads an id of any Pulsar version, with or without `batch_size`.
    /// The chunk fields are not read: Magnetar stores no chunked messages.
    pub fn decode(s: &str) -> Result<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| WsError::MessageId(format!("not base64: {e}")))?;
        let d = MessageIdData::decode(bytes.as_slice())
            .map_err(|e| WsError::MessageId(format!("not a MessageIdData: {e}")))?;
        let (Some(ledger), Some(entry)) = (d.ledger_id, d.entry_id) else {
            return Err(WsError::MessageId("ledgerId or entryId is missing".into()));
        };
        Ok(MessageId {
            ledger,
            entry,
            partition: d.partition.and_then(|p| u32::try_from(p).ok()),
            batch_index: d.batch_index.and_then(|b| u32::try_from(b).ok()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_written_by_pulsar_clients_decode() {
        // Without batch_size (older clients) and with it (current ones).
        assert_eq!(
            MessageId::decode("CAAQAw==").expect("id"),
            MessageId::new(0, 3)
        );
        assert_eq!(
            MessageId::decode("CAMQADAA").expect("id"),
            MessageId::new(3, 0)
        );
        assert_eq!(
            MessageId::decode("CPEKEINF").expect("id"),
            MessageId::new(1393, 8835)
        );
        let p = MessageId::decode("CJ4CEAAYAA==").expect("id");
        assert_eq!((p.ledger, p.entry, p.partition), (286, 0, Some(0)));
    }

    #[test]
    fn plain_ids_encode_as_current_java_clients_do() {
        assert_eq!(MessageId::new(3, 0).encode(), "CAMQADAA");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in ["", "!!!", "AAAA", "CAA=", "/////////w=="] {
            assert!(MessageId::decode(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn ids_round_trip(ledger: u64, entry: u64, part in proptest::option::of(0u32..1 << 31),
                          batch in proptest::option::of(0u32..1 << 31)) {
            let id = MessageId { ledger, entry, partition: part, batch_index: batch };
            prop_assert_eq!(MessageId::decode(&id.encode()).expect("round trip"), id);
        }

        #[test]
        fn any_text_decodes_or_errs(s in ".{0,40}") {
            let _ = MessageId::decode(&s);
        }
    }
}
