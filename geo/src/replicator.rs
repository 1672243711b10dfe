//! One replicator: a partition this broker owns, copied to one remote
//! cluster. It reads the partition's stored batches from where the
//! remote's copy ends, sends them unchanged (compression, timestamps and
//! headers as stored) on one ordered stream with a window of batches in
//! flight, and moves its cursor `pulsar.repl.<remote>` over what the
//! remote has stored, so that the backlog stays here while the remote is
//! away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use magnetar_broker::format::{replicable_to, with_base_offset, BatchHeader, Replicable};
use magnetar_broker::replicated::is_replicated;
use magnetar_broker::subscription::{InitialPosition, SubscriptionOptions, SubscriptionType};
use magnetar_broker::topic::REPLICATOR_PREFIX;
use magnetar_broker::BrokerError;
use magnetar_tenancy::TopicName;
use tokio::sync::{mpsc, watch};
use tonic::metadata::MetadataValue;

use crate::error::{GeoError, Result};
use crate::proto::handshake_reply::Reply as Hs;
use crate::proto::replicate_reply::Reply as Rr;
use crate::proto::{HandshakeRequest, ReplicateRequest};
use crate::receiver::{SOURCE_HEADER, TOPIC_HEADER};
use crate::Ctx;

/// Offsets a replicator resends from its cursor, at most, rather than
/// starting at the remote's watermark.
const MAX_RESEND: u64 = 100_000;

/// How a session ended without an error.
enum Ended {
    /// Told to stop.
    Stop,
    /// The remote asked for a resend from its watermark; whether any
    /// batch was stored first.
    Resend { progressed: bool },
}

/// The cursor of the replicator to `remote`.
pub fn cursor_name(remote: &str) -> String {
    format!("{REPLICATOR_PREFIX}{remote}")
}

