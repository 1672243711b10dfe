//! Harness of the process-level tests: the test kit's ports, processes and
//! clusters, on this package's `magnetar` binary.

#![allow(dead_code, unused_imports)]

pub const BIN: &str = env!("CARGO_BIN_EXE_magnetar");

pub use magnetar::entry_payload;
pub use magnetar_testkit::cluster::{start_broker, LedgerCluster, MetaCluster};
pub use magnetar_testkit::ports::free_port;
pub use magnetar_testkit::process::{spawn_until, Proc};

/// `magnetar-perf`, which `cargo test --workspace` builds beside
/// `magnetar` (its package's own CLI test needs it).
pub fn perf_bin() -> std::path::PathBuf {
    let p = std::path::Path::new(BIN).with_file_name("magnetar-perf");
    assert!(
        p.exists(),
        "{} is missing: cargo build -p magnetar-perf",
        p.display()
    );
    p
}
