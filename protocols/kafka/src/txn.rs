//! Producer ids, and the transaction coordinator.
//!
//! Ids come from a cluster-wide sequence in blocks, so that every broker
//! hands out unique ids without a round trip per producer.
//!
//! A transactional id's coordinator is the owner of the bundle of
//! `__transaction_state-partition-N` in the namespace, as for groups. Its
//! state (producer id, epoch, phase, partitions and groups) is one record
//! in the broker's state store, changed with compare-and-set, so that a
//! coordinator taking over after a failure finishes what the old one
//! began. Ending a transaction writes a marker into every partition it
//! touched, through the broker's publish path (which forwards to each
//! partition's owner); the partitions index markers themselves, which
//! gives read-committed fetches their last stable offset and aborted
//! lists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use magnetar_broker::format::{encode_control, ControlType};
use magnetar_broker::{Broker, BrokerError, BrokerInfo, StateStore};
use magnetar_tenancy::names::encode_segment;
use magnetar_tenancy::{NamespaceName, TopicName as Name};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::coordinator::{self, Kind};
use crate::error::code_of;
use crate::handler::{str, Caller, Ctx};
use magnetar_broker::format::now_ms;

/// Kafka's `transaction.max.timeout.ms` default: a producer asking for a
/// longer transaction timeout is refused, so that an abandoned transaction
/// cannot hold back read_committed readers for longer.
pub(crate) const TRANSACTION_MAX_TIMEOUT_MS: i32 = 900_000;

