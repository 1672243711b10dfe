//! The cluster-level admin APIs of a Kafka 4.0 broker, answered as Kafka
//! would for a cluster where every partition has one replica, its leader
//! being the broker that owns it.
//!
//! There is no replica placement to change: the bookies hold the data, so
//! elections have nothing to elect, replica reassignments are checked and
//! then have nothing to move, and a broker's only "log directory" is the
//! bookies. The metadata quorum is the metadata store's raft group.

use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use magnetar_tenancy::TopicName as Name;

use crate::error::code_of;
use crate::handler::{str, Caller, Ctx};

/// The name DescribeQuorum knows the metadata log by.
const METADATA_TOPIC: &str = "__cluster_metadata";

/// The name of the one log directory a broker reports.
const LOG_DIR: &str = "bookies";

/// Kafka's ElectionNotNeeded: the preferred leader already leads.
const ELECTION_NOT_NEEDED: i16 = 84;
/// Kafka's NoReassignmentInProgress.
const NO_REASSIGNMENT_IN_PROGRESS: i16 = 85;

impl Ctx {
    /// The namespace's topics, or the requested ones, each with its
    /// partition count (`Err`: the topic's error code).
    async fn topics_of(
        &self,
        c: &Caller,
        requested: Option<Vec<String>>,
    ) -> Vec<(String, Result<(Name, u32), i16>)> {
        let names = match requested {
            Some(n) => n,
            None => self.all_topics(&c.ns).await,
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let found = async {
                let base = self.topic_name(&c.ns, &name)?;
                let layout = self
                    .layout(&base)
                    .await
                    .map_err(|e| code_of(&e))?
                    .ok_or(E::UnknownTopicOrPartition.code())?;
                Ok((base, layout.count()))
            }
            .await;
            out.push((name, found));
        }
        out
    }

    /// The partition's leader, or its error, as Metadata reports it.
    async fn partition_leader(&self, base: &Name, index: i32) -> Result<i32, i16> {
        let layout = self
            .layout(base)
            .await
            .map_err(|e| code_of(&e))?
            .ok_or(E::UnknownTopicOrPartition.code())?;
        let name = layout
            .partition(base, index)
            .ok_or(E::UnknownTopicOrPartition.code())?;
        self.leader_of(&name).await.map_err(|code| {
            if code == E::UnknownTopicOrPartition.code() {
                code
            } else {
                E::LeaderNotAvailable.code()
            }
        })
    }

    /// KIP-966: topics in name order, partitions from the cursor on, at
    /// most `response_partition_limit` of them; the next cursor names the
    /// first partition left out.
    pub(crate) async fn describe_topic_partitions(
        &self,
        c: &Caller,
        r: DescribeTopicPartitionsRequest,
    ) -> DescribeTopicPartitionsResponse {
        let requested =
            (!r.topics.is_empty()).then(|| r.topics.iter().map(|t| t.name.0.to_string()).collect());
        let mut topics = self.topics_of(c, requested).await;
        topics.sort_by(|a, b| a.0.cmp(&b.0));
        topics.dedup_by(|a, b| a.0 == b.0);
        let (from_topic, from_partition) = match &r.cursor {
            Some(cur) => (
                Some(cur.topic_name.0.to_string()),
                cur.partition_index.max(0),
            ),
            None => (None, 0),
        };
        let mut budget = usize::try_from(r.response_partition_limit)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(2000);
        let mut out = DescribeTopicPartitionsResponse::default();
        for (name, found) in topics {
            if from_topic.as_deref().is_some_and(|f| name.as_str() < f) {
                continue;
            }
            let first = if from_topic.as_deref() == Some(name.as_str()) {
                from_partition
            } else {
                0
            };
            let mut topic = DescribeTopicPartitionsResponseTopic::default()
                .with_name(Some(TopicName(str(name.clone()))))
                .with_topic_authorized_operations(i32::MIN);
            match found {
                Err(code) => topic.error_code = code,
                Ok((base, count)) => {
                    for i in first..count as i32 {
                        if budget == 0 {
                            out.next_cursor = Some(
                                Cursor::default()
                                    .with_topic_name(TopicName(str(name.clone())))
                                    .with_partition_index(i),
                            );
                            break;
                        }
                        budget -= 1;
                        let mut p = DescribeTopicPartitionsResponsePartition::default()
                            .with_partition_index(i)
                            .with_leader_epoch(-1);
                        match self.partition_leader(&base, i).await {
                            Ok(leader) => {
                                let id = BrokerId(leader);
                                p.leader_id = id;
                                p.replica_nodes = vec![id];
                                p.isr_nodes = vec![id];
                            }
                            Err(code) => {
                                p.error_code = code;
                                p.leader_id = BrokerId(-1);
                            }
                        }
                        topic.partitions.push(p);
                    }
                }
            }
            out.topics.push(topic);
            if out.next_cursor.is_some() {
                break;
            }
        }
        out
    }

