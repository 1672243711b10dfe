//! Routes out of a topic, the brokers and their health, lookups, and
//! the REST producer and reader.

use super::*;

// ---- routes out of a topic ----

pub(super) async fn get_route(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    Ok(match b.topic_route(&name).await? {
        Some(r) => Json(r).into_response(),
        None => no_content(),
    })
}

pub(super) async fn set_route(
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

pub(super) async fn delete_route(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    b.set_topic_route(&name, None).await?;
    Ok(no_content())
}

// ---- a topic's replication policies ----

/// Geo-replication is of persistent topics only, as in Pulsar.
fn replicable(d: &str, t: &str, ns: &str, topic: &str) -> ApiResult<TopicName> {
    let name = topic_name(d, t, ns, topic)?;
    if !name.is_persistent() {
        return Err(ApiError::bad_request(format!(
            "{name} is not persistent; only persistent topics replicate"
        )));
    }
    Ok(name.base())
}

/// The topic's own replication clusters; 204 when it takes its
/// namespace's.
pub(super) async fn get_topic_replication(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    Ok(match b.topic_policies(&name).await?.replication_clusters {
        Some(c) => Json(c).into_response(),
        None => no_content(),
    })
}

pub(super) async fn set_topic_replication(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    raw: Bytes,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    let clusters: std::collections::BTreeSet<String> = body(&raw)?;
    check_replication(&b, name.namespace(), &clusters).await?;
    b.modify_topic_policies(&name, |p| p.replication_clusters = Some(clusters.clone()))
        .await?;
    Ok(no_content())
}

pub(super) async fn delete_topic_replication(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    b.modify_topic_policies(&name, |p| p.replication_clusters = None)
        .await?;
    Ok(no_content())
}

pub(super) async fn get_topic_dispatch_rate(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    Ok(
        match b.topic_policies(&name).await?.replicator_dispatch_rate {
            Some(r) => Json(r).into_response(),
            None => no_content(),
        },
    )
}

pub(super) async fn set_topic_dispatch_rate(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    raw: Bytes,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    let rate: magnetar_tenancy::DispatchRate = body(&raw)?;
    rate.validate()?;
    b.modify_topic_policies(&name, |p| p.replicator_dispatch_rate = Some(rate))
        .await?;
    Ok(no_content())
}

pub(super) async fn delete_topic_dispatch_rate(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
) -> ApiResult<Response> {
    let name = replicable(&d, &t, &ns, &topic)?;
    b.modify_topic_policies(&name, |p| p.replicator_dispatch_rate = None)
        .await?;
    Ok(no_content())
}

// ---- brokers ----

pub(super) async fn list_brokers(
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
pub(super) async fn health(State(b): State<Broker>) -> ApiResult<Response> {
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

pub(super) async fn ready(State(b): State<Broker>) -> ApiResult<Response> {
    b.tenancy().list_clusters().await?;
    Ok("ok".into_response())
}

/// The process's liveness: every part added with
/// [`crate::metrics::BrokerMetrics::add_probe`] (standalone's metadata
/// node and bookie) is live. 503 names those that are not.
pub(super) async fn process_health(State(b): State<Broker>) -> Response {
    let (dead, _) = b.metrics().probe();
    probe_verdict(&dead)
}

/// The process's readiness: the metadata store answers this broker,
/// enough bookies are writable for a ledger's ensemble, and every added
/// part is ready (a leader known; the bookie registered and writable).
pub(super) async fn process_ready(State(b): State<Broker>) -> Response {
    // A probe answers within its own timeout, even while the metadata
    // client retries.
    const WITHIN: std::time::Duration = std::time::Duration::from_secs(3);
    let (_, mut unready) = b.metrics().probe();
    let tenancy = b.tenancy();
    let metadata = tokio::time::timeout(WITHIN, tenancy.list_clusters()).await;
    if !matches!(metadata, Ok(Ok(_))) {
        unready.push("metadata store");
    } else if !matches!(
        tokio::time::timeout(WITHIN, b.bookies_writable()).await,
        Ok(true)
    ) {
        unready.push("writable bookies");
    }
    probe_verdict(&unready)
}

fn probe_verdict(failing: &[&str]) -> Response {
    if failing.is_empty() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: {}", failing.join(", ")),
        )
            .into_response()
    }
}

/// Prometheus's scrape: OpenMetrics when the `Accept` header asks for
/// it (Prometheus does), else the 0.0.4 text format.
pub(super) async fn metrics(
    State(b): State<Broker>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let e = b
        .scrape_metrics(magnetar_metrics::wants_openmetrics(accept))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, e.content_type)], e.body).into_response())
}

pub(super) async fn lookup(
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
pub(super) struct RestMessage {
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
pub(super) struct ProducerMessages {
    #[serde(default)]
    producer_name: Option<String>,
    messages: Vec<RestMessage>,
}

/// A stable producer id for a named REST producer. The top bit pattern
/// keeps these apart from ids handed to Kafka producers, and a name that
/// would hash into the window of replicated records steps out of it.
pub(super) fn rest_producer_id(name: &str) -> i64 {
    let lo = u64::from(crc32c::crc32c(name.as_bytes()));
    let hi = u64::from(crc32c::crc32c_append(0x5bd1_e995, name.as_bytes()));
    let id = ((1u64 << 62) | ((hi << 32 | lo) & ((1u64 << 62) - 1))) as i64;
    if crate::replicated::is_replicated(id) {
        id | 1 << 32
    } else {
        id
    }
}

pub(super) fn decode_b64(s: &str) -> ApiResult<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ApiError::bad_request(format!("payload is not base64: {e}")))
}

/// Pulsar's REST producer: `POST /topics/{domain}/{t}/{ns}/{topic}` with
/// base64 payloads. Messages of one request are stored as one batch. With
/// a `producerName` and consecutive `sequenceId`s, a retried request is
/// acknowledged without being stored twice.
pub(super) async fn rest_produce(
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
pub(super) struct ReadQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_max")]
    max: usize,
    /// Wait this long for data when there is none yet.
    #[serde(default)]
    wait_ms: u64,
}

pub(super) fn default_max() -> usize {
    100
}

/// Reads stored messages without a subscription (a Magnetar extension):
/// `GET /topics/{domain}/{t}/{ns}/{topic}/messages?offset=N&max=M`.
pub(super) async fn rest_read(
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
