//! One metadata node and several bookies in this process: the ledger
//! client's whole life cycle, quickly. The process-level fault tests are in
//! the `magnetar` crate.

use bytes::Bytes;
use magnetar_bookies::{BookieError, CreateOptions, LedgerState};
use magnetar_testkit::inproc::Cluster;

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i:06}-{}", "x".repeat((i % 50) as usize)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_close_recover_delete() {
    let c = Cluster::start(3).await;
    let client = c.ledger_client();
    c.wait_writable(&client, 3).await;

    let w = client
        .create(CreateOptions::new(3, 3, 2))
        .await
        .expect("create");
    let futs: Vec<_> = (0..2000).map(|i| w.add(payload(i))).collect();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(f.await.expect("add"), i as u64);
    }
    assert_eq!(w.last_add_confirmed(), 1999);

    // A reader of the open ledger sees up to the LAC the bookies know.
    let r = client.open(w.id()).await.expect("open");
    assert!(
        r.last_add_confirmed() >= 1990,
        "lac {}",
        r.last_add_confirmed()
    );
    let got = r.read(0, 99).await.expect("read");
    assert_eq!(got.len(), 100);
    assert!(got.iter().all(|e| e.payload == payload(e.entry_id)));
    assert!(matches!(
        r.read(0, 5000).await,
        Err(BookieError::PastLac { .. })
    ));

    let md = w.close().await.expect("close");
    assert_eq!(md.state, LedgerState::Closed);
    assert_eq!(md.last_entry, 1999);
    assert!(matches!(
        w.add(payload(0)).await,
        Err(BookieError::LedgerClosed(_))
    ));

    let r = client
        .open_and_recover(w.id())
        .await
        .expect("recover closed");
    assert_eq!(r.last_add_confirmed(), 1999);
    let all = r.read(0, 1999).await.expect("read all");
    assert_eq!(all.len(), 2000);
    for e in &all {
        assert_eq!(e.payload, payload(e.entry_id));
    }

    client.delete(w.id()).await.expect("delete");
    assert!(matches!(
        client.open(w.id()).await,
        Err(BookieError::NoLedger(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fences_a_live_writer() {
    let c = Cluster::start(3).await;
    let client = c.ledger_client();
    c.wait_writable(&client, 3).await;
    let w = client
        .create(CreateOptions::new(3, 2, 2))
        .await
        .expect("create");
    for i in 0..100 {
        w.add(payload(i)).await.expect("add");
    }
    let other = c.ledger_client();
    let r = other.open_and_recover(w.id()).await.expect("recover");
    assert_eq!(r.last_add_confirmed(), 99);
    assert!(r.is_closed());
    match w.add(payload(100)).await {
        Err(BookieError::Fenced(id)) => assert_eq!(id, w.id()),
        other => panic!("expected a fenced error, got {other:?}"),
    }
    assert!(w.close().await.is_err());
    let all = r.read(0, 99).await.expect("read");
    assert_eq!(all.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensemble_change_replaces_a_stopped_bookie() {
    let mut c = Cluster::start(4).await;
    let client = c.ledger_client();
    c.wait_writable(&client, 4).await;
    let w = client
        .create(CreateOptions::new(3, 3, 3))
        .await
        .expect("create");
    for i in 0..200 {
        w.add(payload(i)).await.expect("add");
    }
    let (md, _) = client.metadata(w.id()).await.expect("md");
    let victim = md.segments[0].bookies[1];
    let b = c.bookies[(victim - 1) as usize].take().expect("running");
    b.shutdown().await;
    let futs: Vec<_> = (200..600).map(|i| w.add(payload(i))).collect();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(f.await.expect("add after a bookie stopped"), 200 + i as u64);
    }
    let md = w.close().await.expect("close");
    assert_eq!(md.segments.len(), 2, "{md:?}");
    assert!(!md.segments[1].bookies.contains(&victim));
    let r = client.open(w.id()).await.expect("open");
    let all = r.read(0, 599).await.expect("read");
    assert!(all.iter().all(|e| e.payload == payload(e.entry_id)));
    assert_eq!(all.len(), 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_failure_turns_a_bookie_read_only_and_loses_nothing_acknowledged() {
    let mut c = Cluster::start(4).await;
    let client = c.ledger_client();
    c.wait_writable(&client, 4).await;
    let w = client
        .create(CreateOptions::new(3, 3, 3))
        .await
        .expect("create");
    for i in 0..200 {
        w.add(payload(i)).await.expect("add");
    }
    let (md, _) = client.metadata(w.id()).await.expect("md");
    let victim = md.segments[0].bookies[1];
    let victim_dir = c.dir.join(format!("bookie-{victim}"));
    // The victim's journal fsyncs fail from now on, mid-stream.
    fail::cfg(
        "bookie::journal::sync",
        &format!("return({})", victim_dir.display()),
    )
    .expect("fail point");
    let futs: Vec<_> = (200..600).map(|i| w.add(payload(i))).collect();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(
            f.await.expect("add while a bookie's fsync fails"),
            200 + i as u64
        );
    }
    fail::remove("bookie::journal::sync");
    let b = c.bookies[(victim - 1) as usize].as_ref().expect("running");
    assert!(b.storage().io_failed(), "the victim turned read-only");
    assert!(b.storage().is_read_only());
    // The writer moved to another bookie.
    let md = w.close().await.expect("close");
    assert!(md.segments.len() >= 2, "{md:?}");
    assert!(!md
        .segments
        .last()
        .expect("segment")
        .bookies
        .contains(&victim));
    let r = client.open(w.id()).await.expect("open");
    let all = r.read(0, 599).await.expect("read");
    assert_eq!(all.len(), 600);
    assert!(all.iter().all(|e| e.payload == payload(e.entry_id)));
    // After a restart the victim replays its journal: everything it
    // acknowledged is there, and it takes writes again.
    let b = c.bookies[(victim - 1) as usize].take().expect("running");
    b.shutdown().await;
    let b = c.start_bookie(victim).await;
    assert!(!b.storage().is_read_only());
    for e in 0..200 {
        let got = b
            .storage()
            .read(w.id(), e)
            .expect("acknowledged before the fault");
        assert_eq!(got.payload, payload(e));
    }
    c.bookies[(victim - 1) as usize] = Some(b);
}
