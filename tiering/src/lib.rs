//! Tiered storage: closed ledgers offloaded to object storage, and read
//! back from it.
//!
//! - [`format`]: the offload format, sans-I/O. One Arrow IPC file per
//!   ledger, with the columns offset, timestamp, key, value and headers, in
//!   record batches of bounded size, and an index that maps offsets to the
//!   byte ranges of those batches, with checksums. Analytics tools (pyarrow,
//!   DuckDB, polars) read the files as they are.

pub mod error;
pub mod format;

pub use error::{Result, TieringError};
pub use format::{BlockIndex, LedgerFileWriter, LedgerIndex, Record};
