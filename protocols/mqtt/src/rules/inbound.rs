//! What a client sends after CONNECT: its publishes as a machine
//! ([`Publishes`]: topic aliases, the Receive Maximum budget,
//! authorisation, the QoS 1 and 2 answers and PUBREL), DISCONNECT's
//! session expiry and AUTH re-authentication.

use std::collections::HashMap;
use std::num::NonZeroU16;

use bytestring::ByteString;
use magnetar_broker::Grants;
use magnetar_tenancy::AuthAction;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, Packet};

use crate::codec;
use crate::error::MqttError;
use crate::state::Outbound;

/// The topic aliases a client set (MQTT 5, 3.3.2.3.4), up to the
/// maximum the broker announced.
#[derive(Debug)]
pub(crate) struct AliasesIn {
    max: u16,
    set: HashMap<u16, ByteString>,
}

impl AliasesIn {
    pub fn new(max: u16) -> Self {
        AliasesIn {
            max,
            set: HashMap::new(),
        }
    }

    /// Gives `p` its topic: an alias with a topic sets the alias, one
    /// without uses it. The property is taken off: the broker routes by
    /// topic, and aliases are per connection and direction.
    pub fn resolve(&mut self, p: &mut Publish) -> Result<(), MqttError> {
        let Some(a) = p.properties.as_mut().and_then(|pr| pr.topic_alias.take()) else {
            return Ok(());
        };
        if a.get() > self.max {
            return Err(MqttError::TopicAlias(format!("alias {a} over the maximum")));
        }
        if p.topic.is_empty() {
            p.topic = self
                .set
                .get(&a.get())
                .cloned()
                .ok_or_else(|| MqttError::TopicAlias(format!("alias {a} is not set")))?;
        } else {
            self.set.insert(a.get(), p.topic.clone());
        }
        Ok(())
    }
}

/// QoS 1 and 2 publishes of a client not yet acknowledged (QoS 2: not
/// yet released), against the Receive Maximum the broker announced.
#[derive(Debug)]
pub(crate) struct Receiving {
    max: u16,
    count: usize,
    /// Receive Maximum is MQTT 5's: a 3.1.1 client was never told one,
    /// and is slowed down instead of refused.
    enforced: bool,
}

impl Receiving {
    pub fn new(max: u16, v5: bool) -> Self {
        Receiving {
            max,
            count: 0,
            enforced: v5,
        }
    }

    /// One more: an error (DISCONNECT 0x93) for a v5 client over the
    /// maximum.
    pub fn start(&mut self) -> Result<(), MqttError> {
        self.count += 1;
        if self.enforced && self.count > usize::from(self.max) {
            return Err(MqttError::ReceiveMaximum);
        }
        Ok(())
    }

    /// One acknowledged (or released).
    pub fn finish(&mut self) {
        self.count = self.count.saturating_sub(1);
    }

    /// Whether to read more of a client (those without a Receive Maximum
    /// wait in TCP instead).
    pub fn has_room(&self, stored: usize) -> bool {
        stored < usize::from(self.max)
    }
}

/// The session expiry after a DISCONNECT that sets `asked`, from
/// `current`: setting one after 0 on CONNECT is a protocol error (MQTT 5,
/// 3.14.2.2.2).
pub(crate) fn disconnect_expiry(current: u32, asked: Option<u32>) -> Result<u32, MqttError> {
    match asked {
        None => Ok(current),
        Some(e) if current == 0 && e != 0 => Err(MqttError::Protocol(
            "session expiry set on DISCONNECT after 0 on CONNECT".into(),
        )),
        Some(e) => Ok(e),
    }
}

/// Checks an AUTH packet as a re-authentication with CONNECT's `method`
/// (MQTT 5, 4.12.1): the method the same, the reason 0x19.
pub(crate) fn reauth(method: Option<&ByteString>, a: &v5::Auth) -> Result<ByteString, MqttError> {
    let Some(method) = method else {
        return Err(MqttError::Protocol(
            "AUTH without an authentication method".into(),
        ));
    };
    if a.auth_method.as_ref() != Some(method) {
        return Err(MqttError::Protocol(
            "AUTH with another authentication method than CONNECT's".into(),
        ));
    }
    if a.reason_code != v5::AuthReasonCode::ReAuth {
        return Err(MqttError::Protocol(
            "AUTH other than re-authenticate".into(),
        ));
    }
    Ok(method.clone())
}

/// What a client's QoS 1 or 2 publish is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    PubAck(NonZeroU16),
    /// QoS 2, stored (or stored before): the id is remembered until PUBREL.
    PubRec(NonZeroU16),
    /// A v5 publish the role may not make: PUBACK or (QoS 2) PUBREC with
    /// 0x87, which ends its flow.
    Refused(NonZeroU16, QoS),
    /// A v5 publish the broker would not store for a quota (the backlog
    /// quota of a topic it reaches): PUBACK or PUBREC with 0x97, which
    /// ends its flow; the connection stays.
    OverQuota(NonZeroU16, QoS),
    /// QoS 0: nothing.
    Nothing,
}

impl Reply {
    /// What a v5 client is told instead, when the store this reply
    /// waited for was refused for a quota.
    pub(crate) fn over_quota(self) -> Option<Reply> {
        match self {
            Reply::PubAck(id) => Some(Reply::OverQuota(id, QoS::AtLeastOnce)),
            Reply::PubRec(id) => Some(Reply::OverQuota(id, QoS::ExactlyOnce)),
            _ => None,
        }
    }
}

