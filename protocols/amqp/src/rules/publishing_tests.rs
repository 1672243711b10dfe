//! Confirm and tx modes, and the confirms of settled writes.

use super::publishing::{Commit, Confirm, Confirms, Modes, Publishing};
use crate::error;

type Channel = Modes<&'static str, u64>;

fn code<T: std::fmt::Debug>(r: Result<T, crate::error::Exception>) -> u16 {
    r.expect_err("refused").code
}

fn ack(tag: u64, multiple: bool) -> Confirm {
    Confirm {
        tag,
        multiple,
        ok: true,
    }
}

fn nack(tag: u64) -> Confirm {
    Confirm {
        tag,
        multiple: false,
        ok: false,
    }
}

#[test]
fn a_plain_channel_stores_at_once_without_sequence_numbers() {
    let mut c = Channel::default();
    assert_eq!(
        c.publish("a"),
        Publishing::Store {
            publish: "a",
            seq: 0
        }
    );
    assert_eq!(c.settle(7), Some(7));
    assert!(!c.is_confirm() && !c.is_tx());
}

#[test]
fn confirm_mode_numbers_publishes_from_one_and_select_again_keeps_counting() {
    let mut c = Channel::default();
    c.select_confirm().expect("confirm");
    let seqs: Vec<u64> = ["a", "b", "c"]
        .into_iter()
        .map(|p| match c.publish(p) {
            Publishing::Store { seq, .. } => seq,
            Publishing::Held => panic!("held"),
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    c.select_confirm().expect("again");
    assert_eq!(
        c.publish("d"),
        Publishing::Store {
            publish: "d",
            seq: 4
        }
    );
}

#[test]
fn confirm_and_tx_modes_exclude_each_other() {
    let mut c = Channel::default();
    c.select_confirm().expect("confirm");
    assert_eq!(code(c.select_tx()), error::PRECONDITION_FAILED);
    let mut c = Channel::default();
    c.select_tx().expect("tx");
    assert_eq!(code(c.select_confirm()), error::PRECONDITION_FAILED);
}

#[test]
fn a_transaction_holds_publishes_and_settlements_until_commit() {
    let mut c = Channel::default();
    c.select_tx().expect("tx");
    assert_eq!(c.publish("a"), Publishing::Held);
    assert_eq!(c.settle(1), None);
    assert_eq!(c.publish("b"), Publishing::Held);
    assert_eq!(c.settle(2), None);
    assert_eq!(
        c.commit().expect("commit"),
        Commit {
            publishes: vec!["a", "b"],
            settles: vec![1, 2],
        }
    );
    // A new transaction begins, empty.
    assert_eq!(
        c.commit().expect("commit"),
        Commit {
            publishes: vec![],
            settles: vec![],
        }
    );
    assert!(c.is_tx());
}

#[test]
fn rollback_drops_publishes_and_hands_back_settlements() {
    let mut c = Channel::default();
    c.select_tx().expect("tx");
    c.publish("dropped");
    c.settle(5);
    c.settle(6);
    assert_eq!(c.rollback().expect("rollback"), vec![5, 6]);
    assert_eq!(
        c.commit().expect("commit"),
        Commit {
            publishes: vec![],
            settles: vec![],
        }
    );
}

#[test]
fn tx_select_again_keeps_the_open_transaction() {
    let mut c = Channel::default();
    c.select_tx().expect("tx");
    c.publish("kept");
    c.select_tx().expect("again");
    assert_eq!(c.commit().expect("commit").publishes, vec!["kept"]);
}

#[test]
fn commit_or_rollback_outside_tx_mode_is_a_precondition_failure() {
    let mut c = Channel::default();
    assert_eq!(code(c.commit()), error::PRECONDITION_FAILED);
    assert_eq!(code(c.rollback()), error::PRECONDITION_FAILED);
    c.select_confirm().expect("confirm");
    assert_eq!(code(c.commit()), error::PRECONDITION_FAILED);
}

#[test]
fn a_run_of_stored_writes_is_one_multiple_ack() {
    let mut c = Confirms::default();
    for seq in 1..=5 {
        c.settled(seq, true);
    }
    assert_eq!(c.take().collect::<Vec<_>>(), vec![ack(5, true)]);
    assert_eq!(c.take().collect::<Vec<_>>(), vec![], "nothing twice");
    c.settled(6, true);
    assert_eq!(c.take().collect::<Vec<_>>(), vec![ack(6, false)]);
}

#[test]
fn a_failed_write_is_a_nack_of_its_own_between_acks() {
    let mut c = Confirms::default();
    c.settled(1, true);
    c.settled(2, true);
    c.settled(3, false);
    c.settled(4, true);
    assert_eq!(
        c.take().collect::<Vec<_>>(),
        vec![ack(2, true), nack(3), ack(4, false)]
    );
}

#[test]
fn failures_in_a_row_are_nacked_one_by_one() {
    let mut c = Confirms::default();
    c.settled(1, false);
    c.settled(2, false);
    assert_eq!(c.take().collect::<Vec<_>>(), vec![nack(1), nack(2)]);
}

#[test]
fn writes_outside_confirm_mode_are_not_confirmed() {
    let mut c = Confirms::default();
    c.settled(0, true);
    c.settled(0, false);
    assert_eq!(c.take().collect::<Vec<_>>(), vec![]);
}
