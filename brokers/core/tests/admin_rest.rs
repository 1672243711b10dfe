//! The admin REST API over real HTTP: tenants, namespaces, policies,
//! topics and stats; 404 for unknown names and 400 for invalid ones, each
//! with a JSON error.

mod common;

use std::time::Duration;

use common::Cluster;
use magnetar_broker::{
    Broker, BrokerConfig, BrokerInfo, ConsumerOptions, Message, SubscriptionOptions,
};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

struct Api {
    base: String,
    http: Client,
    broker: Broker,
    _cluster: Cluster,
}

async fn start() -> Api {
    let cluster = Cluster::start(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let broker = Broker::start(
        cluster.meta_client(),
        BrokerConfig::new(
            "local",
            BrokerInfo {
                id: base.trim_start_matches("http://").into(),
                http_url: base.clone(),
                listeners: Default::default(),
            },
        ),
    )
    .await
    .expect("broker");
    let app = magnetar_broker::http::router(broker.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        base,
        http: Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client"),
        broker,
        _cluster: cluster,
    }
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}/admin/v2{path}", self.base)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(m, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body).await;
        assert!(s.is_success(), "{method} {path}: {s} {v}");
        v
    }

    /// The call fails with `status` and a JSON `reason`.
    async fn fails(&self, method: &str, path: &str, body: Option<Value>, status: StatusCode) {
        let (s, v) = self.call(method, path, body).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert!(
            v.get("reason")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty()),
            "{method} {path}: error body {v}"
        );
    }
}

