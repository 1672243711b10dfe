//! The admin REST API on the HTTP listener, following Pulsar's paths and
//! JSON shapes where Pulsar has them.
//!
//! Errors are JSON `{"reason": "..."}`. Unknown names answer 404 and names
//! that can never be valid answer 400; a topic owned by another broker
//! answers 307 to that broker, as Pulsar's admin API does.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use magnetar_tenancy::{
    AuthAction, ClusterData, NamespaceName, Policies, TenancyError, TenantInfo, TopicDomain,
    TopicName,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::error::BrokerError;
use crate::service::Broker;
use crate::subscription::{InitialPosition, ResetTo, SubscriptionOptions, SubscriptionType};

/// An error as the admin API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: String,
    location: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            reason: reason.into(),
            location: None,
        }
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({ "reason": self.reason }))).into_response();
        if let Some(loc) = self.location.and_then(|l| l.parse().ok()) {
            r.headers_mut().insert(header::LOCATION, loc);
        }
        r
    }
}

fn tenancy_status(e: &TenancyError) -> StatusCode {
    match e {
        TenancyError::InvalidName(_) | TenancyError::InvalidPolicy(_) => StatusCode::BAD_REQUEST,
        TenancyError::NotFound(_) => StatusCode::NOT_FOUND,
        TenancyError::AlreadyExists(_) | TenancyError::NotEmpty(_) | TenancyError::Conflict(_) => {
            StatusCode::CONFLICT
        }
        TenancyError::Meta(_) => StatusCode::SERVICE_UNAVAILABLE,
        TenancyError::Corrupt { .. } | TenancyError::InvalidKey(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        TenancyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
    }
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        ApiError::new(tenancy_status(&e), e.to_string())
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let status = status_of(&e);
        let location = match &e {
            BrokerError::NotOwner { owner, .. } => owner.clone(),
            _ => None,
        };
        ApiError {
            status,
            reason: e.to_string(),
            location,
        }
    }
}

/// The HTTP status of a broker error, after Pulsar's admin API: one map
/// for every HTTP surface (the admin API here, the WebSocket API's
/// refusals before the upgrade).
pub fn status_of(e: &BrokerError) -> StatusCode {
    match e {
        BrokerError::Tenancy(t) => tenancy_status(t),
        BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
        BrokerError::AlreadyExists(_)
        | BrokerError::ConsumerBusy(_)
        | BrokerError::OutOfOrderSequence(_)
        | BrokerError::ProducerFenced(_) => StatusCode::CONFLICT,
        BrokerError::InvalidArgument(_) | BrokerError::CorruptBatch(_) => StatusCode::BAD_REQUEST,
        BrokerError::PreconditionFailed(_) | BrokerError::QuotaExceeded(_) => {
            StatusCode::PRECONDITION_FAILED
        }
        BrokerError::AccessRefused(_) => StatusCode::FORBIDDEN,
        BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        // Sent where the owner is; with none known yet, a retry later.
        BrokerError::NotOwner { owner: Some(_), .. } => StatusCode::TEMPORARY_REDIRECT,
        BrokerError::NotOwner { owner: None, .. }
        | BrokerError::TopicUnavailable(_)
        | BrokerError::OffloadUnavailable(_)
        | BrokerError::ShuttingDown
        | BrokerError::Bookie(_)
        | BrokerError::Meta(_) => StatusCode::SERVICE_UNAVAILABLE,
        BrokerError::CorruptMetadata { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn namespace(t: &str, ns: &str) -> ApiResult<NamespaceName> {
    Ok(NamespaceName::new(t, ns)?)
}

fn topic_name(domain: &str, t: &str, ns: &str, topic: &str) -> ApiResult<TopicName> {
    let domain = TopicDomain::parse(domain)?;
    Ok(namespace(t, ns)?.topic(domain, topic)?)
}

/// Redirects to the owner when this broker does not own the topic.
async fn owned(b: &Broker, topic: &TopicName, uri: &Uri) -> ApiResult<()> {
    let owner = b.lookup(topic).await?;
    if owner.id == b.info().id {
        return Ok(());
    }
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    Err(ApiError {
        status: StatusCode::TEMPORARY_REDIRECT,
        reason: format!("{topic} is served by {}", owner.http_url),
        location: Some(format!("{}{path}", owner.http_url.trim_end_matches('/'))),
    })
}

/// The largest batch a broker takes from another that received it: room
/// for the largest message any protocol accepts (AMQP's 128 MiB bodies,
/// Kafka's 100 MiB requests) with its headers. Other routes keep axum's
/// 2 MiB.
pub const MAX_FORWARDED_BATCH: usize = 160 << 20;

pub fn router(broker: Broker) -> Router {
    let topics = Router::new()
        .route("/{domain}/{tenant}/{ns}", get(list_topics))
        .route("/{domain}/{tenant}/{ns}/partitioned", get(list_partitioned))
        .route(
            "/{domain}/{tenant}/{ns}/{topic}",
            put(create_topic).delete(delete_topic),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/partitions",
            put(create_partitioned)
                .post(update_partitions)
                .get(get_partitions)
                .delete(delete_topic),
        )
        .route("/{domain}/{tenant}/{ns}/{topic}/stats", get(topic_stats))
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/partitioned-stats",
            get(partitioned_stats),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/internalStats",
            get(internal_stats),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/partitioned-internalStats",
            get(partitioned_internal_stats),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscriptions",
            get(list_subscriptions),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscription/{sub}",
            put(create_subscription).delete(delete_subscription),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscription/{sub}/skip/{n}",
            post(skip),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscription/{sub}/skip_all",
            post(skip_all),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscription/{sub}/resetcursor",
            post(reset_cursor),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/subscription/{sub}/resetcursor/{timestamp}",
            post(reset_cursor_to_time),
        )
        .route("/{domain}/{tenant}/{ns}/{topic}/unload", put(unload))
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/offload",
            put(trigger_offload).get(offload_status),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/route",
            get(get_route)
                .post(set_route)
                .put(set_route)
                .delete(delete_route),
        );
    Router::new()
        .route("/admin/v2/clusters", get(list_clusters))
        .route(
            "/admin/v2/clusters/{cluster}",
            get(get_cluster)
                .put(create_cluster)
                .post(update_cluster)
                .delete(delete_cluster),
        )
        .route("/admin/v2/tenants", get(list_tenants))
        .route(
            "/admin/v2/tenants/{tenant}",
            get(get_tenant)
                .put(create_tenant)
                .post(update_tenant)
                .delete(delete_tenant),
        )
        .route("/admin/v2/namespaces/{tenant}", get(list_namespaces))
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}",
            get(get_namespace)
                .put(create_namespace)
                .delete(delete_namespace),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/topics",
            get(namespace_topics),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/permissions/{role}",
            post(grant_permission).delete(revoke_permission),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{ns}/{policy}",
            get(get_policy)
                .post(set_policy)
                .put(set_policy)
                .delete(remove_policy),
        )
        .nest("/admin/v2", topics)
        .route("/admin/v2/brokers/health", get(health))
        .route("/admin/v2/brokers/ready", get(ready))
        .route("/admin/v2/brokers/{cluster}", get(list_brokers))
        .route(
            "/lookup/v2/topic/{domain}/{tenant}/{ns}/{topic}",
            get(lookup),
        )
        .route("/topics/{domain}/{tenant}/{ns}/{topic}", post(rest_produce))
        .route(
            "/internal/v1/batch/{tenant}/{ns}/{domain}/{topic}",
            post(forwarded_batch).layer(axum::extract::DefaultBodyLimit::max(MAX_FORWARDED_BATCH)),
        )
        .route(
            "/topics/{domain}/{tenant}/{ns}/{topic}/messages",
            get(rest_read),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            broker.clone(),
            auth_guard,
        ))
        .with_state(broker)
}

