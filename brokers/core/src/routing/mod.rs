//! Per-namespace routing table: RabbitMQ's exchange/binding model.
//!
//! Every protocol decides "which queues receive this message" here: AMQP
//! 0-9-1 drives exchanges and bindings directly, MQTT publishes through
//! `amq.topic`, and the other front ends map onto the same calls. RabbitMQ's
//! behaviour is the reference, including its error classes, so the AMQP layer
//! can map [`BrokerError`] variants straight onto reply codes.
//!
//! The table is plain data: no locking and no I/O. The broker wraps it in
//! its own synchronisation and keeps its metadata store in step from the
//! [`Removed`] reports that mutations return and from [`RoutingSnapshot`]s.
//!
//! Matching per exchange kind:
//! * direct: a hash map from routing key to destinations;
//! * fanout: every bound destination;
//! * topic: a word trie with `*` and `#` edges (see `trie`), so routing does
//!   not scan bindings;
//! * headers: each binding's arguments tested against the message headers
//!   (see `headers`), as RabbitMQ does.

mod headers;
mod trie;

#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

pub use headers::HeaderValue;

use headers::MessageHeaders;
use trie::TopicTrie;

/// The nameless exchange every queue is implicitly bound to by its name.
pub const DEFAULT_EXCHANGE: &str = "";

