//! The pool: config, in-memory index of entries kept in step with the disk,
//! accounting, reservations, staging and records.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmvol_format::{BlockIo, CompactOptions, CompactReport, Control, Format};

use crate::backend::{
    Change, ExclusiveGuard, JournalCursor, JournalRead, LivenessHold, PoolBackend, Recovered,
    ReservationInfo, ScannedEntry, SharedGuard, StagingArea,
};
use crate::error::{Error, Result};
use crate::image::{AttachTarget, ImageOwner, ImageRef, ImageSpec, ImageSummary};
use crate::local::LocalBackend;
use crate::lock::{LockMode, Wait};
use crate::name::validate_name;
use crate::record::{encode, Damaged, Entry, EntryKind, Listed, Record, RecordType};
use crate::spec::BackendSpec;

/// Whether the pool accepts volume work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    /// Volume work allowed.
    Active,
    /// All volume work refused with [`Error::Inactive`].
    Inactive,
}

/// What the pool's capacity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CapacityPolicy {
    /// The size of the filesystem holding the pool (`statvfs`).
    Filesystem,
    /// A fixed quota.
    Quota {
        /// Capacity in bytes.
        bytes: u64,
    },
}

/// A pool's persisted configuration (local: `pool.json`).
///
/// Schema 2 names the backend (`"backend": {"type": "local", "path": ...}`);
/// schema-1 records (a bare `"path"`) still read, as a local backend, and
/// are written in the new form the next time the config is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PoolConfigWire")]
pub struct PoolConfig {
    /// Pool name (see [`validate_name`]).
    pub name: String,
    /// Pool UUID, fixed at define time.
    pub uuid: Uuid,
    /// Where the pool lives.
    pub backend: BackendSpec,
    /// Where the capacity figure comes from.
    pub capacity: CapacityPolicy,
    /// Thin provisioning: the sum of virtual sizes may reach
    /// `overcommit_ratio × capacity`; 1.0 = no overcommit.
    pub overcommit_ratio: f64,
    /// Active or inactive.
    pub state: PoolState,
}

impl RecordType for PoolConfig {
    const SCHEMA_VERSION: u32 = 2;
}

/// Every schema of [`PoolConfig`] as read from disk.
#[derive(Deserialize)]
struct PoolConfigWire {
    name: String,
    uuid: Uuid,
    #[serde(default)]
    backend: Option<BackendSpec>,
    /// Schema 1: the pool directory.
    #[serde(default)]
    path: Option<PathBuf>,
    capacity: CapacityPolicy,
    overcommit_ratio: f64,
    state: PoolState,
}

impl TryFrom<PoolConfigWire> for PoolConfig {
    type Error = String;
    fn try_from(w: PoolConfigWire) -> std::result::Result<PoolConfig, String> {
        let backend = crate::spec::backend_of(w.backend, w.path)?;
        Ok(PoolConfig {
            name: w.name,
            uuid: w.uuid,
            backend,
            capacity: w.capacity,
            overcommit_ratio: w.overcommit_ratio,
            state: w.state,
        })
    }
}

impl PoolConfig {
    /// A new, inactive pool's config (policy checked).
    pub fn new(
        name: &str,
        backend: BackendSpec,
        capacity: CapacityPolicy,
        overcommit_ratio: f64,
    ) -> Result<PoolConfig> {
        validate_name(name)?;
        validate_policy(name, capacity, overcommit_ratio)?;
        Ok(PoolConfig {
            name: name.to_string(),
            uuid: Uuid::new_v4(),
            backend,
            capacity,
            overcommit_ratio,
            state: PoolState::Inactive,
        })
    }
}

/// All figures of a pool, serialisable (`vmvol pool info --output json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolDescription {
    /// The config.
    pub config: PoolConfig,
    /// Capacity in bytes: the quota, or the filesystem's size.
    pub capacity: u64,
    /// Allocation limit: `capacity × overcommit_ratio`.
    pub limit: u64,
    /// Sum of virtual sizes of all images plus open reservations.
    pub allocation: u64,
    /// Sum of virtual sizes of all images.
    pub virtual_size: u64,
    /// Bytes held by open reservations.
    pub reserved: u64,
    /// Number of open reservations.
    pub reservations: usize,
    /// `limit − allocation` (0 when overcommitted).
    pub available: u64,
    /// Host bytes allocated by every file and directory of the pool
    /// (what `du -sB1` reports). Entries' share is as of their last scan
    /// (open, refresh, or a change through the API).
    pub physical: u64,
    /// Size of the filesystem holding the pool.
    pub fs_total: u64,
    /// Bytes free on that filesystem for unprivileged users (`f_bavail`).
    pub fs_available: u64,
    /// Bytes held by open *physical* reservations (work that really writes
    /// its bytes: preallocated raw, full copies, compaction output).
    pub physical_reserved: u64,
    /// `fs_available − physical_reserved`: what a physical reservation can
    /// still get (it must also fit in `available`, the policy headroom).
    pub physical_available: u64,
    /// Number of volumes (damaged ones included).
    pub volumes: usize,
    /// Number of templates (damaged ones included).
    pub templates: usize,
    /// Number of snapshots (damaged ones included).
    pub snapshots: usize,
    /// Entries whose record is missing or unusable.
    pub damaged: usize,
    /// What recovery removed at this handle's open or last refresh.
    pub recovered: Vec<Recovered>,
}

/// Checks a capacity policy and overcommit ratio (finite, in (0, 1000];
/// quota > 0).
pub(crate) fn validate_policy(pool: &str, capacity: CapacityPolicy, ratio: f64) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidSpec {
            pool: pool.to_string(),
            reason,
        })
    };
    if !ratio.is_finite() || ratio <= 0.0 || ratio > 1000.0 {
        return bad(format!(
            "overcommit ratio {ratio} must be a finite number in (0, 1000]"
        ));
    }
    if let CapacityPolicy::Quota { bytes: 0 } = capacity {
        return bad("quota must be more than 0 bytes".into());
    }
    Ok(())
}

/// `capacity × ratio`, saturating; exact for ratio 1.0.
pub fn allocation_limit(capacity: u64, ratio: f64) -> u64 {
    if ratio == 1.0 {
        return capacity;
    }
    let l = capacity as f64 * ratio;
    if l.is_nan() || l <= 0.0 {
        0
    } else if l >= u64::MAX as f64 {
        u64::MAX
    } else {
        l.floor() as u64
    }
}

