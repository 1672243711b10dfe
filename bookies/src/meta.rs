//! What bookies and ledgers keep in the metadata store, and where.
//!
//! - `/bookies/info/{id}`: a bookie's address, written at every start and
//!   kept after it dies, so that the auditor knows whom it has lost.
//! - `/bookies/available/{id}`: the same, ephemeral: present while the bookie
//!   runs, with its read-only flag.
//! - `/ledgers/meta/{id:020}`: a ledger's metadata as JSON, updated by
//!   compare-and-set only.
//! - `/ledgers/idgen`: the next free ledger id; clients reserve ranges.
//! - `/bookies/auditor`: ephemeral; held by the bookie that runs
//!   re-replication.

use serde::{Deserialize, Serialize};

pub const BOOKIE_INFO_PREFIX: &str = "/bookies/info/";
pub const BOOKIE_AVAILABLE_PREFIX: &str = "/bookies/available/";
pub const LEDGER_META_PREFIX: &str = "/ledgers/meta/";
pub const LEDGER_IDGEN_KEY: &str = "/ledgers/idgen";
pub const AUDITOR_KEY: &str = "/bookies/auditor";

pub fn bookie_info_key(id: u64) -> String {
    format!("{BOOKIE_INFO_PREFIX}{id}")
}

pub fn bookie_available_key(id: u64) -> String {
    format!("{BOOKIE_AVAILABLE_PREFIX}{id}")
}

pub fn ledger_key(id: u64) -> String {
    format!("{LEDGER_META_PREFIX}{id:020}")
}

pub fn ledger_id_from_key(key: &str) -> Option<u64> {
    key.strip_prefix(LEDGER_META_PREFIX)?.parse().ok()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookieInfo {
    pub id: u64,
    pub addr: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerState {
    Open,
    InRecovery,
    Closed,
}

/// One stretch of a ledger written to one ensemble: from `first_entry` until
/// the next segment's first entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub first_entry: u64,
    pub bookies: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMetadata {
    pub id: u64,
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    pub state: LedgerState,
    /// Last entry of a closed ledger; -1 when it holds none.
    pub last_entry: i64,
    pub segments: Vec<Segment>,
    pub created_ms: u64,
    /// Opaque to the ledger layer; the broker stores what it needs here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub custom: std::collections::BTreeMap<String, String>,
}

impl LedgerMetadata {
    /// The segment (ensemble) entry `entry` was written to.
    pub fn segment_for(&self, entry: u64) -> &Segment {
        let i = self
            .segments
            .partition_point(|s| s.first_entry <= entry)
            .saturating_sub(1);
        &self.segments[i]
    }

    /// Positions in the ensemble of the bookies that store `entry`: the
    /// write quorum, striped round the ensemble.
    pub fn write_set(&self, entry: u64) -> Vec<usize> {
        write_set(entry, self.ensemble_size, self.write_quorum)
    }

    /// Every bookie that ever held part of this ledger.
    pub fn all_bookies(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .segments
            .iter()
            .flat_map(|s| s.bookies.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

pub fn write_set(entry: u64, ensemble: usize, quorum: usize) -> Vec<usize> {
    let e = ensemble.max(1);
    (0..quorum).map(|k| ((entry as usize) + k) % e).collect()
}

/// The checksum every entry carries: CRC32C over the ledger id, the entry id
/// (little-endian u64 each) and the payload, so that an entry stored under
/// the wrong id fails the check too.
pub fn entry_crc(ledger: u64, entry: u64, payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&ledger.to_le_bytes());
    let c = crc32c::crc32c_append(c, &entry.to_le_bytes());
    crc32c::crc32c_append(c, payload)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_sets_stripe_round_the_ensemble() {
        assert_eq!(write_set(0, 3, 2), vec![0, 1]);
        assert_eq!(write_set(2, 3, 2), vec![2, 0]);
        assert_eq!(write_set(7, 3, 3), vec![1, 2, 0]);
    }

    #[test]
    fn segment_lookup() {
        let m = LedgerMetadata {
            id: 1,
            ensemble_size: 2,
            write_quorum: 2,
            ack_quorum: 2,
            state: LedgerState::Open,
            last_entry: -1,
            segments: vec![
                Segment {
                    first_entry: 0,
                    bookies: vec![1, 2],
                },
                Segment {
                    first_entry: 10,
                    bookies: vec![1, 3],
                },
            ],
            created_ms: 0,
            custom: Default::default(),
        };
        assert_eq!(m.segment_for(0).bookies, vec![1, 2]);
        assert_eq!(m.segment_for(9).bookies, vec![1, 2]);
        assert_eq!(m.segment_for(10).bookies, vec![1, 3]);
        assert_eq!(m.segment_for(1000).bookies, vec![1, 3]);
        assert_eq!(m.all_bookies(), vec![1, 2, 3]);
    }

    #[test]
    fn crc_covers_ids() {
        assert_ne!(entry_crc(1, 2, b"x"), entry_crc(1, 3, b"x"));
        assert_ne!(entry_crc(1, 2, b"x"), entry_crc(2, 2, b"x"));
    }
}