const ID_SEQUENCE: &str = "kafka-producer-ids";
const ID_BLOCK: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl Phase {
    /// The state as Kafka's DescribeTransactions and ListTransactions
    /// name it.
    fn kafka_name(self) -> &'static str {
        match self {
            Phase::Empty => "Empty",
            Phase::Ongoing => "Ongoing",
            Phase::PrepareCommit => "PrepareCommit",
            Phase::PrepareAbort => "PrepareAbort",
            Phase::CompleteCommit => "CompleteCommit",
            Phase::CompleteAbort => "CompleteAbort",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TxnRecord {
    producer_id: i64,
    epoch: i16,
    phase: Phase,
    /// Full names of the partition topics written in this transaction.
    partitions: BTreeSet<String>,
    groups: BTreeSet<String>,
    timeout_ms: i32,
    started_ms: i64,
}

pub(crate) struct TxnCoordinator {
    broker: Broker,
    store: StateStore,
    /// The unused rest of this broker's block: next id, end (exclusive).
    ids: Mutex<(u64, u64)>,
    /// One lock per transactional id, so that its requests apply in turn.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Transactions opened here, by namespace and id, with their
    /// deadlines: the expiry sweep aborts those still open past it.
    open: std::sync::Mutex<HashMap<(NamespaceName, String), i64>>,
}

impl TxnCoordinator {
    pub fn new(broker: Broker) -> Self {
        TxnCoordinator {
            store: broker.state("kafka-txns"),
            broker,
            ids: Mutex::new((0, 0)),
            locks: std::sync::Mutex::new(HashMap::new()),
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn open_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NamespaceName, String), i64>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Aborts transactions open longer than their timeout, as Kafka does,
    /// under a new epoch that fences the producer which let it lapse.
    pub async fn expire(&self, ctx: &Ctx) {
        let now = now_ms();
        let due: Vec<(NamespaceName, String)> = self
            .open_lock()
            .iter()
            .filter(|(_, &deadline)| deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (ns, id) in due {
            self.open_lock().remove(&(ns.clone(), id.clone()));
            if let Err(code) = self.abort_expired(ctx, &ns, &id).await {
                tracing::warn!(txn = %id, "aborting an expired transaction failed ({code})");
            }
        }
    }

    async fn abort_expired(&self, ctx: &Ctx, ns: &NamespaceName, id: &str) -> Result<(), i16> {
        let (_held, record) = self.begin(ns, id).await?;
        let Some((mut r, version)) = record else {
            return Ok(());
        };
        let expired = r.started_ms + i64::from(r.timeout_ms) <= now_ms();
        if r.phase != Phase::Ongoing || !expired {
            return Ok(());
        }
        if r.epoch >= i16::MAX - 1 {
            r.producer_id = self.next_producer_id().await?;
            r.epoch = -1;
        }
        r.epoch += 1;
        r.phase = Phase::PrepareAbort;
        let version = self.save(ns, id, &r, version).await?;
        self.complete(ctx, ns, id, r, version).await.map(drop)
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

    pub async fn coordinator_of(&self, ns: &NamespaceName, id: &str) -> Result<BrokerInfo, i16> {
        coordinator::owner(&self.broker, ns, Kind::Transaction, id).await
    }

    /// Kafka's DescribeTransactions: the state of each id this broker
    /// coordinates.
    pub async fn describe(
        &self,
        c: &Caller,
        r: DescribeTransactionsRequest,
    ) -> DescribeTransactionsResponse {
        use kafka_protocol::messages::describe_transactions_response::{
            TopicData, TransactionState,
        };
        let mut out = DescribeTransactionsResponse::default();
        for id in r.transactional_ids {
            let mut st = TransactionState::default()
                .with_transactional_id(id.clone())
                .with_transaction_state(str(""))
                .with_transaction_start_time_ms(-1)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
            let found = async {
                if !c.grants.produce {
                    return Err(E::TransactionalIdAuthorizationFailed.code());
                }
                self.check_coordinator(&c.ns, &id.0).await?;
                self.load(&c.ns, &id.0)
                    .await?
                    .ok_or(E::TransactionalIdNotFound.code())
            }
            .await;
            match found {
                Err(code) => st.error_code = code,
                Ok((rec, _)) => {
                    st.transaction_state = str(rec.phase.kafka_name());
                    st.transaction_timeout_ms = rec.timeout_ms;
                    if rec.phase == Phase::Ongoing {
                        st.transaction_start_time_ms = rec.started_ms;
                    }
                    st.producer_id = ProducerId(rec.producer_id);
                    st.producer_epoch = rec.epoch;
                    let mut topics: BTreeMap<String, Vec<i32>> = BTreeMap::new();
                    for full in &rec.partitions {
                        let Ok(t) = full.parse::<Name>() else {
                            continue;
                        };
                        let index = t.partition_index().map_or(0, |i| i as i32);
                        topics
                            .entry(t.base().local_name().to_string())
                            .or_default()
                            .push(index);
                    }
                    st.topics = topics
                        .into_iter()
                        .map(|(t, ps)| {
                            TopicData::default()
                                .with_topic(TopicName(str(t)))
                                .with_partitions(ps)
                        })
                        .collect();
                }
            }
            out.transaction_states.push(st);
        }
        out
    }

    /// Kafka's ListTransactions: the namespace's transactional ids this
    /// broker coordinates, filtered by state, producer id, duration (v1)
    /// and id pattern (v2, a Java-style regular expression).
    pub async fn list(&self, c: &Caller, r: ListTransactionsRequest) -> ListTransactionsResponse {
        use kafka_protocol::messages::list_transactions_response::TransactionState;
        let mut out = ListTransactionsResponse::default();
        const STATES: &[&str] = &[
            "Empty",
            "Ongoing",
            "PrepareCommit",
            "PrepareAbort",
            "CompleteCommit",
            "CompleteAbort",
            "Dead",
            "PrepareEpochFence",
        ];
        out.unknown_state_filters = r
            .state_filters
            .iter()
            .filter(|f| !STATES.contains(&f.as_str()))
            .cloned()
            .collect();
        if !c.grants.produce {
            return out;
        }
        let pattern = match r
            .transactional_id_pattern
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            None => None,
            Some(p) => match regex::RegexBuilder::new(&format!("^(?:{p})$"))
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => Some(re),
                Err(_) => {
                    out.error_code = E::InvalidRegularExpression.code();
                    return out;
                }
            },
        };
        let prefix = format!("{}/", c.ns);
        let records = match self.store.list(&prefix).await {
            Ok(r) => r,
            Err(e) => {
                out.error_code = code_of(&e);
                return out;
            }
        };
        let now = now_ms();
        for (key, v) in records {
            let Some(Ok(id)) = key
                .strip_prefix(&prefix)
                .map(magnetar_tenancy::names::decode_segment)
            else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<TxnRecord>(&v.value) else {
                continue;
            };
            let state = rec.phase.kafka_name();
            if !r.state_filters.is_empty() && !r.state_filters.iter().any(|f| f.as_str() == state) {
                continue;
            }
            if !r.producer_id_filters.is_empty()
                && !r.producer_id_filters.contains(&ProducerId(rec.producer_id))
            {
                continue;
            }
            if r.duration_filter >= 0
                && (rec.phase != Phase::Ongoing || now - rec.started_ms < r.duration_filter)
            {
                continue;
            }
            if pattern.as_ref().is_some_and(|re| !re.is_match(&id)) {
                continue;
            }
            if self.check_coordinator(&c.ns, &id).await.is_err() {
                continue;
            }
            out.transaction_states.push(
                TransactionState::default()
                    .with_transactional_id(TransactionalId(str(id)))
                    .with_producer_id(ProducerId(rec.producer_id))
                    .with_transaction_state(str(state)),
            );
        }
        out
    }

    async fn check_coordinator(&self, ns: &NamespaceName, id: &str) -> Result<(), i16> {
        coordinator::check_local(&self.broker, ns, Kind::Transaction, id).await
    }

    /// Checks that this broker coordinates `id`, then takes its lock and
    /// loads its record; the guard keeps the id's requests in turn.
    async fn begin(
        &self,
        ns: &NamespaceName,
        id: &str,
    ) -> Result<(OwnedMutexGuard<()>, Option<(TxnRecord, u64)>), i16> {
        self.check_coordinator(ns, id).await?;
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(Self::key(ns, id)).or_default())
        };
        let held = lock.lock_owned().await;
        let record = self.load(ns, id).await?;
        Ok((held, record))
    }

    fn key(ns: &NamespaceName, id: &str) -> String {
        format!("{ns}/{}", encode_segment(id))
    }

    async fn load(&self, ns: &NamespaceName, id: &str) -> Result<Option<(TxnRecord, u64)>, i16> {
        match self.store.get(&Self::key(ns, id)).await {
            Ok(Some(v)) => serde_json::from_slice(&v.value)
                .map(|r| Some((r, v.version)))
                .map_err(|_| E::UnknownServerError.code()),
            Ok(None) => Ok(None),
            Err(e) => Err(code_of(&e)),
        }
    }

    async fn save(
        &self,
        ns: &NamespaceName,
        id: &str,
        r: &TxnRecord,
        version: u64,
    ) -> Result<u64, i16> {
        let bytes = serde_json::to_vec(r).map_err(|_| E::UnknownServerError.code())?;
        self.store
            .compare_and_put(&Self::key(ns, id), version, bytes)
            .await
            .map_err(|e| match e {
                // Another coordinator moved the record on: this one is stale.
                BrokerError::PreconditionFailed(_) => E::NotCoordinator.code(),
                e => code_of(&e),
            })
    }

    /// Writes the markers of a prepared transaction, settles its group
    /// offsets, and records it complete.
    async fn complete(
        &self,
        ctx: &Ctx,
        ns: &NamespaceName,
        id: &str,
        mut r: TxnRecord,
        version: u64,
    ) -> Result<(TxnRecord, u64), i16> {
        let commit = match r.phase {
            Phase::PrepareCommit => true,
            Phase::PrepareAbort => false,
            _ => return Ok((r, version)),
        };
        let kind = if commit {
            ControlType::Commit
        } else {
            ControlType::Abort
        };
        for p in &r.partitions {
            let name: Name = p.parse().map_err(|_| E::UnknownServerError.code())?;
            let marker = encode_control(r.producer_id, r.epoch, kind).map_err(|e| code_of(&e))?;
            // Markers are retried by the client's EndTxn until they land.
            self.broker
                .publish_batch(&name, marker)
                .await
                .map_err(|e| code_of(&e))?;
        }
        for g in &r.groups {
            ctx.groups
                .settle_txn_offsets(ns, g, r.producer_id, commit)
                .await?;
        }
        r.phase = if commit {
            Phase::CompleteCommit
        } else {
            Phase::CompleteAbort
        };
        r.partitions.clear();
        r.groups.clear();
        let version = self.save(ns, id, &r, version).await?;
        Ok((r, version))
    }

    pub async fn init_producer_id(
        &self,
        ctx: &Ctx,
        c: &Caller,
        r: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        let mut out = InitProducerIdResponse::default()
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        // Kafka's Write on the transactional id, or IdempotentWrite on the
        // cluster: a consume-only role could otherwise fence a producer.
        if !c.grants.produce {
            out.error_code = if r.transactional_id.is_some() {
                E::TransactionalIdAuthorizationFailed.code()
            } else {
                E::ClusterAuthorizationFailed.code()
            };
            return out;
        }
        let Some(txn_id) = r.transactional_id.as_ref().map(|t| t.0.to_string()) else {
            match self.next_producer_id().await {
                Ok(id) => {
                    out.producer_id = ProducerId(id);
                    out.producer_epoch = 0;
                }
                Err(code) => out.error_code = code,
            }
            return out;
        };
        match self
            .init_transactional(ctx, &c.ns, &txn_id, r.transaction_timeout_ms)
            .await
        {
            Ok((pid, epoch)) => {
                out.producer_id = ProducerId(pid);
                out.producer_epoch = epoch;
            }
            Err(code) => out.error_code = code,
        }
        out
    }

    async fn init_transactional(
        &self,
        ctx: &Ctx,
        ns: &NamespaceName,
        id: &str,
        timeout_ms: i32,
    ) -> Result<(i64, i16), i16> {
        if timeout_ms <= 0 || timeout_ms > TRANSACTION_MAX_TIMEOUT_MS {
            return Err(E::InvalidTransactionTimeout.code());
        }
        let (_held, record) = self.begin(ns, id).await?;
        let (mut r, mut version) = match record {
            Some(found) => found,
            None => {
                let r = TxnRecord {
                    producer_id: self.next_producer_id().await?,
                    epoch: -1,
                    phase: Phase::Empty,
                    partitions: BTreeSet::new(),
                    groups: BTreeSet::new(),
                    timeout_ms,
                    started_ms: 0,
                };
                (r, 0)
            }
        };
        // A previous instance's transaction: finish a prepared one, and
        // abort an open one under the new epoch, which fences that
        // instance.
        if matches!(r.phase, Phase::PrepareCommit | Phase::PrepareAbort) {
            (r, version) = self.complete(ctx, ns, id, r, version).await?;
        }
        if r.epoch >= i16::MAX - 1 {
            r.producer_id = self.next_producer_id().await?;
            r.epoch = -1;
        }
        r.epoch += 1;
        r.timeout_ms = timeout_ms;
        if r.phase == Phase::Ongoing {
            r.phase = Phase::PrepareAbort;
            version = self.save(ns, id, &r, version).await?;
            (r, version) = self.complete(ctx, ns, id, r, version).await?;
        }
        r.phase = Phase::Empty;
        self.save(ns, id, &r, version).await?;
        Ok((r.producer_id, r.epoch))
    }

    /// Checks a request's producer against the stored transaction.
    fn check_producer(r: &TxnRecord, pid: i64, epoch: i16) -> Result<(), i16> {
        if r.producer_id != pid {
            return Err(E::InvalidProducerIdMapping.code());
        }
        if r.epoch != epoch {
            return Err(E::InvalidProducerEpoch.code());
        }
        if matches!(r.phase, Phase::PrepareCommit | Phase::PrepareAbort) {
            return Err(E::ConcurrentTransactions.code());
        }
        Ok(())
    }

    /// Adds partitions or groups to the open transaction.
    async fn add(
        &self,
        ns: &NamespaceName,
        id: &str,
        pid: i64,
        epoch: i16,
        partitions: &[String],
        group: Option<&str>,
    ) -> Result<(), i16> {
        let (_held, record) = self.begin(ns, id).await?;
        let (mut r, version) = record.ok_or(E::InvalidProducerIdMapping.code())?;
        Self::check_producer(&r, pid, epoch)?;
        if r.phase != Phase::Ongoing {
            r.phase = Phase::Ongoing;
            r.started_ms = now_ms();
            r.partitions.clear();
            r.groups.clear();
        }
        r.partitions.extend(partitions.iter().cloned());
        r.groups.extend(group.map(String::from));
        self.save(ns, id, &r, version).await?;
        self.open_lock().insert(
            (ns.clone(), id.to_string()),
            r.started_ms + i64::from(r.timeout_ms),
        );
        Ok(())
    }

    /// Whether a transactional batch may be appended: its producer holds
    /// the transactional id at that epoch, with a transaction open that
    /// includes the partition. Otherwise a stray batch would open a
    /// transaction nobody ever ends, and the partition's last stable
    /// offset would stop there for good.
    pub async fn check_produce(
        &self,
        ns: &NamespaceName,
        id: &str,
        pid: i64,
        epoch: i16,
        partition: &str,
    ) -> Result<(), i16> {
        let (r, _) = self
            .load(ns, id)
            .await?
            .ok_or(E::InvalidProducerIdMapping.code())?;
        Self::check_producer(&r, pid, epoch)?;
        if r.phase != Phase::Ongoing || !r.partitions.contains(partition) {
            return Err(E::InvalidTxnState.code());
        }
        Ok(())
    }

    pub async fn add_partitions(
        &self,
        ctx: &Ctx,
        c: &Caller,
        r: AddPartitionsToTxnRequest,
    ) -> AddPartitionsToTxnResponse {
        let id = r.v3_and_below_transactional_id.0.to_string();
        // Resolve every partition first; one unknown fails them all.
        let mut names = Vec::new();
        let mut results = Vec::new();
        let mut failed = false;
        for t in &r.v3_and_below_topics {
            let mut per = Vec::new();
            for &p in &t.partitions {
                let code = match ctx.partition_name(&c.ns, &t.name.0, p).await {
                    Ok(n) => {
                        names.push(n.to_string());
                        0
                    }
                    Err(code) => {
                        failed = true;
                        code
                    }
                };
                per.push((p, code));
            }
            results.push((t.name.clone(), per));
        }
        let outcome = if !c.grants.produce {
            Err(E::TransactionalIdAuthorizationFailed.code())
        } else if failed {
            Err(E::OperationNotAttempted.code())
        } else {
            self.add(
                &c.ns,
                &id,
                r.v3_and_below_producer_id.0,
                r.v3_and_below_producer_epoch,
                &names,
                None,
            )
            .await
        };
        let results = results
            .into_iter()
            .map(|(name, per)| {
                AddPartitionsToTxnTopicResult::default()
                    .with_name(name)
                    .with_results_by_partition(
                        per.into_iter()
                            .map(|(p, code)| {
                                let code = match (&outcome, code) {
                                    (_, c) if c != 0 => c,
                                    (Err(c), _) => *c,
                                    (Ok(()), _) => 0,
                                };
                                AddPartitionsToTxnPartitionResult::default()
                                    .with_partition_index(p)
                                    .with_partition_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect();
        AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results)
    }

    pub async fn add_offsets(
        &self,
        c: &Caller,
        r: AddOffsetsToTxnRequest,
    ) -> AddOffsetsToTxnResponse {
        if !c.grants.produce {
            return AddOffsetsToTxnResponse::default()
                .with_error_code(E::TransactionalIdAuthorizationFailed.code());
        }
        let code = self
            .add(
                &c.ns,
                &r.transactional_id.0,
                r.producer_id.0,
                r.producer_epoch,
                &[],
                Some(&r.group_id.0),
            )
            .await
            .err()
            .unwrap_or(0);
        AddOffsetsToTxnResponse::default().with_error_code(code)
    }

    pub async fn end(&self, ctx: &Ctx, c: &Caller, r: EndTxnRequest) -> EndTxnResponse {
        if !c.grants.produce {
            return EndTxnResponse::default()
                .with_error_code(E::TransactionalIdAuthorizationFailed.code());
        }
        let code = self
            .end_txn(
                ctx,
                &c.ns,
                &r.transactional_id.0,
                r.producer_id.0,
                r.producer_epoch,
                r.committed,
            )
            .await
            .err()
            .unwrap_or(0);
        EndTxnResponse::default().with_error_code(code)
    }

    async fn end_txn(
        &self,
        ctx: &Ctx,
        ns: &NamespaceName,
        id: &str,
        pid: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(), i16> {
        let (_held, record) = self.begin(ns, id).await?;
        let (mut r, version) = record.ok_or(E::InvalidProducerIdMapping.code())?;
        if r.producer_id != pid {
            return Err(E::InvalidProducerIdMapping.code());
        }
        if r.epoch != epoch {
            return Err(E::InvalidProducerEpoch.code());
        }
        let version = match (r.phase, commit) {
            (Phase::Ongoing, _) => {
                r.phase = if commit {
                    Phase::PrepareCommit
                } else {
                    Phase::PrepareAbort
                };
                self.save(ns, id, &r, version).await?
            }
            // A retry of an end that is under way or done.
            (Phase::PrepareCommit, true) | (Phase::PrepareAbort, false) => version,
            (Phase::CompleteCommit, true) | (Phase::CompleteAbort, false) => return Ok(()),
            // Ending a transaction that wrote nothing.
            (Phase::Empty, _) => return Ok(()),
            _ => return Err(E::InvalidTxnState.code()),
        };
        self.complete(ctx, ns, id, r, version).await.map(drop)
    }
}