/// One entry as the index holds it.
#[derive(Debug, Clone)]
struct Slot {
    record_path: PathBuf,
    record: std::result::Result<Arc<Vec<u8>>, String>,
    /// The record parsed as the type it was last listed as (an upper
    /// layer lists each kind mostly as one type): listing 10,000 records
    /// then filters parsed values instead of parsing JSON again. A slot is
    /// replaced whenever its entry is rescanned, so this never goes stale.
    parsed: ParseCache,
    images: Vec<ImageSummary>,
    virt: u64,
    physical: u64,
}

/// A slot's parsed record, of whatever type it was last listed as.
#[derive(Default)]
struct ParseCache(Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>);

impl Clone for ParseCache {
    fn clone(&self) -> Self {
        ParseCache(Mutex::new(
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ))
    }
}

impl std::fmt::Debug for ParseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParseCache")
    }
}

impl Slot {
    fn from_scan(id: &str, s: ScannedEntry) -> Slot {
        let record = match validate_name(id) {
            Err(e) => Err(format!("invalid entry directory name: {e}")),
            Ok(()) => s.record.and_then(|bytes| {
                // Check the envelope now, so damage is counted without
                // knowing the record type; `list` checks the payload.
                Record::<serde::de::IgnoredAny>::parse_envelope(&bytes)?;
                Ok(Arc::new(bytes))
            }),
        };
        Slot {
            virt: s
                .images
                .iter()
                .fold(0u64, |a, i| a.saturating_add(i.virtual_size.unwrap_or(0))),
            record_path: s.record_path,
            record,
            parsed: ParseCache::default(),
            images: s.images,
            physical: s.physical,
        }
    }
}

#[derive(Debug)]
struct Index {
    cursor: JournalCursor,
    config: PoolConfig,
    kinds: [BTreeMap<String, Slot>; 3],
    /// Per kind, every entry's row (record parsed as the type last listed):
    /// `Pool::list` takes it under the lock in O(1) and filters after
    /// releasing it, so concurrent listings do not queue on the index.
    /// Entries that changed since are patched in when it is next taken.
    rows: [RowCache; 3],
    virt: u64,
    physical: u64,
}

/// A kind's cached rows (type-erased `Vec<Row<T>>`, sorted by id) and the
/// ids changed since they were built.
#[derive(Default)]
struct RowCache(Mutex<RowCacheInner>);

impl std::fmt::Debug for RowCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowCache")
    }
}

#[derive(Default)]
struct RowCacheInner {
    rows: Option<Arc<dyn std::any::Any + Send + Sync>>,
    dirty: std::collections::BTreeSet<String>,
}

/// One entry of a kind's cached listing.
#[derive(Clone)]
struct Row<T> {
    id: String,
    record: std::result::Result<Arc<Record<T>>, (PathBuf, String)>,
    images: Vec<ImageSummary>,
    physical: u64,
}

/// The rows of `kind` as `Listed`, those `filter` keeps (damaged ones always).
fn filter_rows<T: Clone>(
    kind: EntryKind,
    rows: &[Row<T>],
    filter: impl Fn(&str, &T) -> bool,
) -> Vec<Listed<T>> {
    let mut out = Vec::new();
    for r in rows {
        match &r.record {
            Ok(record) => {
                if filter(&r.id, &record.data) {
                    out.push(Listed::Ok(Entry {
                        kind,
                        id: r.id.clone(),
                        record: Record::clone(record),
                        images: r.images.clone(),
                        physical: r.physical,
                    }));
                }
            }
            Err((path, reason)) => out.push(Listed::Damaged(Damaged {
                kind,
                id: r.id.clone(),
                path: path.clone(),
                reason: reason.clone(),
            })),
        }
    }
    out
}

impl Index {
    /// The cached rows of `kind` as `T`: built (from each slot's parse
    /// cache) when missing or of another type, else patched with the
    /// entries changed since.
    fn rows<T: RecordType + Clone + Send + Sync + 'static>(
        &self,
        kind: EntryKind,
    ) -> Arc<Vec<Row<T>>> {
        let slots = &self.kinds[kind.idx()];
        let row = |id: &str, s: &Slot| Row {
            id: id.to_string(),
            record: slot_record::<T>(s).map_err(|reason| (s.record_path.clone(), reason)),
            images: s.images.clone(),
            physical: s.physical,
        };
        let mut c = self.rows[kind.idx()]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let cached = c.rows.take().and_then(|a| a.downcast::<Vec<Row<T>>>().ok());
        let rows = match cached {
            Some(mut rows) => {
                if !c.dirty.is_empty() {
                    // Unshared unless a listing is still filtering it.
                    let v = Arc::make_mut(&mut rows);
                    for id in std::mem::take(&mut c.dirty) {
                        let at = v.binary_search_by(|r| r.id.as_str().cmp(id.as_str()));
                        match (slots.get(&id), at) {
                            (Some(s), Ok(i)) => {
                                if let Some(r) = v.get_mut(i) {
                                    *r = row(&id, s);
                                }
                            }
                            (Some(s), Err(i)) => v.insert(i, row(&id, s)),
                            (None, Ok(i)) => {
                                v.remove(i);
                            }
                            (None, Err(_)) => {}
                        }
                    }
                }
                rows
            }
            None => {
                c.dirty.clear();
                Arc::new(slots.iter().map(|(id, s)| row(id, s)).collect())
            }
        };
        c.rows = Some(rows.clone());
        rows
    }

    fn set(&mut self, kind: EntryKind, id: &str, slot: Option<Slot>) {
        self.rows[kind.idx()]
            .0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .dirty
            .insert(id.to_string());
        let map = &mut self.kinds[kind.idx()];
        let old = match slot {
            Some(s) => {
                self.virt = self.virt.saturating_add(s.virt);
                self.physical = self.physical.saturating_add(s.physical);
                map.insert(id.to_string(), s)
            }
            None => map.remove(id),
        };
        if let Some(o) = old {
            self.virt = self.virt.saturating_sub(o.virt);
            self.physical = self.physical.saturating_sub(o.physical);
        }
    }

    fn slot(&self, kind: EntryKind, id: &str) -> Option<&Slot> {
        self.kinds[kind.idx()].get(id)
    }

    fn require_active(&self, op: &'static str) -> Result<()> {
        match self.config.state {
            PoolState::Active => Ok(()),
            PoolState::Inactive => Err(Error::Inactive {
                pool: self.config.name.clone(),
                op,
            }),
        }
    }

    fn damaged(&self) -> usize {
        self.kinds
            .iter()
            .flat_map(|m| m.values())
            .filter(|s| s.record.is_err())
            .count()
    }
}

