//! The protocol's rules, apart from I/O: the connection handshake (a
//! machine from start-ok to open-ok: methods and the broker's answers in,
//! steps out; mechanisms, logins, tuning, the vhost) and a channel's (its opening,
//! modes, prefetch, the queue a method names, exchange declarations,
//! when a delivery is dead-lettered instead). The session
//! ([`crate::session`]) reads and writes, talks to the broker, and asks
//! these functions for every verdict; they are tested without a socket.
//! Content assembly and delivery tags are [`crate::channel`]'s.

pub(crate) mod channels;
pub(crate) mod handshake;
#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod tests;
