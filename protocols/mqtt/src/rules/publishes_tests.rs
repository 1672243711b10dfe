//! The client's publishes through [`Publishes`], packet by packet: the
//! QoS 1 and 2 flows, refusals, resends and the Receive Maximum budget.

use std::num::NonZeroU16;

use bytes::Bytes;
use magnetar_broker::Grants;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, Packet, PublishAck2Reason, PublishAckReason};

use super::inbound::{release, Admission, Publishes, Reply};
use crate::error::MqttError;
use crate::state::{Inflight, Outbound};

const NO_GRANTS: Grants = Grants {
    produce: false,
    consume: false,
    admin: false,
};

fn id(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

fn publish(topic: &str, qos: QoS, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        retain: false,
        qos,
        topic: topic.into(),
        packet_id: NonZeroU16::new(packet_id),
        payload: Bytes::from_static(b"21.5"),
        properties: None,
    }
}

fn never(_: NonZeroU16) -> bool {
    false
}

fn store(topic: &str, ack: Reply) -> Admission {
    Admission::Store {
        topic: topic.into(),
        ack,
    }
}

fn pubrec_reason(p: Option<Packet>) -> PublishAckReason {
    match p {
        Some(Packet::PublishReceived(a)) => a.reason_code,
        other => panic!("not a PUBREC: {other:?}"),
    }
}

fn pubcomp_reason(p: Packet) -> PublishAck2Reason {
    match p {
        Packet::PublishComplete(a) => a.reason_code,
        other => panic!("not a PUBCOMP: {other:?}"),
    }
}

#[test]
fn qos0_is_stored_and_answered_with_nothing() {
    let mut c = Publishes::new(10, 10, true);
    let mut p = publish("s/1", QoS::AtMostOnce, 0);
    assert_eq!(
        c.publish(&mut p, Grants::ALL, never).expect("admitted"),
        store("s/1", Reply::Nothing)
    );
    assert_eq!(c.stored(Reply::Nothing), None);
}

