//! The backend seam: everything [`Pool`](crate::Pool) needs from the storage
//! under a pool. Today one implementation, [`LocalBackend`](crate::LocalBackend)
//! (a directory on a local filesystem); a shared-filesystem or Ceph RBD
//! backend implements the same trait and the volume layer, which only talks
//! to `Pool`, does not change.
//!
//! The contract, which the `Pool` relies on for correctness:
//! - [`PoolBackend::lock`] is a pool-wide reader/writer lock that excludes
//!   every other holder (threads, processes, and on shared storage, hosts)
//!   and is released when its holder dies.
//! - Every mutation of records or entries happens under the exclusive lock
//!   and is announced in the journal *before* it is made, so another holder
//!   that reads the journal under the lock rescans exactly what changed.
//! - Staging areas and reservations stay "live" exactly as long as the guard
//!   returned for them (or its process) lives; liveness must not depend on
//!   process ids, which are meaningless across hosts and pid namespaces.

use std::any::Any;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::lock::{LockMode, Wait};
use crate::record::EntryKind;

/// An opaque held resource (a lock, a staging area's liveness token, a
/// reservation); dropping it releases the resource.
pub type BackendGuard = Box<dyn Any + Send + Sync>;

/// Position in the backend's change journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JournalCursor {
    /// Identity of the journal generation (a new one after compaction).
    pub epoch: u64,
    /// Bytes of that generation already consumed.
    pub offset: u64,
}

/// One announced change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// An entry was created, rewritten, resized or removed.
    Entry(EntryKind, String),
    /// The pool's config (`pool.json`) changed.
    Config,
}

/// What [`PoolBackend::journal_read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRead {
    /// These changes happened since the cursor.
    Changes(Vec<Change>, JournalCursor),
    /// The journal was compacted or is unreadable: rescan everything.
    Reset(JournalCursor),
}

/// What one scan of an entry found.
#[derive(Debug, Clone)]
pub struct ScannedEntry {
    /// The entry's directory.
    pub dir: PathBuf,
    /// Its record file.
    pub record_path: PathBuf,
    /// The record's bytes, or why they could not be read.
    pub record: std::result::Result<Vec<u8>, String>,
    /// The image next to the record, if any.
    pub image: Option<crate::record::ImageSummary>,
    /// Host bytes allocated by the entry (directory included, like `du`).
    pub physical: u64,
    /// Half-written record temp files removed (only when asked to clean).
    pub removed: Vec<PathBuf>,
}

/// Something recovery removed or released, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// The file or directory (or reservation file).
    pub path: PathBuf,
    /// What it was.
    pub what: String,
}

/// A live reservation as stored by the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    /// Unique id.
    pub id: uuid::Uuid,
    /// Bytes reserved.
    pub bytes: u64,
    /// Free text from the caller (e.g. `"create volume web-1"`).
    pub purpose: String,
    /// Process that holds it (informational only; liveness is the backend's lock).
    pub pid: u32,
}

/// Filesystem figures of the storage under a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    /// Size of the filesystem (`f_blocks × f_frsize`).
    pub total: u64,
    /// Bytes available to unprivileged users (`f_bavail × f_frsize`).
    pub available: u64,
    /// Fundamental block size (`f_frsize`).
    pub block_size: u64,
}

/// A staging area made by [`PoolBackend::create_staging`].
pub struct StagingArea {
    /// Where in-flight work is built.
    pub path: PathBuf,
    /// Keeps the area live (recovery leaves it alone) while held.
    pub guard: BackendGuard,
}

impl std::fmt::Debug for StagingArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingArea")
            .field("path", &self.path)
            .finish()
    }
}

/// The operations a pool needs from its storage. See the module docs for the
/// contract.
pub trait PoolBackend: Send + Sync + std::fmt::Debug {
    /// Where the pool lives (for messages and descriptions).
    fn location(&self) -> &Path;
    /// Takes the pool lock. `op` names the operation for a `Busy` error.
    fn lock(&self, mode: LockMode, wait: Wait, op: &'static str) -> Result<BackendGuard>;
    /// Reads the pool's config record.
    fn read_config(&self) -> Result<Vec<u8>>;
    /// Replaces the pool's config record atomically (under the exclusive lock).
    fn write_config(&self, bytes: &[u8]) -> Result<()>;
    /// Appends a change announcement (under the exclusive lock); returns the
    /// cursor just past it.
    fn journal_append(&self, change: &Change) -> Result<JournalCursor>;
    /// Reads the changes after `since` (under a lock).
    fn journal_read(&self, since: JournalCursor) -> Result<JournalRead>;
    /// Ids (directory names) of every entry of `kind`, in no particular order.
    fn list_ids(&self, kind: EntryKind) -> Result<Vec<String>>;
    /// Scans one entry; `None` if it does not exist. With `clean`, removes
    /// half-written record temp files (only under the exclusive lock).
    fn scan_entry(&self, kind: EntryKind, id: &str, clean: bool) -> Result<Option<ScannedEntry>>;
    /// Atomically replaces the record of an existing entry.
    fn write_record(&self, kind: EntryKind, id: &str, bytes: &[u8]) -> Result<()>;
    /// Makes a fresh staging area.
    fn create_staging(&self) -> Result<StagingArea>;
    /// Removes an abandoned staging area (best effort; recovery finishes the job).
    fn discard_staging(&self, path: &Path);
    /// Writes `record` into the staging area and moves the area into place as
    /// entry `kind/id` (which must not exist).
    fn commit_staging(&self, path: &Path, kind: EntryKind, id: &str, record: &[u8]) -> Result<()>;
    /// Removes an entry and everything in it.
    fn remove_entry(&self, kind: EntryKind, id: &str) -> Result<()>;
    /// Under the exclusive lock: removes staging leftovers of dead operations,
    /// stray temp files and dead reservations; reports each.
    fn recover(&self) -> Result<Vec<Recovered>>;
    /// Number of staging areas held by live operations.
    fn live_staging(&self) -> Result<usize>;
    /// Records a reservation; it lives until the guard is dropped or its
    /// process dies (under the exclusive lock).
    fn create_reservation(&self, info: &ReservationInfo) -> Result<BackendGuard>;
    /// The live reservations. With `prune` (exclusive lock only), dead ones
    /// are deleted.
    fn live_reservations(&self, prune: bool) -> Result<Vec<ReservationInfo>>;
    /// Filesystem figures.
    fn fs_stats(&self) -> Result<FsStats>;
    /// Host bytes allocated by everything in the pool except the entries
    /// (config, lock, journal, staging, reservations, the directories).
    fn base_physical(&self) -> Result<u64>;
    /// The directory of entry `kind/id`.
    fn entry_dir(&self, kind: EntryKind, id: &str) -> PathBuf;
    /// Removes the pool's layout (undefine); the pool must be empty.
    fn destroy(&self, remove_dir: bool) -> Result<()>;
}
