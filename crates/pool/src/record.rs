//! Generic records: the envelope every persisted record carries, the entry
//! kinds a pool holds, and the crash-safe write.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use vmvol_format::host;

use crate::error::{Error, Result};
use crate::image::ImageSummary;

/// What the upper layer stores in a pool. Each kind has its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// `volumes/<id>/volume.json` + image.
    Volume,
    /// `templates/<id>/template.json` + image.
    Template,
    /// `snapshots/<id>/snapshot.json` + image.
    Snapshot,
}

impl EntryKind {
    /// All kinds, in layout order.
    pub const ALL: [EntryKind; 3] = [EntryKind::Volume, EntryKind::Template, EntryKind::Snapshot];

    /// The kind's directory inside the pool (`volumes`, ...).
    pub fn dir_name(self) -> &'static str {
        match self {
            EntryKind::Volume => "volumes",
            EntryKind::Template => "templates",
            EntryKind::Snapshot => "snapshots",
        }
    }

    /// The record's file name inside an entry directory (`volume.json`, ...).
    pub fn record_file(self) -> &'static str {
        match self {
            EntryKind::Volume => "volume.json",
            EntryKind::Template => "template.json",
            EntryKind::Snapshot => "snapshot.json",
        }
    }

    /// Singular lower-case name (`volume`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Volume => "volume",
            EntryKind::Template => "template",
            EntryKind::Snapshot => "snapshot",
        }
    }

    /// Index into per-kind arrays.
    pub(crate) fn idx(self) -> usize {
        match self {
            EntryKind::Volume => 0,
            EntryKind::Template => 1,
            EntryKind::Snapshot => 2,
        }
    }

    /// Parses [`EntryKind::as_str`] output.
    pub(crate) fn from_str_opt(s: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A type the upper layer persists as a record.
///
/// The pool does not know what a volume is; it only needs to know the
/// record's current schema version, which goes into the envelope so a future
/// version can migrate (or refuse) old records.
pub trait RecordType: Serialize + DeserializeOwned {
    /// Schema version written with new records. Records carrying a higher
    /// version are reported as damaged (written by a newer vmvol).
    const SCHEMA_VERSION: u32;
}

impl RecordType for serde_json::Value {
    /// `Value` accepts any version, so readers that migrate can see all.
    const SCHEMA_VERSION: u32 = u32::MAX;
}

/// The envelope of every persisted record: `{"schema_version": N, "data": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record<T> {
    /// Version of `data`'s schema.
    pub schema_version: u32,
    /// The payload.
    pub data: T,
}

impl<T: RecordType> Record<T> {
    /// Wraps `data` with the type's current schema version.
    pub fn new(data: T) -> Record<T> {
        Record {
            schema_version: T::SCHEMA_VERSION,
            data,
        }
    }

    /// Serialises to pretty JSON with a trailing newline (`path` is where
    /// it is going, for the error message).
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        encode(&self.data, self.schema_version, path)
    }

    /// Parses bytes read from `path`; the error is the reason a listing shows.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Record<T>, String> {
        if bytes.is_empty() {
            return Err("empty file (truncated record)".to_string());
        }
        let rec: Record<T> =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        if rec.schema_version > T::SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is newer than the supported {}",
                rec.schema_version,
                T::SCHEMA_VERSION
            ));
        }
        Ok(rec)
    }

    /// Reads and parses a record file.
    pub fn read(path: &Path) -> Result<Record<T>> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read record", e))?;
        Record::parse(&bytes).map_err(|reason| Error::Damaged {
            path: path.to_path_buf(),
            reason,
        })
    }
}

