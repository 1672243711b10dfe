//! Topics (partitioned ones by their base name too): creating,
//! deleting, stats, offload, subscriptions and their cursors, unloading.

use super::*;

// ---- topics ----

pub(super) async fn list_topics(
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

pub(super) async fn list_partitioned(
    State(b): State<Broker>,
    Path((_domain, t, ns)): Path<(String, String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    let ns = namespace(&t, &ns)?;
    b.tenancy().get_policies(&ns).await?;
    let topics = b.list_partitioned_topics(&ns).await?;
    Ok(Json(topics.iter().map(ToString::to_string).collect()))
}

pub(super) type TopicPath = Path<(String, String, String, String)>;

pub(super) async fn create_topic(
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
    b.clear_tombstone(&name).await?;
    b.create_topic(&name).await?;
    Ok(no_content())
}

#[derive(Deserialize, Default)]
pub(super) struct ForceQuery {
    #[serde(default)]
    force: bool,
}

pub(super) async fn delete_topic(
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

pub(super) async fn create_partitioned(
    b: State<Broker>,
    p: TopicPath,
    raw: Bytes,
) -> ApiResult<Response> {
    set_partitions(b, p, raw, true).await
}

pub(super) async fn update_partitions(
    b: State<Broker>,
    p: TopicPath,
    raw: Bytes,
) -> ApiResult<Response> {
    set_partitions(b, p, raw, false).await
}

pub(super) async fn set_partitions(
    State(b): State<Broker>,
    Path((d, t, ns, topic)): TopicPath,
    raw: Bytes,
    create: bool,
) -> ApiResult<Response> {
    let name = topic_name(&d, &t, &ns, &topic)?;
    let n: u32 = body(&raw)?;
    if create {
        b.clear_tombstone(&name).await?;
        b.create_partitioned_topic(&name, n).await?;
    } else {
        b.update_partitions(&name, n).await?;
    }
    Ok(no_content())
}

pub(super) async fn get_partitions(
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
pub(super) async fn on_partitions<F, Fut>(
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
pub(super) fn answered(each: BTreeMap<String, Option<Value>>) -> BTreeMap<String, Value> {
    each.into_iter()
        .filter_map(|(p, v)| v.map(|v| (p, v)))
        .collect()
}

/// A PUT that acts on a topic here (redirecting to its owner), or on
/// each partition of a base name.
pub(super) async fn put_on_topic<F, Fut>(
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
pub(super) async fn existing_topic(
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

pub(super) async fn topic_stats(
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
    let mut stats = topic.stats().await?;
    b.add_replication_stats(&name, &mut stats);
    Ok(Json(stats).into_response())
}

pub(super) async fn partitioned_stats(
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
    // Per remote cluster, the partitions' replicators summed.
    let mut replication = serde_json::Map::new();
    for p in partitions.values() {
        let Some(r) = p["replication"].as_object() else {
            continue;
        };
        for (cluster, s) in r {
            let e = replication
                .entry(cluster.clone())
                .or_insert_with(|| json!({"connected": true, "state": "running"}));
            // Counters, backlogs and rates add up; an age is the oldest;
            // a partition's own position means nothing for the topic.
            for (f, v) in s.as_object().into_iter().flatten() {
                let Some(x) = v.as_number() else { continue };
                e[f] = match (f.as_str(), x.as_u64(), e[f].as_u64()) {
                    ("remoteWatermark", ..) => continue,
                    ("replicationDelayInSeconds", Some(a), b) => json!(a.max(b.unwrap_or(0))),
                    (_, Some(a), b) if !e[f].is_f64() => json!(a + b.unwrap_or(0)),
                    _ => json!(x.as_f64().unwrap_or(0.0) + e[f].as_f64().unwrap_or(0.0)),
                };
            }
            e["connected"] = json!(
                e["connected"].as_bool().unwrap_or(false)
                    && s["connected"].as_bool().unwrap_or(false)
            );
            if s["state"] != "running" {
                e["state"] = s["state"].clone();
                e["lastError"] = s["lastError"].clone();
            }
        }
    }
    Ok(Json(json!({
        "metadata": { "partitions": n },
        "msgInCounter": sum("msgInCounter"),
        "bytesInCounter": sum("bytesInCounter"),
        "storageSize": sum("storageSize"),
        "replication": replication,
        "partitions": partitions,
    })))
}

pub(super) async fn internal_stats(
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

pub(super) async fn partitioned_internal_stats(
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
pub(super) async fn internal_stats_of(topic: &crate::topic::Topic) -> ApiResult<Value> {
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
pub(super) async fn trigger_offload(
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
pub(super) async fn offload_status(
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

pub(super) async fn list_subscriptions(
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
pub(super) async fn base_subscriptions(
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
pub(super) async fn create_subscription(
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
pub(super) fn subscription_start(raw: &Bytes) -> ApiResult<(InitialPosition, Option<u64>)> {
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

pub(super) async fn subscribe_at(
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

pub(super) async fn delete_subscription(
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
pub(super) fn url_segment(s: &str) -> String {
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
pub(super) async fn reset_to<F, Fut>(
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
pub(super) async fn skip(
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

pub(super) async fn skip_all(
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
pub(super) struct ResetBody {
    offset: u64,
}

/// On a base name, every partition's cursor goes to the same offset.
pub(super) async fn reset_cursor(
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
pub(super) async fn reset_cursor_to_time(
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

pub(super) async fn unload(
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
