//! How this cluster reaches another one: the gRPC channel to its service
//! URL (or to the broker it redirects to) and the credentials its
//! registration carries.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use magnetar_tenancy::ClusterData;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::error::{GeoError, Result};
use crate::proto::replication_client::ReplicationClient;

/// Largest batch a stream carries, with room for its framing: the
/// receiver refuses bigger messages before reading them.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// A client of one remote broker.
pub type Client =
    ReplicationClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Puts the cluster's token on every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// A remote cluster as its registration describes it.
#[derive(Clone)]
pub struct Remote {
    pub name: String,
    data: ClusterData,
    /// `Authorization` value, read once per registration change.
    bearer: Option<MetadataValue<tonic::metadata::Ascii>>,
    tls: Option<magnetar_net::GrpcClientTls>,
    /// One channel per broker URL (the service URL, and the owners it
    /// redirects to), each multiplexing every stream to that broker.
    channels: std::sync::Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub fn new(name: &str, data: ClusterData) -> Result<Remote> {
        let config = |why: String| GeoError::Config {
            cluster: name.to_owned(),
            why,
        };
        let bearer = match data.authentication_parameters.as_deref() {
            None | Some("") => None,
            Some(p) => {
                let token = match (p.strip_prefix("token:"), p.strip_prefix("file://")) {
                    (Some(t), _) => t.trim().to_owned(),
                    (_, Some(path)) => std::fs::read_to_string(path)
                        .map_err(|e| config(format!("reading the token file {path}: {e}")))?
                        .trim()
                        .to_owned(),
                    _ => p.trim().to_owned(),
                };
                Some(
                    format!("Bearer {token}")
                        .parse()
                        .map_err(|_| config("the token is not a valid header value".into()))?,
                )
            }
        };
        let wants_tls = data.broker_client_tls_enabled || data.service_url_tls.is_some();
        // A link that would take any certificate would hand the stream
        // and the token to whoever answers; refused, visibly, rather than
        // ignored.
        if wants_tls && data.tls_allow_insecure_connection {
            return Err(config(
                "tlsAllowInsecureConnection is not supported: links between clusters verify \
                 the remote's certificate against brokerClientTrustCertsFilePath"
                    .into(),
            ));
        }
        let tls = if wants_tls {
            match data.broker_client_trust_certs_file_path.as_deref() {
                Some(ca) => Some(
                    magnetar_net::GrpcClientTls::load(Path::new(ca), None)
                        .map_err(|e| config(e.to_string()))?,
                ),
                None if data.broker_client_tls_enabled => {
                    return Err(config(
                        "brokerClientTlsEnabled needs brokerClientTrustCertsFilePath".into(),
                    ))
                }
                None => None,
            }
        } else {
            None
        };
        Ok(Remote {
            name: name.to_owned(),
            data,
            bearer,
            tls,
            channels: Default::default(),
        })
    }

    /// Whether `data` is what this was made from.
    pub fn is(&self, data: &ClusterData) -> bool {
        &self.data == data
    }

    /// The URL replication starts at: the TLS service URL when TLS is on.
    pub fn service_url(&self) -> Result<String> {
        let url = match (&self.tls, &self.data.service_url_tls) {
            (Some(_), Some(u)) => Some(u.clone()),
            _ => self.data.service_url.clone(),
        };
        url.ok_or_else(|| GeoError::Config {
            cluster: self.name.clone(),
            why: "no serviceUrl".into(),
        })
    }

    /// A client for the broker at `url` (a service URL, or an owner's
    /// HTTP URL from a redirect), with the cluster's credentials on
    /// every call.
    pub fn client(&self, url: &str) -> Result<Client> {
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            match channels.get(url) {
                Some(c) => c.clone(),
                None => {
                    let tls = if url.starts_with("https://") {
                        Some(self.tls.as_ref().ok_or_else(|| GeoError::Config {
                            cluster: self.name.clone(),
                            why: format!("{url} needs brokerClientTrustCertsFilePath"),
                        })?)
                    } else {
                        None
                    };
                    let c = magnetar_net::grpc_endpoint(url, tls)
                        .map_err(|why| GeoError::Config {
                            cluster: self.name.clone(),
                            why,
                        })?
                        .connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .keep_alive_while_idle(true)
                        .connect_lazy();
                    channels.insert(url.to_owned(), c.clone());
                    c
                }
            }
        };
        let client = ReplicationClient::with_interceptor(channel, Bearer(self.bearer.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(client)
    }

    /// Forgets the channel to `url`, after it failed, so that the next
    /// call connects anew.
    pub fn drop_channel(&self, url: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(url);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insecure_tls_link_is_refused_with_a_reason() {
        let data = ClusterData {
            service_url_tls: Some("https://west.example:8443".into()),
            broker_client_tls_enabled: true,
            tls_allow_insecure_connection: true,
            ..ClusterData::default()
        };
        let e = Remote::new("west", data).expect_err("refused");
        assert!(e.to_string().contains("tlsAllowInsecureConnection"), "{e}");
        // Without TLS the flag has nothing to loosen.
        let plain = ClusterData {
            service_url: Some("http://west.example:8080".into()),
            tls_allow_insecure_connection: true,
            ..ClusterData::default()
        };
        assert!(Remote::new("west", plain).is_ok());
    }
}
