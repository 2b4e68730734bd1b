//! The local-directory backend.
//!
//! Layout of a pool directory:
//! ```text
//! pool.json                      config record
//! lock                           the pool lock (flock); never a lock on images
//! journal                        change announcements (see `Change`)
//! volumes/<id>/volume.json       + data.raw | data.qcow2
//! templates/<id>/template.json   + image
//! snapshots/<id>/snapshot.json   + image
//! staging/<uuid>/                in-flight work, flock'ed by its live owner
//! reservations/<uuid>.json       open reservations, flock'ed by their live owner
//! ```
//! Liveness of staging areas and reservations is an `flock` held by the
//! owner: the kernel drops it when the owner dies, whatever pid namespace it
//! lived in, so nothing depends on pids (which get reused) or clocks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vmvol_format::{
    host, BackingMode, BackingPolicy, BlockIo, CompactOptions, CompactReport, Control,
    ConvertOptions, Format, Image, Prealloc, Qcow2CreateOptions, Qcow2Image, RawImage,
};

use crate::backend::{
    Change, ChangeJournal, ExclusiveGuard, FsStats, ImageStore, JournalCursor, JournalRead,
    Liveness, LivenessHold, PoolLock, RecordStore, Recovered, ReservationInfo, ScannedEntry,
    SharedGuard, SpaceFigures, StagingArea,
};
use crate::error::{Error, Result};
use crate::image::{AttachTarget, ImageOwner, ImageRef, ImageSpec, ImageSummary};
use crate::lock::{is_held_by_other, Wait};
pub use crate::lock::{lock_file, FileLock, LockMode};
use crate::name::validate_name;
use crate::record::remove_temp;
use crate::record::EntryKind;
pub use crate::record::{fsync_dir, is_temp_name, write_atomic, TEMP_PREFIX};

/// Name of the config record in a pool directory.
pub const CONFIG_FILE: &str = "pool.json";
/// Name of the lock file.
pub const LOCK_FILE: &str = "lock";
/// Name of the change journal.
pub const JOURNAL_FILE: &str = "journal";
/// Name of the staging directory.
pub const STAGING_DIR: &str = "staging";
/// Name of the reservations directory.
pub const RESERVATIONS_DIR: &str = "reservations";

/// Beyond this size the journal is replaced by a fresh one (readers then
/// rescan once), so it never grows without bound.
const JOURNAL_COMPACT_AT: u64 = 1 << 20;

/// A pool stored in a directory of a local (or locally mounted) filesystem.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    dir: PathBuf,
}

/// Maps a failed write-side call: permission and read-only errors become
/// [`Error::Unwritable`], a file where a directory should be becomes
/// [`Error::NotADirectory`].
pub(crate) fn write_err(path: &Path, op: &'static str, e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => Error::Unwritable {
            path: path.to_path_buf(),
            source: e,
        },
        K::NotADirectory => Error::NotADirectory {
            path: path.to_path_buf(),
            reason: format!("{op}: a parent is not a directory ({e})"),
        },
        _ => Error::io(path, op, e),
    }
}

