//! The backend seam: everything [`Pool`](crate::Pool) needs from the storage
//! under a pool, split by concern into small capability traits and joined by
//! [`PoolBackend`] (implemented for every type that has them all).
//!
//! Implementations: [`LocalBackend`](crate::local::LocalBackend) (a directory
//! on a local filesystem) and, with the `test-utils` feature,
//! `memory::MemoryBackend`. A Ceph RBD backend
//! implements the same traits; the volume layer, which only talks to
//! [`Pool`](crate::Pool), does not change.
//!
//! # What a backend must guarantee
//!
//! - **Lock with fencing** ([`PoolLock`]): a pool-wide reader/writer lock
//!   that excludes every other holder (threads, processes, hosts) and is
//!   released when its holder dies. The exclusive guard carries a fencing
//!   token; every mutating call takes the guard and must refuse
//!   ([`Error::Fenced`](crate::Error::Fenced)) if the lock behind the token is
//!   no longer held (a lease that lapsed). A kernel `flock` cannot lapse while
//!   its holder lives, so the local backend's check is trivial.
//! - **Ordered journal** ([`ChangeJournal`]): every mutation of records or
//!   entries is announced *before* it is made, under the exclusive lock; a
//!   reader under the lock sees announcements in order and either all of
//!   them since its cursor or a [`JournalRead::Reset`].
//! - **Atomic record replace** ([`RecordStore`]): a crash leaves the old or
//!   the new record, never a mix; a committed entry appears complete or not
//!   at all.
//! - **Liveness** ([`Liveness`]): staging areas and reservations stay live
//!   exactly as long as the hold returned for them (or its process) lives,
//!   without pids or clocks of other hosts; recovery removes the dead ones.
//! - **Images** ([`ImageStore`]): images are named by [`ImageRef`], never by
//!   path; the store creates, links, copies, opens, grows, compacts,
//!   summarises, moves and removes them and says what a VMM attaches.
//! - **Space figures** ([`SpaceFigures`]): size and free space of the storage.

use std::any::Any;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmvol_format::{BlockIo, CompactOptions, CompactReport, Control, Format};

use crate::error::Result;
use crate::image::{AttachTarget, ImageRef, ImageSpec, ImageSummary};
use crate::lock::Wait;
use crate::record::EntryKind;

/// A fencing token: identifies one tenure of the exclusive lock. A backend
/// whose lock is a lease increments it whenever the lease changes hands or
/// lapses; a write carrying an older token is refused.
pub type FenceToken = u64;

/// Proof that the caller holds the pool's exclusive lock; every mutating
/// backend call takes it. Dropping it releases the lock.
pub struct ExclusiveGuard {
    token: FenceToken,
    _hold: Box<dyn Any + Send + Sync>,
}

impl ExclusiveGuard {
    /// Made by a backend's [`PoolLock::lock_exclusive`]: `hold` keeps the
    /// lock (dropped with the guard), `token` is this tenure's fencing token.
    pub fn new(token: FenceToken, hold: impl Any + Send + Sync) -> ExclusiveGuard {
        ExclusiveGuard {
            token,
            _hold: Box::new(hold),
        }
    }

    /// This tenure's fencing token.
    pub fn token(&self) -> FenceToken {
        self.token
    }
}

impl std::fmt::Debug for ExclusiveGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusiveGuard")
            .field("token", &self.token)
            .finish()
    }
}

/// Proof that the caller holds the pool's lock in shared mode (reads).
pub struct SharedGuard {
    _hold: Box<dyn Any + Send + Sync>,
}

impl SharedGuard {
    /// Made by a backend's [`PoolLock::lock_shared`].
    pub fn new(hold: impl Any + Send + Sync) -> SharedGuard {
        SharedGuard {
            _hold: Box::new(hold),
        }
    }
}

impl std::fmt::Debug for SharedGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedGuard")
    }
}

/// Keeps a staging area or reservation live while held (or until its
/// process dies). Dropping it releases the resource.
pub struct LivenessHold {
    _hold: Box<dyn Any + Send + Sync>,
}

