//! Raft between nodes, over the `Raft` gRPC service.
//!
//! openraft's request and response types are carried as postcard bytes inside
//! the protobuf envelope; the envelope names the sender so that a node can
//! refuse peers outside its group before decoding anything else.

use std::time::Duration;

use openraft::error::{
    Infallible, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::proto::raft_client::RaftClient;
use crate::proto::{RaftReply, RaftRequest};
use crate::types::TypeConfig;

/// Raft messages can be large (batches of entries, snapshot chunks).
pub const MAX_RAFT_MESSAGE: usize = 256 << 20;

pub struct Network {
    pub id: u64,
    /// What this node's calls to its peers carry.
    pub bearer: magnetar_net::BearerToken,
    /// TLS of those calls, when the peers listen with TLS.
    pub tls: Option<magnetar_net::GrpcClientTls>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let client = magnetar_net::grpc_endpoint(&node.addr, self.tls.as_ref()).map(|e| {
            let channel = e
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .connect_lazy();
            RaftClient::with_interceptor(channel, self.bearer.clone())
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE)
        });
        PeerClient {
            from: self.id,
            target,
            client,
        }
    }
}

pub struct PeerClient {
    from: u64,
    target: u64,
    client: Result<RaftClient<InterceptedService<Channel, magnetar_net::BearerToken>>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        which: Which,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    e.clone(),
                ))))
            }
        };
        let payload =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            from: self.from,
            payload: payload.into(),
        };
        let fut = async {
            match which {
                Which::Append => client.append_entries(request).await,
                Which::Vote => client.vote(request).await,
                Which::Snapshot => client.install_snapshot(request).await,
            }
        };
        let reply: RaftReply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&TransportError(
                    format!(
                        "no reply from node {} within {:?}",
                        self.target,
                        option.hard_ttl()
                    ),
                ))))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<u64, E>> = postcard::from_bytes(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Which {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, Infallible> {
        self.call(&rpc, &option, Which::Append).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(&rpc, &option, Which::Snapshot).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, Infallible> {
        self.call(&rpc, &option, Which::Vote).await
    }
}
