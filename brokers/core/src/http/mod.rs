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

mod brokers;
mod tenancy;
mod topics;

use brokers::*;
use tenancy::*;
use topics::*;

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
        TenancyError::UnknownCluster(_) => StatusCode::PRECONDITION_FAILED,
        TenancyError::ClusterNotAllowed { .. } => StatusCode::FORBIDDEN,
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
        | BrokerError::Conflict(_)
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
            "/{domain}/{tenant}/{ns}/{topic}/replication",
            get(get_topic_replication)
                .post(set_topic_replication)
                .put(set_topic_replication)
                .delete(delete_topic_replication),
        )
        .route(
            "/{domain}/{tenant}/{ns}/{topic}/replicatorDispatchRate",
            get(get_topic_dispatch_rate)
                .post(set_topic_dispatch_rate)
                .put(set_topic_dispatch_rate)
                .delete(delete_topic_dispatch_rate),
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
        .route("/metrics", get(metrics))
        .route("/health", get(process_health))
        .route("/ready", get(process_ready))
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
        ["admin", "v2", "brokers", "health" | "ready"] | ["health" | "ready"] => Access::Open,
        ["admin", "v2", "tenants", _] if method == Method::GET => Access::TenantAdmin(tenant(3)),
        ["admin", "v2", "namespaces", _, ..] => Access::TenantAdmin(tenant(3)),
        ["admin", "v2", "persistent" | "non-persistent", _, ..] => Access::TenantAdmin(tenant(3)),
        // Metrics name every tenant's namespaces.
        ["admin", ..] | ["internal", ..] | ["metrics", ..] => Access::Superuser,
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
        Err(e) => {
            b.metrics().auth_failure("http");
            return ApiError::from(e).into_response();
        }
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
