//! The replicated key-value state: what every node computes, identically, by
//! applying the same commands in log order. Nothing here reads a clock or does
//! I/O, so the result depends on the command sequence alone.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A stored key and its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// The revision of the last change to this key; the CAS version.
    pub version: u64,
    pub create_revision: u64,
    /// Owning session, or 0 for a persistent key.
    pub session: u64,
}

/// A state change, as the log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        key: String,
        value: Bytes,
        expected_version: Option<u64>,
        session: u64,
    },
    Delete {
        key: String,
        expected_version: Option<u64>,
    },
    GrantSession {
        ttl_ms: u64,
    },
    RevokeSession {
        session: u64,
    },
}

/// The outcome of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResult {
    /// For log entries that carry no command (blank and membership entries).
    #[default]
    Noop,
    Put {
        succeeded: bool,
        kv: Option<KeyValue>,
        revision: u64,
    },
    Delete {
        succeeded: bool,
        kv: Option<KeyValue>,
        revision: u64,
    },
    SessionGranted {
        session: u64,
        ttl_ms: u64,
    },
    SessionRevoked {
        existed: bool,
    },
    SessionNotFound {
        session: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub ttl_ms: u64,
    pub keys: BTreeSet<String>,
}

/// The part of the state that snapshots carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateData {
    pub kvs: BTreeMap<String, KeyValue>,
    pub sessions: BTreeMap<u64, SessionInfo>,
    pub next_session: u64,
    pub revision: u64,
}

/// Recent events kept for watchers that resume from a past revision. Bounded
/// both by count and by bytes so that large values cannot pin memory.
#[derive(Debug)]
pub struct History {
    events: VecDeque<Event>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Every event with a revision <= this one has been dropped.
    compacted: u64,
}

