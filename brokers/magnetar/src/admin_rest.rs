//! `magnetar admin {clusters,tenants,namespaces,topics,brokers}`: a CLI over
//! the admin REST API, in the spirit of `pulsar-admin`.

use anyhow::Context;
use clap::Subcommand;
use magnetar_tenancy::names::encode_segment;
use magnetar_tenancy::{NamespaceName, TopicName};
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum RestCommand {
    /// Clusters (regions) known to the metadata store.
    Clusters {
        #[command(subcommand)]
        command: ClustersCommand,
    },
    /// Tenants.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Namespaces and their policies.
    Namespaces {
        #[command(subcommand)]
        command: NamespacesCommand,
    },
    /// Topics, partitions, subscriptions and stats.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Brokers and their health.
    Brokers {
        #[command(subcommand)]
        command: BrokersCommand,
    },
    /// Replication to other clusters.
    Geo {
        #[command(subcommand)]
        command: GeoCommand,
    },
}

#[derive(Subcommand)]
pub enum GeoCommand {
    /// One line per replicated namespace and remote cluster: partitions,
    /// connected, backlog, messages sent, worst state.
    Status,
}

#[derive(Subcommand)]
pub enum ClustersCommand {
    List,
    /// A cluster's record (its authentication parameters hidden).
    Get {
        name: String,
    },
    /// Register a cluster (a region) with how to reach it.
    Create {
        name: String,
        #[command(flatten)]
        data: ClusterFlags,
    },
    /// Replace a cluster's record (parameters left out are cleared, as in
    /// pulsar-admin).
    Update {
        name: String,
        #[command(flatten)]
        data: ClusterFlags,
    },
    Delete {
        name: String,
    },
}

/// pulsar-admin's `clusters create` options, named after `ClusterData`'s
/// fields (`--url` is the admin API's own).
#[derive(clap::Args)]
pub struct ClusterFlags {
    /// The cluster's HTTP service URL (http://host:8080).
    #[arg(long)]
    service_url: Option<String>,
    /// The cluster's HTTPS service URL (https://host:8443).
    #[arg(long)]
    service_url_tls: Option<String>,
    #[arg(long)]
    broker_service_url: Option<String>,
    #[arg(long)]
    broker_service_url_tls: Option<String>,
    /// `token` to log in to the cluster with a token.
    #[arg(long)]
    auth_plugin: Option<String>,
    /// `token:<jwt>` or `file:///path/to/token`.
    #[arg(long)]
    auth_parameters: Option<String>,
    /// Reach the cluster over its HTTPS URL.
    #[arg(long)]
    tls_enable: bool,
    #[arg(long)]
    tls_allow_insecure: bool,
    /// PEM file of the CAs that sign the cluster's certificates.
    #[arg(long)]
    tls_trust_certs_filepath: Option<String>,
}

impl ClusterFlags {
    fn body(&self) -> Value {
        json!({
            "serviceUrl": self.service_url,
            "serviceUrlTls": self.service_url_tls,
            "brokerServiceUrl": self.broker_service_url,
            "brokerServiceUrlTls": self.broker_service_url_tls,
            "authenticationPlugin": self.auth_plugin,
            "authenticationParameters": self.auth_parameters,
            "brokerClientTlsEnabled": self.tls_enable,
            "tlsAllowInsecureConnection": self.tls_allow_insecure,
            "brokerClientTrustCertsFilePath": self.tls_trust_certs_filepath,
        })
    }
}

