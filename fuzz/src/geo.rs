//! The replication stream between clusters: every message of the
//! `Replication` service, and a replicated batch taken as the receiver
//! takes it (checked, judged against a watermark, stamped with its source
//! range), which must leave a batch that is still valid and names that
//! range.

use bytes::Bytes;
use magnetar_broker::format::{encode_batch, validate_batch, with_base_offset, with_geo_stamp};
use magnetar_broker::replicated::{GeoStamp, Verdict, Watermark};
use magnetar_broker::Message;
use magnetar_geo::proto;
use prost::Message as _;

use crate::proto_round_trip;

pub fn run(data: &[u8]) {
    proto_round_trip::<proto::HandshakeRequest>(data);
    proto_round_trip::<proto::HandshakeReply>(data);
    proto_round_trip::<proto::ReplicateRequest>(data);
    proto_round_trip::<proto::ReplicateReply>(data);
    if let Ok(m) = proto::ReplicateRequest::decode(data) {
        receive(m.prev, m.batch);
    }
    // The bytes as a batch on their own, too.
    receive(0, Bytes::copy_from_slice(data));
}

fn receive(prev: u64, batch: Bytes) {
    let Ok(h) = validate_batch(&batch) else {
        return;
    };
    let Ok(base) = u64::try_from(h.base_offset) else {
        return;
    };
    let Some(stamp) = GeoStamp::new(7, base).filter(|_| !h.is_control()) else {
        return;
    };
    let mut w = Watermark::default();
    if w.handshake(1).is_err() {
        return;
    }
    if w.offer(prev, base, h.offset_count()) != Verdict::Append {
        return;
    }
    let stamped = with_geo_stamp(batch, &h, stamp).expect("a valid batch stamps");
    let again = validate_batch(&stamped).expect("a stamped batch is valid");
    assert_eq!(
        GeoStamp::decode(again.producer_id, again.producer_epoch, again.base_sequence),
        Some((7, base))
    );
    assert_eq!(again.offset_count(), h.offset_count());
    assert!(!again.is_transactional());
}

pub fn seeds() -> Vec<Vec<u8>> {
    let msgs = vec![Message::new("east-0"), Message::new("east-1")];
    let batch = encode_batch(&msgs, None)
        .map(|b| with_base_offset(b, 5))
        .unwrap_or_default();
    vec![
        proto::ReplicateRequest {
            prev: 3,
            batch: batch.clone(),
            source_append_ms: 1_700_000_000_000,
        }
        .encode_to_vec(),
        batch.to_vec(),
        proto::HandshakeRequest {
            source_cluster: "east".into(),
            topic: "persistent://geo/ns/t-partition-0".into(),
            incarnation: 42,
            partitions: 6,
        }
        .encode_to_vec(),
        proto::HandshakeReply {
            reply: Some(proto::handshake_reply::Reply::NotOwner(
                "http://127.0.0.1:8080".into(),
            )),
        }
        .encode_to_vec(),
        proto::ReplicateReply {
            reply: Some(proto::replicate_reply::Reply::OutOfOrderNext(9)),
        }
        .encode_to_vec(),
    ]
}