impl LocalBackend {
    /// Opens an existing pool directory (it must hold `pool.json`).
    pub fn open(dir: &Path) -> Result<LocalBackend> {
        let dir = std::path::absolute(dir).map_err(|e| Error::io(dir, "resolve pool path", e))?;
        let meta =
            std::fs::metadata(&dir).map_err(|e| Error::io(&dir, "open pool directory", e))?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory {
                path: dir,
                reason: "a pool must be a directory".into(),
            });
        }
        let cfg = dir.join(CONFIG_FILE);
        if !cfg.exists() {
            return Err(Error::io(
                &cfg,
                "open pool",
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        Ok(LocalBackend { dir })
    }

    /// Creates the layout in `dir` (which must exist and be empty, or hold
    /// only a previous layout's empty directories) and writes `config`.
    pub fn create(dir: &Path, config: &[u8]) -> Result<LocalBackend> {
        let b = LocalBackend {
            dir: dir.to_path_buf(),
        };
        for sub in [
            EntryKind::Volume.dir_name(),
            EntryKind::Template.dir_name(),
            EntryKind::Snapshot.dir_name(),
            STAGING_DIR,
            RESERVATIONS_DIR,
        ] {
            let p = dir.join(sub);
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
                Err(e) => return Err(write_err(&p, "create directory", e)),
            }
        }
        for f in [LOCK_FILE, JOURNAL_FILE] {
            let p = dir.join(f);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| write_err(&p, "create file", e))?;
        }
        // pool.json last: its presence is what makes the directory a pool.
        write_atomic(&dir.join(CONFIG_FILE), config).map_err(|e| match e {
            Error::Io { path, op, source } => write_err(&path, op, source),
            other => other,
        })?;
        Ok(b)
    }

    /// The config record of a pool in directory `dir` (whose presence is
    /// what makes the directory a pool).
    pub fn config_file(dir: &Path) -> PathBuf {
        dir.join(CONFIG_FILE)
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn kind_dir(&self, kind: EntryKind) -> PathBuf {
        self.dir.join(kind.dir_name())
    }

    fn staging_dir(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    fn reservations_dir(&self) -> PathBuf {
        self.dir.join(RESERVATIONS_DIR)
    }

    /// [`PoolBackend::journal_append`] with a chosen compaction threshold.
    fn journal_append_at(&self, change: &Change, compact_at: u64) -> Result<JournalCursor> {
        let p = self.dir.join(JOURNAL_FILE);
        let line = change_line(change);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        if len >= compact_at {
            // A new inode = a new epoch; readers of the old one rescan.
            write_atomic(&p, line.as_bytes())?;
            let m = std::fs::metadata(&p).map_err(|e| Error::io(&p, "stat journal", e))?;
            return Ok(JournalCursor {
                epoch: journal_epoch(&m),
                offset: m.len(),
            });
        }
        // One small O_APPEND write: it lands whole or not at all. No fsync:
        // the journal only informs live processes; after a crash every open
        // rescans the disk.
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .map_err(|e| Error::io(&p, "open journal", e))?;
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io(&p, "append to journal", e))?;
        let m = f.metadata().map_err(|e| Error::io(&p, "stat journal", e))?;
        Ok(JournalCursor {
            epoch: journal_epoch(&m),
            offset: m.len(),
        })
    }

    fn scan_reservations(&self, prune: bool) -> Result<(Vec<ReservationInfo>, Vec<Recovered>)> {
        let rdir = self.reservations_dir();
        let mut live = Vec::new();
        let mut dead = Vec::new();
        let rd = std::fs::read_dir(&rdir).map_err(|e| Error::io(&rdir, "list reservations", e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io(&rdir, "list reservations", e))?;
            let path = de.path();
            let mut f = match File::open(&path) {
                Ok(f) => f,
                // Released between listing and opening.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, "open reservation", e)),
            };
            if !is_held_by_other(&f, &path)? {
                // Its owner is gone (the kernel dropped the owner's lock).
                if prune {
                    let bytes = read_reservation(&mut f, &path)
                        .map(|r| r.bytes)
                        .unwrap_or(0);
                    match std::fs::remove_file(&path) {
                        Ok(()) => dead.push(Recovered {
                            path,
                            what: format!("reservation of {bytes} bytes left by a dead process"),
                        }),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io(&path, "remove dead reservation", e)),
                    }
                }
                continue;
            }
            live.push(read_reservation(&mut f, &path)?);
        }
        Ok((live, dead))
    }
}

fn read_reservation(f: &mut File, path: &Path) -> Result<ReservationInfo> {
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| Error::io(path, "read reservation", e))?;
    serde_json::from_slice(&buf).map_err(|e| Error::Damaged {
        path: path.to_path_buf(),
        reason: format!("invalid reservation: {e}"),
    })
}

/// Held reservation: the locked file; dropping it deletes the file, then
/// closes it (releasing the lock).
struct ReservationHold {
    path: PathBuf,
    file: File,
}

impl Drop for ReservationHold {
    fn drop(&mut self) {
        // If this fails the file stays, unlocked once we close it: the next
        // exclusive reader prunes it as dead.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `du`-style allocated bytes of `path` and everything under it (symlinks
/// not followed). Entries that vanish during the walk are skipped.
fn du(path: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&p, "stat", e)),
        };
        total = total.saturating_add(host::allocated_bytes_of(&meta));
        if meta.is_dir() {
            let rd = match std::fs::read_dir(&p) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&p, "list directory", e)),
            };
            for de in rd {
                let de = de.map_err(|e| Error::io(&p, "list directory", e))?;
                stack.push(de.path());
            }
        }
    }
    Ok(total)
}

/// Identity of a journal generation: inode number mixed with birth time, so
/// an inode number reused by a later compaction is still a new epoch.
fn journal_epoch(m: &std::fs::Metadata) -> u64 {
    let born = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    m.ino().rotate_left(32) ^ born
}

fn change_line(change: &Change) -> String {
    match change {
        Change::Entry(kind, id) => format!("{} {id}\n", kind.as_str()),
        Change::Config => "config\n".to_string(),
    }
}

fn parse_line(line: &str) -> Option<Change> {
    if line == "config" {
        return Some(Change::Config);
    }
    let (k, id) = line.split_once(' ')?;
    let kind = EntryKind::from_str_opt(k)?;
    crate::name::validate_name(id).ok()?;
    Some(Change::Entry(kind, id.to_string()))
}

