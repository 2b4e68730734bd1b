//! Storage pools for vmvol: capacity accounting, reservations, crash-safe
//! records, locking, and an image store — over a backend seam.
//!
//! A [`Registry`] holds the pools of one host. A [`Pool`] lives on a backend
//! (the records name it: [`BackendSpec`]; today [`local::LocalBackend`], a
//! directory) and holds entries — volumes, templates, snapshots — each a
//! record (generic over the upper layer's [`RecordType`]) and images named by
//! backend-neutral [`ImageRef`]s. Upper layers never build a path: they
//! create, link, copy, open, grow, move and remove images through the pool,
//! and ask it for an image's [`AttachTarget`].
//!
//! Work that grows the pool runs like this: reserve the bytes
//! ([`Pool::reserve`] for thin work, [`Pool::reserve_physical`] for bytes
//! that will really be written — refused with needed/available bytes), build
//! the entry's images in a [`Pool::stage`] area, [`Pool::commit`] it into
//! place, drop the [`Reservation`]. Accounting is derived from the storage
//! (image headers, free space, allocated blocks), never from counters that
//! could drift; reservations and staging areas of a process that dies are
//! released with it.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use vmvol_format::{Control, Format, Prealloc};
//! use vmvol_pool::{
//!     CapacityPolicy, EntryKind, ImageSpec, Listed, PoolSpec, RecordType, Registry, Wait,
//!     DATA_IMAGE,
//! };
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Vol {
//!     name: String,
//! }
//! impl RecordType for Vol {
//!     const SCHEMA_VERSION: u32 = 1;
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = tempfile::tempdir()?;
//! let reg = Registry::open(root.path())?;
//! let spec = PoolSpec {
//!     capacity: CapacityPolicy::Quota { bytes: 10 << 30 },
//!     ..PoolSpec::default()
//! };
//! reg.define("default", &spec)?;
//! reg.activate("default", Wait::Block)?;
//! let pool = reg.open_pool("default", Wait::Block)?;
//!
//! // Make a 1 GiB sparse raw volume.
//! let img = ImageSpec { size: 1 << 30, format: Format::Raw, prealloc: Prealloc::Off };
//! let guard = pool.reserve(img.size, "create volume web")?;
//! let staging = pool.stage()?;
//! let staged = staging.create_image(DATA_IMAGE, &img, &Control::new())?;
//! pool.commit(staging, EntryKind::Volume, "web", &Vol { name: "web".into() })?;
//! drop(guard);
//!
//! // Write to it through the pool, and ask what a VMM should open.
//! let web = staged.committed(EntryKind::Volume, "web");
//! pool.open_image(&web, true)?.write_at(b"hello", 0)?;
//! let _target = pool.attach_target(&web)?;
//!
//! let d = pool.describe()?;
//! assert_eq!(d.allocation, 1 << 30);
//! assert_eq!(d.available, 9 << 30);
//! // A second reservation beyond the quota is refused.
//! assert!(pool.reserve(10 << 30, "too big").is_err());
//!
//! let vols = pool.list::<Vol>(EntryKind::Volume, |_, v| v.name.contains("we"))?;
//! assert!(matches!(&vols[..], [Listed::Ok(e)] if e.id == "web"));
//! # Ok(())
//! # }
//! ```

pub mod backend;
mod error;
mod host_records;
mod image;
pub mod local;
mod lock;
#[cfg(feature = "test-utils")]
pub mod memory;
mod name;
mod pool;
mod provider;
mod record;
mod registry;
mod spec;

pub use error::{Error, Result};
pub use host_records::{validate_host_id, HostRecordLock, HostRecords, MAX_HOST_ID_LEN};
pub use image::{
    AttachTarget, ImageOwner, ImageRef, ImageSpec, ImageSummary, RbdTarget, DATA_IMAGE,
};
pub use lock::Wait;
pub use name::{validate_name, MAX_NAME_LEN};
pub use pool::{
    allocation_limit, CapacityPolicy, Pool, PoolConfig, PoolDescription, PoolState, PoolTxn,
    Reservation, Staging,
};
pub use provider::{register_backend, BackendProvider};
pub use record::{
    fsync_dir, is_temp_name, write_atomic, Damaged, Entry, EntryKind, Listed, Record, RecordType,
};
pub use registry::{PoolListing, PoolRef, PoolSpec, Registry};
pub use spec::{BackendSpec, RbdSpec};
