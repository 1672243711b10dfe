//! Topic administration: create, delete, add partitions, and topic
//! configs.
//!
//! Kafka topic configs are kept per topic in the broker's state store, as
//! overrides of the namespace's policies; DescribeConfigs shows each
//! override, or the value the namespace policy (or Kafka's default)
//! gives.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use magnetar_broker::BrokerError;
use magnetar_tenancy::{NamespaceName, RetentionPolicies, TopicName as Name};

use crate::error::code_of;
use crate::handler::{endpoint, node_id, str, Caller, Ctx, Layout};

/// ConfigResource type of a topic.
const TOPIC_RESOURCE: i8 = 2;
const BROKER_RESOURCE: i8 = 4;

/// Config sources, as DescribeConfigs reports them.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn described(
    name: &str,
    value: String,
    source: i8,
    read_only: bool,
) -> DescribeConfigsResourceResult {
    DescribeConfigsResourceResult::default()
        .with_name(str(name))
        .with_value(Some(str(value)))
        .with_config_source(source)
        .with_read_only(read_only)
        .with_config_type(config_type(name))
}

/// Topic configs Kafka clients commonly read or set, and their defaults.
const TOPIC_CONFIGS: &[(&str, &str)] = &[
    ("cleanup.policy", "delete"),
    ("compression.type", "producer"),
    ("max.message.bytes", "1048588"),
    ("message.timestamp.type", "CreateTime"),
    ("min.insync.replicas", "1"),
    ("retention.bytes", "-1"),
    ("retention.ms", "604800000"),
    ("segment.bytes", "1073741824"),
    ("segment.ms", "604800000"),
];

/// Topic configs Kafka describes that have no effect here (placement,
/// flushing, compaction and segment files are the bookies' and the
/// managed ledger's): described with Kafka's defaults, read-only.
const FIXED_TOPIC_CONFIGS: &[(&str, &str)] = &[
    ("compression.gzip.level", "-1"),
    ("compression.lz4.level", "9"),
    ("compression.zstd.level", "3"),
    ("delete.retention.ms", "86400000"),
    ("file.delete.delay.ms", "60000"),
    ("flush.messages", "9223372036854775807"),
    ("flush.ms", "9223372036854775807"),
    ("follower.replication.throttled.replicas", ""),
    ("index.interval.bytes", "4096"),
    ("leader.replication.throttled.replicas", ""),
    ("max.compaction.lag.ms", "9223372036854775807"),
    ("message.timestamp.after.max.ms", "3600000"),
    ("message.timestamp.before.max.ms", "9223372036854775807"),
    ("min.cleanable.dirty.ratio", "0.5"),
    ("min.compaction.lag.ms", "0"),
    ("preallocate", "false"),
    ("segment.index.bytes", "10485760"),
    ("segment.jitter.ms", "0"),
    ("unclean.leader.election.enable", "false"),
];

/// DescribeConfigs' type of a config (v3+): BOOLEAN 1, STRING 2, INT 3,
/// LONG 5, DOUBLE 6, LIST 7.
fn config_type(name: &str) -> i8 {
    match name {
        "preallocate"
        | "unclean.leader.election.enable"
        | "auto.create.topics.enable"
        | "delete.topic.enable" => 1,
        "compression.type" | "message.timestamp.type" | "process.roles" => 2,
        "cleanup.policy"
        | "follower.replication.throttled.replicas"
        | "leader.replication.throttled.replicas"
        | "advertised.listeners"
        | "listeners"
        | "listener.security.protocol.map"
        | "sasl.enabled.mechanisms" => 7,
        "min.cleanable.dirty.ratio" => 6,
        "max.message.bytes"
        | "min.insync.replicas"
        | "segment.bytes"
        | "segment.index.bytes"
        | "index.interval.bytes"
        | "compression.gzip.level"
        | "compression.lz4.level"
        | "compression.zstd.level"
        | "broker.id"
        | "node.id"
        | "num.partitions"
        | "default.replication.factor"
        | "message.max.bytes"
        | "transaction.max.timeout.ms"
        | "group.initial.rebalance.delay.ms" => 3,
        _ => 5,
    }
}

