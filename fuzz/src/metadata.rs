//! The metadata store's gRPC messages, and the raft messages its nodes
//! exchange inside `RaftRequest`.

use std::fmt::Debug;
use std::io::Cursor;

use bytes::Bytes;
use magnetar_metadata::proto;
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
use prost::Message as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto_round_trip;

openraft::declare_raft_types!(
    /// The store's raft types as far as the messages decoded here depend
    /// on them: node ids and nodes. Its command type is private to the
    /// store, so messages that carry commands (AppendEntries) are not
    /// decoded here.
    // Only ever a type parameter, never a value.
    #[allow(dead_code)]
    FuzzRaft:
        D = String,
        R = String,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<FuzzRaft>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub fn run(data: &[u8]) {
    proto_round_trip::<proto::GetRequest>(data);
    proto_round_trip::<proto::PutRequest>(data);
    proto_round_trip::<proto::DeleteRequest>(data);
    proto_round_trip::<proto::ListRequest>(data);
    proto_round_trip::<proto::WatchRequest>(data);
    proto_round_trip::<proto::GrantSessionRequest>(data);
    proto_round_trip::<proto::KeepAliveRequest>(data);
    proto_round_trip::<proto::RevokeSessionRequest>(data);
    proto_round_trip::<proto::StatusRequest>(data);
    proto_round_trip::<proto::RaftRequest>(data);
    // Responses, as clients and other nodes read them.
    proto_round_trip::<proto::GetResponse>(data);
    proto_round_trip::<proto::PutResponse>(data);
    proto_round_trip::<proto::DeleteResponse>(data);
    proto_round_trip::<proto::ListResponse>(data);
    proto_round_trip::<proto::WatchResponse>(data);
    proto_round_trip::<proto::StatusResponse>(data);
    proto_round_trip::<proto::RaftReply>(data);
    if let Ok(req) = proto::RaftRequest::decode(data) {
        raft_payload(&req.payload);
    }
    // The payload alone, so that mutations are not spent on the wrapper.
    raft_payload(data);
}

/// What a node decodes out of a `RaftRequest` from a peer.
fn raft_payload(payload: &[u8]) {
    postcard_round_trip::<VoteRequest<u64>>(payload);
    postcard_round_trip::<InstallSnapshotRequest<FuzzRaft>>(payload);
}

fn postcard_round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(payload: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(payload) {
        let again = postcard::to_allocvec(&v).expect("a decoded raft message encodes");
        let back = postcard::from_bytes::<T>(&again).expect("a re-encoded raft message decodes");
        assert_eq!(back, v, "a raft message changed through postcard");
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let vote: VoteRequest<u64> = VoteRequest::new(
        Vote::new(3, 1),
        Some(LogId::new(CommittedLeaderId::new(2, 1), 17)),
    );
    let snapshot: InstallSnapshotRequest<FuzzRaft> = InstallSnapshotRequest {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 40)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-40-1".to_owned(),
        },
        offset: 0,
        data: b"snapshot bytes".to_vec(),
        done: true,
    };
    let vote_bytes = postcard::to_allocvec(&vote).unwrap_or_default();
    let snapshot_bytes = postcard::to_allocvec(&snapshot).unwrap_or_default();
    let kv = proto::KeyValue {
        key: "/ledgers/meta/00000000000000000001".into(),
        value: Bytes::from_static(b"{\"id\":1}"),
        version: 5,
        create_revision: 3,
        session: 0,
    };
    vec![
        proto::GetRequest {
            key: "/bookies/info/1".into(),
        }
        .encode_to_vec(),
        proto::PutRequest {
            key: kv.key.clone(),
            value: kv.value.clone(),
            expected_version: Some(0),
            session: 9,
        }
        .encode_to_vec(),
        proto::DeleteRequest {
            key: kv.key.clone(),
            expected_version: Some(5),
        }
        .encode_to_vec(),
        proto::ListRequest {
            prefix: "/ledgers/".into(),
            start_after: "/ledgers/meta/0".into(),
            limit: 100,
            keys_only: true,
        }
        .encode_to_vec(),
        proto::WatchRequest {
            prefix: "/".into(),
            start_revision: 42,
        }
        .encode_to_vec(),
        proto::GrantSessionRequest { ttl_ms: 10_000 }.encode_to_vec(),
        proto::KeepAliveRequest { session: 9 }.encode_to_vec(),
        proto::RevokeSessionRequest { session: 9 }.encode_to_vec(),
        proto::RaftRequest {
            from: 1,
            payload: Bytes::from(vote_bytes.clone()),
        }
        .encode_to_vec(),
        proto::RaftRequest {
            from: 1,
            payload: Bytes::from(snapshot_bytes.clone()),
        }
        .encode_to_vec(),
        proto::GetResponse {
            kv: Some(kv.clone()),
            revision: 6,
        }
        .encode_to_vec(),
        proto::PutResponse {
            succeeded: true,
            kv: Some(kv.clone()),
            revision: 6,
        }
        .encode_to_vec(),
        proto::ListResponse {
            kvs: vec![kv.clone(), kv.clone()],
            more: true,
            revision: 6,
        }
        .encode_to_vec(),
        proto::WatchResponse {
            events: vec![proto::WatchEvent {
                kind: proto::watch_event::Kind::Delete as i32,
                kv: Some(kv),
                revision: 7,
            }],
            start_after: 5,
        }
        .encode_to_vec(),
        proto::StatusResponse {
            id: 1,
            leader: Some(1),
            leader_addr: "127.0.0.1:7000".into(),
            members: vec![proto::Member {
                id: 1,
                addr: "127.0.0.1:7000".into(),
            }],
            ..Default::default()
        }
        .encode_to_vec(),
        vote_bytes,
        snapshot_bytes,
    ]
}