/// The browser origins that may open WebSockets and send state-changing
/// requests to the HTTP listener. A browser attaches `Origin` to both, so
/// a page elsewhere cannot ride an operator's browser into the admin API
/// or a topic (cross-site WebSocket hijacking, CSRF), nor, by rebinding a
/// name to 127.0.0.1, the default listener. Clients that are not browsers
/// send no `Origin` and are not concerned.
#[derive(Clone, Debug)]
pub enum AllowedOrigins {
    Any,
    /// Lower-case `scheme://host[:port]`, as browsers send them.
    Only(std::collections::BTreeSet<String>),
}

impl AllowedOrigins {
    /// `*` allows any origin; otherwise the comma-separated origins given.
    pub fn parse(list: &[String]) -> Self {
        if list.iter().any(|o| o.trim() == "*") {
            return AllowedOrigins::Any;
        }
        AllowedOrigins::Only(
            list.iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        )
    }

    /// The listener's own origins: its loopback names on `port`, and
    /// the address it advertises; with HTTPS, the same on `https` (its
    /// port, and its advertised HOST:PORT).
    pub fn own(port: u16, advertised: &str, https: Option<(u16, &str)>) -> Self {
        let bare = |a: &str| {
            a.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_ascii_lowercase()
        };
        let loopback = ["127.0.0.1", "localhost", "[::1]"];
        let mut set: std::collections::BTreeSet<String> = loopback
            .iter()
            .map(|h| format!("http://{h}:{port}"))
            .collect();
        set.insert(format!("http://{}", bare(advertised)));
        if let Some((port, advertised)) = https {
            set.extend(loopback.iter().map(|h| format!("https://{h}:{port}")));
            set.insert(format!("https://{}", bare(advertised)));
        }
        AllowedOrigins::Only(set)
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::Only(set) => {
                set.contains(&origin.trim_end_matches('/').to_ascii_lowercase())
            }
        }
    }
}

/// Refuses, with 403, a WebSocket upgrade or a request that changes state
/// whose `Origin` is not allowed. Reads need no check: without CORS
/// headers a browser keeps their answers from other origins' pages.
pub async fn origin_guard(
    State(allowed): State<std::sync::Arc<AllowedOrigins>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return next.run(req).await;
    };
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !upgrade && !changes {
        return next.run(req).await;
    }
    match origin.to_str() {
        Ok(o) if allowed.allows(o) => next.run(req).await,
        o => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "origin {} may not use this listener (see --allowed-origins)",
                o.unwrap_or("?")
            ),
        )
        .into_response(),
    }
}

/// What a request needs when authentication is on, from its method and
/// raw path (before percent-decoding: valid tenant and namespace names
/// hold no `%`, so an encoded one is refused rather than decoded).
#[derive(Debug, PartialEq, Eq)]
enum Access {
    /// Health and readiness, for load balancers and orchestrators.
    Open,
    /// Not this router's: the WebSocket API and MQTT over WebSocket check
    /// their own credentials, and the console is static files.
    Elsewhere,
    Superuser,
    /// A superuser or an admin role of the tenant.
    TenantAdmin(String),
    /// A grant in the namespace (tenant, namespace); `None`: produce or
    /// consume, as a lookup needs.
    Namespace(String, String, Option<AuthAction>),
}

fn access(method: &Method, path: &str) -> Access {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let tenant = |i: usize| seg.get(i).map(|t| t.to_string()).unwrap_or_default();
    let ns = |i: usize| Access::Namespace(tenant(i), tenant(i + 1), None);
    let with = |a: Access, action| match a {
        Access::Namespace(t, n, _) => Access::Namespace(t, n, Some(action)),
        other => other,
    };
    match seg.as_slice() {
        ["admin", "v2", "brokers", "health" | "ready"] => Access::Open,
        ["admin", "v2", "tenants", _] if method == Method::GET => Access::TenantAdmin(tenant(3)),
        ["admin", "v2", "namespaces", _, ..] => Access::TenantAdmin(tenant(3)),
        ["admin", "v2", "persistent" | "non-persistent", _, ..] => Access::TenantAdmin(tenant(3)),
        ["admin", ..] | ["internal", ..] => Access::Superuser,
        ["lookup", "v2", "topic", _, _, _, _] => ns(4),
        ["topics", _, _, _, _] => with(ns(2), AuthAction::Produce),
        ["topics", _, _, _, _, "messages"] => with(ns(2), AuthAction::Consume),
        ["topics", ..] | ["lookup", ..] => Access::Superuser,
        _ => Access::Elsewhere,
    }
}