/// Runs until told to stop, reconnecting with backoff.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    topic: TopicName,
    remote: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut resends = 0u64;
    loop {
        match session(&ctx, &topic, &remote, &mut stop).await {
            Ok(Ended::Stop) => return,
            Ok(Ended::Resend { progressed }) => {
                // At once the first time; a remote still writing what it
                // took before gets a moment.
                resends = if progressed { 1 } else { resends + 1 };
                if resends > 1 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50 * resends.min(20))) => {}
                        _ = stop.changed() => return,
                    }
                }
                continue;
            }
            Err(e) => {
                let state = match &e {
                    GeoError::Refused { why, .. } => why
                        .split_once(':')
                        .map_or("refused", |(s, _)| s)
                        .trim()
                        .to_owned(),
                    GeoError::Remote { why, .. }
                        if why.contains("PermissionDenied") || why.contains("Unauthenticated") =>
                    {
                        "unauthorized".to_owned()
                    }
                    GeoError::Broker(BrokerError::NotOwner { .. }) => return,
                    _ => "error".to_owned(),
                };
                tracing::debug!(%topic, %remote, "replicator: {e}");
                ctx.stats.update(&topic, &remote, |s| {
                    s.state = state;
                    s.connected = false;
                    s.last_error = Some(e.to_string());
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(ctx.cfg.backoff_max);
    }
}

fn remote_err(cluster: &str, why: impl std::fmt::Display) -> GeoError {
    GeoError::Remote {
        cluster: cluster.to_owned(),
        why: why.to_string(),
    }
}

/// `replicatorDispatchRate`: at most so many records and bytes per
/// period; a batch that would go over waits for the next period (a batch
/// alone over the limit goes out on its own).
struct Throttle {
    rate: Option<magnetar_tenancy::DispatchRate>,
    period_start: Instant,
    records: u64,
    bytes: u64,
}

impl Throttle {
    fn new(rate: Option<magnetar_tenancy::DispatchRate>) -> Self {
        Throttle {
            rate: rate.filter(|r| {
                r.dispatch_throttling_rate_in_msg > 0 || r.dispatch_throttling_rate_in_byte > 0
            }),
            period_start: Instant::now(),
            records: 0,
            bytes: 0,
        }
    }

    /// How long to wait before sending `records` and `bytes` more.
    fn delay(&mut self, records: u64, bytes: u64) -> Option<Duration> {
        let r = self.rate.as_ref()?;
        let period = Duration::from_secs(u64::from(r.rate_period_in_second.max(1)));
        if self.period_start.elapsed() >= period {
            self.period_start = Instant::now();
            self.records = 0;
            self.bytes = 0;
        }
        let over =
            |limit: i64, used: u64, more: u64| limit > 0 && used > 0 && used + more > limit as u64;
        if over(r.dispatch_throttling_rate_in_msg, self.records, records)
            || over(r.dispatch_throttling_rate_in_byte, self.bytes, bytes)
        {
            return Some(period.saturating_sub(self.period_start.elapsed()));
        }
        self.records += records;
        self.bytes += bytes;
        None
    }
}

/// The replicator dispatch rate of the topic: its own, else its
/// namespace's.
async fn dispatch_rate(
    b: &magnetar_broker::Broker,
    topic: &TopicName,
) -> Result<Option<magnetar_tenancy::DispatchRate>> {
    if let Some(r) = b.topic_policies(topic).await?.replicator_dispatch_rate {
        return Ok(Some(r));
    }
    Ok(b.tenancy()
        .get_policies(topic.namespace())
        .await?
        .replicator_dispatch_rate)
}

/// A batch sent and not yet stored by the remote.
struct InFlight {
    end: u64,
    records: u64,
    bytes: u64,
    sent: Instant,
}

async fn session(
    ctx: &Arc<Ctx>,
    topic: &TopicName,
    remote_name: &str,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ended> {
    let Some(b) = ctx.broker.upgrade() else {
        return Ok(Ended::Stop);
    };
    let t = b.topic(topic, false).await?;
    let incarnation = t.incarnation()?;
    let partitions = match topic.partition_index() {
        Some(_) => b.partitions(&topic.base()).await?.unwrap_or(0),
        None => 0,
    };
    let sub = t
        .get_or_create_subscription(
            &cursor_name(remote_name),
            SubscriptionOptions {
                sub_type: SubscriptionType::Exclusive,
                initial_position: InitialPosition::Earliest,
                ..SubscriptionOptions::default()
            },
        )
        .await?;
    let remote = ctx.remote(&b, remote_name).await?;
    let mut throttle = Throttle::new(dispatch_rate(&b, topic).await?);
    drop(b);
    // What waits for the remote shows while it cannot be reached, too.
    let backlog = t.log().end_offset().saturating_sub(sub.mark_delete());
    ctx.stats.update(topic, remote_name, |s| {
        s.state = "connecting".into();
        s.replication_backlog = backlog;
    });

    // The handshake, following the remote's redirects to the owner.
    let mut url = remote.service_url()?;
    let mut next = None;
    for _ in 0..4 {
        let mut client = remote.client(&url)?;
        let mut req = tonic::Request::new(HandshakeRequest {
            source_cluster: ctx.cluster.clone(),
            topic: topic.to_string(),
            incarnation,
            partitions,
        });
        req.set_timeout(ctx.cfg.reply_timeout);
        let reply = client
            .handshake(req)
            .await
            .map_err(|e| {
                remote.drop_channel(&url);
                remote_err(remote_name, format!("{:?}: {}", e.code(), e.message()))
            })?
            .into_inner();
        match reply.reply {
            Some(Hs::Next(n)) => {
                next = Some(n);
                break;
            }
            Some(Hs::NotOwner(owner)) => url = owner,
            Some(Hs::Refused(why)) => {
                return Err(GeoError::Refused {
                    cluster: remote_name.to_owned(),
                    why,
                })
            }
            None => return Err(remote_err(remote_name, "an empty handshake reply")),
        }
    }
    let next = next.ok_or_else(|| remote_err(remote_name, "redirected too often"))?;

    let log = t.log().clone();
    // Sending resumes at the cursor, as an at-least-once replicator's
    // would: what the remote stored after the cursor last moved comes
    // again and is absorbed as duplicates, which shows that resends are
    // handled rather than avoided. A cursor far behind the remote (made
    // again, say) starts at the remote's watermark instead.
    let cursor = sub.mark_delete();
    // Only this replicator moves its cursor, but for message TTL and the
    // backlog quota's eviction: what they moved it over while the remote
    // was away is never sent, and is counted.
    ctx.stats.update(topic, remote_name, |s| {
        if let Some(own) = s.own_mark.filter(|&own| cursor > own) {
            s.replication_skipped += cursor - own;
        }
        s.own_mark = Some(cursor);
    });
    let start = if next > cursor.saturating_add(MAX_RESEND) {
        next
    } else {
        cursor
    }
    .max(log.start_offset());
    sub.expire_before(start);
    let (tx, rx) = mpsc::channel::<ReplicateRequest>(ctx.cfg.max_inflight_batches.max(1));
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let header = |v: &str| {
        MetadataValue::try_from(v).map_err(|_| remote_err(remote_name, "a name unfit for a header"))
    };
    req.metadata_mut()
        .insert(TOPIC_HEADER, header(&topic.to_string())?);
    req.metadata_mut()
        .insert(SOURCE_HEADER, header(&ctx.cluster)?);
    let mut client = remote.client(&url)?;
    let mut replies = client
        .replicate(req)
        .await
        .map_err(|e| {
            remote.drop_channel(&url);
            remote_err(remote_name, format!("{:?}: {}", e.code(), e.message()))
        })?
        .into_inner();
    ctx.stats.update(topic, remote_name, |s| {
        s.state = "running".into();
        s.connected = true;
        s.last_error = None;
        s.remote_watermark = next;
        s.outbound_connection = Some(url.clone());
    });

    let mut window = Window {
        inflight: VecDeque::new(),
        bytes: 0,
        progressed: false,
        ctx,
        topic,
        remote: remote_name,
    };
    // Resent batches chain from the cursor and end at the remote's
    // watermark; past it, the offsets up to the cursor held nothing to
    // send.
    let (mut read_pos, mut prev) = (start, start.min(next));
    let mut end_rx = log.watch_end();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        let room = window.has_room();
        // Open transactions are not read past: what they hold may still
        // be aborted.
        let readable = log.last_stable_offset();
        let entries = if room && readable > read_pos {
            log.read(read_pos, 1000, ctx.cfg.read_bytes).await?
        } else {
            Vec::new()
        };
        if !entries.is_empty() {
            for e in entries {
                let mut data = e.data;
                let mut off = e.base_offset;
                while !data.is_empty() {
                    let h = BatchHeader::parse(&data)?;
                    if h.size > data.len() {
                        return Err(BrokerError::CorruptBatch(format!(
                            "{topic} at {off}: a batch longer than its entry"
                        ))
                        .into());
                    }
                    let batch = data.split_to(h.size);
                    let (base, span) = (off, h.offset_count());
                    off = base + span;
                    if is_replicated(h.producer_id)
                        || h.is_control()
                        || (h.is_transactional() && aborted(&log, &h, base, off))
                    {
                        continue;
                    }
                    // Records whose own header keeps them from this remote
                    // are left out; the offsets they held count as ones
                    // with nothing to send.
                    let parts = match replicable_to(&batch, &h, remote_name)? {
                        Replicable::Whole => vec![with_base_offset(batch, base)],
                        Replicable::Nothing => {
                            let n = h.record_count.max(0) as u64;
                            ctx.stats
                                .update(topic, remote_name, |s| s.msg_filtered_counter += n);
                            continue;
                        }
                        Replicable::Runs(runs) => {
                            let kept: u64 = runs
                                .iter()
                                .filter_map(|r| BatchHeader::parse(r).ok())
                                .map(|r| r.record_count.max(0) as u64)
                                .sum();
                            let n = (h.record_count.max(0) as u64).saturating_sub(kept);
                            ctx.stats.update(topic, remote_name, |s| {
                                s.msg_filtered_counter += n;
                                s.split_batches += 1;
                            });
                            runs
                        }
                    };
                    for part in parts {
                        let ph = BatchHeader::parse(&part)?;
                        let part_base = u64::try_from(ph.base_offset).unwrap_or(base);
                        let end = part_base + ph.offset_count();
                        let bytes = part.len() as u64;
                        let records = ph.record_count.max(0) as u64;
                        while let Some(wait) = throttle.delay(records, bytes) {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = stop.changed() => return Ok(Ended::Stop),
                            }
                        }
                        let m = ReplicateRequest {
                            prev,
                            batch: part,
                            source_append_ms: u64::try_from(h.max_timestamp).unwrap_or(0),
                        };
                        if tx.send(m).await.is_err() {
                            return Err(remote_err(remote_name, "the stream closed"));
                        }
                        prev = end;
                        window.push(InFlight {
                            end,
                            records,
                            bytes,
                            sent: Instant::now(),
                        });
                    }
                }
                read_pos = e.base_offset + e.offsets;
            }
            if window.inflight.is_empty() {
                sub.expire_before(read_pos);
            }
            // Take the replies that are in without waiting.
            while let Some(r) = replies.message().now_or_never() {
                let r = r.map_err(|e| remote_err(remote_name, e))?;
                if let Some(ended) = window.settle(r, read_pos, &sub)? {
                    return Ok(ended);
                }
            }
            continue;
        }
        tokio::select! {
            r = replies.message() => {
                let r = r.map_err(|e| remote_err(remote_name, format!("{:?}: {}", e.code(), e.message())))?;
                if let Some(ended) = window.settle(r, read_pos, &sub)? {
                    return Ok(ended);
                }
            }
            changed = end_rx.changed(), if room => {
                if changed.is_err() {
                    return Err(BrokerError::TopicUnavailable(topic.to_string()).into());
                }
            }
            _ = stop.changed() => return Ok(Ended::Stop),
            _ = tick.tick() => {
                // A changed dispatch rate applies within ten seconds.
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    if let Some(b) = ctx.broker.upgrade() {
                        throttle.rate = Throttle::new(dispatch_rate(&b, topic).await?).rate;
                    }
                }
                // The transaction state moves without the end moving. A
                // remote that took a batch and never answered (its topic
                // moved while it was frozen, say) gets a new stream.
                if window.inflight.front().is_some_and(|f| f.sent.elapsed() > ctx.cfg.reply_timeout) {
                    remote.drop_channel(&url);
                    return Err(remote_err(remote_name, format!(
                        "no reply within {:?}", ctx.cfg.reply_timeout
                    )));
                }
            }
        }
        let backlog = log.end_offset().saturating_sub(sub.mark_delete());
        let delay = window
            .inflight
            .front()
            .map_or(0, |f| f.sent.elapsed().as_secs());
        let own = sub.mark_delete();
        ctx.stats.update(topic, remote_name, |s| {
            s.replication_backlog = backlog;
            s.replication_delay_in_seconds = delay;
            s.own_mark = Some(own);
        });
    }
}

