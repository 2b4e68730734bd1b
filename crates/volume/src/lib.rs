//! Volumes, templates and snapshots for vmvol, built on its storage pools.
//!
//! A [`Volumes`] handle over a [`vmvol_pool::Registry`] creates, lists,
//! describes, resizes, clones, compresses and deletes volumes, and manages
//! templates and snapshots. Every image is reached through the pool's image
//! store ([`vmvol_pool::ImageRef`]), never through a path built here; every
//! change is built in a staging area and committed atomically, and checks
//! that guard a change (name free, not attached, nothing linked) run under
//! the pool's exclusive lock together with the change.

mod create;
mod error;
mod manage;
mod query;
mod record;
mod recover;
mod snapshot;
mod template;
mod volumes;

pub use create::{CreateVolume, VolumeSource};
pub use manage::{Compressed, NewSize, OnlineResize, ResizeDiskRequest, Resized};
pub use query::{ChainLink, FsUsage, ListFilter, SortKey, VolumeDescription, VolumeRow};
pub use vmvol_format::{Compression, Control, Format, Prealloc};
pub use volumes::{Found, Row, Rows, Volumes};

pub use error::{Error, ErrorKind, Result};
pub use record::{
    now_rfc3339, rfc3339, validate_name, AttachMode, Attachment, BaseLink, LinkMode, PendingResize,
    Provenance, SnapshotRecord, TemplateRecord, TemplateSource, VolumeRecord, MAX_NAME_LEN,
};