fn valid_value(name: &str, value: &str) -> bool {
    match name {
        "cleanup.policy" => value
            .split(',')
            .all(|p| matches!(p.trim(), "delete" | "compact")),
        "compression.type" => matches!(
            value,
            "producer" | "uncompressed" | "gzip" | "snappy" | "lz4" | "zstd"
        ),
        "message.timestamp.type" => matches!(value, "CreateTime" | "LogAppendTime"),
        _ => value.parse::<i64>().is_ok(),
    }
}

/// Topic configs whose value is a comma-separated list, which
/// IncrementalAlterConfigs may append to and subtract from.
const LIST_CONFIGS: &[&str] = &["cleanup.policy"];

/// Kafka's default of a topic config.
fn default_of(name: &str) -> &'static str {
    TOPIC_CONFIGS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, d)| d)
}

/// One config change, as AlterConfigs and IncrementalAlterConfigs (SET,
/// DELETE, APPEND, SUBTRACT) ask for it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Set(String),
    Delete,
    Append(String),
    Subtract(String),
}

impl Change {
    fn value(&self) -> Option<&str> {
        match self {
            Change::Set(v) | Change::Append(v) | Change::Subtract(v) => Some(v),
            Change::Delete => None,
        }
    }

    fn is_list_op(&self) -> bool {
        matches!(self, Change::Append(_) | Change::Subtract(_))
    }
}

type Configs = BTreeMap<String, String>;

/// The topic configs produce applies, cached for [`CONFIG_TTL`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProduceConfigs {
    pub codec: Option<u16>,
    pub max_message_bytes: usize,
}

/// How long a topic's codec setting is trusted; another broker's change
/// is seen within this.
const CONFIG_TTL: Duration = Duration::from_secs(5);

impl Ctx {
    fn configs_key(t: &Name) -> String {
        t.path()
    }

    pub(crate) async fn topic_overrides(&self, t: &Name) -> Result<(Configs, u64), i16> {
        let store = self.broker.state("kafka-topic-configs");
        match store.get(&Self::configs_key(t)).await {
            Ok(Some(v)) => Ok((
                serde_json::from_slice(&v.value).unwrap_or_default(),
                v.version,
            )),
            Ok(None) => Ok((Configs::new(), 0)),
            Err(e) => Err(code_of(&e)),
        }
    }

    /// What produce applies to `t`: the codec its batches are stored in
    /// (when `compression.type` names one) and its largest batch
    /// (`max.message.bytes`, or the listener's `message.max.bytes`).
    pub(crate) async fn produce_configs(&self, t: &Name) -> ProduceConfigs {
        if let Some((c, at)) = self.codecs_lock().get(t).copied() {
            if at.elapsed() < CONFIG_TTL {
                return c;
            }
        }
        let overrides = self.topic_overrides(t).await.map(|(c, _)| c).ok();
        let get = |name: &str| overrides.as_ref()?.get(name).map(String::as_str);
        let configs = ProduceConfigs {
            codec: match get("compression.type") {
                Some("uncompressed") => Some(0),
                Some("gzip") => Some(1),
                Some("snappy") => Some(2),
                Some("lz4") => Some(3),
                Some("zstd") => Some(4),
                _ => None,
            },
            max_message_bytes: get("max.message.bytes")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(self.cfg.message_max_bytes),
        };
        self.codecs_lock()
            .insert(t.clone(), (configs, Instant::now()));
        configs
    }

