//! Arrival order across connections: a publish the broker reads after
//! another connection's SUBSCRIBE reaches that subscriber.
//!
//! Three things make that hold. Every connection is read and decoded on
//! one thread ([`spawn_reader`]), whose runtime also polls the sockets'
//! readiness (the listener registers them with it), so readers run in the
//! order the kernel reported data; a worker pool would read whichever
//! connection it happens to poll first. A read that brought a publish
//! then yields once before the publish takes its place in the order: the
//! runtime polls readiness again and first runs every reader whose data
//! had arrived by then. Without that, a reader that was still running
//! (or whose thread the OS had preempted) reads a publish that arrived
//! after another connection's SUBSCRIBE before that SUBSCRIBE's reader
//! gets its turn. And every packet gets a sequence number: a SUBSCRIBE
//! holds its filters in the [`SubscribeGate`] until its session has bound
//! them, and a publish numbered later that one of them matches waits for
//! that before it routes.
//!
//! What no broker sees is data the kernel has not yet made readable: a
//! segment that arrives while the broker's thread holds that socket (in
//! a write to it) is queued until the write ends.

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
    /// Numbers the connections: a publish never waits for a SUBSCRIBE of
    /// its own connection, whose session serves both in order.
    connections: AtomicU64,
    /// How many are held: publishes look at the map only when some are.
    held: AtomicUsize,
    pending: Mutex<BTreeMap<u64, Pending>>,
    released: Notify,
}

struct Pending {
    conn: u64,
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

    fn connection(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::SeqCst)
    }

    /// Holds back publishes of other connections numbered after `seq` in
    /// `ns` that one of `filters` matches (shared subscriptions by their
    /// filter).
    fn hold(
        self: &Arc<Self>,
        conn: u64,
        seq: u64,
        ns: &NamespaceName,
        filters: Vec<String>,
    ) -> Held {
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
                    conn,
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

    fn blocks(&self, conn: u64, seq: u64, ns: &NamespaceName, topic: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .range(..seq)
            .any(|(_, p)| {
                p.conn != conn && p.ns == *ns && p.filters.iter().any(|f| topic::matches(f, topic))
            })
    }

    /// Resolves once no SUBSCRIBE of another connection numbered before
    /// `seq` whose filters match `topic` waits to be bound (or after
    /// [`HOLD_LIMIT`]).
    pub(crate) async fn wait(&self, conn: u64, seq: u64, ns: &NamespaceName, topic: &str) {
        if self.held.load(Ordering::SeqCst) == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.blocks(conn, seq, ns, topic) {
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

/// A connection's reader: its batches, its task, and its number for
/// [`SubscribeGate::wait`].
pub(crate) struct Reader {
    pub batches: mpsc::UnboundedReceiver<Batch>,
    pub task: JoinHandle<()>,
    pub conn: u64,
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
) -> Reader
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let conn = gate.connection();
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
            let mut publishes = false;
            loop {
                let seq = gate.stamp();
                match framing.decode(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(packet)) => {
                        publishes |= matches!(packet, Packet::Publish(_));
                        let held = match &packet {
                            Packet::Subscribe(s) => Some(gate.hold(
                                conn,
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
            if publishes {
                // Readers whose data arrived before this read number their
                // SUBSCRIBEs first: on the reading thread a yield resumes
                // only after the runtime has polled readiness again and run
                // the readers that woke.
                tokio::task::yield_now().await;
                for p in &mut batch {
                    if matches!(p.packet, Ok(Packet::Publish(_))) {
                        p.seq = gate.stamp();
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
    Reader {
        batches: rx,
        task,
        conn,
    }
}

/// The runtime whose I/O driver a listener registers MQTT connections
/// with: the reading thread's, so that it sees their readiness in the
/// order the kernel reports it.
pub(crate) fn reading_runtime() -> Option<Handle> {
    reading_thread().cloned()
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
        let (me, other) = (gate.connection(), gate.connection());
        let held = gate.hold(other, a, &ns(), vec!["$share/g/s/+".into()]);
        assert!(gate.blocks(me, b, &ns(), "s/x"));
        assert!(
            !gate.blocks(other, b, &ns(), "s/x"),
            "not a publish of the subscribing connection"
        );
        assert!(
            !gate.blocks(me, a, &ns(), "s/x"),
            "not a publish read before"
        );
        assert!(!gate.blocks(me, b, &ns(), "other"));
        assert!(!gate.blocks(
            me,
            b,
            &NamespaceName::new("t", "m").expect("a valid name"),
            "s/x"
        ));
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.wait(me, b, &ns(), "s/x").await }
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
        let mut reader = spawn_reader(server, framing, buf, ns(), Arc::clone(&gate));
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(std::mem::take(
                &mut reader.batches.recv().await.expect("a batch").packets,
            ));
        }
        assert!(matches!(got[0].packet, Ok(Packet::Subscribe(_))));
        assert!(got[0].held.is_some());
        assert!(matches!(got[1].packet, Ok(Packet::PingRequest)));
        let other = gate.connection();
        assert!(gate.blocks(other, got[1].seq, &ns(), "a/b"));
        assert!(!gate.blocks(reader.conn, got[1].seq, &ns(), "a/b"));
        got.clear();
        assert!(!gate.blocks(other, u64::MAX, &ns(), "a/b"));
        drop(client);
        assert!(
            reader.batches.recv().await.is_none(),
            "the end of input ends the batches"
        );
    }
}
