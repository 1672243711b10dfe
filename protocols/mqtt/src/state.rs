//! A session's outgoing QoS 1 and 2 deliveries, without I/O: packet ids,
//! the client's Receive Maximum window and the QoS 2 handshake.

use std::collections::{BTreeMap, HashMap};

/// A delivery out with the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inflight {
    /// The queue it came from, and where.
    pub queue: String,
    pub offset: u64,
    pub qos: u8,
}

#[derive(Debug)]
struct Entry {
    inflight: Inflight,
    /// QoS 2: PUBREC came, PUBREL went; waiting for PUBCOMP.
    released: bool,
}

/// Packet ids in use and what they carry.
#[derive(Debug)]
pub struct Outbound {
    window: u16,
    next: u16,
    out: BTreeMap<u16, Entry>,
}

impl Outbound {
    /// `window`: the client's Receive Maximum (65535 when it sets none).
    pub fn new(window: u16) -> Self {
        Outbound {
            window: window.max(1),
            next: 1,
            out: BTreeMap::new(),
        }
    }

    pub fn window(&self) -> u16 {
        self.window
    }

    pub fn is_full(&self) -> bool {
        self.out.len() >= usize::from(self.window)
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Takes a packet id for `f`; None while the window is full.
    pub fn start(&mut self, f: Inflight) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        // Ids run round, skipping those still in use.
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX {
                1
            } else {
                self.next + 1
            };
            if let std::collections::btree_map::Entry::Vacant(slot) = self.out.entry(id) {
                slot.insert(Entry {
                    inflight: f,
                    released: false,
                });
                return Some(id);
            }
        }
    }

    /// PUBREC for `id`: true if a QoS 2 delivery waits for it (then
    /// PUBREL goes out).
    pub fn received(&mut self, id: u16) -> bool {
        match self.out.get_mut(&id) {
            Some(e) if e.inflight.qos == 2 => {
                e.released = true;
                true
            }
            _ => false,
        }
    }

    /// PUBACK (`complete` false) or PUBCOMP (true) for `id`: the delivery
    /// it finishes, if it finishes one.
    pub fn finish(&mut self, id: u16, complete: bool) -> Option<Inflight> {
        let fits = self.out.get(&id).is_some_and(|e| {
            if complete {
                e.inflight.qos == 2
            } else {
                e.inflight.qos == 1
            }
        });
        if !fits {
            return None;
        }
        self.out.remove(&id).map(|e| e.inflight)
    }
}

/// Topic aliases the server sets on its publishes (MQTT 5), up to the
/// client's Topic Alias Maximum. Aliases are never reassigned: once they
/// run out, further topics go out in full.
#[derive(Debug, Default)]
pub struct AliasesOut {
    max: u16,
    given: HashMap<String, u16>,
}

/// How a publish names its topic.
#[derive(Debug, PartialEq, Eq)]
pub enum TopicRef {
    /// The topic in full, no alias.
    Full,
    /// The topic in full, and the alias it sets.
    Set(u16),
    /// An empty topic and the alias that stands for it.
    Alias(u16),
}

impl AliasesOut {
    pub fn new(max: u16) -> Self {
        AliasesOut {
            max,
            given: HashMap::new(),
        }
    }

    pub fn name(&mut self, topic: &str) -> TopicRef {
        if let Some(&a) = self.given.get(topic) {
            return TopicRef::Alias(a);
        }
        let next = u16::try_from(self.given.len() + 1).unwrap_or(u16::MAX);
        if self.given.len() >= usize::from(self.max) {
            return TopicRef::Full;
        }
        self.given.insert(topic.to_owned(), next);
        TopicRef::Set(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_set_once_then_used_until_they_run_out() {
        let mut a = AliasesOut::new(2);
        assert_eq!(a.name("a"), TopicRef::Set(1));
        assert_eq!(a.name("a"), TopicRef::Alias(1));
        assert_eq!(a.name("b"), TopicRef::Set(2));
        assert_eq!(a.name("c"), TopicRef::Full);
        assert_eq!(a.name("b"), TopicRef::Alias(2));
        assert_eq!(AliasesOut::new(0).name("a"), TopicRef::Full);
    }

    fn f(offset: u64, qos: u8) -> Inflight {
        Inflight {
            queue: "q".into(),
            offset,
            qos,
        }
    }

    #[test]
    fn the_window_bounds_what_is_out() {
        let mut o = Outbound::new(2);
        assert_eq!(o.start(f(0, 1)), Some(1));
        assert_eq!(o.start(f(1, 1)), Some(2));
        assert!(o.is_full());
        assert_eq!(o.start(f(2, 1)), None);
        assert_eq!(o.finish(1, false), Some(f(0, 1)));
        assert_eq!(o.start(f(2, 1)), Some(3));
    }

    #[test]
    fn qos2_needs_pubrec_then_pubcomp() {
        let mut o = Outbound::new(10);
        let id = o.start(f(7, 2)).expect("id");
        // PUBACK does not finish a QoS 2 delivery.
        assert_eq!(o.finish(id, false), None);
        assert!(o.received(id));
        assert!(!o.received(999));
        assert_eq!(o.finish(id, true), Some(f(7, 2)));
        assert!(o.is_empty());
    }

    #[test]
    fn ids_wrap_and_skip_those_in_use() {
        let mut o = Outbound::new(u16::MAX);
        o.next = u16::MAX;
        assert_eq!(o.start(f(0, 1)), Some(u16::MAX));
        assert_eq!(o.start(f(1, 1)), Some(1));
        o.next = u16::MAX;
        assert_eq!(o.start(f(2, 1)), Some(2));
        assert_eq!(o.len(), 3);
    }
}
