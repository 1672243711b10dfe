//! The object store side: uploads of ledger files, verified before they
//! count, and ranged reads of their blocks through a bounded cache.
//!
//! Every upload goes to fresh object names (the ledger id and a random
//! nonce), so a retried or abandoned attempt never overwrites a file that
//! a ledger list already points to. A file only counts once it has been
//! read back whole and matched its index's checksum; until then the
//! ledger stays where it was.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::{Result, TieringError};
use crate::format::{LedgerIndex, Record};

/// How a tier caches and uploads.
#[derive(Clone, Debug)]
pub struct TierOptions {
    /// Bytes of decoded blocks kept for readers.
    pub cache_bytes: usize,
    /// Blocks fetched ahead of a sequential reader.
    pub read_ahead: usize,
    /// Files larger than this are uploaded in parts of this size (S3 wants
    /// at least 5 MiB per part).
    pub part_bytes: usize,
    /// GETs in flight at once, so that catch-up readers cannot crowd out
    /// everything else the broker does.
    pub max_reads: usize,
}

impl Default for TierOptions {
    fn default() -> Self {
        TierOptions {
            cache_bytes: 64 << 20,
            read_ahead: 2,
            part_bytes: 8 << 20,
            max_reads: 8,
        }
    }
}

/// Where one ledger's file and index live, as a ledger list records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadedLedger {
    /// The Arrow IPC file's object name.
    pub object: String,
    /// The index's object name.
    pub index: String,
    pub file_len: u64,
    pub crc32c: u32,
    pub records: u64,
    /// When the upload was verified.
    pub offloaded_ms: u64,
}

type BlockKey = (String, usize);
type Block = Arc<Vec<Record>>;
type Fetch = Shared<BoxFuture<'static, std::result::Result<Block, String>>>;

#[derive(Default)]
struct Cache {
    blocks: HashMap<BlockKey, (Block, usize, u64)>,
    bytes: usize,
    clock: u64,
}

impl Cache {
    fn get(&mut self, key: &BlockKey) -> Option<Block> {
        self.clock += 1;
        let clock = self.clock;
        self.blocks.get_mut(key).map(|(b, _, used)| {
            *used = clock;
            b.clone()
        })
    }

    /// Least recently used blocks go first. A cache holds a few dozen
    /// blocks, so a scan for the oldest is cheap.
    fn insert(&mut self, key: BlockKey, block: Block, cap: usize) {
        let size: usize = block.iter().map(Record::size).sum();
        if size > cap {
            return;
        }
        self.clock += 1;
        if let Some((_, old, _)) = self.blocks.insert(key, (block, size, self.clock)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > cap {
            let Some(oldest) = self
                .blocks
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, s, _)) = self.blocks.remove(&oldest) {
                self.bytes -= s;
            }
        }
    }

    fn forget(&mut self, object: &str) {
        let gone: Vec<BlockKey> = self
            .blocks
            .keys()
            .filter(|(o, _)| o == object)
            .cloned()
            .collect();
        for k in gone {
            if let Some((_, s, _)) = self.blocks.remove(&k) {
                self.bytes -= s;
            }
        }
    }
}

/// Indexes kept in memory; each is small, but a broker may read many
/// ledgers.
const MAX_INDEXES: usize = 4096;

struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    description: String,
    opts: TierOptions,
    cache: Mutex<Cache>,
    fetching: Mutex<HashMap<BlockKey, Fetch>>,
    indexes: Mutex<HashMap<String, Arc<LedgerIndex>>>,
    reads: Semaphore,
}