impl LocalBackend {
    /// The file of `image` (names checked, so the join stays in the pool).
    pub fn image_path(&self, image: &ImageRef) -> Result<PathBuf> {
        validate_name(&image.name)?;
        let file = format!("{}.{}", image.name, ext(image.format));
        Ok(match &image.owner {
            ImageOwner::Entry { kind, id } => {
                validate_name(id)?;
                self.kind_dir(*kind).join(id).join(file)
            }
            ImageOwner::Staging { area } => self.area_dir(*area).join(file),
        })
    }

    fn area_dir(&self, area: uuid::Uuid) -> PathBuf {
        self.staging_dir().join(area.simple().to_string())
    }

    /// The backing policy of every image of this pool: backing files must
    /// resolve inside the pool directory.
    pub fn backing_policy(&self) -> BackingPolicy {
        let root = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        BackingPolicy::within([root])
    }

    fn open_opts(&self, image: &ImageRef, writable: bool) -> vmvol_format::OpenOptions {
        // A staged image needs no crash ordering: a crash discards the whole
        // staging area, and commit makes every staged file durable before
        // the entry appears (see `sync_area`).
        let staged = matches!(image.owner, ImageOwner::Staging { .. });
        vmvol_format::OpenOptions::new()
            .read_only(!writable)
            .policy(self.backing_policy())
            .format(image.format)
            .unordered(writable && staged)
    }

    /// fsyncs (data and metadata) every file of staging area `dir`, so that
    /// images built there without crash ordering or flushes are durable
    /// before the commit's rename publishes them.
    fn sync_area(dir: &Path) -> Result<()> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list staging area", e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io(dir, "list staging area", e))?;
            let path = de.path();
            let ft = de
                .file_type()
                .map_err(|e| Error::io(&path, "stat staged file", e))?;
            if !ft.is_file() {
                continue;
            }
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, "fsync staged image", e))?;
        }
        Ok(())
    }

    /// Maps a backing file path (as the format layer resolved it) back to
    /// the image it names, if it lies in this pool's layout.
    fn ref_of_path(&self, path: &Path, format: Format) -> Option<ImageRef> {
        let root = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let rel = canon.strip_prefix(&root).ok()?;
        let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
        let [top, owner, file] = parts[..] else {
            return None;
        };
        let name = file.strip_suffix(&format!(".{}", ext(format)))?;
        let owner = if top == STAGING_DIR {
            ImageOwner::Staging {
                area: uuid::Uuid::parse_str(owner).ok()?,
            }
        } else {
            let kind = EntryKind::ALL.into_iter().find(|k| k.dir_name() == top)?;
            ImageOwner::Entry {
                kind,
                id: owner.to_string(),
            }
        };
        Some(ImageRef {
            owner,
            name: name.to_string(),
            format,
        })
    }

    fn require_staged(
        &self,
        area: &StagingArea,
        name: &str,
        format: Format,
    ) -> Result<(ImageRef, PathBuf)> {
        let r = ImageRef {
            owner: ImageOwner::Staging { area: area.id },
            name: name.to_string(),
            format,
        };
        let p = self.image_path(&r)?;
        Ok((r, p))
    }
}

/// File extension of an image in `format`.
fn ext(format: Format) -> &'static str {
    match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    }
}

/// The image file name of `name` in `format` (`data.raw`, `data.qcow2`, ...).
pub fn image_file_name(name: &str, format: Format) -> String {
    format!("{name}.{}", ext(format))
}

/// Refuses to compact an image that is not qcow2.
pub(crate) fn require_qcow2(image: &ImageRef) -> Result<()> {
    if image.format == Format::Qcow2 {
        return Ok(());
    }
    Err(Error::InvalidImage {
        image: image.to_string(),
        reason: "only qcow2 images can be compacted (a raw image has no cluster map to drop or \
                 compress clusters in)"
            .into(),
    })
}

fn img_err(image: &ImageRef, op: &'static str, source: vmvol_format::Error) -> Error {
    Error::Image {
        image: image.to_string(),
        op,
        source,
    }
}

fn host_bytes(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| host::allocated_bytes_of(&m))
        .unwrap_or(0)
}

impl PoolLock for LocalBackend {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn lock_shared(&self, wait: Wait, op: &'static str) -> Result<SharedGuard> {
        let l = lock_file(&self.dir.join(LOCK_FILE), LockMode::Shared, wait, op)?;
        Ok(SharedGuard::new(l))
    }

    fn lock_exclusive(&self, wait: Wait, op: &'static str) -> Result<ExclusiveGuard> {
        let l = lock_file(&self.dir.join(LOCK_FILE), LockMode::Exclusive, wait, op)?;
        // An flock cannot lapse while its holder lives: one token suffices.
        Ok(ExclusiveGuard::new(0, l))
    }

