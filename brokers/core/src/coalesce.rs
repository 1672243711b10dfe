//! Coalescing single-message publishes into record batches.
//!
//! Protocols whose clients publish one message at a time (AMQP, MQTT,
//! WebSocket) would otherwise cost one ledger entry, one bookie write and
//! one index update per message. A [`Coalescer`] queues a topic's messages
//! and appends whatever has gathered while earlier batches are still on
//! their way to the bookies as one entry: at low rates each message goes
//! out alone at once, and under load batches grow by themselves. Order is
//! kept, and each message learns its own offset once its batch is durable.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use magnetar_tenancy::TopicName;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::{BrokerError, Result};
use crate::format::{encode_messages, Message};
use crate::service::Broker;
use crate::topic::Published;

/// Batches in flight before the coalescer waits; while it waits, the next
/// batch gathers.
const MAX_IN_FLIGHT: usize = 1;
/// Bounds of one coalesced batch (by [`size_of`] for bytes); others that
/// gather messages into batches use them too.
pub const MAX_BATCH_MESSAGES: usize = 2000;
pub const MAX_BATCH_BYTES: usize = 1 << 20;

type Reply = oneshot::Sender<Result<u64>>;

/// A handle that publishes to one topic through a coalescing task; cheap
/// to clone. The task ends when every handle is dropped.
#[derive(Clone, Debug)]
pub struct Coalescer {
    tx: mpsc::UnboundedSender<(Message, Reply)>,
    topic: Arc<TopicName>,
}

impl Coalescer {
    pub(crate) fn start(broker: Broker, topic: TopicName) -> Coalescer {
        let (tx, rx) = mpsc::unbounded_channel();
        let topic = Arc::new(topic);
        tokio::spawn(run(broker, TopicName::clone(&topic), rx));
        Coalescer { tx, topic }
    }

    /// Queues a message in order with the handle's other messages; the
    /// future resolves to its offset once it is durable.
    pub fn publish(&self, message: Message) -> BoxFuture<'static, Result<u64>> {
        let span = crate::trace::publish_span(&self.topic, &message.headers);
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send((message, reply)).is_ok();
        async move {
            if !sent {
                return Err(BrokerError::ShuttingDown);
            }
            rx.await.map_err(|_| BrokerError::ShuttingDown)?
        }
        .instrument(span)
        .boxed()
    }
}

/// What a message counts for against [`MAX_BATCH_BYTES`].
pub fn size_of(m: &Message) -> usize {
    m.value.as_ref().map_or(0, |v| v.len())
        + m.key.as_ref().map_or(0, |k| k.len())
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>()
}

/// Every publish of a failed batch gets the error. A refusal the client
/// is told about by its protocol (a quota, a bad message) stays what it
/// is; anything else is a retriable unavailability.
fn fail(replies: Vec<Reply>, e: &BrokerError) {
    let each = || match e {
        BrokerError::QuotaExceeded(m) => BrokerError::QuotaExceeded(m.clone()),
        BrokerError::InvalidArgument(m) => BrokerError::InvalidArgument(m.clone()),
        BrokerError::AccessRefused(m) => BrokerError::AccessRefused(m.clone()),
        e => BrokerError::TopicUnavailable(e.to_string()),
    };
    for r in replies {
        let _ = r.send(Err(each()));
    }
}

async fn run(broker: Broker, topic: TopicName, mut rx: mpsc::UnboundedReceiver<(Message, Reply)>) {
    let mut in_flight: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
    while let Some(first) = rx.recv().await {
        let mut bytes = size_of(&first.0);
        let mut messages = vec![first.0];
        let mut replies = vec![first.1];
        while messages.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok((m, r)) => {
                    bytes += size_of(&m);
                    messages.push(m);
                    replies.push(r);
                }
                Err(_) => break,
            }
        }
        let batch = match encode_messages(&messages) {
            Ok(b) => b,
            Err(e) => {
                fail(replies, &e);
                continue;
            }
        };
        let pending = match broker.topic(&topic, true).await {
            Ok(t) => t.submit_batch(batch).await,
            // Served elsewhere: forwarded, one batch at a time.
            Err(BrokerError::NotOwner { .. }) => {
                let b = broker.clone();
                let t = topic.clone();
                Ok(async move { b.publish_batch(&t, batch).await }.boxed())
            }
            Err(e) => Err(e),
        };
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                fail(replies, &e);
                continue;
            }
        };
        in_flight.push_back(tokio::spawn(async move {
            match pending.await {
                Ok(Published::Stored(base)) => {
                    for (i, r) in replies.into_iter().enumerate() {
                        let _ = r.send(Ok(base + i as u64));
                    }
                }
                Ok(Published::Duplicate) => fail(
                    replies,
                    &BrokerError::TopicUnavailable("batch taken for a duplicate".into()),
                ),
                Err(e) => fail(replies, &e),
            }
        }));
        while in_flight.front().is_some_and(|h| h.is_finished()) {
            in_flight.pop_front();
        }
        if in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(h) = in_flight.pop_front() {
                let _ = h.await;
            }
        }
    }
}