#[test]
fn qos1_is_acknowledged_once_stored() {
    let mut c = Publishes::new(10, 10, true);
    let mut p = publish("s/1", QoS::AtLeastOnce, 7);
    let Admission::Store { ack, .. } = c.publish(&mut p, Grants::ALL, never).expect("admitted")
    else {
        panic!("not stored");
    };
    assert_eq!(ack, Reply::PubAck(id(7)));
    match c.stored(ack) {
        Some(Packet::PublishAck(a)) => {
            assert_eq!(
                (a.packet_id, a.reason_code),
                (id(7), PublishAckReason::Success)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn qos2_flows_publish_pubrec_pubrel_pubcomp() {
    let mut c = Publishes::new(10, 1, true);
    let mut p = publish("s/1", QoS::ExactlyOnce, 3);
    let admitted = c.publish(&mut p, Grants::ALL, never).expect("admitted");
    assert_eq!(admitted, store("s/1", Reply::PubRec(id(3))));
    assert_eq!(
        pubrec_reason(c.stored(Reply::PubRec(id(3)))),
        PublishAckReason::Success
    );
    // Until PUBREL, the publish counts against Receive Maximum (1 here).
    let mut next = publish("s/1", QoS::ExactlyOnce, 4);
    assert!(matches!(
        c.publish(&mut next, Grants::ALL, never),
        Err(MqttError::ReceiveMaximum)
    ));
    let mut c = Publishes::new(10, 1, true);
    c.publish(&mut p, Grants::ALL, never).expect("admitted");
    c.stored(Reply::PubRec(id(3)));
    assert_eq!(
        pubcomp_reason(c.released(id(3), true)),
        PublishAck2Reason::Success
    );
    c.publish(&mut next, Grants::ALL, never)
        .expect("room again after PUBCOMP");
}

#[test]
fn a_qos2_resend_of_a_stored_publish_is_answered_without_storing_again() {
    let mut c = Publishes::new(10, 10, true);
    let mut p = publish("s/1", QoS::ExactlyOnce, 3);
    p.dup = true;
    let admitted = c
        .publish(&mut p, Grants::ALL, |i| i == id(3))
        .expect("admitted");
    assert_eq!(admitted, Admission::Answer(Reply::PubRec(id(3))));
}

#[test]
fn a_pubrel_for_an_unknown_id_is_answered_with_packet_id_not_found() {
    let mut c = Publishes::new(10, 10, true);
    assert_eq!(
        pubcomp_reason(c.released(id(9), false)),
        PublishAck2Reason::PacketIdNotFound
    );
}

#[test]
fn a_v5_publish_without_the_grant_is_refused_with_0x87_and_ends_its_flow() {
    let mut c = Publishes::new(10, 1, true);
    let mut p = publish("s/1", QoS::ExactlyOnce, 5);
    let admitted = c.publish(&mut p, NO_GRANTS, never).expect("answered");
    assert_eq!(
        admitted,
        Admission::Answer(Reply::Refused(id(5), QoS::ExactlyOnce))
    );
    assert_eq!(
        pubrec_reason(c.stored(Reply::Refused(id(5), QoS::ExactlyOnce))),
        PublishAckReason::NotAuthorized
    );
    // The refusal ended the flow: no PUBREL is due, the budget is back.
    let mut q1 = publish("s/1", QoS::AtLeastOnce, 6);
    let admitted = c.publish(&mut q1, NO_GRANTS, never).expect("answered");
    assert_eq!(
        admitted,
        Admission::Answer(Reply::Refused(id(6), QoS::AtLeastOnce))
    );
    match c.stored(Reply::Refused(id(6), QoS::AtLeastOnce)) {
        Some(Packet::PublishAck(a)) => assert_eq!(a.reason_code, PublishAckReason::NotAuthorized),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_store_over_quota_is_answered_with_0x97_and_ends_its_flow() {
    let mut c = Publishes::new(10, 1, true);
    let mut p = publish("s/1", QoS::ExactlyOnce, 5);
    let Admission::Store { ack, .. } = c.publish(&mut p, Grants::ALL, never).expect("admitted")
    else {
        panic!("stored")
    };
    let refusal = ack.over_quota().expect("a QoS 2 publish has a refusal");
    assert_eq!(
        pubrec_reason(c.stored(refusal)),
        PublishAckReason::QuotaExceeded
    );
    // The budget of one in-flight QoS 2 publish is back.
    let mut q1 = publish("s/1", QoS::AtLeastOnce, 6);
    let Admission::Store { ack, .. } = c.publish(&mut q1, Grants::ALL, never).expect("admitted")
    else {
        panic!("stored")
    };
    match c.stored(ack.over_quota().expect("refusal")) {
        Some(Packet::PublishAck(a)) => assert_eq!(a.reason_code, PublishAckReason::QuotaExceeded),
        other => panic!("{other:?}"),
    }
    assert_eq!(Reply::Nothing.over_quota(), None);
}

#[test]
fn a_refused_qos0_publish_is_dropped_and_a_311_client_is_disconnected() {
    let mut c = Publishes::new(10, 10, true);
    let mut p = publish("s/1", QoS::AtMostOnce, 0);
    assert_eq!(
        c.publish(&mut p, NO_GRANTS, never).expect("dropped"),
        Admission::Answer(Reply::Nothing)
    );
    let mut c = Publishes::new(10, 10, false);
    let mut p = publish("s/1", QoS::AtLeastOnce, 1);
    assert!(matches!(
        c.publish(&mut p, NO_GRANTS, never),
        Err(MqttError::Broker(_))
    ));
}

#[test]
fn a_311_client_over_receive_maximum_is_slowed_not_refused() {
    let mut c = Publishes::new(0, 1, false);
    for n in 1..=3 {
        let mut p = publish("s/1", QoS::AtLeastOnce, n);
        c.publish(&mut p, Grants::ALL, never).expect("admitted");
    }
    assert!(c.has_room(0));
    assert!(!c.has_room(1), "reading waits while a store is pending");
}

#[test]
fn an_alias_names_the_topic_and_a_bad_name_ends_the_connection() {
    let mut c = Publishes::new(10, 10, true);
    let mut set = publish("plant/1/temp", QoS::AtLeastOnce, 1);
    set.properties = Some(v5::PublishProperties {
        topic_alias: NonZeroU16::new(2),
        ..Default::default()
    });
    c.publish(&mut set, Grants::ALL, never).expect("admitted");
    let mut by_alias = publish("", QoS::AtLeastOnce, 2);
    by_alias.properties = Some(v5::PublishProperties {
        topic_alias: NonZeroU16::new(2),
        ..Default::default()
    });
    assert_eq!(
        c.publish(&mut by_alias, Grants::ALL, never)
            .expect("admitted"),
        store("plant/1/temp", Reply::PubAck(id(2)))
    );
    let mut wild = publish("plant/+/temp", QoS::AtLeastOnce, 3);
    assert!(matches!(
        c.publish(&mut wild, Grants::ALL, never),
        Err(MqttError::TopicName(_))
    ));
}

#[test]
fn pubrec_of_an_outbound_qos2_delivery_is_released_and_an_unknown_one_is_not_found() {
    let mut out = Outbound::new(10);
    let sent = out
        .start(Inflight {
            queue: "q".into(),
            offset: 0,
            qos: 2,
        })
        .expect("room");
    let released = |p: Packet| match p {
        Packet::PublishRelease(a) => a.reason_code,
        other => panic!("not a PUBREL: {other:?}"),
    };
    assert_eq!(
        released(release(&mut out, id(sent))),
        PublishAck2Reason::Success
    );
    assert_eq!(
        released(release(&mut out, id(sent + 1))),
        PublishAck2Reason::PacketIdNotFound
    );
    // A QoS 1 delivery takes no PUBREC.
    let q1 = out
        .start(Inflight {
            queue: "q".into(),
            offset: 1,
            qos: 1,
        })
        .expect("room");
    assert_eq!(
        released(release(&mut out, id(q1))),
        PublishAck2Reason::PacketIdNotFound
    );
}
