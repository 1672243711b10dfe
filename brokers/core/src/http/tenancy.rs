//! Clusters, tenants and namespaces: their records, policies and
//! permissions.

use super::*;

// ---- clusters ----

pub(super) async fn list_clusters(State(b): State<Broker>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(b.tenancy().list_clusters().await?))
}

pub(super) async fn get_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
) -> ApiResult<Json<ClusterData>> {
    Ok(Json(b.tenancy().get_cluster(&c).await?.redacted()))
}

pub(super) async fn create_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let data: ClusterData = body(&raw)?;
    b.tenancy().create_cluster(&c, &data).await?;
    Ok(no_content())
}

pub(super) async fn update_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let data: ClusterData = body(&raw)?;
    b.tenancy().update_cluster(&c, data).await?;
    Ok(no_content())
}

pub(super) async fn delete_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
) -> ApiResult<Response> {
    if let Some(t) = b.topics_replicating_to(&c).await?.first() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("cluster {c} is not empty: topic {t} replicates to it"),
        ));
    }
    b.tenancy().delete_cluster(&c).await?;
    Ok(no_content())
}

// ---- tenants ----

pub(super) async fn list_tenants(State(b): State<Broker>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(b.tenancy().list_tenants().await?))
}

pub(super) async fn get_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
) -> ApiResult<Json<TenantInfo>> {
    Ok(Json(b.tenancy().get_tenant(&t).await?))
}

/// An absent body means "no admin roles, this cluster".
pub(super) fn tenant_body(b: &Broker, raw: &Bytes) -> ApiResult<TenantInfo> {
    let mut info: TenantInfo = if raw.is_empty() {
        TenantInfo::default()
    } else {
        body(raw)?
    };
    if info.allowed_clusters.is_empty() {
        info.allowed_clusters.insert(b.config().cluster.clone());
    }
    Ok(info)
}

pub(super) async fn create_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let info = tenant_body(&b, &raw)?;
    b.tenancy().create_tenant(&t, &info).await?;
    Ok(no_content())
}

pub(super) async fn update_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let info = tenant_body(&b, &raw)?;
    b.tenancy().update_tenant(&t, info).await?;
    Ok(no_content())
}

pub(super) async fn delete_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
) -> ApiResult<Response> {
    b.tenancy().delete_tenant(&t).await?;
    Ok(no_content())
}

// ---- namespaces ----

pub(super) async fn list_namespaces(
    State(b): State<Broker>,
    Path(t): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    b.tenancy().get_tenant(&t).await?;
    let names = b.tenancy().list_namespaces(&t).await?;
    Ok(Json(names.iter().map(ToString::to_string).collect()))
}

pub(super) async fn get_namespace(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
) -> ApiResult<Json<Policies>> {
    Ok(Json(b.tenancy().get_policies(&namespace(&t, &ns)?).await?))
}

pub(super) async fn create_namespace(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
    raw: Bytes,
) -> ApiResult<Response> {
    let ns = namespace(&t, &ns)?;
    let mut policies: Policies = if raw.is_empty() {
        Policies::default()
    } else {
        body(&raw)?
    };
    if policies.replication_clusters.is_empty() {
        policies
            .replication_clusters
            .insert(b.config().cluster.clone());
    }
    check_replication(&b, &ns, &policies.replication_clusters).await?;
    b.tenancy().create_namespace(&ns, &policies).await?;
    Ok(no_content())
}

pub(super) async fn delete_namespace(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
) -> ApiResult<Response> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    let topics = b.list_topics(&ns).await?;
    let partitioned = b.list_partitioned_topics(&ns).await?;
    if !topics.is_empty() || !partitioned.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("namespace {ns} still has topics"),
        ));
    }
    b.tenancy().delete_namespace(&ns).await?;
    Ok(no_content())
}

pub(super) async fn namespace_topics(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    let topics = b.list_topics(&ns).await?;
    Ok(Json(topics.iter().map(ToString::to_string).collect()))
}

/// Policy sub-resources and the `Policies` field each one sets.
pub(super) fn policy_field(name: &str) -> Option<&'static str> {
    Some(match name {
        "retention" => "retention_policies",
        "messageTTL" => "message_ttl_in_seconds",
        "backlogQuotaMap" => "backlog_quota_map",
        "replication" => "replication_clusters",
        "permissions" => "auth_policies",
        "bundles" => "bundles",
        "offloadThreshold" => "offload_threshold",
        "offloadDeletionLagMs" => "offload_deletion_lag_ms",
        "offloadThresholdInSeconds" => "offload_threshold_in_seconds",
        "maxProducersPerTopic" => "max_producers_per_topic",
        "maxConsumersPerTopic" => "max_consumers_per_topic",
        "maxConsumersPerSubscription" => "max_consumers_per_subscription",
        "maxTopicsPerNamespace" => "max_topics_per_namespace",
        "maxConnectionsPerBroker" => "max_connections_per_broker",
        "publishRate" => "publish_max_message_rate",
        "deduplication" => "deduplication_enabled",
        "backlogQuota" => "backlog_quota_map",
        "replicatorDispatchRate" => "replicator_dispatch_rate",
        _ => return None,
    })
}

