//! A channel's publishing modes, apart from I/O: plain, publisher
//! confirms (sequence numbers, and the acks and nacks to send as writes
//! settle) and transactions (publishes and settlements held until commit).
//! Generic over what a publish and a settlement are, so that the session
//! keeps its own types and the tests use plain values.

use super::channels;
use crate::error::Exception;

#[derive(Debug)]
enum Mode<P, S> {
    Plain,
    /// confirm.select: the next publish's sequence number.
    Confirm {
        next: u64,
    },
    /// tx.select: what the open transaction holds.
    Tx {
        publishes: Vec<P>,
        settles: Vec<S>,
    },
}

/// What becomes of a publish.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Publishing<P> {
    /// Store it now; `seq` is its confirm sequence number, 0 outside
    /// confirm mode.
    Store { publish: P, seq: u64 },
    /// Held by the open transaction until commit.
    Held,
}

/// A channel's mode, and what it holds.
#[derive(Debug)]
pub(crate) struct Modes<P, S> {
    mode: Mode<P, S>,
}

impl<P, S> Default for Modes<P, S> {
    fn default() -> Self {
        Modes { mode: Mode::Plain }
    }
}

/// What a commit applies, in the order the client sent it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Commit<P, S> {
    pub publishes: Vec<P>,
    pub settles: Vec<S>,
}

impl<P, S> Modes<P, S> {
    pub(crate) fn is_confirm(&self) -> bool {
        matches!(self.mode, Mode::Confirm { .. })
    }

    pub(crate) fn is_tx(&self) -> bool {
        matches!(self.mode, Mode::Tx { .. })
    }

    /// confirm.select; again in confirm mode it changes nothing.
    pub(crate) fn select_confirm(&mut self) -> Result<(), Exception> {
        channels::confirm_select(self.is_tx())?;
        if !self.is_confirm() {
            self.mode = Mode::Confirm { next: 1 };
        }
        Ok(())
    }

    /// tx.select; again in tx mode it keeps the open transaction.
    pub(crate) fn select_tx(&mut self) -> Result<(), Exception> {
        channels::tx_select(self.is_confirm())?;
        if !self.is_tx() {
            self.mode = Mode::Tx {
                publishes: Vec::new(),
                settles: Vec::new(),
            };
        }
        Ok(())
    }

    pub(crate) fn publish(&mut self, publish: P) -> Publishing<P> {
        match &mut self.mode {
            Mode::Plain => Publishing::Store { publish, seq: 0 },
            Mode::Confirm { next } => {
                let seq = *next;
                *next += 1;
                Publishing::Store { publish, seq }
            }
            Mode::Tx { publishes, .. } => {
                publishes.push(publish);
                Publishing::Held
            }
        }
    }

    /// An ack, nack or reject: Some to apply now, None when the open
    /// transaction holds it.
    pub(crate) fn settle(&mut self, settle: S) -> Option<S> {
        match &mut self.mode {
            Mode::Tx { settles, .. } => {
                settles.push(settle);
                None
            }
            _ => Some(settle),
        }
    }

    /// tx.commit: what the transaction held; a new one begins.
    pub(crate) fn commit(&mut self) -> Result<Commit<P, S>, Exception> {
        match &mut self.mode {
            Mode::Tx { publishes, settles } => Ok(Commit {
                publishes: std::mem::take(publishes),
                settles: std::mem::take(settles),
            }),
            _ => Err(channels::not_transactional()),
        }
    }

    /// tx.rollback: the publishes are dropped; the settlements come back,
    /// for their deliveries to be unacknowledged again.
    pub(crate) fn rollback(&mut self) -> Result<Vec<S>, Exception> {
        match &mut self.mode {
            Mode::Tx { publishes, settles } => {
                publishes.clear();
                Ok(std::mem::take(settles))
            }
            _ => Err(channels::not_transactional()),
        }
    }
}

/// One basic.ack or basic.nack of publisher confirms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Confirm {
    pub tag: u64,
    pub multiple: bool,
    pub ok: bool,
}

/// Publisher confirms as writes settle, in publish order: a run of
/// stored publishes becomes one `multiple` ack, a failed one a nack of
/// its own. Publishes with sequence number 0 (not in confirm mode) are
/// not confirmed.
#[derive(Debug, Default)]
pub(crate) struct Confirms {
    /// The first and last sequence numbers of the run of stored ones.
    run: Option<(u64, u64)>,
    out: Vec<Confirm>,
}

impl Confirms {
    /// The write of publish `seq` settled, `ok` if stored. Sequence numbers
    /// come in increasing order.
    pub(crate) fn settled(&mut self, seq: u64, ok: bool) {
        if seq == 0 {
            return;
        }
        match (self.run, ok) {
            (Some((first, last)), true) if seq == last + 1 => self.run = Some((first, seq)),
            (_, true) => {
                self.close_run();
                self.run = Some((seq, seq));
            }
            (_, false) => {
                self.close_run();
                self.out.push(Confirm {
                    tag: seq,
                    multiple: false,
                    ok: false,
                });
            }
        }
    }

    /// The confirms to send for what settled since the last call; the
    /// buffer is kept for the next batch.
    pub(crate) fn take(&mut self) -> std::vec::Drain<'_, Confirm> {
        self.close_run();
        self.out.drain(..)
    }

    fn close_run(&mut self) {
        if let Some((first, last)) = self.run.take() {
            self.out.push(Confirm {
                tag: last,
                multiple: first != last,
                ok: true,
            });
        }
    }
}
