//! Durable cursors: how far a subscription has acknowledged.
//!
//! A cursor is a mark-delete offset (everything below it is acknowledged)
//! plus the ranges acknowledged individually beyond it, plus how often each
//! unacknowledged message has been redelivered. It is stored as JSON in the
//! metadata store under `/cursors/`, written by the topic's owner only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Disjoint half-open ranges `[start, end)` of offsets, merged on insert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Absorb every range that starts inside the new one.
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    pub fn contains(&self, x: u64) -> bool {
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| x < e)
    }

    /// Drops everything below `x`.
    pub fn remove_below(&mut self, x: u64) {
        let keep = self.ranges.split_off(&x);
        if let Some((_, &e)) = self.ranges.iter().next_back() {
            if e > x {
                let mut keep = keep;
                keep.insert(x, e);
                self.ranges = keep;
                return;
            }
        }
        self.ranges = keep;
    }

    /// The range starting exactly at `x`, removed.
    pub fn take_starting_at(&mut self, x: u64) -> Option<u64> {
        self.ranges.remove(&x)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Offsets covered.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

impl Serialize for RangeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.ranges.iter().map(|(&a, &b)| [a, b]))
    }
}

impl<'de> Deserialize<'de> for RangeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<[u64; 2]> = Vec::deserialize(d)?;
        let mut r = RangeSet::default();
        for [a, b] in v {
            r.insert(a, b);
        }
        Ok(r)
    }
}

/// Most individually acknowledged ranges a stored cursor keeps; beyond
/// that the highest ranges are dropped and their messages may be
/// delivered again, which at-least-once delivery allows.
pub const MAX_STORED_RANGES: usize = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    /// Every offset below is acknowledged.
    pub mark_delete: u64,
    /// Acknowledged offsets at or above `mark_delete`.
    #[serde(default)]
    pub acked: RangeSet,
    /// Deliveries beyond the first, per unacknowledged offset.
    #[serde(default)]
    pub redeliveries: BTreeMap<u64, u32>,
    #[serde(default)]
    pub created_ms: u64,
}

impl CursorState {
    pub fn new(start: u64, created_ms: u64) -> Self {
        CursorState {
            mark_delete: start,
            created_ms,
            ..CursorState::default()
        }
    }

    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.mark_delete || self.acked.contains(offset)
    }

    /// Acknowledges one offset; returns whether the mark-delete moved.
    pub fn ack(&mut self, offset: u64) -> bool {
        if self.is_acked(offset) {
            return false;
        }
        self.redeliveries.remove(&offset);
        self.acked.insert(offset, offset + 1);
        self.advance()
    }

    /// Acknowledges everything up to and including `offset`.
    pub fn ack_cumulative(&mut self, offset: u64) -> bool {
        if offset < self.mark_delete {
            return false;
        }
        self.mark_delete = offset + 1;
        self.acked.remove_below(self.mark_delete);
        self.redeliveries = self.redeliveries.split_off(&self.mark_delete);
        self.advance();
        true
    }

    fn advance(&mut self) -> bool {
        let before = self.mark_delete;
        while let Some(end) = self.acked.take_starting_at(self.mark_delete) {
            self.mark_delete = end;
        }
        self.mark_delete != before
    }

    /// Moves the cursor to `offset`, forgetting acknowledgements beyond
    /// it (reset-cursor and skip).
    pub fn reset(&mut self, offset: u64) {
        self.mark_delete = offset;
        self.acked = RangeSet::default();
        self.redeliveries.clear();
    }

    pub fn redelivery_count(&self, offset: u64) -> u32 {
        self.redeliveries.get(&offset).copied().unwrap_or(0)
    }

    pub fn bump_redelivery(&mut self, offset: u64) -> u32 {
        let c = self.redeliveries.entry(offset).or_insert(0);
        *c = c.saturating_add(1);
        *c
    }

    /// The state as stored, with the range list capped.
    pub fn for_storage(&self) -> CursorState {
        if self.acked.len() <= MAX_STORED_RANGES {
            return self.clone();
        }
        let mut acked = RangeSet::default();
        for (s, e) in self.acked.iter().take(MAX_STORED_RANGES) {
            acked.insert(s, e);
        }
        CursorState {
            acked,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_split() {
        let mut r = RangeSet::default();
        r.insert(5, 7);
        r.insert(10, 12);
        r.insert(7, 10);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 12)]);
        r.insert(1, 3);
        r.insert(2, 6);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(1, 12)]);
        r.insert(20, 30);
        r.remove_below(25);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(25, 30)]);
        assert!(r.contains(25) && r.contains(29) && !r.contains(30) && !r.contains(24));
        assert_eq!(r.count(), 5);
    }

    #[test]
    fn ranges_match_a_reference_set() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut r = RangeSet::default();
        let mut reference = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let s = next() % 500;
            let len = next() % 8;
            r.insert(s, s + len);
            reference.extend(s..s + len);
            if next() % 50 == 0 {
                let cut = next() % 500;
                r.remove_below(cut);
                reference = reference.split_off(&cut);
            }
        }
        for i in 0..520 {
            assert_eq!(r.contains(i), reference.contains(&i), "offset {i}");
        }
        assert_eq!(r.count(), reference.len() as u64);
        // Ranges stay disjoint and non-adjacent.
        let v: Vec<_> = r.iter().collect();
        assert!(v.windows(2).all(|w| w[0].1 < w[1].0));
    }

    #[test]
    fn individual_and_cumulative_acks() {
        let mut c = CursorState::new(0, 0);
        assert!(!c.ack(2));
        assert!(!c.ack(1));
        assert!(c.ack(0));
        assert_eq!(c.mark_delete, 3);
        c.ack(5);
        c.bump_redelivery(4);
        c.bump_redelivery(6);
        assert!(c.is_acked(5) && !c.is_acked(4));
        assert!(c.ack_cumulative(5));
        assert_eq!(c.mark_delete, 6);
        assert_eq!(c.redelivery_count(4), 0);
        assert_eq!(c.redelivery_count(6), 1);
        c.ack(7);
        c.ack(6);
        assert_eq!(c.mark_delete, 8);
        assert!(c.acked.is_empty());
        let json = serde_json::to_string(&c).expect("json");
        assert_eq!(serde_json::from_str::<CursorState>(&json).expect("back"), c);
    }
}
