//! One AMQP connection: the handshake, its channels, and the methods they
//! carry, turned into calls on the broker's protocol-neutral API.
//!
//! A connection is one task. It reads frames, runs methods in order, and
//! takes events from helpers: one task per consumer forwarding deliveries,
//! and one publish pipeline per channel that waits for durability and
//! reports publisher confirms. Writes go through a writer task, so that
//! nothing here blocks on a slow socket but the reads that backpressure
//! the publisher.

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
use crate::rules::handshake::{self, Mechanism};
use crate::AmqpConfig;

/// Credit a consumer without a prefetch limit is kept topped up to; it
/// bounds what sits in memory between the subscription and the socket.
const UNLIMITED_CREDIT: u64 = 1000;
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
    consumers: u32,
    exclusive_consumer: bool,
    /// Single active consumer: the one that receives, and the others in
    /// the order they came, holding their credit until their turn.
    sac_active: Option<ConsumerId>,
    sac_waiting: std::collections::VecDeque<(ConsumerId, ConsumerControl, u64)>,
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
                    Some(info) => (info.consumers == 0
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
    confirm: bool,
    next_seq: u64,
    pipeline: mpsc::Sender<(u64, Pending)>,
    /// Publishes handed to the pipeline, and how many of them it has seen
    /// stored (or fail): methods that read a queue wait for the two to
    /// meet, since RabbitMQ applies a channel's methods in order.
    published: u64,
    settled: watch::Receiver<u64>,
    last_queue: String,
    next_ctag: u64,
    /// The direct reply-to consumer: its tag and address token.
    reply_to: Option<(String, String)>,
    /// In tx mode: what the open transaction holds until commit.
    tx: Option<TxBuffer>,
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

/// Publishes and settlements of an open transaction, applied on commit and
/// dropped on rollback (settled tags go back to being unacknowledged).
#[derive(Default)]
struct TxBuffer {
    publishes: Vec<Publish>,
    settles: Vec<(TxSettle, Vec<(u64, Unacked)>)>,
}

#[derive(Clone, Copy)]
enum TxSettle {
    Ack,
    Reject { requeue: bool },
}

enum Phase {
    StartOk,
    TuneOk,
    Open,
    Running,
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
    /// The role of the client's TLS certificate, if it showed one the CA
    /// verified: what the EXTERNAL mechanism logs in as.
    certificate: Option<Arc<str>>,
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
    let mut conn = Conn {
        id: ctx.next_conn.fetch_add(1, Ordering::Relaxed),
        certificate,
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
        let mut phase = Phase::StartOk;
        let handshake_deadline = Instant::now() + self.ctx.cfg.handshake_timeout;
        let mut last_read = Instant::now();
        let mut alarm_rx = self.ctx.alarm.subscribe();
        let mut last_write_tick = Instant::now();
        loop {
            // Decode everything buffered before reading again.
            loop {
                let max = if matches!(phase, Phase::Running) {
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
                match self.on_frame(frame, &mut phase).await {
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
            let running = matches!(phase, Phase::Running);
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
                    if !matches!(phase, Phase::Running) && Instant::now() > handshake_deadline {
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
                // EXTERNAL (the client certificate's CN, as RabbitMQ's
                // rabbitmq_auth_mechanism_ssl) only where there is one.
                mechanisms: LongString::from(if self.certificate.is_some() {
                    "PLAIN AMQPLAIN EXTERNAL"
                } else {
                    "PLAIN AMQPLAIN"
                }),
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
    async fn on_frame(&mut self, frame: Frame, phase: &mut Phase) -> Result<bool, Exception> {
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
            Frame::Method(0, m) => self.on_connection_method(*m, phase).await,
            _ if !matches!(phase, Phase::Running) => Err(Exception::new(
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

    async fn on_connection_method(
        &mut self,
        m: AMQPClass,
        phase: &mut Phase,
    ) -> Result<bool, Exception> {
        let ids = method_ids(&m);
        let AMQPClass::Connection(m) = m else {
            return Err(Exception::new(
                error::COMMAND_INVALID,
                "only connection methods are allowed on channel 0",
            )
            .on(ids.0, ids.1));
        };
        use connection::AMQPMethod as M;
        match (m, &phase) {
            (M::StartOk(s), Phase::StartOk) => {
                self.blockable = handshake::blockable(&s.client_properties);
                let mech = s.mechanism.as_str();
                let how = handshake::mechanism(mech, self.certificate.is_some())
                    .map_err(|e| e.on(ids.0, ids.1))?;
                let refused = || handshake::login_refused(mech).on(ids.0, ids.1);
                let (user, password) = match how {
                    Mechanism::Certificate => {
                        let role = self.certificate.as_deref().unwrap_or_default();
                        (role.to_string(), None)
                    }
                    Mechanism::Password => {
                        let Some((user, password)) = handshake::login(mech, s.response.as_bytes())
                        else {
                            return Err(refused());
                        };
                        (user, Some(password))
                    }
                };
                let creds = Credentials {
                    user: Some(&user),
                    secret: password.as_deref(),
                    certificate: self.certificate.as_deref(),
                };
                self.principal = match self.ctx.broker.authenticate_until(&creds) {
                    Ok((p, expires)) => {
                        self.expires = expires;
                        p
                    }
                    Err(e) => {
                        debug!("AMQP login of '{user}' refused: {e}");
                        return Err(refused());
                    }
                };
                self.user = user;
                self.send_method(
                    0,
                    AMQPClass::Connection(M::Tune(connection::Tune {
                        channel_max: self.ctx.cfg.channel_max,
                        frame_max: self.ctx.cfg.frame_max,
                        heartbeat: self.ctx.cfg.heartbeat,
                    })),
                );
                *phase = Phase::TuneOk;
                Ok(true)
            }
            (M::TuneOk(t), Phase::TuneOk) => {
                let tuned = handshake::tune(
                    t.frame_max,
                    t.channel_max,
                    t.heartbeat,
                    self.ctx.cfg.frame_max,
                    self.ctx.cfg.channel_max,
                )?;
                self.frame_max = tuned.frame_max;
                self.channel_max = tuned.channel_max;
                self.heartbeat = tuned.heartbeat;
                *phase = Phase::Open;
                Ok(true)
            }
            (M::Open(o), Phase::Open) => {
                let vhost = o.virtual_host.as_str().to_owned();
                let Some(ns) = handshake::vhost_namespace(&vhost) else {
                    return Err(Exception::new(
                        error::NOT_ALLOWED,
                        format!("vhost {vhost} not found"),
                    ));
                };
                let found = self.ctx.broker.grants(&self.principal, &ns).await;
                let grants = handshake::open(&vhost, &self.user, found.as_ref().copied())?;
                self.grants = grants;
                self.vhost = vhost;
                self.ns = ns;
                self.send_method(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {})));
                *phase = Phase::Running;
                Ok(true)
            }
            (M::Close(_), _) => {
                // Exclusive queues go before close-ok, so that a client that
                // reconnects at once finds them gone.
                self.cleanup().await;
                self.send_method(0, AMQPClass::Connection(M::CloseOk(connection::CloseOk {})));
                self.peer_closed = true;
                Ok(false)
            }
            (M::CloseOk(_), _) => Ok(false),
            (M::Blocked(_) | M::Unblocked(_), Phase::Running) => Ok(true),
            (M::UpdateSecret(_), Phase::Running) => {
                self.send_method(
                    0,
                    AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})),
                );
                Ok(true)
            }
            (m, _) => Err(Exception::new(
                error::COMMAND_INVALID,
                format!("connection method {m:?} is not valid now"),
            )
            .on(ids.0, ids.1)),
        }
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
                let c = self.chan(ch)?;
                channels::confirm_select(c.tx.is_some())?;
                c.confirm = true;
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
                        confirm: false,
                        next_seq: 1,
                        pipeline,
                        published: 0,
                        settled,
                        last_queue: String::new(),
                        next_ctag: 1,
                        reply_to: None,
                        tx: None,
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
    ) -> (mpsc::Sender<(u64, Pending)>, watch::Receiver<u64>) {
        let (tx, mut rx) = mpsc::channel::<(u64, Pending)>(PIPELINE_DEPTH);
        let (settled_tx, settled) = watch::channel(0u64);
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let mut next: Option<(u64, Pending)> = None;
            let mut done = 0u64;
            loop {
                let (seq, fut) = match next.take() {
                    Some(x) => x,
                    None => match rx.recv().await {
                        Some(x) => x,
                        None => return,
                    },
                };
                let ok = match fut.await {
                    Ok(()) => true,
                    Err(e) => {
                        debug!("publish failed: {e}");
                        false
                    }
                };
                let mut last = seq;
                done += 1;
                if ok && seq > 0 {
                    while let Ok((s, mut f)) = rx.try_recv() {
                        match (&mut f).now_or_never() {
                            Some(Ok(())) if s == last + 1 => {
                                last = s;
                                done += 1;
                            }
                            Some(r) => {
                                next = Some((s, async move { r }.boxed()));
                                break;
                            }
                            None => {
                                next = Some((s, f));
                                break;
                            }
                        }
                    }
                }
                settled_tx.send_replace(done);
                if seq > 0 {
                    let _ = events.send(Event::Confirmed {
                        channel,
                        gen,
                        seq: last,
                        multiple: last != seq,
                        ok,
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

    // ---- exchanges ----

    async fn on_exchange(&mut self, ch: u16, m: exchange::AMQPMethod) -> Result<(), Exception> {
        use exchange::AMQPMethod as M;
        let b = self.ctx.broker.clone();
        // Changing the vhost's exchanges is configuring it (RabbitMQ's
        // configure permission): the namespace admin's.
        let configured = match &m {
            M::Delete(d) => Some(&d.exchange),
            M::Bind(x) => Some(&x.destination),
            M::Unbind(x) => Some(&x.destination),
            _ => None,
        };
        if let Some(x) = configured {
            self.grants.check(AuthAction::Admin, || {
                format!("exchange '{}' in vhost '{}'", x.as_str(), self.vhost)
            })?;
        }
        match m {
            M::Declare(d) => {
                let name = d.exchange.as_str();
                let kind = channels::exchange_kind(name, d.kind.as_str(), d.passive, &self.vhost)?;
                // Declaring an exchange is configuring the vhost (RabbitMQ's
                // configure permission): the namespace admin's, though any
                // role may declare one that exists, as applications do at
                // start; the declare then checks it is equivalent.
                if !d.passive && !self.grants.admin {
                    let exists = b
                        .declare_exchange(&self.ns, ExchangeDef::new(name, kind), true)
                        .await;
                    if exists.is_err() {
                        self.grants.check(AuthAction::Admin, || {
                            format!("exchange '{name}' in vhost '{}'", self.vhost)
                        })?;
                    }
                }
                let mut def = ExchangeDef::new(name, kind);
                def.durable = d.durable;
                def.auto_delete = d.auto_delete;
                def.internal = d.internal;
                for (k, v) in &d.arguments {
                    let text = String::from_utf8_lossy(&props::value_text(v)).into_owned();
                    if k.as_str() == "alternate-exchange" {
                        def.alternate_exchange = Some(text);
                    } else {
                        def.arguments.insert(k.as_str().to_owned(), text);
                    }
                }
                b.declare_exchange(&self.ns, def, d.passive)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})),
                    );
                }
            }
            M::Delete(d) => {
                b.delete_exchange(&self.ns, d.exchange.as_str(), d.if_unused)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !d.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})));
                }
            }
            M::Bind(x) => {
                let binding =
                    exchange_binding(&x.source, &x.destination, &x.routing_key, &x.arguments);
                b.bind(&self.ns, binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::BindOk(exchange::BindOk {})));
                }
            }
            M::Unbind(x) => {
                let binding =
                    exchange_binding(&x.source, &x.destination, &x.routing_key, &x.arguments);
                b.unbind(&self.ns, &binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})));
                }
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        }
        Ok(())
    }

    /// A broker error as an exception, its text in RabbitMQ's words.
    fn vhost_text(&self, e: BrokerError) -> Exception {
        let mut ex = exception_of(&e);
        ex.text = ex
            .text
            .replace("in namespace", &format!("in vhost '{}'", self.vhost));
        ex
    }

    // ---- queues ----

    /// The queue a method names: "" is the channel's last declared queue.
    fn queue_name(&mut self, ch: u16, name: &str) -> Result<String, Exception> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        channels::queue_name(name, &self.chan(ch)?.last_queue)
    }

    fn not_found(&self, queue: &str) -> Exception {
        Exception::new(
            error::NOT_FOUND,
            format!("no queue '{queue}' in vhost '{}'", self.vhost),
        )
    }

    fn locked(&self, queue: &str) -> Exception {
        Exception::new(
            error::RESOURCE_LOCKED,
            format!(
                "cannot obtain exclusive access to locked queue '{queue}' in vhost '{}'. \
                 It could be originally declared on another connection or the exclusive \
                 property value does not match that of the original declaration.",
                self.vhost
            ),
        )
    }

    /// The queue's definition, if it exists, checking exclusive ownership.
    async fn lookup_queue(&self, name: &str) -> Result<Option<Arc<QueueDef>>, Exception> {
        let key = (self.ns.clone(), name.to_owned());
        self.ctx.deleted(&key).await;
        {
            let mut reg = self.ctx.registry();
            if let Some(info) = reg.queues.get_mut(&key) {
                if info.owner.is_some_and(|o| o != self.id) {
                    return Err(self.locked(name));
                }
                info.last_used = Instant::now();
                return Ok(Some(Arc::clone(&info.def)));
            }
        }
        let b = &self.ctx.broker;
        if !b
            .queue_exists(&self.ns, name)
            .await
            .map_err(Exception::from)?
        {
            return Ok(None);
        }
        let def = match qdef::load(&self.ctx.store, &self.ns, name)
            .await
            .map_err(Exception::from)?
        {
            Some(d) => d,
            None => {
                let transient = b
                    .queue_is_transient(&self.ns, name)
                    .await
                    .map_err(Exception::from)?;
                QueueDef::implicit(name, !transient)
            }
        };
        let def = {
            let mut reg = self.ctx.registry();
            let info = reg.queues.entry(key).or_insert(QueueInfo {
                def: Arc::new(def),
                owner: None,
                consumers: 0,
                exclusive_consumer: false,
                sac_active: None,
                sac_waiting: Default::default(),
                last_used: Instant::now(),
                deleting: None,
            });
            Arc::clone(&info.def)
        };
        if def.args.message_ttl_ms.is_some() {
            self.ctx.ensure_sweeper(&self.ns, &def);
        }
        if def.args.expires_ms.is_some() {
            self.ctx.ensure_expirer(&self.ns, &def);
        }
        Ok(Some(def))
    }

    async fn require_queue(
        &mut self,
        ch: u16,
        name: &str,
    ) -> Result<(String, Arc<QueueDef>), Exception> {
        let name = self.queue_name(ch, name)?;
        match self.lookup_queue(&name).await? {
            Some(def) => Ok((name, def)),
            None => Err(self.not_found(&name)),
        }
    }

    fn queue_topic(&self, def: &QueueDef) -> Result<TopicName, Exception> {
        self.ctx
            .broker
            .queue_topic(&self.ns, &def.name, def.durable)
            .map_err(Exception::from)
    }

    /// The queue's shared subscription, started if need be.
    async fn queue_subscription(
        &self,
        def: &QueueDef,
    ) -> Result<magnetar_broker::subscription::Subscription, Exception> {
        let topic = self.queue_topic(def)?;
        let t = self
            .ctx
            .broker
            .topic(&topic, true)
            .await
            .map_err(Exception::from)?;
        t.get_or_create_subscription(
            QUEUE_SUBSCRIPTION,
            SubscriptionOptions {
                sub_type: SubscriptionType::Shared,
                initial_position: InitialPosition::Earliest,
                durable: def.durable,
                dead_letter: None,
                priority: def.args.max_priority.map(|max| MessagePriority {
                    header: props::H_PRIORITY.into(),
                    max,
                }),
            },
        )
        .await
        .map_err(Exception::from)
    }

    /// Whether a queue is at one of its length limits, where
    /// reject-publish refuses more (RabbitMQ: at, not only over).
    async fn is_full(&self, def: &QueueDef) -> bool {
        if let Some(max) = def.args.max_length {
            let (ready, _) = self.queue_counts(def).await;
            if u64::from(ready) >= max {
                return true;
            }
        }
        if let Some(max) = def.args.max_length_bytes {
            if let Ok(sub) = self.queue_subscription(def).await {
                if sub.ready_bytes().await.is_ok_and(|b| b >= max) {
                    return true;
                }
            }
        }
        false
    }

    /// Ready messages and consumers of a queue, for declare-ok and get-ok.
    async fn queue_counts(&self, def: &QueueDef) -> (u32, u32) {
        let consumers = {
            let reg = self.ctx.registry();
            reg.queues
                .get(&(self.ns.clone(), def.name.clone()))
                .map_or(0, |i| i.consumers)
        };
        if def.args.queue_type == QueueType::Stream {
            return (0, consumers);
        }
        let ready = match self.queue_subscription(def).await {
            Ok(s) => s
                .stats()
                .await
                .map(|st| st.msg_backlog.saturating_sub(st.unacked_messages))
                .unwrap_or(0),
            Err(_) => 0,
        };
        (u32::try_from(ready).unwrap_or(u32::MAX), consumers)
    }

    async fn on_queue(&mut self, ch: u16, m: queue::AMQPMethod) -> Result<(), Exception> {
        // Counts, purges and deletes see the channel's earlier publishes.
        self.publishes_settled(ch).await?;
        use queue::AMQPMethod as M;
        // A binding decides what a queue receives, and purging consumes
        // it all: its readers' (RabbitMQ's read permission).
        let read = match &m {
            M::Bind(x) => Some(&x.queue),
            M::Unbind(x) => Some(&x.queue),
            M::Purge(p) => Some(&p.queue),
            _ => None,
        };
        if let Some(q) = read {
            self.grants.check(AuthAction::Consume, || {
                format!("queue '{}' in vhost '{}'", q.as_str(), self.vhost)
            })?;
        }
        match m {
            M::Declare(d) => {
                let (name, msgs, consumers) = self.queue_declare(&d).await?;
                self.chan(ch)?.last_queue = name.clone();
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: msgs,
                            consumer_count: consumers,
                        })),
                    );
                }
            }
            M::Bind(x) => {
                let (name, _) = self.require_queue(ch, x.queue.as_str()).await?;
                let key = if x.routing_key.as_str().is_empty() && x.queue.as_str().is_empty() {
                    name.clone()
                } else {
                    x.routing_key.as_str().to_owned()
                };
                let binding = Binding::queue(x.exchange.as_str(), name, key)
                    .with_arguments(props::header_values(&x.arguments));
                self.ctx
                    .broker
                    .bind(&self.ns, binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Queue(M::BindOk(queue::BindOk {})));
                }
            }
            M::Unbind(x) => {
                let (name, _) = self.require_queue(ch, x.queue.as_str()).await?;
                let binding = Binding::queue(x.exchange.as_str(), name, x.routing_key.as_str())
                    .with_arguments(props::header_values(&x.arguments));
                self.ctx
                    .broker
                    .unbind(&self.ns, &binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                self.send_method(ch, AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})));
            }
            M::Purge(p) => {
                let (_, def) = self.require_queue(ch, p.queue.as_str()).await?;
                let (ready, _) = self.queue_counts(&def).await;
                let sub = self.queue_subscription(&def).await?;
                // Everything not delivered goes; delivered messages stay
                // with their consumers, as in RabbitMQ.
                sub.reset(magnetar_broker::ResetTo::End)
                    .await
                    .map_err(Exception::from)?;
                if !p.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                            message_count: ready,
                        })),
                    );
                }
            }
            M::Delete(d) => {
                let name = self.queue_name(ch, d.queue.as_str())?;
                // Deleting a queue deletes its topic, which may be another
                // application's (a queue named `orders-partition-0` is a
                // Kafka partition): the namespace admin's, but for the
                // connection's own exclusive queues.
                if !self.exclusive_queues.contains(&name) {
                    self.grants.check(AuthAction::Admin, || {
                        format!("queue '{name}' in vhost '{}'", self.vhost)
                    })?;
                }
                let count = match self.lookup_queue(&name).await? {
                    None => 0,
                    Some(def) => {
                        let (ready, consumers) = self.queue_counts(&def).await;
                        if d.if_unused && consumers > 0 {
                            return Err(Exception::new(
                                error::PRECONDITION_FAILED,
                                format!("queue '{name}' in vhost '{}' in use", self.vhost),
                            ));
                        }
                        if d.if_empty && ready > 0 {
                            return Err(Exception::new(
                                error::PRECONDITION_FAILED,
                                format!("queue '{name}' in vhost '{}' is not empty", self.vhost),
                            ));
                        }
                        self.delete_queue(&name).await?;
                        ready
                    }
                };
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                            message_count: count,
                        })),
                    );
                }
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        }
        Ok(())
    }

    async fn queue_declare(&mut self, d: &queue::Declare) -> Result<(String, u32, u32), Exception> {
        let mut name = d.queue.as_str().to_owned();
        if name.is_empty() {
            if d.passive {
                return Err(self.not_found(""));
            }
            name = format!("amq.gen-{}", random_suffix());
        } else if name.starts_with("amq.") && !d.passive {
            return Err(Exception::new(
                error::ACCESS_REFUSED,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let wanted = QueueDef::new(
            &name,
            d.durable,
            d.exclusive,
            d.auto_delete,
            d.arguments.clone(),
        )?;
        if let Some(existing) = self.lookup_queue(&name).await? {
            if !d.passive {
                existing.check_equivalent(&wanted, &self.vhost)?;
            }
            let (msgs, consumers) = self.queue_counts(&existing).await;
            return Ok((name, msgs, consumers));
        }
        if d.passive {
            return Err(self.not_found(&name));
        }
        self.ctx
            .broker
            .declare_queue(&self.ns, &name, d.durable)
            .await
            .map_err(|e| self.vhost_text(e))?;
        if d.durable && !d.exclusive {
            qdef::save(&self.ctx.store, &self.ns, &wanted)
                .await
                .map_err(Exception::from)?;
        }
        {
            let mut reg = self.ctx.registry();
            reg.queues.insert(
                (self.ns.clone(), name.clone()),
                QueueInfo {
                    def: Arc::new(wanted.clone()),
                    owner: d.exclusive.then_some(self.id),
                    consumers: 0,
                    exclusive_consumer: false,
                    sac_active: None,
                    sac_waiting: Default::default(),
                    last_used: Instant::now(),
                    deleting: None,
                },
            );
        }
        if d.exclusive {
            self.exclusive_queues.push(name.clone());
        }
        // The subscription exists from the declare on, so that what is
        // published before the first consumer waits for it. A stream keeps
        // its messages by retention, not by a subscription.
        if wanted.args.queue_type != QueueType::Stream {
            self.queue_subscription(&wanted).await?;
        }
        if wanted.args.message_ttl_ms.is_some() {
            self.ctx.ensure_sweeper(&self.ns, &wanted);
        }
        if wanted.args.expires_ms.is_some() {
            self.ctx.ensure_expirer(&self.ns, &wanted);
        }
        Ok((name, 0, 0))
    }

    async fn delete_queue(&mut self, name: &str) -> Result<(), Exception> {
        // A background deletion under way (an auto-delete queue that lost
        // its last consumer) finishes the job.
        let key = (self.ns.clone(), name.to_owned());
        let underway = self
            .ctx
            .registry()
            .queues
            .get(&key)
            .is_some_and(|i| i.deleting.is_some());
        if underway {
            self.ctx.deleted(&key).await;
            self.exclusive_queues.retain(|q| q != name);
            return Ok(());
        }
        self.ctx
            .broker
            .delete_queue(&self.ns, name)
            .await
            .map_err(Exception::from)?;
        qdef::remove(&self.ctx.store, &self.ns, name)
            .await
            .map_err(Exception::from)?;
        self.ctx
            .registry()
            .queues
            .remove(&(self.ns.clone(), name.to_owned()));
        self.exclusive_queues.retain(|q| q != name);
        Ok(())
    }

    /// One consumer of `queue` went away; an auto-delete queue left
    /// without consumers is deleted.
    fn release_consumer(&mut self, queue: &str, ch: u16, tag: &str) {
        let key = (self.ns.clone(), queue.to_owned());
        let me: ConsumerId = (self.id, ch, tag.to_owned());
        let doomed = {
            let mut reg = self.ctx.registry();
            match reg.queues.get_mut(&key) {
                Some(info) => {
                    info.consumers = info.consumers.saturating_sub(1);
                    info.exclusive_consumer = false;
                    info.last_used = Instant::now();
                    if info.sac_active.as_ref() == Some(&me) {
                        // The next in line becomes active and gets its credit.
                        info.sac_active = None;
                        if let Some((id, control, credit)) = info.sac_waiting.pop_front() {
                            control.flow(credit);
                            info.sac_active = Some(id);
                        }
                    } else {
                        info.sac_waiting.retain(|(id, _, _)| *id != me);
                    }
                    (info.consumers == 0 && info.def.auto_delete && info.deleting.is_none())
                        .then(|| Ctx::mark_deleting(info))
                }
                None => None,
            }
        };
        if let Some(done) = doomed {
            let ctx = Arc::clone(&self.ctx);
            tokio::spawn(async move {
                ctx.delete_marked(&key, done).await;
            });
        }
    }

    // ---- basic ----

    async fn on_basic(&mut self, ch: u16, m: basic::AMQPMethod) -> Result<(), Exception> {
        use basic::AMQPMethod as M;
        match m {
            M::Qos(q) => {
                // As RabbitMQ (per_consumer_qos): global=false limits each
                // consumer started afterwards, global=true the channel.
                self.chan(ch)?.prefetch.qos(q.prefetch_count, q.global);
                self.send_method(ch, AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                self.release_held(ch)?;
            }
            M::Consume(c) => {
                self.grants.check(AuthAction::Consume, || {
                    format!("queue \'{}\'", c.queue.as_str())
                })?;
                self.consume(ch, c).await?
            }
            M::Cancel(c) => {
                let tag = c.consumer_tag.as_str().to_owned();
                self.cancel(ch, &tag).await;
                if !c.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
            }
            M::Publish(p) => {
                self.grants.check(AuthAction::Produce, || {
                    format!("exchange \'{}\'", p.exchange.as_str())
                })?;
                self.chan(ch)?.assembler.start(p)?;
            }
            M::Get(g) => {
                self.grants.check(AuthAction::Consume, || {
                    format!("queue \'{}\'", g.queue.as_str())
                })?;
                self.get(ch, g).await?
            }
            M::Ack(a) => self.settle_tags(ch, a.delivery_tag, a.multiple, TxSettle::Ack)?,
            M::Nack(n) => self.settle_tags(
                ch,
                n.delivery_tag,
                n.multiple,
                TxSettle::Reject { requeue: n.requeue },
            )?,
            M::Reject(r) => self.settle_tags(
                ch,
                r.delivery_tag,
                false,
                TxSettle::Reject { requeue: r.requeue },
            )?,
            M::Recover(_) | M::RecoverAsync(_) => {
                let all = self.chan(ch)?.tags.drain();
                settle(all, Settle::Requeue);
                self.send_method(ch, AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                self.release_held(ch)?;
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        }
        Ok(())
    }

    fn settle_tags(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        how: TxSettle,
    ) -> Result<(), Exception> {
        let chan = self.chan(ch)?;
        let settled = chan.tags.settle_tagged(tag, multiple)?;
        if let Some(tx) = chan.tx.as_mut() {
            tx.settles.push((how, settled));
            return Ok(());
        }
        self.apply_settle(how, settled.into_iter().map(|(_, u)| u).collect());
        self.release_held(ch)
    }

    /// Sends held deliveries while the channel is under its channel-wide
    /// limit.
    fn release_held(&mut self, ch: u16) -> Result<(), Exception> {
        loop {
            let Some(c) = self.channels.get_mut(&ch) else {
                return Ok(());
            };
            if c.at_global_limit() {
                return Ok(());
            }
            let Some(h) = c.held.pop_front() else {
                return Ok(());
            };
            self.deliver_now(ch, h)?;
        }
    }

    fn apply_settle(&mut self, how: TxSettle, settled: Vec<Unacked>) {
        match how {
            TxSettle::Ack => settle(settled, Settle::Ack),
            TxSettle::Reject { requeue } => self.reject(settled, requeue),
        }
    }

    fn reject(&mut self, settled: Vec<Unacked>, requeue: bool) {
        if requeue {
            settle(settled, Settle::Requeue);
            return;
        }
        // Without a dead-letter exchange a rejected message is dropped;
        // with one it is acknowledged once republished there.
        for u in settled {
            if u.credit {
                u.control.flow(1);
            }
            match (u.message, self.ctx.known_def(&self.ns, &u.queue)) {
                (Some(m), Some(def)) => {
                    self.spawn_dead_letter(def, m, Reason::Rejected, u.control, u.offset);
                }
                _ => u.control.ack(vec![u.offset]),
            }
        }
    }

    fn spawn_dead_letter(
        &self,
        def: Arc<QueueDef>,
        message: Message,
        reason: Reason,
        control: ConsumerControl,
        offset: u64,
    ) {
        let ctx = Arc::clone(&self.ctx);
        let ns = self.ns.clone();
        tokio::spawn(async move {
            match ctx.dead_letter(&ns, &def, &message, reason).await {
                Ok(()) => control.ack(vec![offset]),
                Err(e) => {
                    // Not republished: it stays in its queue.
                    debug!(queue = %def.name, "dead-lettering failed: {e}");
                    control.nack(vec![offset], Duration::from_secs(1));
                }
            }
        });
    }

    async fn consume(&mut self, ch: u16, c: basic::Consume) -> Result<(), Exception> {
        if c.queue.as_str() == REPLY_TO {
            return self.consume_replies(ch, c);
        }
        // A stream consumer's `next` or `last` counts the channel's
        // earlier publishes as there.
        self.publishes_settled(ch).await?;
        let (name, def) = self.require_queue(ch, c.queue.as_str()).await?;
        let tag = if c.consumer_tag.as_str().is_empty() {
            let n = {
                let chan = self.chan(ch)?;
                chan.next_ctag += 1;
                chan.next_ctag
            };
            format!("amq.ctag-{}-{n}", random_suffix())
        } else {
            c.consumer_tag.as_str().to_owned()
        };
        if self.chan(ch)?.consumers.contains_key(&tag) {
            return Err(Exception::new(
                error::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let priority = c
            .arguments
            .inner()
            .get("x-priority")
            .map(props::header_value)
            .and_then(|v| match v {
                magnetar_broker::routing::HeaderValue::Int(n) => i32::try_from(n).ok(),
                _ => None,
            })
            .unwrap_or(0);
        {
            let mut reg = self.ctx.registry();
            let info = reg
                .queues
                .get_mut(&(self.ns.clone(), name.clone()))
                .ok_or_else(|| self.not_found(&name))?;
            if info.exclusive_consumer || (c.exclusive && info.consumers > 0) {
                return Err(Exception::new(
                    error::ACCESS_REFUSED,
                    format!("queue '{name}' in vhost '{}' in exclusive use", self.vhost),
                ));
            }
            info.consumers += 1;
            info.exclusive_consumer = c.exclusive;
        }
        let stream = def.args.queue_type == QueueType::Stream;
        let sub = if stream {
            self.stream_subscription(ch, &def, &tag, &c.arguments).await
        } else {
            self.queue_subscription(&def).await
        };
        let sub = match sub {
            Ok(s) => s,
            Err(e) => {
                self.release_consumer(&name, ch, &tag);
                return Err(e);
            }
        };
        let consumer = match sub
            .add_consumer(ConsumerOptions {
                name: tag.clone(),
                // Ours serves lower values first; RabbitMQ higher.
                priority: priority.saturating_neg(),
                ack_timeout: None,
            })
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.release_consumer(&name, ch, &tag);
                return Err(exception_of(&e));
            }
        };
        let chan = self.chan(ch)?;
        let prefetch = chan.prefetch.consumer_credit();
        let limited = prefetch > 0 && !c.no_ack;
        let control = consumer.control();
        let credit = if limited {
            u64::from(prefetch)
        } else {
            UNLIMITED_CREDIT
        };
        // With a single active consumer, later ones wait without credit.
        let active = !def.args.single_active_consumer || {
            let mut reg = self.ctx.registry();
            match reg.queues.get_mut(&(self.ns.clone(), name.clone())) {
                Some(info) if info.sac_active.is_some() => {
                    info.sac_waiting.push_back((
                        (self.id, ch, tag.clone()),
                        control.clone(),
                        credit,
                    ));
                    false
                }
                Some(info) => {
                    info.sac_active = Some((self.id, ch, tag.clone()));
                    true
                }
                None => true,
            }
        };
        if active {
            control.flow(credit);
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let gen = self.chan(ch)?.gen;
        let task = tokio::spawn(forward_deliveries(
            consumer,
            stop_rx,
            self.events_tx.clone(),
            ch,
            gen,
            tag.clone(),
        ));
        if !c.nowait {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        self.chan(ch)?.consumers.insert(
            tag,
            ConsumerEntry {
                queue: name,
                def,
                no_ack: c.no_ack,
                limited,
                stop: Some(stop_tx),
                task,
            },
        );
        Ok(())
    }

    fn stream_subscription_name(&self, ch: u16, tag: &str) -> String {
        format!("amqp-stream-{}-{ch}-{tag}", self.id)
    }

    /// A stream queue is read, not consumed: each consumer gets its own
    /// non-durable cursor from `x-stream-offset` (first, last, next, an
    /// offset, or a timestamp in seconds), and acknowledgements only
    /// return credit.
    async fn stream_subscription(
        &mut self,
        ch: u16,
        def: &QueueDef,
        tag: &str,
        args: &FieldTable,
    ) -> Result<magnetar_broker::subscription::Subscription, Exception> {
        if self.chan(ch)?.prefetch.per_consumer == 0 {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "consumer prefetch count is not set for stream queue",
            ));
        }
        let topic = self.queue_topic(def)?;
        let t = self
            .ctx
            .broker
            .topic(&topic, true)
            .await
            .map_err(Exception::from)?;
        let (start, end) = (t.log().start_offset(), t.log().end_offset());
        let at = match args.inner().get("x-stream-offset") {
            None => end,
            Some(AMQPValue::LongString(v)) => match &*String::from_utf8_lossy(v.as_bytes()) {
                "first" => start,
                "last" => end.saturating_sub(1).max(start),
                "next" => end,
                other => {
                    return Err(Exception::new(
                        error::PRECONDITION_FAILED,
                        format!("invalid x-stream-offset '{other}'"),
                    ))
                }
            },
            Some(AMQPValue::Timestamp(secs)) => t
                .offset_for_timestamp(
                    i64::try_from(*secs)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1000),
                )
                .await
                .map_err(Exception::from)?,
            Some(v) => match props::header_value(v) {
                magnetar_broker::routing::HeaderValue::Int(n) => {
                    u64::try_from(n).unwrap_or(0).clamp(start, end)
                }
                _ => {
                    return Err(Exception::new(
                        error::PRECONDITION_FAILED,
                        "invalid x-stream-offset",
                    ))
                }
            },
        };
        let name = self.stream_subscription_name(ch, tag);
        let sub = t
            .get_or_create_subscription(
                &name,
                SubscriptionOptions {
                    sub_type: SubscriptionType::Exclusive,
                    initial_position: InitialPosition::Earliest,
                    durable: false,
                    ..SubscriptionOptions::default()
                },
            )
            .await
            .map_err(Exception::from)?;
        sub.reset(magnetar_broker::ResetTo::Offset(at))
            .await
            .map_err(Exception::from)?;
        Ok(sub)
    }

    /// Removes a stream consumer's cursor once the consumer is gone.
    fn drop_stream_subscription(&self, ch: u16, def: &QueueDef, tag: &str) {
        if def.args.queue_type != QueueType::Stream {
            return;
        }
        let name = self.stream_subscription_name(ch, tag);
        let Ok(topic) = self.queue_topic(def) else {
            return;
        };
        let broker = self.ctx.broker.clone();
        tokio::spawn(async move {
            if let Ok(t) = broker.topic(&topic, false).await {
                let _ = t.unsubscribe(&name, true).await;
            }
        });
    }

    /// Direct reply-to: a no-ack consumer of the pseudo-queue, fed by
    /// publishes to `amq.rabbitmq.reply-to.<token>` without any queue.
    fn consume_replies(&mut self, ch: u16, c: basic::Consume) -> Result<(), Exception> {
        if !c.no_ack {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "reply consumer cannot acknowledge",
            ));
        }
        let events = self.events_tx.clone();
        let conn = self.id;
        let chan = self.chan(ch)?;
        if chan.reply_to.is_some() {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "reply consumer already set",
            ));
        }
        let tag = if c.consumer_tag.as_str().is_empty() {
            format!("amq.ctag-{}", random_suffix())
        } else {
            c.consumer_tag.as_str().to_owned()
        };
        let token = format!("{conn}.{ch}.{}", random_suffix());
        chan.reply_to = Some((tag.clone(), token.clone()));
        let target = ReplyTarget {
            events,
            channel: ch,
            gen: chan.gen,
            consumer: tag.clone(),
        };
        self.ctx.registry().replies.insert(token, target);
        if !c.nowait {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    async fn cancel(&mut self, ch: u16, tag: &str) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        if c.reply_to.as_ref().is_some_and(|(t, _)| t == tag) {
            if let Some((_, token)) = c.reply_to.take() {
                self.ctx.registry().replies.remove(&token);
            }
            return;
        }
        let Some(mut e) = c.consumers.remove(tag) else {
            return;
        };
        let (mine, others): (VecDeque<Held>, VecDeque<Held>) =
            c.held.drain(..).partition(|h| h.consumer == tag);
        c.held = others;
        for h in mine {
            h.control.nack(vec![h.delivery.offset], Duration::ZERO);
        }
        if let Some(stop) = e.stop.take() {
            let _ = stop.send(());
        }
        if let Ok(mut consumer) = e.task.await {
            // Credited but not yet sent: back to the queue.
            let mut back = Vec::new();
            while let Some(d) = consumer.try_recv() {
                back.push(d.offset);
            }
            if !back.is_empty() {
                consumer.nack(back, Duration::ZERO);
            }
            let c = self.channels.get_mut(&ch);
            if let Some(c) = c {
                let id = consumer.id();
                let holds = {
                    let mut any = false;
                    c.tags.retain(|_, u| {
                        any |= u.control.id() == id;
                        true
                    });
                    any
                };
                if holds {
                    c.retired.push(consumer);
                }
            }
        }
        self.drop_stream_subscription(ch, &e.def, tag);
        self.release_consumer(&e.queue, ch, tag);
    }

    async fn get(&mut self, ch: u16, g: basic::Get) -> Result<(), Exception> {
        self.publishes_settled(ch).await?;
        let (name, def) = self.require_queue(ch, g.queue.as_str()).await?;
        if def.args.queue_type == QueueType::Stream {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "basic.get is not supported by stream queues",
            ));
        }
        if !self.chan(ch)?.getters.contains_key(&name) {
            let sub = self.queue_subscription(&def).await?;
            let consumer = sub
                .add_consumer(ConsumerOptions {
                    name: format!("basic.get-{}-{ch}", self.id),
                    ..Default::default()
                })
                .await
                .map_err(Exception::from)?;
            self.chan(ch)?.getters.insert(name.clone(), consumer);
        }
        let got = loop {
            let Some(consumer) = self.chan(ch)?.getters.get_mut(&name) else {
                return Ok(());
            };
            let got = match consumer.get_one().await {
                Ok(true) => consumer.try_recv().map(|d| (d, consumer.control())),
                Ok(false) => None,
                Err(e) => {
                    self.chan(ch)?.getters.remove(&name);
                    return Err(exception_of(&e));
                }
            };
            // Expired or past the delivery limit: dead-lettered, not given.
            let Some((d, control)) = got else {
                break None;
            };
            let over_limit = def
                .args
                .delivery_limit
                .is_some_and(|l| u64::from(d.redelivery_count) > l);
            let expired = channels::expired(&d.message, def.args.message_ttl_ms, now_ms());
            if !over_limit && !expired {
                break Some((d, control));
            }
            let reason = if expired {
                Reason::Expired
            } else {
                Reason::DeliveryLimit
            };
            self.spawn_dead_letter(Arc::clone(&def), d.message, reason, control, d.offset);
        };
        let Some((d, control)) = got else {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let (remaining, _) = self.queue_counts(&def).await;
        let delivered = props::from_record(&d.message, &name);
        let chan = self.chan(ch)?;
        let tag = if g.no_ack {
            control.ack(vec![d.offset]);
            chan.tags.issue(None)
        } else {
            chan.tags.issue(Some(Unacked {
                control,
                offset: d.offset,
                credit: false,
                queue: name.clone(),
                message: def
                    .args
                    .dead_letter_exchange
                    .is_some()
                    .then(|| d.message.clone()),
            }))
        };
        let mut b = BytesMut::with_capacity(delivered.body.len() + 256);
        codec::encode_content(
            &mut b,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered: d.redelivery_count > 0,
                exchange: short(&delivered.exchange),
                routing_key: short(&delivered.routing_key),
                message_count: remaining,
            })),
            delivered.properties,
            &delivered.body,
            self.frame_max,
        );
        self.send(b);
        Ok(())
    }

    async fn publish(&mut self, ch: u16, p: Publish) -> Result<(), Exception> {
        self.publisher = true;
        let chan = self.chan(ch)?;
        if let Some(tx) = chan.tx.as_mut() {
            tx.publishes.push(p);
            return Ok(());
        }
        let stored = self.route_and_store(ch, p).await?;
        let chan = self.chan(ch)?;
        let seq = if chan.confirm {
            chan.next_seq += 1;
            chan.next_seq - 1
        } else {
            0
        };
        let pipeline = chan.pipeline.clone();
        chan.published += 1;
        // A full pipeline holds this connection's reads: backpressure.
        let _ = pipeline.send((seq, stored)).await;
        Ok(())
    }

    /// Routes a message and queues it for every queue it reaches; returns
    /// the wait for all of them to be durable.
    async fn route_and_store(&mut self, ch: u16, mut p: Publish) -> Result<Pending, Exception> {
        if p.message
            .properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            let Some((_, token)) = self.chan(ch)?.reply_to.clone() else {
                return Err(Exception::new(
                    error::PRECONDITION_FAILED,
                    "fast reply consumer does not exist",
                ));
            };
            let props = p.message.properties.clone();
            p.message.properties = props.with_reply_to(short(&format!("{REPLY_TO}.{token}")));
        }
        if p.message.exchange.is_empty() {
            if let Some(token) = p.message.routing_key.strip_prefix(&format!("{REPLY_TO}.")) {
                return self.publish_reply(ch, token.to_owned(), p).await;
            }
        }
        let msg = &p.message;
        if let Some(Err(e)) = props::expiration_ms(&msg.properties) {
            return Err(Exception::new(error::PRECONDITION_FAILED, e));
        }
        let routes = self.route(msg).await?;
        let record = props::to_record(msg);
        let mut pending: Vec<Pending> = Vec::with_capacity(routes.len());
        let expires = msg.properties.expiration().is_some();
        let mut rejected = false;
        let mut record = record;
        let last = routes.len().saturating_sub(1);
        for (i, (q, topic)) in routes.iter().enumerate() {
            // The last queue takes the record itself; only fan-out copies.
            let own = |r: &mut Message| {
                if i == last {
                    std::mem::take(r)
                } else {
                    r.clone()
                }
            };
            let def = match self.ctx.known_def(&self.ns, q) {
                Some(d) => Some(d),
                None => self.lookup_queue(q).await.ok().flatten(),
            };
            let Some(def) = def else {
                pending.push(self.submit(topic, own(&mut record)));
                continue;
            };
            if expires {
                self.ctx.ensure_sweeper(&self.ns, &def);
            }
            if def.args.max_length.is_none() && def.args.max_length_bytes.is_none() {
                pending.push(self.submit(topic, own(&mut record)));
                continue;
            }
            match def.args.overflow {
                Overflow::RejectPublish | Overflow::RejectPublishDlx => {
                    if self.is_full(&def).await {
                        rejected = true;
                        if def.args.overflow == Overflow::RejectPublishDlx {
                            let ctx = Arc::clone(&self.ctx);
                            let ns = self.ns.clone();
                            let record = record.clone();
                            tokio::spawn(async move {
                                let _ = ctx.dead_letter(&ns, &def, &record, Reason::MaxLen).await;
                            });
                        }
                        continue;
                    }
                    pending.push(self.submit(topic, own(&mut record)));
                }
                Overflow::DropHead => {
                    let stored = self.submit(topic, own(&mut record));
                    let sub = self.queue_subscription(&def).await?;
                    let ctx = Arc::clone(&self.ctx);
                    let ns = self.ns.clone();
                    pending.push(
                        async move {
                            stored.await?;
                            ctx.drop_head(&ns, &def, &sub).await
                        }
                        .boxed(),
                    );
                }
            }
        }
        if rejected {
            pending.push(
                async {
                    Err(BrokerError::QuotaExceeded(
                        "queue is at its max-length".into(),
                    ))
                }
                .boxed(),
            );
        }
        if routes.is_empty() && p.mandatory {
            let mut b = BytesMut::with_capacity(msg.body.len() + 256);
            codec::encode_content(
                &mut b,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: error::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(&msg.exchange),
                    routing_key: short(&msg.routing_key),
                })),
                msg.properties.clone(),
                &msg.body,
                self.frame_max,
            );
            self.send(b);
        }
        if pending.len() == 1 {
            if let Some(one) = pending.pop() {
                return Ok(one);
            }
        }
        Ok(async move {
            for r in futures::future::join_all(pending).await {
                r?;
            }
            Ok(())
        }
        .boxed())
    }

    /// The queues a message reaches. Routes of messages without headers
    /// (which only a headers exchange would look at) are cached until the
    /// broker's routing changes.
    async fn route(&mut self, msg: &props::Published) -> Result<Routes, Exception> {
        let cacheable = msg.properties.headers().is_none();
        let generation = self.ctx.broker.routing_generation();
        if cacheable {
            if generation != self.route_generation {
                self.route_cache.clear();
                self.route_generation = generation;
            }
            let key = (msg.exchange.clone(), msg.routing_key.clone());
            if let Some(r) = self.route_cache.get(&key) {
                return Ok(Arc::clone(r));
            }
        }
        let headers = msg
            .properties
            .headers()
            .as_ref()
            .map(props::header_values)
            .unwrap_or_default();
        let routes = Arc::new(
            self.ctx
                .broker
                .route(&self.ns, &msg.exchange, &msg.routing_key, &headers)
                .await
                .map_err(|e| self.vhost_text(e))?,
        );
        if cacheable && generation == self.route_generation {
            if self.route_cache.len() >= 4096 {
                self.route_cache.clear();
            }
            self.route_cache.insert(
                (msg.exchange.clone(), msg.routing_key.clone()),
                Arc::clone(&routes),
            );
        }
        Ok(routes)
    }

    /// A reply goes straight to the channel that waits for it; it is not
    /// stored, as in RabbitMQ, so it is confirmed at once.
    async fn publish_reply(
        &mut self,
        ch: u16,
        token: String,
        p: Publish,
    ) -> Result<Pending, Exception> {
        let target = self.ctx.registry().replies.get(&token).cloned();
        let delivered = match target {
            Some(t) => t
                .events
                .send(Event::Reply {
                    channel: t.channel,
                    gen: t.gen,
                    consumer: t.consumer,
                    message: Box::new(p.message.clone()),
                })
                .is_ok(),
            None => false,
        };
        if !delivered && p.mandatory {
            let mut b = BytesMut::with_capacity(p.message.body.len() + 256);
            codec::encode_content(
                &mut b,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: error::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(""),
                    routing_key: short(&p.message.routing_key),
                })),
                p.message.properties.clone(),
                &p.message.body,
                self.frame_max,
            );
            self.send(b);
        }
        Ok(async { Ok(()) }.boxed())
    }

    /// Queues a message for a queue's topic, in order, and returns the
    /// wait for its durability.
    fn submit(&self, topic: &TopicName, record: Message) -> Pending {
        let stored = self.ctx.publisher(topic).publish(record);
        async move { stored.await.map(drop) }.boxed()
    }

    /// Transactions as RabbitMQ has them: publishes and acknowledgements
    /// of a channel in tx mode wait for commit, which returns once the
    /// publishes are durable; rollback drops the publishes and leaves the
    /// acknowledged deliveries unacknowledged.
    async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> Result<(), Exception> {
        use tx::AMQPMethod as M;
        let not_tx = channels::not_transactional;
        let reply = match m {
            M::Select(_) => {
                let chan = self.chan(ch)?;
                channels::tx_select(chan.confirm)?;
                chan.tx.get_or_insert_with(TxBuffer::default);
                M::SelectOk(tx::SelectOk {})
            }
            M::Commit(_) => {
                let buffer = std::mem::take(self.chan(ch)?.tx.as_mut().ok_or_else(not_tx)?);
                let mut stored = Vec::with_capacity(buffer.publishes.len());
                for p in buffer.publishes {
                    stored.push(self.route_and_store(ch, p).await?);
                }
                for r in futures::future::join_all(stored).await {
                    r.map_err(|e| exception_of(&e))?;
                }
                for (how, settled) in buffer.settles {
                    self.apply_settle(how, settled.into_iter().map(|(_, u)| u).collect());
                }
                self.release_held(ch)?;
                M::CommitOk(tx::CommitOk {})
            }
            M::Rollback(_) => {
                let chan = self.chan(ch)?;
                let buffer = std::mem::take(chan.tx.as_mut().ok_or_else(not_tx)?);
                for (_, settled) in buffer.settles {
                    for (tag, u) in settled {
                        chan.tags.restore(tag, u);
                    }
                }
                M::RollbackOk(tx::RollbackOk {})
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        };
        self.send_method(ch, AMQPClass::Tx(reply));
        Ok(())
    }

    // ---- events ----

    fn on_event(&mut self, ev: Event) -> Result<(), Exception> {
        match ev {
            Event::Deliver {
                channel,
                gen,
                consumer,
                control,
                delivery,
            } => self.deliver(
                channel,
                Held {
                    gen,
                    consumer,
                    control,
                    delivery,
                },
            ),
            Event::ConsumerEnded {
                channel,
                gen,
                consumer,
            } => {
                let Some(c) = self.channels.get_mut(&channel).filter(|c| c.gen == gen) else {
                    return Ok(());
                };
                let Some(e) = c.consumers.remove(&consumer) else {
                    return Ok(());
                };
                self.release_consumer(&e.queue, channel, &consumer);
                // consumer_cancel_notify: the client learns its queue went.
                self.send_method(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: short(&consumer),
                        nowait: true,
                    })),
                );
                Ok(())
            }
            Event::Reply {
                channel,
                gen,
                consumer,
                message,
            } => {
                let frame_max = self.frame_max;
                let Some(c) = self
                    .channels
                    .get_mut(&channel)
                    .filter(|c| c.gen == gen && !c.closing)
                else {
                    return Ok(());
                };
                let tag = c.tags.issue(None);
                let mut b = BytesMut::with_capacity(message.body.len() + 256);
                codec::encode_content(
                    &mut b,
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: short(&consumer),
                        delivery_tag: tag,
                        redelivered: false,
                        exchange: short(""),
                        routing_key: short(&message.routing_key),
                    })),
                    message.properties,
                    &message.body,
                    frame_max,
                );
                self.send(b);
                Ok(())
            }
            Event::Confirmed {
                channel,
                gen,
                seq,
                multiple,
                ok,
            } => {
                if !self
                    .channels
                    .get(&channel)
                    .is_some_and(|c| c.gen == gen && !c.closing)
                {
                    return Ok(());
                }
                let m = if ok {
                    basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: seq,
                        multiple,
                    })
                } else {
                    basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple,
                        requeue: false,
                    })
                };
                self.send_method(channel, AMQPClass::Basic(m));
                Ok(())
            }
        }
    }

    fn deliver(&mut self, ch: u16, h: Held) -> Result<(), Exception> {
        if let Some(c) = self.channels.get_mut(&ch).filter(|c| c.gen == h.gen) {
            // Held in order behind earlier ones, so that none overtakes.
            let no_ack = c.consumers.get(&h.consumer).is_none_or(|e| e.no_ack);
            if channels::waits(!c.held.is_empty(), c.at_global_limit(), no_ack) {
                c.held.push_back(h);
                return Ok(());
            }
        }
        self.deliver_now(ch, h)
    }

    fn deliver_now(&mut self, ch: u16, h: Held) -> Result<(), Exception> {
        let Held {
            gen,
            consumer,
            control,
            delivery: d,
        } = h;
        let frame_max = self.frame_max;
        let Some(c) = self
            .channels
            .get_mut(&ch)
            .filter(|c| c.gen == gen && !c.closing)
        else {
            control.nack(vec![d.offset], Duration::ZERO);
            return Ok(());
        };
        let Some(entry) = c.consumers.get(&consumer) else {
            control.nack(vec![d.offset], Duration::ZERO);
            return Ok(());
        };
        let queue = entry.queue.clone();
        let (no_ack, limited) = (entry.no_ack, entry.limited);
        let def = Arc::clone(&entry.def);
        let expired = channels::expired(&d.message, def.args.message_ttl_ms, now_ms());
        if let Some(reason) =
            channels::dead_letter_instead(def.args.delivery_limit, d.redelivery_count, expired)
        {
            self.spawn_dead_letter(def, d.message, reason, control.clone(), d.offset);
            control.flow(1);
            return Ok(());
        }
        let keep = def.args.dead_letter_exchange.is_some();
        let Some(c) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let tag = if no_ack {
            control.ack(vec![d.offset]);
            c.tags.issue(None)
        } else {
            c.tags.issue(Some(Unacked {
                control: control.clone(),
                offset: d.offset,
                credit: limited,
                queue: queue.clone(),
                message: keep.then(|| d.message.clone()),
            }))
        };
        if !limited {
            self.return_credit(&control);
        }
        let mut delivered = props::from_record(&d.message, &queue);
        if def.args.queue_type == QueueType::Stream {
            // Where this message sits in the stream, as RabbitMQ tells it.
            let mut h = delivered.properties.headers().clone().unwrap_or_default();
            h.insert(
                "x-stream-offset".into(),
                AMQPValue::LongLongInt(i64::try_from(d.offset).unwrap_or(i64::MAX)),
            );
            delivered.properties = delivered.properties.with_headers(h);
        }
        let mut b = BytesMut::with_capacity(delivered.body.len() + 256);
        codec::encode_content(
            &mut b,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: short(&consumer),
                delivery_tag: tag,
                redelivered: d.redelivery_count > 0,
                exchange: short(&delivered.exchange),
                routing_key: short(&delivered.routing_key),
            })),
            delivered.properties,
            &delivered.body,
            frame_max,
        );
        self.send(b);
        Ok(())
    }

    async fn cleanup(&mut self) {
        let chans: Vec<u16> = self.channels.keys().copied().collect();
        for ch in chans {
            self.close_channel_resources(ch, false);
        }
        self.channels.clear();
        for q in std::mem::take(&mut self.exclusive_queues) {
            let _ = self.delete_queue(&q).await;
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

/// Forwards a consumer's deliveries to its connection until stopped;
/// returns the consumer so that its unsettled deliveries stay its own.
async fn forward_deliveries(
    mut consumer: Consumer,
    mut stop: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
    channel: u16,
    gen: u64,
    tag: String,
) -> Consumer {
    let control = consumer.control();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return consumer,
            d = consumer.recv() => match d {
                Some(delivery) => {
                    let ev = Event::Deliver {
                        channel,
                        gen,
                        consumer: tag.clone(),
                        control: control.clone(),
                        delivery,
                    };
                    if events.send(ev).is_err() {
                        return consumer;
                    }
                }
                None => {
                    let _ = events.send(Event::ConsumerEnded { channel, gen, consumer: tag });
                    return consumer;
                }
            }
        }
    }
}

/// exchange.bind and exchange.unbind name the same binding.
fn exchange_binding(
    source: &ShortString,
    destination: &ShortString,
    key: &ShortString,
    args: &FieldTable,
) -> Binding {
    Binding::exchange(source.as_str(), destination.as_str(), key.as_str())
        .with_arguments(props::header_values(args))
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
