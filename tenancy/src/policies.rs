//! Tenant, namespace and cluster records. Field names follow the JSON of
//! Pulsar's admin API where Pulsar has the field, so that its tooling and
//! habits carry over.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TenancyError};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TenantInfo {
    pub admin_roles: BTreeSet<String>,
    pub allowed_clusters: BTreeSet<String>,
}

/// A cluster (a region) and how this region's brokers reach it: Pulsar's
/// `ClusterData`, with its fields for the links between regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterData {
    pub service_url: Option<String>,
    pub service_url_tls: Option<String>,
    pub broker_service_url: Option<String>,
    pub broker_service_url_tls: Option<String>,
    /// How to log in to the cluster: `token` (or Pulsar's
    /// `org.apache.pulsar.client.impl.auth.AuthenticationToken`), or none.
    pub authentication_plugin: Option<String>,
    /// The plugin's parameters: `token:<jwt>`, or `file:///path` of a file
    /// holding the token. Never shown back: a read gives [`REDACTED`].
    pub authentication_parameters: Option<String>,
    /// Reach the cluster over `serviceUrlTls`.
    pub broker_client_tls_enabled: bool,
    /// Accept a certificate the trusted CAs did not sign.
    pub tls_allow_insecure_connection: bool,
    /// PEM file of the CAs that sign the cluster's certificates.
    pub broker_client_trust_certs_file_path: Option<String>,
    /// This region's number for the cluster, fixed at registration: the
    /// records replicated from it carry it.
    pub geo_id: Option<u16>,
}

/// What a read shows in place of a cluster's authentication parameters.
pub const REDACTED: &str = "******";

/// The plugin names a cluster's `authenticationPlugin` may take.
pub const TOKEN_PLUGINS: [&str; 2] = [
    "token",
    "org.apache.pulsar.client.impl.auth.AuthenticationToken",
];

impl ClusterData {
    /// The record as the admin API shows it: secrets replaced.
    pub fn redacted(&self) -> ClusterData {
        let mut c = self.clone();
        if c.authentication_parameters.is_some() {
            c.authentication_parameters = Some(REDACTED.into());
        }
        c
    }

    pub fn validate(&self) -> Result<()> {
        for (field, url, schemes) in [
            // A broker whose HTTP listener speaks TLS registers an https
            // serviceUrl.
            (
                "serviceUrl",
                &self.service_url,
                &["http://", "https://"][..],
            ),
            ("serviceUrlTls", &self.service_url_tls, &["https://"][..]),
            (
                "brokerServiceUrl",
                &self.broker_service_url,
                &["pulsar://", "pulsar+ssl://", "http://", "https://"][..],
            ),
            (
                "brokerServiceUrlTls",
                &self.broker_service_url_tls,
                &["pulsar+ssl://", "https://"][..],
            ),
        ] {
            if let Some(u) = url {
                check(
                    schemes.iter().any(|s| u.starts_with(s)) && u.len() < 2048,
                    || format!("{field} {u:?} must start with {}", schemes.join(" or ")),
                )?;
            }
        }
        match self.authentication_plugin.as_deref() {
            None | Some("") => check(self.authentication_parameters.is_none(), || {
                "authenticationParameters need an authenticationPlugin".into()
            })?,
            Some(p) => {
                check(TOKEN_PLUGINS.contains(&p), || {
                    format!("authenticationPlugin {p:?} is not supported; use token")
                })?;
                let params = self.authentication_parameters.as_deref().unwrap_or("");
                check(
                    params == REDACTED
                        || params.starts_with("token:")
                        || params.starts_with("file://"),
                    || "authenticationParameters must be token:<jwt> or file:///path".into(),
                )?;
            }
        }
        check(
            !self.broker_client_tls_enabled || self.service_url_tls.is_some(),
            || "brokerClientTlsEnabled needs a serviceUrlTls".into(),
        )
    }
}

/// Pulsar's `DispatchRate`: at most this many messages and bytes per
/// period, -1 meaning without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatchRate {
    #[serde(default = "unlimited")]
    pub dispatch_throttling_rate_in_msg: i64,
    #[serde(default = "unlimited")]
    pub dispatch_throttling_rate_in_byte: i64,
    #[serde(default = "one_second")]
    pub rate_period_in_second: u32,
}

fn one_second() -> u32 {
    1
}

impl DispatchRate {
    pub fn validate(&self) -> Result<()> {
        check(
            self.dispatch_throttling_rate_in_msg >= -1
                && self.dispatch_throttling_rate_in_byte >= -1
                && self.rate_period_in_second >= 1,
            || "dispatch rates must be -1 (unlimited) or more, over a period of 1 s or more".into(),
        )
    }
}

/// What a role may do in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthAction {
    Produce,
    Consume,
    Admin,
}