/// An object store that holds offloaded ledgers; cheap to clone.
#[derive(Clone)]
pub struct Tier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("store", &self.inner.description)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Tier {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        description: impl Into<String>,
        opts: TierOptions,
    ) -> Tier {
        Tier {
            inner: Arc::new(Inner {
                store,
                prefix: Path::from(prefix),
                description: description.into(),
                reads: Semaphore::new(opts.max_reads.max(1)),
                opts,
                cache: Mutex::default(),
                fetching: Mutex::default(),
                indexes: Mutex::default(),
            }),
        }
    }

    /// A store in memory, for tests.
    pub fn in_memory(opts: TierOptions) -> Tier {
        Tier::new(Arc::new(InMemory::new()), "", "memory://", opts)
    }

    /// A directory of the local filesystem, created if missing.
    pub fn local(dir: impl Into<PathBuf>, opts: TierOptions) -> Result<Tier> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| {
            TieringError::InvalidArgument(format!("creating {}: {e}", dir.display()))
        })?;
        let store = LocalFileSystem::new_with_prefix(&dir)?;
        Ok(Tier::new(
            Arc::new(store),
            "",
            format!("file://{}", dir.display()),
            opts,
        ))
    }

    /// A store named by URL:
    /// - `s3://bucket/prefix`: S3 or an S3-compatible server. Settings come
    ///   from the `AWS_*` environment variables, then from `options`
    ///   (`endpoint`, `region`, `access_key_id`, `secret_access_key`,
    ///   `virtual_hosted_style_request`, …, as `object_store` names them).
    ///   Requests are path-style unless virtual hosts are asked for, as
    ///   MinIO wants, and an `http://` endpoint is allowed as such.
    /// - `file:///dir`: the local filesystem.
    /// - `memory://`: memory.
    pub fn from_url(url: &str, options: &[(String, String)], opts: TierOptions) -> Result<Tier> {
        let bad =
            |why: String| TieringError::InvalidArgument(format!("offload store {url}: {why}"));
        if let Some(dir) = url.strip_prefix("file://") {
            if !options.is_empty() {
                return Err(bad("a file store takes no options".into()));
            }
            return Tier::local(dir, opts);
        }
        if url == "memory://" || url == "memory:///" {
            return Ok(Tier::in_memory(opts));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("expected s3://, file:// or memory://".into()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket".into()));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let mut http = false;
        for (k, v) in options {
            let key =
                AmazonS3ConfigKey::from_str(k).map_err(|_| bad(format!("unknown option {k:?}")))?;
            if key == AmazonS3ConfigKey::Endpoint && v.starts_with("http://") {
                http = true;
            }
            b = b.with_config(key, v);
        }
        if std::env::var("AWS_ENDPOINT").is_ok_and(|e| e.starts_with("http://"))
            || std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://"))
        {
            http = true;
        }
        if http {
            b = b.with_allow_http(true);
        }
        // Failed requests are retried by the offloader with its own
        // backoff, and a reader gets a retriable error: a few quick retries
        // here, not minutes of them.
        b = b.with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..RetryConfig::default()
        });
        let store = b.build()?;
        Ok(Tier::new(Arc::new(store), prefix, url.to_string(), opts))
    }

    /// The store, as configured.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    fn path(&self, name: &str, file: &str) -> Path {
        let mut parts: Vec<object_store::path::PathPart<'_>> = self.inner.prefix.parts().collect();
        parts.extend(name.split('/').filter(|p| !p.is_empty()).map(Into::into));
        parts.push(file.into());
        Path::from_iter(parts)
    }

    /// Uploads one ledger's file and index, reads the file back and checks
    /// it against the index. Only then does the ledger count as offloaded;
    /// on any failure the objects written are removed again.
    pub async fn upload(
        &self,
        name: &str,
        file: Bytes,
        index: &LedgerIndex,
    ) -> Result<OffloadedLedger> {
        let nonce: u64 = rand::random();
        let data = self.path(name, &format!("{}-{nonce:016x}.arrow", index.ledger_id));
        let index_path = self.path(
            name,
            &format!("{}-{nonce:016x}.index.json", index.ledger_id),
        );
        let result = self.upload_to(&data, &index_path, file, index).await;
        if result.is_err() {
            if let Err(e) = self.remove(&[data.clone(), index_path.clone()]).await {
                tracing::debug!(object = %data, "removing a failed upload: {e}");
            }
        }
        result?;
        Ok(OffloadedLedger {
            object: data.to_string(),
            index: index_path.to_string(),
            file_len: index.file_len,
            crc32c: index.crc32c,
            records: index.records,
            offloaded_ms: now_ms(),
        })
    }

    async fn upload_to(
        &self,
        data: &Path,
        index_path: &Path,
        file: Bytes,
        index: &LedgerIndex,
    ) -> Result<()> {
        let store = &self.inner.store;
        let part = self.inner.opts.part_bytes.max(5 << 20);
        if file.len() > part {
            let mut upload = store.put_multipart(data).await?;
            let mut at = 0;
            let mut sent = Ok(());
            while at < file.len() {
                let end = (at + part).min(file.len());
                if let Err(e) = upload.put_part(PutPayload::from(file.slice(at..end))).await {
                    sent = Err(e);
                    break;
                }
                at = end;
            }
            match sent {
                Ok(()) => {
                    upload.complete().await?;
                }
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(e.into());
                }
            }
        } else {
            store.put(data, PutPayload::from(file)).await?;
        }
        let back = store.get(data).await?.bytes().await?;
        index.verify(&back)?;
        let json = index.to_json();
        store
            .put(index_path, PutPayload::from(json.clone()))
            .await?;
        if store.get(index_path).await?.bytes().await? != json {
            return Err(TieringError::Corrupt(format!(
                "index of ledger {} read back differs",
                index.ledger_id
            )));
        }
        Ok(())
    }

    /// Removes a ledger's objects; objects already gone are fine.
    pub async fn delete(&self, ledger: &OffloadedLedger) -> Result<()> {
        lock(&self.inner.cache).forget(&ledger.object);
        lock(&self.inner.indexes).remove(&ledger.object);
        self.remove(&[
            Path::from(ledger.object.as_str()),
            Path::from(ledger.index.as_str()),
        ])
        .await
    }

    /// Deletes objects, each tried even when an earlier one fails; objects
    /// already gone are fine. Returns the first error.
    async fn remove(&self, paths: &[Path]) -> Result<()> {
        let mut result = Ok(());
        for p in paths {
            match self.inner.store.delete(p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) if result.is_ok() => result = Err(e.into()),
                Err(_) => {}
            }
        }
        result
    }

    /// The ledger's index, checked against what the ledger list says.
    pub async fn index(&self, ledger: &OffloadedLedger) -> Result<Arc<LedgerIndex>> {
        if let Some(i) = lock(&self.inner.indexes).get(&ledger.object) {
            return Ok(i.clone());
        }
        let json = {
            let _permit = self.inner.reads.acquire().await;
            self.inner
                .store
                .get(&Path::from(ledger.index.as_str()))
                .await?
                .bytes()
                .await?
        };
        let index = LedgerIndex::from_json(&json)?;
        if index.file_len != ledger.file_len || index.crc32c != ledger.crc32c {
            return Err(TieringError::Corrupt(format!(
                "index {} does not describe the file the ledger list names",
                ledger.index
            )));
        }
        let index = Arc::new(index);
        let mut indexes = lock(&self.inner.indexes);
        if indexes.len() >= MAX_INDEXES {
            indexes.clear();
        }
        indexes.insert(ledger.object.clone(), index.clone());
        Ok(index)
    }

    /// Records from `from` on, from the block holding it and as many
    /// following blocks as fit in about `max_bytes` (at least one
    /// record). The blocks after those are fetched ahead in the
    /// background. An empty result means the ledger holds nothing at or
    /// past `from`.
    pub async fn read(
        &self,
        ledger: &OffloadedLedger,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<Record>> {
        let index = self.index(ledger).await?;
        let blocks = index.blocks_from(from);
        let first = index.blocks.len() - blocks.len();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = first;
        while next < index.blocks.len() && (out.is_empty() || bytes < max_bytes) {
            // Blocks past the first are only taken when already at hand;
            // the rest are the next read's.
            let block = if next == first {
                self.block(ledger, &index, next).await?
            } else {
                match lock(&self.inner.cache).get(&(ledger.object.clone(), next)) {
                    Some(b) => b,
                    None => break,
                }
            };
            for r in block.iter().filter(|r| r.offset >= from) {
                if !out.is_empty() && bytes + r.size() > max_bytes {
                    break;
                }
                bytes += r.size();
                out.push(r.clone());
            }
            next += 1;
        }
        let ahead = next..(next + self.inner.opts.read_ahead).min(index.blocks.len());
        self.read_ahead(ledger, &index, ahead);
        Ok(out)
    }

    fn read_ahead(&self, ledger: &OffloadedLedger, index: &Arc<LedgerIndex>, blocks: Range<usize>) {
        for i in blocks {
            let key = (ledger.object.clone(), i);
            if lock(&self.inner.cache).blocks.contains_key(&key) {
                continue;
            }
            let fetch = self.fetch(ledger, index, i);
            tokio::spawn(async move {
                let _ = fetch.await;
            });
        }
    }

    /// One block's records, from the cache or one ranged GET; concurrent
    /// asks for the same block share the GET.
    async fn block(
        &self,
        ledger: &OffloadedLedger,
        index: &Arc<LedgerIndex>,
        i: usize,
    ) -> Result<Block> {
        if let Some(b) = lock(&self.inner.cache).get(&(ledger.object.clone(), i)) {
            return Ok(b);
        }
        self.fetch(ledger, index, i)
            .await
            .map_err(TieringError::Unavailable)
    }

    fn fetch(&self, ledger: &OffloadedLedger, index: &Arc<LedgerIndex>, i: usize) -> Fetch {
        let key = (ledger.object.clone(), i);
        let mut fetching = lock(&self.inner.fetching);
        if let Some(f) = fetching.get(&key) {
            return f.clone();
        }
        let this = self.clone();
        let index = index.clone();
        let k = key.clone();
        let f = async move {
            let r = this.get_block(&k.0, &index, k.1).await;
            lock(&this.inner.fetching).remove(&k);
            match r {
                Ok(b) => {
                    let b = Arc::new(b);
                    lock(&this.inner.cache).insert(k, b.clone(), this.inner.opts.cache_bytes);
                    Ok(b)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        .boxed()
        .shared();
        fetching.insert(key, f.clone());
        f
    }

    async fn get_block(&self, object: &str, index: &LedgerIndex, i: usize) -> Result<Vec<Record>> {
        let b = index
            .blocks
            .get(i)
            .ok_or_else(|| TieringError::Corrupt(format!("no block {i} in {object}")))?;
        let bytes = {
            let _permit = self.inner.reads.acquire().await;
            self.inner
                .store
                .get_range(&Path::from(object), b.range())
                .await?
        };
        // Checking and decoding a block is CPU work; off the async workers,
        // a catch-up reader does not hold up the tail readers queued there.
        let b = b.clone();
        let records = tokio::task::spawn_blocking(move || b.decode(&bytes))
            .await
            .unwrap_or_else(|e| Err(TieringError::Unavailable(format!("decoding: {e}"))));
        if let Err(e) = &records {
            tracing::error!(object, block = i, "offloaded block refused: {e}");
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    use crate::format::LedgerFileWriter;

    fn records(n: u64, size: usize) -> Vec<Record> {
        (0..n)
            .map(|o| Record {
                offset: 100 + o,
                timestamp_ms: 1_700_000_000_000 + o as i64,
                key: Some(Bytes::from(format!("k{o}"))),
                value: Some(Bytes::from(vec![(o % 251) as u8; size])),
                headers: vec![("h".into(), Some(Bytes::from_static(b"v")))],
                producer_id: None,
                control: false,
            })
            .collect()
    }

    fn file(records: &[Record], block_bytes: usize) -> (Bytes, LedgerIndex) {
        let mut w = LedgerFileWriter::new(9, block_bytes).expect("writer");
        for r in records {
            w.push(r.clone()).expect("push");
        }
        w.finish().expect("finish")
    }

    async fn read_all(tier: &Tier, ledger: &OffloadedLedger, from: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let mut at = from;
        loop {
            let got = tier.read(ledger, at, 10_000).await.expect("read");
            let Some(last) = got.last() else { break };
            at = last.offset + 1;
            out.extend(got);
        }
        out
    }

    #[tokio::test]
    async fn uploads_verify_and_read_back_by_ranges() {
        let tier = Tier::in_memory(TierOptions {
            cache_bytes: 20_000,
            ..TierOptions::default()
        });
        let rs = records(500, 100);
        let (f, index) = file(&rs, 4_000);
        assert!(index.blocks.len() > 10);
        let ledger = tier
            .upload("persistent/t/ns/topic", f, &index)
            .await
            .expect("upload");
        assert!(ledger.object.starts_with("persistent/t/ns/topic/9-"));
        assert_eq!(ledger.records, 500);
        assert_eq!(read_all(&tier, &ledger, 0).await, rs);
        assert_eq!(read_all(&tier, &ledger, 350).await, rs[250..].to_vec());
        assert!(tier.read(&ledger, 600, 1).await.expect("past").is_empty());
        assert!(lock(&tier.inner.cache).bytes <= 20_000);
        tier.delete(&ledger).await.expect("delete");
        assert!(tier.read(&ledger, 100, 1).await.is_err());
        tier.delete(&ledger).await.expect("deleting twice is fine");
    }

    #[tokio::test]
    async fn large_files_go_up_in_parts() {
        let tier = Tier::in_memory(TierOptions::default());
        let rs = records(120, 100_000);
        let (f, index) = file(&rs, 1 << 20);
        assert!(f.len() > 10 << 20);
        let ledger = tier.upload("a/b", f, &index).await.expect("upload");
        assert_eq!(read_all(&tier, &ledger, 0).await, rs);
    }

    #[tokio::test]
    async fn a_corrupt_block_is_an_error_not_data() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let tier = Tier::new(
            store.clone(),
            "pre/fix",
            "memory://",
            TierOptions::default(),
        );
        let rs = records(200, 100);
        let (f, index) = file(&rs, 2_000);
        let ledger = tier.upload("a", f.clone(), &index).await.expect("upload");
        assert!(ledger.object.starts_with("pre/fix/a/"));
        let mut bad = f.to_vec();
        let at = index.blocks[3].start as usize + 40;
        bad[at] ^= 0x55;
        store
            .put(&Path::from(ledger.object.as_str()), Bytes::from(bad).into())
            .await
            .expect("overwrite");
        let fresh = Tier::new(store, "pre/fix", "memory://", TierOptions::default());
        let before: Vec<Record> = rs
            .iter()
            .filter(|r| r.offset < index.blocks[3].first_offset)
            .cloned()
            .collect();
        let mut got = Vec::new();
        let mut at = 0;
        let err = loop {
            match fresh.read(&ledger, at, 1_000).await {
                Ok(rs) => {
                    at = rs.last().expect("records before the bad block").offset + 1;
                    got.extend(rs);
                }
                Err(e) => break e,
            }
        };
        assert_eq!(got, before);
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[tokio::test]
    async fn an_upload_that_reads_back_wrong_counts_for_nothing() {
        let tier = Tier::in_memory(TierOptions::default());
        let rs = records(10, 10);
        let (f, mut index) = file(&rs, 1_000);
        index.crc32c ^= 1;
        let err = tier.upload("a", f, &index).await.expect_err("refused");
        assert!(matches!(err, TieringError::Corrupt(_)), "{err}");
        let left = tier.inner.store.list(None).collect::<Vec<_>>().await;
        assert!(left.is_empty(), "objects left behind: {left:?}");
    }

    #[test]
    fn store_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("tier").display());
        assert!(Tier::from_url(&url, &[], TierOptions::default()).is_ok());
        assert!(Tier::from_url("memory://", &[], TierOptions::default()).is_ok());
        let opts = [
            ("endpoint".to_string(), "http://127.0.0.1:9".to_string()),
            ("region".to_string(), "us-east-1".to_string()),
            ("access_key_id".to_string(), "k".to_string()),
            ("secret_access_key".to_string(), "s".to_string()),
        ];
        let t =
            Tier::from_url("s3://bucket/some/prefix", &opts, TierOptions::default()).expect("s3");
        assert_eq!(
            t.path("x/y", "1.arrow").to_string(),
            "some/prefix/x/y/1.arrow"
        );
        for bad in ["ftp://x", "s3://", "s3:///p"] {
            assert!(
                Tier::from_url(bad, &[], TierOptions::default()).is_err(),
                "{bad}"
            );
        }
        let unknown = [("nonsense".to_string(), "1".to_string())];
        assert!(Tier::from_url("s3://b", &unknown, TierOptions::default()).is_err());
    }
}