impl LivenessHold {
    /// Wraps whatever keeps the resource live.
    pub fn new(hold: impl Any + Send + Sync) -> LivenessHold {
        LivenessHold {
            _hold: Box::new(hold),
        }
    }
}

impl std::fmt::Debug for LivenessHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LivenessHold")
    }
}

/// Position in the backend's change journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JournalCursor {
    /// Identity of the journal generation (a new one after compaction).
    pub epoch: u64,
    /// Position in that generation already consumed.
    pub offset: u64,
}

/// One announced change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// An entry was created, rewritten, resized or removed.
    Entry(EntryKind, String),
    /// The pool's config changed.
    Config,
}

/// What [`ChangeJournal::journal_read`] found.
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
    /// Where the record lives (for messages only).
    pub record_path: PathBuf,
    /// The record's bytes, or why they could not be read.
    pub record: std::result::Result<Vec<u8>, String>,
    /// The entry's images, sorted by name.
    pub images: Vec<ImageSummary>,
    /// Host bytes allocated by the entry (everything in it, like `du`).
    pub physical: u64,
    /// Half-written record temp files removed (only when asked to clean).
    pub removed: Vec<PathBuf>,
}

/// Something recovery removed or released, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// The file, directory or object (for messages).
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
    /// Process that holds it (informational only; liveness is the backend's).
    pub pid: u32,
    /// The bytes will really be written (preallocated raw, full copy,
    /// compaction output): checked against free space as well as the policy.
    /// Absent in reservations written before this field existed.
    #[serde(default)]
    pub physical: bool,
}

/// Space figures of the storage under a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    /// Size of the storage (local: `f_blocks × f_frsize`).
    pub total: u64,
    /// Bytes that can still be written (local: `f_bavail × f_frsize`).
    pub available: u64,
    /// Allocation unit (local: `f_frsize`).
    pub block_size: u64,
}

/// A staging area made by [`Liveness::create_staging`].
#[derive(Debug)]
pub struct StagingArea {
    /// Backend-neutral identity of the area.
    pub id: uuid::Uuid,
    /// Keeps the area live (recovery leaves it alone) while held.
    pub hold: LivenessHold,
}

