//! The accept loop of every protocol listener: one task per connection,
//! with Nagle off, since protocols batch their own writes.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Accepts connections until the task is aborted, serving each with
/// `serve` in a task of its own. `protocol` names it in the logs. An
/// accept error (out of file descriptors, say) is logged and retried
/// after a pause rather than ending the listener.
pub async fn accept_loop<F, Fut, E>(listener: TcpListener, protocol: &'static str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let served = serve(stream, peer);
                tokio::spawn(async move {
                    if let Err(e) = served.await {
                        debug!(%peer, "{protocol} connection closed: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("{protocol} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