/// The token of an `Authorization: Bearer` header, trimmed.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// A WebSocket client's token: `Authorization: Bearer`, a `bearer.<jwt>`
/// subprotocol (a browser may set no header on a WebSocket, and a
/// subprotocol keeps the token out of URLs), or else `query_token`, the
/// `?token=` that Pulsar's clients use.
pub fn upgrade_token<'a>(
    headers: &'a axum::http::HeaderMap,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    let offered = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix("bearer."))
            .filter(|t| !t.is_empty())
    };
    bearer(headers)
        .or_else(offered)
        .or_else(|| query_token.filter(|t| !t.is_empty()))
}

/// With authentication on, every route of this router but health and
/// readiness takes a bearer token, as Pulsar's clients send it (or, over
/// HTTPS, a client certificate the CA verified): 401
/// without a valid one, 403 when its role may not do what the path asks
/// (see [`access`]).
async fn auth_guard(
    State(b): State<Broker>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !b.auth_enabled() {
        return next.run(req).await;
    }
    let need = access(req.method(), req.uri().path());
    if matches!(need, Access::Open | Access::Elsewhere) {
        return next.run(req).await;
    }
    let token = bearer(req.headers());
    let certificate = crate::listener::PeerCertificate::of(&req);
    if token.is_none() && certificate.is_none() {
        return ApiError::new(StatusCode::UNAUTHORIZED, "authentication required").into_response();
    }
    let creds = magnetar_tenancy::Credentials {
        user: None,
        secret: token.map(str::as_bytes),
        certificate,
    };
    let principal = match b.authenticate(&creds) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match authorized(&b, &principal, need).await {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn authorized(b: &Broker, p: &Principal, need: Access) -> ApiResult<()> {
    let forbidden = |why: String| ApiError::new(StatusCode::FORBIDDEN, why);
    match need {
        Access::Open | Access::Elsewhere => Ok(()),
        Access::Superuser if b.is_superuser(p) => Ok(()),
        Access::Superuser => Err(forbidden("the role is not a superuser".into())),
        Access::TenantAdmin(t) => {
            if b.is_superuser(p) {
                return Ok(());
            }
            if magnetar_tenancy::names::validate_segment("tenant", &t).is_err() {
                return Err(forbidden(format!("not an admin of tenant {t:?}")));
            }
            match b.is_tenant_admin(p, &t).await {
                Ok(true) => Ok(()),
                Ok(false) | Err(BrokerError::NotFound(_)) => {
                    Err(forbidden(format!("not an admin of tenant {t}")))
                }
                Err(e) => Err(e.into()),
            }
        }
        Access::Namespace(t, n, action) => {
            let ns = namespace(&t, &n)?;
            let grants = match b.grants(p, &ns).await {
                Ok(g) => g,
                // Whether a namespace exists is for its users to know.
                Err(BrokerError::NotFound(_)) if !b.is_superuser(p) => {
                    return Err(forbidden(format!("not authorized in {ns}")))
                }
                Err(e) => return Err(e.into()),
            };
            match action {
                Some(a) => grants.check(a, || ns.to_string())?,
                None if grants.any() => {}
                None => return Err(forbidden(format!("not authorized to look up in {ns}"))),
            }
            Ok(())
        }
    }
}

// ---- clusters ----

async fn list_clusters(State(b): State<Broker>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(b.tenancy().list_clusters().await?))
}

async fn get_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
) -> ApiResult<Json<ClusterData>> {
    Ok(Json(b.tenancy().get_cluster(&c).await?))
}

async fn create_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let data: ClusterData = body(&raw)?;
    b.tenancy().create_cluster(&c, &data).await?;
    Ok(no_content())
}

async fn update_cluster(
    State(b): State<Broker>,
    Path(c): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let data: ClusterData = body(&raw)?;
    b.tenancy().update_cluster(&c, data).await?;
    Ok(no_content())
}

async fn delete_cluster(State(b): State<Broker>, Path(c): Path<String>) -> ApiResult<Response> {
    b.tenancy().delete_cluster(&c).await?;
    Ok(no_content())
}

// ---- tenants ----

async fn list_tenants(State(b): State<Broker>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(b.tenancy().list_tenants().await?))
}

async fn get_tenant(State(b): State<Broker>, Path(t): Path<String>) -> ApiResult<Json<TenantInfo>> {
    Ok(Json(b.tenancy().get_tenant(&t).await?))
}

/// An absent body means "no admin roles, this cluster".
fn tenant_body(b: &Broker, raw: &Bytes) -> ApiResult<TenantInfo> {
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

async fn create_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let info = tenant_body(&b, &raw)?;
    b.tenancy().create_tenant(&t, &info).await?;
    Ok(no_content())
}

async fn update_tenant(
    State(b): State<Broker>,
    Path(t): Path<String>,
    raw: Bytes,
) -> ApiResult<Response> {
    let info = tenant_body(&b, &raw)?;
    b.tenancy().update_tenant(&t, info).await?;
    Ok(no_content())
}

async fn delete_tenant(State(b): State<Broker>, Path(t): Path<String>) -> ApiResult<Response> {
    b.tenancy().delete_tenant(&t).await?;
    Ok(no_content())
}

// ---- namespaces ----

async fn list_namespaces(
    State(b): State<Broker>,
    Path(t): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    b.tenancy().get_tenant(&t).await?;
    let names = b.tenancy().list_namespaces(&t).await?;
    Ok(Json(names.iter().map(ToString::to_string).collect()))
}

async fn get_namespace(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
) -> ApiResult<Json<Policies>> {
    Ok(Json(b.tenancy().get_policies(&namespace(&t, &ns)?).await?))
}

async fn create_namespace(
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
    b.tenancy().create_namespace(&ns, &policies).await?;
    Ok(no_content())
}

async fn delete_namespace(
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

async fn namespace_topics(
    State(b): State<Broker>,
    Path((t, ns)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    let topics = b.list_topics(&ns).await?;
    Ok(Json(topics.iter().map(ToString::to_string).collect()))
}

/// Policy sub-resources and the `Policies` field each one sets.
fn policy_field(name: &str) -> Option<&'static str> {
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
        _ => return None,
    })
}

fn policy_or_404(name: &str) -> ApiResult<&'static str> {
    policy_field(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no namespace policy {name:?}"),
        )
    })
}

