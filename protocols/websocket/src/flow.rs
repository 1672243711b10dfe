//! Flow control of one consumer or reader connection, with no I/O: which
//! received message may go out to the client now, and how many more
//! messages to ask of each topic's subscription.
//!
//! Pulsar's handler counts messages out and not acknowledged, and stops
//! receiving at `receiverQueueSize`; in pull mode it sends only against
//! the client's permits. Here each topic's subscription is granted credit
//! for what the connection may hold, and messages that arrive while the
//! client is at its limit wait in `held` (at most the credit granted).
//!
//! In pull mode a client may ask for any number of messages at once;
//! each topic is granted at most `receiverQueueSize` of them ahead of
//! delivery, and more as they go out, so that a huge `permit` does not
//! pull a backlog into memory.

use std::collections::{HashSet, VecDeque};

use crate::request::FlowParams;

/// A message out to the client: the index of its topic and its offset.
pub type Key = (usize, u64);

/// Credit to grant: `(topic index, messages)`.
pub type Grant = (usize, u64);

#[derive(Debug)]
pub struct Flow<T> {
    params: FlowParams,
    /// Out to the client and not acknowledged.
    outstanding: HashSet<Key>,
    /// Pull mode: messages the client asked for and has not had.
    permits: u64,
    /// Pull mode, per topic: credit granted and not yet used, and
    /// messages received and waiting in `held`.
    granted: Vec<u64>,
    held_per: Vec<u64>,
    held: VecDeque<(Key, T)>,
}

impl<T> Flow<T> {
    pub fn new(params: FlowParams) -> Self {
        Flow {
            params,
            outstanding: HashSet::new(),
            permits: 0,
            granted: Vec::new(),
            held_per: Vec::new(),
            held: VecDeque::new(),
        }
    }

    /// Credit for a topic joining the connection.
    pub fn added_topic(&self, topic: usize) -> Option<Grant> {
        (!self.params.pull_mode).then_some((topic, u64::from(self.params.receiver_queue_size)))
    }

    /// A message from a subscription. A message already out (redelivered
    /// after an ack timeout) used credit for a message the client holds
    /// already, so that credit is given back.
    pub fn received(&mut self, key: Key, item: T) -> Option<Grant> {
        let again = self.outstanding.contains(&key);
        if self.params.pull_mode {
            let t = key.0;
            self.grow(t + 1);
            self.granted[t] = self.granted[t].saturating_sub(1);
            self.held_per[t] += 1;
        }
        self.held.push_back((key, item));
        (again && !self.params.pull_mode).then_some((key.0, 1))
    }

    /// The next message the client may have now, counted as out.
    pub fn next_out(&mut self) -> Option<(Key, T)> {
        let (key, _) = self.held.front()?;
        let open = if self.params.pull_mode {
            self.permits > 0
        } else {
            self.outstanding.contains(key)
                || self.outstanding.len() < self.params.receiver_queue_size as usize
        };
        if !open {
            return None;
        }
        let (key, item) = self.held.pop_front()?;
        if self.params.pull_mode {
            self.permits -= 1;
            if let Some(h) = self.held_per.get_mut(key.0) {
                *h = h.saturating_sub(1);
            }
        }
        self.outstanding.insert(key);
        Some((key, item))
    }

    /// An ack or negative ack of a message out. Unknown keys (acked twice,
    /// never sent) earn no credit.
    pub fn settled(&mut self, key: Key) -> Option<Grant> {
        let was_out = self.outstanding.remove(&key);
        (was_out && !self.params.pull_mode).then_some((key.0, 1))
    }

    /// A reader's ack: Pulsar's reader counts any frame as one message
    /// settled, whatever id it names, so one message out is (this one if
    /// it is out).
    pub fn settled_any(&mut self, key: Option<Key>) -> Option<Grant> {
        let key = key
            .filter(|k| self.outstanding.contains(k))
            .or_else(|| self.outstanding.iter().next().copied())?;
        self.settled(key)
    }

    /// A `permit` command: in pull mode, `n` more messages the client may
    /// have, and the credit that asks every topic for them.
    pub fn permit(&mut self, n: u64, topics: usize) -> Vec<Grant> {
        if !self.params.pull_mode || n == 0 {
            return Vec::new();
        }
        self.permits = self.permits.saturating_add(n);
        self.refill(topics)
    }

    /// Pull mode: credit that brings each topic back to what the client
    /// still asks for, at most the queue size ahead (counting what it has
    /// waiting in `held`); what one topic does not use waits there. Call
    /// after messages went out.
    pub fn refill(&mut self, topics: usize) -> Vec<Grant> {
        if !self.params.pull_mode {
            return Vec::new();
        }
        self.grow(topics);
        let target = self
            .permits
            .min(u64::from(self.params.receiver_queue_size.max(1)));
        let mut grants = Vec::new();
        for t in 0..topics {
            let have = self.granted[t] + self.held_per[t];
            if have < target {
                self.granted[t] += target - have;
                grants.push((t, target - have));
            }
        }
        grants
    }

    fn grow(&mut self, topics: usize) {
        if self.granted.len() < topics {
            self.granted.resize(topics, 0);
            self.held_per.resize(topics, 0);
        }
    }

