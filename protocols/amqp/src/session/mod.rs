//! One AMQP connection: the handshake, its channels, and the methods they
//! carry, turned into calls on the broker's protocol-neutral API.
//!
//! A connection is one task. It reads frames, runs methods in order, and
//! takes events from helpers: one task per consumer forwarding deliveries,
//! and one publish pipeline per channel that waits for durability and
//! reports publisher confirms. Writes go through a writer task, so that
//! nothing here blocks on a slow socket but the reads that backpressure
//! the publisher.
//!
//! The handshake, channels and the reading loop are here; the methods of
//! each class are in [`exchanges`], [`queues`] and [`basics`], the
//! helpers' reports and deliveries in [`events`]. Every verdict is asked
//! of [`crate::rules`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{
    access, basic, channel, confirm, connection, exchange, queue, tx, AMQPClass,
};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_broker::format::now_ms;
use magnetar_broker::routing::{Binding, ExchangeDef};
use magnetar_broker::subscription::{
    InitialPosition, MessagePriority, SubscriptionOptions, SubscriptionType,
};
use magnetar_broker::{
    Broker, BrokerError, Consumer, ConsumerControl, ConsumerOptions, Delivery, Grants, Message,
    Principal, StateStore,
};
use magnetar_tenancy::{AuthAction, Credentials, NamespaceName, TopicName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::channel::{Assembler, Publish, Tags};
use crate::codec::{self, CodecError, Frame};
use crate::deadletter::{dead_lettered, Reason};
use crate::error::{self, exception_of, AmqpError, Exception};
use crate::props;
use crate::queue::{self as qdef, Overflow, QueueDef, QueueType, QUEUE_SUBSCRIPTION};
use crate::rules::channels::{self, Prefetch};
use crate::rules::consumers::{self, StreamStart};
use crate::rules::delivery::{self, Verdict};
use crate::rules::handshake::{Handshake, Input, Limits, Step};
use crate::rules::publishing::{Confirms, Modes, Publishing};
use crate::AmqpConfig;

/// Credit a consumer without a prefetch limit is kept topped up to; it
/// bounds what sits in memory between the subscription and the socket.
mod basics;
mod events;
mod exchanges;
mod queues;

/// Publishes of one channel between the socket and durability.
/// How long a connection the peer closed keeps reading, for more closes.
const CLOSING_LINGER: Duration = Duration::from_secs(1);
/// What it buffers meanwhile, at most.
const CLOSING_MAX_BUFFER: usize = 1 << 20;

const PIPELINE_DEPTH: usize = 4096;
/// How often resource alarms are checked.
const ALARM_CHECK: Duration = Duration::from_millis(500);
/// Read buffer of a connection past its handshake.
const READ_BUFFER: usize = 64 * 1024;

/// What every connection of a listener shares.
pub(crate) struct Ctx {
    pub broker: Broker,
    pub cfg: AmqpConfig,
    pub store: StateStore,
    /// Why publishers are blocked (a resource alarm), if they are.
    pub alarm: tokio::sync::watch::Sender<Option<String>>,
    next_conn: AtomicU64,
    registry: std::sync::Mutex<Registry>,
    /// A confirmed publish from its arrival to its `basic.ack`.
    publish_latency: magnetar_broker::metrics::Histogram,
}

/// Per-queue facts that only matter while the broker runs.
#[derive(Default)]
struct Registry {
    queues: HashMap<(NamespaceName, String), QueueInfo>,
    /// Direct reply-to consumers by the token in their reply address.
    replies: HashMap<String, ReplyTarget>,
    /// Queues whose head is being expired.
    sweepers: std::collections::HashSet<(NamespaceName, String)>,
    /// Queues with `x-expires` being watched for disuse.
    expirers: std::collections::HashSet<(NamespaceName, String)>,
    /// One publisher per queue topic, shared by all connections, so that
    /// concurrent publishes gather into batches.
    publishers: HashMap<TopicName, magnetar_broker::Coalescer>,
}

/// Where replies to `amq.rabbitmq.reply-to.<token>` go.
#[derive(Clone)]
struct ReplyTarget {
    events: mpsc::UnboundedSender<Event>,
    channel: u16,
    gen: u64,
    consumer: String,
}

/// RabbitMQ's pseudo-queue for direct reply-to.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

struct QueueInfo {
    def: Arc<QueueDef>,
    /// The connection an exclusive queue belongs to.
    owner: Option<u64>,
    uses: consumers::Use,
    /// Single active consumer: the others wait holding their credit
    /// until their turn.
    sac: consumers::SingleActive<ConsumerId, (ConsumerControl, u64)>,
    /// Last declare, consume or get: what `x-expires` counts from.
    last_used: Instant,
    /// Set while an auto-delete or expired queue is being deleted in the
    /// background; turns true once it is gone.
    deleting: Option<watch::Receiver<bool>>,
}

/// A consumer across the broker: connection, channel, tag.
type ConsumerId = (u64, u16, String);

impl Ctx {
    pub fn new(broker: Broker, cfg: AmqpConfig) -> Self {
        let store = broker.state(qdef::STATE_AREA);
        Ctx {
            publish_latency: broker.metrics().publish_latency("amqp"),
            broker,
            cfg,
            store,
            alarm: tokio::sync::watch::channel(None).0,
            next_conn: AtomicU64::new(1),
            registry: std::sync::Mutex::new(Registry::default()),
        }
    }

    /// Raises an alarm while the process's resident memory is over the
    /// configured limit, or while the bookies are out of disk, as
    /// RabbitMQ's memory and disk alarms do.
    pub fn start_alarms(self: &Arc<Self>) {
        let limit = self.cfg.memory_limit_bytes;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(ctx) = weak.upgrade() else {
                    return;
                };
                let memory = limit > 0 && resident_bytes().is_some_and(|r| r > limit);
                let disk = !memory && ctx.broker.storage_full().await.unwrap_or(false);
                let reason = if memory {
                    Some("low on memory".to_owned())
                } else if disk {
                    Some("low on disk".to_owned())
                } else {
                    None
                };
                ctx.alarm.send_if_modified(|a| {
                    let changed = *a != reason;
                    *a = reason;
                    changed
                });
                drop(ctx);
                tokio::time::sleep(ALARM_CHECK).await;
            }
        });
    }

    /// Waits while the queue is being deleted in the background.
    async fn deleted(&self, key: &(NamespaceName, String)) {
        loop {
            let mark = self
                .registry()
                .queues
                .get(key)
                .and_then(|i| i.deleting.clone());
            let Some(mut done) = mark else {
                return;
            };
            let _ = done.wait_for(|&gone| gone).await;
        }
    }

    /// Marks a queue as being deleted, under the registry lock: declares
    /// and lookups of its name wait until it is gone, and then make a new
    /// queue, which this deletion cannot reach.
    fn mark_deleting(info: &mut QueueInfo) -> watch::Sender<bool> {
        let (tx, rx) = watch::channel(false);
        info.deleting = Some(rx);
        tx
    }

    /// Deletes a queue marked with [`Ctx::mark_deleting`]; whether it went.
    /// On failure the mark is lifted and the queue stays.
    async fn delete_marked(
        &self,
        key: &(NamespaceName, String),
        done: watch::Sender<bool>,
    ) -> bool {
        let (ns, q) = key;
        let gone = self.broker.delete_queue(ns, q).await.is_ok();
        if gone {
            let _ = qdef::remove(&self.store, ns, q).await;
            self.registry().queues.remove(key);
        } else if let Some(info) = self.registry().queues.get_mut(key) {
            info.deleting = None;
        }
        done.send_replace(true);
        gone
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publisher(&self, topic: &TopicName) -> magnetar_broker::Coalescer {
        let mut reg = self.registry();
        reg.publishers
            .entry(topic.clone())
            .or_insert_with(|| self.broker.coalescer(topic))
            .clone()
    }

    fn known_def(&self, ns: &NamespaceName, queue: &str) -> Option<Arc<QueueDef>> {
        self.registry()
            .queues
            .get(&(ns.clone(), queue.to_owned()))
            .map(|i| Arc::clone(&i.def))
    }

    /// Republishes a message that left `def`'s queue to its dead-letter
    /// exchange, if it has one; otherwise the message is simply gone.
    /// A copy that would come straight back to the same queue for a reason
    /// other than rejection is dropped, as RabbitMQ breaks such cycles.
    async fn dead_letter(
        &self,
        ns: &NamespaceName,
        def: &QueueDef,
        record: &Message,
        reason: Reason,
    ) -> Result<(), BrokerError> {
        let Some(dlx) = &def.args.dead_letter_exchange else {
            return Ok(());
        };
        let d = props::from_record(record, &def.name);
        let published = props::Published {
            exchange: d.exchange,
            routing_key: d.routing_key,
            properties: d.properties,
            body: d.body,
        };
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let out = dead_lettered(
            published,
            &def.name,
            reason,
            dlx,
            def.args.dead_letter_routing_key.as_deref(),
            now_s,
        );
        let headers = out
            .properties
            .headers()
            .as_ref()
            .map(props::header_values)
            .unwrap_or_default();
        let routes = match self
            .broker
            .route(ns, &out.exchange, &out.routing_key, &headers)
            .await
        {
            Ok(r) => r,
            // A dead-letter exchange that does not exist drops the message.
            Err(BrokerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let batch = magnetar_broker::format::encode_messages(std::slice::from_ref(
            &props::to_record(&out),
        ))?;
        for (q, topic) in routes {
            if q == def.name && reason != Reason::Rejected {
                continue;
            }
            self.broker.publish_batch(&topic, batch.clone()).await?;
        }
        Ok(())
    }

    /// Keeps expiring the head of a queue with a message TTL while the
    /// queue exists, whether or not anyone consumes it.
    fn ensure_sweeper(self: &Arc<Self>, ns: &NamespaceName, def: &QueueDef) {
        let key = (ns.clone(), def.name.clone());
        {
            let mut reg = self.registry();
            if !reg.sweepers.insert(key.clone()) {
                return;
            }
        }
        let ctx = Arc::clone(self);
        let ttl = def.args.message_ttl_ms;
        tokio::spawn(async move {
            let period = Duration::from_millis(ttl.map_or(1000, |t| (t / 4).clamp(20, 1000)));
            loop {
                tokio::time::sleep(period).await;
                let Some(def) = ctx.known_def(&key.0, &key.1) else {
                    break;
                };
                if let Err(e) = ctx.expire_head(&key.0, &def).await {
                    debug!(queue = %def.name, "expiring: {e}");
                }
            }
            ctx.registry().sweepers.remove(&key);
        });
    }

    /// Dead-letters (or drops) the oldest ready messages beyond the
    /// queue's length limits, as RabbitMQ's drop-head overflow does.
    async fn drop_head(
        &self,
        ns: &NamespaceName,
        def: &QueueDef,
        sub: &magnetar_broker::subscription::Subscription,
    ) -> Result<(), BrokerError> {
        let mut dropped = Vec::new();
        if let Some(max) = def.args.max_length {
            let st = sub.stats().await?;
            let ready = st.msg_backlog.saturating_sub(st.unacked_messages);
            if ready > max {
                let over = usize::try_from(ready - max).unwrap_or(usize::MAX);
                dropped = sub.reap(over, Box::new(|_| true)).await?;
            }
        }
        if let Some(max) = def.args.max_length_bytes {
            let ready = sub.ready_bytes().await?;
            if ready > max {
                // Oldest first, until what stays fits.
                let mut over = ready - max;
                let fits = Box::new(move |m: &magnetar_broker::StoredMessage| {
                    if over == 0 {
                        return false;
                    }
                    over = over.saturating_sub(body_len(&m.message));
                    true
                });
                dropped.extend(sub.reap(usize::MAX, fits).await?);
            }
        }
        for m in dropped {
            self.dead_letter(ns, def, &m.message, Reason::MaxLen)
                .await?;
        }
        Ok(())
    }

    /// Deletes a queue with `x-expires` once it has gone that long with
    /// no consumers and no declare or get, as RabbitMQ does.
    fn ensure_expirer(self: &Arc<Self>, ns: &NamespaceName, def: &QueueDef) {
        let Some(expires) = def.args.expires_ms else {
            return;
        };
        let key = (ns.clone(), def.name.clone());
        if !self.registry().expirers.insert(key.clone()) {
            return;
        }
        let ctx = Arc::clone(self);
        let expires = Duration::from_millis(expires);
        tokio::spawn(async move {
            let period = (expires / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
            loop {
                tokio::time::sleep(period).await;
                let deletion = match ctx.registry().queues.get_mut(&key) {
                    None => break,
                    Some(info) => (info.uses.consumers == 0
                        && info.deleting.is_none()
                        && info.last_used.elapsed() >= expires)
                        .then(|| Ctx::mark_deleting(info)),
                };
                if let Some(done) = deletion {
                    if ctx.delete_marked(&key, done).await {
                        break;
                    }
                }
            }
            ctx.registry().expirers.remove(&key);
        });
    }

    async fn expire_head(&self, ns: &NamespaceName, def: &QueueDef) -> Result<(), BrokerError> {
        let topic = self.broker.queue_topic(ns, &def.name, def.durable)?;
        let t = self.broker.topic(&topic, false).await?;
        let Ok(sub) = t.subscription(QUEUE_SUBSCRIPTION).await else {
            return Ok(());
        };
        let ttl = def.args.message_ttl_ms;
        loop {
            let now = now_ms();
            let expired = sub
                .reap(
                    256,
                    Box::new(move |m| channels::expired(&m.message, ttl, now)),
                )
                .await?;
            if expired.is_empty() {
                return Ok(());
            }
            for m in &expired {
                self.dead_letter(ns, def, &m.message, Reason::Expired)
                    .await?;
            }
        }
    }
}

/// Resident set size from /proc (Linux; in kB there, whatever the page
/// size); None elsewhere.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What RabbitMQ's byte limits count of a message: its body.
fn body_len(m: &Message) -> u64 {
    m.value.as_ref().map_or(0, |v| v.len() as u64)
}

/// Events from a connection's helper tasks.
enum Event {
    Deliver {
        channel: u16,
        gen: u64,
        consumer: String,
        control: ConsumerControl,
        delivery: Delivery,
    },
    /// The subscription stopped under a consumer (its queue was deleted).
    ConsumerEnded {
        channel: u16,
        gen: u64,
        consumer: String,
    },
    Confirmed {
        channel: u16,
        gen: u64,
        seq: u64,
        multiple: bool,
        ok: bool,
    },
    /// A reply published to this connection's direct reply-to address.
    Reply {
        channel: u16,
        gen: u64,
        consumer: String,
        message: Box<props::Published>,
    },
}

/// What settling a delivery tag acts on.
struct Unacked {
    control: ConsumerControl,
    offset: u64,
    /// Return a permit to the consumer when settled (prefetch).
    credit: bool,
    queue: String,
    /// Kept for queues with a dead-letter exchange, for reject and nack.
    message: Option<Message>,
}

struct ConsumerEntry {
    queue: String,
    def: Arc<QueueDef>,
    no_ack: bool,
    /// Limited prefetch: permits come back on settle; otherwise on send.
    limited: bool,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Consumer>,
}

type Pending = BoxFuture<'static, Result<(), BrokerError>>;

/// A publish waiting in its channel's pipeline: its confirm sequence (0
/// outside confirm mode), its write, and when it arrived.
type Queued = (u64, Pending, std::time::Instant);

/// The queues a message reaches, with their topics.
type Routes = Arc<Vec<(String, TopicName)>>;

struct Chan {
    gen: u64,
    closing: bool,
    assembler: Assembler,
    tags: Tags<Unacked>,
    consumers: HashMap<String, ConsumerEntry>,
    /// basic.get's consumers, one per queue, never given standing credit.
    getters: HashMap<String, Consumer>,
    /// Consumers cancelled with deliveries still unsettled: kept attached
    /// so that those deliveries stay theirs until settled or closed.
    retired: Vec<Consumer>,
    /// basic.qos limits.
    prefetch: Prefetch,
    /// Deliveries that arrived while the channel was at its channel-wide
    /// limit, sent in order as acknowledgements make room.
    held: VecDeque<Held>,
    /// Plain, confirm or tx mode, and what an open transaction holds.
    modes: Modes<Publish, TagSettle>,
    pipeline: mpsc::Sender<Queued>,
    /// Publishes handed to the pipeline, and how many of them it has seen
    /// stored (or fail): methods that read a queue wait for the two to
    /// meet, since RabbitMQ applies a channel's methods in order.
    published: u64,
    settled: watch::Receiver<u64>,
    last_queue: String,
    next_ctag: u64,
    /// The direct reply-to consumer: its tag and address token.
    reply_to: Option<(String, String)>,
}

impl Chan {
    /// At the channel-wide prefetch limit (basic.qos global=true).
    fn at_global_limit(&self) -> bool {
        self.prefetch.at_global_limit(self.tags.len())
    }
}

/// A delivery on its way to a channel; one waits here for room under the
/// channel-wide prefetch limit.
struct Held {
    gen: u64,
    consumer: String,
    control: ConsumerControl,
    delivery: Delivery,
}

/// An ack, nack or reject of delivery tags: applied at once, or on
/// commit in tx mode (on rollback the tags go back to being
/// unacknowledged).
type TagSettle = (TxSettle, Vec<(u64, Unacked)>);

#[derive(Clone, Copy)]
enum TxSettle {
    Ack,
    Reject { requeue: bool },
}

/// Bytes handed to a connection's writer and not yet written. Deliveries
/// to consumers without a prefetch limit take their next credit only while
/// this is under [`OUT_HIGH`], so that a consumer that stops reading holds
/// its backlog on the bookies rather than in this queue, as TCP
/// back-pressure bounds it in RabbitMQ.
#[derive(Default)]
struct Outbox {
    queued: AtomicUsize,
    drained: tokio::sync::Notify,
}

/// Queued bytes above which unlimited consumers get no more credit, and
/// the level under which the writer hands it back.
const OUT_HIGH: usize = 8 << 20;
const OUT_LOW: usize = 2 << 20;

pub(crate) struct Conn {
    ctx: Arc<Ctx>,
    id: u64,
    out: mpsc::UnboundedSender<Bytes>,
    outbox: Arc<Outbox>,
    /// Credits of unlimited consumers held back while the outbox is full.
    deferred_credit: Vec<ConsumerControl>,
    events_tx: mpsc::UnboundedSender<Event>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    vhost: String,
    ns: NamespaceName,
    channels: HashMap<u16, Chan>,
    next_gen: u64,
    exclusive_queues: Vec<String>,
    /// Set once connection.close went out; only close-ok matters then.
    closing: bool,
    /// Routes of header-less publishes by (exchange, routing key), valid
    /// for one routing generation.
    route_cache: HashMap<(String, String), Routes>,
    route_generation: u64,
    /// The client understands connection.blocked (its capabilities).
    blockable: bool,
    /// This connection has published; an alarm stops reading from it.
    publisher: bool,
    /// Counts the connection as a producer of its vhost once it has
    /// published.
    producer: Option<magnetar_broker::metrics::ProducerGuard>,
    /// The alarm this connection was last told about.
    /// The peer sent connection.close and had its close-ok.
    peer_closed: bool,
    told_blocked: bool,
    /// Who logged in, and what that role may do in the vhost.
    principal: Principal,
    /// When the login token expires: the connection closes then.
    expires: Option<Instant>,
    user: String,
    grants: Grants,
    /// start-ok, tune-ok and open, until the connection is open.
    handshake: Handshake,
}

/// Serves one connection until it closes.
pub(crate) async fn serve<S>(
    stream: S,
    certificate: Option<Arc<str>>,
    ctx: Arc<Ctx>,
) -> Result<(), AmqpError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (out, out_rx) = mpsc::unbounded_channel::<Bytes>();
    let outbox = Arc::new(Outbox::default());
    let writer = tokio::spawn(write_loop(wr, out_rx, Arc::clone(&outbox)));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let handshake = Handshake::new(
        Limits {
            frame_max: ctx.cfg.frame_max,
            channel_max: ctx.cfg.channel_max,
            heartbeat: ctx.cfg.heartbeat,
        },
        certificate,
    );
    let mut conn = Conn {
        id: ctx.next_conn.fetch_add(1, Ordering::Relaxed),
        handshake,
        frame_max: ctx.cfg.frame_max,
        channel_max: ctx.cfg.channel_max,
        heartbeat: 0,
        ctx,
        out,
        outbox,
        deferred_credit: Vec::new(),
        events_tx,
        vhost: String::new(),
        ns: NamespaceName::default_namespace(),
        channels: HashMap::new(),
        next_gen: 1,
        exclusive_queues: Vec::new(),
        closing: false,
        route_cache: HashMap::new(),
        route_generation: u64::MAX,
        blockable: false,
        publisher: false,
        producer: None,
        told_blocked: false,
        peer_closed: false,
        principal: Principal::Anonymous,
        expires: None,
        user: String::new(),
        grants: Grants::ALL,
    };
    let r = conn.run(&mut rd, events_rx).await;
    conn.cleanup().await;
    drop(conn);
    // Let what is queued (a connection.close) reach the peer.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    r
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    outbox: Arc<Outbox>,
) {
    // Grows with the first writes and keeps its size; a connection that
    // never gets past the handshake never holds a large buffer.
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.extend_from_slice(&first);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        let before = outbox.queued.fetch_sub(buf.len(), Ordering::Relaxed);
        if before >= OUT_LOW && before - buf.len() < OUT_LOW {
            outbox.drained.notify_one();
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

fn method_ids(m: &AMQPClass) -> (u16, u16) {
    (m.get_amqp_class_id(), m.get_amqp_method_id())
}

fn short(s: &str) -> ShortString {
    ShortString::try_new(s).unwrap_or_default()
}

impl Conn {
    fn send(&self, bytes: BytesMut) {
        self.outbox.queued.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = self.out.send(bytes.freeze());
    }

    /// Gives an unlimited consumer its next credit, or holds it while the
    /// outbox is over [`OUT_HIGH`].
    fn return_credit(&mut self, control: &ConsumerControl) {
        if self.outbox.queued.load(Ordering::Relaxed) > OUT_HIGH {
            self.deferred_credit.push(control.clone());
        } else {
            control.flow(1);
        }
    }

    /// Hands back the held credits once the writer has caught up.
    fn release_credit(&mut self) {
        if self.outbox.queued.load(Ordering::Relaxed) < OUT_LOW {
            for c in self.deferred_credit.drain(..) {
                c.flow(1);
            }
        }
    }

    fn send_method(&self, channel: u16, m: AMQPClass) {
        let mut b = BytesMut::with_capacity(64);
        codec::encode_method(&mut b, channel, m);
        self.send(b);
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), AmqpError> {
        let mut buf = BytesMut::with_capacity(512);
        // Protocol header first; a wrong one is answered with ours.
        loop {
            match codec::decode_protocol_header(&mut buf) {
                Ok(Some(())) => break,
                Ok(None) => {}
                Err(e) => {
                    self.send(BytesMut::from(&codec::PROTOCOL_HEADER[..]));
                    return Err(e.into());
                }
            }
            let read = tokio::time::timeout(self.ctx.cfg.handshake_timeout, rd.read_buf(&mut buf));
            match read.await {
                Ok(Ok(0)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        self.send_start();
        let handshake_deadline = Instant::now() + self.ctx.cfg.handshake_timeout;
        let mut last_read = Instant::now();
        let mut alarm_rx = self.ctx.alarm.subscribe();
        let mut last_write_tick = Instant::now();
        loop {
            // Decode everything buffered before reading again.
            loop {
                let max = if self.handshake.is_open() {
                    self.frame_max
                } else {
                    self.ctx.cfg.frame_max
                };
                let frame = match codec::decode_frame(&mut buf, max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    // Once closing, a frame error is the peer's last
                    // garbage, not a reason for a close of our own.
                    Err(_) if self.closing => return Ok(()),
                    Err(e) => {
                        self.close_connection(codec_exception(&e));
                        return Err(e.into());
                    }
                };
                match self.on_frame(frame).await {
                    Ok(true) => {}
                    Ok(false) if self.peer_closed => {
                        self.linger_closed(rd, &mut buf).await;
                        return Ok(());
                    }
                    Ok(false) => return Ok(()),
                    Err(ex) => {
                        self.close_connection(ex.clone());
                        return Err(ex.into());
                    }
                }
            }
            let hb = Duration::from_secs(u64::from(self.heartbeat));
            let tick = if self.heartbeat > 0 {
                hb / 2
            } else {
                Duration::from_secs(3600)
            };
            // Under a resource alarm a publishing connection is not read:
            // its publishes wait in the socket, as RabbitMQ does it.
            let alarm = alarm_rx.borrow_and_update().clone();
            self.tell_alarm(alarm.as_deref());
            let paused = alarm.is_some() && self.publisher;
            if paused {
                last_read = Instant::now();
            }
            let running = self.handshake.is_open();
            let outbox = Arc::clone(&self.outbox);
            if running && buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_BUFFER);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(handshake_deadline), if !running => {
                    debug!(conn = self.id, "handshake timeout; closing");
                    return Ok(());
                }
                r = rd.read_buf(&mut buf), if !paused => {
                    match r {
                        Ok(0) => return Ok(()),
                        Ok(_) => last_read = Instant::now(),
                        Err(e) => return Err(e.into()),
                    }
                }
                _ = alarm_rx.changed() => {}
                _ = tokio::time::sleep_until(self.expires.unwrap_or_else(Instant::now)),
                    if self.expires.is_some() && !self.closing =>
                {
                    let ex = Exception::new(error::ACCESS_REFUSED, "the login token expired");
                    self.close_connection(ex.clone());
                    return Err(ex.into());
                }
                () = outbox.drained.notified(), if !self.deferred_credit.is_empty() => {
                    self.release_credit();
                }
                Some(ev) = events.recv() => {
                    if let Err(ex) = self.on_event(ev) {
                        self.close_connection(ex.clone());
                        return Err(ex.into());
                    }
                }
                _ = tokio::time::sleep_until(last_write_tick + tick) => {
                    last_write_tick = Instant::now();
                    if !running && Instant::now() > handshake_deadline {
                        return Ok(());
                    }
                    if self.heartbeat > 0 {
                        // Two missed heartbeats from the peer: it is gone.
                        if last_read.elapsed() > hb * 2 {
                            debug!(conn = self.id, "missed heartbeats; closing");
                            return Ok(());
                        }
                        let mut b = BytesMut::with_capacity(8);
                        codec::encode_heartbeat(&mut b);
                        self.send(b);
                    }
                }
            }
        }
    }

    /// connection.blocked and unblocked, to publishing clients that asked
    /// for them.
    fn tell_alarm(&mut self, alarm: Option<&str>) {
        // As RabbitMQ: only connections that publish are blocked, and told.
        if !self.blockable || !self.publisher || self.told_blocked == alarm.is_some() {
            return;
        }
        self.told_blocked = alarm.is_some();
        let m = match alarm {
            Some(reason) => connection::AMQPMethod::Blocked(connection::Blocked {
                reason: short(reason),
            }),
            None => connection::AMQPMethod::Unblocked(connection::Unblocked {}),
        };
        self.send_method(0, AMQPClass::Connection(m));
    }

    fn send_start(&self) {
        let mut caps = FieldTable::default();
        for c in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(c.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v));
        props.insert("product".into(), s("Magnetar"));
        props.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
        props.insert("platform".into(), s("Rust"));
        props.insert("cluster_name".into(), s(&self.ctx.broker.config().cluster));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: LongString::from(self.handshake.mechanisms()),
                locales: LongString::from("en_US"),
            })),
        );
    }

    fn close_connection(&mut self, ex: Exception) {
        if self.closing {
            return;
        }
        self.closing = true;
        debug!(conn = self.id, "closing connection: {ex}");
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: ex.code,
                reply_text: short(&ex.reply_text()),
                class_id: ex.class_id,
                method_id: ex.method_id,
            })),
        );
    }

    /// Handles one frame; `Ok(false)` ends the connection cleanly.
    async fn on_frame(&mut self, frame: Frame) -> Result<bool, Exception> {
        use connection::AMQPMethod as C;
        let ch = frame.channel();
        if self.closing {
            // After connection.close only close-ok, or a close that
            // crossed ours (answered with close-ok), counts.
            return Ok(match frame {
                Frame::Method(0, m) => match *m {
                    AMQPClass::Connection(C::CloseOk(_)) => false,
                    AMQPClass::Connection(C::Close(_)) => {
                        self.send_method(
                            0,
                            AMQPClass::Connection(C::CloseOk(connection::CloseOk {})),
                        );
                        false
                    }
                    _ => true,
                },
                _ => true,
            });
        }
        match frame {
            Frame::Heartbeat(0) => Ok(true),
            Frame::Heartbeat(_) => Err(Exception::new(
                error::COMMAND_INVALID,
                "heartbeat on a channel other than 0",
            )),
            Frame::Method(0, m) => self.on_connection_method(*m).await,
            _ if !self.handshake.is_open() => Err(Exception::new(
                error::CHANNEL_ERROR,
                format!("channel {ch} used before the connection is open"),
            )),
            Frame::Method(ch, m) => {
                let ids = method_ids(&m);
                match self.on_channel_method(ch, *m).await {
                    Ok(()) => Ok(true),
                    Err(ex) => self.raise(ch, ex.on(ids.0, ids.1)).map(|()| true),
                }
            }
            frame @ (Frame::Header(..) | Frame::Body(..)) => {
                let max = self.ctx.cfg.max_message_size;
                let Some(c) = self.channels.get_mut(&ch) else {
                    return Err(Exception::new(
                        error::CHANNEL_ERROR,
                        format!("expected 'channel.open' on channel {ch}"),
                    ));
                };
                if c.closing {
                    return Ok(true);
                }
                match c.assembler.feed(frame, max) {
                    Ok(Some(p)) => {
                        if let Err(ex) = self.publish(ch, p).await {
                            self.raise(ch, ex.on(60, 40))?;
                        }
                        Ok(true)
                    }
                    Ok(None) => Ok(true),
                    Err(ex) => self.raise(ch, ex.on(60, 40)).map(|()| true),
                }
            }
        }
    }

    /// Soft exceptions close the channel; hard ones the connection.
    fn raise(&mut self, ch: u16, ex: Exception) -> Result<(), Exception> {
        if ex.is_hard() {
            return Err(ex);
        }
        debug!(conn = self.id, ch, "channel exception: {ex}");
        self.close_channel_resources(ch, true);
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: ex.code,
                reply_text: short(&ex.reply_text()),
                class_id: ex.class_id,
                method_id: ex.method_id,
            })),
        );
        Ok(())
    }

    async fn on_connection_method(&mut self, m: AMQPClass) -> Result<bool, Exception> {
        let ids = method_ids(&m);
        let AMQPClass::Connection(m) = m else {
            return Err(Exception::new(
                error::COMMAND_INVALID,
                "only connection methods are allowed on channel 0",
            )
            .on(ids.0, ids.1));
        };
        use connection::AMQPMethod as M;
        match (m, self.handshake.is_open()) {
            (M::Close(_), _) => {
                // Exclusive queues go before close-ok, so that a client that
                // reconnects at once finds them gone.
                self.cleanup().await;
                self.send_method(0, AMQPClass::Connection(M::CloseOk(connection::CloseOk {})));
                self.peer_closed = true;
                Ok(false)
            }
            (M::CloseOk(_), _) => Ok(false),
            (M::Blocked(_) | M::Unblocked(_), true) => Ok(true),
            (M::UpdateSecret(_), true) => {
                self.send_method(
                    0,
                    AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})),
                );
                Ok(true)
            }
            (m, false) => {
                self.negotiate(&m).await?;
                Ok(true)
            }
            (m, true) => Err(Exception::new(
                error::COMMAND_INVALID,
                format!("connection method {m:?} is not valid now"),
            )
            .on(ids.0, ids.1)),
        }
    }

    /// Runs the handshake's steps for `m`, feeding it the broker's
    /// answers, until it waits for the client again.
    async fn negotiate(&mut self, m: &connection::AMQPMethod) -> Result<(), Exception> {
        let mut steps: VecDeque<Step> = self.handshake.on(Input::Method(m))?.into();
        while let Some(step) = steps.pop_front() {
            let more = match step {
                Step::Authenticate {
                    user,
                    password,
                    blockable,
                } => {
                    self.blockable = blockable;
                    let creds = Credentials {
                        user: Some(&user),
                        secret: password.as_deref(),
                        certificate: self.handshake.certificate(),
                    };
                    let judged = self.ctx.broker.authenticate_until(&creds);
                    let accepted = match judged {
                        Ok((principal, expires)) => {
                            self.principal = principal;
                            self.expires = expires;
                            self.user = user;
                            true
                        }
                        Err(e) => {
                            self.ctx.broker.metrics().auth_failure("amqp");
                            debug!("AMQP login of '{user}' refused: {e}");
                            false
                        }
                    };
                    self.handshake.on(Input::Judged { accepted })?
                }
                Step::Send(m) => {
                    self.send_method(0, m);
                    Vec::new()
                }
                Step::Tune(t) => {
                    self.frame_max = t.frame_max;
                    self.channel_max = t.channel_max;
                    self.heartbeat = t.heartbeat;
                    Vec::new()
                }
                Step::LookUpGrants(ns) => {
                    let found = self.ctx.broker.grants(&self.principal, &ns).await;
                    self.handshake.on(Input::Granted(found.as_ref().copied()))?
                }
                Step::Opened { vhost, ns, grants } => {
                    self.grants = grants;
                    self.vhost = vhost;
                    self.ns = ns;
                    Vec::new()
                }
            };
            steps.extend(more);
        }
        Ok(())
    }

    fn chan(&mut self, ch: u16) -> Result<&mut Chan, Exception> {
        self.channels.get_mut(&ch).ok_or_else(|| {
            Exception::new(
                error::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )
        })
    }

    async fn on_channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), Exception> {
        // A channel closed by us only listens for close and close-ok.
        if let Some(c) = self.channels.get(&ch) {
            if c.closing {
                match m {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&ch);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.channels.remove(&ch);
                        self.send_method(
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {}
                }
                return Ok(());
            }
            if c.assembler.is_receiving() {
                return Err(Exception::new(
                    error::UNEXPECTED_FRAME,
                    "expected content header or body, got a method",
                ));
            }
        }
        match m {
            AMQPClass::Channel(m) => self.on_channel(ch, m),
            _ if !self.channels.contains_key(&ch) => Err(Exception::new(
                error::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )),
            AMQPClass::Exchange(m) => self.on_exchange(ch, m).await,
            AMQPClass::Queue(m) => self.on_queue(ch, m).await,
            AMQPClass::Basic(m) => self.on_basic(ch, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                self.chan(ch)?.modes.select_confirm()?;
                if !s.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.on_tx(ch, m).await,
            // Deprecated access tickets, still sent by some old clients:
            // granted, as RabbitMQ does.
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.send_method(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            other => Err(Exception::new(
                error::NOT_IMPLEMENTED,
                format!("method {:?} is not implemented", method_ids(&other)),
            )),
        }
    }

    fn on_channel(&mut self, ch: u16, m: channel::AMQPMethod) -> Result<(), Exception> {
        use channel::AMQPMethod as M;
        match m {
            M::Open(_) => {
                channels::open(ch, self.channel_max, self.channels.contains_key(&ch))?;
                let gen = self.next_gen;
                self.next_gen += 1;
                let (pipeline, settled) = self.start_pipeline(ch, gen);
                self.channels.insert(
                    ch,
                    Chan {
                        gen,
                        closing: false,
                        assembler: Assembler::default(),
                        tags: Tags::default(),
                        consumers: HashMap::new(),
                        getters: HashMap::new(),
                        retired: Vec::new(),
                        prefetch: Prefetch::default(),
                        held: VecDeque::new(),
                        modes: Modes::default(),
                        pipeline,
                        published: 0,
                        settled,
                        last_queue: String::new(),
                        next_ctag: 1,
                        reply_to: None,
                    },
                );
                self.send_method(ch, AMQPClass::Channel(M::OpenOk(channel::OpenOk {})));
                Ok(())
            }
            M::Close(_) => {
                self.close_channel_resources(ch, false);
                self.channels.remove(&ch);
                self.send_method(ch, AMQPClass::Channel(M::CloseOk(channel::CloseOk {})));
                Ok(())
            }
            M::CloseOk(_) => {
                self.channels.remove(&ch);
                Ok(())
            }
            M::Flow(f) => {
                self.chan(ch)?;
                channels::flow(f.active)?;
                self.send_method(
                    ch,
                    AMQPClass::Channel(M::FlowOk(channel::FlowOk { active: f.active })),
                );
                Ok(())
            }
            M::FlowOk(_) => Ok(()),
            M::OpenOk(_) => Err(Exception::new(
                error::COMMAND_INVALID,
                "channel.open-ok is a server method",
            )),
        }
    }

    /// The publish pipeline of a channel: publishes wait here, in order,
    /// for durability; confirms are reported as they complete, runs of
    /// already-durable ones as one `multiple` ack.
    fn start_pipeline(
        &self,
        channel: u16,
        gen: u64,
    ) -> (mpsc::Sender<Queued>, watch::Receiver<u64>) {
        let (tx, mut rx) = mpsc::channel::<Queued>(PIPELINE_DEPTH);
        let (settled_tx, settled) = watch::channel(0u64);
        let events = self.events_tx.clone();
        let latency = self.ctx.publish_latency.clone();
        tokio::spawn(async move {
            let mut next: Option<Queued> = None;
            let mut done = 0u64;
            let mut confirms = Confirms::default();
            // A confirmed publish (sequence above 0), from its arrival to
            // its confirm being decided.
            let timed = |seq: u64, arrived: std::time::Instant| {
                if seq > 0 {
                    latency.observe(arrived.elapsed().as_secs_f64());
                }
            };
            loop {
                let (seq, fut, arrived) = match next.take() {
                    Some(x) => x,
                    None => match rx.recv().await {
                        Some(x) => x,
                        None => return,
                    },
                };
                let stored = fut.await;
                if let Err(e) = &stored {
                    debug!("publish failed: {e}");
                }
                timed(seq, arrived);
                confirms.settled(seq, stored.is_ok());
                done += 1;
                // Writes already settled right behind it go in the same
                // confirm.
                while let Ok((s, mut f, at)) = rx.try_recv() {
                    match (&mut f).now_or_never() {
                        Some(r) => {
                            timed(s, at);
                            confirms.settled(s, r.is_ok());
                            done += 1;
                        }
                        None => {
                            next = Some((s, f, at));
                            break;
                        }
                    }
                }
                settled_tx.send_replace(done);
                for c in confirms.take() {
                    let _ = events.send(Event::Confirmed {
                        channel,
                        gen,
                        seq: c.tag,
                        multiple: c.multiple,
                        ok: c.ok,
                    });
                }
            }
        });
        (tx, settled)
    }

    /// The spec's closing state after our close-ok: a client closing from
    /// several threads at once sends more closes, each answered with
    /// close-ok; everything else is discarded. It ends at the peer's end
    /// of stream or close-ok, at a frame that does not decode, or after
    /// [`CLOSING_LINGER`], and never with an error of its own. Reading to
    /// the end also keeps the socket from being reset under the close-ok.
    async fn linger_closed<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut BytesMut) {
        use connection::AMQPMethod as C;
        let deadline = Instant::now() + CLOSING_LINGER;
        loop {
            loop {
                match codec::decode_frame(buf, self.frame_max.max(codec::FRAME_MIN_SIZE)) {
                    Ok(Some(Frame::Method(0, m))) => match *m {
                        AMQPClass::Connection(C::Close(_)) => self.send_method(
                            0,
                            AMQPClass::Connection(C::CloseOk(connection::CloseOk {})),
                        ),
                        AMQPClass::Connection(C::CloseOk(_)) => return,
                        _ => {}
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            if buf.len() > CLOSING_MAX_BUFFER {
                return;
            }
            match tokio::time::timeout_at(deadline, rd.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Waits until every publish this channel made so far is stored, so
    /// that a later get, consume or queue method sees it.
    async fn publishes_settled(&mut self, ch: u16) -> Result<(), Exception> {
        let chan = self.chan(ch)?;
        let want = chan.published;
        let mut settled = chan.settled.clone();
        // An ended pipeline (the channel closing) settles nothing more.
        let _ = settled.wait_for(|&n| n >= want).await;
        Ok(())
    }

    /// Detaches a channel's consumers and requeues what it holds, as a
    /// channel close does.
    fn close_channel_resources(&mut self, ch: u16, keep_closing: bool) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        c.closing = keep_closing;
        let consumers: Vec<(String, ConsumerEntry)> = c.consumers.drain().collect();
        for u in c.tags.drain() {
            u.control.nack(vec![u.offset], Duration::ZERO);
        }
        for h in c.held.drain(..) {
            h.control.nack(vec![h.delivery.offset], Duration::ZERO);
        }
        c.getters.clear();
        c.retired.clear();
        if let Some((_, token)) = c.reply_to.take() {
            self.ctx.registry().replies.remove(&token);
        }
        let mut queues = Vec::new();
        for (tag, e) in consumers {
            e.task.abort();
            self.drop_stream_subscription(ch, &e.def, &tag);
            queues.push((e.queue, tag));
        }
        for (q, tag) in queues {
            self.release_consumer(&q, ch, &tag);
        }
    }
}

enum Settle {
    Ack,
    Requeue,
}

/// Acknowledges or requeues settled deliveries, returning prefetch permits:
/// one command per consumer, however many deliveries a `multiple` settled.
fn settle(items: Vec<Unacked>, how: Settle) {
    let mut groups: Vec<(ConsumerControl, Vec<u64>, u64)> = Vec::new();
    for u in items {
        let i = match groups.iter().position(|g| g.0.id() == u.control.id()) {
            Some(i) => i,
            None => {
                groups.push((u.control.clone(), Vec::new(), 0));
                groups.len() - 1
            }
        };
        groups[i].1.push(u.offset);
        groups[i].2 += u64::from(u.credit);
    }
    for (control, offsets, credit) in groups {
        match how {
            Settle::Ack => control.ack(offsets),
            Settle::Requeue => control.nack(offsets, Duration::ZERO),
        }
        if credit > 0 {
            control.flow(credit);
        }
    }
}

fn codec_exception(e: &CodecError) -> Exception {
    Exception::new(e.reply_code(), e.to_string())
}

/// RabbitMQ's server-named queues and consumer tags end in random text.
fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
