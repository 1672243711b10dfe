//! Bookies and the replicated ledger, with real processes: one `magnetar
//! meta` and three (or four) `magnetar bookie` on loopback ephemeral ports.
//! Bookies and writers are SIGKILLed; nothing acknowledged may be lost.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{entry_payload, LedgerCluster, BIN};
use futures::stream::{FuturesOrdered, StreamExt};
use magnetar_bookies::proto::{self, Code};
use magnetar_bookies::{BookieError, CreateOptions, LedgerReader, LedgerState};

/// Payloads of varying size whose bytes depend on the entry id.
fn payload(entry: u64) -> Bytes {
    entry_payload(entry, 64 + (entry % 200) as usize)
}

/// Adds `range` through `w`, `window` at a time; returns the acked ids.
async fn add_range(
    w: &magnetar_bookies::LedgerWriter,
    range: std::ops::Range<u64>,
    window: usize,
) -> Vec<u64> {
    let mut acked: Vec<u64> = Vec::new();
    let mut inflight = FuturesOrdered::new();
    for i in range {
        if inflight.len() >= window {
            let r: magnetar_bookies::Result<u64> = inflight.next().await.expect("queued");
            acked.push(r.expect("add"));
        }
        inflight.push_back(w.add(payload(i)));
    }
    while let Some(r) = inflight.next().await {
        acked.push(r.expect("add"));
    }
    acked
}

async fn read_all(r: &LedgerReader, last: u64) -> Vec<magnetar_bookies::LedgerEntry> {
    let mut out = Vec::new();
    let mut next = 0;
    while next <= last {
        let hi = (next + 4999).min(last);
        out.extend(r.read(next, hi).await.expect("read"));
        next = hi + 1;
    }
    out
}

/// Sends entry 0 of `ledger` straight to one bookie; its one answer.
async fn raw_add(
    c: &LedgerCluster,
    bookie: u64,
    ledger: u64,
    payload: &'static [u8],
    crc: u32,
) -> proto::AddResponse {
    let req = proto::AddRequest {
        entries: vec![proto::Entry {
            ledger_id: ledger,
            entry_id: 0,
            lac: -1,
            crc,
            payload: Bytes::from_static(payload),
        }],
        recovery: false,
        ledger_id: 0,
        lac: -1,
    };
    c.raw(bookie)
        .add(tokio_stream::once(req))
        .await
        .expect("add stream")
        .into_inner()
        .message()
        .await
        .expect("answer")
        .expect("one message")
}

