//! Topic-pattern trie.
//!
//! A binding key is split into words on `.`; each trie edge is a literal
//! word, `*` or `#`, and each node holds the destinations whose binding key
//! ends there. Routing follows only the edges that can match the routing
//! key, so its cost depends on the key and on the patterns that share its
//! prefixes, not on how many bindings the exchange has.
//!
//! Nodes live in an arena addressed by index and every walk runs on an
//! explicit stack: MQTT topics may have tens of thousands of levels, and
//! neither matching, pruning nor dropping the trie may recurse that deep.

use std::collections::{BTreeMap, HashMap};

use super::Destination;

const ROOT: usize = 0;

/// The words of a routing or binding key, as RabbitMQ splits them.
pub(super) fn words(key: &str) -> std::str::Split<'_, char> {
    let mut split = key.split('.');
    // The empty key is zero words in RabbitMQ, while "a." is two ("a" and
    // ""); a plain split would give the empty key one empty word.
    if key.is_empty() {
        let _ = split.next();
    }
    split
}

#[derive(Debug, Clone)]
enum Edge {
    Root,
    Word(Box<str>),
    Star,
    Hash,
}

#[derive(Debug, Clone)]
struct Node {
    parent: usize,
    /// How the parent reaches this node, so pruning can unlink it without
    /// searching the parent's children.
    edge: Edge,
    words: HashMap<Box<str>, usize>,
    star: Option<usize>,
    hash: Option<usize>,
    /// Destination -> number of bindings ending here for it. Bindings that
    /// differ only in arguments share a destination, and removing one of
    /// them must not stop routing for the others.
    dests: BTreeMap<Destination, u32>,
}

impl Node {
    fn new(parent: usize, edge: Edge) -> Self {
        Node {
            parent,
            edge,
            words: HashMap::new(),
            star: None,
            hash: None,
            dests: BTreeMap::new(),
        }
    }

    fn is_unused(&self) -> bool {
        self.words.is_empty() && self.star.is_none() && self.hash.is_none() && self.dests.is_empty()
    }

    fn child(&self, word: &str) -> Option<usize> {
        match word {
            "*" => self.star,
            "#" => self.hash,
            w => self.words.get(w).copied(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct TopicTrie {
    nodes: Vec<Node>,
    free: Vec<usize>,
}

impl Default for TopicTrie {
    fn default() -> Self {
        TopicTrie {
            nodes: vec![Node::new(ROOT, Edge::Root)],
            free: Vec::new(),
        }
    }
}

impl TopicTrie {
    pub(super) fn insert(&mut self, pattern: &str, dest: &Destination) {
        let mut cur = ROOT;
        for word in words(pattern) {
            cur = self.child_or_insert(cur, word);
        }
        if let Some(node) = self.nodes.get_mut(cur) {
            let count = node.dests.entry(dest.clone()).or_insert(0);
            *count = count.saturating_add(1);
        }
    }

    fn child_or_insert(&mut self, parent: usize, word: &str) -> usize {
        if let Some(child) = self.nodes.get(parent).and_then(|n| n.child(word)) {
            return child;
        }
        let edge = match word {
            "*" => Edge::Star,
            "#" => Edge::Hash,
            w => Edge::Word(w.into()),
        };
        let id = match self.free.pop() {
            Some(id) if id < self.nodes.len() => id,
            _ => {
                self.nodes.push(Node::new(ROOT, Edge::Root));
                self.nodes.len() - 1
            }
        };
        if let Some(slot) = self.nodes.get_mut(id) {
            *slot = Node::new(parent, edge.clone());
        }
        if let Some(p) = self.nodes.get_mut(parent) {
            match edge {
                Edge::Star => p.star = Some(id),
                Edge::Hash => p.hash = Some(id),
                Edge::Word(w) => {
                    p.words.insert(w, id);
                }
                Edge::Root => {}
            }
        }
        id
    }

    /// Removes one binding of `dest` under `pattern`; false if there was none.
    pub(super) fn remove(&mut self, pattern: &str, dest: &Destination) -> bool {
        let mut cur = ROOT;
        for word in words(pattern) {
            match self.nodes.get(cur).and_then(|n| n.child(word)) {
                Some(child) => cur = child,
                None => return false,
            }
        }
        let Some(node) = self.nodes.get_mut(cur) else {
            return false;
        };
        match node.dests.get_mut(dest) {
            None => return false,
            Some(count) if *count > 1 => {
                *count -= 1;
                return true;
            }
            Some(_) => {
                node.dests.remove(dest);
            }
        }
        self.prune(cur);
        true
    }

    /// Unlinks the now-unused chain of nodes ending at `id`, bottom-up.
    fn prune(&mut self, mut id: usize) {
        while id != ROOT {
            let Some(node) = self.nodes.get_mut(id) else {
                return;
            };
            if !node.is_unused() {
                return;
            }
            let parent = node.parent;
            let edge = std::mem::replace(&mut node.edge, Edge::Root);
            // Drop the (empty) map's allocation while the slot waits on the
            // free list.
            node.words = HashMap::new();
            if let Some(p) = self.nodes.get_mut(parent) {
                match edge {
                    Edge::Star => p.star = None,
                    Edge::Hash => p.hash = None,
                    Edge::Word(w) => {
                        p.words.remove(&w);
                    }
                    Edge::Root => {}
                }
            }
            self.free.push(id);
            id = parent;
        }
        // The arena never shrinks slot by slot; once everything is unbound
        // give the memory back in one go.
        if self.nodes.get(ROOT).is_some_and(Node::is_unused) {
            *self = TopicTrie::default();
        }
    }

    /// Calls `visit` for the destination of every binding whose key matches
    /// `key_words`; a destination bound under several matching keys is
    /// visited once per key.
    pub(super) fn for_each_match<'t>(
        &'t self,
        key_words: &[&str],
        visit: &mut impl FnMut(&'t Destination),
    ) {
        let len = key_words.len();
        // Walk states: (node, number of key words consumed to reach it).
        let mut stack: Vec<(usize, usize)> = vec![(ROOT, 0)];
        // A `#` node may be entered after consuming any number of further
        // words, and from several parent states; patterns like `#.#.#` would
        // make that exponential. A `#` node entered from word `i` has already
        // been entered at every index from `i` to the end, so per `#` node we
        // remember the lowest start pushed and only push the missing prefix.
        // Every other node has a single parent edge that consumes exactly one
        // word, so its states are unique once the `#` states are.
        let mut hash_from: HashMap<usize, usize> = HashMap::new();
        while let Some((id, consumed)) = stack.pop() {
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            if let Some(hash) = node.hash {
                let end = hash_from.get(&hash).copied().unwrap_or(len + 1);
                if consumed < end {
                    stack.extend((consumed..end).map(|j| (hash, j)));
                    hash_from.insert(hash, consumed);
                }
            }
            match key_words.get(consumed) {
                None => node.dests.keys().for_each(&mut *visit),
                Some(word) => {
                    if let Some(&child) = node.words.get(*word) {
                        stack.push((child, consumed + 1));
                    }
                    if let Some(star) = node.star {
                        stack.push((star, consumed + 1));
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(super) fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}