    fn check_fence(&self, _guard: &ExclusiveGuard, _op: &'static str) -> Result<()> {
        Ok(())
    }
}

impl ChangeJournal for LocalBackend {
    fn journal_append(&self, guard: &ExclusiveGuard, change: &Change) -> Result<JournalCursor> {
        self.check_fence(guard, "append to journal")?;
        self.journal_append_at(change, JOURNAL_COMPACT_AT)
    }
    fn journal_read(&self, since: JournalCursor) -> Result<JournalRead> {
        let p = self.dir.join(JOURNAL_FILE);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(JournalRead::Reset(JournalCursor::default()))
            }
            Err(e) => return Err(Error::io(&p, "open journal", e)),
        };
        let m = f.metadata().map_err(|e| Error::io(&p, "stat journal", e))?;
        let now = JournalCursor {
            epoch: journal_epoch(&m),
            offset: m.len(),
        };
        if now.epoch != since.epoch || now.offset < since.offset {
            return Ok(JournalRead::Reset(now));
        }
        if now.offset == since.offset {
            return Ok(JournalRead::Changes(Vec::new(), now));
        }
        f.seek(SeekFrom::Start(since.offset))
            .map_err(|e| Error::io(&p, "seek journal", e))?;
        let mut buf = Vec::new();
        f.take(now.offset - since.offset)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&p, "read journal", e))?;
        let Ok(text) = std::str::from_utf8(&buf) else {
            return Ok(JournalRead::Reset(now));
        };
        let mut changes = Vec::new();
        for line in text.split_terminator('\n') {
            match parse_line(line) {
                Some(c) => changes.push(c),
                // Garbage (e.g. after a power loss): trust nothing, rescan.
                None => return Ok(JournalRead::Reset(now)),
            }
        }
        Ok(JournalRead::Changes(changes, now))
    }
}

impl RecordStore for LocalBackend {
    fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    fn read_config(&self) -> Result<Vec<u8>> {
        let p = self.dir.join(CONFIG_FILE);
        std::fs::read(&p).map_err(|e| Error::io(&p, "read pool config", e))
    }
    fn write_config(&self, guard: &ExclusiveGuard, bytes: &[u8]) -> Result<()> {
        self.check_fence(guard, "write pool config")?;
        write_atomic(&self.dir.join(CONFIG_FILE), bytes)
    }

    fn list_ids(&self, kind: EntryKind) -> Result<Vec<String>> {
        let d = self.kind_dir(kind);
        let rd = std::fs::read_dir(&d).map_err(|e| Error::io(&d, "list entries", e))?;
        let mut ids = Vec::new();
        for de in rd {
            let de = de.map_err(|e| Error::io(&d, "list entries", e))?;
            ids.push(de.file_name().to_string_lossy().into_owned());
        }
        Ok(ids)
    }

