//! The state machine as openraft sees it, and its snapshots.
//!
//! The key-value state lives in memory: metadata is small, and reads then cost
//! a map lookup. Durability comes from the raft log plus snapshot files: a
//! node restarts from its last snapshot and replays the log after it.
//! Snapshots are written to a temporary file, fsynced and renamed, so a crash
//! leaves either the old snapshot or the new one.

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::{CommandResult, Event, KvState, StateData};
use crate::types::TypeConfig;

type StoreResult<T> = Result<T, StorageError<u64>>;

/// What watchers hear about.
#[derive(Debug, Clone)]
pub enum Update {
    /// Events of one applied batch, in revision order.
    Events(Arc<[Event]>),
    /// A snapshot replaced the state; events up to this revision are gone.
    Reset { compacted: u64 },
}

#[derive(Debug)]
pub struct Applied {
    pub kv: KvState,
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
}

/// The state shared between raft (which applies) and the RPC handlers
/// (which read and watch).
#[derive(Debug)]
pub struct SharedState {
    applied: RwLock<Applied>,
    updates: broadcast::Sender<Update>,
}

impl SharedState {
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribe while holding the read guard: updates are published under
    /// the write lock, so nothing falls between what the guard shows and
    /// what the receiver gets.
    pub fn subscribe(&self, _guard: &RwLockReadGuard<'_, Applied>) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

pub struct StateMachineStore {
    shared: Arc<SharedState>,
    dir: PathBuf,
    counter: Arc<AtomicU64>,
    persisted: Persisted,
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::new(&e)).into()
}

const SNAPSHOT_FILE: &str = "snapshot.bin";

impl StateMachineStore {
    /// Opens the state at `dir`, starting from the snapshot stored there.
    pub fn open(dir: &Path) -> Result<Self, crate::MetaError> {
        fs::create_dir_all(dir)?;
        let (updates, _) = broadcast::channel(1024);
        let mut applied = Applied {
            kv: KvState::default(),
            last_applied: None,
            membership: StoredMembership::default(),
        };
        let mut on_disk = None;
        if let Some(file) = read_snapshot_file(dir)? {
            on_disk = file.meta.last_log_id;
            let data: StateData = postcard::from_bytes(&file.data)
                .map_err(|e| crate::MetaError::Storage(format!("corrupt snapshot: {e}")))?;
            applied.kv = KvState::from_data(data);
            applied.last_applied = file.meta.last_log_id;
            applied.membership = file.meta.last_membership;
        }
        Ok(Self {
            shared: Arc::new(SharedState {
                applied: RwLock::new(applied),
                updates,
            }),
            dir: dir.to_path_buf(),
            counter: Arc::new(AtomicU64::new(0)),
            persisted: Arc::new(Mutex::new(on_disk)),
        })
    }

    pub fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }

    fn builder(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
            counter: self.counter.clone(),
            persisted: self.persisted.clone(),
        }
    }
}

fn read_snapshot_file(dir: &Path) -> Result<Option<SnapshotFile>, std::io::Error> {
    match fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("corrupt snapshot file: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The log id of the snapshot on disk. Building (openraft's own task) and
/// installing (from the leader) may race; this lock orders their writes, and
/// an older snapshot never replaces a newer one.
type Persisted = Arc<Mutex<Option<LogId<u64>>>>;

fn write_snapshot_file(
    dir: &Path,
    file: &SnapshotFile,
    persisted: &Persisted,
) -> std::io::Result<()> {
    let mut on_disk = persisted.lock().unwrap_or_else(PoisonError::into_inner);
    if on_disk.is_some() && *on_disk >= file.meta.last_log_id {
        return Ok(());
    }
    let bytes = postcard::to_allocvec(file).map_err(std::io::Error::other)?;
    let tmp = dir.join("snapshot.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    fs::File::open(dir)?.sync_all()?;
    *on_disk = file.meta.last_log_id;
    Ok(())
}

/// Writes `file` off the runtime: serialising and syncing a large state must
/// not stall raft's tasks.
async fn persist(
    dir: PathBuf,
    file: SnapshotFile,
    persisted: Persisted,
) -> StoreResult<SnapshotFile> {
    tokio::task::spawn_blocking(move || write_snapshot_file(&dir, &file, &persisted).map(|()| file))
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))
}

pub struct SnapshotBuilder {
    shared: Arc<SharedState>,
    dir: PathBuf,
    counter: Arc<AtomicU64>,
    persisted: Persisted,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (data, last_log_id, last_membership) = {
            let st = self.shared.read();
            let data =
                postcard::to_allocvec(&st.kv.data).map_err(|e| snap_err(ErrorVerb::Write, e))?;
            (data, st.last_applied, st.membership.clone())
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{n}", l.leader_id.term, l.index),
            None => format!("0-0-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let file = SnapshotFile { meta, data };
        let file = persist(self.dir.clone(), file, self.persisted.clone()).await?;
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let st = self.shared.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut st = self.shared.write();
        let mut results = Vec::new();
        let mut events = Vec::new();
        for entry in entries {
            st.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Noop,
                EntryPayload::Normal(cmd) => st.kv.apply(cmd, &mut events),
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Noop
                }
            };
            results.push(result);
        }
        if !events.is_empty() {
            // Nobody listening is not an error.
            let _ = self.shared.updates.send(Update::Events(events.into()));
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let file = SnapshotFile {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let data: StateData =
            postcard::from_bytes(&file.data).map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let file = persist(self.dir.clone(), file, self.persisted.clone()).await?;
        let mut st = self.shared.write();
        let compacted = data.revision;
        st.kv = KvState::from_data(data);
        st.last_applied = file.meta.last_log_id;
        st.membership = file.meta.last_membership;
        let _ = self.shared.updates.send(Update::Reset { compacted });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let dir = self.dir.clone();
        let file = tokio::task::spawn_blocking(move || read_snapshot_file(&dir))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}