const PREDECLARED: [(&str, ExchangeKind); 6] = [
    (DEFAULT_EXCHANGE, ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    /// Parses an AMQP exchange type name (case-sensitive, as RabbitMQ).
    pub fn parse(name: &str) -> Result<ExchangeKind, BrokerError> {
        match name {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(BrokerError::InvalidArgument(format!(
                "unknown exchange type '{other}'"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeDef {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    #[serde(default)]
    pub alternate_exchange: Option<String>,
    /// Remaining declare arguments, kept for listing and persistence; they
    /// take no part in routing or in the redeclare equivalence check.
    #[serde(default)]
    pub arguments: BTreeMap<String, String>,
}

impl ExchangeDef {
    /// A non-durable, non-auto-delete, non-internal exchange: AMQP's defaults.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        ExchangeDef {
            name: name.into(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            alternate_exchange: None,
            arguments: BTreeMap::new(),
        }
    }

    fn predeclared(name: &str, kind: ExchangeKind) -> Self {
        ExchangeDef {
            durable: true,
            ..ExchangeDef::new(name, kind)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(name) | Destination::Exchange(name) => name,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Queue(name) => write!(f, "queue '{name}'"),
            Destination::Exchange(name) => write!(f, "exchange '{name}'"),
        }
    }
}

/// A binding is identified by all four fields, as in RabbitMQ: the same
/// source, destination and key with different arguments are two bindings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    #[serde(default)]
    pub arguments: Vec<(String, HeaderValue)>,
}

impl Binding {
    pub fn queue(
        source: impl Into<String>,
        queue: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        Binding {
            source: source.into(),
            destination: Destination::Queue(queue.into()),
            routing_key: routing_key.into(),
            arguments: Vec::new(),
        }
    }

    pub fn exchange(
        source: impl Into<String>,
        destination: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        Binding {
            source: source.into(),
            destination: Destination::Exchange(destination.into()),
            routing_key: routing_key.into(),
            arguments: Vec::new(),
        }
    }

    pub fn with_arguments(mut self, arguments: Vec<(String, HeaderValue)>) -> Self {
        self.arguments = arguments;
        self
    }

    /// RabbitMQ sorts argument tables by key before storing a binding, so
    /// argument order does not make a different binding.
    fn canonical(mut self) -> Self {
        self.arguments.sort_by(|a, b| a.0.cmp(&b.0));
        self
    }
}

/// Total order over bindings so they can live in ordered sets despite the
/// floats in their arguments.
#[derive(Debug, Clone)]
struct StoredBinding(Binding);

impl Ord for StoredBinding {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&self.0, &other.0);
        a.source
            .cmp(&b.source)
            .then_with(|| a.destination.cmp(&b.destination))
            .then_with(|| a.routing_key.cmp(&b.routing_key))
            .then_with(|| {
                for ((ka, va), (kb, vb)) in a.arguments.iter().zip(&b.arguments) {
                    let ord = ka.cmp(kb).then_with(|| va.total_cmp(vb));
                    if ord != Ordering::Equal {
                        return ord;
                    }
                }
                a.arguments.len().cmp(&b.arguments.len())
            })
    }
}

impl PartialOrd for StoredBinding {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for StoredBinding {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for StoredBinding {}

/// Where a message went. Empty means unroutable (for `mandatory`, or for an
/// MQTT publish with no subscribers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    pub queues: BTreeSet<String>,
}

impl Routed {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

/// What a mutation took away, cascades included, so the broker can delete
/// the same records from its metadata store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Removed {
    pub bindings: Vec<Binding>,
    pub exchanges: Vec<ExchangeDef>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty() && self.exchanges.is_empty()
    }
}

/// Serializable state of a table. Predeclared exchanges are left out: every
/// table is born with them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingSnapshot {
    #[serde(default)]
    pub exchanges: Vec<ExchangeDef>,
    #[serde(default)]
    pub queues: Vec<String>,
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

/// Destination -> number of bindings routing to it through one index entry.
/// Bindings that differ only in arguments share the entry, and unbinding one
/// of them must leave the route to the others in place.
type DestCounts = BTreeMap<Destination, u32>;

fn count_add(counts: &mut DestCounts, dest: &Destination) {
    let count = counts.entry(dest.clone()).or_insert(0);
    *count = count.saturating_add(1);
}

fn count_remove(counts: &mut DestCounts, dest: &Destination) {
    if let Some(count) = counts.get_mut(dest) {
        if *count > 1 {
            *count -= 1;
        } else {
            counts.remove(dest);
        }
    }
}

#[derive(Debug, Clone)]
enum Matcher {
    /// Routes key K to queue K; holds no bindings of its own.
    Default,
    Direct(HashMap<String, DestCounts>),
    Fanout(DestCounts),
    Topic(TopicTrie),
    /// Evaluates the exchange's stored bindings directly.
    Headers,
}

impl Matcher {
    fn new(name: &str, kind: ExchangeKind) -> Self {
        if name == DEFAULT_EXCHANGE {
            return Matcher::Default;
        }
        match kind {
            ExchangeKind::Direct => Matcher::Direct(HashMap::new()),
            ExchangeKind::Fanout => Matcher::Fanout(DestCounts::new()),
            ExchangeKind::Topic => Matcher::Topic(TopicTrie::default()),
            ExchangeKind::Headers => Matcher::Headers,
        }
    }

    fn add(&mut self, binding: &Binding) {
        match self {
            Matcher::Default | Matcher::Headers => {}
            Matcher::Direct(by_key) => {
                count_add(
                    by_key.entry(binding.routing_key.clone()).or_default(),
                    &binding.destination,
                );
            }
            Matcher::Fanout(dests) => count_add(dests, &binding.destination),
            Matcher::Topic(trie) => trie.insert(&binding.routing_key, &binding.destination),
        }
    }

    fn remove(&mut self, binding: &Binding) {
        match self {
            Matcher::Default | Matcher::Headers => {}
            Matcher::Direct(by_key) => {
                if let Some(dests) = by_key.get_mut(&binding.routing_key) {
                    count_remove(dests, &binding.destination);
                    if dests.is_empty() {
                        by_key.remove(&binding.routing_key);
                    }
                }
            }
            Matcher::Fanout(dests) => count_remove(dests, &binding.destination),
            Matcher::Topic(trie) => {
                trie.remove(&binding.routing_key, &binding.destination);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Exchange {
    def: ExchangeDef,
    /// Bindings with this exchange as source; the source of truth the
    /// matcher is an index over.
    outgoing: BTreeSet<StoredBinding>,
    matcher: Matcher,
}

impl Exchange {
    fn new(def: ExchangeDef) -> Self {
        let matcher = Matcher::new(&def.name, def.kind);
        Exchange {
            def,
            outgoing: BTreeSet::new(),
            matcher,
        }
    }
}

fn no_exchange(name: &str) -> BrokerError {
    BrokerError::NotFound(format!("no exchange '{name}' in namespace"))
}

fn no_queue(name: &str) -> BrokerError {
    BrokerError::NotFound(format!("no queue '{name}' in namespace"))
}

fn default_exchange_refused() -> BrokerError {
    BrokerError::AccessRefused("operation not permitted on the default exchange".to_owned())
}

/// The exchanges, queues and bindings of one namespace.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    exchanges: BTreeMap<String, Exchange>,
    queues: BTreeSet<String>,
    /// Bindings by destination, for queue and exchange deletion.
    incoming: HashMap<Destination, BTreeSet<StoredBinding>>,
    binding_count: usize,
}

impl Default for RoutingTable {
    fn default() -> Self {
        RoutingTable::new()
    }
}

impl RoutingTable {
    /// A table holding only the default exchange and the `amq.*` exchanges.
    pub fn new() -> Self {
        let exchanges = PREDECLARED
            .iter()
            .map(|&(name, kind)| {
                (
                    name.to_owned(),
                    Exchange::new(ExchangeDef::predeclared(name, kind)),
                )
            })
            .collect();
        RoutingTable {
            exchanges,
            queues: BTreeSet::new(),
            incoming: HashMap::new(),
            binding_count: 0,
        }
    }

    /// Whether `name` is one of the exchanges every namespace is born with.
    pub fn is_predeclared(name: &str) -> bool {
        PREDECLARED.iter().any(|&(n, _)| n == name)
    }

    /// True when nothing beyond the predeclared exchanges exists.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
            && self.binding_count == 0
            && self
                .exchanges
                .keys()
                .all(|name| RoutingTable::is_predeclared(name))
    }

    // ---- queues -------------------------------------------------------

    /// Registers a queue as a binding destination; `Ok(true)` if it is new.
    pub fn declare_queue(&mut self, name: &str) -> Result<bool, BrokerError> {
        if name.is_empty() {
            // The default exchange routes key "" nowhere; a nameless queue
            // could only be reached by accident.
            return Err(BrokerError::InvalidArgument(
                "queue name must not be empty".to_owned(),
            ));
        }
        Ok(self.queues.insert(name.to_owned()))
    }

    /// Forgets a queue and every binding to it, then auto-deletes the
    /// exchanges that lost their last binding. Deleting a missing queue is
    /// not an error (RabbitMQ's queue.delete is idempotent).
    pub fn delete_queue(&mut self, name: &str) -> Removed {
        let mut removed = Removed::default();
        if !self.queues.remove(name) {
            return removed;
        }
        let mut candidates = Vec::new();
        self.remove_incoming(
            &Destination::Queue(name.to_owned()),
            &mut removed,
            &mut candidates,
        );
        self.auto_delete(candidates, &mut removed);
        removed
    }

    pub fn has_queue(&self, name: &str) -> bool {
        self.queues.contains(name)
    }

    pub fn queues(&self) -> impl Iterator<Item = &str> + '_ {
        self.queues.iter().map(String::as_str)
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    // ---- exchanges ----------------------------------------------------

    /// exchange.declare. `Ok(true)` if the exchange was created.
    ///
    /// Passive declares only check existence. An existing exchange must be
    /// redeclared equivalently (kind, durable, auto_delete, internal,
    /// alternate exchange); a new one may not use the reserved `amq.` prefix.
    pub fn declare_exchange(
        &mut self,
        def: ExchangeDef,
        passive: bool,
    ) -> Result<bool, BrokerError> {
        if passive {
            return if self.exchanges.contains_key(&def.name) {
                Ok(false)
            } else {
                Err(no_exchange(&def.name))
            };
        }
        if def.name == DEFAULT_EXCHANGE {
            return Err(default_exchange_refused());
        }
        if let Some(existing) = self.exchanges.get(&def.name) {
            // RabbitMQ checks equivalence before the reserved prefix, so an
            // identical redeclare of amq.topic succeeds and a different one
            // is 406, not 403.
            assert_equivalent(&existing.def, &def)?;
            return Ok(false);
        }
        if def.name.starts_with("amq.") {
            return Err(BrokerError::AccessRefused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                def.name
            )));
        }
        self.exchanges.insert(def.name.clone(), Exchange::new(def));
        Ok(true)
    }

    /// exchange.delete. Removes the exchange and every binding it is source
    /// or destination of, then auto-deletes sources left without bindings.
    ///
    /// Deleting a missing exchange succeeds, as in RabbitMQ 3.x: a client
    /// cleaning up after itself should not fail on a race with another.
    /// `if_unused` refuses only when the exchange is the *source* of a
    /// binding, which is RabbitMQ's definition of "in use".
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<Removed, BrokerError> {
        if name == DEFAULT_EXCHANGE {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::AccessRefused(format!(
                "deletion of system exchange '{name}' not allowed"
            )));
        }
        let mut removed = Removed::default();
        let Some(exchange) = self.exchanges.get(name) else {
            return Ok(removed);
        };
        if if_unused && !exchange.outgoing.is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "exchange '{name}' in use"
            )));
        }
        let mut candidates = Vec::new();
        self.delete_exchange_unchecked(name, &mut removed, &mut candidates);
        self.auto_delete(candidates, &mut removed);
        Ok(removed)
    }

    pub fn exchange(&self, name: &str) -> Option<&ExchangeDef> {
        self.exchanges.get(name).map(|x| &x.def)
    }

    pub fn has_exchange(&self, name: &str) -> bool {
        self.exchanges.contains_key(name)
    }

    /// All exchanges, predeclared ones included, by name.
    pub fn exchanges(&self) -> impl Iterator<Item = &ExchangeDef> + '_ {
        self.exchanges.values().map(|x| &x.def)
    }

    pub fn exchange_count(&self) -> usize {
        self.exchanges.len()
    }

    // ---- bindings -----------------------------------------------------

    /// queue.bind / exchange.bind. `Ok(true)` if the binding is new; binding
    /// twice is a no-op. Arguments are stored sorted by key.
    pub fn bind(&mut self, binding: Binding) -> Result<bool, BrokerError> {
        let source_kind = self.check_binding_ends(&binding)?;
        if source_kind == ExchangeKind::Headers {
            headers::validate_binding_args(&binding.arguments)?;
        }
        headers::check_storable(&binding.arguments)?;
        let stored = StoredBinding(binding.canonical());
        let exchange = self
            .exchanges
            .get_mut(&stored.0.source)
            .ok_or_else(|| no_exchange(&stored.0.source))?;
        if exchange.outgoing.contains(&stored) {
            return Ok(false);
        }
        exchange.matcher.add(&stored.0);
        exchange.outgoing.insert(stored.clone());
        self.incoming
            .entry(stored.0.destination.clone())
            .or_default()
            .insert(stored);
        self.binding_count = self.binding_count.saturating_add(1);
        Ok(true)
    }

    /// queue.unbind / exchange.unbind. Unbinding a binding that does not
    /// exist succeeds (as RabbitMQ); a missing source or destination is
    /// NotFound. An auto-delete source left without bindings is deleted.
    pub fn unbind(&mut self, binding: &Binding) -> Result<Removed, BrokerError> {
        self.check_binding_ends(binding)?;
        let stored = StoredBinding(binding.clone().canonical());
        let mut removed = Removed::default();
        if self.remove_binding(&stored) {
            let source = stored.0.source.clone();
            removed.bindings.push(stored.0);
            self.auto_delete(vec![source], &mut removed);
        }
        Ok(removed)
    }

    /// Every binding, ordered by source exchange.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.exchanges
            .values()
            .flat_map(|x| x.outgoing.iter().map(|b| &b.0))
    }

    /// Bindings whose source is `exchange` (none if it does not exist).
    pub fn bindings_for_source<'a>(
        &'a self,
        exchange: &str,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        self.exchanges
            .get(exchange)
            .into_iter()
            .flat_map(|x| x.outgoing.iter().map(|b| &b.0))
    }

    /// Bindings to `destination`. The default exchange's implicit bindings
    /// are not listed: they are not stored.
    pub fn bindings_for_destination<'a>(
        &'a self,
        destination: &Destination,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        self.incoming
            .get(destination)
            .into_iter()
            .flat_map(|set| set.iter().map(|b| &b.0))
    }

    pub fn bindings_for_queue<'a>(&'a self, queue: &str) -> impl Iterator<Item = &'a Binding> + 'a {
        self.bindings_for_destination(&Destination::Queue(queue.to_owned()))
    }

    pub fn binding_count(&self) -> usize {
        self.binding_count
    }

    // ---- routing ------------------------------------------------------

    /// The queues a message published to `exchange` reaches.
    ///
    /// Exchange-to-exchange bindings are followed with the same key and
    /// headers; an exchange whose own bindings match nothing hands the
    /// message to its alternate exchange. Each exchange is visited at most
    /// once, so binding and alternate cycles terminate.
    pub fn route<'a>(
        &'a self,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<Routed, BrokerError> {
        let (first_name, first) = self
            .exchanges
            .get_key_value(exchange)
            .ok_or_else(|| no_exchange(exchange))?;
        if first.def.internal {
            return Err(BrokerError::AccessRefused(format!(
                "cannot publish to internal exchange '{exchange}'"
            )));
        }
        let mut routed = Routed::default();
        let mut visited: HashSet<&'a str> = HashSet::from([first_name.as_str()]);
        let mut pending: Vec<&'a Exchange> = vec![first];
        // Split and index once per message, and only if some exchange on
        // the way needs it.
        let mut key_words: Option<Vec<&str>> = None;
        let mut message_headers: Option<MessageHeaders<'_>> = None;

        while let Some(x) = pending.pop() {
            let mut matched = false;
            if let Matcher::Default = x.matcher {
                if self.queues.contains(routing_key) {
                    matched = true;
                    routed.queues.insert(routing_key.to_owned());
                }
            } else {
                let mut visit = |dest: &'a Destination| {
                    matched = true;
                    match dest {
                        Destination::Queue(q) => {
                            if !routed.queues.contains(q) {
                                routed.queues.insert(q.clone());
                            }
                        }
                        Destination::Exchange(e) => {
                            // Bindings never outlive their destination, so
                            // the lookup only misses on a broken invariant.
                            if visited.insert(e.as_str()) {
                                if let Some(next) = self.exchanges.get(e) {
                                    pending.push(next);
                                }
                            }
                        }
                    }
                };
                match &x.matcher {
                    Matcher::Default => {}
                    Matcher::Direct(by_key) => {
                        if let Some(dests) = by_key.get(routing_key) {
                            dests.keys().for_each(&mut visit);
                        }
                    }
                    Matcher::Fanout(dests) => dests.keys().for_each(&mut visit),
                    Matcher::Topic(trie) => {
                        let words =
                            key_words.get_or_insert_with(|| trie::words(routing_key).collect());
                        trie.for_each_match(words, &mut visit);
                    }
                    Matcher::Headers => {
                        let hs =
                            message_headers.get_or_insert_with(|| MessageHeaders::new(headers));
                        for b in &x.outgoing {
                            if headers::headers_match(&b.0.arguments, hs) {
                                visit(&b.0.destination);
                            }
                        }
                    }
                }
            }
            // As in RabbitMQ, "matched nothing" is about this exchange's own
            // bindings: a match on an exchange that then routes nowhere
            // still counts, and the alternate is not consulted.
            if !matched {
                if let Some(alternate) = &x.def.alternate_exchange {
                    // Alternates are not checked on declare (as RabbitMQ);
                    // one that does not exist simply routes nowhere.
                    if visited.insert(alternate.as_str()) {
                        if let Some(next) = self.exchanges.get(alternate) {
                            pending.push(next);
                        }
                    }
                }
            }
        }
        Ok(routed)
    }

    // ---- persistence --------------------------------------------------

    pub fn to_snapshot(&self) -> RoutingSnapshot {
        RoutingSnapshot {
            exchanges: self
                .exchanges()
                .filter(|def| !RoutingTable::is_predeclared(&def.name))
                .cloned()
                .collect(),
            queues: self.queues.iter().cloned().collect(),
            bindings: self.bindings().cloned().collect(),
        }
    }

    /// Rebuilds a table, checking the snapshot as the live calls would
    /// (except the `amq.` prefix rule, which guards clients, not restored
    /// state). A binding whose source or destination is missing is an
    /// error rather than silently dropped: it means the store is
    /// inconsistent, and the broker should know.
    pub fn from_snapshot(snapshot: RoutingSnapshot) -> Result<RoutingTable, BrokerError> {
        let mut table = RoutingTable::new();
        for def in snapshot.exchanges {
            match table.exchanges.get(&def.name) {
                Some(existing) => assert_equivalent(&existing.def, &def)?,
                None => {
                    table.exchanges.insert(def.name.clone(), Exchange::new(def));
                }
            }
        }
        for queue in &snapshot.queues {
            table.declare_queue(queue)?;
        }
        for binding in snapshot.bindings {
            table.bind(binding)?;
        }
        Ok(table)
    }

    // ---- internals ----------------------------------------------------

    /// Checks that both ends of a binding exist and are bindable; returns
    /// the source's kind.
    fn check_binding_ends(&self, binding: &Binding) -> Result<ExchangeKind, BrokerError> {
        let default_dest =
            matches!(&binding.destination, Destination::Exchange(e) if e == DEFAULT_EXCHANGE);
        if binding.source == DEFAULT_EXCHANGE || default_dest {
            return Err(default_exchange_refused());
        }
        let source = self
            .exchanges
            .get(&binding.source)
            .ok_or_else(|| no_exchange(&binding.source))?;
        match &binding.destination {
            Destination::Queue(q) if !self.queues.contains(q) => return Err(no_queue(q)),
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                return Err(no_exchange(e))
            }
            _ => {}
        }
        Ok(source.def.kind)
    }

    fn remove_binding(&mut self, stored: &StoredBinding) -> bool {
        let Some(exchange) = self.exchanges.get_mut(&stored.0.source) else {
            return false;
        };
        if !exchange.outgoing.remove(stored) {
            return false;
        }
        exchange.matcher.remove(&stored.0);
        if let Some(set) = self.incoming.get_mut(&stored.0.destination) {
            set.remove(stored);
            if set.is_empty() {
                self.incoming.remove(&stored.0.destination);
            }
        }
        self.binding_count = self.binding_count.saturating_sub(1);
        true
    }

    /// Drops every binding to `dest`, recording the sources as auto-delete
    /// candidates.
    fn remove_incoming(
        &mut self,
        dest: &Destination,
        removed: &mut Removed,
        candidates: &mut Vec<String>,
    ) {
        let Some(set) = self.incoming.remove(dest) else {
            return;
        };
        for stored in set {
            if let Some(source) = self.exchanges.get_mut(&stored.0.source) {
                if source.outgoing.remove(&stored) {
                    source.matcher.remove(&stored.0);
                }
            }
            self.binding_count = self.binding_count.saturating_sub(1);
            candidates.push(stored.0.source.clone());
            removed.bindings.push(stored.0);
        }
    }

    fn delete_exchange_unchecked(
        &mut self,
        name: &str,
        removed: &mut Removed,
        candidates: &mut Vec<String>,
    ) {
        let Some(exchange) = self.exchanges.remove(name) else {
            return;
        };
        for stored in exchange.outgoing {
            if let Some(set) = self.incoming.get_mut(&stored.0.destination) {
                set.remove(&stored);
                if set.is_empty() {
                    self.incoming.remove(&stored.0.destination);
                }
            }
            self.binding_count = self.binding_count.saturating_sub(1);
            removed.bindings.push(stored.0);
        }
        self.remove_incoming(&Destination::Exchange(name.to_owned()), removed, candidates);
        removed.exchanges.push(exchange.def);
    }

    /// RabbitMQ deletes an auto-delete exchange once it has no bindings as
    /// source left; a freshly declared one with none yet survives. Deleting
    /// it can in turn strip another auto-delete exchange of its last binding,
    /// hence the work list.
    fn auto_delete(&mut self, mut candidates: Vec<String>, removed: &mut Removed) {
        while let Some(name) = candidates.pop() {
            let doomed = self.exchanges.get(&name).is_some_and(|x| {
                x.def.auto_delete && x.outgoing.is_empty() && !RoutingTable::is_predeclared(&name)
            });
            if doomed {
                self.delete_exchange_unchecked(&name, removed, &mut candidates);
            }
        }
    }
}