    fn scan_entry(
        &self,
        kind: EntryKind,
        id: &str,
        clean: Option<&ExclusiveGuard>,
    ) -> Result<Option<ScannedEntry>> {
        let clean = clean.is_some();
        let dir = self.kind_dir(kind).join(id);
        let record_path = dir.join(kind.record_file());
        let dmeta = match std::fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&dir, "stat entry", e)),
        };
        let mut out = ScannedEntry {
            record_path: record_path.clone(),
            record: Err("record file missing".into()),
            images: Vec::new(),
            physical: host::allocated_bytes_of(&dmeta),
            removed: Vec::new(),
        };
        if !dmeta.is_dir() {
            out.record = Err("entry is not a directory".into());
            return Ok(Some(out));
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&dir, "list entry", e)),
        };
        let mut images: Vec<(String, Format, PathBuf, u64)> = Vec::new();
        for de in rd {
            let de = de.map_err(|e| Error::io(&dir, "list entry", e))?;
            let name = de.file_name();
            let path = de.path();
            let name = name.to_string_lossy();
            // A temp file left by a dead writer goes; a live one is counted
            // (its name is never a record's or an image's).
            if clean && is_temp_name(&de.file_name()) && remove_temp(&path)? {
                out.removed.push(path);
                continue;
            }
            let bytes = du(&path)?;
            out.physical = out.physical.saturating_add(bytes);
            if name == kind.record_file() {
                out.record = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"));
                continue;
            }
            let parsed = if let Some(stem) = name.strip_suffix(".raw") {
                Some((stem, Format::Raw))
            } else {
                name.strip_suffix(".qcow2").map(|s| (s, Format::Qcow2))
            };
            if let Some((stem, format)) = parsed.filter(|(s, _)| validate_name(s).is_ok()) {
                images.push((stem.to_string(), format, path, bytes));
            }
        }
        images.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, format, path, bytes)) in images.iter().enumerate() {
            let twin = images
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && o.0 == *name);
            let mut img = ImageSummary {
                image: ImageRef::entry(kind, id, name, *format),
                virtual_size: None,
                host_bytes: *bytes,
                backing: None,
                error: None,
            };
            match vmvol_format::virtual_size(path, *format) {
                Ok(v) => img.virtual_size = Some(v),
                Err(e) => img.error = Some(e.to_string()),
            }
            if twin {
                img.error = Some(format!("both {name}.raw and {name}.qcow2 present"));
            }
            out.images.push(img);
        }
        Ok(Some(out))
    }

    fn write_record(
        &self,
        guard: &ExclusiveGuard,
        kind: EntryKind,
        id: &str,
        bytes: &[u8],
    ) -> Result<()> {
        self.check_fence(guard, "write record")?;
        let dir = self.kind_dir(kind).join(id);
        write_atomic(&dir.join(kind.record_file()), bytes)
    }

    fn commit_staging(
        &self,
        guard: &ExclusiveGuard,
        area: &StagingArea,
        kind: EntryKind,
        id: &str,
        record: &[u8],
    ) -> Result<()> {
        self.check_fence(guard, "commit entry")?;
        let path = self.area_dir(area.id);
        // Images first; the record's atomic write then fsyncs the area
        // directory, which makes their names durable too.
        Self::sync_area(&path)?;
        write_atomic(&path.join(kind.record_file()), record)?;
        let kdir = self.kind_dir(kind);
        let target = kdir.join(id);
        std::fs::rename(path, &target)
            .map_err(|e| Error::io(&target, "move staged entry into place", e))?;
        fsync_dir(&kdir)?;
        fsync_dir(&self.staging_dir())
    }

    fn remove_entry(&self, guard: &ExclusiveGuard, kind: EntryKind, id: &str) -> Result<()> {
        self.check_fence(guard, "remove entry")?;
        let kdir = self.kind_dir(kind);
        let src = kdir.join(id);
        // Move it out of sight first (one atomic step), then delete at
        // leisure: a crash mid-delete leaves an unlocked staging item that
        // recovery removes, never a half-deleted entry.
        let trash = self
            .staging_dir()
            .join(format!("trash-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(&src, &trash).map_err(|e| Error::io(&src, "remove entry", e))?;
        fsync_dir(&kdir)?;
        let r = if trash.is_dir() {
            std::fs::remove_dir_all(&trash)
        } else {
            std::fs::remove_file(&trash)
        };
        r.map_err(|e| Error::io(&trash, "delete removed entry", e))
    }

    fn destroy(&self, guard: ExclusiveGuard, remove_dir: bool) -> Result<()> {
        self.check_fence(&guard, "undefine pool")?;
        // pool.json first: from then on the directory is no longer a pool,
        // whatever happens to the rest.
        let cfg = self.dir.join(CONFIG_FILE);
        std::fs::remove_file(&cfg).map_err(|e| write_err(&cfg, "remove pool config", e))?;
        fsync_dir(&self.dir)?;
        for k in EntryKind::ALL {
            let p = self.kind_dir(k);
            std::fs::remove_dir(&p).map_err(|e| Error::io(&p, "remove directory", e))?;
        }
        for d in [STAGING_DIR, RESERVATIONS_DIR] {
            let p = self.dir.join(d);
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, "remove directory", e))?;
        }
        for f in [JOURNAL_FILE, LOCK_FILE] {
            let p = self.dir.join(f);
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove file", e))?;
        }
        if remove_dir {
            std::fs::remove_dir(&self.dir)
                .map_err(|e| Error::io(&self.dir, "remove pool directory", e))?;
        }
        Ok(())
    }
}

impl Liveness for LocalBackend {
    fn create_staging(&self) -> Result<StagingArea> {
        let id = uuid::Uuid::new_v4();
        let path = self.area_dir(id);
        std::fs::create_dir(&path).map_err(|e| write_err(&path, "create staging directory", e))?;
        let f = File::open(&path).map_err(|e| Error::io(&path, "open staging directory", e))?;
        // Callers hold the pool lock (shared) here, so recovery, which needs
        // the exclusive lock, cannot see the area before it is locked.
        if let Err(e) = f.try_lock() {
            let _ = std::fs::remove_dir(&path);
            let e = match e {
                std::fs::TryLockError::Error(e) => e,
                std::fs::TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
            };
            return Err(Error::io(&path, "lock staging directory", e));
        }
        Ok(StagingArea {
            id,
            hold: LivenessHold::new(f),
        })
    }

    fn discard_staging(&self, area: &StagingArea) {
        let _ = std::fs::remove_dir_all(self.area_dir(area.id));
    }

