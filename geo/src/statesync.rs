//! Protocol state that follows a namespace to every region: MQTT's
//! retained messages today (the state areas of [`REPLICATED_AREAS`]).
//!
//! The owner of a replicated namespace's [`GEO_STATE_TOPIC`] hears every
//! change of those areas under the namespace (keys start with its encoded
//! tenant and namespace) and appends it to that topic, stamped with the
//! time and this cluster's name; the topic replicates like any other. In
//! each other region the owner applies the changes replicated in, last
//! writer wins by (time, cluster), so that concurrent changes in two
//! regions settle on the same value everywhere. What was applied is not
//! exported again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use magnetar_broker::service::GEO_STATE_TOPIC;
use magnetar_broker::subscription::{InitialPosition, SubscriptionOptions, SubscriptionType};
use magnetar_broker::{Broker, Message, StateStore};
use magnetar_tenancy::names::encode_segment;
use magnetar_tenancy::NamespaceName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::Result;
use crate::Ctx;

/// The protocol state areas that replicate with their namespace.
pub const REPLICATED_AREAS: &[&str] = &["mqtt-retained"];

/// The cursor of the changes applied here.
const STATE_IN_SUBSCRIPTION: &str = "__geo-state-in";
/// Where the version of each replicated key is kept.
const VERSIONS_PREFIX: &str = "/geo/state-versions/";
const H_AREA: &str = "geo.area";
const H_TIME: &str = "geo.time-ms";
const H_ORIGIN: &str = "geo.origin";

/// Which write of a key wins: the later, then the greater cluster name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Version {
    time_ms: u64,
    origin: String,
}

fn namespace_prefix(ns: &NamespaceName) -> String {
    format!(
        "{}/{}/",
        encode_segment(ns.tenant()),
        encode_segment(ns.namespace())
    )
}

fn version_key(area: &str, key: &str) -> String {
    format!("{VERSIONS_PREFIX}{area}/{key}")
}

/// Runs the namespace's state sync until told to stop.
pub(crate) async fn run(ctx: Arc<Ctx>, ns: NamespaceName, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&ctx, &ns, &mut stop).await {
            Ok(()) => return,
            Err(e) => tracing::debug!(namespace = %ns, "replicated state: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(ctx.cfg.backoff_max);
    }
}

/// Changes applied here recently, so that hearing them back is not taken
/// for a local change.
#[derive(Default)]
struct Applied(HashMap<(String, String), (Option<Bytes>, Instant)>);

impl Applied {
    fn note(&mut self, area: &str, key: &str, value: Option<Bytes>) {
        let now = Instant::now();
        self.0
            .retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(60));
        self.0
            .insert((area.to_owned(), key.to_owned()), (value, now));
    }

    /// Whether the change is one applied here.
    fn take(&mut self, area: &str, key: &str, value: &Option<Bytes>) -> bool {
        let k = (area.to_owned(), key.to_owned());
        match self.0.get(&k) {
            Some((v, _)) if v == value => {
                self.0.remove(&k);
                true
            }
            _ => false,
        }
    }
}

