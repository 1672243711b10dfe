//! Producer ids for idempotent producers.
//!
//! Ids come from a cluster-wide sequence in blocks, so that every broker
//! hands out unique ids without a round trip per producer.

use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError as E;
use magnetar_broker::{Broker, BrokerInfo};
use magnetar_tenancy::NamespaceName;
use tokio::sync::Mutex;

use crate::error::code_of;
use crate::handler::Caller;

const ID_SEQUENCE: &str = "kafka-producer-ids";
const ID_BLOCK: u64 = 1000;

pub(crate) struct TxnCoordinator {
    broker: Broker,
    /// The unused rest of this broker's block: next id, end (exclusive).
    ids: Mutex<(u64, u64)>,
}

impl TxnCoordinator {
    pub fn new(broker: Broker) -> Self {
        TxnCoordinator {
            broker,
            ids: Mutex::new((0, 0)),
        }
    }

    async fn next_producer_id(&self) -> Result<i64, i16> {
        let mut ids = self.ids.lock().await;
        if ids.0 >= ids.1 {
            let first = self
                .broker
                .reserve_ids(ID_SEQUENCE, ID_BLOCK)
                .await
                .map_err(|e| code_of(&e))?;
            *ids = (first, first + ID_BLOCK);
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id as i64)
    }

    pub async fn init_producer_id(
        &self,
        _c: &Caller,
        r: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        let mut out = InitProducerIdResponse::default()
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        if r.transactional_id.is_some() {
            // Transactions are not served yet; ApiVersions does not list
            // their APIs.
            out.error_code = E::TransactionalIdAuthorizationFailed.code();
            return out;
        }
        match self.next_producer_id().await {
            Ok(id) => {
                out.producer_id = ProducerId(id);
                out.producer_epoch = 0;
            }
            Err(code) => out.error_code = code,
        }
        out
    }

    pub async fn coordinator_of(&self, _ns: &NamespaceName, _key: &str) -> Result<BrokerInfo, i16> {
        Err(E::CoordinatorNotAvailable.code())
    }
}