    /// Messages received and not yet out to the client.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push(q: u32) -> Flow<()> {
        Flow::new(FlowParams {
            receiver_queue_size: q,
            pull_mode: false,
        })
    }

    #[test]
    fn push_mode_holds_at_the_queue_size() {
        let mut f = push(2);
        assert_eq!(f.added_topic(0), Some((0, 2)));
        for o in 0..3 {
            assert_eq!(f.received((0, o), ()), None);
        }
        assert_eq!(f.next_out().map(|(k, ())| k), Some((0, 0)));
        assert_eq!(f.next_out().map(|(k, ())| k), Some((0, 1)));
        assert!(f.next_out().is_none(), "two out, queue size two");
        assert_eq!(f.settled((0, 0)), Some((0, 1)));
        assert_eq!(f.settled((0, 0)), None, "a second ack earns nothing");
        assert_eq!(f.next_out().map(|(k, ())| k), Some((0, 2)));
    }

    #[test]
    fn a_redelivery_of_a_message_out_gives_its_credit_back() {
        let mut f = push(1);
        f.received((0, 5), ());
        assert!(f.next_out().is_some());
        // Ack timeout: the same message again, while it is still out.
        assert_eq!(f.received((0, 5), ()), Some((0, 1)));
        assert_eq!(f.next_out().map(|(k, ())| k), Some((0, 5)));
        assert_eq!(f.outstanding(), 1);
    }

    #[test]
    fn pull_mode_sends_only_against_permits() {
        let mut f: Flow<()> = Flow::new(FlowParams {
            receiver_queue_size: 1000,
            pull_mode: true,
        });
        assert_eq!(f.added_topic(0), None);
        assert_eq!(f.permit(2, 2), vec![(0, 2), (1, 2)]);
        for o in 0..3 {
            f.received((o as usize % 2, o), ());
        }
        assert!(f.next_out().is_some());
        assert!(f.next_out().is_some());
        assert!(f.next_out().is_none());
        assert_eq!(f.settled((0, 0)), None, "acks grant nothing in pull mode");
        f.permit(1, 2);
        assert!(f.next_out().is_some());
    }

    #[test]
    fn a_huge_permit_asks_each_topic_for_the_queue_size_at_a_time() {
        let mut f: Flow<()> = Flow::new(FlowParams {
            receiver_queue_size: 10,
            pull_mode: true,
        });
        assert_eq!(f.permit(1_000_000, 2), vec![(0, 10), (1, 10)]);
        for o in 0..10 {
            f.received((0, o), ());
        }
        // Nothing more is asked while ten wait.
        assert_eq!(f.refill(2), vec![]);
        for _ in 0..4 {
            assert!(f.next_out().is_some());
        }
        assert_eq!(f.refill(2), vec![(0, 4)]);
        // Near the end of the permits, no more than they cover.
        let mut f: Flow<()> = Flow::new(FlowParams {
            receiver_queue_size: 10,
            pull_mode: true,
        });
        assert_eq!(f.permit(3, 1), vec![(0, 3)]);
        for o in 0..3 {
            f.received((0, o), ());
            assert!(f.next_out().is_some());
        }
        assert_eq!(f.refill(1), vec![]);
        assert!(f.permit(u64::MAX, 1) == vec![(0, 10)]);
    }

    proptest! {
        /// Pull mode: whatever permits the client sends and however the
        /// subscriptions deliver, no more wait than the topics times the
        /// queue size, and every message asked for is eventually out.
        #[test]
        fn pull_mode_holds_at_most_the_queue_size_per_topic(
            q in 1u32..8,
            topics in 1usize..4,
            ops in proptest::collection::vec((0u8..3, 0u64..50), 0..300),
        ) {
            let mut f: Flow<()> = Flow::new(FlowParams { receiver_queue_size: q, pull_mode: true });
            let mut credit = vec![0u64; topics];
            let mut next = 0u64;
            let mut asked = 0u64;
            let mut out = 0u64;
            for (op, n) in ops {
                match op {
                    0 => {
                        asked = asked.saturating_add(n);
                        for (t, c) in f.permit(n, topics) {
                            credit[t] += c;
                        }
                    }
                    1 => {
                        let t = (n as usize) % topics;
                        if credit[t] > 0 {
                            credit[t] -= 1;
                            f.received((t, next), ());
                            next += 1;
                        }
                    }
                    _ => {
                        while f.next_out().is_some() {
                            out += 1;
                        }
                        for (t, c) in f.refill(topics) {
                            credit[t] += c;
                        }
                    }
                }
                prop_assert!(f.held() <= topics * q as usize);
                prop_assert!(out <= asked);
            }
            // Subscriptions that always have more: everything asked for
            // goes out.
            loop {
                let mut moved = false;
                for (t, c) in credit.iter_mut().enumerate() {
                    while *c > 0 {
                        *c -= 1;
                        f.received((t, next), ());
                        next += 1;
                        moved = true;
                    }
                }
                while f.next_out().is_some() {
                    out += 1;
                    moved = true;
                }
                for (t, c) in f.refill(topics) {
                    credit[t] += c;
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
            prop_assert_eq!(out, asked);
        }

        /// Whatever the client does, no more than the queue size are out.
        #[test]
        fn never_more_out_than_the_queue_size(q in 1u32..8, ops in proptest::collection::vec(0u8..4, 0..200)) {
            let mut f = push(q);
            let mut credit = u64::from(q);
            let mut next_offset = 0u64;
            let mut out: Vec<u64> = Vec::new();
            for op in ops {
                match op {
                    0 if credit > 0 => {
                        credit -= 1;
                        f.received((0, next_offset), ());
                        next_offset += 1;
                    }
                    1 => {
                        if let Some(((_, o), ())) = f.next_out() {
                            out.push(o);
                        }
                    }
                    2 if !out.is_empty() => {
                        let o = out.remove(0);
                        if let Some((_, n)) = f.settled((0, o)) {
                            credit += n;
                        }
                    }
                    _ => {}
                }
                prop_assert!(f.outstanding() <= q as usize);
            }
        }
    }
}
