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

use crate::backend::{
    BackendGuard, Change, FsStats, JournalCursor, JournalRead, PoolBackend, Recovered,
    ReservationInfo, ScannedEntry, StagingArea,
};
use crate::error::{Error, Result};
use crate::lock::{is_held_by_other, lock_file, LockMode, Wait};
use crate::record::{fsync_dir, write_atomic, EntryKind, ImageSummary, TEMP_PREFIX};

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
        total = total.saturating_add(meta.blocks().saturating_mul(512));
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

impl PoolBackend for LocalBackend {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn lock(&self, mode: LockMode, wait: Wait, op: &'static str) -> Result<BackendGuard> {
        let l = lock_file(&self.dir.join(LOCK_FILE), mode, wait, op)?;
        Ok(Box::new(l))
    }

    fn read_config(&self) -> Result<Vec<u8>> {
        let p = self.dir.join(CONFIG_FILE);
        std::fs::read(&p).map_err(|e| Error::io(&p, "read pool config", e))
    }

    fn write_config(&self, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.dir.join(CONFIG_FILE), bytes)
    }

    fn journal_append(&self, change: &Change) -> Result<JournalCursor> {
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

    fn scan_entry(&self, kind: EntryKind, id: &str, clean: bool) -> Result<Option<ScannedEntry>> {
        let dir = self.kind_dir(kind).join(id);
        let record_path = dir.join(kind.record_file());
        let dmeta = match std::fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&dir, "stat entry", e)),
        };
        let mut out = ScannedEntry {
            dir: dir.clone(),
            record_path: record_path.clone(),
            record: Err("record file missing".into()),
            image: None,
            physical: dmeta.blocks().saturating_mul(512),
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
        let mut images: Vec<(PathBuf, vmvol_format::Format)> = Vec::new();
        for de in rd {
            let de = de.map_err(|e| Error::io(&dir, "list entry", e))?;
            let name = de.file_name();
            let path = de.path();
            let name = name.to_string_lossy();
            if clean && name.starts_with(TEMP_PREFIX) {
                match std::fs::remove_file(&path) {
                    Ok(()) => out.removed.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&path, "remove temp record", e)),
                }
                continue;
            }
            out.physical = out.physical.saturating_add(du(&path)?);
            if name == kind.record_file() {
                out.record = std::fs::read(&path).map_err(|e| format!("cannot read: {e}"));
            } else if name == "data.raw" {
                images.push((path, vmvol_format::Format::Raw));
            } else if name == "data.qcow2" {
                images.push((path, vmvol_format::Format::Qcow2));
            }
        }
        images.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((path, format)) = images.first() {
            let mut img = ImageSummary {
                path: path.clone(),
                format: *format,
                virtual_size: None,
                error: None,
            };
            if images.len() > 1 {
                img.error = Some("both data.raw and data.qcow2 present".into());
            }
            match vmvol_format::virtual_size(path, *format) {
                Ok(v) => img.virtual_size = Some(v),
                Err(e) => img.error = Some(e.to_string()),
            }
            out.image = Some(img);
        }
        Ok(Some(out))
    }

    fn write_record(&self, kind: EntryKind, id: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.kind_dir(kind).join(id);
        write_atomic(&dir.join(kind.record_file()), bytes)
    }

    fn create_staging(&self) -> Result<StagingArea> {
        let path = self
            .staging_dir()
            .join(uuid::Uuid::new_v4().simple().to_string());
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
            path,
            guard: Box::new(f),
        })
    }

    fn discard_staging(&self, path: &Path) {
        let _ = std::fs::remove_dir_all(path);
    }

    fn commit_staging(&self, path: &Path, kind: EntryKind, id: &str, record: &[u8]) -> Result<()> {
        write_atomic(&path.join(kind.record_file()), record)?;
        let kdir = self.kind_dir(kind);
        let target = kdir.join(id);
        std::fs::rename(path, &target)
            .map_err(|e| Error::io(&target, "move staged entry into place", e))?;
        fsync_dir(&kdir)?;
        fsync_dir(&self.staging_dir())
    }

    fn remove_entry(&self, kind: EntryKind, id: &str) -> Result<()> {
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

    fn recover(&self) -> Result<Vec<Recovered>> {
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
            if de.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = de.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, "remove temp file", e))?;
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

    fn create_reservation(&self, info: &ReservationInfo) -> Result<BackendGuard> {
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
        Ok(Box::new(hold))
    }

    fn live_reservations(&self, prune: bool) -> Result<Vec<ReservationInfo>> {
        self.scan_reservations(prune).map(|(live, _)| live)
    }

    fn fs_stats(&self) -> Result<FsStats> {
        statvfs(&self.dir)
    }

    fn base_physical(&self) -> Result<u64> {
        let meta =
            std::fs::symlink_metadata(&self.dir).map_err(|e| Error::io(&self.dir, "stat", e))?;
        let mut total = meta.blocks().saturating_mul(512);
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
                    total = total.saturating_add(m.blocks().saturating_mul(512));
                }
            } else {
                total = total.saturating_add(du(&path)?);
            }
        }
        Ok(total)
    }

    fn entry_dir(&self, kind: EntryKind, id: &str) -> PathBuf {
        self.kind_dir(kind).join(id)
    }

    fn destroy(&self, remove_dir: bool) -> Result<()> {
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

/// `statvfs(2)` of the filesystem holding `path`.
// The casts are no-ops on 64-bit Linux but not where fsblkcnt_t is 32 bits.
#[allow(clippy::unnecessary_cast)]
pub fn statvfs(path: &Path) -> Result<FsStats> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::io(path, "statvfs", std::io::ErrorKind::InvalidInput.into()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory of the right type; statvfs writes it fully on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io(path, "statvfs", std::io::Error::last_os_error()));
    }
    // SAFETY: rc == 0, so statvfs initialised `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize as u64;
    Ok(FsStats {
        total: (st.f_blocks as u64).saturating_mul(frsize),
        available: (st.f_bavail as u64).saturating_mul(frsize),
        block_size: frsize,
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
        std::fs::read_dir(dir).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(TEMP_PREFIX)
        })
    }
}
