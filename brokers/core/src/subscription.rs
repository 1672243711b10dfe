//! Subscriptions: a cursor on one partition and the consumers reading
//! through it.
//!
//! Each subscription is one dispatcher task. It reads entries only while
//! some consumer has permits (credit), so a slow consumer's backlog stays
//! on the bookies instead of in broker memory: what the dispatcher holds is
//! at most one decoded batch plus the offsets of messages delivered and not
//! yet acknowledged.
//!
//! Redeliveries (a consumer closed, a negative ack, an ack timeout) go to a
//! replay set that is served before new messages, lowest offset first. Each
//! redelivery raises the message's count; past the dead-letter policy's
//! limit the message goes to the dead-letter topic instead and is
//! acknowledged here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use magnetar_metadata::{MetaClient, MetaError};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::cursor::CursorState;
use crate::error::{BrokerError, Result};
use crate::format::{decode_entry, Message, StoredMessage};
use crate::log::PartitionLog;
use crate::managed_ledger::Entry;

pub const CURSOR_PREFIX: &str = "/cursors/";
/// How long acknowledgements may wait before the cursor is written.
const PERSIST_DELAY: Duration = Duration::from_millis(100);
/// Entries read per trip to the log.
const READ_ENTRIES: usize = 64;
const READ_BYTES: usize = 1 << 20;
/// Messages a key-shared subscription may hold back for busy consumers
/// before it stops reading ahead.
const MAX_BLOCKED: usize = 10_000;
/// Messages a priority subscription reads ahead to order them.
const PRIORITY_WINDOW: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubscriptionType {
    Exclusive,
    Shared,
    Failover,
    #[serde(rename = "Key_Shared")]
    KeyShared,
}

impl SubscriptionType {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
            "exclusive" => Ok(SubscriptionType::Exclusive),
            "shared" => Ok(SubscriptionType::Shared),
            "failover" => Ok(SubscriptionType::Failover),
            "keyshared" => Ok(SubscriptionType::KeyShared),
            _ => Err(BrokerError::InvalidArgument(format!(
                "unknown subscription type {s:?}"
            ))),
        }
    }

    /// Whether one consumer sees messages in order, so that a cumulative
    /// acknowledgement means something.
    pub fn allows_cumulative_ack(self) -> bool {
        matches!(
            self,
            SubscriptionType::Exclusive | SubscriptionType::Failover
        )
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialPosition {
    #[default]
    Latest,
    Earliest,
    /// This offset, clamped to what the partition holds: a reader started
    /// from a saved position.
    Offset(u64),
}

#[derive(Clone, Debug)]
pub struct DeadLetterPolicy {
    /// Deliveries beyond the first before a message is dead-lettered.
    pub max_redeliveries: u32,
    /// Defaults to `{topic}-{subscription}-DLQ`.
    pub topic: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    pub sub_type: SubscriptionType,
    pub initial_position: InitialPosition,
    /// Non-durable cursors live only as long as the subscription does.
    pub durable: bool,
    pub dead_letter: Option<DeadLetterPolicy>,
    /// Serve messages of higher priority first.
    pub priority: Option<MessagePriority>,
}

/// Where a message's priority is found, and its highest level: messages
/// of higher levels go out first, in order within a level. A missing or
/// unreadable value is level 0; values above `max` count as `max`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePriority {
    /// A record header holding the level in decimal.
    pub header: String,
    pub max: u8,
}

impl MessagePriority {
    pub fn level(&self, m: &Message) -> u8 {
        m.headers
            .iter()
            .rev()
            .find(|(k, _)| *k == self.header)
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse::<u64>().ok())
            .map_or(0, |l| u8::try_from(l).unwrap_or(u8::MAX).min(self.max))
    }
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            sub_type: SubscriptionType::Exclusive,
            initial_position: InitialPosition::Latest,
            durable: true,
            dead_letter: None,
            priority: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerOptions {
    pub name: String,
    /// Lower values are served first (shared) or win (failover).
    pub priority: i32,
    /// Unacknowledged messages are redelivered after this long.
    pub ack_timeout: Option<Duration>,
}

/// One message handed to a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub offset: u64,
    /// Earlier deliveries of this message to this subscription.
    pub redelivery_count: u32,
    pub message: Message,
}

/// Decides, message by message from the head, what [`Subscription::reap`]
/// takes.
pub type ReapPredicate = Box<dyn FnMut(&StoredMessage) -> bool + Send>;

/// Sends a message to a dead-letter topic; supplied by the topic layer.
pub type DeadLetterSink =
    Arc<dyn Fn(String, Message) -> BoxFuture<'static, Result<()>> + Send + Sync>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStats {
    pub consumer_name: String,
    pub available_permits: u64,
    pub unacked_messages: u64,
    pub msg_out_counter: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStats {
    #[serde(rename = "type")]
    pub sub_type: String,
    pub msg_backlog: u64,
    pub unacked_messages: u64,
    pub msg_out_counter: u64,
    pub mark_delete_offset: u64,
    pub read_offset: u64,
    pub is_durable: bool,
    /// Stored entries skipped because they could not be decoded.
    pub skipped_entries: u64,
    pub consumers: Vec<ConsumerStats>,
}