struct Inner {
    backend: Arc<dyn PoolBackend>,
    index: Mutex<Index>,
    recovered: Mutex<Vec<Recovered>>,
}

/// A handle on an open pool. Cheap to clone; `Send + Sync`: threads may
/// share one handle or open their own, and several processes may open the
/// same pool — the pool lock and the change journal keep them consistent.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
    wait: Wait,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("location", &self.inner.backend.location())
            .field("wait", &self.wait)
            .finish()
    }
}

/// Bytes set aside in a pool; released when dropped (or when the owning
/// process dies).
pub struct Reservation {
    info: ReservationInfo,
    _hold: LivenessHold,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.info.bytes
    }
    /// The reservation's id.
    pub fn id(&self) -> Uuid {
        self.info.id
    }
    /// What the caller said it is for.
    pub fn purpose(&self) -> &str {
        &self.info.purpose
    }
    /// Whether it was checked against physical free space too.
    pub fn is_physical(&self) -> bool {
        self.info.physical
    }
    /// Releases the bytes now (same as dropping).
    pub fn release(self) {}
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("info", &self.info)
            .finish()
    }
}

/// A private staging area where an entry's images are built before
/// [`Pool::commit`] moves them into place as a new entry. Dropped
/// uncommitted, it is removed; if its process dies, the next open or
/// refresh removes it. Its images need no pool lock: nobody else sees them.
pub struct Staging {
    backend: Arc<dyn PoolBackend>,
    area: Option<StagingArea>,
}

impl Staging {
    fn area(&self) -> Result<&StagingArea> {
        self.area.as_ref().ok_or_else(|| {
            Error::io(
                self.backend.location(),
                "use staging area",
                std::io::ErrorKind::InvalidInput.into(),
            )
        })
    }

    /// The staging area's id (what [`ImageOwner::Staging`] names).
    pub fn id(&self) -> Option<Uuid> {
        self.area.as_ref().map(|a| a.id)
    }

    /// Creates image `name` (e.g. [`DATA_IMAGE`](crate::DATA_IMAGE)) of
    /// `spec.size` bytes. Preallocation (raw only) reports progress to and
    /// can be cancelled through `ctl`. Reserve first:
    /// [`Pool::reserve_physical`] if [`ImageSpec::is_physical`], else
    /// [`Pool::reserve`].
    pub fn create_image(&self, name: &str, spec: &ImageSpec, ctl: &Control) -> Result<ImageRef> {
        self.backend.create_image(self.area()?, name, spec, ctl)
    }

    /// Creates image `name` as a thin overlay on `base` (a committed image,
    /// or one in this area); `size` defaults to the base's virtual size.
    /// Local: a qcow2 file whose backing name is relative and whose backing
    /// format is recorded, so the entry can move with the pool.
    pub fn create_linked(
        &self,
        name: &str,
        base: &ImageRef,
        size: Option<u64>,
    ) -> Result<ImageRef> {
        self.backend.create_linked(self.area()?, name, base, size)
    }

    /// Takes a native, read-only snapshot of committed `image` as image
    /// `name` of this area (only where [`Pool::native_snapshots`]: RBD).
    pub fn snapshot_image(&self, name: &str, image: &ImageRef) -> Result<ImageRef> {
        self.backend.snapshot_image(self.area()?, name, image)
    }

    /// Copies everything `src` shows (its chain flattened) into a new,
    /// independent image `name` in `format` (local: reflink or
    /// `copy_file_range` where possible). Reserve physically first.
    pub fn copy_full(
        &self,
        name: &str,
        src: &ImageRef,
        format: Format,
        ctl: &Control,
    ) -> Result<ImageRef> {
        self.backend.copy_full(self.area()?, name, src, format, ctl)
    }

    /// Opens an image of this area (or any committed image) for I/O, e.g.
    /// to fill it before commit. Images of the area are written without
    /// crash ordering (a crash discards the area); the commit makes them
    /// durable before the entry appears.
    pub fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        self.area()?;
        self.backend.open_image(image, writable)
    }

    /// Grows an image of this area.
    pub fn grow_image(&self, image: &ImageRef, new_size: u64) -> Result<()> {
        self.backend.grow_staged(self.area()?, image, new_size)
    }

    /// Virtual size, host bytes and base of an image of this area.
    pub fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary> {
        self.backend.image_summary(image)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(a) = self.area.take() {
            // Remove while still holding the liveness hold.
            self.backend.discard_staging(&a);
            drop(a);
        }
    }
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging").field("id", &self.id()).finish()
    }
}

fn read_config(backend: &dyn PoolBackend) -> Result<PoolConfig> {
    let bytes = backend.read_config()?;
    let path = backend.config_path();
    Record::<PoolConfig>::parse(&bytes)
        .map(|r| r.data)
        .map_err(|reason| Error::Damaged { path, reason })
}

