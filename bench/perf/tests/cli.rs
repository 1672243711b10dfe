//! The load generators' command line: every bench has its subcommand.
//! (Their runs are checked by the bench scripts and by the broker's
//! ledger test, which drives `magnetar-perf ledger`.)

use std::process::Command;

#[test]
fn every_bench_has_its_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_magnetar-perf"))
        .arg("--help")
        .output()
        .expect("run magnetar-perf");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "metadata", "ledger", "backlog", "offload", "kafka", "amqp", "mqtt", "ws",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing from:\n{help}"
        );
    }
}
