//! A metadata node and bookies in the test's own process: the storage
//! under a broker or a ledger client, quickly. Clusters of processes, to
//! SIGKILL, are in [`crate::cluster`].

use std::path::PathBuf;
use std::time::Duration;

use magnetar_bookies::{BookieConfig, BookieServer, LedgerClient};
use magnetar_metadata::{MetaClient, MetaNode, NodeConfig};

pub struct Cluster {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub meta: MetaNode,
    /// Bookie `id` at index `id - 1`; None while a test has it stopped.
    pub bookies: Vec<Option<BookieServer>>,
}

impl Cluster {
    /// A metadata node and `bookies` bookies, all registered and writable.
    pub async fn start(bookies: u64) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let meta = MetaNode::start(NodeConfig::single(
            "127.0.0.1:0".parse().expect("addr"),
            dir.join("meta"),
        ))
        .await
        .expect("meta");
        meta.wait_for_leader(Duration::from_secs(10))
            .await
            .expect("leader");
        let mut c = Cluster {
            dir,
            _tmp: tmp,
            meta,
            bookies: Vec::new(),
        };
        for id in 1..=bookies {
            let b = c.start_bookie(id).await;
            c.bookies.push(Some(b));
        }
        let client = c.ledger_client();
        c.wait_writable(&client, usize::try_from(bookies).unwrap_or(usize::MAX))
            .await;
        c
    }

    /// Starts bookie `id` on its directory (again, after a stop).
    pub async fn start_bookie(&self, id: u64) -> BookieServer {
        let mut cfg = BookieConfig::new(
            id,
            "127.0.0.1:0".parse().expect("addr"),
            self.dir.join(format!("bookie-{id}")),
            self.endpoints(),
        );
        cfg.session_ttl = Duration::from_millis(1000);
        // Build output may fill the shared disk; these tests are not about
        // the read-only mode.
        cfg.disk_usage_threshold = 0.995;
        BookieServer::start(cfg).await.expect("bookie")
    }

    /// Bookie `id`, running.
    pub fn bookie(&self, id: u64) -> &BookieServer {
        usize::try_from(id - 1)
            .ok()
            .and_then(|i| self.bookies.get(i)?.as_ref())
            .expect("a running bookie")
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.meta.local_addr().to_string()]
    }

    pub fn meta_client(&self) -> MetaClient {
        MetaClient::new(&self.endpoints()).expect("meta client")
    }

    pub fn ledger_client(&self) -> LedgerClient {
        LedgerClient::new(self.meta_client())
    }

    /// Waits until `n` bookies are registered and writable.
    pub async fn wait_writable(&self, client: &LedgerClient, n: usize) {
        for _ in 0..200 {
            if client.pool().writable(&[]).await.expect("list").len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{n} bookies never registered");
    }
}
