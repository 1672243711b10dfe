//! A loopback TCP proxy between a test's clients (or nodes) and a server,
//! whose link the test cuts, delays or pauses: the network faults of
//! several regions, without `tc netem` (which CI does not have).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The state of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes go through, each `delay` after it arrived.
    Up { delay: Duration },
    /// Bytes wait in the proxy; connections stay open.
    Paused,
    /// Every connection is closed, and new ones are closed at once.
    Cut,
}

/// A proxy from [`FaultProxy::addr`] to a target address.
pub struct FaultProxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a loopback port of its own, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listens on `listen`, forwarding to `target`.
    pub async fn start_at(listen: SocketAddr, target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (link, watching) = watch::channel(Link::Up {
            delay: Duration::ZERO,
        });
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watching.borrow() == Link::Cut {
                    drop(client);
                    continue;
                }
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    carry(client, server, watching).await;
                });
            }
        });
        Ok(FaultProxy { addr, link, task })
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn link(&self) -> Link {
        *self.link.borrow()
    }

    /// Every byte from now on arrives `delay` late, both ways.
    pub fn delay(&self, delay: Duration) {
        self.link.send_replace(Link::Up { delay });
    }

    /// Holds every byte until [`FaultProxy::heal`].
    pub fn pause(&self) {
        self.link.send_replace(Link::Paused);
    }

    /// Closes every connection, and new ones, until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.link.send_replace(Link::Cut);
    }

    /// Back to an undelayed link.
    pub fn heal(&self) {
        self.delay(Duration::ZERO);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Cut);
        self.task.abort();
    }
}

/// Carries one connection both ways until either side closes or the link
/// is cut.
async fn carry(client: TcpStream, server: TcpStream, link: watch::Receiver<Link>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(one_way(cr, sw, link.clone()));
    let down = tokio::spawn(one_way(sr, cw, link));
    let (up_abort, down_abort) = (up.abort_handle(), down.abort_handle());
    tokio::select! {
        _ = up => down_abort.abort(),
        _ = down => up_abort.abort(),
    }
}

/// Reads chunks as they come, stamping each with when it may go on, and
/// writes them in order at that time while the link is up.
async fn one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = {
        let link = link.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let delay = match *link.borrow() {
                    Link::Up { delay } => delay,
                    Link::Paused => Duration::ZERO,
                    Link::Cut => return,
                };
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    let cut = wait_cut(link.clone());
    let writing = async move {
        while let Some((due, bytes)) = rx.recv().await {
            loop {
                match *link.borrow_and_update() {
                    Link::Cut => return,
                    Link::Paused => {}
                    Link::Up { .. } => break,
                }
                if link.changed().await.is_err() {
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                _ = wait_cut(link.clone()) => return,
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = reading => {}
        () = writing => {}
        () = cut => {}
    }
}

async fn wait_cut(mut link: watch::Receiver<Link>) {
    while *link.borrow_and_update() != Link::Cut {
        if link.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.expect("read");
        got
    }

    #[tokio::test]
    async fn bytes_go_through_both_ways() {
        let p = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
        assert_eq!(
            p.link(),
            Link::Up {
                delay: Duration::ZERO
            }
        );
    }

    #[tokio::test]
    async fn a_delayed_link_is_late_both_ways() {
        let p = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        p.delay(Duration::from_millis(100));
        let t = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        p.heal();
        let t = std::time::Instant::now();
        round_trip(&mut s, b"fast").await;
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_paused_link_holds_bytes_until_healed() {
        let p = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        round_trip(&mut s, b"up").await;
        p.pause();
        s.write_all(b"held").await.expect("write");
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut got)).await;
        assert!(early.is_err(), "nothing passes a paused link");
        p.heal();
        s.read_exact(&mut got).await.expect("read after heal");
        assert_eq!(&got, b"held");
    }

    #[tokio::test]
    async fn a_cut_link_closes_connections_until_healed() {
        let p = FaultProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        round_trip(&mut s, b"up").await;
        p.cut();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed, not hanging");
        assert!(matches!(n, Ok(0) | Err(_)));
        let mut again = TcpStream::connect(p.addr()).await.expect("accepted");
        let n = tokio::time::timeout(Duration::from_secs(5), again.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)));
        p.heal();
        let mut healed = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut healed, b"back").await, b"back");
    }
}