/// Reads one entry straight from one bookie.
async fn read_direct(c: &LedgerCluster, bookie: u64, ledger: u64, entry: u64) -> (Code, Bytes) {
    let resp = c
        .raw(bookie)
        .read(proto::ReadRequest {
            ledger_id: ledger,
            entry_ids: vec![entry],
        })
        .await
        .expect("read rpc")
        .into_inner();
    let r = resp.results.into_iter().next().expect("one result");
    let code = Code::try_from(r.code).expect("known code");
    (code, r.entry.map(|e| e.payload).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_entries_read_back_identical() {
    let c = LedgerCluster::start(3, &[]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let w = client
        .create(CreateOptions::new(3, 3, 2))
        .await
        .expect("create");
    let n = 100_000u64;
    let acked = add_range(&w, 0..n, 5000).await;
    assert_eq!(
        acked,
        (0..n).collect::<Vec<_>>(),
        "completions in entry order"
    );
    let md = w.close().await.expect("close");
    assert_eq!(md.last_entry, n as i64 - 1);

    // A fresh client, as another process would be.
    let r = c.client().open(w.id()).await.expect("open");
    assert!(r.is_closed());
    let all = read_all(&r, n - 1).await;
    assert_eq!(all.len() as u64, n);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.entry_id, i as u64);
        assert_eq!(e.payload, payload(i as u64), "entry {i} differs");
    }
    // Every bookie holds every entry at Qw = E.
    for b in 1..=3 {
        for e in [0, n / 2, n - 1] {
            let (code, p) = read_direct(&c, b, w.id(), e).await;
            assert_eq!((code, p), (Code::Ok, payload(e)), "bookie {b} entry {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookie_sigkill_mid_stream_is_survived_by_ensemble_change() {
    let mut c = LedgerCluster::start(3, &[]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    // E = Qw = Qa = 2 on three bookies: once one of the ensemble dies, no
    // add can complete without replacing it by the third.
    let w = client
        .create(CreateOptions::new(2, 2, 2))
        .await
        .expect("create");
    let (md, _) = client.metadata(w.id()).await.expect("metadata");
    let victim = md.segments[0].bookies[0];

    let writer = {
        let w = w.clone();
        tokio::spawn(async move { add_range(&w, 0..30_000, 500).await })
    };
    // Kill once a third of the stream is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.last_add_confirmed() < 10_000 {
        assert!(Instant::now() < deadline, "writer stalled before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lac_at_kill = w.last_add_confirmed();
    c.kill_bookie(victim);
    let acked = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer finishes after the kill")
        .expect("writer task");
    assert_eq!(acked, (0..30_000).collect::<Vec<_>>());
    let md = w.close().await.expect("close");
    assert!(
        md.segments.len() >= 2,
        "an ensemble change is recorded: {md:?}"
    );
    let last_seg = md.segments.last().expect("segment");
    assert!(!last_seg.bookies.contains(&victim), "{md:?}");
    assert!(last_seg.first_entry as i64 > lac_at_kill - 1, "{md:?}");

    let r = c.client().open(w.id()).await.expect("open");
    let all = read_all(&r, 29_999).await;
    assert_eq!(all.len(), 30_000);
    for e in &all {
        assert_eq!(e.payload, payload(e.entry_id), "entry {}", e.entry_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_bookie_is_replaced_after_the_add_timeout() {
    let c = LedgerCluster::start(3, &[]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let w = client
        .create(CreateOptions::new(2, 2, 2))
        .await
        .expect("create");
    add_range(&w, 0..1000, 100).await;
    let (md, _) = client.metadata(w.id()).await.expect("metadata");
    let victim = md.segments[0].bookies[1];
    // Stopped, not killed: its connections stay open and say nothing.
    c.signal_bookie(victim, rustix::process::Signal::STOP);
    // HTTP/2 keep-alive notices the silent peer within seconds; a bookie
    // that answers pings but not adds (a stuck disk) hits the add timeout.
    let acked = tokio::time::timeout(Duration::from_secs(40), add_range(&w, 1000..2000, 100))
        .await
        .expect("adds complete once the hung bookie is replaced");
    assert_eq!(acked.len(), 1000);
    let md = w.close().await.expect("close");
    assert!(
        !md.segments
            .last()
            .expect("segment")
            .bookies
            .contains(&victim),
        "{md:?}"
    );
    c.signal_bookie(victim, rustix::process::Signal::CONT);
    let r = c.client().open(w.id()).await.expect("open");
    let all = read_all(&r, 1999).await;
    assert!(all.iter().all(|e| e.payload == payload(e.entry_id)));
}

/// With no spare bookie (one bookie, as in standalone), a bookie that stalls
/// past the add timeout and comes back is sent the unacknowledged adds
/// again, and the ledger goes on instead of waiting for a spare forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_bookie_that_stalls_is_sent_its_adds_again() {
    let c = LedgerCluster::start(1, &[]);
    let client = c.client();
    c.wait_writable(&client, 1).await;
    let w = client
        .create(CreateOptions::new(1, 1, 1))
        .await
        .expect("create");
    add_range(&w, 0..100, 10).await;
    let (md, _) = client.metadata(w.id()).await.expect("metadata");
    let bookie = md.segments[0].bookies[0];
    c.signal_bookie(bookie, rustix::process::Signal::STOP);
    let adds = tokio::spawn(async move {
        let acked = add_range(&w, 100..200, 10).await;
        (acked, w)
    });
    // Past the add timeout, and past the bookie's registration.
    tokio::time::sleep(Duration::from_secs(13)).await;
    c.signal_bookie(bookie, rustix::process::Signal::CONT);
    let (acked, w) = tokio::time::timeout(Duration::from_secs(40), adds)
        .await
        .expect("adds complete once the bookie is back")
        .expect("join");
    assert_eq!(acked, (100..200).collect::<Vec<_>>());
    let md = w.close().await.expect("close");
    assert_eq!(md.segments.len(), 1, "no ensemble change: {md:?}");
    let r = c.client().open(w.id()).await.expect("open");
    let all = read_all(&r, 199).await;
    assert_eq!(all.len(), 200);
    assert!(all.iter().all(|e| e.payload == payload(e.entry_id)));
}

/// Runs `magnetar admin ledgers write` and returns it with a reader of its
/// stdout lines.
fn spawn_writer(
    c: &LedgerCluster,
    args: &[&str],
) -> (common::Proc, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["admin", "ledgers", "write", "--meta", &c.meta_endpoint()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn writer");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (common::Proc::from_child(child), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_sigkill_is_recovered_with_every_acknowledged_entry() {
    let c = LedgerCluster::start(3, &[]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let (mut writer, lines) = spawn_writer(
        &c,
        &[
            "--ensemble",
            "3",
            "--write-quorum",
            "3",
            "--ack-quorum",
            "2",
            "--entries",
            "10000000",
            "--entry-size",
            "512",
            "--max-in-flight",
            "200",
        ],
    );
    let mut ledger = None;
    let mut last_acked: i64 = -1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_acked < 5000 {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("writer output");
        if let Some(id) = line.strip_prefix("ledger ") {
            ledger = Some(id.parse::<u64>().expect("ledger id"));
        } else if let Some(e) = line.strip_prefix("acked ") {
            let e: i64 = e.parse().expect("entry id");
            assert_eq!(e, last_acked + 1, "acks in order");
            last_acked = e;
        }
    }
    writer.kill();
    // Whatever it printed before dying counts as acknowledged too.
    while let Ok(line) = lines.try_recv() {
        if let Some(e) = line.strip_prefix("acked ") {
            last_acked = e.parse().expect("entry id");
        }
    }
    let ledger = ledger.expect("writer named its ledger");
    let (md, _) = client.metadata(ledger).await.expect("metadata");
    assert_eq!(md.state, LedgerState::Open, "the dead writer left it open");

    let r = c.client().open_and_recover(ledger).await.expect("recover");
    assert!(r.is_closed());
    let lac = r.last_add_confirmed();
    assert!(
        lac >= last_acked,
        "recovered up to {lac}, but {last_acked} was acknowledged"
    );
    let all = read_all(&r, lac as u64).await;
    assert_eq!(all.len() as i64, lac + 1);
    for e in &all {
        assert_eq!(
            e.payload,
            entry_payload(e.entry_id, 512),
            "entry {}",
            e.entry_id
        );
    }
    let (md, _) = client.metadata(ledger).await.expect("metadata");
    assert_eq!((md.state, md.last_entry), (LedgerState::Closed, lac));
    // Every bookie of the ensemble refuses further ordinary adds.
    for b in md.all_bookies() {
        let info = c
            .raw(b)
            .read_lac(proto::LedgerRequest { ledger_id: ledger })
            .await
            .expect("read lac")
            .into_inner();
        assert!(info.fenced, "bookie {b} fenced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_old_writer_is_fenced_by_recovery() {
    let c = LedgerCluster::start(3, &[]);
    let old = c.client();
    c.wait_writable(&old, 3).await;
    let w = old
        .create(CreateOptions::new(3, 3, 2))
        .await
        .expect("create");
    add_range(&w, 0..1000, 100).await;

    let new_owner = c.client();
    let r = new_owner.open_and_recover(w.id()).await.expect("recover");
    assert_eq!(r.last_add_confirmed(), 999);

    match w.add(payload(1000)).await {
        Err(BookieError::Fenced(id)) => assert_eq!(id, w.id()),
        other => panic!("old writer's add should be fenced, got {other:?}"),
    }
    assert!(
        w.add(payload(1001)).await.is_err(),
        "it stays unable to add"
    );
    assert!(
        w.close().await.is_err(),
        "nor can it close over the recovery"
    );
    let all = read_all(&r, 999).await;
    assert_eq!(all.len(), 1000);
    let (md, _) = new_owner.metadata(w.id()).await.expect("metadata");
    assert_eq!(md.last_entry, 999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookie_sigkill_and_restart_replays_its_journal() {
    // No periodic flush: acknowledged entries exist only in the journal
    // when the bookie dies.
    let mut c = LedgerCluster::start(3, &["--flush-interval-ms", "3600000"]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    // Qa = E = 3: every acknowledged entry of this ledger was acknowledged
    // by every bookie, the victim included.
    let a = client
        .create(CreateOptions::new(3, 3, 3))
        .await
        .expect("create");
    add_range(&a, 0..8000, 1000).await;
    let victim = 2;

    // The victim dies in the middle of another ledger's write stream, which
    // goes on at Qa = 2.
    let b = client
        .create(CreateOptions::new(3, 3, 2))
        .await
        .expect("create");
    let writer = {
        let b = b.clone();
        tokio::spawn(async move { add_range(&b, 0..20_000, 1000).await })
    };
    while b.last_add_confirmed() < 3000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.kill_bookie(victim);
    assert_eq!(writer.await.expect("writer goes on").len(), 20_000);

    c.start_bookie(victim);
    let log = std::fs::read_to_string(c.bookie_log(victim)).expect("log");
    assert!(log.contains("replayed"), "{log}");
    let resp = c
        .raw(victim)
        .read(proto::ReadRequest {
            ledger_id: a.id(),
            entry_ids: (0..8000).collect(),
        })
        .await
        .expect("read")
        .into_inner();
    let mut missing = BTreeSet::new();
    for r in resp.results {
        match r.entry {
            Some(e) if r.code == Code::Ok as i32 && e.payload == payload(r.entry_id) => {}
            _ => {
                missing.insert(r.entry_id);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "lost after restart: {} entries, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    // And the ledger it was in the middle of reads back whole.
    let md = b.close().await.expect("close");
    let r = c.client().open(b.id()).await.expect("open");
    let all = read_all(&r, md.last_entry as u64).await;
    assert_eq!(all.len(), 20_000);
    assert!(all.iter().all(|e| e.payload == payload(e.entry_id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_bookie_is_re_replicated_after_the_grace_period() {
    let mut c = LedgerCluster::start(
        3,
        &[
            "--rereplication-grace-ms",
            "2000",
            "--audit-interval-ms",
            "300",
        ],
    );
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let mut ledgers = Vec::new();
    for _ in 0..4 {
        let w = client
            .create(CreateOptions::new(2, 2, 2))
            .await
            .expect("create");
        add_range(&w, 0..2000, 200).await;
        w.close().await.expect("close");
        ledgers.push(w.id());
    }
    // The bookie that holds the most of them dies for good.
    let mut count = [0usize; 4];
    for &l in &ledgers {
        for b in client.metadata(l).await.expect("md").0.all_bookies() {
            count[b as usize] += 1;
        }
    }
    let victim = (1..=3u64)
        .max_by_key(|&b| count[b as usize])
        .expect("a bookie");
    c.kill_bookie(victim);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut pending = 0;
        for &l in &ledgers {
            if client
                .metadata(l)
                .await
                .expect("md")
                .0
                .all_bookies()
                .contains(&victim)
            {
                pending += 1;
            }
        }
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} ledgers still name bookie {victim}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every entry now has Qw copies on live bookies, each checked directly.
    for &l in &ledgers {
        let (md, _) = client.metadata(l).await.expect("md");
        for e in 0..2000u64 {
            let seg = md.segment_for(e);
            for &i in &md.write_set(e) {
                let b = seg.bookies[i];
                assert_ne!(b, victim);
                let (code, p) = read_direct(&c, b, l, e).await;
                assert_eq!(
                    (code, p),
                    (Code::Ok, payload(e)),
                    "ledger {l} entry {e} on bookie {b}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_caught_and_bad_requests_get_codes() {
    let mut c = LedgerCluster::start(3, &["--flush-interval-ms", "100"]);
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let w = client
        .create(CreateOptions::new(3, 3, 3))
        .await
        .expect("create");
    let marked = |e: u64| Bytes::from(format!("corruption-test-entry-{e:05}-{}", "z".repeat(40)));
    for e in 0..200 {
        w.add(marked(e)).await.expect("add");
    }
    w.close().await.expect("close");
    let (md, _) = client.metadata(w.id()).await.expect("md");
    // Entry 7 is read first from this bookie; give it a bad copy.
    let target = 7u64;
    let victim = md.segments[0].bookies[md.write_set(target)[0]];
    tokio::time::sleep(Duration::from_millis(1500)).await; // flushed to entry logs
    c.kill_bookie(victim);
    let needle = marked(target);
    let mut flipped = 0;
    let logs_dir = c.bookie_dir(victim).join("entrylogs");
    for f in std::fs::read_dir(&logs_dir).expect("entry logs") {
        let path = f.expect("entry").path();
        let mut data = std::fs::read(&path).expect("read log");
        if let Some(pos) = data.windows(needle.len()).position(|w| w == &needle[..]) {
            data[pos + 30] ^= 0x20;
            std::fs::write(&path, &data).expect("write log");
            flipped += 1;
        }
    }
    assert_eq!(
        flipped, 1,
        "entry {target} found once in bookie {victim}'s entry logs"
    );
    c.start_bookie(victim);

    let (code, _) = read_direct(&c, victim, w.id(), target).await;
    assert_eq!(code, Code::Corrupt, "the bookie's CRC check catches it");
    let r = c.client().open(w.id()).await.expect("open");
    let got = r
        .read(0, 199)
        .await
        .expect("read falls over to another replica");
    assert_eq!(got[target as usize].payload, marked(target));
    assert!(got.iter().all(|e| e.payload == marked(e.entry_id)));

    // Bad requests get codes, and the bookie stays up.
    let mut raw = c.raw(victim);
    let too_many = raw
        .read(proto::ReadRequest {
            ledger_id: w.id(),
            entry_ids: (0..20_000).collect(),
        })
        .await
        .expect_err("oversized read");
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    let (code, _) = read_direct(&c, victim, 999_999, 0).await;
    assert_eq!(code, Code::NoLedger);
    let (code, _) = read_direct(&c, victim, w.id(), 5000).await;
    assert_eq!(code, Code::NoEntry);
    let resp = raw_add(&c, victim, 424_242, b"payload", 1).await;
    assert_eq!(resp.results[0].code, Code::BadRequest as i32, "{resp:?}");
    assert!(
        raw.info(proto::InfoRequest {}).await.is_ok(),
        "bookie still serves"
    );

    // A bookie past its disk-usage threshold is read-only: it refuses adds
    // and is not chosen for new ledgers.
    c.add_bookie(
        4,
        &[
            "--disk-usage-threshold",
            "0",
            "--disk-check-interval-ms",
            "100",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let avail = client.pool().available().await.expect("available");
        if avail.iter().any(|b| b.id == 4 && b.read_only) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bookie 4 never reported read-only"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let crc = magnetar_bookies::meta::entry_crc(424_243, 0, b"x");
    let resp = raw_add(&c, 4, 424_243, b"x", crc).await;
    assert_eq!(resp.results[0].code, Code::ReadOnly as i32);
    match client.create(CreateOptions::new(4, 4, 4)).await {
        Err(BookieError::NotEnoughBookies {
            needed: 4,
            available: 3,
        }) => {}
        other => panic!("expected NotEnoughBookies, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ledgers_are_reclaimed_on_every_bookie() {
    let mut c = LedgerCluster::start(
        3,
        &[
            "--flush-interval-ms",
            "100",
            "--gc-interval-ms",
            "300",
            "--entry-log-mb",
            "1",
        ],
    );
    let client = c.client();
    c.wait_writable(&client, 3).await;
    let big = |e: u64| entry_payload(e, 4096);
    let w = client
        .create(CreateOptions::new(3, 3, 3))
        .await
        .expect("create");
    let mut f = FuturesOrdered::new();
    for e in 0..2000 {
        f.push_back(w.add(big(e)));
    }
    while let Some(r) = f.next().await {
        r.expect("add");
    }
    w.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before: u64 = info_sum(&c, |i| i.entry_log_bytes).await;
    assert!(
        before > 3 * 2000 * 4096,
        "entry logs hold the ledger: {before}"
    );
    // Bookie 3 is down when the ledger is deleted; its own garbage
    // collection finds the metadata gone once it is back.
    c.kill_bookie(3);
    client.delete(w.id()).await.expect("delete");
    c.start_bookie(3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = info_sum(&c, |i| i.entry_log_bytes).await;
        if now * 4 < before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "space not reclaimed: {now} of {before}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(info_sum(&c, |i| i.compacted_logs).await > 0);
}

async fn info_sum(c: &LedgerCluster, f: impl Fn(&proto::InfoResponse) -> u64) -> u64 {
    let mut sum = 0;
    for b in 1..=3 {
        let i = c
            .raw(b)
            .info(proto::InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        sum += f(&i);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_ledger_prints_its_line() {
    let c = LedgerCluster::start(3, &[]);
    c.wait_writable(&c.client(), 3).await;
    for q in [["1", "1", "1"], ["3", "3", "2"]] {
        let out = Command::new(common::perf_bin())
            .args(["ledger", "--meta", &c.meta_endpoint()])
            .args([
                "--ensemble",
                q[0],
                "--write-quorum",
                q[1],
                "--ack-quorum",
                q[2],
            ])
            .args(["--entries", "5000", "--entry-size", "1024"])
            .output()
            .expect("run perf");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().expect("a line");
        for key in [
            "entries_per_s=",
            "mb_per_s=",
            "p50_ms=",
            "p99_ms=",
            "p999_ms=",
            "errors=0",
        ] {
            assert!(last.contains(key), "{key} missing in {last:?}");
        }
        assert!(
            stdout.contains("phase=read") && stdout.contains("entries=5000"),
            "{stdout}"
        );
    }
}
