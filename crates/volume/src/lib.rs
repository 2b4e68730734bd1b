//! Volumes, templates and snapshots for vmvol, built on its storage pools.
//!
//! A [`Volumes`] handle over a [`vmvol_pool::Registry`] creates, lists,
//! describes, resizes, clones, compresses and deletes volumes, and manages
//! templates and snapshots. Every image is reached through the pool's image
//! store ([`vmvol_pool::ImageRef`]), never through a path built here; every
//! change is built in a staging area and committed atomically, and checks
//! that guard a change (name free, not attached, nothing linked) run under
//! the pool's exclusive lock together with the change.

mod error;
mod record;

pub use error::{Error, ErrorKind, Result};
pub use record::{
    now_rfc3339, rfc3339, validate_name, AttachMode, Attachment, BaseLink, LinkMode, PendingResize,
    Provenance, SnapshotRecord, TemplateRecord, TemplateSource, VolumeRecord, MAX_NAME_LEN,
};