    /// The partitions this broker leads, with their stored size. The
    /// directory's total and usable bytes are the bookies' to know: -1.
    pub(crate) async fn describe_log_dirs(
        &self,
        c: &Caller,
        r: DescribeLogDirsRequest,
    ) -> DescribeLogDirsResponse {
        use kafka_protocol::messages::describe_log_dirs_response::{
            DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
        };
        let requested: Option<Vec<(String, Option<Vec<i32>>)>> = r.topics.map(|ts| {
            ts.into_iter()
                .map(|t| (t.topic.0.to_string(), Some(t.partitions)))
                .collect()
        });
        let asks: Vec<(String, Option<Vec<i32>>)> = match requested {
            Some(a) => a,
            None => self
                .all_topics(&c.ns)
                .await
                .into_iter()
                .map(|t| (t, None))
                .collect(),
        };
        let own = self.node_id();
        let mut dir = DescribeLogDirsResult::default()
            .with_log_dir(str(LOG_DIR))
            .with_total_bytes(-1)
            .with_usable_bytes(-1);
        for (name, partitions) in asks {
            let Ok(base) = self.topic_name(&c.ns, &name) else {
                continue;
            };
            let Ok(Some(layout)) = self.layout(&base).await else {
                continue;
            };
            let indexes = partitions.unwrap_or_else(|| (0..layout.count() as i32).collect());
            let mut topic = DescribeLogDirsTopic::default().with_name(TopicName(str(name)));
            for i in indexes {
                let Some(pname) = layout.partition(&base, i) else {
                    continue;
                };
                if self.leader_of(&pname).await != Ok(own) {
                    continue;
                }
                let Ok(t) = self.broker.topic(&pname, true).await else {
                    continue;
                };
                topic.partitions.push(
                    DescribeLogDirsPartition::default()
                        .with_partition_index(i)
                        .with_partition_size(i64::try_from(t.log().size()).unwrap_or(i64::MAX)),
                );
            }
            if !topic.partitions.is_empty() {
                dir.topics.push(topic);
            }
        }
        DescribeLogDirsResponse::default().with_results(vec![dir])
    }

    /// Moving a replica between a broker's directories: there is one, the
    /// bookies, so any other path is not a log directory of this broker.
    pub(crate) async fn alter_replica_log_dirs(
        &self,
        c: &Caller,
        r: AlterReplicaLogDirsRequest,
    ) -> AlterReplicaLogDirsResponse {
        use kafka_protocol::messages::alter_replica_log_dirs_response::{
            AlterReplicaLogDirPartitionResult, AlterReplicaLogDirTopicResult,
        };
        let mut out = AlterReplicaLogDirsResponse::default();
        for d in r.dirs {
            let dir_code = if !c.grants.admin {
                E::ClusterAuthorizationFailed.code()
            } else if d.path.as_str() == LOG_DIR {
                0
            } else {
                E::LogDirNotFound.code()
            };
            for t in d.topics {
                let mut res =
                    AlterReplicaLogDirTopicResult::default().with_topic_name(t.name.clone());
                for p in t.partitions {
                    let code = if dir_code != 0 {
                        dir_code
                    } else {
                        self.partition_name(&c.ns, t.name.0.as_str(), p)
                            .await
                            .err()
                            .unwrap_or(0)
                    };
                    res.partitions.push(
                        AlterReplicaLogDirPartitionResult::default()
                            .with_partition_index(p)
                            .with_error_code(code),
                    );
                }
                out.results.push(res);
            }
        }
        out
    }

