//! The journal: the write-ahead log that makes an add durable.
//!
//! Records are framed as `[len u32][crc32c u32][body]`, all little endian.
//! The journal thread takes whatever requests are queued, up to a byte
//! budget or a wait limit, writes them with one `write` and one
//! `fdatasync`, and only then hands them on. One fsync thus covers many
//! adds: per-entry fsync would cap a bookie at the disk's sync rate.
//!
//! Files are `journal/{seq:012}.log`. A new file is started at every start
//! and when the current one passes its size limit; files wholly behind the
//! last checkpoint are deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};

use crate::error::{BookieError, Result};

const REC_ADD: u8 = 1;
const REC_FENCE: u8 = 2;

/// A position in the journal: file sequence number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct JournalPos {
    pub file: u64,
    pub offset: u64,
}

impl JournalPos {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.file.to_be_bytes());
        b[8..].copy_from_slice(&self.offset.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 16 {
            return None;
        }
        let mut file = [0u8; 8];
        let mut offset = [0u8; 8];
        file.copy_from_slice(&b[..8]);
        offset.copy_from_slice(&b[8..]);
        Some(Self {
            file: u64::from_be_bytes(file),
            offset: u64::from_be_bytes(offset),
        })
    }
}

/// An entry as stored: ids, the writer's LAC, the CRC it came with, and the
/// payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub ledger: u64,
    pub entry: u64,
    pub lac: i64,
    pub crc: u32,
    pub payload: Bytes,
}

impl StoredEntry {
    /// Ids, LAC, CRC and payload: the body journal records and entry-log
    /// records share.
    pub(crate) fn put_fields(&self, out: &mut Vec<u8>) {
        out.put_u64_le(self.ledger);
        out.put_u64_le(self.entry);
        out.put_i64_le(self.lac);
        out.put_u32_le(self.crc);
        out.extend_from_slice(&self.payload);
    }

    pub(crate) const FIELDS_HEADER: usize = 8 + 8 + 8 + 4;

    /// Parses what `put_fields` wrote; the payload shares `body`'s memory.
    pub(crate) fn get_fields(body: Bytes) -> Option<Self> {
        if body.len() < Self::FIELDS_HEADER {
            return None;
        }
        let mut b = &body[..];
        let (ledger, entry, lac, crc) = (
            b.get_u64_le(),
            b.get_u64_le(),
            b.get_i64_le(),
            b.get_u32_le(),
        );
        Some(Self {
            ledger,
            entry,
            lac,
            crc,
            payload: body.slice(Self::FIELDS_HEADER..),
        })
    }
}

/// What a journal record does once durable.
#[derive(Debug, Clone)]
pub enum Record {
    Add(StoredEntry),
    Fence(u64),
}

