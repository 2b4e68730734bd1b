//! Records of things that live on this host outside any pool (the volume
//! layer keeps its instances here), next to the registry:
//!
//! ```text
//! <registry root>/<kind>/<id>.json    the record (written atomically)
//! <registry root>/<kind>/<id>.lock    held while a process changes it
//! <registry root>/<kind>/<id>.d/      files that belong to the record (config disk, ...)
//! ```
//!
//! A record changes only under its lock, and the lock is an `flock`: a
//! process that dies while changing a record releases it, so whoever takes
//! the lock next knows the record was left by a dead writer and can finish
//! or undo its work.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::lock::{lock_file, FileLock, LockMode, Wait};
use crate::record::{encode, fsync_dir, is_temp_name, remove_temp, write_atomic, Record};
use crate::RecordType;

/// Longest accepted record id, in bytes.
pub const MAX_HOST_ID_LEN: usize = 63;

/// Checks a host record id: 1–63 characters of `a-z A-Z 0-9 . _ -`, not
/// starting with `.` (safe as a path component on every filesystem we use).
pub fn validate_host_id(id: &str) -> std::result::Result<(), &'static str> {
    if id.is_empty() {
        return Err("must not be empty");
    }
    if id.len() > MAX_HOST_ID_LEN {
        return Err("must be at most 63 characters");
    }
    if id.starts_with('.') {
        return Err("must not start with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may contain only a-z, A-Z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

/// A directory of host records of one kind (e.g. `instances`).
#[derive(Debug, Clone)]
pub struct HostRecords {
    dir: PathBuf,
    wait: Wait,
}

/// The lock of one host record; changes to the record need it. Released
/// on drop.
#[derive(Debug)]
pub struct HostRecordLock {
    id: String,
    _lock: FileLock,
}

impl HostRecordLock {
    /// The id of the record it locks.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl HostRecords {
    /// Opens (creating if needed) the record directory `dir`; locks wait
    /// per `wait`.
    pub(crate) fn open(dir: PathBuf, wait: Wait) -> Result<HostRecords> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create record directory", e))?;
        Ok(HostRecords { dir, wait })
    }

    /// The same directory with another lock-wait policy.
    pub fn with_wait(&self, wait: Wait) -> HostRecords {
        HostRecords {
            dir: self.dir.clone(),
            wait,
        }
    }

    fn checked(&self, id: &str) -> Result<()> {
        validate_host_id(id).map_err(|rule| Error::InvalidName {
            name: id.to_string(),
            rule,
        })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.lock"))
    }

    /// The directory for files that belong to record `id` (not created).
    pub fn files_dir(&self, id: &str) -> Result<PathBuf> {
        self.checked(id)?;
        Ok(self.dir.join(format!("{id}.d")))
    }

    /// Takes the lock of record `id`, waiting per this handle's policy.
    pub fn lock(&self, id: &str, op: &'static str) -> Result<HostRecordLock> {
        self.lock_with(id, self.wait, op)
    }

    /// Takes the lock of record `id` if nobody holds it.
    pub fn try_lock(&self, id: &str, op: &'static str) -> Result<Option<HostRecordLock>> {
        match self.lock_with(id, Wait::FailFast, op) {
            Ok(l) => Ok(Some(l)),
            Err(Error::Busy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn lock_with(&self, id: &str, wait: Wait, op: &'static str) -> Result<HostRecordLock> {
        self.checked(id)?;
        let path = self.lock_path(id);
        // The lock file is removed with its record (see `remove`); a process
        // that opened it just before could hold a lock on a file no longer
        // in the directory, so check that ours is still the one there.
        for _ in 0..64 {
            let lock = lock_file(&path, LockMode::Exclusive, wait, op)?;
            if same_file(&lock, &path) {
                return Ok(HostRecordLock {
                    id: id.to_string(),
                    _lock: lock,
                });
            }
        }
        Err(Error::io(
            &path,
            op,
            std::io::Error::other("lock file keeps being replaced"),
        ))
    }

    /// Reads record `id`; `None` if there is none.
    pub fn read<T: RecordType>(&self, id: &str) -> Result<Option<T>> {
        self.checked(id)?;
        let path = self.record_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "read record", e)),
        };
        Record::<T>::parse(&bytes)
            .map(|r| Some(r.data))
            .map_err(|reason| Error::Damaged { path, reason })
    }

    /// Writes record `id` atomically (old or new after a crash, never a mix).
    pub fn write<T: RecordType>(&self, lock: &HostRecordLock, id: &str, data: &T) -> Result<()> {
        self.require(lock, id)?;
        let path = self.record_path(id);
        let bytes = encode(data, T::SCHEMA_VERSION, &path)?;
        write_atomic(&path, &bytes)
    }

    /// Removes record `id`, its files directory and its lock file (the lock
    /// stays held until `lock` is dropped). Missing parts are fine.
    pub fn remove(&self, lock: &HostRecordLock, id: &str) -> Result<()> {
        self.require(lock, id)?;
        let files = self.dir.join(format!("{id}.d"));
        // Record first: once it is gone, nothing refers to the files.
        for p in [self.record_path(id), self.lock_path(id)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, "remove record", e)),
            }
        }
        match std::fs::remove_dir_all(&files) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&files, "remove record files", e)),
        }
        fsync_dir(&self.dir)
    }

    fn require(&self, lock: &HostRecordLock, id: &str) -> Result<()> {
        self.checked(id)?;
        if lock.id != id {
            return Err(Error::io(
                &self.record_path(id),
                "change record",
                std::io::Error::other(format!(
                    "holding the lock of {:?}, not of this record",
                    lock.id
                )),
            ));
        }
        Ok(())
    }

    /// Ids of every record, sorted. Also lists ids that have only a lock
    /// file or a files directory (left by a writer that died before its
    /// first record write), so recovery can clear them. Temporary files of
    /// dead writers are removed on the way.
    pub fn list(&self) -> Result<Vec<String>> {
        let rd =
            std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "list records", e))?;
        let mut ids = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(&self.dir, "list records", e))?;
            let name = e.file_name();
            if is_temp_name(&name) {
                remove_temp(&e.path())?;
                continue;
            }
            let Some(id) = id_of(&name) else { continue };
            if validate_host_id(id).is_ok() && !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The directory itself (for messages).
    pub fn location(&self) -> &Path {
        &self.dir
    }
}

/// `ID` of `ID.json`, `ID.lock` or `ID.d`.
fn id_of(name: &OsStr) -> Option<&str> {
    let s = name.to_str()?;
    [".json", ".lock", ".d"]
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
}

/// Whether the locked descriptor is still the file at `path`.
fn same_file(lock: &FileLock, path: &Path) -> bool {
    let Ok(held) = lock.file().metadata() else {
        return false;
    };
    match std::fs::metadata(path) {
        Ok(m) => m.dev() == held.dev() && m.ino() == held.ino(),
        Err(_) => false,
    }
}
