//! Sans-I/O framing: bytes in, packets out, and back.
//!
//! The level is learnt from CONNECT (3 and 4 share the 3.1.1 codec, 5 has
//! its own). Sessions speak one packet model, MQTT 5's, which is a
//! superset: 3.1/3.1.1 packets are lifted to it on the way in and lowered
//! on the way out, where v5-only fields are dropped.

use bytes::BytesMut;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, Packet};
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::MqttError;

/// MQTT 3.1 (protocol name `MQIsdp`).
pub const LEVEL_31: u8 = 3;
pub const LEVEL_311: u8 = 4;
pub const LEVEL_5: u8 = 5;

enum Codec {
    /// Before CONNECT: only the level is looked at.
    Unknown(VersionCodec),
    V3(v3::Codec),
    V5(v5::Codec),
}

/// One connection's framing.
pub struct Framing {
    codec: Codec,
    level: u8,
    max_in: u32,
    /// The codec has taken a fixed header and waits for the body, so the
    /// buffer starts mid-packet.
    mid_packet: bool,
}

impl Framing {
    /// `max_in`: the largest packet accepted (remaining length), checked
    /// before the packet is buffered.
    pub fn new(max_in: u32) -> Self {
        Framing {
            codec: Codec::Unknown(VersionCodec),
            level: 0,
            max_in: max_in.max(1),
            mid_packet: false,
        }
    }

    /// The protocol level from CONNECT; 0 before it.
    pub fn level(&self) -> u8 {
        self.level
    }

    pub fn is_v5(&self) -> bool {
        self.level == LEVEL_5
    }

    /// The client's Maximum Packet Size (v5): larger outgoing packets are
    /// trimmed of optional properties or not sent.
    pub fn set_max_outbound(&mut self, size: u32) {
        if let Codec::V5(c) = &mut self.codec {
            c.set_max_outbound_size(size);
        }
    }

    /// A decoder of the rest of this connection's input, which goes on
    /// where this one took CONNECT: same level and limit, at a packet
    /// boundary.
    pub fn decoder(&self) -> Framing {
        let codec = match &self.codec {
            Codec::Unknown(_) => Codec::Unknown(VersionCodec),
            Codec::V3(_) => Codec::V3(v3::Codec::new(self.max_in)),
            Codec::V5(_) => Codec::V5(v5::Codec::new(self.max_in, 0)),
        };
        Framing {
            codec,
            level: self.level,
            max_in: self.max_in,
            mid_packet: false,
        }
    }

    /// The next whole packet in `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        if let Codec::Unknown(vc) = &mut self.codec {
            match vc.decode(buf)? {
                None => return Ok(None),
                Some(ProtocolVersion::MQTT3) => self.codec = Codec::V3(v3::Codec::new(self.max_in)),
                Some(ProtocolVersion::MQTT5) => {
                    self.level = LEVEL_5;
                    self.codec = Codec::V5(v5::Codec::new(self.max_in, 0));
                }
            }
        }
        // PINGREQ has no body; the codec would skip one. Only at a packet
        // boundary: mid-packet, 0xC0 is just a body byte.
        if !self.mid_packet && buf.len() >= 2 && buf[0] == 0xC0 && buf[1] != 0 {
            return Err(MqttError::Malformed("PINGREQ with a body".into()));
        }
        let before = buf.len();
        let decoded = self.decode_packet(buf);
        match &decoded {
            Ok(Some(_)) => self.mid_packet = false,
            // The codec consumes a fixed header only once it has all of it.
            Ok(None) if buf.len() < before => self.mid_packet = true,
            _ => {}
        }
        decoded
    }

    fn decode_packet(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        match &mut self.codec {
            Codec::Unknown(_) => Ok(None),
            Codec::V5(c) => Ok(c.decode(buf)?.map(|(p, _)| p)),
            Codec::V3(c) => match c.decode(buf)? {
                None => Ok(None),
                Some((p, _)) => {
                    if let v3::Packet::Connect(c) = &p {
                        if self.level != 0 {
                            return Err(MqttError::Protocol("a second CONNECT".into()));
                        }
                        self.level = c.protocol.level();
                    }
                    Ok(Some(lift(p)))
                }
            },
        }
    }

    /// Writes `p` for this connection's level. Packets that level has no
    /// form for (a server DISCONNECT before 5, AUTH) are skipped: false.
    pub fn encode(&mut self, p: Packet, out: &mut BytesMut) -> Result<bool, MqttError> {
        match &mut self.codec {
            Codec::V5(c) => {
                c.encode(p, out)?;
                Ok(true)
            }
            Codec::V3(c) => match lower(p) {
                Some(p) => {
                    c.encode(p, out)?;
                    Ok(true)
                }
                None => Ok(false),
            },
            Codec::Unknown(_) => Ok(false),
        }
    }
}