    /// With one replica per partition the preferred leader always leads:
    /// named partitions that exist get ElectionNotNeeded, as Kafka answers
    /// then; asked for every partition, there is nothing to report.
    pub(crate) async fn elect_leaders(
        &self,
        c: &Caller,
        r: ElectLeadersRequest,
    ) -> ElectLeadersResponse {
        use kafka_protocol::messages::elect_leaders_response::{
            PartitionResult, ReplicaElectionResult,
        };
        let mut out = ElectLeadersResponse::default();
        if !c.grants.admin {
            out.error_code = E::ClusterAuthorizationFailed.code();
            return out;
        }
        if !(0..=1).contains(&r.election_type) {
            out.error_code = E::InvalidRequest.code();
            return out;
        }
        for t in r.topic_partitions.unwrap_or_default() {
            let mut res = ReplicaElectionResult::default().with_topic(t.topic.clone());
            for p in t.partitions {
                let (code, msg) = match self.partition_name(&c.ns, t.topic.0.as_str(), p).await {
                    Ok(_) => (
                        ELECTION_NOT_NEEDED,
                        "the partition has one replica, which leads it",
                    ),
                    Err(code) => (code, "unknown topic or partition"),
                };
                res.partition_result.push(
                    PartitionResult::default()
                        .with_partition_id(p)
                        .with_error_code(code)
                        .with_error_message(Some(str(msg))),
                );
            }
            out.replica_election_results.push(res);
        }
        out
    }

    /// No reassignment is ever in progress.
    pub(crate) async fn list_partition_reassignments(
        &self,
        c: &Caller,
        _r: ListPartitionReassignmentsRequest,
    ) -> ListPartitionReassignmentsResponse {
        let mut out = ListPartitionReassignmentsResponse::default();
        if !c.grants.admin {
            out.error_code = E::ClusterAuthorizationFailed.code();
        }
        out
    }

    /// New replica sets are checked as Kafka checks them (known brokers,
    /// none twice) and accepted; there is nothing to move, so the
    /// reassignment is complete at once. Cancelling finds none in
    /// progress.
    pub(crate) async fn alter_partition_reassignments(
        &self,
        c: &Caller,
        r: AlterPartitionReassignmentsRequest,
    ) -> AlterPartitionReassignmentsResponse {
        use kafka_protocol::messages::alter_partition_reassignments_response::{
            ReassignablePartitionResponse, ReassignableTopicResponse,
        };
        let mut out = AlterPartitionReassignmentsResponse::default()
            .with_allow_replication_factor_change(r.allow_replication_factor_change);
        if !c.grants.admin {
            out.error_code = E::ClusterAuthorizationFailed.code();
            return out;
        }
        for t in r.topics {
            let mut res = ReassignableTopicResponse::default().with_name(t.name.clone());
            for p in t.partitions {
                let outcome = match self
                    .partition_name(&c.ns, t.name.0.as_str(), p.partition_index)
                    .await
                {
                    Err(code) => Err((code, "unknown topic or partition".to_string())),
                    Ok(_) => match &p.replicas {
                        None => Err((
                            NO_REASSIGNMENT_IN_PROGRESS,
                            "no reassignment is in progress".into(),
                        )),
                        // KIP-860: each partition has one replica.
                        Some(replicas)
                            if replicas.len() != 1 && !r.allow_replication_factor_change =>
                        {
                            Err((
                                E::InvalidReplicationFactor.code(),
                                "the reassignment would change the replication factor".into(),
                            ))
                        }
                        Some(replicas) => self.check_assignments(&[replicas.as_slice()]).await,
                    },
                };
                let mut pr = ReassignablePartitionResponse::default()
                    .with_partition_index(p.partition_index);
                if let Err((code, msg)) = outcome {
                    pr.error_code = code;
                    pr.error_message = Some(str(msg));
                }
                res.partitions.push(pr);
            }
            out.responses.push(res);
        }
        out
    }

