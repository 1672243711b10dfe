//! Exactly-once appends of records replicated from another cluster.
//!
//! A source partition's log is immutable, so a range of its offsets names
//! the same records for good. The receiving partition keeps, per source
//! cluster, where the contiguous source range it has stored ends (its
//! watermark) and appends a batch only when the batch continues exactly
//! what was sent before it. A resend of a stored range is a duplicate;
//! anything that would leave a hole is refused, and the sender starts
//! again from the watermark. The guarantee rests on this alone, so it is
//! kept apart from I/O and tested against every interleaving of resends,
//! losses, reconnections and failed writes.
//!
//! The watermark survives in the log itself: every replicated batch is
//! stored with its source range in its producer fields ([`GeoStamp`]), in
//! a producer-id range no client can use, and unlike idempotent producers
//! these are never evicted.

use serde::{Deserialize, Serialize};

/// The 2^16 producer ids from here on, one per source cluster, mark
/// replicated records. Kafka's InitProducerId hands out ids far below;
/// named REST producers hash into `[2^62, 2^63)` but step around this
/// window; and a client's batch with one of them is refused.
pub const GEO_BASE: i64 = 1 << 62;

/// Source offsets a stamp can carry: 31 bits of base sequence under a
/// 15-bit epoch.
pub const MAX_SOURCE_OFFSET: u64 = 1 << 46;

/// Whether a batch's producer id marks it as replicated from elsewhere.
pub fn is_replicated(producer_id: i64) -> bool {
    producer_id & !0xffff == GEO_BASE
}

/// The producer fields of a replicated batch: which cluster it came from
/// (its `geoId` in this region's registry) and the source offset it
/// started at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeoStamp {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

impl GeoStamp {
    /// `None` past [`MAX_SOURCE_OFFSET`], which no partition reaches.
    pub fn new(geo_id: u16, base: u64) -> Option<GeoStamp> {
        if base >= MAX_SOURCE_OFFSET {
            return None;
        }
        Some(GeoStamp {
            producer_id: GEO_BASE | i64::from(geo_id),
            epoch: i16::try_from(base >> 31).ok()?,
            base_sequence: i32::try_from(base & 0x7fff_ffff).ok()?,
        })
    }

    /// The source cluster and base offset of a stored batch, if it was
    /// replicated.
    pub fn decode(producer_id: i64, epoch: i16, base_sequence: i32) -> Option<(u16, u64)> {
        if !is_replicated(producer_id) || epoch < 0 || base_sequence < 0 {
            return None;
        }
        let geo_id = u16::try_from(producer_id - GEO_BASE).ok()?;
        Some((geo_id, (epoch as u64) << 31 | base_sequence as u64))
    }
}

/// What the receiver answers to one replicated batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Store it; [`Watermark::stored`] or [`Watermark::failed`] follows.
    Append,
    /// Already stored: acknowledge without storing.
    Duplicate,
    /// It does not continue what was sent before (an earlier batch was
    /// lost or failed): start again from `next`.
    OutOfOrder { next: u64 },
    /// A range that no sender makes (empty, or before its predecessor).
    Invalid,
}

/// The receiver's state for one source cluster of one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// Every replicable source offset below this is stored, once.
    pub next: u64,
    /// Which life of the source topic the watermark belongs to (0: not
    /// known yet). A topic deleted and created again starts from offset 0,
    /// so its records cannot be judged against the old life's watermark.
    pub incarnation: u64,
    /// Where the batches accepted so far, stored or still being written,
    /// end: the next batch must continue from here.
    #[serde(skip)]
    pending_next: u64,
}

impl Watermark {
    pub fn new(incarnation: u64) -> Self {
        Watermark {
            incarnation,
            ..Watermark::default()
        }
    }

    /// A sender (re)connects for the source topic's `incarnation`: the
    /// offset to send from, or, for another life of the source topic than
    /// the one stored here, that life (nothing is dropped silently: the
    /// copy here has to go first). Appends still being written keep their
    /// place, so that a resend of one of them cannot be stored twice.
    pub fn handshake(&mut self, incarnation: u64) -> Result<u64, u64> {
        match self.incarnation {
            0 => self.incarnation = incarnation,
            known if known != incarnation => return Err(known),
            _ => {}
        }
        Ok(self.next)
    }