impl History {
    pub fn new(max_events: usize, max_bytes: usize, compacted: u64) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            max_events,
            max_bytes,
            compacted,
        }
    }

    fn push(&mut self, ev: Event) {
        self.bytes += event_size(&ev);
        self.events.push_back(ev);
        while self.events.len() > self.max_events || self.bytes > self.max_bytes {
            match self.events.pop_front() {
                Some(old) => {
                    self.bytes -= event_size(&old);
                    self.compacted = old.revision;
                }
                None => break,
            }
        }
    }

    /// Events with revision >= `from` whose key starts with `prefix`, or
    /// `Err(oldest_available)` when some of them were already dropped.
    pub fn since(&self, from: u64, prefix: &str) -> Result<Vec<Event>, u64> {
        if from <= self.compacted {
            return Err(self.compacted + 1);
        }
        let start = self.events.partition_point(|e| e.revision < from);
        Ok(self
            .events
            .range(start..)
            .filter(|e| e.kv.key.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// Whether a write conditioned on `expected` (0: absent) may proceed.
fn version_matches(current: Option<&KeyValue>, expected: Option<u64>) -> bool {
    expected.is_none_or(|e| e == current.map_or(0, |kv| kv.version))
}

fn event_size(ev: &Event) -> usize {
    ev.kv.key.len() + ev.kv.value.len() + 64
}

/// The key-value state machine proper.
#[derive(Debug)]
pub struct KvState {
    pub data: StateData,
    pub history: History,
}

pub const HISTORY_EVENTS: usize = 100_000;
pub const HISTORY_BYTES: usize = 64 << 20;

impl Default for KvState {
    fn default() -> Self {
        Self::from_data(StateData::default())
    }
}

impl KvState {
    /// A state restored from a snapshot. Events before the snapshot are not
    /// known here, so the history starts at its revision.
    pub fn from_data(data: StateData) -> Self {
        let compacted = data.revision;
        Self {
            data,
            history: History::new(HISTORY_EVENTS, HISTORY_BYTES, compacted),
        }
    }

    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.data.kvs.get(key)
    }

    pub fn revision(&self) -> u64 {
        self.data.revision
    }

    /// Keys with `prefix` strictly after `start_after`, at most `limit`;
    /// the flag says whether more remain.
    pub fn list(&self, prefix: &str, start_after: &str, limit: usize) -> (Vec<KeyValue>, bool) {
        use std::ops::Bound;
        let lower = if start_after.is_empty() || start_after < prefix {
            Bound::Included(prefix.to_string())
        } else {
            Bound::Excluded(start_after.to_string())
        };
        let mut out = Vec::new();
        let mut more = false;
        for (k, kv) in self.data.kvs.range((lower, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(kv.clone());
        }
        (out, more)
    }

    /// Applies one command, appending the events it causes to `events`.
    pub fn apply(&mut self, cmd: Command, events: &mut Vec<Event>) -> CommandResult {
        match cmd {
            Command::Put {
                key,
                value,
                expected_version,
                session,
            } => self.put(key, value, expected_version, session, events),
            Command::Delete {
                key,
                expected_version,
            } => self.delete(&key, expected_version, events),
            Command::GrantSession { ttl_ms } => {
                self.data.next_session += 1;
                let id = self.data.next_session;
                self.data.sessions.insert(
                    id,
                    SessionInfo {
                        ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                CommandResult::SessionGranted {
                    session: id,
                    ttl_ms,
                }
            }
            Command::RevokeSession { session } => match self.data.sessions.remove(&session) {
                None => CommandResult::SessionRevoked { existed: false },
                Some(info) => {
                    for key in info.keys {
                        // The session's own key set only holds keys it owns.
                        if let Some(kv) = self.data.kvs.remove(&key) {
                            self.record_delete(kv, events);
                        }
                    }
                    CommandResult::SessionRevoked { existed: true }
                }
            },
        }
    }

    fn put(
        &mut self,
        key: String,
        value: Bytes,
        expected_version: Option<u64>,
        session: u64,
        events: &mut Vec<Event>,
    ) -> CommandResult {
        if session != 0 && !self.data.sessions.contains_key(&session) {
            return CommandResult::SessionNotFound { session };
        }
        let current = self.data.kvs.get(&key);
        if !version_matches(current, expected_version) {
            return CommandResult::Put {
                succeeded: false,
                kv: current.cloned(),
                revision: self.data.revision,
            };
        }
        self.data.revision += 1;
        let revision = self.data.revision;
        let (create_revision, old_session) =
            current.map_or((revision, 0), |kv| (kv.create_revision, kv.session));
        if old_session != session {
            if let Some(s) = self.data.sessions.get_mut(&old_session) {
                s.keys.remove(&key);
            }
            if let Some(s) = self.data.sessions.get_mut(&session) {
                s.keys.insert(key.clone());
            }
        }
        let kv = KeyValue {
            key: key.clone(),
            value,
            version: revision,
            create_revision,
            session,
        };
        self.data.kvs.insert(key, kv.clone());
        self.record(
            Event {
                kind: EventKind::Put,
                kv: kv.clone(),
                revision,
            },
            events,
        );
        CommandResult::Put {
            succeeded: true,
            kv: Some(kv),
            revision,
        }
    }

    fn delete(
        &mut self,
        key: &str,
        expected_version: Option<u64>,
        events: &mut Vec<Event>,
    ) -> CommandResult {
        let current = self.data.kvs.get(key);
        if !version_matches(current, expected_version) {
            return CommandResult::Delete {
                succeeded: false,
                kv: current.cloned(),
                revision: self.data.revision,
            };
        }
        match self.data.kvs.remove(key) {
            None => CommandResult::Delete {
                succeeded: true,
                kv: None,
                revision: self.data.revision,
            },
            Some(kv) => {
                if let Some(s) = self.data.sessions.get_mut(&kv.session) {
                    s.keys.remove(key);
                }
                let old = kv.clone();
                let revision = self.record_delete(kv, events);
                CommandResult::Delete {
                    succeeded: true,
                    kv: Some(old),
                    revision,
                }
            }
        }
    }

    fn record_delete(&mut self, mut kv: KeyValue, events: &mut Vec<Event>) -> u64 {
        self.data.revision += 1;
        let revision = self.data.revision;
        kv.version = revision;
        self.record(
            Event {
                kind: EventKind::Delete,
                kv,
                revision,
            },
            events,
        );
        revision
    }

    fn record(&mut self, ev: Event, events: &mut Vec<Event>) {
        self.history.push(ev.clone());
        events.push(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, expected: Option<u64>, session: u64) -> Command {
        Command::Put {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            expected_version: expected,
            session,
        }
    }

    fn apply(st: &mut KvState, cmd: Command) -> CommandResult {
        st.apply(cmd, &mut Vec::new())
    }

    #[test]
    fn create_if_absent_then_cas() {
        let mut st = KvState::default();
        let r = apply(&mut st, put("/a", "1", Some(0), 0));
        let CommandResult::Put {
            succeeded: true,
            kv: Some(kv),
            ..
        } = r
        else {
            panic!("create failed: {r:?}")
        };
        assert_eq!(kv.version, 1);
        // A second create-if-absent conflicts and reports the current value.
        let r = apply(&mut st, put("/a", "2", Some(0), 0));
        assert!(
            matches!(r, CommandResult::Put { succeeded: false, kv: Some(ref c), .. } if c.value == "1")
        );
        // Wrong version conflicts; the right one succeeds.
        assert!(matches!(
            apply(&mut st, put("/a", "2", Some(7), 0)),
            CommandResult::Put {
                succeeded: false,
                ..
            }
        ));
        let r = apply(&mut st, put("/a", "2", Some(1), 0));
        assert!(
            matches!(r, CommandResult::Put { succeeded: true, kv: Some(ref k), .. } if k.version == 2 && k.create_revision == 1)
        );
        // A conflict does not move the revision.
        assert_eq!(st.revision(), 2);
    }

    #[test]
    fn delete_with_version() {
        let mut st = KvState::default();
        apply(&mut st, put("/a", "1", None, 0));
        assert!(matches!(
            apply(
                &mut st,
                Command::Delete {
                    key: "/a".into(),
                    expected_version: Some(5)
                }
            ),
            CommandResult::Delete {
                succeeded: false,
                ..
            }
        ));
        assert!(st.get("/a").is_some());
        assert!(matches!(
            apply(
                &mut st,
                Command::Delete {
                    key: "/a".into(),
                    expected_version: Some(1)
                }
            ),
            CommandResult::Delete {
                succeeded: true,
                kv: Some(_),
                revision: 2
            }
        ));
        assert!(st.get("/a").is_none());
    }

    #[test]
    fn sessions_own_their_keys() {
        let mut st = KvState::default();
        let CommandResult::SessionGranted { session, .. } =
            apply(&mut st, Command::GrantSession { ttl_ms: 1000 })
        else {
            panic!()
        };
        apply(&mut st, put("/eph/1", "x", None, session));
        apply(&mut st, put("/eph/2", "x", None, session));
        // Re-putting a key without a session makes it persistent.
        apply(&mut st, put("/eph/2", "y", None, 0));
        apply(&mut st, put("/perm", "x", None, 0));
        assert_eq!(
            apply(&mut st, put("/x", "x", None, 99)),
            CommandResult::SessionNotFound { session: 99 }
        );
        let mut events = Vec::new();
        let r = st.apply(Command::RevokeSession { session }, &mut events);
        assert_eq!(r, CommandResult::SessionRevoked { existed: true });
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Delete);
        assert!(st.get("/eph/1").is_none());
        assert!(st.get("/eph/2").is_some());
        assert!(st.get("/perm").is_some());
    }

    #[test]
    fn list_pages_by_prefix() {
        let mut st = KvState::default();
        for k in ["/a/1", "/a/2", "/a/3", "/b/1", "/a"] {
            apply(&mut st, put(k, "v", None, 0));
        }
        let (page, more) = st.list("/a/", "", 2);
        assert_eq!(
            page.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["/a/1", "/a/2"]
        );
        assert!(more);
        let (page, more) = st.list("/a/", "/a/2", 2);
        assert_eq!(
            page.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["/a/3"]
        );
        assert!(!more);
    }

    #[test]
    fn history_resumes_and_compacts() {
        let mut st = KvState {
            data: StateData::default(),
            history: History::new(3, usize::MAX, 0),
        };
        for i in 0..5 {
            apply(&mut st, put(&format!("/k{i}"), "v", None, 0));
        }
        // Revisions 1..=5 were written; only the last three are kept.
        assert_eq!(st.history.since(2, ""), Err(3));
        let evs = st.history.since(4, "").expect("kept");
        assert_eq!(evs.iter().map(|e| e.revision).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(st.history.since(3, "/k4").expect("kept").len(), 1);
    }
}
