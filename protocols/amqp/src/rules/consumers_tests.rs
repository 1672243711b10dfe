//! A queue's consumers, rule by rule.

use amq_protocol::types::{AMQPValue, FieldTable, LongString};

use super::consumers::{self, SingleActive, StreamStart, Use, UNLIMITED_CREDIT};
use crate::error;

fn args(key: &str, v: AMQPValue) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(key.into(), v);
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

#[test]
fn a_consumer_gets_the_tag_it_asks_for_or_a_generated_one() {
    let free = |_: &str| false;
    assert_eq!(
        consumers::tag("mine", 0, "x", free).ok().as_deref(),
        Some("mine")
    );
    assert_eq!(
        consumers::tag("", 3, "Ab9", free).ok().as_deref(),
        Some("amq.ctag-Ab9-3")
    );
}

#[test]
fn reusing_a_tag_on_the_channel_is_not_allowed() {
    let e = consumers::tag("mine", 0, "x", |t| t == "mine").expect_err("in use");
    assert_eq!(e.code, error::NOT_ALLOWED);
    assert!(e.text.contains("mine"), "{}", e.text);
}

#[test]
fn higher_x_priority_is_served_first_as_in_rabbitmq() {
    let high = consumers::priority(&args("x-priority", AMQPValue::LongInt(10)));
    let low = consumers::priority(&args("x-priority", AMQPValue::ShortInt(-5)));
    let none = consumers::priority(&FieldTable::default());
    // The broker serves lower values first.
    assert!(high < none && none < low, "{high} {none} {low}");
    assert_eq!(consumers::priority(&args("x-priority", text("9"))), 0);
    assert_eq!(
        consumers::priority(&args("x-priority", AMQPValue::LongLongInt(i64::MAX))),
        0
    );
}

#[test]
fn prefetch_limits_acknowledging_consumers_only() {
    assert_eq!(consumers::credit(10, false), (10, true));
    assert_eq!(consumers::credit(10, true), (UNLIMITED_CREDIT, false));
    assert_eq!(consumers::credit(0, false), (UNLIMITED_CREDIT, false));
}

#[test]
fn an_exclusive_consumer_holds_the_queue_alone() {
    let mut u = Use::default();
    assert!(u.admit(true));
    assert!(!u.admit(false), "nobody beside an exclusive consumer");
    assert!(!u.admit(true));
    assert!(u.leave(), "none left");
    assert!(u.admit(false));
    assert!(!u.admit(true), "not exclusive beside another");
    assert!(u.admit(false));
    assert!(!u.leave());
    assert!(u.leave());
    assert!(u.leave(), "leaving an empty queue stays at zero");
    assert_eq!(u.consumers, 0);
}

#[test]
fn a_single_active_consumer_hands_its_turn_to_the_next_in_line() {
    let mut s = SingleActive::<&str, u64>::default();
    assert_eq!(s.join("a", 10), Some(10), "the first is active at once");
    assert_eq!(s.join("b", 20), None);
    assert_eq!(s.join("c", 30), None);
    assert_eq!(s.active(), Some(&"a"));
    // A waiting one leaves: nothing changes hands.
    assert_eq!(s.leave(&"b"), None);
    assert_eq!(s.active(), Some(&"a"));
    // The active one leaves: the next waiting gets its credit.
    assert_eq!(s.leave(&"a"), Some(30));
    assert_eq!(s.active(), Some(&"c"));
    assert_eq!(s.leave(&"c"), None);
    assert_eq!(s.active(), None);
    assert_eq!(s.join("d", 40), Some(40));
}

#[test]
fn a_stream_consumer_starts_next_by_default_and_where_it_asks() {
    let at = |v: Option<AMQPValue>| consumers::stream_start(v.as_ref(), 5, 9).ok();
    assert_eq!(at(None), Some(StreamStart::Offset(9)));
    assert_eq!(at(Some(text("first"))), Some(StreamStart::Offset(5)));
    assert_eq!(at(Some(text("last"))), Some(StreamStart::Offset(8)));
    assert_eq!(at(Some(text("next"))), Some(StreamStart::Offset(9)));
    assert_eq!(
        at(Some(AMQPValue::LongInt(7))),
        Some(StreamStart::Offset(7))
    );
    // Offsets outside the stream are clamped into it.
    assert_eq!(
        at(Some(AMQPValue::LongInt(2))),
        Some(StreamStart::Offset(5))
    );
    assert_eq!(
        at(Some(AMQPValue::LongLongInt(100))),
        Some(StreamStart::Offset(9))
    );
    assert_eq!(
        at(Some(AMQPValue::LongInt(-1))),
        Some(StreamStart::Offset(5))
    );
    assert_eq!(
        at(Some(AMQPValue::Timestamp(1_700_000_000))),
        Some(StreamStart::Timestamp(1_700_000_000_000))
    );
}

#[test]
fn last_of_an_empty_stream_is_its_start() {
    assert_eq!(
        consumers::stream_start(Some(&text("last")), 4, 4).ok(),
        Some(StreamStart::Offset(4))
    );
}

#[test]
fn an_unknown_stream_offset_is_a_precondition_failure() {
    for v in [text("middle"), AMQPValue::Boolean(true)] {
        let e = consumers::stream_start(Some(&v), 0, 1).expect_err("refused");
        assert_eq!(e.code, error::PRECONDITION_FAILED);
    }
}
