//! Managed ledgers against a real metadata node and bookie.

mod common;
use common::Cluster;

use std::time::Duration;

use bytes::Bytes;
use magnetar_broker::format::{decode_entry, encode_messages, Message};
use magnetar_broker::managed_ledger::{ManagedLedger, ManagedLedgerConfig};
use magnetar_broker::BrokerError;

fn batch(i: u64, n: usize) -> Bytes {
    let msgs: Vec<Message> = (0..n).map(|j| Message::new(format!("m{i}-{j}"))).collect();
    encode_messages(&msgs).expect("encode")
}

fn small_ledgers() -> ManagedLedgerConfig {
    ManagedLedgerConfig {
        max_entries_per_ledger: 50,
        cache_bytes: 4096,
        ..ManagedLedgerConfig::default()
    }
}

/// Reads every message from `from` to the end, in order.
async fn read_all(ml: &ManagedLedger, from: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let entries = ml.read(at, 17, 1 << 20).await.expect("read");
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            for m in decode_entry(&e.data).expect("decode") {
                if m.offset >= at {
                    let v = m.message.value.expect("value");
                    out.push((m.offset, String::from_utf8(v.to_vec()).expect("utf8")));
                }
            }
            at = e.end_offset();
        }
    }
}

#[tokio::test]
async fn offsets_rollover_reads_and_reopen() {
    let c = Cluster::start(1).await;
    let ml = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/a", small_ledgers())
        .await
        .expect("open");
    // Pipelined appends of batches of 1..=3 messages complete in order with
    // contiguous offsets.
    let futs: Vec<_> = (0..200u64)
        .map(|i| ml.append(batch(i, 1 + (i % 3) as usize)))
        .collect();
    let mut expect = 0;
    for (i, f) in futs.into_iter().enumerate() {
        let base = f.await.expect("append");
        assert_eq!(base, expect, "append {i}");
        expect += 1 + (i as u64 % 3);
    }
    assert_eq!(ml.end_offset(), expect);
    assert!(ml.ledgers().len() >= 4, "rolled over: {:?}", ml.ledgers());
    let all = read_all(&ml, 0).await;
    assert_eq!(all.len() as u64, expect);
    assert!(all.iter().enumerate().all(|(i, (o, _))| *o == i as u64));
    // A read from the middle of a batch starts with that batch.
    let mid = ml.read(4, 1, 1 << 20).await.expect("read");
    assert!(mid[0].base_offset <= 4 && mid[0].end_offset() > 4);
    ml.close().await.expect("close");

    // Reopening finds everything, searches old ledgers without an index,
    // and continues the offsets.
    let ml = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/a", small_ledgers())
        .await
        .expect("reopen");
    assert_eq!(ml.end_offset(), expect);
    assert_eq!(read_all(&ml, 0).await, all);
    assert_eq!(read_all(&ml, 123).await, all[123..].to_vec());
    let base = ml.append(batch(999, 1)).await.expect("append");
    assert_eq!(base, expect);
}

#[tokio::test]
async fn takeover_fences_the_old_owner_and_keeps_every_acknowledged_entry() {
    let c = Cluster::start(1).await;
    let cfg = ManagedLedgerConfig::default();
    let old = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/b", cfg.clone())
        .await
        .expect("open");
    for i in 0..100 {
        old.append(batch(i, 1)).await.expect("append");
    }
    // A new owner opens while the old one is alive and never closed.
    let new = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/b", cfg)
        .await
        .expect("takeover");
    assert_eq!(new.end_offset(), 100);
    match old.append(batch(100, 1)).await {
        Err(BrokerError::NotOwner { .. }) | Err(BrokerError::TopicUnavailable(_)) => {}
        other => panic!("old owner could still append: {other:?}"),
    }
    assert_eq!(new.append(batch(100, 1)).await.expect("append"), 100);
    let all = read_all(&new, 0).await;
    assert_eq!(all.len(), 101);
    assert_eq!(all[99].1, "m99-0");
    assert_eq!(all[100].1, "m100-0");
}