impl Record {
    pub fn encoded_len(&self) -> usize {
        8 + match self {
            Record::Add(e) => 1 + 8 + 8 + 8 + 4 + e.payload.len(),
            Record::Fence(_) => 1 + 8,
        }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u32_le(0);
        match self {
            Record::Add(e) => {
                out.put_u8(REC_ADD);
                e.put_fields(out);
            }
            Record::Fence(ledger) => {
                out.put_u8(REC_FENCE);
                out.put_u64_le(*ledger);
            }
        }
        let body_len = (out.len() - start - 8) as u32;
        let crc = crc32c::crc32c(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(body: Bytes) -> Option<Record> {
        match *body.first()? {
            REC_ADD => StoredEntry::get_fields(body.slice(1..)).map(Record::Add),
            REC_FENCE if body.len() == 9 => {
                let mut b = &body[1..];
                Some(Record::Fence(b.get_u64_le()))
            }
            _ => None,
        }
    }
}

/// A batch of records from one request, acknowledged together. The
/// journal thread encodes them straight into its write buffer.
pub struct JournalReq {
    pub records: Vec<Record>,
    pub done: tokio::sync::oneshot::Sender<Result<()>>,
    pub queued: Queued,
}

/// A request's place in the journal's queue: counted in the queue's
/// depth until it is written or refused (when it is dropped), and when it
/// was submitted.
pub struct Queued {
    pub since: Instant,
    depth: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Queued {
    pub fn new(depth: &std::sync::Arc<std::sync::atomic::AtomicI64>) -> Self {
        depth.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Queued {
            since: Instant::now(),
            depth: depth.clone(),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// How long the first request of a batch may wait for company.
    pub max_wait: Duration,
    /// A batch is written once it holds this many bytes.
    pub max_batch_bytes: usize,
    /// Start a new file past this size.
    pub max_file_bytes: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_micros(500),
            max_batch_bytes: 4 << 20,
            max_file_bytes: 512 << 20,
        }
    }
}

pub fn journal_dir(data: &Path) -> PathBuf {
    data.join("journal")
}

fn file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:012}.log"))
}

/// The numbers of the `N.log` files in `dir`, in order; journals and entry
/// logs are both named so.
pub fn list_numbered<T: std::str::FromStr + Ord>(dir: &Path) -> Result<Vec<T>> {
    let mut ids = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        if let Some(id) = name
            .to_string_lossy()
            .strip_suffix(".log")
            .and_then(|s| s.parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads every intact record at or after `from`, in order, calling `apply`
/// with each and the position just past it. A torn or corrupt tail (a crash
/// mid-write) ends a file's replay; the file is truncated there so that the
/// garbage cannot be mistaken for records later.
pub fn replay(
    dir: &Path,
    from: JournalPos,
    mut apply: impl FnMut(Record, JournalPos),
) -> Result<u64> {
    let mut last_seq = 0;
    for seq in list_numbered::<u64>(dir)? {
        last_seq = seq;
        if seq < from.file {
            continue;
        }
        let path = file_path(dir, seq);
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let data = Bytes::from(data);
        let mut off = if seq == from.file {
            from.offset as usize
        } else {
            0
        };
        let mut good = off;
        while off + 8 <= data.len() {
            let len = u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            let crc =
                u32::from_le_bytes([data[off + 4], data[off + 5], data[off + 6], data[off + 7]]);
            let end = off + 8 + len;
            if len == 0 || end > data.len() || crc32c::crc32c(&data[off + 8..end]) != crc {
                break;
            }
            let Some(rec) = Record::decode(data.slice(off + 8..end)) else {
                break;
            };
            off = end;
            good = end;
            apply(
                rec,
                JournalPos {
                    file: seq,
                    offset: end as u64,
                },
            );
        }
        if good < data.len() {
            tracing::warn!(
                file = %path.display(),
                at = good,
                dropped = data.len() - good,
                "journal ends in a torn record; truncating"
            );
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(good as u64)?;
            f.sync_all()?;
        }
    }
    Ok(last_seq)
}

/// Deletes journal files that lie wholly before `checkpoint`.
pub fn remove_before(dir: &Path, checkpoint: JournalPos) -> Result<()> {
    for seq in list_numbered::<u64>(dir)? {
        if seq < checkpoint.file {
            fs::remove_file(file_path(dir, seq))?;
        }
    }
    Ok(())
}

pub struct JournalWriter {
    dir: PathBuf,
    cfg: JournalConfig,
    seq: u64,
    file: File,
    offset: u64,
}

impl JournalWriter {
    /// Opens a fresh file after `last_seq`.
    pub fn open(dir: &Path, last_seq: u64, cfg: JournalConfig) -> Result<Self> {
        let seq = last_seq + 1;
        let file = create_file(dir, seq)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            seq,
            file,
            offset: 0,
        })
    }

    pub fn position(&self) -> JournalPos {
        JournalPos {
            file: self.seq,
            offset: self.offset,
        }
    }

    /// The journal thread's loop: batch, write, fsync, hand on. `durable`
    /// applies a batch once it is on disk; `on_sync` learns how many records
    /// each fsync covered. Errors fail the batch's requests.
    ///
    /// A failed write or fsync stops the journal for good (until the bookie
    /// restarts): the file may hold part of the failed batch, and after a
    /// failed fsync the kernel may have dropped dirty pages it still
    /// reports as written, so appending after it would put acknowledged
    /// records behind bytes that replay reads as a torn tail. Every later
    /// batch fails without touching the file; `on_fail` turns the bookie
    /// read-only, so that writers move to other bookies. Replay at restart
    /// cuts the file at the last whole record, which loses only the batch
    /// that was never acknowledged.
    pub fn run(
        mut self,
        rx: Receiver<JournalReq>,
        mut durable: impl FnMut(Vec<JournalReq>, JournalPos),
        mut on_sync: impl FnMut(usize, usize, std::time::Duration),
        mut on_fail: impl FnMut(),
    ) {
        let mut failed: Option<String> = None;
        let mut buf = Vec::with_capacity(self.cfg.max_batch_bytes + (1 << 20));
        while let Ok(first) = rx.recv() {
            let deadline = Instant::now() + self.cfg.max_wait;
            let size = |r: &JournalReq| r.records.iter().map(Record::encoded_len).sum::<usize>();
            let mut bytes = size(&first);
            let mut batch = vec![first];
            while bytes < self.cfg.max_batch_bytes {
                let next = match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            None
                        } else {
                            match rx.recv_timeout(deadline - now) {
                                Ok(r) => Some(r),
                                Err(RecvTimeoutError::Timeout)
                                | Err(RecvTimeoutError::Disconnected) => None,
                            }
                        }
                    }
                };
                let Some(r) = next else { break };
                bytes += size(&r);
                batch.push(r);
            }
            buf.clear();
            for r in &batch {
                for rec in &r.records {
                    rec.encode_into(&mut buf);
                }
            }
            let started = Instant::now();
            let written = match &failed {
                Some(why) => Err(why.clone()),
                None => self.write_and_sync(&buf).map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => {
                    on_sync(
                        batch.iter().map(|r| r.records.len()).sum(),
                        buf.len(),
                        started.elapsed(),
                    );
                    durable(batch, self.position());
                }
                Err(e) => {
                    if failed.is_none() {
                        tracing::error!(
                            error = %e,
                            "journal write failed; the bookie is read-only until it restarts"
                        );
                        failed = Some(e.clone());
                        on_fail();
                    }
                    for r in batch {
                        let _ = r
                            .done
                            .send(Err(BookieError::Storage(format!("journal write: {e}"))));
                    }
                }
            }
            if failed.is_none() && self.offset >= self.cfg.max_file_bytes {
                if let Err(e) = self.roll() {
                    tracing::error!(error = %e, "journal roll failed");
                }
            }
        }
    }

    fn write_and_sync(&mut self, buf: &[u8]) -> Result<()> {
        self.file.write_all(buf)?;
        crate::storage::fault::check("bookie::journal::sync", &self.dir)?;
        self.file.sync_data()?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn roll(&mut self) -> Result<()> {
        let file = create_file(&self.dir, self.seq + 1)?;
        self.seq += 1;
        self.file = file;
        self.offset = 0;
        Ok(())
    }
}