fn lock_index(m: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // A poisoned index is still structurally sound (every update is a
    // single insert/remove), so keep going rather than panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lock a [`PoolTxn`] runs under.
enum Held {
    Shared(#[allow(dead_code)] SharedGuard),
    Exclusive(ExclusiveGuard),
}

impl Pool {
    /// Opens the local pool in directory `dir` (shortcut for
    /// [`Pool::with_backend`] on a [`LocalBackend`]): recovers from crashed
    /// operations (see [`Pool::recovered`]) and scans every entry. `wait` is
    /// the lock policy of this handle for every operation.
    pub fn open(dir: impl AsRef<Path>, wait: Wait) -> Result<Pool> {
        let b = LocalBackend::open(dir.as_ref())?;
        Pool::with_backend(Arc::new(b), wait)
    }

    /// Opens a pool on any backend: recovery, then a scan of every entry.
    pub fn with_backend(backend: Arc<dyn PoolBackend>, wait: Wait) -> Result<Pool> {
        let _held = ReentryGuard::enter_path(backend.location(), "open pool")?;
        let g = backend.lock_exclusive(wait, "open pool")?;
        let (index, recovered) = Self::load(&*backend, &g)?;
        Ok(Pool {
            inner: Arc::new(Inner {
                backend,
                index: Mutex::new(index),
                recovered: Mutex::new(recovered),
            }),
            wait,
        })
    }

    /// Under the exclusive lock: recovery + full scan.
    fn load(backend: &dyn PoolBackend, g: &ExclusiveGuard) -> Result<(Index, Vec<Recovered>)> {
        let mut recovered = backend.recover(g)?;
        let config = read_config(backend)?;
        let cursor = match backend.journal_read(JournalCursor::default())? {
            JournalRead::Reset(c) | JournalRead::Changes(_, c) => c,
        };
        let mut index = Index {
            cursor,
            config,
            kinds: Default::default(),
            rows: Default::default(),
            virt: 0,
            physical: 0,
        };
        let mut touched = Vec::new();
        for kind in EntryKind::ALL {
            for id in backend.list_ids(kind)? {
                if let Some(s) = backend.scan_entry(kind, &id, Some(g))? {
                    if !s.removed.is_empty() {
                        touched.push(Change::Entry(kind, id.clone()));
                    }
                    recovered.extend(s.removed.iter().map(|p| Recovered {
                        path: p.clone(),
                        what: "half-written record temp file".into(),
                    }));
                    index.set(kind, &id, Some(Slot::from_scan(&id, s)));
                }
            }
        }
        // Other live handles count those temp files' blocks; tell them.
        for c in &touched {
            index.cursor = backend.journal_append(g, c)?;
        }
        Ok((index, recovered))
    }

    /// The same pool with another lock policy for the returned handle.
    pub fn with_wait(&self, wait: Wait) -> Pool {
        Pool {
            inner: Arc::clone(&self.inner),
            wait,
        }
    }

    /// Where the pool lives, for messages (local: its directory). Build no
    /// paths from it: images are reached through [`ImageRef`]s.
    pub fn location(&self) -> &Path {
        self.inner.backend.location()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn PoolBackend> {
        &self.inner.backend
    }

    /// The format of linked images in this pool (see
    /// [`ImageStore::linked_format`](crate::backend::ImageStore::linked_format)).
    pub fn linked_format(&self) -> Format {
        self.inner.backend.linked_format()
    }

    /// Whether the storage snapshots images itself (RBD); see
    /// [`Staging::snapshot_image`].
    pub fn native_snapshots(&self) -> bool {
        self.inner.backend.native_snapshots()
    }

    /// What recovery removed at open (or the last [`Pool::refresh`]).
    pub fn recovered(&self) -> Vec<Recovered> {
        self.inner
            .recovered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The pool's config, brought up to date with other processes.
    pub fn config(&self) -> Result<PoolConfig> {
        self.with_lock(LockMode::Shared, "read pool config", |t| t.config())
    }

    /// Runs `f` under the pool lock with the index synced to the disk.
    fn with_lock<R>(
        &self,
        mode: LockMode,
        op: &'static str,
        f: impl FnOnce(&mut PoolTxn<'_>) -> Result<R>,
    ) -> Result<R> {
        let _held = ReentryGuard::enter(self, op)?;
        let b = &self.inner.backend;
        let held = match mode {
            LockMode::Shared => Held::Shared(b.lock_shared(self.wait, op)?),
            LockMode::Exclusive => Held::Exclusive(b.lock_exclusive(self.wait, op)?),
        };
        let mut idx = lock_index(&self.inner.index);
        self.sync(&mut idx)?;
        f(&mut PoolTxn {
            pool: self,
            idx: &mut idx,
            held,
        })
    }

    /// Runs `f` holding the pool's exclusive lock throughout, so a check and
    /// the change it allows (e.g. "not attached" → remove) are atomic with
    /// respect to every other thread and process.
    ///
    /// Inside `f` use only the [`PoolTxn`]'s methods: calling this pool's
    /// own methods from `f` fails with [`Error::Reentrant`] (it would wait
    /// for the lock `f` holds). To work on two pools at once, nest their
    /// transactions in a fixed order (e.g. by UUID) to avoid deadlocks.
    pub fn transaction<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut PoolTxn<'_>) -> Result<R>,
    ) -> Result<R> {
        self.with_lock(LockMode::Exclusive, op, f)
    }

    /// Applies what other handles announced since our cursor.
    fn sync(&self, idx: &mut Index) -> Result<()> {
        let b = &*self.inner.backend;
        match b.journal_read(idx.cursor)? {
            JournalRead::Changes(changes, cursor) => {
                let mut seen = HashSet::new();
                for c in changes {
                    if !seen.insert(c.clone()) {
                        continue;
                    }
                    match c {
                        Change::Config => idx.config = read_config(b)?,
                        Change::Entry(kind, id) => self.rescan(idx, kind, &id)?,
                    }
                }
                idx.cursor = cursor;
            }
            JournalRead::Reset(cursor) => {
                idx.config = read_config(b)?;
                for kind in EntryKind::ALL {
                    let ids = b.list_ids(kind)?;
                    let mut fresh = BTreeMap::new();
                    for id in ids {
                        if let Some(s) = b.scan_entry(kind, &id, None)? {
                            fresh.insert(id.clone(), Slot::from_scan(&id, s));
                        }
                    }
                    idx.kinds[kind.idx()] = fresh;
                    idx.rows[kind.idx()] = RowCache::default();
                }
                idx.virt = idx
                    .kinds
                    .iter()
                    .flat_map(|m| m.values())
                    .fold(0u64, |a, s| a.saturating_add(s.virt));
                idx.physical = idx
                    .kinds
                    .iter()
                    .flat_map(|m| m.values())
                    .fold(0u64, |a, s| a.saturating_add(s.physical));
                idx.cursor = cursor;
            }
        }
        Ok(())
    }

    fn rescan(&self, idx: &mut Index, kind: EntryKind, id: &str) -> Result<()> {
        let s = self.inner.backend.scan_entry(kind, id, None)?;
        idx.set(kind, id, s.map(|s| Slot::from_scan(id, s)));
        Ok(())
    }

    /// Announces a change (exclusive lock held, index synced).
    fn announce(&self, idx: &mut Index, g: &ExclusiveGuard, change: &Change) -> Result<()> {
        idx.cursor = self.inner.backend.journal_append(g, change)?;
        Ok(())
    }

    fn describe_locked(&self, idx: &Index) -> Result<PoolDescription> {
        let b = &*self.inner.backend;
        let fs = b.fs_stats()?;
        let capacity = match idx.config.capacity {
            CapacityPolicy::Filesystem => fs.total,
            CapacityPolicy::Quota { bytes } => bytes,
        };
        let live = b.live_reservations(None)?;
        let reserved = live.iter().fold(0u64, |a, r| a.saturating_add(r.bytes));
        let physical_reserved = live
            .iter()
            .filter(|r| r.physical)
            .fold(0u64, |a, r| a.saturating_add(r.bytes));
        let limit = allocation_limit(capacity, idx.config.overcommit_ratio);
        let allocation = idx.virt.saturating_add(reserved);
        Ok(PoolDescription {
            config: idx.config.clone(),
            capacity,
            limit,
            allocation,
            virtual_size: idx.virt,
            reserved,
            reservations: live.len(),
            available: limit.saturating_sub(allocation),
            physical: b.base_physical()?.saturating_add(idx.physical),
            fs_total: fs.total,
            fs_available: fs.available,
            physical_reserved,
            physical_available: fs.available.saturating_sub(physical_reserved),
            volumes: idx.kinds[0].len(),
            templates: idx.kinds[1].len(),
            snapshots: idx.kinds[2].len(),
            damaged: idx.damaged(),
            recovered: self.recovered(),
        })
    }

    /// All figures, brought up to date with other processes' changes.
    pub fn describe(&self) -> Result<PoolDescription> {
        self.with_lock(LockMode::Shared, "describe pool", |t| t.describe())
    }

    /// Recovery plus a full rescan of every entry (exclusive lock), then
    /// [`Pool::describe`]'s figures.
    pub fn refresh(&self) -> Result<PoolDescription> {
        let b = &*self.inner.backend;
        let _held = ReentryGuard::enter(self, "refresh pool")?;
        let g = b.lock_exclusive(self.wait, "refresh pool")?;
        let (fresh, recovered) = Self::load(b, &g)?;
        *self
            .inner
            .recovered
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = recovered;
        let mut idx = lock_index(&self.inner.index);
        *idx = fresh;
        self.describe_locked(&idx)
    }

    fn set_state(&self, state: PoolState, op: &'static str) -> Result<PoolConfig> {
        self.update_config(op, |cfg| {
            cfg.state = state;
            Ok(())
        })
    }

    /// Changes the capacity policy and overcommit ratio (like editing a
    /// libvirt pool's definition). Shrinking below the current allocation is
    /// allowed: the pool then reports 0 available and refuses reservations.
    pub fn set_capacity(
        &self,
        capacity: CapacityPolicy,
        overcommit_ratio: f64,
    ) -> Result<PoolConfig> {
        self.update_config("set pool capacity", |cfg| {
            validate_policy(&cfg.name, capacity, overcommit_ratio)?;
            cfg.capacity = capacity;
            cfg.overcommit_ratio = overcommit_ratio;
            Ok(())
        })
    }

    fn update_config(
        &self,
        op: &'static str,
        change: impl FnOnce(&mut PoolConfig) -> Result<()>,
    ) -> Result<PoolConfig> {
        self.with_lock(LockMode::Exclusive, op, |t| {
            let g = guard_of(&t.held, t.pool)?;
            let (p, idx) = (t.pool, &mut *t.idx);
            let mut cfg = idx.config.clone();
            change(&mut cfg)?;
            let bytes = Record::new(cfg.clone()).to_bytes(&p.inner.backend.config_path())?;
            p.announce(idx, g, &Change::Config)?;
            p.inner.backend.write_config(g, &bytes)?;
            idx.config = cfg.clone();
            Ok(cfg)
        })
    }

    /// Marks the pool active (volume work allowed). Idempotent.
    pub fn activate(&self) -> Result<PoolConfig> {
        self.set_state(PoolState::Active, "activate pool")
    }

    /// Marks the pool inactive (volume work refused). Idempotent.
    pub fn deactivate(&self) -> Result<PoolConfig> {
        self.set_state(PoolState::Inactive, "deactivate pool")
    }

    /// Reserves `bytes` of *thin* work (sparse images, linked images,
    /// growing a thin image) before doing it. Fails with
    /// [`Error::InsufficientSpace`] (needed and available bytes) when
    /// allocation + `bytes` would exceed `capacity × overcommit_ratio`.
    /// Holds across threads and processes; a dead process's reservations
    /// are released with it.
    pub fn reserve(&self, bytes: u64, purpose: &str) -> Result<Reservation> {
        self.with_lock(LockMode::Exclusive, "reserve", |t| {
            t.reserve(bytes, purpose)
        })
    }

    /// Reserves `bytes` that will really be written (preallocated raw, full
    /// copies, compaction output): checked against the policy like
    /// [`Pool::reserve`] *and* against the storage's free space minus other
    /// physical reservations, else [`Error::InsufficientPhysicalSpace`].
    pub fn reserve_physical(&self, bytes: u64, purpose: &str) -> Result<Reservation> {
        self.with_lock(LockMode::Exclusive, "reserve", |t| {
            t.reserve_physical(bytes, purpose)
        })
    }

    /// A fresh staging area to build an entry's images in.
    pub fn stage(&self) -> Result<Staging> {
        self.with_lock(LockMode::Shared, "stage", |t| t.stage())
    }

    /// Writes `data`'s record into `staging` and moves it into place as
    /// entry `kind/id` (atomically: the entry appears complete or not at
    /// all). Staged image `x` becomes `x.committed(kind, id)`.
    pub fn commit<T: RecordType>(
        &self,
        staging: Staging,
        kind: EntryKind,
        id: &str,
        data: &T,
    ) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "commit entry", |t| {
            t.commit(staging, kind, id, data)
        })
    }

    fn existing<'a>(idx: &'a Index, kind: EntryKind, id: &str) -> Result<&'a Slot> {
        idx.slot(kind, id).ok_or_else(|| Error::EntryNotFound {
            pool: idx.config.name.clone(),
            kind,
            id: id.to_string(),
        })
    }

    /// Atomically replaces the record of existing entry `kind/id`.
    pub fn write_record<T: RecordType>(&self, kind: EntryKind, id: &str, data: &T) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "write record", |t| {
            t.write_record(kind, id, data)
        })
    }

    /// Re-reads entry `kind/id` after its images changed outside the pool's
    /// own calls (e.g. written through [`Pool::open_image`]) and tells other
    /// processes.
    pub fn rescan_entry(&self, kind: EntryKind, id: &str) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "rescan entry", |t| {
            t.rescan_entry(kind, id)
        })
    }

    /// Removes entry `kind/id` and all its images. The caller (the volume
    /// layer) checks its own rules (attachments, dependents) first.
    pub fn remove(&self, kind: EntryKind, id: &str) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "remove entry", |t| t.remove(kind, id))
    }

    fn to_listed<T: RecordType>(kind: EntryKind, id: &str, s: &Slot) -> Listed<T> {
        let parsed = match &s.record {
            Ok(bytes) => Record::<T>::parse(bytes),
            Err(reason) => Err(reason.clone()),
        };
        match parsed {
            Ok(record) => Listed::Ok(Entry {
                kind,
                id: id.to_string(),
                record,
                images: s.images.clone(),
                physical: s.physical,
            }),
            Err(reason) => Listed::Damaged(Damaged {
                kind,
                id: id.to_string(),
                path: s.record_path.clone(),
                reason,
            }),
        }
    }

    /// Entry `kind/id`; [`Error::Damaged`] (path, reason) if its record is
    /// unusable.
    pub fn get<T: RecordType>(&self, kind: EntryKind, id: &str) -> Result<Entry<T>> {
        self.with_lock(LockMode::Shared, "get entry", |t| t.get(kind, id))
    }

    /// Whether entry `kind/id` exists (damaged or not).
    pub fn contains(&self, kind: EntryKind, id: &str) -> Result<bool> {
        self.with_lock(LockMode::Shared, "look up entry", |t| t.contains(kind, id))
    }

    /// Entries of `kind` sorted by id whose record satisfies `filter(id,
    /// data)`, plus every damaged entry (a damaged record cannot be
    /// filtered, and is never hidden).
    pub fn list<T: RecordType + Clone + Send + Sync + 'static>(
        &self,
        kind: EntryKind,
        filter: impl Fn(&str, &T) -> bool,
    ) -> Result<Vec<Listed<T>>> {
        // Take the cached rows under the lock; filter after releasing it.
        let rows = self.with_lock(LockMode::Shared, "list entries", |t| {
            t.idx.require_active("list entries")?;
            Ok(t.idx.rows::<T>(kind))
        })?;
        Ok(filter_rows(kind, &rows, filter))
    }

    /// Opens a committed image for I/O (read-only or read-write); its chain
    /// may reach only images of this pool. The pool must be active.
    /// Writing does not change the pool's figures; growing goes through
    /// [`Pool::grow_image`].
    pub fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        self.with_lock(LockMode::Shared, "open image", |t| {
            t.idx.require_active("open image")?;
            t.pool.inner.backend.open_image(image, writable)
        })
    }

    /// Grows a committed image to `new_size` bytes (thin: reserve the
    /// difference with [`Pool::reserve`] first) and updates the figures.
    pub fn grow_image(&self, image: &ImageRef, new_size: u64) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "grow image", |t| {
            t.grow_image(image, new_size)
        })
    }

    /// Compacts a committed qcow2 image in place (see
    /// [`ImageStore::compact_image`](crate::backend::ImageStore::compact_image))
    /// under the exclusive lock, and updates the figures. The caller makes
    /// sure nothing writes the image meanwhile (e.g. it is not attached).
    pub fn compact_image(
        &self,
        image: &ImageRef,
        opts: &CompactOptions,
        ctl: &Control,
    ) -> Result<CompactReport> {
        self.with_lock(LockMode::Exclusive, "compact image", |t| {
            t.compact_image(image, opts, ctl)
        })
    }

    /// Virtual size, host bytes and base (the image it is linked to) of an image.
    pub fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary> {
        self.with_lock(LockMode::Shared, "read image summary", |t| {
            t.pool.inner.backend.image_summary(image)
        })
    }

    /// Removes one image of an entry (the entry stays).
    pub fn remove_image(&self, image: &ImageRef) -> Result<()> {
        self.with_lock(LockMode::Exclusive, "remove image", |t| {
            t.remove_image(image)
        })
    }

    /// What a VMM opens to use the image (local: its file and format).
    pub fn attach_target(&self, image: &ImageRef) -> Result<AttachTarget> {
        self.with_lock(LockMode::Shared, "attach image", |t| {
            t.idx.require_active("attach image")?;
            t.pool.inner.backend.attach_target(image)
        })
    }

    /// Moves an image (committed, or from a staging area the caller holds)
    /// into existing entry `kind/id` as `name`; returns its new name. For
    /// external snapshots: move the volume's top image into the snapshot
    /// entry, then stage an overlay on it and move that into the volume.
    /// Local backend: images linked *to* the moved image are not relinked,
    /// so move only images nothing is linked to.
    pub fn move_image(
        &self,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef> {
        self.with_lock(LockMode::Exclusive, "move image", |t| {
            t.move_image(image, kind, id, name)
        })
    }

    /// Undefine support: under the exclusive lock, refuses with
    /// [`Error::NotEmpty`] unless the pool holds nothing, else removes the
    /// layout (and the directory if `remove_dir`).
    pub(crate) fn destroy_if_empty(&self, remove_dir: bool) -> Result<()> {
        let b = &*self.inner.backend;
        let _held = ReentryGuard::enter(self, "undefine pool")?;
        let g = b.lock_exclusive(self.wait, "undefine pool")?;
        let (idx, _) = Self::load(b, &g)?;
        let staging = b.live_staging()?;
        let reservations = b.live_reservations(Some(&g))?.len();
        let (v, t, s) = (idx.kinds[0].len(), idx.kinds[1].len(), idx.kinds[2].len());
        if v + t + s + staging + reservations > 0 {
            return Err(Error::NotEmpty {
                pool: idx.config.name.clone(),
                volumes: v,
                templates: t,
                snapshots: s,
                staging,
                reservations,
                damaged: idx.damaged(),
            });
        }
        b.destroy(g, remove_dir)
    }
}

