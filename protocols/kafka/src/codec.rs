//! Sans-I/O Kafka framing: bytes in, typed requests out; typed responses
//! in, bytes out. Nothing here touches a socket, so every malformed input
//! can be tested directly.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::{Decodable, Encodable};

use crate::error::KafkaError;
use crate::versions;

/// Kafka's default `socket.request.max.bytes`.
pub const DEFAULT_MAX_REQUEST: usize = 100 * 1024 * 1024;

/// A decoded request.
#[derive(Debug)]
pub struct Request {
    pub header: RequestHeader,
    pub api_key: ApiKey,
    pub body: RequestKind,
}

impl Request {
    pub fn version(&self) -> i16 {
        self.header.request_api_version
    }

    pub fn correlation_id(&self) -> i32 {
        self.header.correlation_id
    }
}

/// Why a frame did not decode, and what the connection should do.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Answer with this error code in the API's own response, keeping the
    /// connection (as Kafka does for an unsupported ApiVersions version).
    Respond {
        api_key: ApiKey,
        correlation_id: i32,
        code: i16,
    },
    /// Close the connection: the stream cannot be trusted past this frame.
    Close(String),
}

/// Takes one length-prefixed frame off the front of `buf`, if a whole one
/// is there. A length below zero or above `max` is refused before any
/// byte of the body is buffered.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, KafkaError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 0 || len as usize > max {
        return Err(KafkaError::FrameTooLarge {
            size: i64::from(len),
            max,
        });
    }
    let len = len as usize;
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Decodes one request frame (without its length prefix).
pub fn decode_request(mut frame: Bytes) -> Result<Request, DecodeError> {
    if frame.len() < 8 {
        return Err(DecodeError::Close(format!(
            "request of {} bytes is shorter than a header",
            frame.len()
        )));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let Ok(api_key) = ApiKey::try_from(key) else {
        return Err(DecodeError::Close(format!("unknown API key {key}")));
    };
    let Some(range) = versions::supported(api_key) else {
        return Err(DecodeError::Close(format!("API {api_key:?} is not served")));
    };
    if version < range.min || version > range.max {
        // Clients probe with their newest ApiVersions first and expect an
        // answer, not a close (KIP-511).
        if api_key == ApiKey::ApiVersions {
            return Err(DecodeError::Respond {
                api_key,
                correlation_id,
                code: kafka_protocol::ResponseError::UnsupportedVersion.code(),
            });
        }
        return Err(DecodeError::Close(format!(
            "{api_key:?} version {version} is not served (supported {}..{})",
            range.min, range.max
        )));
    }
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut frame, header_version)
        .map_err(|e| DecodeError::Close(format!("bad request header: {e}")))?;
    let body = RequestKind::decode(api_key, &mut frame, version)
        .map_err(|e| DecodeError::Close(format!("bad {api_key:?} v{version} request: {e}")))?;
    Ok(Request {
        header,
        api_key,
        body,
    })
}

