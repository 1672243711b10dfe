//! Arrival order across connections: a publish the broker reads after
//! another connection's SUBSCRIBE reaches that subscriber.
//!
//! Two things make that hold. Every connection's packets are read and
//! decoded on one thread ([`spawn_reader`]), whose tasks run in the order
//! the sockets became readable, so read order is arrival order (as in a
//! single-threaded broker such as Mosquitto); a worker pool would read
//! whichever connection it happens to poll first. And every packet gets a
//! sequence number when read: a SUBSCRIBE holds its filters in the
//! [`SubscribeGate`] until its session has bound them, and a publish
//! read later that one of them matches waits for that before it routes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use magnetar_tenancy::names::NamespaceName;
use rmqtt_codec::v5::Packet;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::codec::Framing;
use crate::error::MqttError;
use crate::topic;

/// The longest a publish waits for an earlier SUBSCRIBE to be bound: a
/// subscribe stuck on the metadata store does not stop publishers.
const HOLD_LIMIT: Duration = Duration::from_secs(5);
/// The largest read, so that one busy connection does not starve the
/// others on the reading thread.
const MAX_READ: usize = 64 * 1024;
/// Bytes of a connection read ahead of its session at most. The reader
/// goes on while its session is busy (a SUBSCRIBE behind a slow packet
/// is still read in arrival order) but a flood waits in TCP beyond this.
const READ_AHEAD: usize = 1 << 20;

/// SUBSCRIBEs read but not yet bound, by sequence number.
#[derive(Default)]
pub(crate) struct SubscribeGate {
    next: AtomicU64,
    /// How many are held: publishes look at the map only when some are.
    held: AtomicUsize,
    pending: Mutex<BTreeMap<u64, Pending>>,
    released: Notify,
}

struct Pending {
    ns: NamespaceName,
    filters: Vec<String>,
}

/// A SUBSCRIBE's hold on the gate, released when dropped: after the
/// session bound its filters, or when the packet or the connection went.
pub(crate) struct Held {
    gate: Arc<SubscribeGate>,
    seq: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let removed = self
            .gate
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.seq);
        if removed.is_some() {
            self.gate.held.fetch_sub(1, Ordering::SeqCst);
        }
        self.gate.released.notify_waiters();
    }
}

impl SubscribeGate {
    /// The sequence number of the packet just read.
    fn stamp(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }

    /// Holds back publishes read after `seq` in `ns` that one of `filters`
    /// matches (shared subscriptions by their filter).
    fn hold(self: &Arc<Self>, seq: u64, ns: &NamespaceName, filters: Vec<String>) -> Held {
        let filters = filters
            .into_iter()
            .map(|f| match topic::parse_share(&f) {
                Ok(Some((_, inner))) => inner.to_owned(),
                _ => f,
            })
            .collect();
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                seq,
                Pending {
                    ns: ns.clone(),
                    filters,
                },
            );
        self.held.fetch_add(1, Ordering::SeqCst);
        Held {
            gate: Arc::clone(self),
            seq,
        }
    }

    fn blocks(&self, seq: u64, ns: &NamespaceName, topic: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .range(..seq)
            .any(|(_, p)| p.ns == *ns && p.filters.iter().any(|f| topic::matches(f, topic)))
    }

    /// Resolves once no SUBSCRIBE read before `seq` whose filters match
    /// `topic` waits to be bound (or after [`HOLD_LIMIT`]).
    pub(crate) async fn wait(&self, seq: u64, ns: &NamespaceName, topic: &str) {
        if self.held.load(Ordering::SeqCst) == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.blocks(seq, ns, topic) {
                return;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                tracing::debug!(%ns, topic, "published without waiting longer for a subscribe");
                return;
            }
        }
    }
}

/// What one read brought, in arrival order. Dropping it (once served)
/// lets the reader read that much more ahead.
pub(crate) struct Batch {
    pub packets: Vec<Inbound>,
    bytes: usize,
    backlog: Arc<Backlog>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.backlog.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        self.backlog.drained.notify_one();
    }
}

/// Bytes read but not yet served, of one connection.
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    drained: Notify,
}

/// A packet as read.
pub(crate) struct Inbound {
    pub seq: u64,
    pub packet: Result<Packet, MqttError>,
    /// For a SUBSCRIBE: its hold on the gate.
    pub held: Option<Held>,
}

/// The thread every connection is read on; `None` if it could not start,
/// and connections are then read where they are served.
fn reading_thread() -> Option<&'static Handle> {
    static READER: OnceLock<Option<Handle>> = OnceLock::new();
    READER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let started = std::thread::Builder::new()
                .name("mqtt-read".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let _ = tx.send(Some(rt.handle().clone()));
                            rt.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            tracing::warn!("MQTT reading thread: {e}");
                            let _ = tx.send(None);
                        }
                    }
                });
            started.ok().and_then(|_| rx.recv().ok().flatten())
        })
        .as_ref()
}

