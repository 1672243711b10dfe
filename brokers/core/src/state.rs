//! Durable state that protocol sessions keep beside the topics: consumer
//! group offsets, MQTT sessions and retained messages, transaction logs.
//!
//! The broker gives each protocol an area of the metadata store and
//! compare-and-set on every key, so that two brokers racing for the same
//! record (a coordinator failover, a session takeover) cannot both win.
//! What the values mean is the protocol's business.

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
