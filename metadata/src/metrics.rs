//! A metadata node's metrics (after openraft's `RaftMetrics` and
//! RabbitMQ's Raft metrics) and its health, for its HTTP listener.

use std::sync::Arc;
use std::time::Instant;

use magnetar_metrics::prometheus_client::collector::Collector;
use magnetar_metrics::prometheus_client::encoding::DescriptorEncoder;
use magnetar_metrics::prometheus_client::metrics::histogram::Histogram;
use magnetar_metrics::prometheus_client::registry::Registry;
use openraft::ServerState;

use crate::server::NodeShared;

/// How far the applied index may trail the last log index for the node
/// to count as ready: a node replaying a long log serves stale reads.
pub const READY_APPLY_LAG: u64 = 1_000;

/// Latency of one write proposal, from submission to applied.
#[derive(Clone, Debug)]
pub struct ProposalLatency(Histogram);

impl Default for ProposalLatency {
    fn default() -> Self {
        ProposalLatency(Histogram::new(magnetar_metrics::LATENCY_BUCKETS))
    }
}

impl ProposalLatency {
    pub(crate) fn since(&self, start: Instant) {
        self.0.observe(start.elapsed().as_secs_f64());
    }
}

/// The node's state as Prometheus scrapes it.
#[derive(Clone)]
pub struct MetaMetrics {
    pub(crate) node: Arc<NodeShared>,
}

impl std::fmt::Debug for MetaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaMetrics")
            .field("id", &self.node.id)
            .finish()
    }
}

/// What `/health` and `/ready` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaHealth {
    /// Raft runs (it has not stopped on a fatal error).
    pub live: bool,
    /// A leader is known and this node has applied the log to within
    /// [`READY_APPLY_LAG`] entries.
    pub ready: bool,
}

impl MetaMetrics {
    pub fn health(&self) -> MetaHealth {
        let m = self.node.raft.metrics().borrow().clone();
        let live = m.running_state.is_ok() && !*self.node.closing.borrow();
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        MetaHealth {
            live,
            ready: live
                && m.current_leader.is_some()
                && last.saturating_sub(applied) <= READY_APPLY_LAG,
        }
    }

    /// A registry holding this node's collector and its proposal latency.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        self.register(&mut r);
        r
    }

    /// Adds this node's families to `r` (standalone's one registry).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "magnetar_meta_proposal_latency_seconds",
            "Time from a write's proposal to its application on the leader",
            self.node.proposals.0.clone(),
        );
        r.register_collector(Box::new(self.clone()));
    }
}

impl Collector for MetaMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = self.node.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        let keys = self.node.state.read().kv.data.kvs.len();
        let committed = commit_index(&m).max(applied);
        let gauges: [(&str, &str, i64); 9] = [
            (
                "magnetar_meta_is_leader",
                "1 on the node that leads the metadata group",
                i64::from(m.state == ServerState::Leader),
            ),
            (
                "magnetar_meta_leader_known",
                "1 when this node knows a leader",
                i64::from(m.current_leader.is_some()),
            ),
            (
                "magnetar_meta_raft_term",
                "Current Raft term",
                to_i64(m.current_term),
            ),
            (
                "magnetar_meta_last_log_index",
                "Index of the last entry in this node's log",
                to_i64(last),
            ),
            (
                "magnetar_meta_commit_index",
                "Index of the last entry stored on a majority: on the leader, from its followers' progress; elsewhere, what this node applied (it applies only committed entries)",
                to_i64(committed),
            ),
            (
                "magnetar_meta_applied_index",
                "Index of the last entry applied to the state machine",
                to_i64(applied),
            ),
            (
                "magnetar_meta_apply_lag",
                "Entries in the log not yet applied",
                to_i64(last.saturating_sub(applied)),
            ),
            (
                "magnetar_meta_snapshot_index",
                "Index the last snapshot covers",
                to_i64(m.snapshot.map_or(0, |l| l.index)),
            ),
            (
                "magnetar_meta_keys",
                "Keys in the store",
                to_i64(keys as u64),
            ),
        ];
        magnetar_metrics::encode_gauges(&mut encoder, gauges)
    }
}

/// The highest index a majority of voters hold, from the leader's view of
/// its followers; 0 on a node that is not leading.
fn commit_index<NID: openraft::NodeId, N: openraft::Node>(
    m: &openraft::RaftMetrics<NID, N>,
) -> u64 {
    let Some(rep) = &m.replication else {
        return 0;
    };
    let mut matched: Vec<u64> = m
        .membership_config
        .voter_ids()
        .map(|v| rep.get(&v).and_then(Option::as_ref).map_or(0, |l| l.index))
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched.get(matched.len() / 2).copied().unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
