//! A channel's rules: opening it, its modes (confirm or tx), flow,
//! prefetch, the queue a method names, exchange declarations, and when a
//! delivery goes to the dead-letter exchange instead.

use magnetar_broker::routing::{ExchangeKind, RoutingTable};

use magnetar_broker::Message;

use crate::deadletter::Reason;
use crate::error::{self, Exception};
use crate::props;

/// channel.open of `ch`, under the negotiated `channel_max`.
pub(crate) fn open(ch: u16, channel_max: u16, already_open: bool) -> Result<(), Exception> {
    if ch > channel_max {
        return Err(Exception::new(
            error::NOT_ALLOWED,
            format!("channel {ch} is over the negotiated channel_max {channel_max}"),
        ));
    }
    if already_open {
        return Err(Exception::new(
            error::CHANNEL_ERROR,
            format!("channel {ch} is already open"),
        ));
    }
    Ok(())
}

/// channel.flow: RabbitMQ stopped honouring a client's request to pause
/// deliveries; consumers use prefetch instead.
pub(crate) fn flow(active: bool) -> Result<(), Exception> {
    if active {
        Ok(())
    } else {
        Err(Exception::new(error::NOT_IMPLEMENTED, "active=false"))
    }
}

/// confirm.select on a channel in tx mode or not.
pub(crate) fn confirm_select(tx: bool) -> Result<(), Exception> {
    if tx {
        return Err(Exception::new(
            error::PRECONDITION_FAILED,
            "cannot switch from tx to confirm mode",
        ));
    }
    Ok(())
}

/// tx.select on a channel in confirm mode or not.
pub(crate) fn tx_select(confirm: bool) -> Result<(), Exception> {
    if confirm {
        return Err(Exception::new(
            error::PRECONDITION_FAILED,
            "cannot switch from confirm to tx mode",
        ));
    }
    Ok(())
}

/// tx.commit or tx.rollback outside tx mode.
pub(crate) fn not_transactional() -> Exception {
    Exception::new(error::PRECONDITION_FAILED, "channel is not transactional")
}

/// The queue a method names: "" is the channel's `last` declared queue.
pub(crate) fn queue_name(name: &str, last: &str) -> Result<String, Exception> {
    match (name, last) {
        ("", "") => Err(Exception::new(
            error::NOT_FOUND,
            "no previously declared queue",
        )),
        ("", last) => Ok(last.to_owned()),
        (name, _) => Ok(name.to_owned()),
    }
}

/// The kind exchange.declare asks for `name` in `vhost`. An unknown type
/// closes the channel alone with 406, as RabbitMQ 3.12.14+ does (one bad
/// declare does not end the connection's other channels); a passive
/// declare names no type worth checking. `amq.` names are reserved but
/// for the predeclared exchanges.
pub(crate) fn exchange_kind(
    name: &str,
    kind: &str,
    passive: bool,
    vhost: &str,
) -> Result<ExchangeKind, Exception> {
    let kind = match (ExchangeKind::parse(kind), passive) {
        (Ok(k), _) => k,
        (Err(_), true) => ExchangeKind::Direct,
        (Err(_), false) => {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                format!("unknown exchange type '{kind}'"),
            ))
        }
    };
    if name.starts_with("amq.") && !passive && !RoutingTable::is_predeclared(name) {
        return Err(Exception::new(
            error::ACCESS_REFUSED,
            format!("exchange '{name}' in vhost '{vhost}' contains reserved prefix 'amq.'"),
        ));
    }
    Ok(kind)
}

/// A channel's basic.qos limits, as RabbitMQ's per_consumer_qos: global
/// false limits each consumer started afterwards, global true the
/// channel's unacknowledged deliveries together. 0: no limit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefetch {
    pub per_consumer: u16,
    pub global: u16,
}

impl Prefetch {
    pub fn qos(&mut self, count: u16, global: bool) {
        if global {
            self.global = count;
        } else {
            self.per_consumer = count;
        }
    }

    /// At the channel-wide limit with `unacked` deliveries out.
    pub fn at_global_limit(&self, unacked: usize) -> bool {
        self.global > 0 && unacked >= usize::from(self.global)
    }

    /// The credit of a consumer started now (0: unlimited). A channel-wide
    /// limit also caps it, so that at most one limit's worth per consumer
    /// waits for room.
    pub fn consumer_credit(&self) -> u16 {
        match (self.per_consumer, self.global) {
            (0, g) => g,
            (p, 0) => p,
            (p, g) => p.min(g),
        }
    }
}

/// Whether a delivery waits for room rather than going out: behind
/// others already waiting (none overtakes), or at the channel-wide
/// limit; deliveries to no-ack consumers never wait.
pub(crate) fn waits(others_waiting: bool, at_global_limit: bool, no_ack: bool) -> bool {
    !no_ack && (others_waiting || at_global_limit)
}

/// Why a delivery goes to the dead-letter exchange rather than its
/// consumer: it expired, or was redelivered more than the queue's
/// delivery limit.
pub(crate) fn dead_letter_instead(
    delivery_limit: Option<u64>,
    redeliveries: u32,
    expired: bool,
) -> Option<Reason> {
    if expired {
        Some(Reason::Expired)
    } else if delivery_limit.is_some_and(|l| u64::from(redeliveries) > l) {
        Some(Reason::DeliveryLimit)
    } else {
        None
    }
}

/// Whether `m` outlived its time to live at `now` (ms since the epoch):
/// the lower of the queue's message TTL and the message's own
/// expiration, counted from when it was published.
pub(crate) fn expired(m: &Message, queue_ttl: Option<u64>, now: i64) -> bool {
    let ttl = match (queue_ttl, props::record_expiration_ms(m)) {
        (Some(a), Some(b)) => a.min(b),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => return false,
    };
    now.saturating_sub(m.timestamp_ms) >= i64::try_from(ttl).unwrap_or(i64::MAX)
}