    fn live_staging(&self) -> Result<usize> {
        let sdir = self.staging_dir();
        let rd = std::fs::read_dir(&sdir).map_err(|e| Error::io(&sdir, "list staging", e))?;
        let mut n = 0;
        for de in rd {
            let de = de.map_err(|e| Error::io(&sdir, "list staging", e))?;
            let path = de.path();
            if let Ok(f) = File::open(&path) {
                if path.is_dir() && is_held_by_other(&f, &path)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn recover(&self, guard: &ExclusiveGuard) -> Result<Vec<Recovered>> {
        self.check_fence(guard, "recover pool")?;
        let mut out = Vec::new();
        // A layout directory deleted by hand would make every later step
        // fail; put it back (empty) and say so.
        for sub in [
            EntryKind::Volume.dir_name(),
            EntryKind::Template.dir_name(),
            EntryKind::Snapshot.dir_name(),
            STAGING_DIR,
            RESERVATIONS_DIR,
        ] {
            let p = self.dir.join(sub);
            if !p.is_dir() {
                std::fs::create_dir(&p)
                    .map_err(|e| write_err(&p, "recreate layout directory", e))?;
                out.push(Recovered {
                    path: p,
                    what: "missing layout directory recreated".into(),
                });
            }
        }
        let sdir = self.staging_dir();
        let rd = std::fs::read_dir(&sdir).map_err(|e| Error::io(&sdir, "list staging", e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io(&sdir, "list staging", e))?;
            let path = de.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, "stat staging item", e)),
            };
            if meta.is_dir() {
                let f = File::open(&path).map_err(|e| Error::io(&path, "open staging item", e))?;
                if is_held_by_other(&f, &path)? {
                    continue; // a live operation's work in progress
                }
                std::fs::remove_dir_all(&path)
                    .map_err(|e| Error::io(&path, "remove staging leftover", e))?;
                out.push(Recovered {
                    path,
                    what: "staging directory left by a crashed operation".into(),
                });
            } else {
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(&path, "remove staging leftover", e))?;
                out.push(Recovered {
                    path,
                    what: "stray file in staging".into(),
                });
            }
        }
        // Half-written config temp files.
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "list pool", e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io(&self.dir, "list pool", e))?;
            let path = de.path();
            if is_temp_name(&de.file_name()) && remove_temp(&path)? {
                out.push(Recovered {
                    path,
                    what: "half-written record temp file".into(),
                });
            }
        }
        let (_, dead) = self.scan_reservations(true)?;
        out.extend(dead);
        Ok(out)
    }

    fn create_reservation(
        &self,
        guard: &ExclusiveGuard,
        info: &ReservationInfo,
    ) -> Result<LivenessHold> {
        self.check_fence(guard, "reserve")?;
        let path = self
            .reservations_dir()
            .join(format!("{}.json", info.id.simple()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| write_err(&path, "create reservation", e))?;
        if let Err(e) = f.try_lock() {
            let _ = std::fs::remove_file(&path);
            let e = match e {
                std::fs::TryLockError::Error(e) => e,
                std::fs::TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
            };
            return Err(Error::io(&path, "lock reservation", e));
        }
        let mut hold = ReservationHold { path, file: f };
        // From here `hold` deletes the file if anything fails. No fsync: a
        // reservation does not outlive its process, let alone a reboot.
        let body = serde_json::to_vec(info).map_err(|source| Error::Serialize {
            path: hold.path.clone(),
            source,
        })?;
        hold.file
            .write_all(&body)
            .map_err(|e| Error::io(&hold.path, "write reservation", e))?;
        Ok(LivenessHold::new(hold))
    }

    fn live_reservations(&self, prune: Option<&ExclusiveGuard>) -> Result<Vec<ReservationInfo>> {
        self.scan_reservations(prune.is_some())
            .map(|(live, _)| live)
    }
}

impl SpaceFigures for LocalBackend {
    fn fs_stats(&self) -> Result<FsStats> {
        statvfs(&self.dir)
    }

    fn base_physical(&self) -> Result<u64> {
        let meta =
            std::fs::symlink_metadata(&self.dir).map_err(|e| Error::io(&self.dir, "stat", e))?;
        let mut total = host::allocated_bytes_of(&meta);
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "list pool", e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io(&self.dir, "list pool", e))?;
            let path = de.path();
            let name = de.file_name();
            let is_kind = EntryKind::ALL
                .iter()
                .any(|k| name.to_str() == Some(k.dir_name()));
            if is_kind {
                // Entries are counted per entry by the scan; only the
                // directory itself here.
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    total = total.saturating_add(host::allocated_bytes_of(&m));
                }
            } else {
                total = total.saturating_add(du(&path)?);
            }
        }
        Ok(total)
    }
}