async fn get_policy(
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
async fn set_policy(
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

async fn remove_policy(
    State(b): State<Broker>,
    Path((t, ns, policy)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let field = policy_or_404(&policy)?;
    apply_policy(&b, &namespace(&t, &ns)?, field, None).await
}

async fn apply_policy(
    b: &Broker,
    ns: &NamespaceName,
    field: &str,
    value: Option<Value>,
) -> ApiResult<Response> {
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

async fn grant_permission(
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

async fn revoke_permission(
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

// ---- topics ----

async fn list_topics(
    State(b): State<Broker>,
    Path((domain, t, ns)): Path<(String, String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    if TopicDomain::parse(&domain)? == TopicDomain::NonPersistent {
        let loaded = b.loaded_topics().await;
        let mut names: Vec<String> = loaded
            .iter()
            .filter(|t| !t.name().is_persistent() && t.name().namespace() == &ns)
            .map(|t| t.name().to_string())
            .collect();
        names.sort();
        return Ok(Json(names));
    }
    let topics = b.list_topics(&ns).await?;
    Ok(Json(topics.iter().map(ToString::to_string).collect()))
}

async fn list_partitioned(
    State(b): State<Broker>,
    Path((_domain, t, ns)): Path<(String, String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    let topics = b.list_partitioned_topics(&ns).await?;
    Ok(Json(topics.iter().map(ToString::to_string).collect()))
}

type TopicPath = Path<(String, String, String, String)>;

async fn create_topic(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    b.tenancy().get_policies(name.namespace()).await?;
    if b.topic_exists(&name).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("topic {name} already exists"),
        ));
    }
    owned(&b, &name, &uri).await?;
    b.create_topic(&name).await?;
    Ok(no_content())
}

#[derive(Deserialize, Default)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_topic(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    Query(q): Query<ForceQuery>,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    if !b.topic_exists(&name).await? {
        return Err(ApiError::not_found(format!("topic {name} not found")));
    }
    if b.partitions(&name).await?.is_none() {
        owned(&b, &name, &uri).await?;
    }
    b.delete_topic(&name, q.force).await?;
    Ok(no_content())
}

async fn create_partitioned(b: State<Broker>, p: TopicPath, raw: Bytes) -> ApiResult<Response> {
    set_partitions(b, p, raw, true).await
}

async fn update_partitions(b: State<Broker>, p: TopicPath, raw: Bytes) -> ApiResult<Response> {
    set_partitions(b, p, raw, false).await
}

async fn set_partitions(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    raw: Bytes,
    create: bool,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let n: u32 = body(&raw)?;
    if create {
        b.create_partitioned_topic(&name, n).await?;
    } else {
        b.update_partitions(&name, n).await?;
    }
    Ok(no_content())
}

async fn get_partitions(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    match b.partitions(&name).await? {
        Some(n) => Ok(Json(json!({ "partitions": n }))),
        None if b.topic_exists(&name).await? => Ok(Json(json!({ "partitions": 0 }))),
        None => Err(ApiError::not_found(format!("topic {name} not found"))),
    }
}

/// Pulsar's admin API takes a partitioned topic's base name for its
/// partitions: `op` runs on each, on this broker for the partitions it
/// owns, and through their owners' admin API (`suffix` after the topic's
/// path, with `body`) for the others. `None` when `name` is not
/// partitioned. The answers come by partition; `None` for a partition
/// that answered 404 (not created yet, or without the subscription
/// addressed), which is no failure of the whole.
async fn on_partitions<F, Fut>(
    b: &Broker,
    name: &TopicName,
    method: Method,
    suffix: &str,
    body: &Bytes,
    op: F,
) -> ApiResult<Option<BTreeMap<String, Option<Value>>>>
where
    F: Fn(TopicName) -> Fut,
    Fut: std::future::Future<Output = ApiResult<Value>>,
{
    let Some(n) = b.partitions(name).await? else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    for i in 0..n {
        let p = name.partition(i);
        let owner = b.lookup(&p).await?;
        let answer = if owner.id == b.info().id {
            match op(p.clone()).await {
                Ok(v) => Some(v),
                Err(e) if e.status == StatusCode::NOT_FOUND => None,
                Err(e) => return Err(e),
            }
        } else {
            let path = format!(
                "/admin/v2/{}/{}/{}/{}/{suffix}",
                p.domain().as_str(),
                p.namespace().tenant(),
                p.namespace().namespace(),
                p.local_name()
            );
            let (status, answer) = b
                .admin_request(&owner, method.clone(), &path, body.clone())
                .await?;
            if status == 404 {
                None
            } else if (200..300).contains(&status) {
                Some(serde_json::from_slice(&answer).unwrap_or(Value::Null))
            } else {
                let reason = serde_json::from_slice::<Value>(&answer)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
                return Err(ApiError::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    format!("{p}: {reason}"),
                ));
            }
        };
        out.insert(p.to_string(), answer);
    }
    Ok(Some(out))
}

/// The answers of the partitions that had one.
fn answered(each: BTreeMap<String, Option<Value>>) -> BTreeMap<String, Value> {
    each.into_iter()
        .filter_map(|(p, v)| v.map(|v| (p, v)))
        .collect()
}

/// A PUT that acts on a topic here (redirecting to its owner), or on
/// each partition of a base name.
async fn put_on_topic<F, Fut>(
    b: &Broker,
    name: &TopicName,
    uri: &Uri,
    suffix: &str,
    op: F,
) -> ApiResult<Response>
where
    F: Fn(Broker, TopicName) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<()>>,
{
    let each = on_partitions(b, name, Method::PUT, suffix, &Bytes::new(), |p| {
        let done = op(b.clone(), p);
        async move { done.await.map(|()| Value::Null).map_err(Into::into) }
    })
    .await?;
    if each.is_none() {
        existing_topic(b, name, uri).await?;
        op(b.clone(), name.clone()).await?;
    }
    Ok(no_content())
}

/// Loads an existing topic here, redirecting to its owner if need be.
async fn existing_topic(
    b: &Broker,
    name: &TopicName,
    uri: &Uri,
) -> ApiResult<std::sync::Arc<crate::topic::Topic>> {
    if !b.topic_exists(name).await? {
        return Err(ApiError::not_found(format!("topic {name} not found")));
    }
    if b.partitions(name).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{name} is partitioned; address one of its partitions"),
        ));
    }
    owned(b, name, uri).await?;
    Ok(b.topic(name, false).await?)
}

