//! Kafka requests: framing, request decoding, and what the handlers decode
//! further out of a request (produce record sets, consumer-group metadata).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ConsumerProtocolSubscription, CreateTopicsRequest, FetchRequest,
    FindCoordinatorRequest, GroupId, InitProducerIdRequest, JoinGroupRequest, ListOffsetsRequest,
    MetadataRequest, OffsetCommitRequest, ProduceRequest, RequestHeader, RequestKind,
    SaslAuthenticateRequest, SaslHandshakeRequest, TopicName, TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use magnetar_kafka::codec::{
    decode_request, split_frame, DecodeError, Request, DEFAULT_MAX_REQUEST,
};

use crate::records;

/// Frames taken off one input: enough to reach pipelining, few enough that
/// an input of empty frames stays cheap.
const MAX_FRAMES: usize = 64;

pub fn run(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    for _ in 0..MAX_FRAMES {
        let before = buf.len();
        match split_frame(&mut buf, DEFAULT_MAX_REQUEST) {
            Ok(Some(frame)) => {
                assert_eq!(
                    before,
                    buf.len() + 4 + frame.len(),
                    "split_frame must take exactly one length prefix and its frame"
                );
                request(frame);
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The same bytes as one frame whose prefix was already taken, so that
    // mutations of the header are not all spent on the length.
    request(Bytes::copy_from_slice(data));
}

fn request(frame: Bytes) {
    let req = match decode_request(frame) {
        Ok(req) => req,
        Err(DecodeError::Respond { api_key, .. }) => {
            // Only an ApiVersions probe is answered rather than closed.
            assert_eq!(api_key, ApiKey::ApiVersions);
            return;
        }
        Err(DecodeError::Close(_)) => return,
    };
    match &req.body {
        RequestKind::Produce(p) => {
            for set in p
                .topic_data
                .iter()
                .flat_map(|t| t.partition_data.iter())
                .filter_map(|p| p.records.as_ref())
            {
                records::check_record_set(set);
            }
        }
        RequestKind::JoinGroup(j) => {
            for p in &j.protocols {
                subscription(&p.metadata);
            }
        }
        _ => {}
    }
    round_trip(&req);
}

/// A member's subscription as the group coordinator reads it: a version,
/// then the consumer protocol's subscription at that version.
fn subscription(metadata: &Bytes) {
    if metadata.len() < 2 {
        return;
    }
    let mut meta = metadata.clone();
    let version = meta.get_i16();
    let _ = ConsumerProtocolSubscription::decode(&mut meta, version.clamp(0, 3));
}

/// A decoded request encodes again, and that decodes to the same request.
fn round_trip(req: &Request) {
    let version = req.version();
    let mut buf = BytesMut::new();
    let header_version = req.api_key.request_header_version(version);
    if req.header.encode(&mut buf, header_version).is_err()
        || req.body.encode(&mut buf, version).is_err()
    {
        // The broker never encodes requests; a value the client-side
        // encoder refuses is not a broker bug.
        return;
    }
    let again = match decode_request(buf.freeze()) {
        Ok(again) => again,
        Err(e) => panic!(
            "{:?} v{version} encoded again does not decode: {e:?}",
            req.api_key
        ),
    };
    assert_eq!(
        again.header, req.header,
        "{:?} v{version} header",
        req.api_key
    );
    assert_eq!(again.body, req.body, "{:?} v{version} body", req.api_key);
}

/// A request as a client frames it: size, header, body.
fn frame(key: ApiKey, version: i16, correlation_id: i32, body: &RequestKind) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("magnetar-fuzz")));
    if header
        .encode(&mut buf, key.request_header_version(version))
        .is_err()
        || body.encode(&mut buf, version).is_err()
    {
        return Vec::new();
    }
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.to_vec()
}

fn s(v: &'static str) -> StrBytes {
    StrBytes::from_static_str(v)
}

fn topic(v: &'static str) -> TopicName {
    TopicName(s(v))
}

/// Group metadata as a Java consumer sends it in JoinGroup: version 3 of
/// the consumer protocol's subscription, behind its version.
fn subscription_metadata() -> Bytes {
    let sub = ConsumerProtocolSubscription::default()
        .with_topics(vec![s("orders"), s("payments")])
        .with_owned_partitions(vec![TopicPartition::default()
            .with_topic(topic("orders"))
            .with_partitions(vec![0, 1])])
        .with_generation_id(3)
        .with_rack_id(Some(s("rack-1")));
    let mut buf = BytesMut::new();
    buf.put_i16(3);
    if sub.encode(&mut buf, 3).is_err() {
        return Bytes::new();
    }
    buf.freeze()
}

fn produce(version: i16) -> (ApiKey, i16, RequestKind) {
    let body = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic("orders"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records::record_set()))])]);
    (ApiKey::Produce, version, RequestKind::Produce(body))
}

fn fetch(version: i16) -> (ApiKey, i16, RequestKind) {
    let body = FetchRequest::default()
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic("orders"))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(10)
                .with_partition_max_bytes(1 << 20)])]);
    (ApiKey::Fetch, version, RequestKind::Fetch(body))
}