impl ImageStore for LocalBackend {
    fn create_image(
        &self,
        area: &StagingArea,
        name: &str,
        spec: &ImageSpec,
        ctl: &Control,
    ) -> Result<ImageRef> {
        let (r, path) = self.require_staged(area, name, spec.format)?;
        match spec.format {
            Format::Raw => {
                RawImage::create(&path, spec.size, spec.prealloc, ctl)
                    .map_err(|e| img_err(&r, "create image", e))?;
            }
            Format::Qcow2 => {
                if spec.prealloc != Prealloc::Off {
                    return Err(Error::InvalidImage {
                        image: r.to_string(),
                        reason: "preallocation applies to raw images only; qcow2 images are thin"
                            .into(),
                    });
                }
                Qcow2Image::create(&path, &Qcow2CreateOptions::new(spec.size))
                    .map_err(|e| img_err(&r, "create image", e))?;
            }
        }
        Ok(r)
    }

    fn create_linked(
        &self,
        area: &StagingArea,
        name: &str,
        base: &ImageRef,
        size: Option<u64>,
    ) -> Result<ImageRef> {
        let (r, path) = self.require_staged(area, name, Format::Qcow2)?;
        let base_path = self.image_path(base)?;
        // Relative to the overlay's directory: the staging area and an entry
        // directory sit at the same depth, so the name keeps resolving after
        // commit moves the area into place.
        let backing_name = match &base.owner {
            ImageOwner::Entry { kind, id } => format!(
                "../../{}/{id}/{}",
                kind.dir_name(),
                image_file_name(&base.name, base.format)
            ),
            ImageOwner::Staging { area: a } if *a == area.id => {
                image_file_name(&base.name, base.format)
            }
            ImageOwner::Staging { .. } => {
                return Err(Error::InvalidImage {
                    image: base.to_string(),
                    reason: "a linked image's base must be committed or in the same staging area"
                        .into(),
                })
            }
        };
        let base_size = vmvol_format::virtual_size(&base_path, base.format)
            .map_err(|e| img_err(base, "read base image size", e))?;
        let size = size.unwrap_or(base_size);
        if size < base_size {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: format!("size {size} is smaller than its base's {base_size} bytes"),
            });
        }
        let opts = Qcow2CreateOptions::new(size).backing(backing_name, base.format);
        Qcow2Image::create(&path, &opts).map_err(|e| img_err(&r, "create linked image", e))?;
        Ok(r)
    }

    fn copy_full(
        &self,
        area: &StagingArea,
        name: &str,
        src: &ImageRef,
        format: Format,
        ctl: &Control,
    ) -> Result<ImageRef> {
        let (r, path) = self.require_staged(area, name, format)?;
        let src_path = self.image_path(src)?;
        // convert reflinks or copy_file_range's raw → raw, flattens chains.
        // Not durable here: commit fsyncs every staged image (`sync_area`).
        let opts = ConvertOptions {
            format,
            backing: BackingMode::Flatten,
            durable: false,
            ..ConvertOptions::default()
        };
        vmvol_format::convert(&src_path, &self.open_opts(src, false), &path, &opts, ctl)
            .map_err(|e| img_err(src, "copy image", e))?;
        Ok(r)
    }

    fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        let path = self.image_path(image)?;
        let img = Image::open(&path, &self.open_opts(image, writable))
            .map_err(|e| img_err(image, "open image", e))?;
        Ok(Box::new(img))
    }

    fn grow_image(&self, guard: &ExclusiveGuard, image: &ImageRef, new_size: u64) -> Result<()> {
        self.check_fence(guard, "grow image")?;
        self.grow_any(image, new_size)
    }

    fn grow_staged(&self, area: &StagingArea, image: &ImageRef, new_size: u64) -> Result<()> {
        image.require_staged_in(area.id)?;
        self.grow_any(image, new_size)
    }

    fn compact_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        opts: &CompactOptions,
        ctl: &Control,
    ) -> Result<CompactReport> {
        self.check_fence(guard, "compact image")?;
        require_qcow2(image)?;
        let path = self.image_path(image)?;
        // Written to a temp file beside the image, fsynced, renamed over it.
        vmvol_format::compact(&path, opts, ctl).map_err(|e| img_err(image, "compact image", e))
    }

    fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary> {
        let path = self.image_path(image)?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::ImageNotFound {
                image: image.to_string(),
            });
        }
        let mut s = ImageSummary {
            image: image.clone(),
            virtual_size: None,
            host_bytes: host_bytes(&path),
            backing: None,
            error: None,
        };
        match Image::open(&path, &self.open_opts(image, false)) {
            Ok(img) => {
                s.virtual_size = Some(img.size());
                if let Some(vmvol_format::BackingRef {
                    path: bpath,
                    format: bfmt,
                }) = img
                    .as_qcow2()
                    .and_then(|q| q.backing_chain().into_iter().next())
                {
                    s.backing = self.ref_of_path(&bpath, bfmt);
                    if s.backing.is_none() {
                        s.error = Some(format!(
                            "backing file {} is not an image of this pool",
                            bpath.display()
                        ));
                    }
                }
            }
            Err(e) => {
                s.virtual_size = vmvol_format::virtual_size(&path, image.format).ok();
                s.error = Some(e.to_string());
            }
        }
        Ok(s)
    }

    fn remove_image(&self, guard: &ExclusiveGuard, image: &ImageRef) -> Result<()> {
        self.check_fence(guard, "remove image")?;
        let path = self.image_path(image)?;
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ImageNotFound {
                image: image.to_string(),
            },
            _ => Error::io(&path, "remove image", e),
        })?;
        if let Some(d) = path.parent() {
            fsync_dir(d)?;
        }
        Ok(())
    }

    fn attach_target(&self, image: &ImageRef) -> Result<AttachTarget> {
        let path = self.image_path(image)?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(Error::ImageNotFound {
                image: image.to_string(),
            });
        }
        Ok(AttachTarget::File {
            path,
            format: image.format,
        })
    }

    fn move_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef> {
        self.check_fence(guard, "move image")?;
        let src = self.image_path(image)?;
        let to = ImageRef::entry(kind, id, name, image.format);
        let dst = self.image_path(&to)?;
        let dst_dir = self.kind_dir(kind).join(id);
        if !dst_dir.is_dir() {
            return Err(Error::InvalidImage {
                image: to.to_string(),
                reason: "the destination entry does not exist".into(),
            });
        }
        if std::fs::symlink_metadata(&dst).is_ok() {
            return Err(Error::InvalidImage {
                image: to.to_string(),
                reason: "an image of that name already exists".into(),
            });
        }
        // A staged image may have been written without any flush (see
        // `open_opts`): make it durable before its new name is.
        if matches!(image.owner, ImageOwner::Staging { .. }) {
            File::open(&src)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&src, "fsync staged image", e))?;
        }
        // Entry directories sit at one depth, so relative backing names
        // inside the moved image keep resolving.
        std::fs::rename(&src, &dst).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ImageNotFound {
                image: image.to_string(),
            },
            _ => Error::io(&src, "move image", e),
        })?;
        fsync_dir(&dst_dir)?;
        if let Some(d) = src.parent() {
            fsync_dir(d)?;
        }
        Ok(to)
    }
}

