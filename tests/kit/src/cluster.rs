//! Magnetar clusters as processes of the `magnetar` binary, for the tests
//! that SIGKILL, stop or restart a node. Each cluster has its own
//! temporary directory and ports, so several run side by side (a region
//! each, say), and a node's log is printed when its test panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use magnetar_metadata::{ClientOptions, MetaClient};

use crate::ports::free_port;
use crate::process::{spawn_until, Proc};

/// The `magnetar` binary under test: the one cargo built beside this test
/// executable (`target/<profile>/magnetar`, what `CARGO_BIN_EXE_magnetar`
/// names in that package's tests; integration tests run from
/// `target/<profile>/deps`), so that every cluster of a test runs the
/// build under test. `MAGNETAR_BIN` only where cargo built none.
pub fn magnetar_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let built = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("magnetar"))
        .filter(|bin| bin.exists());
    let bin = built
        .or_else(|| std::env::var_os("MAGNETAR_BIN").map(PathBuf::from))
        .expect("no magnetar binary: cargo build -p magnetar, or set MAGNETAR_BIN");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

pub struct MetaCluster {
    pub dir: tempfile::TempDir,
    pub addrs: BTreeMap<u64, String>,
    /// Each node's HTTP listener (`/metrics`, `/health`, `/ready`).
    pub http_addrs: BTreeMap<u64, String>,
    children: BTreeMap<u64, Proc>,
    extra: Vec<String>,
}

impl MetaCluster {
    /// Starts `n` nodes, with `extra` arguments for each.
    pub fn start(n: u64, extra: &[&str]) -> Self {
        let addrs = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let http_addrs = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut c = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            addrs,
            http_addrs,
            children: BTreeMap::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    pub fn peers(&self) -> String {
        self.addrs
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    pub fn start_node(&mut self, id: u64) {
        assert!(!self.children.contains_key(&id), "node {id} already runs");
        let mut cmd = Command::new(magnetar_bin());
        cmd.arg("meta")
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.addrs[&id]])
            .args(["--http-listen", &self.http_addrs[&id]])
            .arg("--data-dir")
            .arg(self.node_dir(id))
            .args(["--peers", &self.peers()])
            .args(["--heartbeat-ms", "100"])
            .args(["--election-min-ms", "500", "--election-max-ms", "1000"])
            .args(&self.extra)
            .env("MAGNETAR_LOG", "info,openraft=warn");
        let child = spawn_until(
            cmd,
            "listening on",
            &self.log_path(id),
            Duration::from_secs(30),
        );
        self.children.insert(id, child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children.remove(&id) {
            child.kill();
        }
    }

    pub fn kill_all(&mut self) {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }

    /// True if every started node is still running.
    pub fn all_running(&mut self) -> bool {
        self.children.values_mut().all(Proc::running)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.addrs.values().cloned().collect()
    }

    pub fn client(&self) -> MetaClient {
        MetaClient::new(&self.endpoints()).expect("client")
    }

    pub fn client_with(&self, opts: ClientOptions) -> MetaClient {
        MetaClient::with_options(&self.endpoints(), opts).expect("client")
    }

    pub fn running(&self) -> Vec<u64> {
        self.children.keys().copied().collect()
    }

    /// The id of the node that reports itself leader, once one does.
    pub async fn leader(&self, client: &MetaClient) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            for id in self.running() {
                if let Ok(s) = client.node_status(&self.addrs[&id]).await {
                    if s.state == "Leader" {
                        return id;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no leader within 20 s; logs in {}",
            self.dir.path().display()
        );
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.addrs.keys() {
            let log = std::fs::read_to_string(self.log_path(*id)).unwrap_or_default();
            out.push_str(&format!("---- node {id} ----\n{log}\n"));
        }
        out
    }
}

impl Drop for MetaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill_all();
    }
}

/// One metadata node and a set of bookie processes.
pub struct LedgerCluster {
    pub meta: MetaCluster,
    pub bookie_addrs: BTreeMap<u64, String>,
    /// Each bookie's HTTP listener.
    pub bookie_http_addrs: BTreeMap<u64, String>,
    bookies: BTreeMap<u64, Proc>,
    bookie_args: BTreeMap<u64, Vec<String>>,
}

impl LedgerCluster {
    /// Starts one meta node and bookies `1..=n`, each with `extra` args.
    pub fn start(n: u64, extra: &[&str]) -> Self {
        let meta = MetaCluster::start(1, &[]);
        let mut c = Self {
            meta,
            bookie_addrs: BTreeMap::new(),
            bookie_http_addrs: BTreeMap::new(),
            bookies: BTreeMap::new(),
            bookie_args: BTreeMap::new(),
        };
        for id in 1..=n {
            c.add_bookie(id, extra);
        }
        c
    }

    pub fn meta_endpoint(&self) -> String {
        self.meta.endpoints().join(",")
    }

