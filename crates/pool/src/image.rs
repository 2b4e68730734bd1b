//! Backend-neutral names and descriptions of images.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmvol_format::{Format, Prealloc};

use crate::record::EntryKind;

/// Name of an entry's main image (the one [`Entry::image`](crate::Entry::image) returns).
pub const DATA_IMAGE: &str = "data";

/// Where an image lives inside a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ImageOwner {
    /// In a committed entry.
    Entry {
        /// The entry's kind.
        kind: EntryKind,
        /// The entry's id.
        id: String,
    },
    /// In an uncommitted staging area.
    Staging {
        /// The area's id.
        area: uuid::Uuid,
    },
}

/// Names an image in a pool without saying how the backend stores it
/// (local: `<kind dir>/<id>/<name>.<raw|qcow2>`). Serialisable, so upper
/// layers may keep it in their records (e.g. a volume's base template).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    /// The entry or staging area holding it.
    pub owner: ImageOwner,
    /// Its name within the owner (a [`validate_name`](crate::validate_name) name).
    pub name: String,
    /// Its format.
    pub format: Format,
}

impl ImageRef {
    /// Refuses an image that is not in staging area `area` (the check every
    /// backend makes before a staged operation).
    pub(crate) fn require_staged_in(&self, area: uuid::Uuid) -> crate::error::Result<()> {
        if self.owner == (ImageOwner::Staging { area }) {
            return Ok(());
        }
        Err(crate::error::Error::InvalidImage {
            image: self.to_string(),
            reason: "not in this staging area".into(),
        })
    }

    /// The image `name` of entry `kind/id`.
    pub fn entry(kind: EntryKind, id: &str, name: &str, format: Format) -> ImageRef {
        ImageRef {
            owner: ImageOwner::Entry {
                kind,
                id: id.to_string(),
            },
            name: name.to_string(),
            format,
        }
    }

    /// What this staged image is called once its area is committed as entry
    /// `kind/id`.
    pub fn committed(&self, kind: EntryKind, id: &str) -> ImageRef {
        ImageRef::entry(kind, id, &self.name, self.format)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.owner {
            ImageOwner::Entry { kind, id } => write!(f, "{kind} {id} image {}", self.name),
            ImageOwner::Staging { area } => {
                write!(f, "staging {} image {}", area.simple(), self.name)
            }
        }?;
        write!(f, " ({})", self.format.as_str())
    }
}

/// What [`Staging::create_image`](crate::Staging::create_image) makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Virtual size in bytes.
    pub size: u64,
    /// Format.
    pub format: Format,
    /// How the host space is reserved (raw only; qcow2 images are thin).
    pub prealloc: Prealloc,
}

impl ImageSpec {
    /// Whether making this image really writes its bytes, so its
    /// reservation must be [physical](crate::Pool::reserve_physical).
    pub fn is_physical(&self) -> bool {
        self.format == Format::Raw && self.prealloc != Prealloc::Off
    }
}

/// What an image holds, as the backend reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The image.
    pub image: ImageRef,
    /// Virtual size (raw: length); `None` when unreadable, see `error`.
    pub virtual_size: Option<u64>,
    /// Host bytes the image itself occupies.
    pub host_bytes: u64,
    /// The image it is linked to, if any (filled by
    /// [`Pool::image_summary`](crate::Pool::image_summary); scans leave it `None`).
    pub backing: Option<ImageRef>,
    /// Why the header could not be read.
    pub error: Option<String>,
}

/// What a VMM opens to use an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AttachTarget {
    /// A file on this host, opened with the given format driver.
    File {
        /// The image file.
        path: PathBuf,
        /// Its format.
        format: Format,
    },
    /// Images with no host file (in-memory backend): attach through vmvol's
    /// own [`BlockIo`](vmvol_format::BlockIo) (e.g. its vhost-user server,
    /// the way networked backends will).
    BlockIo {
        /// The image.
        image: ImageRef,
    },
    /// An RBD image, for qemu's `rbd` block driver (e.g. in a
    /// `qemu-storage-daemon` that exports it over vhost-user-blk). Always
    /// raw to the guest: a linked RBD image is a clone, not a qcow2.
    Rbd(RbdTarget),
}

/// An RBD image as qemu's `rbd` block driver opens it
/// (`driver=rbd,pool=…,namespace=…,image=…,conf=…,user=…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RbdTarget {
    /// The RADOS pool.
    pub pool: String,
    /// The RBD namespace inside the pool (empty: the default one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The RBD image's name.
    pub image: String,
    /// An RBD snapshot of the image to open instead of its head (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The cluster's configuration file.
    pub conf: PathBuf,
    /// The Ceph client id (user) to connect as, e.g. `admin` for
    /// `client.admin`; `None`: the driver's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}
