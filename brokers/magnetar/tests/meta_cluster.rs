//! Three real `magnetar meta` processes on loopback: operations, failover,
//! sessions, restarts, snapshots and bad input.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{spawn_until, MetaCluster, BIN};
use futures::StreamExt;
use magnetar_metadata::proto::raft_client::RaftClient;
use magnetar_metadata::proto::RaftRequest;
use magnetar_metadata::{EventKind, MetaError, PutOptions, MAX_VALUE_BYTES};

type TestResult = anyhow::Result<()>;

async fn next_event(
    events: &mut (impl futures::Stream<Item = magnetar_metadata::Result<magnetar_metadata::Event>>
              + Unpin),
) -> magnetar_metadata::Event {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch stream open")
        .expect("watch event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_three_nodes() -> TestResult {
    let c = MetaCluster::start(3, &[]);
    let client = c.client();

    // put / get
    let a = client.put("/ops/a", "1").await?;
    assert_eq!(a.version, a.create_revision);
    let got = client.get("/ops/a").await?.expect("written key");
    assert_eq!(&got.value[..], b"1");
    assert_eq!(got.version, a.version);
    assert!(client.get("/ops/missing").await?.is_none());

    // create-if-absent, and its conflict
    let b = client.create("/ops/b", "first").await?;
    match client.create("/ops/b", "second").await {
        Err(MetaError::Conflict {
            current: Some(cur), ..
        }) => {
            assert_eq!(&cur.value[..], b"first");
            assert_eq!(cur.version, b.version);
        }
        other => panic!("create over an existing key must conflict, got {other:?}"),
    }

    // compare-and-set on a version
    let err = client
        .compare_and_put("/ops/b", b.version + 100, "x")
        .await
        .expect_err("stale version");
    assert!(matches!(err, MetaError::Conflict { .. }), "{err}");
    let b2 = client.compare_and_put("/ops/b", b.version, "third").await?;
    assert!(b2.version > b.version);
    assert_eq!(b2.create_revision, b.create_revision);
    assert!(client
        .compare_and_put("/ops/b", b.version, "again")
        .await
        .is_err());

    // delete with a version
    let err = client
        .compare_and_delete("/ops/b", b.version)
        .await
        .expect_err("stale version");
    assert!(matches!(err, MetaError::Conflict { .. }), "{err}");
    assert!(client.get("/ops/b").await?.is_some());
    let deleted = client.compare_and_delete("/ops/b", b2.version).await?;
    assert_eq!(deleted.map(|kv| kv.version), Some(b2.version));
    assert!(client.get("/ops/b").await?.is_none());
    assert!(client.delete("/ops/never").await?.is_none());

    // list by prefix, in key order, excluding neighbours of the prefix
    for k in [
        "/ops/list/3",
        "/ops/list/1",
        "/ops/list/2",
        "/ops/listx",
        "/ops/lis",
    ] {
        client.put(k, k.to_string()).await?;
    }
    let keys = client.list_keys("/ops/list/").await?;
    assert_eq!(keys, ["/ops/list/1", "/ops/list/2", "/ops/list/3"]);
    let kvs = client.list("/ops/list/").await?;
    assert_eq!(&kvs[1].value[..], b"/ops/list/2");

    // a watch sees puts and deletes in order, and only under its prefix
    let base = client.put("/ops/mark", "m").await?.version;
    let mut events = client.watch("/ops/w/", base + 1);
    let p1 = client.put("/ops/w/1", "one").await?;
    client.put("/ops/other", "not watched").await?;
    let p2 = client.put("/ops/w/2", "two").await?;
    client.delete("/ops/w/1").await?.expect("existed");
    let p3 = client.put("/ops/w/2", "two again").await?;
    let want = [
        (EventKind::Put, "/ops/w/1", p1.version),
        (EventKind::Put, "/ops/w/2", p2.version),
        (EventKind::Delete, "/ops/w/1", 0), // revision checked by order below
        (EventKind::Put, "/ops/w/2", p3.version),
    ];
    let mut seen = Vec::new();
    for _ in 0..want.len() {
        let ev = next_event(&mut events).await;
        seen.push((ev.kind, ev.kv.key.clone(), ev.revision));
    }
    assert_eq!(seen[0], (want[0].0, want[0].1.to_string(), want[0].2));
    assert_eq!(seen[1], (want[1].0, want[1].1.to_string(), want[1].2));
    assert_eq!(
        (seen[2].0, seen[2].1.as_str()),
        (EventKind::Delete, "/ops/w/1")
    );
    assert!(seen[1].2 < seen[2].2 && seen[2].2 < seen[3].2);
    assert_eq!(seen[3], (want[3].0, want[3].1.to_string(), want[3].2));

    // a watch resumed from a past revision replays the same history
    let mut replay = client.watch("/ops/w/", base + 1);
    for expected in &seen {
        let ev = next_event(&mut replay).await;
        assert_eq!(&(ev.kind, ev.kv.key.clone(), ev.revision), expected);
    }

    // sessions: an ephemeral key goes with its session
    let session = client.grant_session(Duration::from_secs(5)).await?;
    let eph = session.put("/ops/eph", "alive").await?;
    assert_eq!(eph.session, session.id());
    assert!(client.get("/ops/eph").await?.is_some());
    assert!(session.revoke().await?);
    assert!(client.get("/ops/eph").await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_fails_over_without_losing_writes() -> TestResult {
    let mut c = MetaCluster::start(3, &[]);
    let client = c.client();
    for i in 0..50 {
        client.put(&format!("/fo/before/{i:04}"), "v").await?;
    }
    let leader = c.leader(&client).await;

    // A writer keeps going through the failover; it records what was acked.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("/fo/during/{i:06}");
                if client.put(&key, "v").await.is_ok() {
                    acked.lock().expect("lock").push(key);
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    c.kill(leader);
    let killed_at = Instant::now();
    client.put("/fo/after-kill", "v").await?;
    let recovered = killed_at.elapsed();
    println!("writes succeeded again {recovered:?} after SIGKILL of leader {leader}");
    assert!(
        recovered < Duration::from_secs(5),
        "writes resumed only after {recovered:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await?;

    let stored: BTreeSet<String> = client.list_keys("/fo/").await?.into_iter().collect();
    let acked = acked.lock().expect("lock").clone();
    assert!(!acked.is_empty());
    for key in acked.iter() {
        assert!(stored.contains(key), "acknowledged write {key} was lost");
    }
    for i in 0..50 {
        assert!(stored.contains(&format!("/fo/before/{i:04}")));
    }
    assert!(stored.contains("/fo/after-kill"));

    // The killed node comes back and catches up with the group.
    c.start_node(leader);
    let target = client.put("/fo/final", "v").await?.version;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = client.node_status(&c.addrs[&leader]).await;
        if let Ok(s) = &s {
            if s.revision >= target {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted node {leader} did not catch up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_keys_of_a_killed_client_expire() -> TestResult {
    let c = MetaCluster::start(3, &[]);
    let client = c.client();
    let ttl = Duration::from_millis(2000);

    // Another process holds an ephemeral key, then dies without a word.
    let mut holder = Command::new(BIN);
    holder
        .args(["admin", "metadata", "--meta", &c.endpoints().join(",")])
        .args(["put", "/eph/dead", "gone-soon", "--session-ttl-ms", "2000"]);
    let mut holder = spawn_until(
        holder,
        "holding session",
        &c.dir.path().join("holder.log"),
        Duration::from_secs(30),
    );
    // A live client holds one too.
    let session = client.grant_session(ttl).await?;
    session.put("/eph/live", "stays").await?;
    let dead = client.get("/eph/dead").await?.expect("holder's key");
    assert_ne!(dead.session, 0);

    // Well past the TTL, the holder's key is still there: keep-alives work.
    tokio::time::sleep(ttl * 2).await;
    assert!(client.get("/eph/dead").await?.is_some());

    holder.kill();
    let killed_at = Instant::now();
    while client.get("/eph/dead").await?.is_some() {
        assert!(
            killed_at.elapsed() < ttl + Duration::from_secs(5),
            "the dead client's key outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "dead client's key vanished {:?} after SIGKILL",
        killed_at.elapsed()
    );
    assert!(killed_at.elapsed() >= ttl / 2, "expired too early");

    // The live client's key outlasts several more TTLs.
    tokio::time::sleep(ttl * 2).await;
    assert!(session.is_alive());
    assert_eq!(
        &client.get("/eph/live").await?.expect("live key").value[..],
        b"stays"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_everything() -> TestResult {
    let mut c = MetaCluster::start(3, &[]);
    let client = c.client();
    for i in 0..300 {
        client
            .put(&format!("/rs/{i:04}"), format!("value-{i}"))
            .await?;
    }
    client.delete("/rs/0007").await?;
    let before = client.put("/rs/last", "x").await?.version;

    c.kill_all();
    for id in 1..=3 {
        c.start_node(id);
    }
    let kvs = client.list("/rs/").await?;
    assert_eq!(kvs.len(), 300);
    for kv in &kvs {
        if kv.key == "/rs/last" {
            continue;
        }
        let i: u32 = kv.key.trim_start_matches("/rs/").parse()?;
        assert_ne!(i, 7);
        assert_eq!(kv.value, format!("value-{i}").as_bytes());
    }
    // Revisions go on from where they were.
    assert!(client.put("/rs/new", "y").await?.version > before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log_and_catch_up_a_lagging_node() -> TestResult {
    let snapshot_every = 200u64;
    let keep = 50u64;
    let mut c = MetaCluster::start(
        3,
        &[
            "--snapshot-every",
            &snapshot_every.to_string(),
            "--keep-logs",
            &keep.to_string(),
        ],
    );
    let client = c.client();
    let leader = c.leader(&client).await;
    let lagging = (1..=3).find(|&id| id != leader).expect("a follower");
    c.kill(lagging);

    let writes = 3000u64;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < writes {
                client
                    .put(&format!("/snap/{i:06}"), vec![b'x'; 512])
                    .await?;
                i += 16;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }

    // Bound: entries since the last snapshot, those kept behind it, and a
    // purge batch in progress.
    let bound = snapshot_every + keep + 64 + 10;
    let check = |s: &magnetar_metadata::proto::StatusResponse| {
        assert!(
            s.snapshot_index > 0,
            "node {} took no snapshot: {s:?}",
            s.id
        );
        assert!(
            s.log_entries <= bound,
            "node {} keeps {} log entries after {writes} writes (bound {bound})",
            s.id,
            s.log_entries
        );
    };
    // Purging follows snapshotting asynchronously; give it a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in c.running() {
        let s = client.node_status(&c.addrs[&id]).await?;
        println!(
            "node {id}: log_entries={} snapshot_index={} last_log_index={}",
            s.log_entries, s.snapshot_index, s.last_log_index
        );
        check(&s);
    }

    // The lagging node's missing entries are purged everywhere: it can only
    // catch up by receiving a snapshot.
    c.start_node(lagging);
    let target = client.put("/snap/final", "v").await?.version;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = client.node_status(&c.addrs[&lagging]).await {
            if s.revision >= target {
                assert!(s.keys > writes);
                break;
            }
        }
        assert!(Instant::now() < deadline, "lagging node did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(client.list_keys("/snap/").await?.len() as u64, writes + 1);
    Ok(())
}

#[derive(Clone, PartialEq, prost::Message)]
struct NotAPutRequest {
    // Field 1 of PutRequest is a string; these bytes are not UTF-8.
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() -> TestResult {
    let mut c = MetaCluster::start(3, &[]);
    let client = c.client();

    let err = client.put("", "x").await.expect_err("empty key");
    assert!(
        matches!(&err, MetaError::InvalidArgument(m) if m.contains("empty")),
        "{err}"
    );

    let err = client
        .put("/big", vec![0u8; MAX_VALUE_BYTES + 1])
        .await
        .expect_err("oversized value");
    assert!(
        matches!(&err, MetaError::InvalidArgument(m) if m.contains("limit")),
        "{err}"
    );
    // Exactly at the limit is fine.
    client.put("/big", vec![0u8; MAX_VALUE_BYTES]).await?;

    let err = client
        .put(&"k".repeat(5000), "x")
        .await
        .expect_err("long key");
    assert!(matches!(err, MetaError::InvalidArgument(_)), "{err}");

    let err = client
        .grant_session(Duration::from_millis(10))
        .await
        .expect_err("tiny TTL");
    assert!(matches!(err, MetaError::InvalidArgument(_)), "{err}");

    let err = client
        .put_with(
            "/orphan",
            "x",
            PutOptions {
                expected_version: None,
                session: 424242,
            },
        )
        .await
        .expect_err("unknown session");
    assert!(matches!(err, MetaError::SessionNotFound(424242)), "{err}");

    // A request that is not a valid PutRequest at all.
    let leader = c.leader(&client).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addrs[&leader]))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let status = grpc
        .unary::<_, magnetar_metadata::proto::PutResponse, _>(
            tonic::Request::new(NotAPutRequest {
                key: vec![0xff, 0xfe, 0xfd],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/magnetar.metadata.v1.Metadata/Put",
            ),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("malformed request");
    println!("malformed request: {status:?}");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert!(status.message().contains("decode"), "{status:?}");

    // A raft message from a node outside the group.
    let mut raft = RaftClient::new(channel);
    let status = raft
        .append_entries(RaftRequest {
            from: 99,
            payload: vec![1, 2, 3].into(),
        })
        .await
        .expect_err("unknown peer");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("unknown peer 99"), "{status:?}");
    // From a member, but not a raft message.
    let status = raft
        .vote(RaftRequest {
            from: 1,
            payload: vec![0xff; 7].into(),
        })
        .await
        .expect_err("garbage payload");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Nobody crashed, and the group still works.
    assert!(c.all_running(), "a node died on bad input:\n{}", c.logs());
    client.put("/still/works", "yes").await?;
    assert!(client.get("/still/works").await?.is_some());

    // Bad command lines fail cleanly with a message.
    for (peers, expect) in [
        ("2=127.0.0.1:1", "own id"),
        ("1=nonsense", "HOST:PORT"),
        ("x=127.0.0.1:1", "not a number"),
        ("1=127.0.0.1:1,1=127.0.0.1:2", "twice"),
    ] {
        let out = Command::new(BIN)
            .args([
                "meta",
                "--id",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--peers",
                peers,
            ])
            .arg("--data-dir")
            .arg(c.dir.path().join("bad"))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--peers {peers} was accepted");
        assert!(stderr.contains(expect), "--peers {peers}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    c.kill_all();
    Ok(())
}

/// `magnetar admin metadata …` against a running group, as an operator
/// would type it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_round_trip() -> TestResult {
    let c = MetaCluster::start(3, &[]);
    let meta = c.endpoints().join(",");
    let admin = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(BIN)
            .args(["admin", "metadata", "--meta", &meta])
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    // A watcher process, started first, sees what the others do.
    let first = c.client().put("/cli/mark", "m").await?.version;
    let watcher = Command::new(BIN)
        .args(["admin", "metadata", "--meta", &meta, "watch", "/cli/a"])
        .args(["--from-revision", &(first + 1).to_string(), "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;

    let (ok, out, _) = admin(&["put", "/cli/a", "one"])?;
    assert!(ok && out.starts_with("OK version="), "{out}");
    let version: u64 = out.trim().trim_start_matches("OK version=").parse()?;
    let (ok, out, _) = admin(&["get", "/cli/a"])?;
    assert!(ok);
    assert_eq!(out, "one\n");
    let (ok, out, _) = admin(&["get", "-v", "/cli/a"])?;
    assert!(ok && out.contains(&format!("version={version}")), "{out}");

    // CAS through the CLI: a stale version is refused with a message.
    let (ok, _, err) = admin(&["put", "/cli/a", "two", "--expect-version", "1"])?;
    assert!(!ok && err.contains("version conflict"), "{err}");
    let (ok, _, _) = admin(&[
        "put",
        "/cli/a",
        "two",
        "--expect-version",
        &version.to_string(),
    ])?;
    assert!(ok);
    let (ok, _, err) = admin(&["put", "/cli/a", "x", "--expect-version", "0"])?;
    assert!(!ok && err.contains("version conflict"), "{err}");

    admin(&["put", "/cli/b", "bee"])?;
    let (ok, out, _) = admin(&["list", "/cli/"])?;
    assert!(ok);
    assert_eq!(out, "/cli/a\ttwo\n/cli/b\tbee\n/cli/mark\tm\n");
    let (_, out, _) = admin(&["list", "/cli/", "--keys-only"])?;
    assert_eq!(out, "/cli/a\n/cli/b\n/cli/mark\n");

    let (ok, out, _) = admin(&["delete", "/cli/a"])?;
    assert!(ok && out.starts_with("deleted /cli/a"), "{out}");
    let (ok, _, err) = admin(&["get", "/cli/a"])?;
    assert!(!ok && err.contains("not found"), "{err}");

    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output()).await??;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once(' ').map(|x| x.1).unwrap_or(l).to_string())
        .collect();
    assert_eq!(
        lines,
        ["PUT /cli/a\tone", "PUT /cli/a\ttwo", "DELETE /cli/a"]
    );

    // Under load a node may still be settling into the group (a candidate
    // whose vote is in flight); what is checked here is the report.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, _) = admin(&["status"])?;
        assert!(ok);
        let settled =
            out.matches("state=Leader").count() == 1 && out.matches("state=Follower").count() == 2;
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