/// A 3.1/3.1.1 packet in MQTT 5's terms.
fn lift(p: v3::Packet) -> Packet {
    match p {
        v3::Packet::Connect(c) => {
            let c = *c;
            Packet::Connect(Box::new(v5::Connect {
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                // A 3.1.1 session without clean-session lasts until the
                // client comes back and cleans it.
                session_expiry_interval_secs: if c.clean_session { 0 } else { u32::MAX },
                last_will: c.last_will.map(|w| v5::LastWill {
                    qos: w.qos,
                    retain: w.retain,
                    topic: w.topic,
                    message: w.message,
                    will_delay_interval_sec: None,
                    correlation_data: None,
                    message_expiry_interval: None,
                    content_type: None,
                    user_properties: Vec::new(),
                    is_utf8_payload: None,
                    response_topic: None,
                }),
                client_id: c.client_id,
                username: c.username,
                password: c.password,
                ..Default::default()
            }))
        }
        v3::Packet::ConnectAck(a) => Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present: a.session_present,
            ..Default::default()
        })),
        v3::Packet::Publish(p) => Packet::Publish(p),
        v3::Packet::PublishAck { packet_id } => Packet::PublishAck(ack(packet_id)),
        v3::Packet::PublishReceived { packet_id } => Packet::PublishReceived(ack(packet_id)),
        v3::Packet::PublishRelease { packet_id } => Packet::PublishRelease(ack2(packet_id)),
        v3::Packet::PublishComplete { packet_id } => Packet::PublishComplete(ack2(packet_id)),
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => Packet::Subscribe(v5::Subscribe {
            packet_id,
            id: None,
            user_properties: Vec::new(),
            topic_filters: topic_filters
                .into_iter()
                .map(|(f, qos)| {
                    (
                        f,
                        v5::SubscriptionOptions {
                            qos,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: v5::RetainHandling::AtSubscribe,
                        },
                    )
                })
                .collect(),
        }),
        v3::Packet::SubscribeAck { packet_id, status } => Packet::SubscribeAck(v5::SubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: status
                .into_iter()
                .map(|s| match s {
                    v3::SubscribeReturnCode::Success(q) => granted(q),
                    v3::SubscribeReturnCode::Failure => v5::SubscribeAckReason::UnspecifiedError,
                })
                .collect(),
        }),
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => Packet::Unsubscribe(v5::Unsubscribe {
            packet_id,
            user_properties: Vec::new(),
            topic_filters,
        }),
        v3::Packet::UnsubscribeAck { packet_id } => Packet::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id,
            properties: Vec::new(),
            reason_string: None,
            status: Vec::new(),
        }),
        v3::Packet::PingRequest => Packet::PingRequest,
        v3::Packet::PingResponse => Packet::PingResponse,
        v3::Packet::Disconnect => Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            session_expiry_interval_secs: None,
            server_reference: None,
            reason_string: None,
            user_properties: Vec::new(),
        }),
    }
}