async fn topic_stats(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    if b.partitions(&name).await?.is_some() {
        // Pulsar answers a base name with the partitioned stats.
        return Ok(partitioned_stats(State(b), Path((d, t, ns, topic)))
            .await?
            .into_response());
    }
    let topic = existing_topic(&b, &name, &uri).await?;
    Ok(Json(topic.stats().await?).into_response())
}

async fn partitioned_stats(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let each = on_partitions(&b, &name, Method::GET, "stats", &Bytes::new(), |p| {
        let b = b.clone();
        async move {
            if !b.topic_exists(&p).await? {
                return Err(ApiError::not_found(format!("topic {p} not found")));
            }
            Ok(serde_json::to_value(b.topic_stats(&p).await?).unwrap_or(Value::Null))
        }
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("partitioned topic {name} not found")))?;
    let n = each.len();
    let partitions = answered(each);
    let sum = |field: &str| -> u64 { partitions.values().filter_map(|s| s[field].as_u64()).sum() };
    Ok(Json(json!({
        "metadata": { "partitions": n },
        "msgInCounter": sum("msgInCounter"),
        "bytesInCounter": sum("bytesInCounter"),
        "storageSize": sum("storageSize"),
        "partitions": partitions,
    })))
}

async fn internal_stats(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    if b.partitions(&name).await?.is_some() {
        // As Pulsar's partitioned-internalStats.
        return partitioned_internal_stats(State(b), Path((d, t, ns, topic))).await;
    }
    let topic = existing_topic(&b, &name, &uri).await?;
    Ok(Json(internal_stats_of(&topic).await?))
}

async fn partitioned_internal_stats(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let each = on_partitions(
        &b,
        &name,
        Method::GET,
        "internalStats",
        &Bytes::new(),
        |p| {
            let b = b.clone();
            async move {
                if !b.topic_exists(&p).await? {
                    return Err(ApiError::not_found(format!("topic {p} not found")));
                }
                let topic = b.topic(&p, false).await?;
                internal_stats_of(&topic).await
            }
        },
    )
    .await?
    .ok_or_else(|| ApiError::not_found(format!("partitioned topic {name} not found")))?;
    Ok(Json(json!({
        "metadata": { "partitions": each.len() },
        "partitions": answered(each),
    })))
}

/// Pulsar's internal stats of one topic: its ledgers and cursors.
async fn internal_stats_of(topic: &crate::topic::Topic) -> ApiResult<Value> {
    let ledgers = topic.ledgers();
    let stats = topic.stats().await?;
    Ok(json!({
        "entriesAddedCounter": stats.msg_in_counter,
        "numberOfEntries": ledgers.iter().map(|l| l.entries).sum::<u64>(),
        "totalSize": stats.storage_size,
        "currentLedgerEntries": ledgers.last().map_or(0, |l| l.entries),
        "currentLedgerSize": ledgers.last().map_or(0, |l| l.size),
        "ledgers": ledgers.iter().map(|l| json!({
            "ledgerId": l.id,
            "entries": l.entries,
            "size": l.size,
            "firstOffset": l.first_offset,
            "offsets": l.offsets,
            "offloaded": l.offload.is_some(),
            "bookieDeleted": l.bookie_deleted,
            "offloadedObject": l.offload.as_ref().map(|o| o.object.clone()),
        })).collect::<Vec<_>>(),
        "cursors": stats.subscriptions.iter().map(|(k, s)| (k.clone(), json!({
            "markDeleteOffset": s.mark_delete_offset,
            "readOffset": s.read_offset,
        }))).collect::<BTreeMap<_, _>>(),
    }))
}

/// Offloads the topic's closed ledgers now. Pulsar's body names the last
/// message to offload; every closed ledger is offloaded here, and a body is
/// accepted and not needed.
async fn trigger_offload(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    put_on_topic(&b, &name, &uri, "offload", |b, p| async move {
        b.trigger_offload(&p).await
    })
    .await
}

/// A partitioned topic's answer is each partition's, by partition name.
async fn offload_status(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let each = on_partitions(&b, &name, Method::GET, "offload", &Bytes::new(), |p| {
        let b = b.clone();
        async move {
            let status = b.offload_status(&p).await?;
            Ok(serde_json::to_value(status).unwrap_or(Value::Null))
        }
    })
    .await?;
    if let Some(each) = each {
        return Ok(Json(json!({ "partitions": each })));
    }
    existing_topic(&b, &name, &uri).await?;
    Ok(Json(
        serde_json::to_value(b.offload_status(&name).await?).unwrap_or(Value::Null),
    ))
}

async fn list_subscriptions(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Json<Vec<String>>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    if let Some(all) = base_subscriptions(&b, &name).await? {
        return Ok(Json(all.into_iter().collect()));
    }
    let topic = existing_topic(&b, &name, &uri).await?;
    Ok(Json(topic.subscriptions().await))
}

/// A base name's subscriptions: those of its partitions. `None` when
/// `name` is not partitioned.
async fn base_subscriptions(
    b: &Broker,
    name: &TopicName,
) -> ApiResult<Option<std::collections::BTreeSet<String>>> {
    let each = on_partitions(b, name, Method::GET, "subscriptions", &Bytes::new(), |p| {
        let b = b.clone();
        async move { Ok(json!(b.topic(&p, false).await?.subscriptions().await)) }
    })
    .await?;
    Ok(each.map(|each| {
        answered(each)
            .values()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }))
}

