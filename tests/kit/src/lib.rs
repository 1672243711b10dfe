//! What Magnetar's tests share, so that no test carries its own copy:
//!
//! - [`ports`]: the one rule for choosing a loopback port, which the
//!   Python suites (`tests/kit/free_port.py`) and the bench scripts (that
//!   script again) follow too;
//! - [`process`]: child processes killed and reaped on drop, and started
//!   up to a readiness line;
//! - [`inproc`]: a metadata node and bookies in the test's own process;
//! - [`cluster`]: metadata nodes, bookies and brokers as processes of the
//!   `magnetar` binary, to kill and restart;
//! - [`faults`]: a loopback proxy that cuts, delays or pauses a link.
//!
//! Every cluster a test starts lives in its own temporary directory on its
//! own ports, so several run side by side (two regions, say) in one test.

pub mod cluster;
pub mod faults;
pub mod inproc;
pub mod ports;
pub mod process;

/// The directory of the crate whose test is running: cargo's
/// `CARGO_MANIFEST_DIR` when it runs the test, else `built_in`, where the
/// binary was built. A target directory shared between clones may hold a
/// test binary built in another clone.
pub fn crate_dir(built_in: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| built_in.into())
}
