//! The protocol's rules, apart from I/O, each tested without a socket:
//!
//! - [`handshake`]: the connection's negotiation as a machine, from
//!   start-ok to open-ok (methods and the broker's answers in, steps out),
//!   and its verdicts (mechanisms, logins, tuning, the vhost);
//! - [`publishing`]: a channel's modes (plain, confirm, tx: what a publish
//!   and a settlement become, what commit applies and rollback hands
//!   back) and the publisher confirms of settled writes;
//! - [`delivery`]: what becomes of a message handed to a consumer's
//!   channel (sent, and how; dead-lettered; returned);
//! - [`consumers`]: consumer tags, priorities and credit, exclusive
//!   use, a single active consumer's turns, where a stream consumer
//!   starts;
//! - [`channels`]: a channel's opening, flow, prefetch, the queue a method
//!   names, exchange declarations, when a delivery is dead-lettered
//!   instead.
//!
//! The session ([`crate::session`]) reads and writes, talks to the
//! broker, and carries out what these decide. Content assembly and
//! delivery tags are [`crate::channel`]'s.

pub(crate) mod channels;
pub(crate) mod consumers;
#[cfg(test)]
mod consumers_tests;
pub(crate) mod delivery;
#[cfg(test)]
mod delivery_tests;
pub(crate) mod handshake;
#[cfg(test)]
mod handshake_tests;
pub(crate) mod publishing;
#[cfg(test)]
mod publishing_tests;
#[cfg(test)]
mod tests;