/// The body names where a new subscription starts: `"latest"`,
/// `"earliest"` or `{"offset": N}`. On a base name, the subscription is
/// made on every partition (those not created yet are created).
async fn create_subscription(
    State(b): State<Broker>,
    Path((d, t, ns, topic, sub)): SubscriptionPath,
    uri: Uri,
    raw: Bytes,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let start = subscription_start(&raw)?;
    if let Some(existing) = base_subscriptions(&b, &name).await? {
        if existing.contains(&sub) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("subscription {sub} already exists on {name}"),
            ));
        }
        let suffix = format!("subscription/{}", url_segment(&sub));
        let (sub, b2) = (&sub, b.clone());
        on_partitions(&b, &name, Method::PUT, &suffix, &raw, move |p| {
            let b = b2.clone();
            async move {
                let topic = b.topic(&p, true).await?;
                subscribe_at(&topic, &p, sub, start).await?;
                Ok(Value::Null)
            }
        })
        .await?;
        return Ok(no_content());
    }
    // A partition is created by its first use, as its producers would.
    let topic = if name.partition_index().is_some() && b.partitions(&name.base()).await?.is_some() {
        owned(&b, &name, &uri).await?;
        b.topic(&name, true).await?
    } else {
        existing_topic(&b, &name, &uri).await?
    };
    subscribe_at(&topic, &name, &sub, start).await?;
    Ok(no_content())
}

/// Where a subscription made through the admin API starts.
fn subscription_start(raw: &Bytes) -> ApiResult<(InitialPosition, Option<u64>)> {
    let start: Value = if raw.is_empty() {
        json!("latest")
    } else {
        body(raw)?
    };
    Ok(match &start {
        Value::String(s) if s.eq_ignore_ascii_case("latest") => (InitialPosition::Latest, None),
        Value::String(s) if s.eq_ignore_ascii_case("earliest") => (InitialPosition::Earliest, None),
        v => match v.get("offset").and_then(Value::as_u64) {
            Some(o) => (InitialPosition::Earliest, Some(o)),
            None => {
                return Err(ApiError::bad_request(
                    "body must be \"latest\", \"earliest\" or {\"offset\": N}",
                ))
            }
        },
    })
}

async fn subscribe_at(
    topic: &crate::topic::Topic,
    name: &TopicName,
    sub: &str,
    (initial_position, offset): (InitialPosition, Option<u64>),
) -> ApiResult<()> {
    if topic.subscriptions().await.iter().any(|s| s == sub) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("subscription {sub} already exists on {name}"),
        ));
    }
    let opts = SubscriptionOptions {
        sub_type: SubscriptionType::Exclusive,
        initial_position,
        ..SubscriptionOptions::default()
    };
    let s = topic.get_or_create_subscription(sub, opts).await?;
    if let Some(o) = offset {
        s.reset(ResetTo::Offset(o)).await?;
    }
    Ok(())
}

async fn delete_subscription(
    State(b): State<Broker>,
    Path((d, t, ns, topic, sub)): SubscriptionPath,
    Query(q): Query<ForceQuery>,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let suffix = format!("subscription/{}?force={}", url_segment(&sub), q.force);
    let each = on_partitions(&b, &name, Method::DELETE, &suffix, &Bytes::new(), |p| {
        let (b, sub) = (b.clone(), sub.clone());
        async move {
            match b.topic(&p, false).await?.unsubscribe(&sub, q.force).await {
                // A partition that never had it is no failure of the whole.
                Ok(()) | Err(BrokerError::NotFound(_)) => Ok(Value::Null),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    if each.is_some() {
        return Ok(no_content());
    }
    let topic = existing_topic(&b, &name, &uri).await?;
    topic.unsubscribe(&sub, q.force).await?;
    Ok(no_content())
}

/// A path segment as a URL carries it.
fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (c as char).to_string()
            }
            c => format!("%{c:02X}"),
        })
        .collect()
}

type SubscriptionPath = Path<(String, String, String, String, String)>;

/// Moves a subscription's cursor to where `to` says for its topic; on a
/// base name, on every partition that has the subscription (`suffix`
/// after `subscription/<sub>/` and `body` reach the partitions owned
/// elsewhere).
async fn reset_to<F, Fut>(
    b: &Broker,
    path: SubscriptionPath,
    uri: &Uri,
    suffix: &str,
    body: &Bytes,
    to: F,
) -> ApiResult<Response>
where
    F: Fn(std::sync::Arc<crate::topic::Topic>) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<ResetTo>>,
{
    let Path((d, t, ns, topic, sub)) = path;
    let name = topic_name(&d, &t, &ns, &topic)?;
    let (to, sub) = (&to, &sub);
    let path = format!("subscription/{}/{suffix}", url_segment(sub));
    let each = on_partitions(b, &name, Method::POST, &path, body, |p| {
        let b = b.clone();
        async move {
            let topic = b.topic(&p, false).await?;
            let at = to(std::sync::Arc::clone(&topic)).await?;
            topic.reset_subscription(sub, at).await?;
            Ok(Value::Null)
        }
    })
    .await?;
    if let Some(each) = each {
        if each.values().all(Option::is_none) {
            return Err(ApiError::not_found(format!(
                "subscription {sub} not found on any partition of {name}"
            )));
        }
        return Ok(no_content());
    }
    let topic = existing_topic(b, &name, uri).await?;
    let at = to(std::sync::Arc::clone(&topic)).await?;
    topic.reset_subscription(sub, at).await?;
    Ok(no_content())
}

/// Not on a base name, as in Pulsar: a count of messages means nothing
/// across partitions.
async fn skip(
    State(b): State<Broker>,
    Path((d, t, ns, topic, sub, n)): Path<(String, String, String, String, String, u64)>,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    if b.partitions(&name).await?.is_some() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("skipping messages on partitioned topic {name} is not allowed; skip on one of its partitions"),
        ));
    }
    let path = Path((d, t, ns, topic, sub));
    reset_to(&b, path, &uri, "", &Bytes::new(), |_| async move {
        Ok(ResetTo::Skip(n))
    })
    .await
}

async fn skip_all(
    State(b): State<Broker>,
    path: SubscriptionPath,
    uri: Uri,
) -> ApiResult<Response> {
    reset_to(&b, path, &uri, "skip_all", &Bytes::new(), |_| async {
        Ok(ResetTo::End)
    })
    .await
}

#[derive(Deserialize)]
struct ResetBody {
    offset: u64,
}

/// On a base name, every partition's cursor goes to the same offset.
async fn reset_cursor(
    State(b): State<Broker>,
    path: SubscriptionPath,
    uri: Uri,
    raw: Bytes,
) -> ApiResult<Response> {
    let r: ResetBody = body(&raw)?;
    reset_to(&b, path, &uri, "resetcursor", &raw, |_| async move {
        Ok(ResetTo::Offset(r.offset))
    })
    .await
}