impl LocalBackend {
    fn grow_any(&self, image: &ImageRef, new_size: u64) -> Result<()> {
        let path = self.image_path(image)?;
        if image.format == Format::Qcow2 {
            // The image is closed and ours (exclusive guard or staging area):
            // the format crate grows it by one header write when it can.
            return vmvol_format::qcow2::grow_file(&path, new_size, &self.backing_policy())
                .map_err(|e| img_err(image, "grow image", e));
        }
        let img = Image::open(&path, &self.open_opts(image, true))
            .map_err(|e| img_err(image, "open image to grow", e))?;
        img.grow(new_size)
            .map_err(|e| img_err(image, "grow image", e))?;
        img.flush()
            .map_err(|e| img_err(image, "flush grown image", e))
    }
}
/// `statvfs(2)` of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> Result<FsStats> {
    let s = host::statvfs(path).map_err(|e| Error::io(path, "statvfs", e))?;
    Ok(FsStats {
        total: s.total,
        available: s.available,
        block_size: s.block_size,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn journal_compaction_starts_a_new_epoch() {
        let t = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(t.path(), b"{}").unwrap();
        let start = match b.journal_read(JournalCursor::default()).unwrap() {
            JournalRead::Reset(c) => c,
            other => panic!("{other:?}"),
        };
        let ch = Change::Entry(EntryKind::Volume, "v1".into());
        let c1 = b.journal_append_at(&ch, 40).unwrap();
        let c2 = b.journal_append_at(&Change::Config, 40).unwrap();
        assert_eq!(c1.epoch, start.epoch);
        assert_eq!(
            b.journal_read(start).unwrap(),
            JournalRead::Changes(vec![ch.clone(), Change::Config], c2)
        );
        // Past the threshold: a fresh file holding only the new line.
        let c3 = b.journal_append_at(&ch, 15).unwrap();
        assert_ne!(c3.epoch, c2.epoch);
        assert_eq!(c3.offset, "volume v1\n".len() as u64);
        assert!(matches!(b.journal_read(c2).unwrap(), JournalRead::Reset(c) if c == c3));
        assert_eq!(
            b.journal_read(c3).unwrap(),
            JournalRead::Changes(vec![], c3)
        );
        assert!(temp_free(t.path()));
    }

    fn temp_free(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .unwrap()
            .all(|e| !is_temp_name(&e.unwrap().file_name()))
    }
}