/// Encodes a response, length prefix included.
pub fn encode_response(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
) -> Result<Bytes, KafkaError> {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(&mut buf, api_key.response_header_version(version))
        .map_err(|e| KafkaError::Encode(e.to_string()))?;
    body.encode(&mut buf, version)
        .map_err(|e| KafkaError::Encode(e.to_string()))?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

/// The answer to an ApiVersions request of a version we do not serve:
/// version 0, the error, and our ranges, so that the client retries with
/// one we do.
pub fn unsupported_api_versions(correlation_id: i32, code: i16) -> Result<Bytes, KafkaError> {
    let body = ApiVersionsResponse::default()
        .with_error_code(code)
        .with_api_keys(versions::api_versions());
    encode_response(
        ApiKey::ApiVersions,
        0,
        correlation_id,
        &ResponseKind::ApiVersions(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use kafka_protocol::protocol::StrBytes;
    use proptest::prelude::*;

    fn frame_of(api_key: ApiKey, version: i16, body: &RequestKind) -> Bytes {
        let mut buf = BytesMut::new();
        let header = RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("test")));
        header
            .encode(&mut buf, api_key.request_header_version(version))
            .expect("header");
        body.encode(&mut buf, version).expect("body");
        buf.freeze()
    }

    #[test]
    fn a_request_round_trips() {
        let body = RequestKind::Metadata(MetadataRequest::default().with_topics(None));
        let req = decode_request(frame_of(ApiKey::Metadata, 9, &body)).expect("decodes");
        assert_eq!(req.api_key, ApiKey::Metadata);
        assert_eq!(req.correlation_id(), 7);
        assert_eq!(req.version(), 9);
    }

    #[test]
    fn frames_are_split_and_bounded() {
        let mut buf = BytesMut::new();
        buf.put_i32(3);
        buf.put_slice(b"ab");
        assert_eq!(split_frame(&mut buf, 10).expect("ok"), None);
        buf.put_slice(b"c");
        buf.put_i32(1);
        assert_eq!(
            split_frame(&mut buf, 10).expect("ok").as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(split_frame(&mut buf, 10).expect("ok"), None);
        let mut big = BytesMut::new();
        big.put_i32(11);
        assert!(split_frame(&mut big, 10).is_err());
        let mut negative = BytesMut::new();
        negative.put_i32(-5);
        assert!(split_frame(&mut negative, 10).is_err());
    }

    #[test]
    fn unknown_keys_and_versions_are_refused() {
        let mut f = BytesMut::new();
        f.put_i16(999);
        f.put_i16(0);
        f.put_i32(1);
        f.put_i16(-1);
        assert!(matches!(
            decode_request(f.freeze()),
            Err(DecodeError::Close(_))
        ));
        let body = RequestKind::ApiVersions(ApiVersionsRequest::default());
        let mut frame = BytesMut::from(&frame_of(ApiKey::ApiVersions, 3, &body)[..]);
        frame[2..4].copy_from_slice(&99i16.to_be_bytes());
        assert_eq!(
            decode_request(frame.freeze()).err(),
            Some(DecodeError::Respond {
                api_key: ApiKey::ApiVersions,
                correlation_id: 7,
                code: 35
            })
        );
    }

    #[test]
    fn a_huge_array_count_is_an_error_not_an_allocation() {
        // Metadata v0: header, then a topic array claiming 2^31-1 entries.
        let mut f = BytesMut::new();
        f.put_i16(3);
        f.put_i16(0);
        f.put_i32(1);
        f.put_i16(-1);
        f.put_i32(i32::MAX);
        f.put_slice(b"xy");
        assert!(matches!(
            decode_request(f.freeze()),
            Err(DecodeError::Close(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Any bytes at all: a request, an error answer or a close, and
        /// never a panic or an abort.
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(Bytes::from(bytes));
        }

        /// Valid headers of every served API and version, followed by
        /// garbage: the body decoder must cope.
        #[test]
        fn random_bodies_never_panic(
            idx in 0usize..64,
            version in 0i16..20,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let apis = versions::api_versions();
            let api = &apis[idx % apis.len()];
            let key = ApiKey::try_from(api.api_key).expect("served key");
            let version = api.min_version + version % (api.max_version - api.min_version + 1);
            let mut f = BytesMut::new();
            let header = RequestHeader::default()
                .with_request_api_key(api.api_key)
                .with_request_api_version(version)
                .with_correlation_id(1);
            header.encode(&mut f, key.request_header_version(version)).expect("header");
            f.put_slice(&body);
            let _ = decode_request(f.freeze());
        }

        /// Truncating a valid request anywhere gives an error, not a panic.
        #[test]
        fn truncated_requests_are_errors(cut in 0usize..64) {
            let body = RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                    .with_name(Some(kafka_protocol::messages::TopicName(StrBytes::from_static_str("orders")))),
            ])));
            let full = frame_of(ApiKey::Metadata, 12, &body);
            let cut = cut.min(full.len() - 1);
            prop_assert!(decode_request(full.slice(..cut)).is_err());
        }
    }
}