    fn codecs_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Name, (ProduceConfigs, Instant)>> {
        self.codecs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lays `retention.ms` and `retention.bytes` onto the topic's own
    /// retention policy, so that retention applies them; with neither set
    /// the namespace's policy applies again.
    async fn apply_retention_configs(&self, t: &Name, configs: &Configs) -> Result<(), i16> {
        let ms = configs
            .get("retention.ms")
            .and_then(|v| v.parse::<i64>().ok());
        let bytes = configs
            .get("retention.bytes")
            .and_then(|v| v.parse::<i64>().ok());
        let retention = (ms.is_some() || bytes.is_some()).then(|| RetentionPolicies {
            // Kafka's defaults for the one not set: a week, unbounded.
            retention_time_in_minutes: match ms.unwrap_or(604_800_000) {
                v if v < 0 => -1,
                v => v.saturating_add(59_999) / 60_000,
            },
            retention_size_in_mb: match bytes.unwrap_or(-1) {
                v if v < 0 => -1,
                v => v.saturating_add((1 << 20) - 1) >> 20,
            },
        });
        // Other topic policies (a route, replication) are kept, whoever
        // changes them at the same time.
        self.broker
            .modify_topic_policies(t, |p| p.retention_policies = retention)
            .await
            .map_err(|e| code_of(&e))
    }

    /// Stores a topic's overrides if they are still at `version`;
    /// `Ok(false)` when another change came first.
    async fn store_overrides(
        &self,
        t: &Name,
        configs: &Configs,
        version: u64,
    ) -> Result<bool, i16> {
        self.codecs_lock().remove(t);
        let store = self.broker.state("kafka-topic-configs");
        let bytes = serde_json::to_vec(configs).map_err(|_| E::UnknownServerError.code())?;
        match store
            .compare_and_put(&Self::configs_key(t), version, bytes)
            .await
        {
            Ok(_) => {}
            Err(BrokerError::PreconditionFailed(_)) => return Ok(false),
            Err(e) => return Err(code_of(&e)),
        }
        self.apply_retention_configs(t, configs).await?;
        Ok(true)
    }

    fn check_configs<'a>(
        &self,
        configs: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<(), (i16, String)> {
        for (name, value) in configs {
            if !TOPIC_CONFIGS.iter().any(|(n, _)| *n == name) {
                return Err((
                    E::InvalidConfig.code(),
                    format!("unknown topic config {name}"),
                ));
            }
            if let Some(v) = value {
                if !valid_value(name, v) {
                    return Err((
                        E::InvalidConfig.code(),
                        format!("invalid value {v:?} for {name}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The value a namespace gives a config when the topic has no
    /// override.
    async fn namespace_default(&self, ns: &NamespaceName, name: &str) -> Option<String> {
        let p = self.broker.tenancy().get_policies(ns).await.ok()?;
        let r = p.retention_policies.as_ref()?;
        match name {
            "retention.ms" if r.retention_time_in_minutes != 0 => {
                Some(if r.retention_time_in_minutes < 0 {
                    "-1".into()
                } else {
                    (r.retention_time_in_minutes * 60_000).to_string()
                })
            }
            "retention.bytes" if r.retention_size_in_mb != 0 => {
                Some(if r.retention_size_in_mb < 0 {
                    "-1".into()
                } else {
                    (r.retention_size_in_mb * 1024 * 1024).to_string()
                })
            }
            _ => None,
        }
    }

    /// Creating, deleting and reconfiguring topics is the namespace
    /// admin's (Kafka's Create, Delete and Alter on a topic): a produce
    /// or consume grant alone could otherwise wipe what others read.
    fn admin_only(c: &Caller, what: &str) -> Result<(), (i16, String)> {
        if c.grants.admin {
            Ok(())
        } else {
            Err((
                E::TopicAuthorizationFailed.code(),
                format!("{what} needs the namespace admin role in {}", c.ns),
            ))
        }
    }

    pub(crate) async fn create_topics(
        &self,
        c: &Caller,
        r: CreateTopicsRequest,
    ) -> CreateTopicsResponse {
        let mut topics = Vec::with_capacity(r.topics.len());
        for t in r.topics {
            let mut res = CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_num_partitions(-1)
                .with_replication_factor(-1);
            let outcome = self.create_one(c, &t, r.validate_only).await;
            match outcome {
                Ok(n) => {
                    res.num_partitions = n as i32;
                    res.replication_factor = 1;
                }
                Err((code, msg)) => {
                    res.error_code = code;
                    res.error_message = Some(str(msg));
                }
            }
            topics.push(res);
        }
        CreateTopicsResponse::default().with_topics(topics)
    }

    async fn create_one(
        &self,
        c: &Caller,
        t: &create_topics_request::CreatableTopic,
        validate_only: bool,
    ) -> Result<u32, (i16, String)> {
        Self::admin_only(c, "creating a topic")?;
        let name = t.name.0.as_str();
        let base = self
            .topic_name(&c.ns, name)
            .map_err(|code| (code, format!("invalid topic name {name:?}")))?;
        if !t.assignments.is_empty() {
            // Kafka's rule: assignments replace the count and the factor.
            if t.num_partitions != -1 || t.replication_factor != -1 {
                return Err((
                    E::InvalidRequest.code(),
                    "with replica assignments, numPartitions and replicationFactor must be -1"
                        .into(),
                ));
            }
            let mut indexes: Vec<i32> = t.assignments.iter().map(|a| a.partition_index).collect();
            indexes.sort_unstable();
            if indexes.iter().enumerate().any(|(i, &p)| p != i as i32) {
                return Err((
                    E::InvalidReplicaAssignment.code(),
                    "partitions must be numbered from 0 without gaps".into(),
                ));
            }
            let lists: Vec<&[BrokerId]> = t
                .assignments
                .iter()
                .map(|a| a.broker_ids.as_slice())
                .collect();
            self.check_assignments(&lists).await?;
        }
        let partitions = match t.num_partitions {
            -1 if !t.assignments.is_empty() => t.assignments.len() as u32,
            -1 => self.cfg.default_partitions,
            n if (1..=10_000).contains(&n) => n as u32,
            n => {
                return Err((
                    E::InvalidPartitions.code(),
                    format!("{n} partitions is not allowed"),
                ))
            }
        };
        if !(t.replication_factor == -1 || t.replication_factor >= 1) {
            return Err((
                E::InvalidReplicationFactor.code(),
                "replication factor must be at least 1".into(),
            ));
        }
        self.check_configs(
            t.configs
                .iter()
                .map(|c| (c.name.as_str(), c.value.as_deref())),
        )?;
        let exists = self
            .layout(&base)
            .await
            .map_err(|e| (code_of(&e), e.to_string()))?
            .is_some();
        if exists {
            return Err((
                E::TopicAlreadyExists.code(),
                format!("topic {name} already exists"),
            ));
        }
        if validate_only {
            return Ok(partitions);
        }
        // An explicit create, after which other clusters' replication
        // may fill the topic again.
        if let Err(e) = self.broker.clear_tombstone(&base).await {
            return Err((code_of(&e), e.to_string()));
        }
        match self.create_topic(&base, partitions).await {
            Ok(()) => {}
            Err(BrokerError::AlreadyExists(m)) => return Err((E::TopicAlreadyExists.code(), m)),
            Err(e) => return Err((code_of(&e), e.to_string())),
        }
        let configs: Configs = t
            .configs
            .iter()
            .filter_map(|c| Some((c.name.to_string(), c.value.as_ref()?.to_string())))
            .collect();
        if !configs.is_empty() {
            let stored = self
                .store_overrides(&base, &configs, 0)
                .await
                .map_err(|code| (code, "configs not stored".to_string()))?;
            if !stored {
                return Err((
                    E::InvalidConfig.code(),
                    "configs changed concurrently".into(),
                ));
            }
        }
        Ok(partitions)
    }

    pub(crate) async fn delete_topics(
        &self,
        c: &Caller,
        r: DeleteTopicsRequest,
        v: i16,
    ) -> DeleteTopicsResponse {
        let names: Vec<String> = if v >= 6 {
            r.topics
                .iter()
                .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                .collect()
        } else {
            r.topic_names.iter().map(|n| n.0.to_string()).collect()
        };
        let mut responses = Vec::with_capacity(names.len());
        for name in names {
            let code = match Self::admin_only(c, "deleting a topic") {
                Ok(()) => self.delete_one(&c.ns, &name).await.err().unwrap_or(0),
                Err((code, _)) => code,
            };
            responses.push(
                DeletableTopicResult::default()
                    .with_name(Some(TopicName(str(name))))
                    .with_error_code(code),
            );
        }
        DeleteTopicsResponse::default().with_responses(responses)
    }

    async fn delete_one(&self, ns: &NamespaceName, name: &str) -> Result<(), i16> {
        let base = self.topic_name(ns, name)?;
        self.layout(&base)
            .await
            .map_err(|e| code_of(&e))?
            .ok_or(E::UnknownTopicOrPartition.code())?;
        // Kafka deletes topics that still have consumers.
        let result = self.broker.delete_topic(&base, true).await;
        self.forget_layout(&base);
        result.map_err(|e| code_of(&e))?;
        let _ = self
            .broker
            .state("kafka-topic-configs")
            .delete(&Self::configs_key(&base))
            .await;
        Ok(())
    }

    pub(crate) async fn create_partitions(
        &self,
        c: &Caller,
        r: CreatePartitionsRequest,
    ) -> CreatePartitionsResponse {
        let mut results = Vec::with_capacity(r.topics.len());
        for t in r.topics {
            let outcome = match Self::admin_only(c, "adding partitions") {
                Ok(()) => {
                    let lists: Option<Vec<&[BrokerId]>> = t
                        .assignments
                        .as_ref()
                        .map(|a| a.iter().map(|a| a.broker_ids.as_slice()).collect());
                    self.grow(
                        &c.ns,
                        t.name.0.as_str(),
                        t.count,
                        r.validate_only,
                        lists.as_deref(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let mut res = CreatePartitionsTopicResult::default().with_name(t.name);
            if let Err((code, msg)) = outcome {
                res.error_code = code;
                res.error_message = Some(str(msg));
            }
            results.push(res);
        }
        CreatePartitionsResponse::default().with_results(results)
    }

    async fn grow(
        &self,
        ns: &NamespaceName,
        name: &str,
        count: i32,
        validate_only: bool,
        assignments: Option<&[&[BrokerId]]>,
    ) -> Result<(), (i16, String)> {
        let base = self
            .topic_name(ns, name)
            .map_err(|code| (code, format!("invalid topic name {name:?}")))?;
        self.forget_layout(&base);
        let layout = self
            .layout(&base)
            .await
            .map_err(|e| (code_of(&e), e.to_string()))?
            .ok_or((
                E::UnknownTopicOrPartition.code(),
                format!("topic {name} does not exist"),
            ))?;
        let current = match layout {
            Layout::Partitioned(n) => n,
            Layout::Single => {
                return Err((
                    E::InvalidPartitions.code(),
                    format!("{name} is not a partitioned topic and cannot grow"),
                ))
            }
        };
        if count <= current as i32 {
            return Err((
                E::InvalidPartitions.code(),
                format!("topic {name} has {current} partitions; {count} would not add any"),
            ));
        }
        if count > 10_000 {
            return Err((
                E::InvalidPartitions.code(),
                format!("{count} partitions is too many"),
            ));
        }
        if let Some(lists) = assignments {
            let adding = count as usize - current as usize;
            if lists.len() != adding {
                return Err((
                    E::InvalidReplicaAssignment.code(),
                    format!(
                        "increasing the number of partitions by {adding} but {} assignments provided",
                        lists.len()
                    ),
                ));
            }
            self.check_assignments(lists).await?;
        }
        if validate_only {
            return Ok(());
        }
        let r = self.broker.update_partitions(&base, count as u32).await;
        self.forget_layout(&base);
        r.map_err(|e| (code_of(&e), e.to_string()))
    }

    /// Replica assignments pass Kafka's checks (each list names known
    /// brokers, once each) and are then ignored: the bookies place a
    /// partition's data, and its leader is the broker that owns it.
    pub(crate) async fn check_assignments(
        &self,
        lists: &[&[BrokerId]],
    ) -> Result<(), (i16, String)> {
        let mut known: Vec<i32> = match self.broker.active_brokers().await {
            Ok(bs) => bs.iter().map(|b| node_id(&b.id)).collect(),
            Err(e) => return Err((code_of(&e), e.to_string())),
        };
        known.push(self.node_id());
        for list in lists {
            if list.is_empty() {
                return Err((
                    E::InvalidReplicaAssignment.code(),
                    "a replica assignment names no broker".into(),
                ));
            }
            for (i, id) in list.iter().enumerate() {
                if list[..i].contains(id) {
                    return Err((
                        E::InvalidReplicaAssignment.code(),
                        format!("broker {} is named twice in one assignment", id.0),
                    ));
                }
                if !known.contains(&id.0) {
                    return Err((
                        E::BrokerNotAvailable.code(),
                        format!("unknown broker {} in a replica assignment", id.0),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Moves each partition's start up to the given offset (-1: its end).
    pub(crate) async fn delete_records(
        &self,
        c: &Caller,
        r: DeleteRecordsRequest,
    ) -> DeleteRecordsResponse {
        use kafka_protocol::messages::delete_records_response::{
            DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
        };
        let mut topics = Vec::with_capacity(r.topics.len());
        for t in r.topics {
            let mut partitions = Vec::with_capacity(t.partitions.len());
            for p in t.partitions {
                let mut out = DeleteRecordsPartitionResult::default()
                    .with_partition_index(p.partition_index)
                    .with_low_watermark(-1);
                let partition = match Self::admin_only(c, "deleting records") {
                    Ok(()) => self.partition(&c.ns, &t.name.0, p.partition_index).await,
                    Err((code, _)) => Err(code),
                };
                match partition {
                    Err(code) => out.error_code = code,
                    Ok(topic) => {
                        let end = topic.log().end_offset() as i64;
                        let to = if p.offset == -1 { end } else { p.offset };
                        if to < 0 || to > end {
                            out.error_code = E::OffsetOutOfRange.code();
                        } else {
                            match topic.log().delete_before(to as u64).await {
                                Ok(low) => out.low_watermark = low as i64,
                                Err(e) => out.error_code = code_of(&e),
                            }
                        }
                    }
                }
                partitions.push(out);
            }
            topics.push(
                DeleteRecordsTopicResult::default()
                    .with_name(t.name)
                    .with_partitions(partitions),
            );
        }
        DeleteRecordsResponse::default().with_topics(topics)
    }

    pub(crate) async fn describe_configs(
        &self,
        c: &Caller,
        r: DescribeConfigsRequest,
    ) -> DescribeConfigsResponse {
        let mut results = Vec::with_capacity(r.resources.len());
        for res in r.resources {
            let mut out = DescribeConfigsResult::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name.clone());
            let wanted = |n: &str| {
                res.configuration_keys
                    .as_ref()
                    .is_none_or(|ks| ks.iter().any(|k| k.as_str() == n))
            };
            match res.resource_type {
                TOPIC_RESOURCE => {
                    let found = async {
                        let base = self.topic_name(&c.ns, &res.resource_name)?;
                        self.layout(&base)
                            .await
                            .map_err(|e| code_of(&e))?
                            .ok_or(E::UnknownTopicOrPartition.code())?;
                        let (overrides, _) = self.topic_overrides(&base).await?;
                        Ok::<_, i16>(overrides)
                    }
                    .await;
                    match found {
                        Err(code) => out.error_code = code,
                        Ok(overrides) => {
                            for (name, default) in TOPIC_CONFIGS {
                                if !wanted(name) {
                                    continue;
                                }
                                let (value, source) = match overrides.get(*name) {
                                    Some(v) => (v.clone(), SOURCE_TOPIC),
                                    None => (
                                        self.namespace_default(&c.ns, name).await.unwrap_or_else(
                                            || match *name {
                                                "max.message.bytes" => {
                                                    self.cfg.message_max_bytes.to_string()
                                                }
                                                _ => default.to_string(),
                                            },
                                        ),
                                        SOURCE_DEFAULT,
                                    ),
                                };
                                out.configs.push(described(name, value, source, false));
                            }
                            for (name, value) in FIXED_TOPIC_CONFIGS {
                                if wanted(name) {
                                    out.configs.push(described(
                                        name,
                                        value.to_string(),
                                        SOURCE_DEFAULT,
                                        true,
                                    ));
                                }
                            }
                        }
                    }
                }
                BROKER_RESOURCE => {
                    let own = self.node_id().to_string();
                    if !res.resource_name.is_empty() && res.resource_name.as_str() != own {
                        out.error_code = E::InvalidRequest.code();
                        out.error_message = Some(str(format!(
                            "this is broker {own}, not {}",
                            res.resource_name.as_str()
                        )));
                    } else {
                        for (name, value) in self.broker_configs(&own) {
                            if wanted(name) {
                                out.configs
                                    .push(described(name, value, SOURCE_STATIC, true));
                            }
                        }
                    }
                }
                _ => {
                    out.error_code = E::InvalidRequest.code();
                    out.error_message = Some(str("only topic and broker configs are described"));
                }
            }
            results.push(out);
        }
        DescribeConfigsResponse::default().with_results(results)
    }

    /// The broker's configs as Kafka names them, for tools that read them
    /// (`advertised.listeners` above all).
    fn broker_configs(&self, own: &str) -> Vec<(&'static str, String)> {
        let info = self.broker.info();
        let sasl = self.broker.auth_enabled();
        let mut listeners = Vec::new();
        let mut protocols = Vec::new();
        for (listener, name, secured) in [
            ("kafka", "PLAINTEXT", "SASL_PLAINTEXT"),
            (crate::server::TLS_LISTENER, "SSL", "SASL_SSL"),
        ] {
            if let Some((_, host, port)) = endpoint(info, listener) {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                listeners.push(format!("{name}://{host}:{port}"));
                protocols.push(format!("{name}:{}", if sasl { secured } else { name }));
            }
        }
        let listeners = listeners.join(",");
        vec![
            ("advertised.listeners", listeners.clone()),
            (
                "auto.create.topics.enable",
                self.broker.config().auto_create_topics.to_string(),
            ),
            ("broker.id", own.to_string()),
            ("compression.type", "producer".into()),
            ("default.replication.factor", "1".into()),
            ("delete.topic.enable", "true".into()),
            (
                "group.initial.rebalance.delay.ms",
                self.cfg
                    .group_initial_rebalance_delay
                    .as_millis()
                    .to_string(),
            ),
            ("listener.security.protocol.map", protocols.join(",")),
            ("listeners", listeners),
            ("message.max.bytes", self.cfg.message_max_bytes.to_string()),
            ("min.insync.replicas", "1".into()),
            ("node.id", own.to_string()),
            ("num.partitions", self.cfg.default_partitions.to_string()),
            ("process.roles", "broker".into()),
            (
                "sasl.enabled.mechanisms",
                if sasl { "PLAIN" } else { "" }.into(),
            ),
            (
                "transaction.max.timeout.ms",
                crate::txn::TRANSACTION_MAX_TIMEOUT_MS.to_string(),
            ),
        ]
    }

    /// Applies config changes. With `replace`, every override not named is
    /// removed (AlterConfigs).
    async fn change_configs(
        &self,
        c: &Caller,
        resource_type: i8,
        resource: &str,
        changes: Vec<(String, Change)>,
        replace: bool,
        validate_only: bool,
    ) -> Result<(), (i16, String)> {
        if resource_type != TOPIC_RESOURCE {
            return Err((
                E::InvalidRequest.code(),
                "only topic configs can be changed".into(),
            ));
        }
        Self::admin_only(c, "changing topic configs")?;
        self.check_configs(changes.iter().map(|(n, v)| (n.as_str(), v.value())))?;
        if let Some((n, _)) = changes
            .iter()
            .find(|(n, v)| v.is_list_op() && !LIST_CONFIGS.contains(&n.as_str()))
        {
            return Err((
                E::InvalidConfig.code(),
                format!("{n} is not a list: values cannot be appended or subtracted"),
            ));
        }
        let base = self
            .topic_name(&c.ns, resource)
            .map_err(|code| (code, format!("invalid topic name {resource:?}")))?;
        self.layout(&base)
            .await
            .map_err(|e| (code_of(&e), e.to_string()))?
            .ok_or((
                E::UnknownTopicOrPartition.code(),
                format!("topic {resource} does not exist"),
            ))?;
        if validate_only {
            return Ok(());
        }
        loop {
            let (mut configs, version) = self
                .topic_overrides(&base)
                .await
                .map_err(|c| (c, "configs unreadable".into()))?;
            if replace {
                configs.clear();
            }
            for (n, change) in &changes {
                match change {
                    Change::Set(v) => {
                        configs.insert(n.clone(), v.clone());
                    }
                    Change::Delete => {
                        configs.remove(n);
                    }
                    Change::Append(v) | Change::Subtract(v) => {
                        let current = match configs.get(n) {
                            Some(c) => c.clone(),
                            None => default_of(n).to_string(),
                        };
                        let mut items: Vec<&str> = current
                            .split(',')
                            .map(str::trim)
                            .filter(|i| !i.is_empty())
                            .collect();
                        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                            if matches!(change, Change::Append(_)) {
                                if !items.contains(&item) {
                                    items.push(item);
                                }
                            } else {
                                items.retain(|i| *i != item);
                            }
                        }
                        let joined = items.join(",");
                        if !valid_value(n, &joined) {
                            return Err((
                                E::InvalidConfig.code(),
                                format!("{n} would be {joined:?}, which is not valid"),
                            ));
                        }
                        configs.insert(n.clone(), joined);
                    }
                }
            }
            match self.store_overrides(&base, &configs, version).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(c) => return Err((c, "configs not stored".into())),
            }
        }
    }

    pub(crate) async fn alter_configs(
        &self,
        c: &Caller,
        r: AlterConfigsRequest,
    ) -> AlterConfigsResponse {
        use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
        let mut responses = Vec::new();
        for res in r.resources {
            let changes = res
                .configs
                .iter()
                .map(|c| {
                    let change = match &c.value {
                        Some(v) => Change::Set(v.to_string()),
                        None => Change::Delete,
                    };
                    (c.name.to_string(), change)
                })
                .collect();
            let outcome = self
                .change_configs(
                    c,
                    res.resource_type,
                    &res.resource_name,
                    changes,
                    true,
                    r.validate_only,
                )
                .await;
            let mut out = AlterConfigsResourceResponse::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name);
            if let Err((code, msg)) = outcome {
                out.error_code = code;
                out.error_message = Some(str(msg));
            }
            responses.push(out);
        }
        AlterConfigsResponse::default().with_responses(responses)
    }

    pub(crate) async fn incremental_alter_configs(
        &self,
        c: &Caller,
        r: IncrementalAlterConfigsRequest,
    ) -> IncrementalAlterConfigsResponse {
        use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
        let mut responses = Vec::new();
        for res in r.resources {
            let mut changes = Vec::new();
            let mut bad = None;
            for cfg in &res.configs {
                let name = cfg.name.to_string();
                let value = cfg.value.as_ref().map(|v| v.to_string());
                let change = match (cfg.config_operation, value) {
                    (0, Some(v)) => Change::Set(v),
                    (0, None) | (1, _) => Change::Delete,
                    (2, Some(v)) => Change::Append(v),
                    (3, Some(v)) => Change::Subtract(v),
                    (op, _) => {
                        bad = Some(format!("operation {op} on {name} is not valid"));
                        continue;
                    }
                };
                changes.push((name, change));
            }
            let outcome = match bad {
                Some(msg) => Err((E::InvalidConfig.code(), msg)),
                None => {
                    self.change_configs(
                        c,
                        res.resource_type,
                        &res.resource_name,
                        changes,
                        false,
                        r.validate_only,
                    )
                    .await
                }
            };
            let mut out = AlterConfigsResourceResponse::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name);
            if let Err((code, msg)) = outcome {
                out.error_code = code;
                out.error_message = Some(str(msg));
            }
            responses.push(out);
        }
        IncrementalAlterConfigsResponse::default().with_responses(responses)
    }
}
