//! The protocol suites written against independent client libraries
//! (`tests/clients/`, run with pytest from the virtualenv that
//! `scripts/bootstrap` prepares). Each suite starts its own
//! `magnetar standalone` processes on ephemeral loopback ports.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_magnetar");

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("MAGNETAR_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/magnetar-venv")))
        .expect("HOME or MAGNETAR_VENV is set");
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap first",
        python.display()
    );
    python
}

fn pytest(suite: &str) {
    let clients =
        magnetar_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients");
    let status = Command::new(venv_python())
        .current_dir(&clients)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:warnings",
            "--import-mode=importlib",
            "--durations=5",
            suite,
        ])
        .env("MAGNETAR_BIN", BIN)
        .status()
        .expect("pytest runs");
    assert!(status.success(), "pytest {suite} failed: {status}");
}

#[test]
fn kafka_clients() {
    pytest("kafka_tests");
}

#[test]
fn amqp_clients() {
    pytest("amqp_tests");
}

#[test]
fn mqtt_clients() {
    pytest("mqtt_tests");
}

/// The WebSocket API with `websockets`, and the console in headless
/// Chromium (its screenshot lands in `tests/clients/artifacts/`).
#[test]
fn websocket_clients() {
    pytest("ws_tests");
}

/// The 4×4 interop matrix: Kafka, AMQP, MQTT and WebSocket clients each
/// publish, and each consume what all four published; prints the grid.
#[test]
fn interop_matrix() {
    pytest("interop_tests");
}

/// Tiered storage against moto_server (S3): 200 MB through Kafka offloaded
/// and read back through Kafka and an AMQP stream queue, pyarrow reading
/// the objects, a corrupted object and a store stopped mid-offload.
#[test]
fn tiered_storage() {
    pytest("tiering_tests");
}

/// Hostile input and data safety: frames built to crash the process,
/// retention against consumers it must not outrun, exhaustion attempts.
#[test]
fn safety() {
    pytest("safety_tests");
}

/// Authentication and authorization with real clients: every HTTP route,
/// WebSocket dead-letter topics, Kafka and AMQP operations by permission,
/// MQTT sessions by role.
#[test]
fn security() {
    pytest("security_tests");
}

/// `/metrics`, `/health` and `/ready` of standalone, metadata nodes and
/// bookies, parsed strictly, with counters checked against the traffic
/// of real clients.
#[test]
fn metrics() {
    pytest("metrics_tests");
}

/// Geo-replication: the cluster registry and replication policies in
/// Pulsar's shapes, with the admin CLI.
#[test]
fn geo() {
    pytest("geo_tests");
}
