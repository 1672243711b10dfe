//! `GET /admin/v2/geo/status`: per replicated namespace and remote
//! cluster, how replication stands across the cluster's brokers (each
//! runs the replicators of the partitions it owns), for `magnetar admin
//! geo status`. Superusers only.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use magnetar_broker::listener::PeerCertificate;
use magnetar_broker::Broker;
use serde::{Deserialize, Serialize};

use crate::stats::Stats;

#[derive(Clone)]
pub(crate) struct StatusState {
    pub(crate) broker: Broker,
    pub(crate) stats: Arc<Stats>,
}

#[derive(Deserialize)]
pub(crate) struct StatusQuery {
    /// This broker's replicators only (what the others are asked for).
    #[serde(default)]
    local: bool,
}

/// One line of the status: a namespace's replication to one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub namespace: String,
    pub remote_cluster: String,
    /// Partitions replicating.
    pub topics: u64,
    pub connected: u64,
    pub replication_backlog: u64,
    pub msg_out_counter: u64,
    /// The worst state of its replicators (`running` when all run).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Adds `l` to its namespace's and cluster's line.
fn merge(lines: &mut BTreeMap<(String, String), Line>, l: &Line) {
    lines
        .entry((l.namespace.clone(), l.remote_cluster.clone()))
        .or_insert_with(|| Line {
            namespace: l.namespace.clone(),
            remote_cluster: l.remote_cluster.clone(),
            ..Line::default()
        })
        .add(l);
}

impl Line {
    fn add(&mut self, o: &Line) {
        self.topics += o.topics;
        self.connected += o.connected;
        self.replication_backlog += o.replication_backlog;
        self.msg_out_counter += o.msg_out_counter;
        if self.state.is_empty() || (o.state != "running" && self.state == "running") {
            self.state.clone_from(&o.state);
            self.last_error.clone_from(&o.last_error);
        }
    }
}

fn local_lines(stats: &Stats) -> Vec<Line> {
    let mut out: BTreeMap<(String, String), Line> = BTreeMap::new();
    for (t, remote, s) in stats.all() {
        let one = Line {
            namespace: t.namespace().to_string(),
            remote_cluster: remote,
            topics: 1,
            connected: u64::from(s.connected),
            replication_backlog: s.replication_backlog,
            msg_out_counter: s.msg_out_counter,
            state: s.state.clone(),
            last_error: s.last_error.clone(),
        };
        merge(&mut out, &one);
    }
    out.into_values().collect()
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(serde_json::json!({ "reason": why }))).into_response()
}

pub(crate) async fn status(
    State(st): State<StatusState>,
    Query(q): Query<StatusQuery>,
    req: axum::extract::Request,
) -> Response {
    let b = &st.broker;
    if b.auth_enabled() {
        let token = magnetar_broker::http::bearer(req.headers());
        let certificate = PeerCertificate::of(&req);
        if token.is_none() && certificate.is_none() {
            return refuse(StatusCode::UNAUTHORIZED, "authentication required");
        }
        let creds = magnetar_tenancy::Credentials {
            user: None,
            secret: token.map(str::as_bytes),
            certificate,
        };
        match b.authenticate(&creds) {
            Ok(p) if b.is_superuser(&p) => {}
            Ok(_) => return refuse(StatusCode::FORBIDDEN, "the role is not a superuser"),
            Err(e) => return refuse(StatusCode::UNAUTHORIZED, &e.to_string()),
        }
    }
    let mut lines: BTreeMap<(String, String), Line> = BTreeMap::new();
    let mut add = |ls: Vec<Line>| {
        for l in ls {
            merge(&mut lines, &l);
        }
    };
    add(local_lines(&st.stats));
    if !q.local {
        let brokers = match b.active_brokers().await {
            Ok(v) => v,
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        };
        for other in brokers.iter().filter(|o| o.id != b.info().id) {
            match b
                .admin_request(
                    other,
                    axum::http::Method::GET,
                    "/admin/v2/geo/status?local=true",
                    bytes::Bytes::new(),
                )
                .await
            {
                Ok((200, body)) => add(serde_json::from_slice(&body).unwrap_or_default()),
                Ok((status, _)) => tracing::debug!(broker = %other.id, status, "geo status"),
                Err(e) => tracing::debug!(broker = %other.id, "geo status: {e}"),
            }
        }
    }
    Json(lines.into_values().collect::<Vec<_>>()).into_response()
}