/// Pulsar's reset by publish time: to the first message at or after
/// `timestamp` (milliseconds since the epoch), in each partition of a
/// base name.
async fn reset_cursor_to_time(
    State(b): State<Broker>,
    Path((d, t, ns, topic, sub, ts)): Path<(String, String, String, String, String, i64)>,
    uri: Uri,
) -> ApiResult<Response> {
    let path = Path((d, t, ns, topic, sub));
    let suffix = format!("resetcursor/{ts}");
    reset_to(&b, path, &uri, &suffix, &Bytes::new(), |topic| async move {
        Ok(ResetTo::Offset(topic.offset_for_timestamp(ts).await?))
    })
    .await
}

async fn unload(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    put_on_topic(&b, &name, &uri, "unload", |b, p| async move {
        b.unload_topic(&p).await
    })
    .await
}

// ---- routes out of a topic ----

async fn get_route(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    Ok(match b.topic_route(&name).await? {
        Some(r) => Json(r).into_response(),
        None => no_content(),
    })
}

async fn set_route(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
    raw: Bytes,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let route: crate::TopicRoute = body(&raw)?;
    // The owner subscribes at once, so that the route starts exactly now.
    if b.partitions(&name).await?.is_none() && b.topic_exists(&name).await? {
        owned(&b, &name, &uri).await?;
    }
    b.set_topic_route(&name, Some(route)).await?;
    Ok(no_content())
}

async fn delete_route(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    b.set_topic_route(&name, None).await?;
    Ok(no_content())
}

// ---- brokers ----

async fn list_brokers(
    State(b): State<Broker>,
    Path(cluster): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    if cluster != b.config().cluster {
        b.tenancy().get_cluster(&cluster).await?;
        return Ok(Json(Vec::new()));
    }
    let mut ids: Vec<String> = b
        .active_brokers()
        .await?
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    Ok(Json(ids))
}

/// Healthy when the metadata store answers and a message makes it
/// through this broker's own heartbeat topic.
async fn health(State(b): State<Broker>) -> ApiResult<Response> {
    let ns = NamespaceName::default_namespace();
    let name = ns.topic(
        TopicDomain::NonPersistent,
        &format!("healthcheck-{}", b.info().id.replace([':', '/'], "_")),
    )?;
    b.publish(&name, vec![crate::format::Message::new("ping")])
        .await?;
    b.tenancy().list_clusters().await?;
    Ok("ok".into_response())
}

async fn ready(State(b): State<Broker>) -> ApiResult<Response> {
    b.tenancy().list_clusters().await?;
    Ok("ok".into_response())
}

async fn lookup(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    b.tenancy().get_policies(name.namespace()).await?;
    let owner = b.lookup(&name).await?;
    let listener = |p: &str| owner.listeners.get(p).cloned();
    Ok(Json(json!({
        "brokerUrl": listener("pulsar"),
        "httpUrl": owner.http_url,
        "kafkaUrl": listener("kafka"),
        "amqpUrl": listener("amqp"),
        "mqttUrl": listener("mqtt"),
    })))
}

// ---- REST producer and reader ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestMessage {
    /// Base64, as in Pulsar's REST producer.
    payload: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    sequence_id: Option<i64>,
    #[serde(default)]
    event_time: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProducerMessages {
    #[serde(default)]
    producer_name: Option<String>,
    messages: Vec<RestMessage>,
}

/// A stable producer id for a named REST producer. The top bit pattern
/// keeps these apart from ids handed to Kafka producers.
fn rest_producer_id(name: &str) -> i64 {
    let lo = u64::from(crc32c::crc32c(name.as_bytes()));
    let hi = u64::from(crc32c::crc32c_append(0x5bd1_e995, name.as_bytes()));
    ((1u64 << 62) | ((hi << 32 | lo) & ((1u64 << 62) - 1))) as i64
}

fn decode_b64(s: &str) -> ApiResult<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))
}

/// Pulsar's REST producer: `POST /topics/{domain}/{t}/{ns}/{topic}` with
/// base64 payloads. Messages of one request are stored as one batch. With
/// a `producerName` and consecutive `sequenceId`s, a retried request is
/// acknowledged without being stored twice.
async fn rest_produce(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    uri: Uri,
    raw: Bytes,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let req: ProducerMessages = body(&raw)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("no messages"));
    }
    b.tenancy().get_policies(name.namespace()).await?;
    if b.partitions(&name).await?.is_some() {
        return Err(ApiError::bad_request(format!(
            "{name} is partitioned; publish to one of its partitions ({name}-partition-N)"
        )));
    }
    owned(&b, &name, &uri).await?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        messages.push(crate::format::Message {
            key: m.key.clone().map(|k| k.into_bytes().into()),
            value: Some(decode_b64(&m.payload)?.into()),
            headers: m
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone().into_bytes().into())))
                .collect(),
            timestamp_ms: m.event_time.unwrap_or(0),
        });
    }
    let first_seq = req.messages[0].sequence_id;
    let consecutive = req
        .messages
        .iter()
        .enumerate()
        .all(|(i, m)| m.sequence_id == first_seq.and_then(|s| s.checked_add(i as i64)));
    let producer = match (&req.producer_name, first_seq) {
        (Some(p), Some(seq)) if !p.is_empty() => {
            if !consecutive
                || seq < 0
                || seq.saturating_add(req.messages.len() as i64) > i64::from(i32::MAX)
            {
                return Err(ApiError::bad_request(
                    "sequenceIds must be consecutive and between 0 and 2^31",
                ));
            }
            Some(crate::format::ProducerSequence {
                producer_id: rest_producer_id(p),
                epoch: 0,
                base_sequence: seq as i32,
            })
        }
        _ => None,
    };
    let published = match producer {
        Some(p) => b.publish_idempotent(&name, messages, p).await?,
        None => crate::topic::Published::Stored(b.publish(&name, messages).await?),
    };
    let results: Vec<Value> = (0..req.messages.len() as u64)
        .map(|i| match published.offset() {
            Some(o) => json!({ "messageId": (o + i).to_string(), "offset": o + i, "errorCode": 0 }),
            None => json!({ "messageId": "-1:-1", "errorCode": 0, "duplicate": true }),
        })
        .collect();
    Ok(Json(
        json!({ "messagePublishResults": results, "schemaVersion": 0 }),
    ))
}

