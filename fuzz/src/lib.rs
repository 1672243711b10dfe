//! Fuzz targets for every decoder that reads bytes Magnetar did not write
//! itself.
//!
//! Each target is a plain function of a byte slice. It feeds the bytes to
//! the decoders of one input surface and, where an invariant is cheap to
//! check, asserts it: a decoded record batch inflates to no more than the
//! cap, a decoded frame encoded again decodes to the same frame, a journal
//! replay yields exactly the prefix it keeps. A target never panics on its
//! own account, so a panic is a bug in the code under test (or an
//! invariant it broke), and an abort or a stack overflow is one too.
//!
//! The same functions run in two harnesses:
//!
//! - `tests/ci.rs`, under `cargo test` on stable Rust: every seed of
//!   [`seeds`], every file of `corpus/<target>/`, then a fixed number of
//!   mutants and random inputs from a fixed-seed generator, so that CI is
//!   deterministic and quick;
//! - `libfuzzer/`, a cargo-fuzz crate outside the workspace, for
//!   coverage-guided runs of hours on nightly Rust, with sanitizers.
//!
//! [`seeds`] builds valid inputs with the real encoders (Kafka requests,
//! AMQP frames, MQTT packets of every level, record batches in every codec,
//! offloaded ledger files, journal records, protobuf requests), so that
//! mutation starts from bytes that get past the first length check.

mod amqp;
mod bookie;
mod geo;
mod kafka;
mod metadata;
mod mqtt;
mod records;
mod tiering;
mod websocket;

/// Kafka requests as a client sends them: length-prefixed frames split by
/// `magnetar_kafka::codec::split_frame`, each decoded by `decode_request`,
/// with the record sets of produce requests and the consumer-protocol
/// metadata of join-group requests decoded as the broker does.
pub fn kafka_request(data: &[u8]) {
    kafka::run(data);
}

/// Kafka record batches as producers send them and bookies return them:
/// split, validated, their headers parsed, their records decoded in every
/// compression, re-encoded and recompressed.
pub fn record_batch(data: &[u8]) {
    records::run(data);
}

/// AMQP 0-9-1 bytes as a client sends them from the first octet: the
/// protocol header, then frames, assembled into publishes per channel.
pub fn amqp_frame(data: &[u8]) {
    amqp::frames(data);
}

/// AMQP field tables, as they arrive in methods and content headers and
/// as they come back from storage in a record's `amqp.headers` header.
pub fn amqp_field_table(data: &[u8]) {
    amqp::field_table(data);
}

/// MQTT bytes as a client sends them: first as the start of a connection,
/// then after a valid CONNECT of each level (3.1, 3.1.1, 5.0).
pub fn mqtt_packet(data: &[u8]) {
    mqtt::run(data);
}

/// The text a WebSocket client sends: producer frames, consumer commands,
/// message ids, timestamps, and the path and query of the upgrade request.
pub fn ws_frames(data: &[u8]) {
    websocket::run(data);
}

/// Offloaded ledgers as they come back from object storage: the index
/// JSON, the whole Arrow IPC file, and one block read by its byte range.
pub fn tier_file(data: &[u8]) {
    tiering::run(data);
}

/// A bookie's own files after a crash or on a bad disk: a journal file
/// replayed at start, an entry log scanned by compaction, single entry-log
/// records and the index's encoded positions.
pub fn journal_replay(data: &[u8]) {
    bookie::files(data);
}

/// The bookie's gRPC messages, requests and responses.
pub fn bookie_proto(data: &[u8]) {
    bookie::messages(data);
}

/// The metadata store's gRPC messages, and the postcard-encoded raft
/// messages inside its `RaftRequest`.
pub fn metadata_proto(data: &[u8]) {
    metadata::run(data);
}

/// The replication stream between clusters: its gRPC messages, and a
/// replicated batch checked and stamped as the receiver does.
pub fn geo_proto(data: &[u8]) {
    geo::run(data);
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), $name as Target)),*]
    };
}

/// A target: untrusted bytes in, nothing out but a panic on a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as the harnesses find them.
pub const TARGETS: &[(&str, Target)] = targets![
    kafka_request,
    record_batch,
    amqp_frame,
    amqp_field_table,
    mqtt_packet,
    ws_frames,
    tier_file,
    journal_replay,
    bookie_proto,
    metadata_proto,
    geo_proto,
];

/// A protobuf message that decodes encodes to exactly its encoded length,
/// and decodes again to the same message (unknown fields are dropped on
/// the first decode, so the comparison is of the decoded values).
fn proto_round_trip<T: prost::Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(m) = T::decode(data) else {
        return;
    };
    let again = m.encode_to_vec();
    assert_eq!(
        again.len(),
        m.encoded_len(),
        "encoded_len disagrees with encode"
    );
    let back = T::decode(again.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(back, m, "a message changed through encode and decode");
}

/// Valid inputs for `target`, built with the real encoders; none for a
/// name that is not a target.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut out = match target {
        "kafka_request" => kafka::seeds(),
        "record_batch" => records::seeds(),
        "amqp_frame" => amqp::frame_seeds(),
        "amqp_field_table" => amqp::table_seeds(),
        "mqtt_packet" => mqtt::seeds(),
        "ws_frames" => websocket::seeds(),
        "tier_file" => tiering::seeds(),
        "journal_replay" => bookie::file_seeds(),
        "bookie_proto" => bookie::proto_seeds(),
        "metadata_proto" => metadata::seeds(),
        "geo_proto" => geo::seeds(),
        _ => Vec::new(),
    };
    // An encoder that refused its input leaves an empty seed behind; the
    // harnesses try the empty input anyway.
    out.retain(|s| !s.is_empty());
    out
}