    /// Judges the batch covering source offsets `[base, base + span)`,
    /// sent after one that ended at `prev` (the offsets between are ones
    /// the sender found nothing to replicate in).
    pub fn offer(&mut self, prev: u64, base: u64, span: u64) -> Verdict {
        let Some(end) = base.checked_add(span).filter(|_| span > 0 && base >= prev) else {
            return Verdict::Invalid;
        };
        if end <= self.next {
            return Verdict::Duplicate;
        }
        // A watermark read back from the ledger's record has nothing
        // pending: its writes end where it does.
        if prev != self.pending_next.max(self.next) {
            return Verdict::OutOfOrder { next: self.next };
        }
        self.pending_next = end;
        Verdict::Append
    }

    /// A batch accepted by [`Self::offer`] and ending at `end` is durable.
    /// Writes become durable in order.
    pub fn stored(&mut self, end: u64) {
        self.next = self.next.max(end);
        self.pending_next = self.pending_next.max(self.next);
    }

    /// A write failed, and with it every later one (a log fails in order):
    /// the next batch must continue from what is durable.
    pub fn failed(&mut self) {
        self.pending_next = self.next;
    }

    /// Takes a replicated batch found in the log on recovery, ending at
    /// `end`.
    pub fn recovered(&mut self, end: u64) {
        self.stored(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn stamps_carry_the_source_range_and_its_cluster() {
        for (geo_id, base) in [(1, 0), (7, 1 << 31), (u16::MAX, MAX_SOURCE_OFFSET - 1)] {
            let s = GeoStamp::new(geo_id, base).expect("in range");
            assert!(is_replicated(s.producer_id));
            assert_eq!(
                GeoStamp::decode(s.producer_id, s.epoch, s.base_sequence),
                Some((geo_id, base))
            );
        }
        assert_eq!(GeoStamp::new(1, MAX_SOURCE_OFFSET), None);
        // A client's producer is not replicated, nor is a REST producer's
        // id just past the window.
        assert_eq!(GeoStamp::decode(42, 0, 0), None);
        assert!(!is_replicated(GEO_BASE + 0x1_0000));
        assert!(!is_replicated(GEO_BASE - 1));
    }

    #[test]
    fn a_resend_is_a_duplicate_and_a_hole_is_refused() {
        let mut w = Watermark::default();
        assert_eq!(w.handshake(1), Ok(0));
        assert_eq!(w.offer(0, 0, 10), Verdict::Append);
        w.stored(10);
        assert_eq!(w.offer(0, 0, 10), Verdict::Duplicate);
        // 10..20 lost on the way: 20..30 would leave a hole.
        assert_eq!(w.offer(20, 20, 10), Verdict::OutOfOrder { next: 10 });
        // A filtered range between two batches is no hole.
        assert_eq!(w.offer(10, 15, 5), Verdict::Append);
        assert_eq!(w.offer(10, 10, 0), Verdict::Invalid);
        assert_eq!(w.offer(20, 10, 5), Verdict::Invalid);
        // Another life of the source topic is refused, not mixed in.
        assert_eq!(w.handshake(2), Err(1));
        assert_eq!(w.handshake(1), Ok(10), "15..20 is still being written");
    }

    #[test]
    fn a_watermark_read_back_takes_what_continues_it() {
        let mut w = Watermark::default();
        assert_eq!(w.handshake(1), Ok(0));
        assert_eq!(w.offer(0, 0, 10), Verdict::Append);
        w.stored(10);
        let json = serde_json::to_string(&w).expect("json");
        let mut back: Watermark = serde_json::from_str(&json).expect("json");
        assert_eq!(back.handshake(1), Ok(10));
        assert_eq!(back.offer(0, 0, 10), Verdict::Duplicate);
        assert_eq!(back.offer(10, 12, 3), Verdict::Append);
    }

    /// One step of a sender, a stream that may lose messages, and a
    /// receiver whose writes may fail.
    #[derive(Clone, Debug)]
    enum Step {
        /// Send the next `n` batches of the sender's window.
        Send(usize),
        /// Lose the next `n` messages sent.
        Lose(usize),
        /// The oldest write in progress becomes durable.
        Complete,
        /// The oldest write in progress fails, and every later one.
        Fail,
        /// The sender reconnects and starts again from the watermark.
        Reconnect,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1usize..4).prop_map(Step::Send),
            1 => (1usize..3).prop_map(Step::Lose),
            4 => Just(Step::Complete),
            1 => Just(Step::Fail),
            1 => Just(Step::Reconnect),
        ]
    }