#[tokio::test]
async fn trim_deletes_whole_ledgers_on_the_bookies() {
    let c = Cluster::start(1).await;
    let ml = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/c", small_ledgers())
        .await
        .expect("open");
    for i in 0..180 {
        ml.append(batch(i, 1)).await.expect("append");
    }
    let before = ml.ledgers();
    let deleted = ml.trim(120).await.expect("trim");
    // Ledgers [0,50) and [50,100) end before 120; [100,150) does not.
    assert_eq!(deleted, vec![before[0].id, before[1].id]);
    assert_eq!(ml.start_offset(), 100);
    let client = c.ledger_client();
    for id in &deleted {
        assert!(
            client.metadata(*id).await.is_err(),
            "ledger {id} metadata kept"
        );
    }
    // The bookie forgets them too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let storage = c.bookie(1).storage();
    for id in &deleted {
        assert!(
            storage.read(*id, 0).is_err(),
            "bookie still serves ledger {id}"
        );
    }
    // Reads below the start begin at the start.
    let e = ml.read(0, 1, 1 << 20).await.expect("read");
    assert_eq!(e[0].base_offset, 100);

    // A start inside a ledger (Kafka's DeleteRecords) is kept across a
    // reopen, and a start past the end is refused.
    assert_eq!(ml.delete_before(130).await.expect("delete before"), 130);
    assert_eq!(
        ml.read(0, 1, 1 << 20).await.expect("read")[0].base_offset,
        130
    );
    assert!(matches!(
        ml.delete_before(500).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    ml.close().await.expect("close");
    let ml = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/c", small_ledgers())
        .await
        .expect("reopen");
    assert_eq!(ml.start_offset(), 130);
    assert_eq!(read_all(&ml, 0).await.first().map(|m| m.0), Some(130));
    ml.delete().await.expect("delete");
    assert!(client.metadata(before[3].id).await.is_err());
}

#[tokio::test]
async fn producer_sequences_survive_takeover() {
    use magnetar_broker::format::{encode_batch, ProducerSequence};
    let c = Cluster::start(1).await;
    let cfg = small_ledgers();
    let old = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/d", cfg.clone())
        .await
        .expect("open");
    // 60 batches of 2 records: the ledger rolls over (50 entries), so the
    // state comes partly from the stored list, partly from the scan of the
    // ledger the old owner left open.
    for i in 0..60 {
        let msgs = vec![Message::new(format!("a{i}")), Message::new(format!("b{i}"))];
        let p = ProducerSequence {
            producer_id: 7,
            epoch: 0,
            base_sequence: i * 2,
        };
        old.append(encode_batch(&msgs, Some(p)).expect("encode"))
            .await
            .expect("append");
    }
    assert_eq!(old.producer(7).map(|p| p.last_sequence), Some(119));
    let new = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/d", cfg)
        .await
        .expect("takeover");
    let p = new.producer(7).expect("recovered");
    assert_eq!((p.last_sequence, p.offset), (119, 118));
    assert_eq!(new.producer(8), None);
}

#[tokio::test]
async fn transactions_give_a_last_stable_offset_and_aborted_lists() {
    use magnetar_broker::format::{encode_control, encode_transactional, ControlType};
    use magnetar_broker::managed_ledger::AbortedTxn;
    use magnetar_broker::ProducerSequence;

    let c = Cluster::start(1).await;
    let cfg = small_ledgers();
    let ml = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/txn", cfg.clone())
        .await
        .expect("open");
    let txn = |pid: i64, seq: i32, n: usize| {
        let msgs: Vec<Message> = (0..n)
            .map(|j| Message::new(format!("p{pid}-{j}")))
            .collect();
        encode_transactional(
            &msgs,
            ProducerSequence {
                producer_id: pid,
                epoch: 0,
                base_sequence: seq,
            },
        )
        .expect("encode")
    };
    ml.append(batch(0, 2)).await.expect("plain"); // 0..2
    ml.append(txn(7, 0, 3)).await.expect("txn 7"); // 2..5
    ml.append(txn(8, 0, 2)).await.expect("txn 8"); // 5..7
    ml.append(batch(1, 1)).await.expect("plain"); // 7
    assert_eq!(ml.end_offset(), 8);
    assert_eq!(ml.last_stable_offset(), 2, "7 is open from 2");
    let abort = encode_control(7, 0, ControlType::Abort).expect("marker");
    assert_eq!(ml.append(abort).await.expect("abort 7"), 8);
    assert_eq!(ml.last_stable_offset(), 5, "8 is still open");
    let commit = encode_control(8, 0, ControlType::Commit).expect("marker");
    ml.append(commit).await.expect("commit 8"); // 9
    assert_eq!(ml.last_stable_offset(), 10);
    let aborted = AbortedTxn {
        producer_id: 7,
        first_offset: 2,
        last_offset: 8,
    };
    assert_eq!(ml.aborted_between(0, 10), vec![aborted]);
    assert_eq!(ml.aborted_between(9, 10), vec![]);
    // Markers are not messages.
    let values = read_all(&ml, 0).await;
    assert_eq!(values.len(), 8);

    // A new owner, without a clean close, rebuilds the index by scanning.
    ml.append(txn(9, 0, 1)).await.expect("txn 9"); // 10
    let new = ManagedLedger::open(c.ledger_client(), "t/ns/persistent/txn", cfg)
        .await
        .expect("takeover");
    assert_eq!(new.last_stable_offset(), 10, "9 is open from 10");
    assert_eq!(new.aborted_between(0, 11), vec![aborted]);
}

/// Every entry from `from` on, as (offset, producer if transactional,
/// control, value): what Kafka's readers see of a partition.
async fn read_raw(ml: &ManagedLedger, from: u64) -> Vec<(u64, Option<i64>, bool, Option<Bytes>)> {
    use magnetar_broker::format::decode_all;
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let entries = ml.read(at, 7, 3000).await.expect("read");
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            let (h, records) = decode_all(&e.data).expect("decode");
            let producer = h.is_transactional().then_some(h.producer_id);
            for r in records.into_iter().filter(|r| r.offset >= at) {
                out.push((r.offset, producer, h.is_control(), r.message.value));
            }
            at = e.end_offset();
        }
    }
}

