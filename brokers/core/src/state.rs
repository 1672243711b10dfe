//! Durable state that protocol sessions keep beside the topics: consumer
//! group offsets, MQTT sessions and retained messages, transaction logs.
//!
//! The broker gives each protocol an area of the metadata store and
//! compare-and-set on every key, so that two brokers racing for the same
//! record (a coordinator failover, a session takeover) cannot both win.
//! What the values mean is the protocol's business.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_metadata::{EventKind, MetaClient, MetaError};

use crate::error::{BrokerError, Result};

const STATE_PREFIX: &str = "/protocol-state/";
const ID_PREFIX: &str = "/id-blocks/";

/// A stored value and the version to pass to a compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub version: u64,
}

/// A key written (`value` Some) or deleted, with the area's prefix
/// stripped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub key: String,
    pub value: Option<Bytes>,
    pub version: u64,
}

/// One protocol's area of durable state. Keys are `/`-separated paths
/// chosen by the protocol; segments that come from users should be
/// encoded with [`magnetar_tenancy::names::encode_segment`].
#[derive(Clone, Debug)]
pub struct StateStore {
    meta: MetaClient,
    prefix: String,
}

impl StateStore {
    pub(crate) fn new(meta: MetaClient, area: &str) -> Self {
        StateStore {
            meta,
            prefix: format!("{STATE_PREFIX}{area}/"),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self.meta.get(&self.key(key)).await?.map(|kv| Versioned {
            value: kv.value,
            version: kv.version,
        }))
    }

    /// Writes unconditionally; returns the new version.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<u64> {
        Ok(self.meta.put(&self.key(key), value).await?.version)
    }

    /// Writes only if the key is still at `version` (0: does not exist);
    /// otherwise [`BrokerError::PreconditionFailed`].
    pub async fn compare_and_put(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Bytes>,
    ) -> Result<u64> {
        match self
            .meta
            .compare_and_put(&self.key(key), version, value)
            .await
        {
            Ok(kv) => Ok(kv.version),
            Err(MetaError::Conflict { .. }) => Err(BrokerError::PreconditionFailed(format!(
                "state {key} changed concurrently"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.meta.delete(&self.key(key)).await?.is_some())
    }

    /// Deletes only if the key is still at `version`; false if it was not
    /// (changed, or gone).
    pub async fn compare_and_delete(&self, key: &str, version: u64) -> Result<bool> {
        match self.meta.compare_and_delete(&self.key(key), version).await {
            Ok(kv) => Ok(kv.is_some()),
            Err(MetaError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes of the keys under `prefix` from now on, as every broker
    /// sees them: how a protocol hears that another broker took something
    /// over (an MQTT client id, say). Ends only if the metadata store no
    /// longer keeps the history it needs; watch again then.
    pub fn watch(
        &self,
        prefix: &str,
    ) -> impl futures::Stream<Item = StateChange> + Send + Unpin + 'static {
        use futures::StreamExt;
        let strip = self.prefix.len();
        self.meta.watch(&self.key(prefix), 0).filter_map(move |ev| {
            futures::future::ready(ev.ok().map(|ev| StateChange {
                key: ev.kv.key.get(strip..).unwrap_or_default().to_string(),
                value: (ev.kind == EventKind::Put).then_some(ev.kv.value),
                version: ev.kv.version,
            }))
        })
    }

    /// Every key under `prefix` without its value, the area's prefix
    /// stripped: counting costs no values.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let keys = self.meta.list_keys(&self.key(prefix)).await?;
        Ok(keys
            .into_iter()
            .map(|k| k[self.prefix.len()..].to_string())
            .collect())
    }

    /// Every key under `prefix`, with the area's prefix stripped.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let kvs = self.meta.list(&self.key(prefix)).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| {
                let k = kv.key[self.prefix.len()..].to_string();
                (
                    k,
                    Versioned {
                        value: kv.value,
                        version: kv.version,
                    },
                )
            })
            .collect())
    }
}

/// How long a count is trusted before it is counted again, near the limit
/// and far below it (listing a namespace's keys is not free, and commits
/// and retained publishes come often); what is admitted in between is
/// added to it, so it only errs upward on this broker.
const QUOTA_RECOUNT: Duration = Duration::from_secs(5);
const QUOTA_RECOUNT_FAR: Duration = Duration::from_secs(60);