/// Whether the transactional batch at `[base, end)` was aborted.
fn aborted(log: &magnetar_broker::log::PartitionLog, h: &BatchHeader, base: u64, end: u64) -> bool {
    log.aborted_between(base, end)
        .iter()
        .any(|a| a.producer_id == h.producer_id && a.first_offset <= base && base <= a.last_offset)
}

/// The batches sent and not yet stored by the remote, oldest first.
struct Window<'a> {
    inflight: VecDeque<InFlight>,
    bytes: u64,
    /// Whether the remote stored anything in this session.
    progressed: bool,
    ctx: &'a Ctx,
    topic: &'a TopicName,
    remote: &'a str,
}

impl Window<'_> {
    fn has_room(&self) -> bool {
        self.inflight.len() < self.ctx.cfg.max_inflight_batches
            && self.bytes < self.ctx.cfg.max_inflight_bytes
    }

    fn push(&mut self, f: InFlight) {
        self.bytes += f.bytes;
        self.inflight.push_back(f);
    }

    /// Takes one reply: the oldest batch in flight is stored (or was
    /// before), and the cursor moves over it and, with nothing else in
    /// flight, over what was read and filtered after it.
    fn settle(
        &mut self,
        r: Option<crate::proto::ReplicateReply>,
        read_pos: u64,
        sub: &magnetar_broker::subscription::Subscription,
    ) -> Result<Option<Ended>> {
        let Some(r) = r else {
            return Err(remote_err(self.remote, "the remote ended the stream"));
        };
        match r.reply {
            Some(Rr::StoredAt(_) | Rr::Duplicate(_)) => {
                let f = self
                    .inflight
                    .pop_front()
                    .ok_or_else(|| remote_err(self.remote, "a reply to nothing sent"))?;
                self.bytes -= f.bytes;
                self.progressed = true;
                self.ctx.stats.update(self.topic, self.remote, |s| {
                    s.msg_out_counter += f.records;
                    s.bytes_out_counter += f.bytes;
                });
                sub.expire_before(if self.inflight.is_empty() {
                    read_pos
                } else {
                    f.end
                });
                Ok(None)
            }
            Some(Rr::OutOfOrderNext(_)) => Ok(Some(Ended::Resend {
                progressed: self.progressed,
            })),
            Some(Rr::Error(why)) => Err(remote_err(self.remote, why)),
            None => Err(remote_err(self.remote, "an empty reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dispatch_rate_holds_batches_to_the_period() {
        let mut t = Throttle::new(Some(magnetar_tenancy::DispatchRate {
            dispatch_throttling_rate_in_msg: 100,
            dispatch_throttling_rate_in_byte: -1,
            rate_period_in_second: 1,
        }));
        assert_eq!(t.delay(60, 1), None);
        assert_eq!(t.delay(40, 1), None);
        assert!(t.delay(1, 1).is_some_and(|d| d <= Duration::from_secs(1)));
        // A batch over the limit on its own still goes, first in its period.
        let mut t = Throttle::new(Some(magnetar_tenancy::DispatchRate {
            dispatch_throttling_rate_in_msg: -1,
            dispatch_throttling_rate_in_byte: 10,
            rate_period_in_second: 1,
        }));
        assert_eq!(t.delay(1, 50), None);
        assert!(t.delay(1, 1).is_some());
        assert_eq!(Throttle::new(None).delay(1_000_000, 1 << 30), None);
    }
}