/// The cursor's record in the metadata store.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredCursor {
    #[serde(rename = "type")]
    sub_type: SubscriptionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<MessagePriority>,
    state: CursorState,
}

/// A durable cursor as loaded: what the subscription was created with,
/// and where it stands.
pub struct LoadedCursor {
    pub sub_type: SubscriptionType,
    pub priority: Option<MessagePriority>,
    pub state: CursorState,
    pub version: u64,
}

/// The stored form of a cursor.
pub fn cursor_record(
    sub_type: SubscriptionType,
    priority: Option<&MessagePriority>,
    state: &CursorState,
) -> Vec<u8> {
    serde_json::to_vec(&StoredCursor {
        sub_type,
        priority: priority.cloned(),
        state: state.for_storage(),
    })
    .unwrap_or_default()
}

pub fn cursor_key(topic_path: &str, sub: &str) -> String {
    format!(
        "{CURSOR_PREFIX}{topic_path}/{}",
        magnetar_tenancy::names::encode_segment(sub)
    )
}

/// Loads a durable cursor, if it exists.
pub async fn load_cursor(meta: &MetaClient, key: &str) -> Result<Option<LoadedCursor>> {
    let Some(kv) = meta.get(key).await? else {
        return Ok(None);
    };
    let c: StoredCursor =
        serde_json::from_slice(&kv.value).map_err(|e| BrokerError::CorruptMetadata {
            key: key.into(),
            reason: e.to_string(),
        })?;
    Ok(Some(LoadedCursor {
        sub_type: c.sub_type,
        priority: c.priority,
        state: c.state,
        version: kv.version,
    }))
}

enum Cmd {
    AddConsumer {
        opts: ConsumerOptions,
        reply: oneshot::Sender<Result<Consumer>>,
    },
    RemoveConsumer(u64),
    Flow(u64, u64),
    Ack(u64, Vec<u64>),
    AckCumulative(u64),
    Nack(u64, Vec<u64>, Duration),
    /// Offer one message to a consumer now; the reply says whether one was
    /// sent, and no permit is left behind either way.
    Get(u64, oneshot::Sender<Result<bool>>),
    Reap {
        max: usize,
        pred: ReapPredicate,
        reply: oneshot::Sender<Result<Vec<StoredMessage>>>,
    },
    ReadyBytes(oneshot::Sender<Result<u64>>),
    Reset(ResetTo, oneshot::Sender<Result<()>>),
    Stats(oneshot::Sender<SubscriptionStats>),
    /// Stop; with `delete`, remove the durable cursor too.
    Close {
        delete: bool,
        reply: oneshot::Sender<Result<()>>,
    },
}

#[derive(Clone, Copy, Debug)]
pub enum ResetTo {
    Offset(u64),
    Skip(u64),
    End,
}

/// Handle to a running subscription; cheap to clone.
#[derive(Clone)]
pub struct Subscription {
    name: Arc<str>,
    sub_type: SubscriptionType,
    durable: bool,
    tx: mpsc::UnboundedSender<Cmd>,
    mark_delete: watch::Receiver<u64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("type", &self.sub_type)
            .finish()
    }
}

/// Where a durable cursor is written.
pub struct CursorStore {
    pub meta: MetaClient,
    pub key: String,
    /// Version of the stored record; 0 when it does not exist yet.
    pub version: u64,
}

pub struct SubscriptionSetup {
    pub topic: String,
    pub name: String,
    pub log: PartitionLog,
    pub cursor: CursorState,
    pub opts: SubscriptionOptions,
    pub store: Option<CursorStore>,
    pub dead_letter: Option<DeadLetterSink>,
    /// Partition index, for spreading failover subscriptions.
    pub partition: u32,
    /// The namespace's delivery counters.
    pub delivered: crate::metrics::Traffic,
}

impl Subscription {
    pub fn start(setup: SubscriptionSetup) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let (md_tx, md_rx) = watch::channel(setup.cursor.mark_delete);
        let sub = Subscription {
            name: setup.name.as_str().into(),
            sub_type: setup.opts.sub_type,
            durable: setup.store.is_some(),
            tx: tx.clone(),
            mark_delete: md_rx,
        };
        let read_pos = setup.cursor.mark_delete;
        let d = Dispatcher {
            end: setup.log.watch_end(),
            topic: setup.topic,
            name: setup.name,
            log: setup.log,
            sub_type: setup.opts.sub_type,
            dead_letter: setup.opts.dead_letter.zip(setup.dead_letter),
            priority: setup.opts.priority,
            cursor: setup.cursor,
            store: setup.store,
            dirty: false,
            persist_at: None,
            consumers: Vec::new(),
            next_consumer: 1,
            rr: 0,
            active: 0,
            read_pos,
            buffer: VecDeque::new(),
            pending: BTreeMap::new(),
            replay: BTreeMap::new(),
            delayed: BinaryHeap::new(),
            timeouts: BinaryHeap::new(),
            md_tx,
            tx: tx.downgrade(),
            partition: setup.partition,
            msg_out: 0,
            delivered: setup.delivered,
            skipped_entries: 0,
        };
        tokio::spawn(d.run(rx));
        sub
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sub_type(&self) -> SubscriptionType {
        self.sub_type
    }

    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Everything below is acknowledged.
    pub fn mark_delete(&self) -> u64 {
        *self.mark_delete.borrow()
    }

    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    fn gone(&self) -> BrokerError {
        BrokerError::TopicUnavailable(format!("subscription {}", self.name))
    }