/// What becomes of a client's PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Route and store it under `topic`; once it is durable, `ack` (see
    /// [`Publishes::stored`]).
    Store { topic: String, ack: Reply },
    /// Store nothing; answer with `ack` in turn (after the stores before
    /// it): a QoS 2 resend of one stored before, or a refusal.
    Answer(Reply),
}

/// The client's side of publishing, as a machine: its PUBLISH and PUBREL
/// packets go in, with what the session knows (the role's grants, whether
/// a QoS 2 id was stored before); out come what to store and the packets
/// to answer with. It holds the topic aliases and the Receive Maximum
/// count, and awaits nothing.
#[derive(Debug)]
pub(crate) struct Publishes {
    aliases: AliasesIn,
    receiving: Receiving,
    v5: bool,
}

impl Publishes {
    /// `alias_max` and `receive_max`: what CONNACK announced.
    pub fn new(alias_max: u16, receive_max: u16, v5: bool) -> Self {
        Publishes {
            aliases: AliasesIn::new(alias_max),
            receiving: Receiving::new(receive_max, v5),
            v5,
        }
    }

    /// A PUBLISH: its alias resolved and topic checked, counted against
    /// Receive Maximum, authorised, and a QoS 2 resend told apart
    /// (`stored_before`). An error ends the connection.
    pub fn publish(
        &mut self,
        p: &mut Publish,
        grants: Grants,
        stored_before: impl FnOnce(NonZeroU16) -> bool,
    ) -> Result<Admission, MqttError> {
        self.aliases.resolve(p)?;
        let topic = p.topic.to_string();
        crate::topic::check_name(&topic)?;
        if p.qos != QoS::AtMostOnce {
            self.receiving.start()?;
        }
        let id = p.packet_id.filter(|_| p.qos != QoS::AtMostOnce);
        if let Err(e) = grants.check(AuthAction::Produce, || topic.clone()) {
            // 3.1.1 has no way to say no but closing (MQTT-3.3.5-2); v5
            // answers 0x87, and a QoS 0 publish is dropped.
            if !self.v5 {
                return Err(e.into());
            }
            return Ok(Admission::Answer(
                id.map_or(Reply::Nothing, |id| Reply::Refused(id, p.qos)),
            ));
        }
        Ok(match (p.qos, id) {
            (QoS::ExactlyOnce, Some(id)) if stored_before(id) => {
                Admission::Answer(Reply::PubRec(id))
            }
            (QoS::ExactlyOnce, Some(id)) => Admission::Store {
                topic,
                ack: Reply::PubRec(id),
            },
            (QoS::AtLeastOnce, Some(id)) => Admission::Store {
                topic,
                ack: Reply::PubAck(id),
            },
            _ => Admission::Store {
                topic,
                ack: Reply::Nothing,
            },
        })
    }

    /// A store (or answer) of [`Publishes::publish`] is done: the packet
    /// that acknowledges it. A QoS 2 publish counts against Receive
    /// Maximum until PUBREL; the others stop counting here.
    pub fn stored(&mut self, ack: Reply) -> Option<Packet> {
        if !matches!(ack, Reply::PubRec(_)) && ack != Reply::Nothing {
            self.receiving.finish();
        }
        let refused = |id| v5::PublishAck {
            reason_code: v5::PublishAckReason::NotAuthorized,
            ..codec::ack(id)
        };
        match ack {
            Reply::PubAck(id) => Some(Packet::PublishAck(codec::ack(id))),
            Reply::PubRec(id) => Some(Packet::PublishReceived(codec::ack(id))),
            Reply::Refused(id, QoS::ExactlyOnce) => Some(Packet::PublishReceived(refused(id))),
            Reply::Refused(id, _) => Some(Packet::PublishAck(refused(id))),
            Reply::OverQuota(id, qos) => {
                let a = v5::PublishAck {
                    reason_code: v5::PublishAckReason::QuotaExceeded,
                    ..codec::ack(id)
                };
                Some(if qos == QoS::ExactlyOnce {
                    Packet::PublishReceived(a)
                } else {
                    Packet::PublishAck(a)
                })
            }
            Reply::Nothing => None,
        }
    }

    /// A PUBREL, for an id the session had remembered (`known`) or not:
    /// the PUBCOMP to send (0x92 for an unknown id).
    pub fn released(&mut self, id: NonZeroU16, known: bool) -> Packet {
        let mut comp = codec::ack2(id);
        if known {
            self.receiving.finish();
        } else {
            comp.reason_code = v5::PublishAck2Reason::PacketIdNotFound;
        }
        Packet::PublishComplete(comp)
    }

    /// Whether to read more of the client, with `stored` stores pending.
    pub fn has_room(&self, stored: usize) -> bool {
        self.receiving.has_room(stored)
    }
}

/// The PUBREL answering the client's PUBREC of an outbound QoS 2
/// delivery (0x92 for an id not in flight).
pub(crate) fn release(outbound: &mut Outbound, id: NonZeroU16) -> Packet {
    let mut rel = codec::ack2(id);
    if !outbound.received(id.get()) {
        rel.reason_code = v5::PublishAck2Reason::PacketIdNotFound;
    }
    Packet::PublishRelease(rel)
}