/// RabbitMQ's redeclare equivalence: type, flags, and of the arguments only
/// the alternate exchange (other arguments are plugin-specific there).
fn assert_equivalent(current: &ExchangeDef, requested: &ExchangeDef) -> Result<(), BrokerError> {
    let inequivalent = |arg: &str, received: String, now: String| {
        Err(BrokerError::PreconditionFailed(format!(
            "inequivalent arg '{arg}' for exchange '{}' in namespace: received {received} but current is {now}",
            current.name
        )))
    };
    let quoted = |s: &dyn fmt::Display| format!("'{s}'");
    let alternate = |ae: &Option<String>| {
        ae.as_ref()
            .map_or_else(|| "none".to_owned(), |s| format!("'{s}'"))
    };
    if current.kind != requested.kind {
        return inequivalent("type", quoted(&requested.kind), quoted(&current.kind));
    }
    if current.durable != requested.durable {
        return inequivalent(
            "durable",
            quoted(&requested.durable),
            quoted(&current.durable),
        );
    }
    if current.auto_delete != requested.auto_delete {
        return inequivalent(
            "auto_delete",
            quoted(&requested.auto_delete),
            quoted(&current.auto_delete),
        );
    }
    if current.internal != requested.internal {
        return inequivalent(
            "internal",
            quoted(&requested.internal),
            quoted(&current.internal),
        );
    }
    if current.alternate_exchange != requested.alternate_exchange {
        return inequivalent(
            "alternate-exchange",
            alternate(&requested.alternate_exchange),
            alternate(&current.alternate_exchange),
        );
    }
    Ok(())
}
