//! Where the coordinator of a consumer group or a transactional id runs:
//! the owner of the bundle of a synthetic topic name in the namespace
//! (`__consumer_offsets-partition-N`, `__transaction_state-partition-N`,
//! N a hash of the key), so that coordinators move with bundle ownership
//! when a broker dies, like topics do.

use kafka_protocol::ResponseError as E;
use magnetar_broker::{Broker, BrokerInfo};
use magnetar_tenancy::{NamespaceName, TopicDomain};
use tracing::debug;

const SLOTS: u32 = 50;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Group,
    Transaction,
}

impl Kind {
    fn topic_prefix(self) -> &'static str {
        match self {
            Kind::Group => "__consumer_offsets",
            Kind::Transaction => "__transaction_state",
        }
    }

    fn invalid_key(self) -> i16 {
        match self {
            Kind::Group => E::InvalidGroupId.code(),
            Kind::Transaction => E::InvalidRequest.code(),
        }
    }
}

/// The broker coordinating `key`, taking its bundle if nobody holds it.
pub(crate) async fn owner(
    broker: &Broker,
    ns: &NamespaceName,
    kind: Kind,
    key: &str,
) -> Result<BrokerInfo, i16> {
    let slot = crc32c::crc32c(key.as_bytes()) % SLOTS;
    let name = ns
        .topic(
            TopicDomain::Persistent,
            &format!("{}-partition-{slot}", kind.topic_prefix()),
        )
        .map_err(|_| kind.invalid_key())?;
    broker.lookup(&name).await.map_err(|e| {
        debug!("coordinator lookup failed: {e}");
        E::CoordinatorNotAvailable.code()
    })
}

/// NOT_COORDINATOR unless this broker coordinates `key`.
pub(crate) async fn check_local(
    broker: &Broker,
    ns: &NamespaceName,
    kind: Kind,
    key: &str,
) -> Result<(), i16> {
    if key.is_empty() {
        return Err(kind.invalid_key());
    }
    if owner(broker, ns, kind, key).await?.id == broker.info().id {
        Ok(())
    } else {
        Err(E::NotCoordinator.code())
    }
}
