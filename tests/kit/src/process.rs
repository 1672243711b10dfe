//! Child processes of a test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process that is SIGKILLed and reaped when dropped, so that a
/// failing test leaves no process behind.
pub struct Proc(Child);

impl Proc {
    pub fn from_child(child: Child) -> Self {
        Proc(child)
    }

    /// SIGKILL, as a crash would, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Sends `sig` (for example `Signal::STOP`, `Signal::CONT`).
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = i32::try_from(self.0.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("a child's pid");
        rustix::process::kill_process(pid, sig).expect("signal the child");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` and waits until it prints a stdout line containing `ready`.
/// Later stdout is drained in the background; stderr goes to `log`.
pub fn spawn_until(mut cmd: Command, ready: &str, log: &Path, timeout: Duration) -> Proc {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log file");
    // The test processes share a developer's or CI runner's disk, which may
    // be nearly full of build output; only the tests of the read-only mode
    // (which pass their own threshold) should see the bookie turn read-only.
    if !cmd
        .get_envs()
        .any(|(k, _)| k == "MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD")
    {
        cmd.env("MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD", "0.995");
    }
    cmd.stdout(Stdio::piped())
        .stderr(log_file)
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn the process");
    // Moved into a `Proc` below, which reaps it.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&ready) {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    let mut proc = Proc(child);
    if rx.recv_timeout(timeout).is_err() {
        proc.kill();
        let log = std::fs::read_to_string(log).unwrap_or_default();
        panic!("process did not become ready within {timeout:?}; its log:\n{log}");
    }
    proc
}
