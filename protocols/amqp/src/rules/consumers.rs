//! A queue's consumers: the tag basic.consume gets, its priority and
//! credit, exclusive use, the single active consumer's turns, and where a
//! stream consumer starts reading.

use std::collections::VecDeque;

use amq_protocol::types::{AMQPValue, FieldTable};
use magnetar_broker::routing::HeaderValue;

use crate::error::{self, Exception};
use crate::props;

/// The credit of a consumer without a prefetch limit (or with no-ack):
/// enough to keep the socket busy, few enough that a slow client does not
/// pull a whole queue into memory.
pub(crate) const UNLIMITED_CREDIT: u64 = 1000;

/// The consumer tag: the one asked for, else RabbitMQ's `amq.ctag-` form
/// with the channel's `n`th generated tag and a random `suffix`. A tag
/// the channel already uses is refused (a connection error, 530).
pub(crate) fn tag(
    requested: &str,
    n: u64,
    suffix: &str,
    in_use: impl Fn(&str) -> bool,
) -> Result<String, Exception> {
    let tag = if requested.is_empty() {
        format!("amq.ctag-{suffix}-{n}")
    } else {
        requested.to_owned()
    };
    if in_use(&tag) {
        return Err(Exception::new(
            error::NOT_ALLOWED,
            format!("attempt to reuse consumer tag '{tag}'"),
        ));
    }
    Ok(tag)
}

/// The broker-side priority of a consumer with `x-priority` in its
/// arguments: RabbitMQ serves higher values first, the broker lower ones,
/// so the value is negated; anything but an integer counts as 0.
pub(crate) fn priority(args: &FieldTable) -> i32 {
    args.inner()
        .get("x-priority")
        .map(props::header_value)
        .and_then(|v| match v {
            HeaderValue::Int(n) => i32::try_from(n).ok(),
            _ => None,
        })
        .unwrap_or(0)
        .saturating_neg()
}

/// A new consumer's credit under the channel's `prefetch` (0: none), and
/// whether acknowledgements return it. A no-ack consumer is never limited
/// by prefetch, as in RabbitMQ.
pub(crate) fn credit(prefetch: u16, no_ack: bool) -> (u64, bool) {
    if prefetch > 0 && !no_ack {
        (u64::from(prefetch), true)
    } else {
        (UNLIMITED_CREDIT, false)
    }
}

/// How many consume a queue, and whether one of them holds it alone.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Use {
    pub consumers: u32,
    pub exclusive: bool,
}

impl Use {
    /// Admits a consumer, exclusive or not: an exclusive one only to a
    /// queue nobody consumes, and nobody beside an exclusive one (403,
    /// "in exclusive use").
    pub fn admit(&mut self, exclusive: bool) -> bool {
        if self.exclusive || (exclusive && self.consumers > 0) {
            return false;
        }
        self.consumers += 1;
        self.exclusive = exclusive;
        true
    }

    /// A consumer went away; true when none is left.
    pub fn leave(&mut self) -> bool {
        self.consumers = self.consumers.saturating_sub(1);
        self.exclusive = false;
        self.consumers == 0
    }
}

/// A queue with `x-single-active-consumer`: one consumer receives, the
/// others wait in the order they came, each with what it is given when
/// its turn comes (`W`, the credit to grant).
#[derive(Debug)]
pub(crate) struct SingleActive<I, W> {
    active: Option<I>,
    waiting: VecDeque<(I, W)>,
}

impl<I, W> Default for SingleActive<I, W> {
    fn default() -> Self {
        Self {
            active: None,
            waiting: VecDeque::new(),
        }
    }
}

impl<I: PartialEq, W> SingleActive<I, W> {
    /// A consumer joins: it gets its turn now (`Some(w)`, to be granted)
    /// when nobody is active, else it waits.
    pub fn join(&mut self, id: I, w: W) -> Option<W> {
        if self.active.is_some() {
            self.waiting.push_back((id, w));
            None
        } else {
            self.active = Some(id);
            Some(w)
        }
    }

    /// A consumer leaves: when it was the active one, the next in line
    /// becomes active, and what it is to be granted comes back.
    pub fn leave(&mut self, id: &I) -> Option<W> {
        if self.active.as_ref() == Some(id) {
            self.active = None;
            let (next, w) = self.waiting.pop_front()?;
            self.active = Some(next);
            Some(w)
        } else {
            self.waiting.retain(|(i, _)| i != id);
            None
        }
    }

    #[cfg(test)]
    pub fn active(&self) -> Option<&I> {
        self.active.as_ref()
    }
}

/// Where a stream consumer starts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamStart {
    Offset(u64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// The start of a stream consumer by its `x-stream-offset`, in a stream
/// holding `[start, end)`: `first`, `last` (the newest record), `next`
/// (the default: what comes after now), an offset (clamped into the
/// stream), or a timestamp in seconds. Anything else is refused (406).
pub(crate) fn stream_start(
    arg: Option<&AMQPValue>,
    start: u64,
    end: u64,
) -> Result<StreamStart, Exception> {
    let at = match arg {
        None => end,
        Some(AMQPValue::LongString(v)) => match &*String::from_utf8_lossy(v.as_bytes()) {
            "first" => start,
            "last" => end.saturating_sub(1).max(start),
            "next" => end,
            other => {
                return Err(Exception::new(
                    error::PRECONDITION_FAILED,
                    format!("invalid x-stream-offset '{other}'"),
                ))
            }
        },
        Some(AMQPValue::Timestamp(secs)) => {
            return Ok(StreamStart::Timestamp(
                i64::try_from(*secs)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000),
            ))
        }
        Some(v) => match props::header_value(v) {
            HeaderValue::Int(n) => u64::try_from(n).unwrap_or(0).clamp(start, end),
            _ => {
                return Err(Exception::new(
                    error::PRECONDITION_FAILED,
                    "invalid x-stream-offset",
                ))
            }
        },
    };
    Ok(StreamStart::Offset(at))
}