#[derive(Deserialize)]
struct ReadQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_max")]
    max: usize,
    /// Wait this long for data when there is none yet.
    #[serde(default)]
    wait_ms: u64,
}

fn default_max() -> usize {
    100
}

/// Reads stored messages without a subscription (a Magnetar extension):
/// `GET /topics/{domain}/{t}/{ns}/{topic}/messages?offset=N&max=M`.
async fn rest_read(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    Query(q): Query<ReadQuery>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    use base64::Engine;
    let name = topic_name(&d, &t, &ns, &topic)?;
    existing_topic(&b, &name, &uri).await?;
    let max = q.max.clamp(1, 10_000);
    let wait = std::time::Duration::from_millis(q.wait_ms.min(30_000));
    let mut out = Vec::new();
    let mut at = q.offset;
    let mut ends = (0, 0);
    let mut wait_left = wait;
    while out.len() < max {
        let f = b.fetch(&name, at, 4 << 20, wait_left).await?;
        ends = (f.start_offset, f.end_offset);
        wait_left = std::time::Duration::ZERO;
        if f.entries.is_empty() {
            break;
        }
        for e in f.entries {
            for m in crate::format::decode_entry(&e.data)? {
                if m.offset < at || out.len() >= max {
                    continue;
                }
                let props: BTreeMap<String, String> = m
                    .message
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        let v = v.as_deref().unwrap_or_default();
                        (k.clone(), String::from_utf8_lossy(v).into_owned())
                    })
                    .collect();
                out.push(json!({
                    "offset": m.offset,
                    "key": m.message.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "payload": base64::engine::general_purpose::STANDARD
                        .encode(m.message.value.as_deref().unwrap_or_default()),
                    "properties": props,
                    "eventTime": m.message.timestamp_ms,
                }));
            }
            at = at.max(e.end_offset());
        }
    }
    Ok(Json(json!({
        "messages": out,
        "startOffset": ends.0,
        "endOffset": ends.1,
    })))
}

/// A publish forwarded by another broker: one record batch, appended here
/// or refused, never forwarded again.
async fn forwarded_batch(
    State(b): State<Broker>,
    Path((t, ns, d, topic)): Path<(String, String, String, String)>,
    raw: Bytes,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    crate::format::check_inflated(&raw)?;
    match b.publish_batch_local(&name, raw).await? {
        crate::topic::Published::Stored(o) => Ok(Json(json!({ "offset": o }))),
        crate::topic::Published::Duplicate => Ok(Json(json!({ "duplicate": true }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(t: &str, n: &str, a: Option<AuthAction>) -> Access {
        Access::Namespace(t.into(), n.into(), a)
    }

    #[test]
    fn every_path_maps_to_what_it_needs() {
        let get = &Method::GET;
        let post = &Method::POST;
        let cases = [
            (get, "/admin/v2/brokers/health", Access::Open),
            (get, "/admin/v2/brokers/ready", Access::Open),
            (get, "/admin/v2/brokers/local", Access::Superuser),
            (get, "/admin/v2/clusters", Access::Superuser),
            (get, "/admin/v2/tenants", Access::Superuser),
            (
                get,
                "/admin/v2/tenants/acme",
                Access::TenantAdmin("acme".into()),
            ),
            (&Method::PUT, "/admin/v2/tenants/acme", Access::Superuser),
            (&Method::DELETE, "/admin/v2/tenants/acme", Access::Superuser),
            (
                get,
                "/admin/v2/namespaces/acme",
                Access::TenantAdmin("acme".into()),
            ),
            (
                post,
                "/admin/v2/namespaces/acme/iot/retention",
                Access::TenantAdmin("acme".into()),
            ),
            (
                get,
                "/admin/v2/persistent/acme/iot",
                Access::TenantAdmin("acme".into()),
            ),
            (
                &Method::DELETE,
                "/admin/v2/non-persistent/acme/iot/t",
                Access::TenantAdmin("acme".into()),
            ),
            (get, "/admin/v2/other/acme/iot", Access::Superuser),
            (
                post,
                "/internal/v1/batch/acme/iot/persistent/t",
                Access::Superuser,
            ),
            (
                get,
                "/lookup/v2/topic/persistent/acme/iot/t",
                ns("acme", "iot", None),
            ),
            (
                get,
                "/lookup/v2/topic/persistent/acme/iot",
                Access::Superuser,
            ),
            (
                post,
                "/topics/persistent/acme/iot/t",
                ns("acme", "iot", Some(AuthAction::Produce)),
            ),
            (
                get,
                "/topics/persistent/acme/iot/t/messages",
                ns("acme", "iot", Some(AuthAction::Consume)),
            ),
            (
                get,
                "/topics/persistent/acme/iot/t/other",
                Access::Superuser,
            ),
            (
                get,
                "/ws/v2/consumer/persistent/acme/iot/t/s",
                Access::Elsewhere,
            ),
            (get, "/mqtt", Access::Elsewhere),
            (get, "/", Access::Elsewhere),
        ];
        for (method, path, want) in cases {
            assert_eq!(access(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn own_origins_are_the_loopback_names_and_the_advertised_address() {
        let own = AllowedOrigins::own(
            8080,
            "broker-1.example:8080",
            Some((8443, "broker-1.example:443")),
        );
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "HTTP://Broker-1.example:8080",
            "https://localhost:8443",
            "https://broker-1.example:443",
        ] {
            assert!(own.allows(ok), "{ok}");
        }
        for no in [
            "http://evil.example:8080",
            "http://127.0.0.1:9090",
            "https://127.0.0.1:8080",
            "null",
            "",
        ] {
            assert!(!own.allows(no), "{no}");
        }
        let given = AllowedOrigins::parse(&["https://console.example/".into()]);
        assert!(given.allows("https://console.example"));
        assert!(!given.allows("http://127.0.0.1:8080"));
        assert!(AllowedOrigins::parse(&["*".into()]).allows("http://anywhere"));
    }
}