    pub fn bookie_dir(&self, id: u64) -> PathBuf {
        self.meta.dir.path().join(format!("bookie-{id}"))
    }

    pub fn bookie_log(&self, id: u64) -> PathBuf {
        self.meta.dir.path().join(format!("bookie-{id}.log"))
    }

    pub fn add_bookie(&mut self, id: u64, extra: &[&str]) {
        self.bookie_addrs
            .insert(id, format!("127.0.0.1:{}", free_port()));
        self.bookie_http_addrs
            .insert(id, format!("127.0.0.1:{}", free_port()));
        self.bookie_args
            .insert(id, extra.iter().map(|s| s.to_string()).collect());
        self.start_bookie(id);
    }

    pub fn start_bookie(&mut self, id: u64) {
        assert!(!self.bookies.contains_key(&id), "bookie {id} already runs");
        let mut cmd = Command::new(magnetar_bin());
        cmd.arg("bookie")
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.bookie_addrs[&id]])
            .args(["--http-listen", &self.bookie_http_addrs[&id]])
            .arg("--data-dir")
            .arg(self.bookie_dir(id))
            .args(["--meta", &self.meta_endpoint()])
            .args(["--session-ttl-ms", "1000"])
            .args(&self.bookie_args[&id])
            .env("MAGNETAR_LOG", "info,openraft=warn");
        let child = spawn_until(
            cmd,
            "listening on",
            &self.bookie_log(id),
            Duration::from_secs(30),
        );
        self.bookies.insert(id, child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill_bookie(&mut self, id: u64) {
        if let Some(mut p) = self.bookies.remove(&id) {
            p.kill();
        }
    }

    pub fn signal_bookie(&self, id: u64, sig: rustix::process::Signal) {
        self.bookies[&id].signal(sig);
    }

    pub fn client(&self) -> magnetar_bookies::LedgerClient {
        magnetar_bookies::LedgerClient::new(self.meta.client())
    }

    /// Waits until `n` bookies are registered as writable.
    pub async fn wait_writable(&self, client: &magnetar_bookies::LedgerClient, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(w) = client.pool().writable(&[]).await {
                if w.len() >= n {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{n} writable bookies never registered");
    }

    /// A raw gRPC client of one bookie, to look at its copies directly.
    pub fn raw(&self, id: u64) -> magnetar_bookies::pool::Rpc {
        magnetar_bookies::pool::rpc(
            magnetar_bookies::pool::channel_to(&self.bookie_addrs[&id], None).expect("channel"),
            Default::default(),
        )
    }

    pub fn logs(&self) -> String {
        let mut out = self.meta.logs();
        for id in self.bookie_addrs.keys() {
            let log = std::fs::read_to_string(self.bookie_log(*id)).unwrap_or_default();
            out.push_str(&format!("---- bookie {id} ----\n{log}\n"));
        }
        out
    }
}

impl Drop for LedgerCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.bookie_addrs.keys() {
                let log = std::fs::read_to_string(self.bookie_log(*id)).unwrap_or_default();
                eprintln!("---- bookie {id} ----\n{log}");
            }
        }
        let ids: Vec<u64> = self.bookies.keys().copied().collect();
        for id in ids {
            self.kill_bookie(id);
        }
    }
}

/// `magnetar broker` of cluster `local` on `cluster`'s metadata and
/// bookies: see [`start_broker_named`].
pub fn start_broker(cluster: &LedgerCluster, http: u16, mqtt: Option<u16>, log: &Path) -> Proc {
    start_broker_named(cluster, "local", http, mqtt, log)
}

/// `magnetar broker` of cluster `name` on `cluster`'s metadata and bookies
/// (ledgers on three bookies, two acknowledging, or on every bookie when
/// there are fewer), HTTP on `http`, MQTT on `mqtt` (or an ephemeral
/// port), the other protocols on ephemeral ports; bundles of a dead
/// broker are taken over after 2 s.
pub fn start_broker_named(
    cluster: &LedgerCluster,
    name: &str,
    http: u16,
    mqtt: Option<u16>,
    log: &Path,
) -> Proc {
    let bookies = cluster.bookie_addrs.len().clamp(1, 3);
    let (ensemble, ack) = (bookies.to_string(), bookies.min(2).to_string());
    let mut cmd = Command::new(magnetar_bin());
    cmd.arg("broker")
        .args(["--meta", &cluster.meta_endpoint()])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args([
            "--kafka-listen",
            "127.0.0.1:0",
            "--amqp-listen",
            "127.0.0.1:0",
        ])
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", mqtt.unwrap_or(0))])
        .args(["--cluster", name, "--session-ttl-ms", "2000"])
        .args(["--ensemble", &ensemble, "--write-quorum", &ensemble])
        .args(["--ack-quorum", &ack])
        .env("MAGNETAR_LOG", "info,openraft=warn");
    spawn_until(cmd, "ready", log, Duration::from_secs(30))
}