/// The pool under its lock, with the index in step with the storage: every
/// operation of [`Pool`] is available here without re-taking the lock.
/// Obtained from [`Pool::transaction`].
pub struct PoolTxn<'a> {
    pool: &'a Pool,
    idx: &'a mut Index,
    held: Held,
}

impl std::fmt::Debug for PoolTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolTxn").field("pool", self.pool).finish()
    }
}

/// The exclusive guard (every mutating call runs under it).
fn guard_of<'h>(held: &'h Held, pool: &Pool) -> Result<&'h ExclusiveGuard> {
    match held {
        Held::Exclusive(g) => Ok(g),
        Held::Shared(_) => Err(Error::io(
            pool.location(),
            "mutate pool under a shared lock",
            std::io::ErrorKind::PermissionDenied.into(),
        )),
    }
}

/// The committed entry `image` belongs to (which must exist).
fn committed<'i>(idx: &Index, image: &'i ImageRef) -> Result<(EntryKind, &'i str)> {
    let (kind, id) = entry_of(image).ok_or_else(|| Error::InvalidImage {
        image: image.to_string(),
        reason: "not a committed image (use the staging area's methods)".into(),
    })?;
    Pool::existing(idx, kind, id)?;
    Ok((kind, id))
}

/// Which entry an image belongs to, if committed.
fn entry_of(image: &ImageRef) -> Option<(EntryKind, &str)> {
    match &image.owner {
        ImageOwner::Entry { kind, id } => Some((*kind, id.as_str())),
        ImageOwner::Staging { .. } => None,
    }
}

