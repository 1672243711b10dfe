//! A bookie's metrics, in BookKeeper's names where BookKeeper has the
//! metric, and its health, for its HTTP listener.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use magnetar_metrics::prometheus_client::collector::Collector;
use magnetar_metrics::prometheus_client::encoding::DescriptorEncoder;
use magnetar_metrics::prometheus_client::registry::Registry;
use magnetar_metrics::{encode_counters, encode_gauges};

use crate::storage::Storage;

/// The bookie's state as Prometheus scrapes it.
#[derive(Clone)]
pub struct BookieMetrics {
    pub(crate) storage: Arc<Storage>,
    /// Whether the bookie's registration under `/bookies/available` is
    /// current (its metadata session live).
    pub(crate) registered: Arc<AtomicBool>,
}

impl std::fmt::Debug for BookieMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookieMetrics").finish()
    }
}

/// What `/health` and `/ready` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BookieHealth {
    /// No journal or entry-log write has failed.
    pub live: bool,
    /// Registered as available, and writable (not read-only for a full
    /// disk or a failed write).
    pub ready: bool,
}

impl BookieMetrics {
    pub fn health(&self) -> BookieHealth {
        let live = !self.storage.io_failed();
        BookieHealth {
            live,
            ready: live && self.registered.load(Ordering::Relaxed) && !self.storage.is_read_only(),
        }
    }

    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        self.register(&mut r);
        r
    }

    pub fn register(&self, r: &mut Registry) {
        let [sync, batch, add] = self.storage.journal_histograms();
        r.register(
            "bookie_journal_sync_latency_seconds",
            "One journal write and its fdatasync",
            sync,
        );
        r.register(
            "bookie_journal_batch_records",
            "Records covered by one journal fdatasync",
            batch,
        );
        r.register(
            "bookie_journal_add_latency_seconds",
            "An add from its arrival to its durability in the journal (BookKeeper's JOURNAL_ADD_ENTRY)",
            add,
        );
        r.register_collector(Box::new(self.clone()));
    }
}

impl Collector for BookieMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.storage.stats();
        let gauges: [(&str, &str, i64); 6] = [
            (
                "bookie_SERVER_STATUS",
                "1 when the bookie accepts writes, 0 when it is read-only",
                i64::from(!s.read_only),
            ),
            (
                "bookie_registered",
                "1 while the bookie is registered as available in the metadata store",
                i64::from(self.registered.load(Ordering::Relaxed)),
            ),
            ("bookie_ledgers_count", "Ledgers stored", to_i64(s.ledgers)),
            (
                "bookie_entry_log_size_bytes",
                "Bytes of the entry logs on disk",
                to_i64(s.entry_log_bytes),
            ),
            (
                "bookie_entry_logs_count",
                "Entry log files",
                to_i64(s.entry_logs),
            ),
            (
                "bookie_journal_queue_size",
                "Adds and fences waiting for the journal, or being written",
                to_i64(s.journal_queue),
            ),
        ];
        encode_gauges(&mut encoder, gauges)?;
        let counters: [(&str, &str, u64); 5] = [
            (
                "bookie_WRITE_BYTES",
                "Bytes written to the journal",
                s.write_bytes,
            ),
            (
                "bookie_READ_BYTES",
                "Entry bytes read by clients",
                s.read_bytes,
            ),
            (
                "bookie_journal_syncs",
                "Journal fsyncs (each covers a batch of adds)",
                s.journal_syncs,
            ),
            (
                "bookie_journal_entries",
                "Entries written to the journal",
                s.journal_entries,
            ),
            (
                "bookie_compacted_entry_logs",
                "Entry logs reclaimed by compaction",
                s.compacted_logs,
            ),
        ];
        encode_counters(&mut encoder, counters)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
