//! Loopback ports chosen at run time.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// Where chosen ports start: below are the well-known and registered
/// ports of other software.
pub const LOW: u16 = 10_000;

/// The first port of the kernel's ephemeral range (32768 if unknown).
pub fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&p| p > LOW + 1_000)
        .unwrap_or(32_768)
}

/// A free loopback port, for a server that must know its port before it
/// starts (raft peers name each other up front; a restarted process keeps
/// its ports).
///
/// The port comes from below the kernel's ephemeral range: between this
/// call and the server's bind, any outgoing connection (a peer dialing, a
/// test beside this one) may take an ephemeral port as its source port,
/// and the server would then fail with "address in use". Ports below the
/// range are only ever taken by explicit binds. Ports handed out in this
/// process are not handed out again. A server that need not know its port
/// up front binds port 0 instead.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let high = ephemeral_start();
    let span = u64::from(high - LOW);
    let mut given = GIVEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = RandomState::new().hash_one(std::process::id());
    for i in 0..span {
        let offset = u16::try_from(seed.wrapping_add(i) % span).unwrap_or(0);
        let port = LOW + offset;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port below {high}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_below_the_ephemeral_range_and_never_repeat() {
        let high = ephemeral_start();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        for p in ports {
            assert!((LOW..high).contains(&p), "{p}");
            TcpListener::bind(("127.0.0.1", p)).expect("still free");
        }
    }

    #[test]
    fn the_python_and_bash_helper_follows_the_same_rule() {
        let script = crate::crate_dir(env!("CARGO_MANIFEST_DIR")).join("free_port.py");
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg("3")
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let ports: Vec<u16> = text
            .split_whitespace()
            .map(|p| p.parse().expect("a port"))
            .collect();
        assert_eq!(ports.len(), 3);
        let high = ephemeral_start();
        for p in ports {
            assert!((LOW..high).contains(&p), "{p}");
        }
    }
}