/// An MQTT 5 packet for a 3.1/3.1.1 client; None when that level has no
/// such packet.
fn lower(p: Packet) -> Option<v3::Packet> {
    Some(match p {
        Packet::ConnectAck(a) => v3::Packet::ConnectAck(v3::ConnectAck {
            session_present: a.session_present,
            return_code: connack_code(a.reason_code),
        }),
        Packet::Publish(mut p) => {
            p.properties = None;
            v3::Packet::Publish(p)
        }
        Packet::PublishAck(a) => v3::Packet::PublishAck {
            packet_id: a.packet_id,
        },
        Packet::PublishReceived(a) => v3::Packet::PublishReceived {
            packet_id: a.packet_id,
        },
        Packet::PublishRelease(a) => v3::Packet::PublishRelease {
            packet_id: a.packet_id,
        },
        Packet::PublishComplete(a) => v3::Packet::PublishComplete {
            packet_id: a.packet_id,
        },
        Packet::SubscribeAck(a) => v3::Packet::SubscribeAck {
            packet_id: a.packet_id,
            status: a
                .status
                .into_iter()
                .map(|s| match s {
                    v5::SubscribeAckReason::GrantedQos0 => {
                        v3::SubscribeReturnCode::Success(QoS::AtMostOnce)
                    }
                    v5::SubscribeAckReason::GrantedQos1 => {
                        v3::SubscribeReturnCode::Success(QoS::AtLeastOnce)
                    }
                    v5::SubscribeAckReason::GrantedQos2 => {
                        v3::SubscribeReturnCode::Success(QoS::ExactlyOnce)
                    }
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        Packet::UnsubscribeAck(a) => v3::Packet::UnsubscribeAck {
            packet_id: a.packet_id,
        },
        Packet::PingResponse => v3::Packet::PingResponse,
        Packet::PingRequest => v3::Packet::PingRequest,
        Packet::Connect(_)
        | Packet::Subscribe(_)
        | Packet::Unsubscribe(_)
        | Packet::Disconnect(_)
        | Packet::Auth(_) => return None,
    })
}

/// The 3.1.1 CONNACK return code nearest to an MQTT 5 reason.
fn connack_code(r: v5::ConnectAckReason) -> v3::ConnectAckReason {
    use v3::ConnectAckReason as C3;
    use v5::ConnectAckReason as C5;
    match r {
        C5::Success => C3::ConnectionAccepted,
        C5::UnsupportedProtocolVersion => C3::UnacceptableProtocolVersion,
        C5::ClientIdentifierNotValid => C3::IdentifierRejected,
        C5::BadUserNameOrPassword | C5::BadAuthenticationMethod => C3::BadUserNameOrPassword,
        C5::NotAuthorized | C5::Banned => C3::NotAuthorized,
        _ => C3::ServiceUnavailable,
    }
}

pub fn granted(q: QoS) -> v5::SubscribeAckReason {
    match q {
        QoS::AtMostOnce => v5::SubscribeAckReason::GrantedQos0,
        QoS::AtLeastOnce => v5::SubscribeAckReason::GrantedQos1,
        QoS::ExactlyOnce => v5::SubscribeAckReason::GrantedQos2,
    }
}

pub fn ack(packet_id: std::num::NonZeroU16) -> v5::PublishAck {
    v5::PublishAck {
        packet_id,
        reason_code: v5::PublishAckReason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

pub fn ack2(packet_id: std::num::NonZeroU16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id,
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn connect_v311(client: &str) -> BytesMut {
        let mut b = BytesMut::new();
        let body_len = 10 + 2 + client.len();
        b.put_u8(0x10);
        b.put_u8(body_len as u8);
        b.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
        b.put_u16(client.len() as u16);
        b.put_slice(client.as_bytes());
        b
    }

    #[test]
    fn a_311_connect_is_lifted_and_its_level_kept() {
        let mut f = Framing::new(1 << 20);
        let mut b = connect_v311("dev1");
        let Some(Packet::Connect(c)) = f.decode(&mut b).expect("decodes") else {
            panic!("not a connect");
        };
        assert_eq!(f.level(), LEVEL_311);
        assert!(c.clean_start);
        assert_eq!(c.session_expiry_interval_secs, 0);
        assert_eq!(&*c.client_id, "dev1");
        // A second CONNECT is a protocol error.
        let mut again = connect_v311("dev1");
        assert!(f.decode(&mut again).is_err());
    }

    #[test]
    fn partial_input_waits_and_oversized_packets_are_refused() {
        let mut f = Framing::new(1 << 20);
        let whole = connect_v311("dev2");
        let mut b = BytesMut::from(&whole[..5]);
        assert!(f.decode(&mut b).expect("partial is fine").is_none());
        b.extend_from_slice(&whole[5..]);
        assert!(f.decode(&mut b).expect("whole").is_some());
        // A PUBLISH announcing more than the limit fails before it arrives.
        let mut f = Framing::new(64);
        let mut b = connect_v311("dev3");
        f.decode(&mut b).expect("connect");
        let mut big = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x03][..]);
        assert!(f.decode(&mut big).is_err());
    }

    #[test]
    fn a_body_starting_like_a_pingreq_is_not_one() {
        let mut f = Framing::new(1 << 20);
        let mut b = connect_v311("dev5");
        f.decode(&mut b).expect("connect");
        // SUBSCRIBE, packet id 0xC001, filter "a" at QoS 1, split right
        // after its fixed header.
        let whole = [0x82u8, 6, 0xC0, 0x01, 0, 1, b'a', 1];
        let mut b = BytesMut::from(&whole[..2]);
        assert!(f.decode(&mut b).expect("header").is_none());
        b.extend_from_slice(&whole[2..]);
        assert!(matches!(
            f.decode(&mut b).expect("a subscribe"),
            Some(Packet::Subscribe(_))
        ));
        // At a boundary, a PINGREQ with a body is still refused.
        let mut b = BytesMut::from(&[0xC0u8, 1, 0][..]);
        assert!(f.decode(&mut b).is_err());
    }

    #[test]
    fn server_disconnect_is_not_sent_below_5() {
        let mut f = Framing::new(1 << 20);
        let mut b = connect_v311("dev4");
        f.decode(&mut b).expect("connect");
        let mut out = BytesMut::new();
        let sent = f
            .encode(
                Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::SessionTakenOver,
                    session_expiry_interval_secs: None,
                    server_reference: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                }),
                &mut out,
            )
            .expect("encode");
        assert!(!sent && out.is_empty());
        assert!(f.encode(Packet::PingResponse, &mut out).expect("ping"));
        assert_eq!(&out[..], &[0xd0, 0]);
    }

    proptest::proptest! {
        /// Whatever arrives, decoding ends in a packet, a wait or an error,
        /// never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(prefix in proptest::bool::ANY, data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut f = Framing::new(4096);
            let mut b = if prefix { connect_v311("fuzz") } else { BytesMut::new() };
            b.extend_from_slice(&data);
            for _ in 0..64 {
                match f.decode(&mut b) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