#[tokio::test]
async fn tenants_namespaces_and_policies() {
    let api = start().await;
    // Defaults exist on first start.
    assert_eq!(api.ok("GET", "/clusters", None).await, json!(["local"]));
    assert_eq!(api.ok("GET", "/tenants", None).await, json!(["public"]));
    assert_eq!(
        api.ok("GET", "/namespaces/public", None).await,
        json!(["public/default"])
    );

    api.ok(
        "PUT",
        "/tenants/acme",
        Some(json!({"adminRoles": ["ops"], "allowedClusters": ["local"]})),
    )
    .await;
    api.fails(
        "PUT",
        "/tenants/acme",
        Some(json!({})),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(
        api.ok("GET", "/tenants/acme", None).await,
        json!({"adminRoles": ["ops"], "allowedClusters": ["local"]})
    );
    api.fails("GET", "/tenants/nobody", None, StatusCode::NOT_FOUND)
        .await;
    api.fails(
        "PUT",
        "/tenants/bad%20name",
        Some(json!({})),
        StatusCode::BAD_REQUEST,
    )
    .await;
    api.fails(
        "PUT",
        "/tenants/mars",
        Some(json!({"allowedClusters": ["mars"]})),
        StatusCode::BAD_REQUEST,
    )
    .await;
    api.fails(
        "PUT",
        "/tenants/x",
        Some(json!("not an object")),
        StatusCode::BAD_REQUEST,
    )
    .await;

    api.ok("PUT", "/namespaces/acme/iot", None).await;
    api.fails("PUT", "/namespaces/acme/iot", None, StatusCode::CONFLICT)
        .await;
    api.fails("PUT", "/namespaces/nobody/iot", None, StatusCode::NOT_FOUND)
        .await;
    api.fails(
        "GET",
        "/namespaces/acme/nothing",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.fails("PUT", "/namespaces/acme/b!d", None, StatusCode::BAD_REQUEST)
        .await;
    assert_eq!(
        api.ok("GET", "/namespaces/acme", None).await,
        json!(["acme/iot"])
    );

    // Policies: whole and per field.
    let p = api.ok("GET", "/namespaces/acme/iot", None).await;
    assert_eq!(p["bundles"]["numBundles"], json!(4));
    assert_eq!(p["replication_clusters"], json!(["local"]));
    api.ok(
        "POST",
        "/namespaces/acme/iot/retention",
        Some(json!({"retentionTimeInMinutes": 60, "retentionSizeInMB": 512})),
    )
    .await;
    assert_eq!(
        api.ok("GET", "/namespaces/acme/iot/retention", None).await,
        json!({"retentionTimeInMinutes": 60, "retentionSizeInMB": 512})
    );
    api.ok("POST", "/namespaces/acme/iot/messageTTL", Some(json!(120)))
        .await;
    assert_eq!(
        api.ok("GET", "/namespaces/acme/iot/messageTTL", None).await,
        json!(120)
    );
    api.ok(
        "POST",
        "/namespaces/acme/iot/backlogQuota",
        Some(json!({"limitSize": 1048576, "policy": "producer_exception"})),
    )
    .await;
    assert_eq!(
        api.ok("GET", "/namespaces/acme/iot/backlogQuota", None)
            .await["policy"],
        json!("producer_exception")
    );
    api.ok(
        "POST",
        "/namespaces/acme/iot/permissions/app",
        Some(json!(["produce", "consume"])),
    )
    .await;
    let p = api.ok("GET", "/namespaces/acme/iot", None).await;
    assert_eq!(
        p["auth_policies"]["namespace_auth"]["app"],
        json!(["produce", "consume"])
    );
    assert_eq!(p["message_ttl_in_seconds"], json!(120));
    api.fails(
        "POST",
        "/namespaces/acme/iot/retention",
        Some(json!({"retentionTimeInMinutes": -5, "retentionSizeInMB": 0})),
        StatusCode::BAD_REQUEST,
    )
    .await;
    api.fails(
        "POST",
        "/namespaces/acme/iot/messageTTL",
        Some(json!("soon")),
        StatusCode::BAD_REQUEST,
    )
    .await;
    api.fails(
        "GET",
        "/namespaces/acme/iot/noSuchPolicy",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.ok("DELETE", "/namespaces/acme/iot/messageTTL", None)
        .await;
    let (s, _) = api
        .call("GET", "/namespaces/acme/iot/messageTTL", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Deletion order: a tenant with namespaces, then without.
    api.fails("DELETE", "/tenants/acme", None, StatusCode::CONFLICT)
        .await;
    api.ok("DELETE", "/namespaces/acme/iot", None).await;
    api.ok("DELETE", "/tenants/acme", None).await;
    api.fails("DELETE", "/tenants/acme", None, StatusCode::NOT_FOUND)
        .await;

    // Clusters and brokers.
    api.ok(
        "PUT",
        "/clusters/east",
        Some(json!({"serviceUrl": "http://east:8080"})),
    )
    .await;
    assert_eq!(
        api.ok("GET", "/clusters/east", None).await["serviceUrl"],
        json!("http://east:8080")
    );
    api.fails("GET", "/clusters/west", None, StatusCode::NOT_FOUND)
        .await;
    api.ok("DELETE", "/clusters/east", None).await;
    let brokers = api.ok("GET", "/brokers/local", None).await;
    assert_eq!(brokers.as_array().map(Vec::len), Some(1));
    let health = api
        .http
        .get(api.url("/brokers/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.expect("text"), "ok");
    api.fails("GET", "/no/such/endpoint", None, StatusCode::NOT_FOUND)
        .await;
}

#[tokio::test]
async fn topics_subscriptions_and_stats() {
    let api = start().await;
    let t = "/persistent/public/default";
    api.ok("PUT", &format!("{t}/events"), None).await;
    api.fails("PUT", &format!("{t}/events"), None, StatusCode::CONFLICT)
        .await;
    api.ok("PUT", &format!("{t}/orders/partitions"), Some(json!(3)))
        .await;
    assert_eq!(
        api.ok("GET", &format!("{t}/orders/partitions"), None).await,
        json!({"partitions": 3})
    );
    api.ok("POST", &format!("{t}/orders/partitions"), Some(json!(4)))
        .await;
    api.fails(
        "POST",
        &format!("{t}/orders/partitions"),
        Some(json!(2)),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        api.ok("GET", &format!("{t}/partitioned"), None).await,
        json!(["persistent://public/default/orders"])
    );
    api.fails(
        "GET",
        &format!("{t}/nothing/stats"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.fails(
        "GET",
        &format!("{t}/nothing/partitions"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.fails(
        "GET",
        "/persistent/public/nothing",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.fails(
        "GET",
        "/persistent/public/default/x/bogus",
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    api.fails(
        "GET",
        "/persistent/b%20d/default",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;
    api.fails(
        "PUT",
        "/persistent/public/b%20d/t",
        None,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Data and a subscription through the broker API, seen in stats.
    let topic = "persistent://public/default/events".parse().expect("topic");
    for i in 0..10 {
        api.broker
            .publish(&topic, vec![Message::new(format!("m{i}"))])
            .await
            .expect("publish");
    }
    api.ok(
        "PUT",
        &format!("{t}/events/subscription/audit"),
        Some(json!("earliest")),
    )
    .await;
    api.fails(
        "PUT",
        &format!("{t}/events/subscription/audit"),
        None,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(
        api.ok("GET", &format!("{t}/events/subscriptions"), None)
            .await,
        json!(["audit"])
    );
    let stats = api.ok("GET", &format!("{t}/events/stats"), None).await;
    assert_eq!(stats["msgInCounter"], json!(10));
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(10));
    assert!(stats["storageSize"].as_u64().is_some_and(|s| s > 0));
    api.ok(
        "POST",
        &format!("{t}/events/subscription/audit/skip/4"),
        None,
    )
    .await;
    let stats = api.ok("GET", &format!("{t}/events/stats"), None).await;
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(6));
    api.ok(
        "POST",
        &format!("{t}/events/subscription/audit/resetcursor"),
        Some(json!({"offset": 1})),
    )
    .await;
    let stats = api.ok("GET", &format!("{t}/events/stats"), None).await;
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(9));
    api.ok(
        "POST",
        &format!("{t}/events/subscription/audit/skip_all"),
        None,
    )
    .await;
    let stats = api.ok("GET", &format!("{t}/events/stats"), None).await;
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(0));
    // Back to the first message published at or after the epoch: all ten.
    let by_time = format!("{t}/events/subscription/audit/resetcursor/0");
    api.ok("POST", &by_time, None).await;
    let stats = api.ok("GET", &format!("{t}/events/stats"), None).await;
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(10));
    let internal = api
        .ok("GET", &format!("{t}/events/internalStats"), None)
        .await;
    assert!(internal["ledgers"]
        .as_array()
        .is_some_and(|l| !l.is_empty()));

    // A consumer blocks subscription deletion unless forced.
    let consumer = api
        .broker
        .subscribe(
            &topic,
            "audit",
            SubscriptionOptions::default(),
            ConsumerOptions::default(),
        )
        .await
        .expect("consumer");
    api.fails(
        "DELETE",
        &format!("{t}/events/subscription/audit"),
        None,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.ok("DELETE", &format!("{t}/events/subscription/audit"), None)
        .await;
    api.fails(
        "DELETE",
        &format!("{t}/events/subscription/audit"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Topics in the namespace, unload, delete.
    let listed = api.ok("GET", t, None).await;
    assert_eq!(listed, json!(["persistent://public/default/events"]));
    api.ok("PUT", &format!("{t}/events/unload"), None).await;
    assert_eq!(
        api.ok("GET", &format!("{t}/events/stats"), None).await["endOffset"],
        json!(10)
    );
    api.fails(
        "DELETE",
        "/namespaces/public/default",
        None,
        StatusCode::CONFLICT,
    )
    .await;
    api.ok("DELETE", &format!("{t}/events"), None).await;
    api.ok("DELETE", &format!("{t}/orders/partitions"), None)
        .await;
    api.fails(
        "DELETE",
        &format!("{t}/events"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(api.ok("GET", t, None).await, json!([]));

    // Lookup names this broker.
    let l: Value = api
        .http
        .get(format!(
            "{}/lookup/v2/topic/persistent/public/default/x",
            api.base
        ))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(l["httpUrl"], json!(api.base));
}
