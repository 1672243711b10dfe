//! The protocol's rules, apart from I/O: what CONNECT gets, what a
//! client's later packets may do (its publishes as a machine,
//! [`inbound::Publishes`]: PUBLISH and PUBREL in, what to store and the
//! answers out), and how subscriptions match and deliver. The session ([`crate::session`]) reads and writes, talks to
//! the broker and the stores, and asks these functions for every verdict;
//! they are tested call by call, without a socket. The outgoing
//! bookkeeping (packet ids, the in-flight window, QoS 2 states) is in
//! [`crate::state`].

pub(crate) mod connect;
pub(crate) mod inbound;
#[cfg(test)]
mod publishes_tests;
pub(crate) mod subscriptions;
#[cfg(test)]
mod tests;
