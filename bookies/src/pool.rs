//! Connections to bookies, found by id through the metadata store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_metadata::MetaClient;
use magnetar_net::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{BookieError, Result};
use crate::meta::{self, BookieInfo};
use crate::proto::bookie_client::BookieClient;
use crate::server::MAX_MESSAGE_BYTES;

/// Resolves bookie ids to addresses and keeps one HTTP/2 channel per bookie;
/// every ledger's streams to that bookie share it.
#[derive(Clone)]
pub struct BookiePool {
    meta: MetaClient,
    /// The metadata client's token: one identity for both planes.
    bearer: BearerToken,
    channels: Arc<Mutex<HashMap<u64, (String, Channel)>>>,
}

impl std::fmt::Debug for BookiePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookiePool").finish_non_exhaustive()
    }
}

/// A channel to the bookie at `addr`, over TLS with `tls`.
pub fn channel_to(addr: &str, tls: Option<&magnetar_net::GrpcClientTls>) -> Result<Channel> {
    Ok(magnetar_net::grpc_endpoint(addr, tls)
        .map_err(|e| BookieError::Config(format!("bookie: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect_lazy())
}

/// A bookie RPC client whose calls carry the process's token.
pub type Rpc = BookieClient<InterceptedService<Channel, BearerToken>>;

pub fn rpc(channel: Channel, bearer: BearerToken) -> Rpc {
    BookieClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl BookiePool {
    pub fn new(meta: MetaClient) -> Self {
        // The metadata client checked the token when it was made.
        let bearer = BearerToken::new(meta.token()).unwrap_or_default();
        Self {
            meta,
            bearer,
            channels: Arc::default(),
        }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    pub async fn client(&self, id: u64) -> Result<Rpc> {
        if let Some((_, ch)) = self.lock().get(&id) {
            return Ok(rpc(ch.clone(), self.bearer.clone()));
        }
        let kv = self
            .meta
            .get(&meta::bookie_info_key(id))
            .await?
            .ok_or_else(|| BookieError::Remote {
                bookie: id,
                message: "no such bookie registered".into(),
            })?;
        let info: BookieInfo = serde_json::from_slice(&kv.value)
            .map_err(|e| BookieError::Storage(format!("bookie {id} info: {e}")))?;
        let ch = channel_to(&info.addr, self.meta.bookie_tls())?;
        let mut map = self.lock();
        // An address that changed since it was cached replaces the channel.
        let entry = map
            .entry(id)
            .or_insert_with(|| (info.addr.clone(), ch.clone()));
        if entry.0 != info.addr {
            *entry = (info.addr, ch);
        }
        Ok(rpc(entry.1.clone(), self.bearer.clone()))
    }

    /// Forgets a bookie's channel, so that the next call looks its address
    /// up again (it may have restarted elsewhere).
    pub fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, Channel)>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bookies registered as running.
    pub async fn available(&self) -> Result<Vec<BookieInfo>> {
        let kvs = self.meta.list(meta::BOOKIE_AVAILABLE_PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<BookieInfo>(&kv.value).ok())
            .collect())
    }

    /// Bookies that ever registered.
    pub async fn known(&self) -> Result<Vec<BookieInfo>> {
        let kvs = self.meta.list(meta::BOOKIE_INFO_PREFIX).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<BookieInfo>(&kv.value).ok())
            .collect())
    }

    /// Writable running bookies not in `exclude`.
    pub async fn writable(&self, exclude: &[u64]) -> Result<Vec<u64>> {
        Ok(self
            .available()
            .await?
            .into_iter()
            .filter(|b| !b.read_only && !exclude.contains(&b.id))
            .map(|b| b.id)
            .collect())
    }
}