    /// Source batches `(base, span)` in order, with filtered holes between.
    fn source() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0u64..3, 1u64..5), 1..30).prop_map(|v| {
            let mut at = 0;
            v.into_iter()
                .map(|(hole, span)| {
                    let b = at + hole;
                    at = b + span;
                    (b, span)
                })
                .collect()
        })
    }

    struct World {
        batches: Vec<(u64, u64)>,
        w: Watermark,
        /// Bases stored durably, in order.
        log: Vec<u64>,
        /// Writes in progress: (base, end).
        writing: VecDeque<(u64, u64)>,
        /// The sender: the next batch to send, and where the last sent
        /// one ended.
        cursor: usize,
        prev: u64,
        lose: usize,
    }

    impl World {
        fn reconnect(&mut self) {
            let next = self.w.handshake(1).expect("the same life");
            self.prev = next;
            self.cursor = self.batches.partition_point(|&(b, s)| b + s <= next);
        }

        fn send(&mut self, n: usize) {
            for _ in 0..n {
                let Some(&(base, span)) = self.batches.get(self.cursor) else {
                    return;
                };
                let prev = self.prev;
                self.cursor += 1;
                self.prev = base + span;
                if self.lose > 0 {
                    self.lose -= 1;
                    continue;
                }
                match self.w.offer(prev, base, span) {
                    Verdict::Append => self.writing.push_back((base, base + span)),
                    Verdict::Duplicate => {}
                    Verdict::OutOfOrder { .. } => {
                        // The sender learns it and starts again.
                        self.reconnect();
                        return;
                    }
                    Verdict::Invalid => panic!("the sender made an invalid range"),
                }
            }
        }

        fn complete(&mut self) {
            if let Some((base, end)) = self.writing.pop_front() {
                self.log.push(base);
                self.w.stored(end);
            }
        }

        fn fail(&mut self) {
            if !self.writing.is_empty() {
                self.writing.clear();
                self.w.failed();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_batch_is_stored_once_and_in_order(
            batches in source(),
            steps in proptest::collection::vec(step(), 0..80),
        ) {
            let mut world = World {
                batches: batches.clone(),
                w: Watermark::new(1),
                log: Vec::new(),
                writing: VecDeque::new(),
                cursor: 0,
                prev: 0,
                lose: 0,
            };
            world.reconnect();
            for s in steps {
                match s {
                    Step::Send(n) => world.send(n),
                    Step::Lose(n) => world.lose += n,
                    Step::Complete => world.complete(),
                    Step::Fail => world.fail(),
                    Step::Reconnect => world.reconnect(),
                }
                // Never twice, never out of order, never a hole.
                let expect: Vec<u64> = batches.iter().take(world.log.len()).map(|b| b.0).collect();
                prop_assert_eq!(&world.log, &expect);
            }
            // Then the link heals: what is in progress finishes, and the
            // sender goes on until everything is stored.
            world.lose = 0;
            while !world.writing.is_empty() {
                world.complete();
            }
            world.reconnect();
            for _ in 0..=batches.len() {
                world.send(batches.len());
                while !world.writing.is_empty() {
                    world.complete();
                }
            }
            let all: Vec<u64> = batches.iter().map(|b| b.0).collect();
            prop_assert_eq!(world.log, all);
            let (b, s) = batches[batches.len() - 1];
            prop_assert_eq!(world.w.next, b + s);
        }
    }
}
