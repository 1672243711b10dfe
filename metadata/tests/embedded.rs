//! The embedded single-node group that `magnetar standalone` uses, in process.

use std::time::Duration;

use futures::StreamExt;
use magnetar_metadata::{EventKind, MetaClient, MetaNode, NodeConfig, RaftTuning};

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        tuning: RaftTuning {
            snapshot_every: 100,
            keep_logs: 10,
            ..RaftTuning::default()
        },
        ..NodeConfig::single("127.0.0.1:0".parse().expect("addr"), dir.to_path_buf())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_serves_and_survives_restart() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let node = MetaNode::start(config(dir.path())).await?;
    node.wait_for_leader(Duration::from_secs(10)).await?;
    let client = MetaClient::new(&[node.local_addr().to_string()])?;

    let mut events = client.watch("/e/", 0);
    // Give the watch a moment to be established before writing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..250 {
        client.put(&format!("/e/{i:03}"), format!("{i}")).await?;
    }
    client.delete("/e/000").await?;
    for i in 0..250 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await?
            .expect("stream open")?;
        assert_eq!(ev.kind, EventKind::Put);
        assert_eq!(ev.kv.key, format!("/e/{i:03}"));
    }
    let ev = events.next().await.expect("stream open")?;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "/e/000"));
    let status = client.node_status(&node.local_addr().to_string()).await?;
    assert!(status.snapshot_index > 0, "{status:?}");
    // An open watch must not hold the node up on its way down.
    tokio::time::timeout(Duration::from_secs(10), node.shutdown())
        .await
        .expect("shutdown with a watch open");
    drop(events);

    // Same directory, new process state: everything is still there.
    let node = MetaNode::start(config(dir.path())).await?;
    node.wait_for_leader(Duration::from_secs(10)).await?;
    let client = MetaClient::new(&[node.local_addr().to_string()])?;
    let keys = client.list_keys("/e/").await?;
    assert_eq!(keys.len(), 249);
    assert_eq!(
        &client.get("/e/249").await?.expect("kept").value[..],
        b"249"
    );
    node.shutdown().await;
    Ok(())
}