#[tokio::test]
async fn offloaded_ledgers_read_the_same_and_leave_the_bookies() {
    use std::sync::Arc;

    use magnetar_broker::format::{encode_control, encode_transactional, ControlType};
    use magnetar_broker::managed_ledger::{offload_candidates, OffloadState};
    use magnetar_broker::ProducerSequence;
    use magnetar_tiering::{Tier, TierOptions};
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    let c = Cluster::start(1).await;
    let store = Arc::new(InMemory::new());
    let tier = Tier::new(store.clone(), "tier", "memory://", TierOptions::default());
    let cfg = ManagedLedgerConfig {
        tier: Some(tier.clone()),
        offload_block_bytes: 2_000,
        ..small_ledgers()
    };
    let name = "t/ns/persistent/offload";
    let ml = ManagedLedger::open(c.ledger_client(), name, cfg.clone())
        .await
        .expect("open");
    for i in 0..120u64 {
        ml.append(batch(i, 1 + (i % 3) as usize))
            .await
            .expect("append");
        if i == 60 {
            let txn = encode_transactional(
                &[Message::new("aborted-1"), Message::new("aborted-2")],
                ProducerSequence {
                    producer_id: 42,
                    epoch: 1,
                    base_sequence: 0,
                },
            )
            .expect("encode");
            ml.append(txn).await.expect("txn");
            let abort = encode_control(42, 1, ControlType::Abort).expect("marker");
            ml.append(abort).await.expect("abort");
        }
    }
    let before = read_raw(&ml, 0).await;
    let ts = ml.offset_for_timestamp(0).await.expect("by time");
    let ledgers = ml.ledgers();
    assert!(ledgers.len() >= 3, "{ledgers:?}");

    // Every closed ledger goes; the one being written stays.
    let ids = offload_candidates(&ledgers, Some(0), None);
    assert_eq!(ids.len(), ledgers.len() - 1);
    assert_eq!(
        ml.offload(&ids, 1, &Default::default())
            .await
            .expect("offload"),
        ids
    );
    assert_eq!(ml.offload_status().status, OffloadState::Success);
    assert!(ml
        .ledgers()
        .iter()
        .filter(|l| ids.contains(&l.id))
        .all(|l| l.offload.is_some()));
    assert_eq!(
        read_raw(&ml, 0).await,
        before,
        "read from the bookies still"
    );

    // Before the lag is up the bookies keep their copy; after it, not.
    assert!(ml.drop_bookie_copies(0).await.expect("not yet").is_empty());
    assert_eq!(ml.drop_bookie_copies(u64::MAX).await.expect("drop"), ids);
    let client = c.ledger_client();
    for id in &ids {
        assert!(client.metadata(*id).await.is_err(), "ledger {id} kept");
    }
    assert_eq!(read_raw(&ml, 0).await, before, "read back from the store");
    assert_eq!(read_raw(&ml, 77).await, before[77..].to_vec());
    assert_eq!(
        read_all(&ml, 0).await.len(),
        before.iter().filter(|r| !r.2).count()
    );
    assert_eq!(ml.offset_for_timestamp(0).await.expect("by time"), ts);
    assert_eq!(ml.aborted_between(0, ml.end_offset()).len(), 1);

    // A new owner reads the same.
    ml.close().await.expect("close");
    let ml = ManagedLedger::open(c.ledger_client(), name, cfg.clone())
        .await
        .expect("reopen");
    assert_eq!(read_raw(&ml, 0).await, before);

    // A corrupted object is refused, never served.
    let first = ml.ledgers()[0].clone();
    let object = first.offload.clone().expect("offloaded");
    let path = object_store::path::Path::from(object.object.as_str());
    let mut bytes = store
        .get(&path)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes")
        .to_vec();
    let index_path = object_store::path::Path::from(object.index.as_str());
    let json = store
        .get(&index_path)
        .await
        .expect("index")
        .bytes()
        .await
        .expect("bytes");
    let index = magnetar_tiering::LedgerIndex::from_json(&json).expect("parse");
    bytes[index.blocks[0].start as usize + 20] ^= 0xff;
    store.put(&path, bytes.into()).await.expect("corrupt");
    let fresh = ManagedLedgerConfig {
        tier: Some(Tier::new(
            store.clone(),
            "tier",
            "memory://",
            TierOptions::default(),
        )),
        ..cfg
    };
    ml.close().await.expect("close");
    let ml = ManagedLedger::open(c.ledger_client(), name, fresh)
        .await
        .expect("reopen");
    let err = ml.read(0, 10, 1 << 20).await.expect_err("corrupt");
    assert!(matches!(err, BrokerError::OffloadUnavailable(_)), "{err}");
    assert!(err.is_retriable());
    assert_eq!(
        read_raw(&ml, first.end_offset()).await,
        before[first.end_offset() as usize..].to_vec(),
        "the other ledgers still read"
    );

    // Retention deletes the objects with the ledger.
    let trimmed = ml.trim(first.end_offset()).await.expect("trim");
    assert_eq!(trimmed, vec![first.id]);
    assert!(store.head(&path).await.is_err(), "object kept");
    assert!(store.head(&index_path).await.is_err(), "index kept");
}