impl PoolTxn<'_> {
    /// The pool's config, brought up to date with other processes.
    pub fn config(&mut self) -> Result<PoolConfig> {
        Ok(self.idx.config.clone())
    }

    /// All figures, brought up to date with other processes' changes.
    pub fn describe(&mut self) -> Result<PoolDescription> {
        self.pool.describe_locked(self.idx)
    }

    /// [`Pool::reserve`] inside the transaction.
    pub fn reserve(&mut self, bytes: u64, purpose: &str) -> Result<Reservation> {
        self.reserve_kind(bytes, purpose, false)
    }

    /// [`Pool::reserve_physical`] inside the transaction.
    pub fn reserve_physical(&mut self, bytes: u64, purpose: &str) -> Result<Reservation> {
        self.reserve_kind(bytes, purpose, true)
    }

    /// Checks that `bytes` of thin work fit, like [`PoolTxn::reserve`], but
    /// records no reservation: for work that starts and ends inside this
    /// transaction (its exclusive lock keeps every other reservation out
    /// meanwhile), which saves the reservation record's create and delete.
    pub fn require_room(&mut self, bytes: u64) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        self.idx.require_active("reserve")?;
        self.check_room(g, bytes, false).map(|_| ())
    }

    /// The space checks of a reservation of `bytes` (see
    /// [`Pool::reserve`] and [`Pool::reserve_physical`]).
    fn check_room(&self, g: &ExclusiveGuard, bytes: u64, physical: bool) -> Result<()> {
        let idx = &*self.idx;
        let b = &*self.pool.inner.backend;
        // The storage's figures only when the check needs them: on some
        // backends (RBD) they cost a pass over every image.
        let fs = match (idx.config.capacity, physical) {
            (CapacityPolicy::Quota { .. }, false) => None,
            _ => Some(b.fs_stats()?),
        };
        let capacity = match (idx.config.capacity, &fs) {
            (CapacityPolicy::Quota { bytes }, _) => bytes,
            (CapacityPolicy::Filesystem, Some(fs)) => fs.total,
            (CapacityPolicy::Filesystem, None) => 0,
        };
        let live = b.live_reservations(Some(g))?;
        let reserved = live.iter().fold(0u64, |a, r| a.saturating_add(r.bytes));
        let limit = allocation_limit(capacity, idx.config.overcommit_ratio);
        let allocation = idx.virt.saturating_add(reserved);
        let available = limit.saturating_sub(allocation);
        if bytes > available {
            return Err(Error::InsufficientSpace {
                pool: idx.config.name.clone(),
                needed: bytes,
                available,
                limit,
                allocation,
            });
        }
        if physical {
            let phys_reserved = live
                .iter()
                .filter(|r| r.physical)
                .fold(0u64, |a, r| a.saturating_add(r.bytes));
            let free = fs.map_or(0, |f| f.available);
            let avail = free.saturating_sub(phys_reserved);
            if bytes > avail {
                return Err(Error::InsufficientPhysicalSpace {
                    pool: idx.config.name.clone(),
                    needed: bytes,
                    available: avail,
                    free,
                    reserved: phys_reserved,
                });
            }
        }
        Ok(())
    }

    fn reserve_kind(&mut self, bytes: u64, purpose: &str, physical: bool) -> Result<Reservation> {
        let g = guard_of(&self.held, self.pool)?;
        self.idx.require_active("reserve")?;
        self.check_room(g, bytes, physical)?;
        let b = &*self.pool.inner.backend;
        let info = ReservationInfo {
            id: Uuid::new_v4(),
            bytes,
            purpose: purpose.to_string(),
            pid: std::process::id(),
            physical,
        };
        let hold = b.create_reservation(g, &info)?;
        Ok(Reservation { info, _hold: hold })
    }

    /// A fresh staging area to build an entry's images in.
    pub fn stage(&mut self) -> Result<Staging> {
        let p = self.pool;
        self.idx.require_active("stage")?;
        // Either lock mode keeps recovery out until the area is held.
        let area = p.inner.backend.create_staging()?;
        Ok(Staging {
            backend: Arc::clone(&p.inner.backend),
            area: Some(area),
        })
    }

    /// [`Pool::commit`] inside the transaction.
    pub fn commit<T: RecordType>(
        &mut self,
        staging: Staging,
        kind: EntryKind,
        id: &str,
        data: &T,
    ) -> Result<()> {
        validate_name(id)?;
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let mut staging = staging;
        let idx = &mut *self.idx;
        idx.require_active("commit entry")?;
        if idx.slot(kind, id).is_some() {
            return Err(Error::EntryExists {
                pool: idx.config.name.clone(),
                kind,
                id: id.to_string(),
            });
        }
        let b = &*p.inner.backend;
        let bytes = encode(data, T::SCHEMA_VERSION, b.location())?;
        let area = staging.area()?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = b.commit_staging(g, area, kind, id, &bytes);
        if r.is_ok() {
            // Moved: nothing left to discard; the hold goes with it.
            staging.area = None;
        }
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::write_record`] inside the transaction.
    pub fn write_record<T: RecordType>(
        &mut self,
        kind: EntryKind,
        id: &str,
        data: &T,
    ) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("write record")?;
        let path = Pool::existing(idx, kind, id)?.record_path.clone();
        let bytes = encode(data, T::SCHEMA_VERSION, &path)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.write_record(g, kind, id, &bytes);
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::rescan_entry`] inside the transaction.
    pub fn rescan_entry(&mut self, kind: EntryKind, id: &str) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        Pool::existing(idx, kind, id)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        p.rescan(idx, kind, id)
    }

    /// [`Pool::remove`] inside the transaction.
    pub fn remove(&mut self, kind: EntryKind, id: &str) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("remove entry")?;
        Pool::existing(idx, kind, id)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.remove_entry(g, kind, id);
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::grow_image`] inside the transaction.
    pub fn grow_image(&mut self, image: &ImageRef, new_size: u64) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("grow image")?;
        let (kind, id) = committed(idx, image)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.grow_image(g, image, new_size);
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::compact_image`] inside the transaction.
    pub fn compact_image(
        &mut self,
        image: &ImageRef,
        opts: &CompactOptions,
        ctl: &Control,
    ) -> Result<CompactReport> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("compact image")?;
        let (kind, id) = committed(idx, image)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.compact_image(g, image, opts, ctl);
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::remove_image`] inside the transaction.
    pub fn remove_image(&mut self, image: &ImageRef) -> Result<()> {
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("remove image")?;
        let (kind, id) = committed(idx, image)?;
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.remove_image(g, image);
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::move_image`] inside the transaction.
    pub fn move_image(
        &mut self,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef> {
        validate_name(name)?;
        let g = guard_of(&self.held, self.pool)?;
        let p = self.pool;
        let idx = &mut *self.idx;
        idx.require_active("move image")?;
        Pool::existing(idx, kind, id)?;
        let from = entry_of(image);
        if let Some((k, i)) = from {
            Pool::existing(idx, k, i)?;
            p.announce(idx, g, &Change::Entry(k, i.to_string()))?;
        }
        p.announce(idx, g, &Change::Entry(kind, id.to_string()))?;
        let r = p.inner.backend.move_image(g, image, kind, id, name);
        if let Some((k, i)) = from {
            p.rescan(idx, k, i)?;
        }
        p.rescan(idx, kind, id)?;
        r
    }

    /// [`Pool::open_image`] inside the transaction (e.g. to read a
    /// filesystem's free space, or to fill a grown tail, while no one else
    /// can change the entry).
    pub fn open_image(&mut self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        self.idx.require_active("open image")?;
        self.pool.inner.backend.open_image(image, writable)
    }

    /// [`Pool::image_summary`] inside the transaction.
    pub fn image_summary(&mut self, image: &ImageRef) -> Result<ImageSummary> {
        self.pool.inner.backend.image_summary(image)
    }

    /// [`Pool::attach_target`] inside the transaction.
    pub fn attach_target(&mut self, image: &ImageRef) -> Result<AttachTarget> {
        self.idx.require_active("attach image")?;
        self.pool.inner.backend.attach_target(image)
    }

    /// [`Pool::get`] inside the transaction.
    pub fn get<T: RecordType>(&mut self, kind: EntryKind, id: &str) -> Result<Entry<T>> {
        let idx = &mut *self.idx;
        idx.require_active("get entry")?;
        let s = Pool::existing(idx, kind, id)?;
        match Pool::to_listed::<T>(kind, id, s) {
            Listed::Ok(e) => Ok(e),
            Listed::Damaged(d) => Err(Error::Damaged {
                path: d.path,
                reason: d.reason,
            }),
        }
    }

    /// [`Pool::contains`] inside the transaction.
    pub fn contains(&mut self, kind: EntryKind, id: &str) -> Result<bool> {
        Ok(self.idx.slot(kind, id).is_some())
    }

    /// [`Pool::list`] inside the transaction.
    pub fn list<T: RecordType + Clone + Send + Sync + 'static>(
        &mut self,
        kind: EntryKind,
        filter: impl Fn(&str, &T) -> bool,
    ) -> Result<Vec<Listed<T>>> {
        self.idx.require_active("list entries")?;
        let rows = self.idx.rows::<T>(kind);
        Ok(filter_rows(kind, &rows, filter))
    }
}