/// Reads and decodes `rd` (starting with what `buf` holds) on the reading
/// thread, into batches of packets, one per read, up to [`READ_AHEAD`]
/// bytes ahead of the session: a session that stops taking batches
/// stops the reading there.
pub(crate) fn spawn_reader<R>(
    mut rd: R,
    mut framing: Framing,
    mut buf: BytesMut,
    ns: NamespaceName,
    gate: Arc<SubscribeGate>,
) -> (mpsc::UnboundedReceiver<Batch>, JoinHandle<()>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let task = async move {
        // How much the last read brought: reads reserve for about twice
        // that, so that busy connections read in large chunks and idle
        // ones hold small buffers.
        let mut last_read = 0usize;
        loop {
            let mut batch = Vec::new();
            let mut failed = false;
            let before = buf.len();
            loop {
                let seq = gate.stamp();
                match framing.decode(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(packet)) => {
                        let held = match &packet {
                            Packet::Subscribe(s) => Some(gate.hold(
                                seq,
                                &ns,
                                s.topic_filters.iter().map(|(f, _)| f.to_string()).collect(),
                            )),
                            _ => None,
                        };
                        batch.push(Inbound {
                            seq,
                            packet: Ok(packet),
                            held,
                        });
                    }
                    Err(e) => {
                        batch.push(Inbound {
                            seq,
                            packet: Err(e),
                            held: None,
                        });
                        failed = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let bytes = before - buf.len();
                backlog.bytes.fetch_add(bytes, Ordering::SeqCst);
                let batch = Batch {
                    packets: batch,
                    bytes,
                    backlog: Arc::clone(&backlog),
                };
                if tx.send(batch).is_err() {
                    return;
                }
            }
            if failed {
                return;
            }
            if buf.is_empty() && buf.capacity() > 8192 {
                buf = BytesMut::new();
            }
            if buf.capacity() - buf.len() < 256 {
                buf.reserve((last_read * 2).clamp(512, MAX_READ));
            }
            loop {
                let drained = backlog.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if backlog.bytes.load(Ordering::SeqCst) < READ_AHEAD {
                    break;
                }
                drained.await;
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => last_read = n,
            }
        }
    };
    let task = match reading_thread() {
        Some(thread) => thread.spawn(task),
        None => tokio::spawn(task),
    };
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> NamespaceName {
        NamespaceName::new("t", "n").expect("a valid name")
    }

    #[tokio::test]
    async fn a_publish_waits_only_for_earlier_matching_subscribes() {
        let gate = Arc::new(SubscribeGate::default());
        let (a, b) = (gate.stamp(), gate.stamp());
        let held = gate.hold(a, &ns(), vec!["$share/g/s/+".into()]);
        assert!(gate.blocks(b, &ns(), "s/x"));
        assert!(!gate.blocks(a, &ns(), "s/x"), "not a publish read before");
        assert!(!gate.blocks(b, &ns(), "other"));
        assert!(!gate.blocks(
            b,
            &NamespaceName::new("t", "m").expect("a valid name"),
            "s/x"
        ));
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.wait(b, &ns(), "s/x").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        waiting.await.expect("the waiter ends");
        assert_eq!(gate.held.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn packets_come_in_batches_and_a_subscribe_holds_until_dropped() {
        let gate = Arc::new(SubscribeGate::default());
        let mut framing = Framing::new(1024);
        // CONNECT 3.1.1, decoded here as a session's first packet is.
        let connect = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c',
        ];
        let mut buf = BytesMut::from(&connect[..]);
        assert!(matches!(
            framing.decode(&mut buf),
            Ok(Some(Packet::Connect(_)))
        ));
        // SUBSCRIBE id 1 to "a/#" QoS 0, then PINGREQ.
        let rest = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 0, 0xC0, 0];
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, &rest)
            .await
            .expect("written");
        let (mut rx, _task) = spawn_reader(server, framing, buf, ns(), Arc::clone(&gate));
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(std::mem::take(
                &mut rx.recv().await.expect("a batch").packets,
            ));
        }
        assert!(matches!(got[0].packet, Ok(Packet::Subscribe(_))));
        assert!(got[0].held.is_some());
        assert!(matches!(got[1].packet, Ok(Packet::PingRequest)));
        assert!(gate.blocks(got[1].seq, &ns(), "a/b"));
        got.clear();
        assert!(!gate.blocks(u64::MAX, &ns(), "a/b"));
        drop(client);
        assert!(
            rx.recv().await.is_none(),
            "the end of input ends the batches"
        );
    }
}