/// Keep data for this long or up to this size after every subscription
/// has acknowledged it; -1 means without limit, 0 means not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicies {
    pub retention_time_in_minutes: i64,
    #[serde(rename = "retentionSizeInMB")]
    pub retention_size_in_mb: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BacklogQuotaPolicy {
    /// Producers wait until the backlog shrinks.
    ProducerRequestHold,
    /// Producers get an error.
    ProducerException,
    /// The oldest unacknowledged data is skipped for the slowest cursors.
    ConsumerBacklogEviction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BacklogQuota {
    /// Bytes; -1 means without limit.
    pub limit_size: i64,
    /// Seconds of backlog age; -1 means without limit.
    #[serde(default = "unlimited")]
    pub limit_time: i64,
    pub policy: BacklogQuotaPolicy,
}

fn unlimited() -> i64 {
    -1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundlesData {
    pub num_bundles: u32,
}

impl Default for BundlesData {
    fn default() -> Self {
        BundlesData { num_bundles: 4 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishRate {
    /// Messages per second; -1 means without limit.
    pub publish_throttling_rate_in_msg: i64,
    /// Bytes per second; -1 means without limit.
    pub publish_throttling_rate_in_byte: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthPolicies {
    pub namespace_auth: BTreeMap<String, BTreeSet<AuthAction>>,
}

/// The policies of one namespace. Unset fields take the broker's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policies {
    pub auth_policies: AuthPolicies,
    pub replication_clusters: BTreeSet<String>,
    pub bundles: BundlesData,
    /// Keyed by quota type; Pulsar's only type is `destination_storage`.
    pub backlog_quota_map: BTreeMap<String, BacklogQuota>,
    pub message_ttl_in_seconds: Option<u32>,
    pub retention_policies: Option<RetentionPolicies>,
    /// Offload closed ledgers to object storage once a topic holds more
    /// than this many bytes; -1 disables offload.
    pub offload_threshold: Option<i64>,
    /// Offload closed ledgers older than this many seconds; -1 disables.
    pub offload_threshold_in_seconds: Option<i64>,
    /// How long the bookies keep a ledger after its offload.
    pub offload_deletion_lag_ms: Option<u64>,
    pub max_producers_per_topic: Option<u32>,
    pub max_consumers_per_topic: Option<u32>,
    pub max_consumers_per_subscription: Option<u32>,
    pub max_topics_per_namespace: Option<u32>,
    pub max_connections_per_broker: Option<u32>,
    pub publish_max_message_rate: BTreeMap<String, PublishRate>,
    pub deduplication_enabled: Option<bool>,
    /// How fast each of this cluster's replicators of the namespace's
    /// topics may ship to a remote cluster.
    pub replicator_dispatch_rate: Option<DispatchRate>,
}

pub const MAX_BUNDLES: u32 = 1024;
pub const BACKLOG_QUOTA_STORAGE: &str = "destination_storage";

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(TenancyError::InvalidPolicy(what()))
    }
}

impl RetentionPolicies {
    pub fn validate(&self) -> Result<()> {
        check(
            self.retention_time_in_minutes >= -1 && self.retention_size_in_mb >= -1,
            || "retention time and size must be -1 (unlimited) or more".into(),
        )
    }
}

impl BacklogQuota {
    pub fn validate(&self) -> Result<()> {
        check(self.limit_size >= -1 && self.limit_time >= -1, || {
            "backlog quota limits must be -1 (unlimited) or more".into()
        })
    }
}

impl Policies {
    pub fn validate(&self) -> Result<()> {
        check(
            (1..=MAX_BUNDLES).contains(&self.bundles.num_bundles),
            || format!("numBundles must be between 1 and {MAX_BUNDLES}"),
        )?;
        if let Some(r) = &self.retention_policies {
            r.validate()?;
        }
        if let Some(r) = &self.replicator_dispatch_rate {
            r.validate()?;
        }
        for (kind, q) in &self.backlog_quota_map {
            check(kind == BACKLOG_QUOTA_STORAGE, || {
                format!("unknown backlog quota type {kind:?}; expected {BACKLOG_QUOTA_STORAGE}")
            })?;
            q.validate()?;
        }
        if let Some(t) = self.offload_threshold {
            check(t >= -1, || {
                "offload_threshold must be -1 (disabled) or more".into()
            })?;
        }
        if let Some(t) = self.offload_threshold_in_seconds {
            check(t >= -1, || {
                "offload_threshold_in_seconds must be -1 (disabled) or more".into()
            })?;
        }
        for r in self.publish_max_message_rate.values() {
            check(
                r.publish_throttling_rate_in_msg >= -1 && r.publish_throttling_rate_in_byte >= -1,
                || "publish rates must be -1 (unlimited) or more".into(),
            )?;
        }
        for role in self.auth_policies.namespace_auth.keys() {
            check(!role.is_empty(), || "a role name is empty".into())?;
        }
        Ok(())
    }

    pub fn backlog_quota(&self) -> Option<&BacklogQuota> {
        self.backlog_quota_map.get(BACKLOG_QUOTA_STORAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulsar_shaped_json_round_trips() {
        let json = r#"{
            "replication_clusters": ["standalone"],
            "bundles": {"numBundles": 8},
            "retention_policies": {"retentionTimeInMinutes": 60, "retentionSizeInMB": 100},
            "backlog_quota_map": {"destination_storage": {"limitSize": 1024, "policy": "producer_exception"}},
            "message_ttl_in_seconds": 30,
            "auth_policies": {"namespace_auth": {"app": ["produce", "consume"]}}
        }"#;
        let p: Policies = serde_json::from_str(json).expect("parse");
        p.validate().expect("valid");
        assert_eq!(p.bundles.num_bundles, 8);
        assert_eq!(p.backlog_quota().map(|q| q.limit_time), Some(-1));
        let again: Policies =
            serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("parse");
        assert_eq!(again, p);
        let t: TenantInfo =
            serde_json::from_str(r#"{"adminRoles":["a"],"allowedClusters":["c"]}"#).expect("t");
        assert!(t.admin_roles.contains("a"));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut p = Policies::default();
        p.bundles.num_bundles = 0;
        assert!(p.validate().is_err());
        let p = Policies {
            retention_policies: Some(RetentionPolicies {
                retention_time_in_minutes: -2,
                retention_size_in_mb: 0,
            }),
            ..Policies::default()
        };
        assert!(p.validate().is_err());
        let mut p = Policies::default();
        p.backlog_quota_map.insert(
            "bogus".into(),
            BacklogQuota {
                limit_size: 1,
                limit_time: 1,
                policy: BacklogQuotaPolicy::ProducerException,
            },
        );
        assert!(p.validate().is_err());
    }
}