fn create_file(dir: &Path, seq: u64) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(file_path(dir, seq))?;
    // The new name must survive a crash as well as the data in it.
    File::open(dir)?.sync_all()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ledger: u64, entry: u64, payload: &'static [u8]) -> Record {
        Record::Add(StoredEntry {
            ledger,
            entry,
            lac: entry as i64 - 1,
            crc: 7,
            payload: Bytes::from_static(payload),
        })
    }

    #[test]
    fn records_round_trip_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jd = dir.path();
        let mut buf = Vec::new();
        for r in [add(1, 0, b"hello"), Record::Fence(1), add(2, 5, b"")] {
            let before = buf.len();
            r.encode_into(&mut buf);
            assert_eq!(buf.len() - before, r.encoded_len());
        }
        let good = buf.len();
        // Half a record, as a crash mid-write leaves it.
        let mut torn = Vec::new();
        add(3, 0, b"torn record").encode_into(&mut torn);
        buf.extend_from_slice(&torn[..torn.len() / 2]);
        fs::write(file_path(jd, 1), &buf).expect("write");

        let mut seen = Vec::new();
        let last = replay(jd, JournalPos::default(), |r, pos| seen.push((r, pos))).expect("replay");
        assert_eq!(last, 1);
        assert_eq!(seen.len(), 3);
        assert!(
            matches!(&seen[0].0, Record::Add(e) if e.ledger == 1 && &e.payload[..] == b"hello")
        );
        assert!(matches!(seen[1].0, Record::Fence(1)));
        assert_eq!(seen[2].1.offset as usize, good);
        assert_eq!(
            fs::metadata(file_path(jd, 1)).expect("meta").len() as usize,
            good
        );

        // Replay from a checkpoint skips what is before it.
        let mut after = 0;
        replay(jd, seen[0].1, |_, _| after += 1).expect("replay");
        assert_eq!(after, 2);
    }

    #[test]
    fn a_flipped_bit_ends_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut buf = Vec::new();
        add(1, 0, b"one").encode_into(&mut buf);
        let first = buf.len();
        add(1, 1, b"two").encode_into(&mut buf);
        buf[first + 20] ^= 0x40;
        fs::write(file_path(dir.path(), 3), &buf).expect("write");
        let mut n = 0;
        replay(dir.path(), JournalPos::default(), |_, _| n += 1).expect("replay");
        assert_eq!(n, 1);
    }

    /// Whatever a crash or a bad disk leaves in a journal file (a cut
    /// anywhere, a flipped bit anywhere), replay never panics and yields
    /// an unaltered prefix of what was written.
    #[test]
    fn replay_of_damaged_files_yields_a_prefix() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..300 {
            let dir = tempfile::tempdir().expect("tempdir");
            let n = rng.random_range(1..20);
            let mut written = Vec::new();
            let mut buf = Vec::new();
            for i in 0..n {
                let rec = if rng.random_bool(0.2) {
                    Record::Fence(i)
                } else {
                    let len = rng.random_range(0..300);
                    let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    Record::Add(StoredEntry {
                        ledger: rng.random_range(1..4),
                        entry: i,
                        lac: i as i64 - 1,
                        crc: rng.random(),
                        payload: Bytes::from(payload),
                    })
                };
                rec.encode_into(&mut buf);
                written.push(rec);
            }
            match round % 3 {
                0 => {
                    let cut = rng.random_range(0..=buf.len());
                    buf.truncate(cut);
                }
                1 => {
                    let at = rng.random_range(0..buf.len());
                    buf[at] ^= 1 << rng.random_range(0..8);
                }
                _ => {
                    let extra: Vec<u8> =
                        (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                    buf.extend(extra);
                }
            }
            fs::write(file_path(dir.path(), 1), &buf).expect("write");
            let mut got = Vec::new();
            replay(dir.path(), JournalPos::default(), |r, _| got.push(r)).expect("replay");
            assert!(got.len() <= written.len());
            for (a, b) in got.iter().zip(&written) {
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "round {round}");
            }
            if round % 3 == 2 {
                assert_eq!(got.len(), written.len(), "trailing garbage loses nothing");
            }
        }
    }

    #[test]
    fn positions_encode_in_order() {
        let a = JournalPos {
            file: 1,
            offset: 900,
        };
        let b = JournalPos { file: 2, offset: 3 };
        assert!(a.encode() < b.encode());
        assert_eq!(JournalPos::decode(&b.encode()), Some(b));
    }
}