fn join_group(version: i16) -> (ApiKey, i16, RequestKind) {
    let mut body = JoinGroupRequest::default()
        .with_group_id(GroupId(s("group-1")))
        .with_session_timeout_ms(10_000)
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(subscription_metadata())]);
    if version >= 1 {
        body = body.with_rebalance_timeout_ms(30_000);
    }
    (ApiKey::JoinGroup, version, RequestKind::JoinGroup(body))
}

/// Requests of the APIs whose bodies carry the most structure, at old and
/// new versions (non-flexible and flexible encodings).
fn requests() -> Vec<(ApiKey, i16, RequestKind)> {
    vec![
        (
            ApiKey::ApiVersions,
            3,
            RequestKind::ApiVersions(
                ApiVersionsRequest::default()
                    .with_client_software_name(s("magnetar-fuzz"))
                    .with_client_software_version(s("1.0")),
            ),
        ),
        (
            ApiKey::ApiVersions,
            0,
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ),
        (
            ApiKey::Metadata,
            12,
            RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic("orders"))),
            ]))),
        ),
        (
            ApiKey::Metadata,
            4,
            RequestKind::Metadata(MetadataRequest::default().with_topics(None)),
        ),
        produce(9),
        produce(3),
        fetch(12),
        fetch(4),
        join_group(9),
        join_group(0),
        (
            ApiKey::SaslHandshake,
            1,
            RequestKind::SaslHandshake(SaslHandshakeRequest::default().with_mechanism(s("PLAIN"))),
        ),
        (
            ApiKey::SaslAuthenticate,
            2,
            RequestKind::SaslAuthenticate(
                SaslAuthenticateRequest::default()
                    .with_auth_bytes(Bytes::from_static(b"\0alice\0secret")),
            ),
        ),
        (
            ApiKey::CreateTopics,
            7,
            RequestKind::CreateTopics(
                CreateTopicsRequest::default()
                    .with_timeout_ms(30_000)
                    .with_topics(vec![CreatableTopic::default()
                        .with_name(topic("orders"))
                        .with_num_partitions(3)
                        .with_replication_factor(-1)
                        .with_configs(vec![CreatableTopicConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("60000")))])]),
            ),
        ),
        (
            ApiKey::FindCoordinator,
            4,
            RequestKind::FindCoordinator(
                FindCoordinatorRequest::default().with_coordinator_keys(vec![s("group-1")]),
            ),
        ),
        (
            ApiKey::FindCoordinator,
            0,
            RequestKind::FindCoordinator(FindCoordinatorRequest::default().with_key(s("group-1"))),
        ),
        (
            ApiKey::InitProducerId,
            4,
            RequestKind::InitProducerId(
                InitProducerIdRequest::default()
                    .with_transactional_id(Some(TransactionalId(s("tx-1"))))
                    .with_transaction_timeout_ms(60_000),
            ),
        ),
        (
            ApiKey::ListOffsets,
            7,
            RequestKind::ListOffsets(ListOffsetsRequest::default().with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(topic("orders"))
                    .with_partitions(vec![ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-1)]),
            ])),
        ),
        (
            ApiKey::OffsetCommit,
            8,
            RequestKind::OffsetCommit(
                OffsetCommitRequest::default()
                    .with_group_id(GroupId(s("group-1")))
                    .with_generation_id_or_member_epoch(1)
                    .with_member_id(s("member-1"))
                    .with_topics(vec![OffsetCommitRequestTopic::default()
                        .with_name(topic("orders"))
                        .with_partitions(vec![OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(42)
                            .with_committed_metadata(Some(s("")))])]),
            ),
        ),
    ]
}

/// A valid header of every served API at its oldest and newest version,
/// then zeros: for most bodies zeros are empty arrays and strings, so each
/// API's body decoder is reached.
fn every_served_api() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for api in magnetar_kafka::versions::api_versions() {
        let Ok(key) = ApiKey::try_from(api.api_key) else {
            continue;
        };
        for version in [api.min_version, api.max_version] {
            let mut buf = BytesMut::new();
            buf.put_i32(0);
            let header = RequestHeader::default()
                .with_request_api_key(api.api_key)
                .with_request_api_version(version)
                .with_correlation_id(1);
            if header
                .encode(&mut buf, key.request_header_version(version))
                .is_err()
            {
                continue;
            }
            buf.put_bytes(0, 16);
            let len = (buf.len() - 4) as i32;
            buf[..4].copy_from_slice(&len.to_be_bytes());
            out.push(buf.to_vec());
        }
    }
    out
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = requests()
        .iter()
        .zip(1..)
        .map(|((key, version, body), id)| frame(*key, *version, id, body))
        .collect();
    // Pipelined: several requests in one read.
    let pipelined: Vec<u8> = out.iter().take(4).flatten().copied().collect();
    out.push(pipelined);
    out.extend(every_served_api());
    out
}