/// The pool lock. Contract: exclusive excludes every other holder (threads,
/// processes, hosts); shared excludes exclusive holders; the lock is
/// released when the holder dies. `op` names the operation for a
/// [`Error::Busy`](crate::Error::Busy) message.
pub trait PoolLock {
    /// Where the pool lives, for messages and descriptions (local: the
    /// directory; elsewhere a URI-like name). Never joined by callers.
    fn location(&self) -> &Path;
    /// Takes the lock shared.
    fn lock_shared(&self, wait: Wait, op: &'static str) -> Result<SharedGuard>;
    /// Takes the lock exclusively; the guard carries the fencing token.
    fn lock_exclusive(&self, wait: Wait, op: &'static str) -> Result<ExclusiveGuard>;
    /// Refuses with [`Error::Fenced`](crate::Error::Fenced) if `guard`'s
    /// tenure is over (its lease lapsed or passed to another holder). Every
    /// mutating call of the other traits calls this first.
    fn check_fence(&self, guard: &ExclusiveGuard, op: &'static str) -> Result<()>;
}

/// The change journal. Contract: appends are ordered and made under the
/// exclusive lock before the change they announce; reads return every
/// change after a cursor, or `Reset` when that cannot be known.
pub trait ChangeJournal {
    /// Appends a change announcement; returns the cursor just past it.
    fn journal_append(&self, guard: &ExclusiveGuard, change: &Change) -> Result<JournalCursor>;
    /// Reads the changes after `since` (under either lock).
    fn journal_read(&self, since: JournalCursor) -> Result<JournalRead>;
}

/// Records: the pool config and one record per entry. Contract: every
/// replace is atomic (old or new survives a crash), a committed entry
/// appears whole or not at all, and every mutation is fenced.
pub trait RecordStore {
    /// Where the config record lives, for messages only.
    fn config_path(&self) -> PathBuf;
    /// Reads the pool's config record.
    fn read_config(&self) -> Result<Vec<u8>>;
    /// Replaces the pool's config record atomically.
    fn write_config(&self, guard: &ExclusiveGuard, bytes: &[u8]) -> Result<()>;
    /// Ids of every entry of `kind`, in no particular order.
    fn list_ids(&self, kind: EntryKind) -> Result<Vec<String>>;
    /// Scans one entry; `None` if it does not exist. With `clean` (a guard),
    /// removes half-written record temp files.
    fn scan_entry(
        &self,
        kind: EntryKind,
        id: &str,
        clean: Option<&ExclusiveGuard>,
    ) -> Result<Option<ScannedEntry>>;
    /// Atomically replaces the record of an existing entry.
    fn write_record(
        &self,
        guard: &ExclusiveGuard,
        kind: EntryKind,
        id: &str,
        bytes: &[u8],
    ) -> Result<()>;
    /// Makes every image of the staging area durable (they may have been
    /// written without flushes or crash ordering), writes `record` into the
    /// area and moves the area into place as entry `kind/id` (which must
    /// not exist), atomically.
    fn commit_staging(
        &self,
        guard: &ExclusiveGuard,
        area: &StagingArea,
        kind: EntryKind,
        id: &str,
        record: &[u8],
    ) -> Result<()>;
    /// Removes an entry and everything in it.
    fn remove_entry(&self, guard: &ExclusiveGuard, kind: EntryKind, id: &str) -> Result<()>;
    /// Removes the pool's layout (undefine); the pool must be empty.
    fn destroy(&self, guard: ExclusiveGuard, remove_dir: bool) -> Result<()>;
}

/// Liveness of in-flight work. Contract: a staging area or reservation is
/// live exactly while its [`LivenessHold`] (or its process) lives; recovery
/// (under the exclusive lock) removes the dead ones and nothing else.
pub trait Liveness {
    /// Makes a fresh staging area. The caller holds the pool lock (either
    /// mode), so recovery, which needs the exclusive lock, cannot see the
    /// area before its hold exists. Not fenced: nothing in it is visible
    /// until a fenced commit.
    fn create_staging(&self) -> Result<StagingArea>;
    /// Removes an abandoned staging area (best effort; recovery finishes).
    fn discard_staging(&self, area: &StagingArea);
    /// Number of staging areas held by live operations.
    fn live_staging(&self) -> Result<usize>;
    /// Removes staging leftovers of dead operations, stray temp files and
    /// dead reservations; reports each.
    fn recover(&self, guard: &ExclusiveGuard) -> Result<Vec<Recovered>>;
    /// Records a reservation, live until the hold is dropped.
    fn create_reservation(
        &self,
        guard: &ExclusiveGuard,
        info: &ReservationInfo,
    ) -> Result<LivenessHold>;
    /// The live reservations. With a guard, dead ones are deleted.
    fn live_reservations(&self, prune: Option<&ExclusiveGuard>) -> Result<Vec<ReservationInfo>>;
}

/// Images, named by [`ImageRef`]. Contract: staging operations need no pool
/// lock (the area is private to its holder until committed); operations on
/// committed images that change them are fenced; a linked image records its
/// base so that it keeps working after the base's entry is committed
/// (local: a relative backing name and the backing format).
pub trait ImageStore {
    /// Creates image `name` in a staging area.
    fn create_image(
        &self,
        area: &StagingArea,
        name: &str,
        spec: &ImageSpec,
        ctl: &Control,
    ) -> Result<ImageRef>;
    /// The format of the images [`ImageStore::create_linked`] makes, which
    /// is also what an image of that format can be linked to and compacted
    /// as (local: qcow2 overlays). A store that keeps every image in one
    /// format says which (RBD: raw, links being clones), and the images it
    /// returns carry it whatever format was asked for.
    fn linked_format(&self) -> Format {
        Format::Qcow2
    }
    /// Creates image `name` in a staging area as a thin overlay on `base`;
    /// `size` (at least the base's) defaults to the base's size.
    fn create_linked(
        &self,
        area: &StagingArea,
        name: &str,
        base: &ImageRef,
        size: Option<u64>,
    ) -> Result<ImageRef>;
    /// Copies what `src` shows (its chain flattened) into a new independent
    /// image `name` in a staging area.
    fn copy_full(
        &self,
        area: &StagingArea,
        name: &str,
        src: &ImageRef,
        format: Format,
        ctl: &Control,
    ) -> Result<ImageRef>;
    /// Opens an image for I/O (its chain limited to the pool). A writable
    /// open of a staged image may skip crash ordering (local: qcow2
    /// `unordered` mode): a crash discards the staging area, and
    /// [`RecordStore::commit_staging`] makes the image durable first.
    fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>>;
    /// Grows a committed image to `new_size` bytes.
    fn grow_image(&self, guard: &ExclusiveGuard, image: &ImageRef, new_size: u64) -> Result<()>;
    /// Grows an image in a staging area.
    fn grow_staged(&self, area: &StagingArea, image: &ImageRef, new_size: u64) -> Result<()>;
    /// Compacts a committed qcow2 image, replacing it atomically: clusters
    /// in `opts.unused_ranges` and all-zero clusters are dropped, the rest
    /// optionally compressed; the content it shows is unchanged (unused
    /// ranges read as zeros) and images linked to it keep working. The
    /// caller keeps the image from being written meanwhile.
    fn compact_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        opts: &CompactOptions,
        ctl: &Control,
    ) -> Result<CompactReport>;
    /// Virtual size, host bytes and base of an image.
    fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary>;
    /// Removes a committed image.
    fn remove_image(&self, guard: &ExclusiveGuard, image: &ImageRef) -> Result<()>;
    /// What a VMM opens to use the image.
    fn attach_target(&self, image: &ImageRef) -> Result<AttachTarget>;
    /// Moves a committed image (or a staged one, which is made durable
    /// first) into entry `kind/id` under `name`; images linked to it keep
    /// working.
    fn move_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef>;
    /// Whether the store snapshots its images itself
    /// ([`ImageStore::snapshot_image`]): RBD does (an RBD snapshot of the
    /// image); local files do not (the volume layer then takes an external
    /// snapshot: the image moves into the snapshot entry and the volume
    /// continues on an overlay linked to it).
    fn native_snapshots(&self) -> bool {
        false
    }
    /// Takes a read-only, point-in-time snapshot of committed image `image`
    /// inside the store, as image `name` of a staging area (the commit makes
    /// it the entry's, like any staged image; a discarded or dead area's is
    /// dropped). It shares `image`'s data and stays readable, linkable and
    /// copyable after `image`'s entry is removed. Stores without native
    /// snapshots refuse.
    fn snapshot_image(&self, area: &StagingArea, name: &str, image: &ImageRef) -> Result<ImageRef> {
        let _ = (area, name);
        Err(crate::Error::InvalidImage {
            image: image.to_string(),
            reason: "this pool's storage takes no native snapshots".into(),
        })
    }
}

/// Space figures. Contract: `fs_stats().available` is what can still be
/// written now; `base_physical` counts what is not in entries.
pub trait SpaceFigures {
    /// Size and free space of the storage.
    fn fs_stats(&self) -> Result<FsStats>;
    /// Host bytes allocated by everything except the entries (config, lock,
    /// journal, staging, reservations).
    fn base_physical(&self) -> Result<u64>;
}

/// Everything a pool needs from its storage; implemented for every type
/// with all the capability traits.
pub trait PoolBackend:
    PoolLock
    + ChangeJournal
    + RecordStore
    + Liveness
    + ImageStore
    + SpaceFigures
    + Send
    + Sync
    + std::fmt::Debug
{
}

impl<T> PoolBackend for T where
    T: PoolLock
        + ChangeJournal
        + RecordStore
        + Liveness
        + ImageStore
        + SpaceFigures
        + Send
        + Sync
        + std::fmt::Debug
{
}
