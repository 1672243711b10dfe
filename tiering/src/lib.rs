//! Tiered storage: closed ledgers offloaded to object storage, and read
//! back from it.
//!
//! - [`format`]: the offload format, sans-I/O. One Arrow IPC file per
//!   ledger, with the columns offset, timestamp, key, value and headers, in
//!   record batches of bounded size, and an index that maps offsets to the
//!   byte ranges of those batches, with checksums. Analytics tools (pyarrow,
//!   DuckDB, polars) read the files as they are.

//! - [`store`]: the object store (S3 and compatible servers such as
//!   MinIO, the local filesystem, memory): verified uploads, and ranged
//!   reads through a bounded block cache with read-ahead.

pub mod error;
pub mod format;
pub mod store;

pub use error::{Result, TieringError};
pub use format::{BlockIndex, LedgerFileWriter, LedgerIndex, Record};
pub use store::{OffloadedLedger, Tier, TierOptions};