/// A cap on what clients keep under each prefix of one area (one
/// namespace's retained messages, sessions or groups): the metadata store
/// holds every key in memory, so what clients can create there is
/// bounded.
///
/// What is counted is the distinct first segments after the prefix: a
/// retained message's key, or a group's id however many keys it has.
/// The cap is soft across brokers: each counts again every 5 s near the
/// limit (every minute below half of it) and adds what it admitted since,
/// so brokers creating at once may overshoot by what they create in that
/// time. Writing to something that exists is never refused.
pub struct KeyQuota {
    store: StateStore,
    limit: usize,
    what: &'static str,
    counts: Mutex<HashMap<String, (usize, Instant)>>,
}

impl std::fmt::Debug for KeyQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyQuota")
            .field("what", &self.what)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl KeyQuota {
    /// At most `limit` of them under each prefix of `store`'s area; 0: no
    /// limit. `what` names them in the error ("retained messages").
    pub fn new(store: StateStore, limit: usize, what: &'static str) -> Self {
        KeyQuota {
            store,
            limit,
            what,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, Instant)>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The distinct first segments after `prefix`.
    async fn count(&self, prefix: &str) -> Result<usize> {
        let full = self.store.key(prefix);
        let keys = self.store.meta.list_keys(&full).await?;
        let units: std::collections::HashSet<&str> = keys
            .iter()
            .filter_map(|k| k.get(full.len()..))
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            .collect();
        Ok(units.len())
    }

    /// Admits writing under `prefix` for `unit` (a segment, such as an
    /// encoded client id or group id): always when it exists, and when
    /// it is new only while the prefix holds fewer than the limit;
    /// otherwise [`BrokerError::QuotaExceeded`].
    pub async fn admit(&self, prefix: &str, unit: &str) -> Result<()> {
        if self.limit == 0 {
            return Ok(());
        }
        let cached = self
            .counts()
            .get(prefix)
            .filter(|(n, at)| {
                let ttl = if *n < self.limit / 2 {
                    QUOTA_RECOUNT_FAR
                } else {
                    QUOTA_RECOUNT
                };
                at.elapsed() < ttl
            })
            .map(|(n, _)| *n);
        let n = match cached {
            Some(n) => n,
            None => {
                let n = self.count(prefix).await?;
                let mut counts = self.counts();
                if counts.len() >= 10_000 {
                    counts.retain(|_, (_, at)| at.elapsed() < QUOTA_RECOUNT_FAR);
                }
                counts.insert(prefix.to_string(), (n, Instant::now()));
                n
            }
        };
        if n < self.limit {
            // Counted as new even if it is not; the next count corrects it.
            if let Some((c, _)) = self.counts().get_mut(prefix) {
                *c += 1;
            }
            return Ok(());
        }
        let own = format!("{prefix}{unit}");
        let exists = self
            .store
            .meta
            .list_keys(&self.store.key(&own))
            .await?
            .iter()
            .any(|k| {
                k.get(self.store.prefix.len() + own.len()..)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
        if exists {
            return Ok(());
        }
        Err(BrokerError::QuotaExceeded(format!(
            "{} already holds {n} {} (max {})",
            prefix.trim_end_matches('/'),
            self.what,
            self.limit
        )))
    }
}

/// Reserves `count` consecutive ids of the cluster-wide sequence `name`
/// and returns the first. Ids are never handed out twice, even across
/// brokers and restarts; a broker that dies wastes the rest of its block.
pub(crate) async fn reserve_ids(meta: &MetaClient, name: &str, count: u64) -> Result<u64> {
    let key = format!("{ID_PREFIX}{name}");
    loop {
        let current = meta.get(&key).await?;
        let (next, version) = match &current {
            Some(kv) => {
                let s = std::str::from_utf8(&kv.value).unwrap_or_default();
                let next = s
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| BrokerError::CorruptMetadata {
                        key: key.clone(),
                        reason: format!("not a number: {s:?}"),
                    })?;
                (next, kv.version)
            }
            None => (0, 0),
        };
        let end = next.saturating_add(count);
        match meta
            .compare_and_put(&key, version, end.to_string().into_bytes())
            .await
        {
            Ok(_) => return Ok(next),
            Err(MetaError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