    /// The metadata store's raft group as Kafka's KRaft quorum: partition
    /// 0 of `__cluster_metadata`, its leader and term, and each voter's
    /// last log index.
    pub(crate) async fn describe_quorum(
        &self,
        c: &Caller,
        r: DescribeQuorumRequest,
    ) -> DescribeQuorumResponse {
        use kafka_protocol::messages::describe_quorum_response::{
            Node, PartitionData, ReplicaState, TopicData,
        };
        let mut out = DescribeQuorumResponse::default();
        if !c.grants.admin {
            out.error_code = E::ClusterAuthorizationFailed.code();
            return out;
        }
        let quorum = self.broker.metadata_quorum().await;
        let id = |n: u64| BrokerId(i32::try_from(n).unwrap_or(-1));
        for t in r.topics {
            let mut td = TopicData::default().with_topic_name(t.topic_name.clone());
            for p in t.partitions {
                let mut pd = PartitionData::default().with_partition_index(p.partition_index);
                if t.topic_name.0.as_str() != METADATA_TOPIC || p.partition_index != 0 {
                    pd.error_code = E::UnknownTopicOrPartition.code();
                } else if let Some(q) = &quorum {
                    pd.leader_id = id(q.leader);
                    pd.leader_epoch = i32::try_from(q.term).unwrap_or(i32::MAX);
                    pd.high_watermark = i64::try_from(q.applied).unwrap_or(i64::MAX);
                    for v in &q.voters {
                        pd.current_voters.push(
                            ReplicaState::default()
                                .with_replica_id(id(v.id))
                                .with_log_end_offset(v.last_log_index)
                                .with_last_fetch_timestamp(-1)
                                .with_last_caught_up_timestamp(-1),
                        );
                    }
                } else {
                    pd.error_code = E::NotLeaderOrFollower.code();
                    pd.leader_id = BrokerId(-1);
                }
                td.partitions.push(pd);
            }
            out.topics.push(td);
        }
        for v in quorum.iter().flat_map(|q| &q.voters) {
            let mut node = Node::default().with_node_id(id(v.id));
            if let Some((host, port)) = v.addr.rsplit_once(':') {
                if let Ok(port) = port.parse() {
                    node.listeners.push(
                        describe_quorum_response::Listener::default()
                            .with_name(str("metadata"))
                            .with_host(str(host.trim_start_matches('[').trim_end_matches(']')))
                            .with_port(port),
                    );
                }
            }
            out.nodes.push(node);
        }
        out
    }

    /// The idempotent and transactional producers each partition
    /// remembers, as its leader knows them.
    pub(crate) async fn describe_producers(
        &self,
        c: &Caller,
        r: DescribeProducersRequest,
    ) -> DescribeProducersResponse {
        use kafka_protocol::messages::describe_producers_response::{
            PartitionResponse, ProducerState, TopicResponse,
        };
        let mut out = DescribeProducersResponse::default();
        for t in r.topics {
            let mut tr = TopicResponse::default().with_name(t.name.clone());
            for p in t.partition_indexes {
                let mut pr = PartitionResponse::default().with_partition_index(p);
                if !c.grants.consume {
                    pr.error_code = E::TopicAuthorizationFailed.code();
                    tr.partitions.push(pr);
                    continue;
                }
                match self.partition_name(&c.ns, t.name.0.as_str(), p).await {
                    Err(code) => pr.error_code = code,
                    Ok(name) => {
                        if self.leader_of(&name).await != Ok(self.node_id()) {
                            pr.error_code = E::NotLeaderOrFollower.code();
                        } else {
                            match self.broker.topic(&name, true).await {
                                Err(e) => pr.error_code = code_of(&e),
                                Ok(topic) => {
                                    for (id, seq, open) in topic.log().producers() {
                                        pr.active_producers.push(
                                            ProducerState::default()
                                                .with_producer_id(ProducerId(id))
                                                .with_producer_epoch(i32::from(seq.epoch))
                                                .with_last_sequence(
                                                    i32::try_from(seq.last_sequence).unwrap_or(-1),
                                                )
                                                .with_last_timestamp(-1)
                                                .with_coordinator_epoch(-1)
                                                .with_current_txn_start_offset(
                                                    open.map_or(-1, |o| o as i64),
                                                ),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                tr.partitions.push(pr);
            }
            out.topics.push(tr);
        }
        out
    }
}
