//! A metadata node and bookies in this process, for broker tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use magnetar_bookies::{BookieConfig, BookieServer, LedgerClient};
use magnetar_metadata::{MetaClient, MetaNode, NodeConfig};

pub struct Cluster {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub meta: MetaNode,
    pub bookies: Vec<BookieServer>,
}

impl Cluster {
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
            let mut cfg = BookieConfig::new(
                id,
                "127.0.0.1:0".parse().expect("addr"),
                c.dir.join(format!("bookie-{id}")),
                c.endpoints(),
            );
            cfg.session_ttl = Duration::from_millis(1000);
            // Build output may fill the shared disk; these tests are not about
            // the read-only mode.
            cfg.disk_usage_threshold = 0.995;
            c.bookies
                .push(BookieServer::start(cfg).await.expect("bookie"));
        }
        let client = c.ledger_client();
        for _ in 0..200 {
            if client.pool().writable(&[]).await.expect("list").len() >= bookies as usize {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("bookies never registered");
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
}
