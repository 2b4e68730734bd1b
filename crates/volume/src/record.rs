//! The records a pool keeps for volumes, templates and snapshots, and the
//! naming rule.

use serde::{Deserialize, Serialize};
use vmvol_format::{Format, Prealloc};
use vmvol_pool::{EntryKind, RecordType};

use crate::error::{Error, Result};

/// Longest accepted volume, template or snapshot name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a volume, template or snapshot name: 1–63 characters of
/// `a-z A-Z 0-9 . _ -`, not starting with `.`.
pub fn validate_name(object: &str, op: &'static str, name: &str) -> Result<()> {
    let fail = |rule| {
        Err(Error::InvalidName {
            object: object.to_string(),
            op,
            name: name.to_string(),
            rule,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 63 characters");
    }
    if name.contains('\0') {
        return fail("must not contain NUL");
    }
    if name.contains('/') {
        return fail("must not contain '/'");
    }
    if name.starts_with('.') {
        return fail("must not start with '.' (this also refuses '.' and '..')");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("may contain only a-z, A-Z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

/// How an image made from a template or snapshot relates to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// A thin qcow2 overlay on the base (the base must outlive it).
    Linked,
    /// An independent copy, chain flattened.
    Full,
}

/// The dependency edge: the template or snapshot an image is linked to
/// (same pool).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BaseLink {
    /// Template or snapshot.
    pub kind: EntryKind,
    /// Its UUID (pool entry id).
    pub id: String,
    /// Its name when the link was made (names do not change).
    pub name: String,
}

/// Where a volume's content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Provenance {
    /// Created empty (optionally ext4-formatted).
    Blank,
    /// Built from a tar archive.
    Archive {
        /// The archive's file name as given (informational).
        source: String,
    },
    /// Made from a template.
    Template {
        /// Template UUID.
        id: String,
        /// Template name.
        name: String,
        /// Linked or full.
        mode: LinkMode,
    },
    /// Made from a snapshot (restore).
    Snapshot {
        /// Snapshot UUID.
        id: String,
        /// Snapshot name.
        name: String,
        /// Linked or full.
        mode: LinkMode,
    },
    /// A full copy of another volume.
    Clone {
        /// The source's pool.
        pool: String,
        /// The source's UUID.
        id: String,
        /// The source's name.
        name: String,
    },
}

/// How an instance uses an attached volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Read-write.
    Rw,
    /// Read-only.
    Ro,
}

impl AttachMode {
    /// `rw` or `ro`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Rw => "rw",
            AttachMode::Ro => "ro",
        }
    }
}

/// One attachment of a volume to an instance (written by
/// [`Volumes::attach_instance`](crate::Volumes::attach_instance); other
/// operations read it to refuse unsafe changes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    /// The instance.
    pub instance: String,
    /// Where the guest mounts it.
    pub mount_path: String,
    /// Read-write or read-only (an overlay's base is read-only).
    pub mode: AttachMode,
    /// The instance's private overlay over the volume, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<crate::attach::OverlayKind>,
}

/// An online resize handed to the VMM and not yet confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingResize {
    /// Size asked for, bytes.
    pub size: u64,
}

/// A volume's record (`volume.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name, unique among the pool's volumes.
    pub name: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Image format.
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Preallocation of a raw volume (grows keep it).
    pub prealloc: Prealloc,
    /// Whether the volume was born ext4-formatted (blank `--ext4` or archive).
    pub ext4: bool,
    /// Where its content came from.
    pub provenance: Provenance,
    /// The template or snapshot its image is linked to, if any.
    pub base: Option<BaseLink>,
    /// Instances it is attached to.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

impl RecordType for VolumeRecord {
    const SCHEMA_VERSION: u32 = 1;
}

/// Where a template came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateSource {
    /// A frozen copy of a volume.
    Volume {
        /// The volume's UUID.
        id: String,
        /// The volume's name.
        name: String,
    },
    /// An imported image file.
    Image {
        /// The file as given.
        file: String,
    },
}

/// A template's record (`template.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Name, unique among the pool's templates.
    pub name: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Image format.
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether it holds an ext4 filesystem.
    pub ext4: bool,
    /// Where it came from.
    pub source: TemplateSource,
}

impl RecordType for TemplateRecord {
    const SCHEMA_VERSION: u32 = 1;
}

/// A snapshot's record (`snapshot.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Name, unique among the pool's snapshots.
    pub name: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Image format.
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether it holds an ext4 filesystem.
    pub ext4: bool,
    /// The volume it was taken of (UUID).
    pub volume: String,
    /// That volume's name.
    pub volume_name: String,
    /// The template or snapshot its image is linked to.
    pub base: Option<BaseLink>,
    /// Set while the snapshot is being taken; recovery finishes it.
    #[serde(default)]
    pub pending: bool,
    /// Taken natively by the pool's storage (an RBD snapshot of the
    /// volume's image): the volume kept its image and its base, and the
    /// snapshot's image is a read-only view of that image's snapshot.
    /// Otherwise external: the volume's image became the snapshot's and the
    /// volume continued on an overlay linked to it.
    #[serde(default)]
    pub native: bool,
}

impl RecordType for SnapshotRecord {
    const SCHEMA_VERSION: u32 = 1;
}

/// Now as RFC 3339 UTC (`2026-12-02T01:31:14Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), valid for every u64 day count
    // we can meet.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_points() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_175_074), "2026-12-02T01:31:14Z");
    }

    #[test]
    fn names() {
        for ok in ["a", "Web-01.data_x", &"a".repeat(63)] {
            assert!(validate_name("volume", "create", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "..", "a/b", "a\0b", &"a".repeat(64), "ä", "a b"] {
            assert!(validate_name("volume", "create", bad).is_err(), "{bad:?}");
        }
    }
}