pub(super) fn policy_or_404(name: &str) -> ApiResult<&'static str> {
    policy_field(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no namespace policy {name:?}"),
        )
    })
}

pub(super) async fn get_policy(
    State(b): State<Broker>,
    Path((t, ns, policy)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let field = policy_or_404(&policy)?;
    let p = b.tenancy().get_policies(&namespace(&t, &ns)?).await?;
    let v = serde_json::to_value(&p).unwrap_or(Value::Null);
    let value = match (policy.as_str(), v.get(field)) {
        ("backlogQuota", Some(map)) => map
            .get(magnetar_tenancy::policies::BACKLOG_QUOTA_STORAGE)
            .cloned()
            .unwrap_or(Value::Null),
        (_, Some(v)) => v.clone(),
        (_, None) => Value::Null,
    };
    if value.is_null() {
        return Ok(no_content());
    }
    Ok(Json(value).into_response())
}

/// Sets one policy field: the body is the field's value, checked by
/// parsing the whole policy set again.
pub(super) async fn set_policy(
    State(b): State<Broker>,
    Path((t, ns, policy)): Path<(String, String, String)>,
    raw: Bytes,
) -> ApiResult<Response> {
    let field = policy_or_404(&policy)?;
    let value: Value = body(&raw)?;
    let ns = namespace(&t, &ns)?;
    let value = if policy == "backlogQuota" {
        json!({ magnetar_tenancy::policies::BACKLOG_QUOTA_STORAGE: value })
    } else {
        value
    };
    apply_policy(&b, &ns, field, Some(value)).await
}

pub(super) async fn remove_policy(
    State(b): State<Broker>,
    Path((t, ns, policy)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let field = policy_or_404(&policy)?;
    apply_policy(&b, &namespace(&t, &ns)?, field, None).await
}

/// The clusters a namespace replicates to: registered, allowed to its
/// tenant, and this one among them (its brokers serve the namespace).
pub(super) async fn check_replication(
    b: &Broker,
    ns: &NamespaceName,
    clusters: &std::collections::BTreeSet<String>,
) -> ApiResult<()> {
    let local = &b.config().cluster;
    if !clusters.contains(local) {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("the replication clusters of {ns} must include this cluster, {local}"),
        ));
    }
    b.tenancy()
        .check_replication_clusters(ns.tenant(), clusters)
        .await?;
    Ok(())
}

pub(super) async fn apply_policy(
    b: &Broker,
    ns: &NamespaceName,
    field: &str,
    value: Option<Value>,
) -> ApiResult<Response> {
    let value = if field == "replication_clusters" {
        // Removing the policy leaves the namespace in this cluster alone.
        let clusters: std::collections::BTreeSet<String> = match &value {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| ApiError::bad_request(format!("replication clusters: {e}")))?,
            None => [b.config().cluster.clone()].into(),
        };
        check_replication(b, ns, &clusters).await?;
        Some(json!(clusters))
    } else {
        value
    };
    let mut parse_error = None;
    let r = b
        .tenancy()
        .modify_policies(ns, |p| {
            let mut v = serde_json::to_value(&*p).unwrap_or(Value::Null);
            let Some(obj) = v.as_object_mut() else {
                return Ok(());
            };
            match &value {
                Some(x) => obj.insert(field.to_string(), x.clone()),
                None => obj.remove(field),
            };
            match serde_json::from_value::<Policies>(v) {
                Ok(new) => *p = new,
                Err(e) => {
                    parse_error = Some(e.to_string());
                    return Err(TenancyError::InvalidPolicy(e.to_string()));
                }
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) => Ok(no_content()),
        Err(TenancyError::InvalidPolicy(m)) => Err(ApiError::bad_request(
            parse_error.map_or(m, |e| format!("invalid value for {field}: {e}")),
        )),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn grant_permission(
    State(b): State<Broker>,
    Path((t, ns, role)): Path<(String, String, String)>,
    raw: Bytes,
) -> ApiResult<Response> {
    let actions: std::collections::BTreeSet<magnetar_tenancy::AuthAction> = body(&raw)?;
    b.tenancy()
        .modify_policies(&namespace(&t, &ns)?, |p| {
            p.auth_policies
                .namespace_auth
                .insert(role.clone(), actions.clone());
            Ok(())
        })
        .await?;
    Ok(no_content())
}

pub(super) async fn revoke_permission(
    State(b): State<Broker>,
    Path((t, ns, role)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    b.tenancy()
        .modify_policies(&namespace(&t, &ns)?, |p| {
            p.auth_policies.namespace_auth.remove(&role);
            Ok(())
        })
        .await?;
    Ok(no_content())
}
