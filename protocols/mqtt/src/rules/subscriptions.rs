//! Subscriptions: what a SUBSCRIBE's filter gets, which queue a
//! subscription binds, whether retained messages follow, and how a
//! message from a session's queue goes out given all its subscriptions.

use std::num::NonZeroU32;

use rmqtt_codec::types::QoS;
use rmqtt_codec::v5;
use serde::{Deserialize, Serialize};

use crate::error::MqttError;
use crate::topic;

/// A subscription as a session keeps it (and stores it, when persistent).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Sub {
    /// As the client sent it, `$share/…` included: its identity.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<u32>,
}

impl Sub {
    pub fn share(&self) -> Option<(&str, &str)> {
        topic::parse_share(&self.filter).ok().flatten()
    }

    /// The filter without its `$share/group/` prefix.
    pub fn pattern(&self) -> &str {
        self.share().map_or(self.filter.as_str(), |(_, f)| f)
    }

    /// The queue this subscription binds: a share group's, or one of
    /// the session's own two by QoS.
    pub fn queue(&self, client_id: &str) -> String {
        match self.share() {
            Some((g, _)) => share_queue(g),
            None => session_queue(client_id, self.qos),
        }
    }
}

/// A session's queue for subscriptions at `qos`: QoS 0 in memory, QoS 1
/// and 2 durable.
pub(crate) fn session_queue(client_id: &str, qos: u8) -> String {
    format!(
        "mqtt-subscription-{}qos{}",
        magnetar_tenancy::names::encode_segment(client_id),
        u8::from(qos > 0)
    )
}

const SHARE_QUEUE_PREFIX: &str = "mqtt-share-";

pub(crate) fn share_queue(group: &str) -> String {
    format!(
        "{SHARE_QUEUE_PREFIX}{}",
        magnetar_tenancy::names::encode_segment(group)
    )
}

pub(crate) fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// What one filter of a SUBSCRIBE gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// SUBACK 0x8F (0x80 on 3.1.1).
    Invalid,
    /// SUBACK 0x87 (0x80 on 3.1.1).
    NotAuthorized,
    /// Bound, as a shared subscription or not.
    Accepted { shared: bool },
}

/// The verdict on `filter` with `no_local` for a role that may consume
/// or not; an error (a protocol error, ending the connection) for
/// no-local on a shared subscription (MQTT 5, 3.8.3.1).
pub(crate) fn verdict(
    filter: &str,
    no_local: bool,
    may_consume: bool,
) -> Result<Verdict, MqttError> {
    let share = match topic::check_filter(filter).and_then(|()| topic::parse_share(filter)) {
        Ok(share) => share,
        Err(_) => return Ok(Verdict::Invalid),
    };
    if share.is_some() && no_local {
        return Err(MqttError::Protocol(
            "no-local on a shared subscription".into(),
        ));
    }
    if !may_consume {
        return Ok(Verdict::NotAuthorized);
    }
    Ok(Verdict::Accepted {
        shared: share.is_some(),
    })
}

/// Whether a subscription gets the retained messages it matches: by its
/// Retain Handling, never for a shared one (MQTT 5, 4.8.2).
pub(crate) fn sends_retained(shared: bool, handling: v5::RetainHandling, existed: bool) -> bool {
    !shared
        && match handling {
            v5::RetainHandling::AtSubscribe => true,
            v5::RetainHandling::AtSubscribeNew => !existed,
            v5::RetainHandling::NoAtSubscribe => false,
        }
}

/// What dropping a subscription undoes of its queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Release {
    /// The binding key to unbind from the session's queue: none when
    /// another subscription of that queue binds the same key, nor for a
    /// share group, whose bindings stay for its other members.
    pub unbind: Option<String>,
    /// Whether the session stops consuming the queue: a share group's,
    /// once none of the session's subscriptions is in that group. The
    /// session's own queues stay consumed, since a resumed or later
    /// subscription finds what they hold.
    pub stop_consuming: bool,
}

/// What dropping `sub` from a session with `subs` (it may be among them)
/// undoes, when `keep` are about to be added: a subscription whose QoS
/// changed moves to the other queue and keeps nothing of the old one
/// unless another subscription needs it.
pub(crate) fn release(subs: &[Sub], sub: &Sub, keep: &[&Sub], client_id: &str) -> Release {
    let queue = sub.queue(client_id);
    let others: Vec<&Sub> = subs
        .iter()
        .filter(|s| s.filter != sub.filter)
        .chain(keep.iter().copied())
        .filter(|s| s.queue(client_id) == queue)
        .collect();
    let shared = sub.share().is_some();
    let key = topic::binding_key(sub.pattern());
    let unbind = (!shared
        && !others
            .iter()
            .any(|s| topic::binding_key(s.pattern()) == key))
    .then_some(key);
    Release {
        unbind,
        stop_consuming: shared && others.is_empty(),
    }
}

/// The subscription that `sub` replaces when it moves its filter to
/// another queue (its QoS class changed), to be released after `sub` is
/// attached; none when the filter is new or stays on its queue.
pub(crate) fn moved<'a>(subs: &'a [Sub], sub: &Sub, client_id: &str) -> Option<&'a Sub> {
    subs.iter()
        .find(|x| x.filter == sub.filter)
        .filter(|old| old.queue(client_id) != sub.queue(client_id))
}

/// How a message goes out to a session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Done with it unsent: no subscription matches (any more), only
    /// no-local ones do, it expired, or the session's other queue
    /// carries it too.
    Drop,
    Send {
        /// The highest of the matching subscriptions, at most the
        /// message's own.
        qos: QoS,
        /// Every matching subscription's identifier.
        ids: Vec<NonZeroU32>,
        retain_as_published: bool,
    },
}

/// The plan for a message on `topic` (published by `publisher`, at
/// `qos`) from `queue` of the session of `client_id` with `subs`. The
/// session's own two queues count as one: a message both carry goes out
/// once, from the QoS 1 queue, at the highest QoS of the matching
/// subscriptions, with all their identifiers.
pub(crate) fn plan(
    subs: &[Sub],
    client_id: &str,
    queue: &str,
    topic: &str,
    publisher: Option<&str>,
    qos: QoS,
    expired: bool,
) -> Plan {
    let from_share = queue.starts_with(SHARE_QUEUE_PREFIX);
    let mut granted = None::<QoS>;
    let mut ids = Vec::new();
    let mut rap = false;
    let mut durable_too = false;
    for s in subs {
        let same = if from_share {
            s.queue(client_id) == queue
        } else {
            s.share().is_none()
        };
        if !same || !topic::matches(s.pattern(), topic) {
            continue;
        }
        durable_too |= s.qos > 0;
        if s.no_local && publisher == Some(client_id) {
            continue;
        }
        let q = qos_of(s.qos);
        granted = Some(granted.map_or(q, |x: QoS| if q.value() > x.value() { q } else { x }));
        if let Some(id) = s.id.and_then(NonZeroU32::new) {
            ids.push(id);
        }
        rap |= s.retain_as_published;
    }
    let Some(granted) = granted else {
        return Plan::Drop;
    };
    if expired || (durable_too && !from_share && queue == session_queue(client_id, 0)) {
        return Plan::Drop;
    }
    Plan::Send {
        qos: qos.less_value(granted),
        ids,
        retain_as_published: rap,
    }
}
