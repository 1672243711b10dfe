//! What becomes of a message a consumer's subscription hands to its
//! channel: sent (acknowledged at once for no-ack consumers, its credit
//! back now or on settle), dead-lettered instead (expired, or over the
//! queue's delivery limit), or returned to the queue when the channel or
//! consumer is gone.

use magnetar_broker::subscription::Delivery;

use super::channels;
use crate::deadletter::Reason;
use crate::queue::{QueueDef, QueueType};

/// What the channel knows of the consumer a delivery is for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Consuming<'a> {
    pub queue: &'a QueueDef,
    pub no_ack: bool,
    /// Under a prefetch limit: its credit comes back on settle.
    pub limited: bool,
}

/// How a delivery goes out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Send {
    /// no-ack: acknowledged to the queue as it goes out; its tag tracks
    /// nothing.
    pub ack_now: bool,
    /// The message stays with its tag, for a reject or nack to
    /// dead-letter (the queue has a dead-letter exchange).
    pub keep_message: bool,
    /// The subscription gets its credit back now (no prefetch limit);
    /// otherwise when the tag is settled.
    pub credit_now: bool,
    /// basic.deliver's redelivered flag.
    pub redelivered: bool,
    /// The `x-stream-offset` header of a stream queue's delivery.
    pub stream_offset: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The channel is closing or gone, or the consumer cancelled: back to
    /// the queue at once, for another consumer.
    Return,
    /// To the queue's dead-letter exchange (or dropped without one), its
    /// credit back now.
    DeadLetter(Reason),
    Send(Send),
}

/// The verdict on `d` for `consumer` (None: gone) at `now` (ms since the
/// epoch).
pub(crate) fn verdict(consumer: Option<Consuming<'_>>, d: &Delivery, now: i64) -> Verdict {
    let Some(c) = consumer else {
        return Verdict::Return;
    };
    let args = &c.queue.args;
    let expired = channels::expired(&d.message, args.message_ttl_ms, now);
    if let Some(reason) =
        channels::dead_letter_instead(args.delivery_limit, d.redelivery_count, expired)
    {
        return Verdict::DeadLetter(reason);
    }
    Verdict::Send(Send {
        ack_now: c.no_ack,
        keep_message: !c.no_ack && args.dead_letter_exchange.is_some(),
        credit_now: !c.limited,
        redelivered: d.redelivery_count > 0,
        stream_offset: (args.queue_type == QueueType::Stream).then_some(d.offset),
    })
}