#[derive(Subcommand)]
pub enum TenantsCommand {
    List,
    Get {
        name: String,
    },
    Create {
        name: String,
        /// Comma-separated roles allowed to administer the tenant.
        #[arg(long, default_value = "")]
        admin_roles: String,
        /// Comma-separated clusters (default: this broker's cluster).
        #[arg(long, default_value = "")]
        allowed_clusters: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum NamespacesCommand {
    /// Namespaces of a tenant.
    List {
        tenant: String,
    },
    /// A namespace's policies as JSON.
    Get {
        namespace: String,
    },
    Create {
        namespace: String,
    },
    Delete {
        namespace: String,
    },
    /// Topics stored in the namespace.
    Topics {
        namespace: String,
    },
    /// Retention of acknowledged data (-1: unlimited).
    SetRetention {
        namespace: String,
        #[arg(long, allow_hyphen_values = true)]
        time_minutes: i64,
        #[arg(long, allow_hyphen_values = true)]
        size_mb: i64,
    },
    SetMessageTtl {
        namespace: String,
        seconds: u32,
    },
    /// Any policy sub-resource (e.g. maxTopicsPerNamespace) to a JSON value.
    SetPolicy {
        namespace: String,
        policy: String,
        value: String,
    },
    GetPolicy {
        namespace: String,
        policy: String,
    },
    /// Grant a role actions (produce, consume, admin), comma-separated.
    Grant {
        namespace: String,
        role: String,
        actions: String,
    },
    Revoke {
        namespace: String,
        role: String,
    },
    /// The clusters the namespace replicates to (it must include this
    /// one), comma-separated.
    SetClusters {
        namespace: String,
        #[arg(long)]
        clusters: String,
    },
    GetClusters {
        namespace: String,
    },
    /// How fast each replicator of the namespace's topics may ship.
    SetReplicatorDispatchRate {
        namespace: String,
        #[command(flatten)]
        rate: DispatchRateFlags,
    },
    GetReplicatorDispatchRate {
        namespace: String,
    },
    RemoveReplicatorDispatchRate {
        namespace: String,
    },
}

#[derive(Subcommand)]
pub enum TopicsCommand {
    /// Topics of a namespace.
    List {
        namespace: String,
    },
    Create {
        topic: String,
        /// Create a partitioned topic with this many partitions.
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Raise a partitioned topic's partition count.
    UpdatePartitions {
        topic: String,
        partitions: u32,
    },
    Partitions {
        topic: String,
    },
    Delete {
        topic: String,
        #[arg(long)]
        force: bool,
        /// Delete every partition of a partitioned topic.
        #[arg(long)]
        partitioned: bool,
    },
    Stats {
        topic: String,
    },
    PartitionedStats {
        topic: String,
    },
    InternalStats {
        topic: String,
    },
    Subscriptions {
        topic: String,
    },
    CreateSubscription {
        topic: String,
        subscription: String,
        /// latest, earliest, or an offset.
        #[arg(long, default_value = "latest")]
        from: String,
    },
    DeleteSubscription {
        topic: String,
        subscription: String,
        #[arg(long)]
        force: bool,
    },
    Skip {
        topic: String,
        subscription: String,
        count: u64,
    },
    SkipAll {
        topic: String,
        subscription: String,
    },
    ResetCursor {
        topic: String,
        subscription: String,
        offset: u64,
    },
    Unload {
        topic: String,
    },
    /// Route the topic's records through an exchange of its namespace
    /// (MQTT subscribers see them through `amq.topic`), keyed by their key.
    Route {
        topic: String,
        exchange: String,
        /// Routing key of records without a key.
        #[arg(long)]
        routing_key: Option<String>,
    },
    /// Where the topic's records are routed (nothing if they are not).
    GetRoute {
        topic: String,
    },
    /// Stop routing the topic's records.
    RemoveRoute {
        topic: String,
    },
    /// Offload the topic's closed ledgers to the object store now.
    Offload {
        topic: String,
    },
    /// Where the topic's last offload stands.
    OffloadStatus {
        topic: String,
    },
    Lookup {
        topic: String,
    },
    /// The clusters the topic replicates to, over its namespace's.
    SetReplicationClusters {
        topic: String,
        #[arg(long)]
        clusters: String,
    },
    GetReplicationClusters {
        topic: String,
    },
    /// The topic takes its namespace's replication clusters again.
    RemoveReplicationClusters {
        topic: String,
    },
    SetReplicatorDispatchRate {
        topic: String,
        #[command(flatten)]
        rate: DispatchRateFlags,
    },
    GetReplicatorDispatchRate {
        topic: String,
    },
    RemoveReplicatorDispatchRate {
        topic: String,
    },
}

/// pulsar-admin's dispatch-rate options (-1: without limit).
#[derive(clap::Args)]
pub struct DispatchRateFlags {
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    msg_dispatch_rate: i64,
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    byte_dispatch_rate: i64,
    /// Seconds.
    #[arg(long, default_value_t = 1)]
    dispatch_rate_period: u32,
}

impl DispatchRateFlags {
    fn body(&self) -> Value {
        json!({
            "dispatchThrottlingRateInMsg": self.msg_dispatch_rate,
            "dispatchThrottlingRateInByte": self.byte_dispatch_rate,
            "ratePeriodInSecond": self.dispatch_rate_period,
        })
    }
}

#[derive(Subcommand)]
pub enum BrokersCommand {
    /// Brokers of a cluster.
    List { cluster: String },
    /// `ok` when the broker can publish to its own heartbeat topic.
    Health,
}

struct Rest {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Rest {
    /// Performs a call and prints the result: JSON pretty-printed, text as
    /// is, nothing for an empty success.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<()> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = self.http.request(m, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let reason = parsed
                .as_ref()
                .and_then(|v| v.get("reason"))
                .and_then(Value::as_str)
                .map_or(text.clone(), str::to_string);
            anyhow::bail!("{status}: {reason}");
        }
        match parsed {
            Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            None if !text.is_empty() => println!("{text}"),
            None => {}
        }
        Ok(())
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

fn ns_path(ns: &str) -> anyhow::Result<String> {
    let ns: NamespaceName = ns.parse()?;
    Ok(format!("/admin/v2/namespaces/{ns}"))
}

/// `/admin/v2/{domain}/{tenant}/{ns}/{encoded local name}`.
fn topic_path(topic: &str) -> anyhow::Result<String> {
    let t: TopicName = topic.parse()?;
    Ok(format!(
        "/admin/v2/{}/{}/{}",
        t.domain(),
        t.namespace(),
        encode_segment(t.local_name())
    ))
}

pub async fn run(url: String, token: Option<String>, command: RestCommand) -> anyhow::Result<()> {
    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?,
        url,
        token,
    };
    match command {
        RestCommand::Clusters { command } => match command {
            ClustersCommand::List => rest.call("GET", "/admin/v2/clusters", None).await,
            ClustersCommand::Get { name } => {
                rest.call("GET", &format!("/admin/v2/clusters/{name}"), None)
                    .await
            }
            ClustersCommand::Create { name, data } => {
                rest.call(
                    "PUT",
                    &format!("/admin/v2/clusters/{name}"),
                    Some(data.body()),
                )
                .await
            }
            ClustersCommand::Update { name, data } => {
                rest.call(
                    "POST",
                    &format!("/admin/v2/clusters/{name}"),
                    Some(data.body()),
                )
                .await
            }
            ClustersCommand::Delete { name } => {
                rest.call("DELETE", &format!("/admin/v2/clusters/{name}"), None)
                    .await
            }
        },
        RestCommand::Tenants { command } => match command {
            TenantsCommand::List => rest.call("GET", "/admin/v2/tenants", None).await,
            TenantsCommand::Get { name } => {
                rest.call("GET", &format!("/admin/v2/tenants/{name}"), None)
                    .await
            }
            TenantsCommand::Create {
                name,
                admin_roles,
                allowed_clusters,
            } => {
                let body = json!({
                    "adminRoles": list(&admin_roles),
                    "allowedClusters": list(&allowed_clusters),
                });
                rest.call("PUT", &format!("/admin/v2/tenants/{name}"), Some(body))
                    .await
            }
            TenantsCommand::Delete { name } => {
                rest.call("DELETE", &format!("/admin/v2/tenants/{name}"), None)
                    .await
            }
        },
        RestCommand::Namespaces { command } => run_namespaces(&rest, command).await,
        RestCommand::Topics { command } => run_topics(&rest, command).await,
        RestCommand::Brokers { command } => match command {
            BrokersCommand::List { cluster } => {
                rest.call("GET", &format!("/admin/v2/brokers/{cluster}"), None)
                    .await
            }
            BrokersCommand::Health => rest.call("GET", "/admin/v2/brokers/health", None).await,
        },
        RestCommand::Geo {
            command: GeoCommand::Status,
        } => rest.call("GET", "/admin/v2/geo/status", None).await,
    }
}

async fn run_namespaces(rest: &Rest, command: NamespacesCommand) -> anyhow::Result<()> {
    match command {
        NamespacesCommand::List { tenant } => {
            rest.call("GET", &format!("/admin/v2/namespaces/{tenant}"), None)
                .await
        }
        NamespacesCommand::Get { namespace } => rest.call("GET", &ns_path(&namespace)?, None).await,
        NamespacesCommand::Create { namespace } => {
            rest.call("PUT", &ns_path(&namespace)?, None).await
        }
        NamespacesCommand::Delete { namespace } => {
            rest.call("DELETE", &ns_path(&namespace)?, None).await
        }
        NamespacesCommand::Topics { namespace } => {
            rest.call("GET", &format!("{}/topics", ns_path(&namespace)?), None)
                .await
        }
        NamespacesCommand::SetRetention {
            namespace,
            time_minutes,
            size_mb,
        } => {
            let body = json!({
                "retentionTimeInMinutes": time_minutes,
                "retentionSizeInMB": size_mb,
            });
            rest.call(
                "POST",
                &format!("{}/retention", ns_path(&namespace)?),
                Some(body),
            )
            .await
        }
        NamespacesCommand::SetMessageTtl { namespace, seconds } => {
            rest.call(
                "POST",
                &format!("{}/messageTTL", ns_path(&namespace)?),
                Some(json!(seconds)),
            )
            .await
        }
        NamespacesCommand::SetPolicy {
            namespace,
            policy,
            value,
        } => {
            let v: Value = serde_json::from_str(&value).context("the value must be JSON")?;
            rest.call(
                "POST",
                &format!("{}/{policy}", ns_path(&namespace)?),
                Some(v),
            )
            .await
        }
        NamespacesCommand::GetPolicy { namespace, policy } => {
            rest.call("GET", &format!("{}/{policy}", ns_path(&namespace)?), None)
                .await
        }
        NamespacesCommand::Grant {
            namespace,
            role,
            actions,
        } => {
            rest.call(
                "POST",
                &format!("{}/permissions/{role}", ns_path(&namespace)?),
                Some(json!(list(&actions))),
            )
            .await
        }
        NamespacesCommand::SetClusters {
            namespace,
            clusters,
        } => {
            rest.call(
                "POST",
                &format!("{}/replication", ns_path(&namespace)?),
                Some(json!(list(&clusters))),
            )
            .await
        }
        NamespacesCommand::SetReplicatorDispatchRate { namespace, rate } => {
            rest.call(
                "POST",
                &format!("{}/replicatorDispatchRate", ns_path(&namespace)?),
                Some(rate.body()),
            )
            .await
        }
        NamespacesCommand::GetReplicatorDispatchRate { namespace } => {
            rest.call(
                "GET",
                &format!("{}/replicatorDispatchRate", ns_path(&namespace)?),
                None,
            )
            .await
        }
        NamespacesCommand::RemoveReplicatorDispatchRate { namespace } => {
            rest.call(
                "DELETE",
                &format!("{}/replicatorDispatchRate", ns_path(&namespace)?),
                None,
            )
            .await
        }
        NamespacesCommand::GetClusters { namespace } => {
            rest.call(
                "GET",
                &format!("{}/replication", ns_path(&namespace)?),
                None,
            )
            .await
        }
        NamespacesCommand::Revoke { namespace, role } => {
            rest.call(
                "DELETE",
                &format!("{}/permissions/{role}", ns_path(&namespace)?),
                None,
            )
            .await
        }
    }
}

async fn run_topics(rest: &Rest, command: TopicsCommand) -> anyhow::Result<()> {
    match command {
        TopicsCommand::List { namespace } => {
            let ns: NamespaceName = namespace.parse()?;
            rest.call("GET", &format!("/admin/v2/persistent/{ns}"), None)
                .await
        }
        TopicsCommand::Create { topic, partitions } => {
            let p = topic_path(&topic)?;
            match partitions {
                Some(n) => {
                    rest.call("PUT", &format!("{p}/partitions"), Some(json!(n)))
                        .await
                }
                None => rest.call("PUT", &p, None).await,
            }
        }
        TopicsCommand::UpdatePartitions { topic, partitions } => {
            let p = topic_path(&topic)?;
            rest.call("POST", &format!("{p}/partitions"), Some(json!(partitions)))
                .await
        }
        TopicsCommand::Partitions { topic } => {
            rest.call("GET", &format!("{}/partitions", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::Delete {
            topic,
            force,
            partitioned,
        } => {
            let p = topic_path(&topic)?;
            let p = if partitioned {
                format!("{p}/partitions")
            } else {
                p
            };
            rest.call("DELETE", &format!("{p}?force={force}"), None)
                .await
        }
        TopicsCommand::Stats { topic } => {
            rest.call("GET", &format!("{}/stats", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::PartitionedStats { topic } => {
            let p = topic_path(&topic)?;
            rest.call("GET", &format!("{p}/partitioned-stats"), None)
                .await
        }
        TopicsCommand::InternalStats { topic } => {
            let p = topic_path(&topic)?;
            rest.call("GET", &format!("{p}/internalStats"), None).await
        }
        TopicsCommand::Subscriptions { topic } => {
            let p = topic_path(&topic)?;
            rest.call("GET", &format!("{p}/subscriptions"), None).await
        }
        TopicsCommand::CreateSubscription {
            topic,
            subscription,
            from,
        } => {
            let body = match from.parse::<u64>() {
                Ok(o) => json!({ "offset": o }),
                Err(_) => json!(from),
            };
            let p = topic_path(&topic)?;
            let s = encode_segment(&subscription);
            rest.call("PUT", &format!("{p}/subscription/{s}"), Some(body))
                .await
        }
        TopicsCommand::DeleteSubscription {
            topic,
            subscription,
            force,
        } => {
            let p = topic_path(&topic)?;
            let s = encode_segment(&subscription);
            rest.call(
                "DELETE",
                &format!("{p}/subscription/{s}?force={force}"),
                None,
            )
            .await
        }
        TopicsCommand::Skip {
            topic,
            subscription,
            count,
        } => {
            let p = topic_path(&topic)?;
            let s = encode_segment(&subscription);
            rest.call("POST", &format!("{p}/subscription/{s}/skip/{count}"), None)
                .await
        }
        TopicsCommand::SkipAll {
            topic,
            subscription,
        } => {
            let p = topic_path(&topic)?;
            let s = encode_segment(&subscription);
            rest.call("POST", &format!("{p}/subscription/{s}/skip_all"), None)
                .await
        }
        TopicsCommand::ResetCursor {
            topic,
            subscription,
            offset,
        } => {
            let p = topic_path(&topic)?;
            let s = encode_segment(&subscription);
            rest.call(
                "POST",
                &format!("{p}/subscription/{s}/resetcursor"),
                Some(json!({ "offset": offset })),
            )
            .await
        }
        TopicsCommand::Unload { topic } => {
            rest.call("PUT", &format!("{}/unload", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::Route {
            topic,
            exchange,
            routing_key,
        } => {
            let mut body = json!({ "exchange": exchange });
            if let Some(k) = routing_key {
                body["routingKey"] = json!(k);
            }
            rest.call("PUT", &format!("{}/route", topic_path(&topic)?), Some(body))
                .await
        }
        TopicsCommand::GetRoute { topic } => {
            rest.call("GET", &format!("{}/route", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::RemoveRoute { topic } => {
            rest.call("DELETE", &format!("{}/route", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::Offload { topic } => {
            rest.call("PUT", &format!("{}/offload", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::OffloadStatus { topic } => {
            rest.call("GET", &format!("{}/offload", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::SetReplicationClusters { topic, clusters } => {
            rest.call(
                "POST",
                &format!("{}/replication", topic_path(&topic)?),
                Some(json!(list(&clusters))),
            )
            .await
        }
        TopicsCommand::GetReplicationClusters { topic } => {
            rest.call("GET", &format!("{}/replication", topic_path(&topic)?), None)
                .await
        }
        TopicsCommand::RemoveReplicationClusters { topic } => {
            rest.call(
                "DELETE",
                &format!("{}/replication", topic_path(&topic)?),
                None,
            )
            .await
        }
        TopicsCommand::SetReplicatorDispatchRate { topic, rate } => {
            rest.call(
                "POST",
                &format!("{}/replicatorDispatchRate", topic_path(&topic)?),
                Some(rate.body()),
            )
            .await
        }
        TopicsCommand::GetReplicatorDispatchRate { topic } => {
            rest.call(
                "GET",
                &format!("{}/replicatorDispatchRate", topic_path(&topic)?),
                None,
            )
            .await
        }
        TopicsCommand::RemoveReplicatorDispatchRate { topic } => {
            rest.call(
                "DELETE",
                &format!("{}/replicatorDispatchRate", topic_path(&topic)?),
                None,
            )
            .await
        }
        TopicsCommand::Lookup { topic } => {
            let t: TopicName = topic.parse()?;
            let path = format!(
                "/lookup/v2/topic/{}/{}/{}",
                t.domain(),
                t.namespace(),
                encode_segment(t.local_name())
            );
            rest.call("GET", &path, None).await
        }
    }
}