impl Record<serde::de::IgnoredAny> {
    /// Checks that `bytes` hold an envelope (any payload, any version).
    pub(crate) fn parse_envelope(bytes: &[u8]) -> std::result::Result<(), String> {
        if bytes.is_empty() {
            return Err("empty file (truncated record)".to_string());
        }
        serde_json::from_slice::<Record<serde::de::IgnoredAny>>(bytes)
            .map(|_| ())
            .map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// Serialises `data` in the envelope with `schema_version`.
pub(crate) fn encode<T: Serialize>(data: &T, schema_version: u32, path: &Path) -> Result<Vec<u8>> {
    let env = Record {
        schema_version,
        data,
    };
    let mut v = serde_json::to_vec_pretty(&env).map_err(|source| Error::Serialize {
        path: path.to_path_buf(),
        source,
    })?;
    v.push(b'\n');
    Ok(v)
}

/// Prefix of the temporary record files written by older versions of
/// [`write_atomic`] (`.tmp-NAME.UUID`). Those were only written under the
/// pool's exclusive lock, so recovery (holding it) removes any it finds.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Whether a directory entry named `name` is a record's temporary file: of
/// today's [`write_atomic`] (`.NAME.XXXXXX.vmvol-tmp`, see
/// [`host::AtomicFile`]) or of older versions ([`TEMP_PREFIX`]). Such files
/// are never entries or records.
pub fn is_temp_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) || host::is_temp_name(name)
}

/// Remove `path`, a temporary record file (see [`is_temp_name`]), if its
/// writer is gone; returns whether it was removed. Today's are held by a
/// lock while their writer lives, so a live one is left alone; old-style
/// ones are removed (the caller holds the pool's exclusive lock).
pub(crate) fn remove_temp(path: &Path) -> Result<bool> {
    let old_style = path
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(TEMP_PREFIX.as_bytes()));
    let res = if old_style {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    } else {
        host::remove_if_dead(path)
    };
    res.map_err(|e| Error::io(path, "remove temp record", e))
}

/// Writes `bytes` to `path` so that a crash at any instant leaves either the
/// old file or the new one, never a mix: temp file in the same directory
/// ([`host::AtomicFile`], locked while this runs), write, fsync, rename over
/// `path`, fsync the directory. New and replaced records get mode 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::io(
            path,
            "write record",
            std::io::ErrorKind::InvalidInput.into(),
        ));
    }
    // Dropped on error: the temp file is removed.
    let tmp = host::AtomicFile::new(path).map_err(|e| Error::io(path, "create temp record", e))?;
    tmp.file()
        .write_all_at(bytes, 0)
        .map_err(|e| Error::io(tmp.path(), "write temp record", e))?;
    tmp.file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), "fsync temp record", e))?;
    // The fsyncs are ours (each with its own message); the mode change made
    // by commit is journalled before the directory fsync below completes.
    let how = host::Commit {
        replace: true,
        mode: 0o644,
        durable: false,
    };
    tmp.commit(path, how)
        .map_err(|e| Error::io(path, "rename record into place", e))?;
    fsync_dir(&host::parent_dir(path))
}

/// fsyncs a directory so a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    host::fsync_dir(dir).map_err(|e| Error::io(dir, "fsync directory", e))
}

/// An entry whose record could be read and parsed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry<T> {
    /// Kind of entry.
    pub kind: EntryKind,
    /// Its id.
    pub id: String,
    /// The record.
    pub record: Record<T>,
    /// The entry's images, sorted by name (the main one is named
    /// [`DATA_IMAGE`](crate::DATA_IMAGE)).
    pub images: Vec<ImageSummary>,
    /// Host bytes allocated by the entry (record and images).
    pub physical: u64,
}

impl<T> Entry<T> {
    /// The entry's main image (named [`DATA_IMAGE`](crate::DATA_IMAGE)), if any.
    pub fn image(&self) -> Option<&ImageSummary> {
        self.images
            .iter()
            .find(|i| i.image.name == crate::image::DATA_IMAGE)
    }
}

/// An entry whose record is missing or unusable. Listings always include it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Damaged {
    /// Kind of entry.
    pub kind: EntryKind,
    /// Its id.
    pub id: String,
    /// The record file (or the entry directory when the problem is the entry itself).
    pub path: PathBuf,
    /// Why it is unusable.
    pub reason: String,
}

/// One row of a listing: a good entry or a damaged one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Listed<T> {
    /// Record parsed.
    Ok(Entry<T>),
    /// Record missing or unusable, with path and reason.
    Damaged(Damaged),
}
