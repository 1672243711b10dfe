//! Deliveries to a channel's consumers, verdict by verdict.

use bytes::Bytes;
use magnetar_broker::subscription::Delivery;
use magnetar_broker::Message;

use super::delivery::{verdict, Consuming, Send, Verdict};
use crate::deadletter::Reason;
use crate::queue::{QueueArgs, QueueDef, QueueType};

const NOW: i64 = 1_000_000;

fn queue(args: QueueArgs) -> QueueDef {
    QueueDef {
        args,
        ..QueueDef::implicit("q", true)
    }
}

fn delivery(offset: u64, redeliveries: u32, published_ms: i64) -> Delivery {
    Delivery {
        offset,
        redelivery_count: redeliveries,
        message: Message {
            key: None,
            value: Some(Bytes::from_static(b"m")),
            headers: Vec::new(),
            timestamp_ms: published_ms,
        },
    }
}

fn to(q: &QueueDef, no_ack: bool, limited: bool) -> Option<Consuming<'_>> {
    Some(Consuming {
        queue: q,
        no_ack,
        limited,
    })
}

fn send(v: Verdict) -> Send {
    match v {
        Verdict::Send(s) => s,
        other => panic!("not sent: {other:?}"),
    }
}

#[test]
fn a_delivery_for_a_gone_consumer_or_channel_goes_back_to_the_queue() {
    assert_eq!(verdict(None, &delivery(0, 0, NOW), NOW), Verdict::Return);
}

#[test]
fn an_unlimited_consumer_gets_its_credit_back_as_the_delivery_goes_out() {
    let q = queue(QueueArgs::default());
    let s = send(verdict(to(&q, false, false), &delivery(4, 0, NOW), NOW));
    assert_eq!(
        s,
        Send {
            ack_now: false,
            keep_message: false,
            credit_now: true,
            redelivered: false,
            stream_offset: None,
        }
    );
}

#[test]
fn a_consumer_under_prefetch_gets_its_credit_back_on_settle() {
    let q = queue(QueueArgs::default());
    let s = send(verdict(to(&q, false, true), &delivery(4, 0, NOW), NOW));
    assert!(!s.credit_now && !s.ack_now);
}

#[test]
fn a_no_ack_consumer_acknowledges_as_it_sends() {
    let q = queue(QueueArgs {
        dead_letter_exchange: Some("dlx".into()),
        ..QueueArgs::default()
    });
    let s = send(verdict(to(&q, true, false), &delivery(4, 0, NOW), NOW));
    assert!(s.ack_now && s.credit_now);
    assert!(!s.keep_message, "nothing to reject later");
}

#[test]
fn with_a_dead_letter_exchange_the_message_stays_with_its_tag() {
    let q = queue(QueueArgs {
        dead_letter_exchange: Some("dlx".into()),
        ..QueueArgs::default()
    });
    assert!(send(verdict(to(&q, false, true), &delivery(4, 0, NOW), NOW)).keep_message);
}

#[test]
fn a_redelivery_says_so() {
    let q = queue(QueueArgs::default());
    assert!(send(verdict(to(&q, false, false), &delivery(4, 1, NOW), NOW)).redelivered);
}

#[test]
fn a_stream_delivery_carries_its_offset() {
    let q = queue(QueueArgs {
        queue_type: QueueType::Stream,
        ..QueueArgs::default()
    });
    assert_eq!(
        send(verdict(to(&q, false, true), &delivery(42, 0, NOW), NOW)).stream_offset,
        Some(42)
    );
}

#[test]
fn an_expired_message_is_dead_lettered_instead_of_sent() {
    let q = queue(QueueArgs {
        message_ttl_ms: Some(1_000),
        ..QueueArgs::default()
    });
    assert_eq!(
        verdict(to(&q, false, true), &delivery(0, 0, NOW - 1_000), NOW),
        Verdict::DeadLetter(Reason::Expired)
    );
    assert!(matches!(
        verdict(to(&q, false, true), &delivery(0, 0, NOW - 999), NOW),
        Verdict::Send(_)
    ));
}

#[test]
fn a_message_over_the_delivery_limit_is_dead_lettered() {
    let q = queue(QueueArgs {
        delivery_limit: Some(2),
        ..QueueArgs::default()
    });
    assert!(matches!(
        verdict(to(&q, false, true), &delivery(0, 2, NOW), NOW),
        Verdict::Send(_)
    ));
    assert_eq!(
        verdict(to(&q, false, true), &delivery(0, 3, NOW), NOW),
        Verdict::DeadLetter(Reason::DeliveryLimit)
    );
}