    async fn call<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    pub async fn add_consumer(&self, opts: ConsumerOptions) -> Result<Consumer> {
        self.call(|reply| Cmd::AddConsumer { opts, reply }).await?
    }

    pub async fn stats(&self) -> Result<SubscriptionStats> {
        self.call(Cmd::Stats).await
    }

    pub async fn reset(&self, to: ResetTo) -> Result<()> {
        self.call(|reply| Cmd::Reset(to, reply)).await?
    }

    /// Acknowledges everything before `offset` that is not yet: how
    /// expired messages (message TTL) leave a subscription.
    pub fn expire_before(&self, offset: u64) {
        if offset > self.mark_delete() {
            let _ = self.tx.send(Cmd::AckCumulative(offset - 1));
        }
    }

    /// Takes messages off the head of the queue: from the oldest message
    /// that is neither acknowledged nor out with a consumer, while `pred`
    /// holds, at most `max`. They are acknowledged here and handed back,
    /// for the caller to dead-letter or drop; what queues with a message
    /// TTL or a length limit need.
    pub async fn reap(&self, max: usize, pred: ReapPredicate) -> Result<Vec<StoredMessage>> {
        self.call(|reply| Cmd::Reap { max, pred, reply }).await?
    }

    /// Payload bytes of the messages neither acknowledged nor out with a
    /// consumer: what a byte-limited queue counts (RabbitMQ's
    /// `x-max-length-bytes` counts bodies only). It reads the backlog, so
    /// it costs what the backlog is long; such queues are kept short.
    pub async fn ready_bytes(&self) -> Result<u64> {
        self.call(Cmd::ReadyBytes).await?
    }

    /// Stops the dispatcher after writing the cursor; consumers see the end
    /// of their delivery stream.
    pub async fn close(&self) -> Result<()> {
        match self
            .call(|reply| Cmd::Close {
                delete: false,
                reply,
            })
            .await
        {
            Err(BrokerError::TopicUnavailable(_)) => Ok(()),
            r => r?,
        }
    }

    /// Stops the dispatcher and deletes the durable cursor.
    pub async fn delete(&self) -> Result<()> {
        self.call(|reply| Cmd::Close {
            delete: true,
            reply,
        })
        .await?
    }
}

/// A consumer attached to a subscription. Dropping it detaches it, and its
/// unacknowledged messages go to the other consumers.
pub struct Consumer {
    id: u64,
    sub_type: SubscriptionType,
    tx: mpsc::UnboundedSender<Cmd>,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("id", &self.id).finish()
    }
}