/// A slot's record parsed as `T`, from its parse cache when it holds a `T`.
fn slot_record<T: RecordType + Send + Sync + 'static>(
    s: &Slot,
) -> std::result::Result<Arc<Record<T>>, String> {
    match &s.record {
        Ok(bytes) => {
            let mut pc = s.parsed.0.lock().unwrap_or_else(|e| e.into_inner());
            match pc
                .as_ref()
                .and_then(|a| Arc::clone(a).downcast::<Record<T>>().ok())
            {
                Some(r) => Ok(r),
                None => Record::<T>::parse(bytes).map(|r| {
                    let r = Arc::new(r);
                    *pc = Some(r.clone());
                    r
                }),
            }
        }
        Err(reason) => Err(reason.clone()),
    }
}

thread_local! {
    /// Pools (by location) whose lock this thread holds, to turn a
    /// self-deadlock into an error; by location so that two handles opened
    /// separately on one pool are caught too.
    static HELD: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct ReentryGuard(PathBuf);

impl ReentryGuard {
    fn enter(pool: &Pool, op: &'static str) -> Result<ReentryGuard> {
        Self::enter_path(pool.location(), op)
    }

    fn enter_path(path: &Path, op: &'static str) -> Result<ReentryGuard> {
        let key = path.to_path_buf();
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.contains(&key) {
                return Err(Error::Reentrant { path: key, op });
            }
            h.push(key.clone());
            Ok(ReentryGuard(key))
        })
    }
}

impl Drop for ReentryGuard {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(pos) = h.iter().rposition(|k| *k == self.0) {
                h.remove(pos);
            }
        });
    }
}