async fn session(ctx: &Ctx, ns: &NamespaceName, stop: &mut watch::Receiver<bool>) -> Result<()> {
    let Some(b) = ctx.broker.upgrade() else {
        return Ok(());
    };
    let topic = ns.topic(magnetar_tenancy::TopicDomain::Persistent, GEO_STATE_TOPIC)?;
    let t = b.topic(&topic, true).await?;
    let sub = t
        .get_or_create_subscription(
            STATE_IN_SUBSCRIPTION,
            SubscriptionOptions {
                sub_type: SubscriptionType::Exclusive,
                initial_position: InitialPosition::Earliest,
                ..SubscriptionOptions::default()
            },
        )
        .await?;
    let prefix = namespace_prefix(ns);
    let stores: Vec<(&str, StateStore)> =
        REPLICATED_AREAS.iter().map(|a| (*a, b.state(a))).collect();
    let mut changes = futures::stream::select_all(stores.iter().map(|(area, s)| {
        let area = *area;
        s.watch(&prefix).map(move |c| (area, c)).boxed()
    }));
    // What changed while nobody was exporting goes out again; receivers
    // drop what they hold already.
    for (area, s) in &stores {
        for (key, v) in s.list(&prefix).await? {
            let version = local_version(&b, area, &key).await?;
            export(ctx, &t, area, &key, Some(v.value), version).await?;
        }
    }
    let mut applied = Applied::default();
    let log = t.log().clone();
    let mut pos = sub.mark_delete().max(log.start_offset());
    let mut end_rx = log.watch_end();
    drop(b);
    loop {
        tokio::select! {
            c = changes.next() => {
                let Some((area, c)) = c else {
                    return Err(magnetar_broker::BrokerError::TopicUnavailable("state watch ended".into()).into());
                };
                if applied.take(area, &c.key, &c.value) {
                    continue;
                }
                // A change already overwritten here (by one applied from
                // another region, say) is not sent: every region keeps
                // what overwrote it, so they agree.
                let store = stores.iter().find(|(a, _)| *a == area).map(|(_, s)| s);
                let Some(store) = store else { continue };
                if store.get(&c.key).await?.map(|v| v.value) != c.value {
                    continue;
                }
                let version = Version { time_ms: crate::stats::now_ms(), origin: ctx.cluster.clone() };
                let Some(b) = ctx.broker.upgrade() else { return Ok(()) };
                b.meta().put(&version_key(area, &c.key), serde_json::to_vec(&version).unwrap_or_default()).await.map_err(magnetar_broker::BrokerError::from)?;
                export(ctx, &t, area, &c.key, c.value, version).await?;
            }
            changed = end_rx.changed() => {
                if changed.is_err() {
                    return Err(magnetar_broker::BrokerError::TopicUnavailable(topic.to_string()).into());
                }
            }
            _ = stop.changed() => return Ok(()),
        }
        // Apply what came in from other regions.
        while log.end_offset() > pos {
            let entries = log.read(pos, 100, 1 << 20).await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                pos = e.base_offset + e.offsets;
                for m in crate::replicated_records(e.data)?
                    .into_iter()
                    .map(|s| s.message)
                {
                    apply(ctx, &stores, &mut applied, m).await?;
                }
            }
            sub.expire_before(pos);
        }
    }
}

async fn local_version(b: &Broker, area: &str, key: &str) -> Result<Version> {
    Ok(b.meta()
        .get(&version_key(area, key))
        .await
        .map_err(magnetar_broker::BrokerError::from)?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or_default())
}

async fn export(
    ctx: &Ctx,
    t: &magnetar_broker::topic::Topic,
    area: &str,
    key: &str,
    value: Option<Bytes>,
    version: Version,
) -> Result<()> {
    let version = if version.origin.is_empty() {
        Version {
            time_ms: crate::stats::now_ms(),
            origin: ctx.cluster.clone(),
        }
    } else {
        version
    };
    let text = |s: &str| Some(Bytes::copy_from_slice(s.as_bytes()));
    let m = Message {
        key: text(key),
        value,
        headers: vec![
            (H_AREA.into(), text(area)),
            (H_TIME.into(), text(&version.time_ms.to_string())),
            (H_ORIGIN.into(), text(&version.origin)),
        ],
        timestamp_ms: 0,
    };
    t.publish(&[m]).await?;
    Ok(())
}

async fn apply(
    ctx: &Ctx,
    stores: &[(&str, StateStore)],
    applied: &mut Applied,
    m: Message,
) -> Result<()> {
    let header = |name: &str| {
        m.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let (Some(area), Some(time), Some(origin), Some(key)) = (
        header(H_AREA),
        header(H_TIME).and_then(|t| t.parse::<u64>().ok()),
        header(H_ORIGIN),
        m.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
    ) else {
        return Ok(());
    };
    let Some((area, store)) = stores.iter().find(|(a, _)| *a == area) else {
        return Ok(());
    };
    if origin == ctx.cluster {
        return Ok(());
    }
    let Some(b) = ctx.broker.upgrade() else {
        return Ok(());
    };
    let theirs = Version {
        time_ms: time,
        origin,
    };
    if theirs <= local_version(&b, area, &key).await? {
        return Ok(());
    }
    b.meta()
        .put(
            &version_key(area, &key),
            serde_json::to_vec(&theirs).unwrap_or_default(),
        )
        .await
        .map_err(magnetar_broker::BrokerError::from)?;
    applied.note(area, &key, m.value.clone());
    match m.value {
        Some(v) if !v.is_empty() => {
            store.put(&key, v).await?;
        }
        _ => {
            store.delete(&key).await?;
        }
    }
    Ok(())
}