impl Consumer {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next message; `None` once the subscription has stopped (topic
    /// unloaded or deleted), after which the consumer should resubscribe.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// Grants `permits` more messages.
    pub fn flow(&self, permits: u64) {
        let _ = self.tx.send(Cmd::Flow(self.id, permits));
    }

    pub fn ack(&self, offset: u64) {
        self.ack_many(vec![offset]);
    }

    pub fn ack_many(&self, offsets: Vec<u64>) {
        let _ = self.tx.send(Cmd::Ack(self.id, offsets));
    }

    /// Acknowledges everything up to and including `offset`. Refused on
    /// shared subscriptions, where one consumer does not see every message.
    pub fn ack_cumulative(&self, offset: u64) -> Result<()> {
        if !self.sub_type.allows_cumulative_ack() {
            return Err(BrokerError::InvalidArgument(
                "cumulative acknowledgement is not allowed on shared subscriptions".into(),
            ));
        }
        let _ = self.tx.send(Cmd::AckCumulative(offset));
        Ok(())
    }

    /// Negative acknowledgement: redeliver after `delay`.
    pub fn nack(&self, offsets: Vec<u64>, delay: Duration) {
        let _ = self.tx.send(Cmd::Nack(self.id, offsets, delay));
    }

    /// A handle for flow and acknowledgements that can be kept apart from
    /// the receiving end, for front ends that receive in one task and
    /// acknowledge from another.
    pub fn control(&self) -> ConsumerControl {
        ConsumerControl {
            id: self.id,
            tx: self.tx.clone(),
        }
    }

    /// Pulls one message if the subscription has one ready now: the next
    /// message in dispatch order is sent to this consumer (and can be
    /// taken with [`Consumer::try_recv`]), or `false` means there is none.
    /// What AMQP's basic.get needs: an answer, not a wait.
    pub async fn get_one(&self) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        let gone = || BrokerError::TopicUnavailable("subscription stopped".into());
        self.tx.send(Cmd::Get(self.id, reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Flow and acknowledgements for one consumer, detached from its
/// receiving end; cheap to clone. It does not keep the consumer attached.
#[derive(Clone)]
pub struct ConsumerControl {
    id: u64,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for ConsumerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerControl")
            .field("id", &self.id)
            .finish()
    }
}

impl ConsumerControl {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn flow(&self, permits: u64) {
        let _ = self.tx.send(Cmd::Flow(self.id, permits));
    }

    pub fn ack(&self, offsets: Vec<u64>) {
        let _ = self.tx.send(Cmd::Ack(self.id, offsets));
    }

    /// Redeliver after `delay` (zero: at once, before newer messages).
    pub fn nack(&self, offsets: Vec<u64>, delay: Duration) {
        let _ = self.tx.send(Cmd::Nack(self.id, offsets, delay));
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::RemoveConsumer(self.id));
    }
}

struct Slot {
    id: u64,
    name: String,
    priority: i32,
    permits: u64,
    ack_timeout: Option<Duration>,
    tx: mpsc::UnboundedSender<Delivery>,
    /// Key-shared: messages at or past this offset wait until everything
    /// before it is acknowledged, so that keys moved to this consumer keep
    /// their order.
    hold_until: Option<u64>,
    unacked: u64,
    msg_out: u64,
}

struct Pending {
    consumer: u64,
    key_hash: u64,
    deadline: Option<Instant>,
}

struct Dispatcher {
    topic: String,
    name: String,
    log: PartitionLog,
    end: watch::Receiver<u64>,
    sub_type: SubscriptionType,
    dead_letter: Option<(DeadLetterPolicy, DeadLetterSink)>,
    priority: Option<MessagePriority>,
    cursor: CursorState,
    store: Option<CursorStore>,
    dirty: bool,
    persist_at: Option<Instant>,
    consumers: Vec<Slot>,
    next_consumer: u64,
    rr: usize,
    /// Index of the consumer that receives on exclusive and failover
    /// subscriptions.
    active: usize,
    /// Next offset to read from the log.
    read_pos: u64,
    /// Decoded messages from `read_pos` onwards, not yet delivered.
    buffer: VecDeque<StoredMessage>,
    pending: BTreeMap<u64, Pending>,
    /// Offsets to deliver again, with their key hash.
    replay: BTreeMap<u64, u64>,
    delayed: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    timeouts: BinaryHeap<Reverse<(Instant, u64)>>,
    md_tx: watch::Sender<u64>,
    tx: mpsc::WeakUnboundedSender<Cmd>,
    partition: u32,
    msg_out: u64,
    delivered: crate::metrics::Traffic,
    /// Stored entries that could not be decoded and were skipped.
    skipped_entries: u64,
}

fn key_hash(m: &Message) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    m.key.as_deref().unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Rendezvous weight of a consumer for a key: the heaviest wins, so a
/// consumer joining or leaving moves only its own share of keys.
fn weight(key_hash: u64, consumer: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key_hash.hash(&mut h);
    consumer.hash(&mut h);
    h.finish()
}

enum Flow {
    Continue,
    Stop,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            if let Err(e) = self.dispatch().await {
                tracing::warn!(topic = %self.topic, sub = %self.name, "dispatch: {e}");
                if matches!(
                    e,
                    BrokerError::TopicUnavailable(_) | BrokerError::NotOwner { .. }
                ) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let wait_data = self.total_permits() > 0
                && self.buffer.is_empty()
                && self.read_pos >= *self.end.borrow();
            let deadline = self.next_deadline();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        if let Flow::Stop = self.handle(cmd).await {
                            return;
                        }
                    }
                    None => break,
                },
                r = self.end.changed(), if wait_data => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_timer().await;
                }
            }
        }
        let _ = self.persist().await;
    }

    fn total_permits(&self) -> u64 {
        self.consumers.iter().map(|c| c.permits).sum()
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.delayed.peek().map(|Reverse((t, _, _))| *t),
            self.timeouts.peek().map(|Reverse((t, _))| *t),
            self.persist_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, off, kh))) = self.delayed.peek().copied() {
            if t > now {
                break;
            }
            self.delayed.pop();
            if !self.cursor.is_acked(off) {
                self.replay.insert(off, kh);
            }
        }
        while let Some(Reverse((t, off))) = self.timeouts.peek().copied() {
            if t > now {
                break;
            }
            self.timeouts.pop();
            let expired = self
                .pending
                .get(&off)
                .is_some_and(|p| p.deadline == Some(t));
            if expired {
                self.redeliver(off);
            }
        }
        if self.persist_at.is_some_and(|t| t <= now) {
            if let Err(e) = self.persist().await {
                tracing::warn!(topic = %self.topic, sub = %self.name, "writing cursor: {e}");
            }
        }
    }

    /// Takes a delivered message back from its consumer for redelivery.
    fn redeliver(&mut self, off: u64) {
        if let Some(p) = self.pending.remove(&off) {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == p.consumer) {
                c.unacked = c.unacked.saturating_sub(1);
            }
            self.cursor.bump_redelivery(off);
            self.replay.insert(off, p.key_hash);
        }
    }

    /// The messages of a stored entry. One that cannot be decoded (a
    /// batch damaged on disk, or one that would inflate past the cap) is
    /// skipped, as Pulsar skips non-recoverable entries: its offsets are
    /// acknowledged so that the subscription moves past it instead of
    /// retrying it forever, and it is logged and counted.
    fn decode_or_skip(&mut self, e: &Entry) -> Result<Vec<StoredMessage>> {
        match decode_entry(&e.data) {
            Ok(m) => Ok(m),
            Err(BrokerError::CorruptBatch(why)) => {
                tracing::warn!(
                    topic = %self.topic,
                    sub = %self.name,
                    "skipping offsets {}..{}: {why}",
                    e.base_offset,
                    e.end_offset()
                );
                self.skipped_entries += 1;
                for o in e.base_offset..e.end_offset() {
                    self.forget_pending(o);
                    self.replay.remove(&o);
                    self.cursor.ack(o);
                }
                self.mark_dirty();
                Ok(Vec::new())
            }
            Err(err) => Err(err),
        }
    }

    fn mark_dirty(&mut self) {
        self.md_tx.send_if_modified(|v| {
            let changed = *v != self.cursor.mark_delete;
            *v = self.cursor.mark_delete;
            changed
        });
        if self.store.is_some() {
            self.dirty = true;
            if self.persist_at.is_none() {
                self.persist_at = Some(Instant::now() + PERSIST_DELAY);
            }
        }
        // Key-shared holds end once everything before them is acknowledged.
        let md = self.cursor.mark_delete;
        for c in &mut self.consumers {
            if c.hold_until.is_some_and(|h| md >= h) {
                c.hold_until = None;
            }
        }
    }

    async fn persist(&mut self) -> Result<()> {
        self.persist_at = None;
        if !self.dirty {
            return Ok(());
        }
        let Some(store) = &mut self.store else {
            return Ok(());
        };
        let json = cursor_record(self.sub_type, self.priority.as_ref(), &self.cursor);
        match store
            .meta
            .compare_and_put(&store.key, store.version, json)
            .await
        {
            Ok(kv) => {
                store.version = kv.version;
                self.dirty = false;
                Ok(())
            }
            Err(MetaError::Conflict { .. }) => Err(BrokerError::NotOwner {
                topic: self.topic.clone(),
                owner: None,
            }),
            Err(e) => {
                self.persist_at = Some(Instant::now() + PERSIST_DELAY * 10);
                Err(e.into())
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) -> Flow {
        match cmd {
            Cmd::AddConsumer { opts, reply } => {
                let r = self.add_consumer(opts);
                let _ = reply.send(r);
            }
            Cmd::RemoveConsumer(id) => self.remove_consumer(id),
            Cmd::Flow(id, n) => {
                if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                    c.permits = c.permits.saturating_add(n);
                }
            }
            Cmd::Ack(id, offsets) => {
                for off in offsets {
                    self.ack_one(id, off);
                }
                self.mark_dirty();
            }
            Cmd::AckCumulative(off) => {
                if self.cursor.ack_cumulative(off) {
                    let acked: Vec<u64> = self.pending.range(..=off).map(|(&o, _)| o).collect();
                    for o in acked {
                        self.forget_pending(o);
                    }
                    self.replay = self.replay.split_off(&(off + 1));
                    self.buffer.retain(|m| m.offset > off);
                    self.read_pos = self.read_pos.max(off + 1);
                    self.mark_dirty();
                }
            }
            Cmd::Nack(id, offsets, delay) => {
                for off in offsets {
                    let mine = self.pending.get(&off).is_some_and(|p| p.consumer == id);
                    if !mine {
                        continue;
                    }
                    if delay.is_zero() {
                        self.redeliver(off);
                    } else if let Some(p) = self.pending.remove(&off) {
                        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                            c.unacked = c.unacked.saturating_sub(1);
                        }
                        self.cursor.bump_redelivery(off);
                        self.delayed
                            .push(Reverse((Instant::now() + delay, off, p.key_hash)));
                    }
                }
            }
            Cmd::Get(id, reply) => {
                let r = self.get_one(id).await;
                let _ = reply.send(r);
            }
            Cmd::Reap { max, pred, reply } => {
                let r = self.reap(max, pred).await;
                let _ = reply.send(r);
            }
            Cmd::ReadyBytes(reply) => {
                let mut total = 0u64;
                let r = self
                    .scan_ready(|m| {
                        total += m.message.value.as_ref().map_or(0, |v| v.len() as u64);
                        true
                    })
                    .await;
                let _ = reply.send(r.map(|()| total));
            }
            Cmd::Reset(to, reply) => {
                let target = match to {
                    ResetTo::Offset(o) => o.clamp(self.log.start_offset(), self.log.end_offset()),
                    ResetTo::Skip(n) => (self.cursor.mark_delete + n).min(self.log.end_offset()),
                    ResetTo::End => self.log.end_offset(),
                };
                self.cursor.reset(target);
                self.read_pos = target;
                self.buffer.clear();
                self.replay.clear();
                self.delayed.clear();
                self.timeouts.clear();
                self.pending.clear();
                for c in &mut self.consumers {
                    c.unacked = 0;
                }
                self.dirty = true;
                let r = self.persist().await;
                self.mark_dirty();
                let _ = reply.send(r);
            }
            Cmd::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Cmd::Close { delete, reply } => {
                let r = if delete {
                    match &self.store {
                        Some(s) => s.meta.delete(&s.key).await.map(drop).map_err(Into::into),
                        None => Ok(()),
                    }
                } else {
                    self.persist().await
                };
                let _ = reply.send(r);
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// One permit for one dispatch round; whatever was not used is taken
    /// back, so that the consumer holds no credit afterwards.
    async fn get_one(&mut self, id: u64) -> Result<bool> {
        let Some(i) = self.consumers.iter().position(|c| c.id == id) else {
            return Err(BrokerError::InvalidArgument(format!("no consumer {id}")));
        };
        let before = self.consumers[i].msg_out;
        self.consumers[i].permits = 1;
        let r = self.dispatch().await;
        let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) else {
            return Ok(false);
        };
        c.permits = 0;
        r?;
        Ok(c.msg_out > before)
    }

    /// Visits the ready messages from the head, oldest first, until `f`
    /// says stop.
    async fn scan_ready(&mut self, mut f: impl FnMut(StoredMessage) -> bool) -> Result<()> {
        let mut pos = self.cursor.mark_delete.max(self.log.start_offset());
        while pos < self.log.end_offset() {
            let entries = self.log.read(pos, READ_ENTRIES, READ_BYTES).await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                for m in self.decode_or_skip(&e)? {
                    if m.offset < pos
                        || self.cursor.is_acked(m.offset)
                        || self.pending.contains_key(&m.offset)
                    {
                        continue;
                    }
                    if !f(m) {
                        return Ok(());
                    }
                }
                pos = pos.max(e.end_offset());
            }
        }
        Ok(())
    }

    async fn reap(&mut self, max: usize, mut pred: ReapPredicate) -> Result<Vec<StoredMessage>> {
        let mut out = Vec::new();
        if max > 0 {
            self.scan_ready(|m| {
                if !pred(&m) {
                    return false;
                }
                out.push(m);
                out.len() < max
            })
            .await?;
        }
        if !out.is_empty() {
            for m in &out {
                self.replay.remove(&m.offset);
                self.cursor.ack(m.offset);
            }
            let taken: HashSet<u64> = out.iter().map(|m| m.offset).collect();
            self.buffer.retain(|m| !taken.contains(&m.offset));
            self.mark_dirty();
        }
        Ok(out)
    }

    fn forget_pending(&mut self, off: u64) {
        if let Some(p) = self.pending.remove(&off) {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == p.consumer) {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
    }

    fn ack_one(&mut self, _consumer: u64, off: u64) {
        self.forget_pending(off);
        self.replay.remove(&off);
        self.cursor.ack(off);
    }

    fn add_consumer(&mut self, opts: ConsumerOptions) -> Result<Consumer> {
        if self.sub_type == SubscriptionType::Exclusive && !self.consumers.is_empty() {
            return Err(BrokerError::ConsumerBusy(self.name.clone()));
        }
        let Some(tx) = self.tx.upgrade() else {
            return Err(BrokerError::TopicUnavailable(self.name.clone()));
        };
        let id = self.next_consumer;
        self.next_consumer += 1;
        let (dtx, drx) = mpsc::unbounded_channel();
        let hold_until = (self.sub_type == SubscriptionType::KeyShared
            && !self.consumers.is_empty()
            && self.read_pos > self.cursor.mark_delete)
            .then_some(self.read_pos);
        self.consumers.push(Slot {
            id,
            name: if opts.name.is_empty() {
                format!("consumer-{id}")
            } else {
                opts.name
            },
            priority: opts.priority,
            permits: 0,
            ack_timeout: opts.ack_timeout,
            tx: dtx,
            hold_until,
            unacked: 0,
            msg_out: 0,
        });
        self.elect_active();
        Ok(Consumer {
            id,
            sub_type: self.sub_type,
            tx,
            rx: drx,
        })
    }

    fn remove_consumer(&mut self, id: u64) {
        let Some(i) = self.consumers.iter().position(|c| c.id == id) else {
            return;
        };
        self.consumers.remove(i);
        self.elect_active();
        let theirs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.consumer == id)
            .map(|(&o, _)| o)
            .collect();
        for off in theirs {
            self.redeliver(off);
        }
    }

    /// The failover (or exclusive) consumer that receives: lowest
    /// priority, then name; partitions spread over equally ranked ones, as
    /// in Pulsar. Chosen when consumers come and go, not per message.
    fn elect_active(&mut self) {
        let mut order: Vec<usize> = (0..self.consumers.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&self.consumers[a], &self.consumers[b]);
            (a.priority, &a.name, a.id).cmp(&(b.priority, &b.name, b.id))
        });
        let Some(&first) = order.first() else {
            self.active = 0;
            return;
        };
        let best = self.consumers[first].priority;
        let tied = order
            .iter()
            .take_while(|&&i| self.consumers[i].priority == best)
            .count();
        self.active = order[self.partition as usize % tied];
    }

    /// Which consumer may take a message now, if any.
    fn pick(&mut self, offset: u64, kh: u64) -> Option<usize> {
        if self.consumers.is_empty() {
            return None;
        }
        match self.sub_type {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                let a = self.active;
                (self.consumers.get(a)?.permits > 0).then_some(a)
            }
            SubscriptionType::Shared => {
                let best = self
                    .consumers
                    .iter()
                    .filter(|c| c.permits > 0)
                    .map(|c| c.priority)
                    .min()?;
                let n = self.consumers.len();
                for k in 0..n {
                    let i = (self.rr + k) % n;
                    let c = &self.consumers[i];
                    if c.permits > 0 && c.priority == best {
                        self.rr = (i + 1) % n;
                        return Some(i);
                    }
                }
                None
            }
            SubscriptionType::KeyShared => {
                let (i, c) = self
                    .consumers
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, c)| (weight(kh, &c.name), c.id))?;
                let held = c.hold_until.is_some_and(|h| offset >= h);
                (c.permits > 0 && !held).then_some(i)
            }
        }
    }

    fn send(&mut self, i: usize, m: StoredMessage, kh: u64) {
        let count = self.cursor.redelivery_count(m.offset);
        let payload_len = m.message.value.as_ref().map_or(0, |v| v.len() as u64);
        let c = &mut self.consumers[i];
        let delivery = Delivery {
            offset: m.offset,
            redelivery_count: count,
            message: m.message,
        };
        if c.tx.send(delivery).is_err() {
            // The consumer is gone; its drop will remove it. Until then
            // the message waits for redelivery.
            c.permits = 0;
            self.replay.insert(m.offset, kh);
            return;
        }
        c.permits -= 1;
        c.unacked += 1;
        c.msg_out += 1;
        self.msg_out += 1;
        self.delivered.add(1, payload_len);
        let deadline = c.ack_timeout.map(|t| Instant::now() + t);
        if let Some(t) = deadline {
            self.timeouts.push(Reverse((t, m.offset)));
        }
        self.pending.insert(
            m.offset,
            Pending {
                consumer: c.id,
                key_hash: kh,
                deadline,
            },
        );
    }

    async fn dispatch(&mut self) -> Result<()> {
        while self.total_permits() > 0 {
            if self.serve_replay().await? {
                continue;
            }
            // Priority order needs the backlog read ahead, up to a window.
            if self.priority.is_some()
                && self.buffer.len() < PRIORITY_WINDOW
                && self.read_pos < self.log.end_offset()
                && self.replay.len() < MAX_BLOCKED
                && self.fill().await?
            {
                continue;
            }
            if self.buffer.is_empty() {
                if self.replay.len() >= MAX_BLOCKED || !self.fill().await? {
                    return Ok(());
                }
                continue;
            }
            let Some(front) = self.buffer.front() else {
                continue;
            };
            let (off, kh) = (front.offset, key_hash(&front.message));
            match self.pick(off, kh) {
                Some(i) => {
                    if let Some(m) = self.buffer.pop_front() {
                        self.send(i, m, kh);
                    }
                }
                None if self.sub_type == SubscriptionType::KeyShared => {
                    // Its consumer is busy; others may take later keys.
                    self.buffer.pop_front();
                    self.replay.insert(off, kh);
                    if self
                        .consumers
                        .iter()
                        .all(|c| c.permits == 0 || c.hold_until.is_some())
                    {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// Reads the next entries into the buffer; false when there are none.
    async fn fill(&mut self) -> Result<bool> {
        self.read_pos = self.read_pos.max(self.log.start_offset());
        if self.read_pos >= self.log.end_offset() {
            return Ok(false);
        }
        let entries = self
            .log
            .read(self.read_pos, READ_ENTRIES, READ_BYTES)
            .await?;
        if entries.is_empty() {
            return Ok(false);
        }
        for e in entries {
            for m in self.decode_or_skip(&e)? {
                if m.offset >= self.read_pos
                    && !self.cursor.is_acked(m.offset)
                    && !self.pending.contains_key(&m.offset)
                    && !self.replay.contains_key(&m.offset)
                {
                    self.enqueue(m);
                }
            }
            self.read_pos = self.read_pos.max(e.end_offset());
        }
        Ok(true)
    }

    /// Buffers a message read from the log: at the back, or with a
    /// priority, behind every message of its level or above.
    fn enqueue(&mut self, m: StoredMessage) {
        let Some(p) = &self.priority else {
            self.buffer.push_back(m);
            return;
        };
        let level = p.level(&m.message);
        let at = self
            .buffer
            .partition_point(|b| p.level(&b.message) >= level);
        self.buffer.insert(at, m);
    }

    /// Delivers replayable messages; true if it delivered or dropped any.
    async fn serve_replay(&mut self) -> Result<bool> {
        let ready: Vec<(u64, u64)> = self
            .replay
            .iter()
            .map(|(&o, &k)| (o, k))
            .filter(|&(o, k)| self.sub_type != SubscriptionType::KeyShared || self.peek_pick(o, k))
            .take(READ_ENTRIES)
            .collect();
        let Some(&(first, _)) = ready.first() else {
            return Ok(false);
        };
        if self.cursor.is_acked(first) {
            self.replay.remove(&first);
            return Ok(true);
        }
        let entries = self.log.read(first, 1, READ_BYTES).await?;
        let Some(entry) = entries.first() else {
            // Trimmed away or past the end; nothing to redeliver.
            self.replay.remove(&first);
            return Ok(true);
        };
        if entry.base_offset > first {
            // Retention removed it.
            let gone: Vec<u64> = self
                .replay
                .range(..entry.base_offset)
                .map(|(&o, _)| o)
                .collect();
            for o in gone {
                self.replay.remove(&o);
            }
            return Ok(true);
        }
        let mut progressed = false;
        let decoded = self.decode_or_skip(entry)?;
        // Offsets of this entry that hold no message (control records)
        // have nothing to redeliver.
        let real: HashSet<u64> = decoded.iter().map(|m| m.offset).collect();
        let stale: Vec<u64> = self
            .replay
            .range(entry.base_offset..entry.end_offset())
            .map(|(&o, _)| o)
            .filter(|o| !real.contains(o))
            .collect();
        for o in stale {
            self.replay.remove(&o);
            progressed = true;
        }
        for m in decoded {
            let Some(&kh) = self.replay.get(&m.offset) else {
                continue;
            };
            if self.cursor.is_acked(m.offset) {
                self.replay.remove(&m.offset);
                progressed = true;
                continue;
            }
            if let Some((policy, sink)) = &self.dead_letter {
                if self.cursor.redelivery_count(m.offset) > policy.max_redeliveries {
                    let topic = policy
                        .topic
                        .clone()
                        .unwrap_or_else(|| format!("{}-{}-DLQ", self.topic, self.name));
                    let msg = dead_letter_message(&self.topic, m.clone());
                    sink(topic, msg).await?;
                    self.replay.remove(&m.offset);
                    self.cursor.ack(m.offset);
                    self.mark_dirty();
                    progressed = true;
                    continue;
                }
            }
            let Some(i) = self.pick(m.offset, kh) else {
                continue;
            };
            self.replay.remove(&m.offset);
            self.send(i, m, kh);
            progressed = true;
        }
        Ok(progressed)
    }

    /// Whether `pick` would find a consumer, without moving round-robin.
    fn peek_pick(&self, offset: u64, kh: u64) -> bool {
        self.consumers
            .iter()
            .max_by_key(|c| (weight(kh, &c.name), c.id))
            .is_some_and(|c| c.permits > 0 && c.hold_until.is_none_or(|h| offset < h))
    }

    fn stats(&self) -> SubscriptionStats {
        let end = self.log.end_offset();
        let start = self.log.start_offset();
        let from = self.cursor.mark_delete.max(start);
        let acked_beyond: u64 = self
            .cursor
            .acked
            .iter()
            .map(|(s, e)| e.min(end).saturating_sub(s.max(from)))
            .sum();
        SubscriptionStats {
            sub_type: format!("{:?}", self.sub_type).replace("KeyShared", "Key_Shared"),
            msg_backlog: end.saturating_sub(from).saturating_sub(acked_beyond),
            unacked_messages: self.pending.len() as u64,
            msg_out_counter: self.msg_out,
            mark_delete_offset: self.cursor.mark_delete,
            read_offset: self.read_pos,
            is_durable: self.store.is_some(),
            skipped_entries: self.skipped_entries,
            consumers: self
                .consumers
                .iter()
                .map(|c| ConsumerStats {
                    consumer_name: c.name.clone(),
                    available_permits: c.permits,
                    unacked_messages: c.unacked,
                    msg_out_counter: c.msg_out,
                })
                .collect(),
        }
    }
}

/// The dead-lettered copy keeps the message and says where it came from,
/// with Pulsar's property names.
fn dead_letter_message(topic: &str, m: StoredMessage) -> Message {
    let mut msg = m.message;
    msg.headers
        .push(("REAL_TOPIC".into(), Some(topic.to_string().into())));
    msg.headers.push((
        "ORIGIN_MESSAGE_ID".into(),
        Some(m.offset.to_string().into()),
    ));
    msg
}

/// Hashes for key-shared routing of a message; exposed for tests.
pub fn message_key_hash(m: &Message) -> u64 {
    key_hash(m)
}

#[cfg(test)]
mod tests;
