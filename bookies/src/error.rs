//! The crate's one error type, shared by the bookie server and the ledger
//! client, with its mapping to and from the wire's result codes.

use crate::proto::Code;

#[derive(Debug, thiserror::Error)]
pub enum BookieError {
    /// The ledger was fenced by a recovering reader; this writer may not add.
    #[error("ledger {0} is fenced")]
    Fenced(u64),

    #[error("bookie is read-only (disk usage above threshold)")]
    ReadOnly,

    #[error("entry {entry} of ledger {ledger} not found")]
    NoEntry { ledger: u64, entry: u64 },

    #[error("ledger {0} not found")]
    NoLedger(u64),

    #[error("entry {entry} of ledger {ledger} failed its CRC32C check")]
    Corrupt { ledger: u64, entry: u64 },

    #[error("bad request: {0}")]
    BadRequest(String),

    /// Not enough writable bookies to form or repair an ensemble.
    #[error("not enough bookies: need {needed}, have {available}")]
    NotEnoughBookies { needed: usize, available: usize },

    /// The ledger is closed (or closing) and takes no more adds.
    #[error("ledger {0} is closed")]
    LedgerClosed(u64),

    /// The writer stopped on an error it could not get past.
    #[error("ledger writer failed: {0}")]
    WriterFailed(String),

    /// A read asked for entries past the last add confirmed.
    #[error("entry {entry} of ledger {ledger} is past the last confirmed entry {lac}")]
    PastLac { ledger: u64, entry: u64, lac: i64 },

    /// Recovery could not decide the ledger's last entry.
    #[error("recovery of ledger {ledger}: {reason}")]
    Recovery { ledger: u64, reason: String },

    /// No replica could serve an entry.
    #[error("entry {entry} of ledger {ledger} unreadable on every replica: {reason}")]
    Unreadable {
        ledger: u64,
        entry: u64,
        reason: String,
    },

    #[error("bookie {bookie}: {message}")]
    Remote { bookie: u64, message: String },

    #[error("metadata: {0}")]
    Meta(#[from] magnetar_metadata::MetaError),

    #[error("configuration: {0}")]
    Config(String),

    #[error("storage: {0}")]
    Storage(String),

    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<rocksdb::Error> for BookieError {
    fn from(e: rocksdb::Error) -> Self {
        BookieError::Storage(e.to_string())
    }
}

impl BookieError {
    /// The wire code a bookie answers with for this error.
    pub fn code(&self) -> Code {
        match self {
            BookieError::Fenced(_) => Code::Fenced,
            BookieError::ReadOnly => Code::ReadOnly,
            BookieError::NoEntry { .. } | BookieError::PastLac { .. } => Code::NoEntry,
            BookieError::NoLedger(_) => Code::NoLedger,
            BookieError::Corrupt { .. } => Code::Corrupt,
            BookieError::BadRequest(_) | BookieError::Config(_) => Code::BadRequest,
            _ => Code::IoError,
        }
    }

    /// The error a client reports for a bookie's non-OK answer.
    pub fn from_code(code: Code, ledger: u64, entry: u64, bookie: u64, message: &str) -> Self {
        match code {
            Code::Fenced => BookieError::Fenced(ledger),
            Code::ReadOnly => BookieError::ReadOnly,
            Code::NoEntry => BookieError::NoEntry { ledger, entry },
            Code::NoLedger => BookieError::NoLedger(ledger),
            Code::Corrupt => BookieError::Corrupt { ledger, entry },
            Code::BadRequest => BookieError::BadRequest(message.to_string()),
            Code::Ok | Code::IoError => BookieError::Remote {
                bookie,
                message: message.to_string(),
            },
        }
    }
}

pub type Result<T, E = BookieError> = std::result::Result<T, E>;
