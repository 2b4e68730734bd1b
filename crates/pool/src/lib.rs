//! Storage pools for vmvol: directory layout, capacity accounting,
//! reservations, crash-safe records and cross-process locking.
//!
//! A [`Registry`] holds the pools of one host. A [`Pool`] is a directory
//! (through the [`PoolBackend`] seam; today [`LocalBackend`]) holding
//! entries — volumes, templates, snapshots — each a directory with a record
//! (`volume.json`, generic over the upper layer's [`RecordType`]) and an
//! image (`data.raw` or `data.qcow2`).
//!
//! Work that grows the pool runs like this: [`Pool::reserve`] the bytes
//! (refused with needed/available bytes if the policy does not allow them),
//! build the entry in a [`Pool::stage`] directory, [`Pool::commit`] it into
//! place, drop the [`Reservation`]. Accounting is derived from the disk
//! (image headers, `statvfs`, allocated blocks), never from counters that
//! could drift; reservations and staging areas of a process that dies are
//! released by the kernel (their `flock` goes with the process).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use vmvol_pool::{CapacityPolicy, EntryKind, Listed, PoolSpec, RecordType, Registry, Wait};
//!
//! #[derive(Serialize, Deserialize)]
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
//! // Make a 1 GiB raw volume.
//! let guard = pool.reserve(1 << 30, "create volume web")?;
//! let staging = pool.stage()?;
//! let img = staging.path().join(vmvol_pool::image_file_name(vmvol_format::Format::Raw));
//! std::fs::File::create(&img)?.set_len(1 << 30)?;
//! pool.commit(staging, EntryKind::Volume, "web", &Vol { name: "web".into() })?;
//! drop(guard);
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

mod backend;
mod error;
mod local;
mod lock;
mod name;
mod pool;
mod record;
mod registry;

pub use backend::{
    BackendGuard, Change, FsStats, JournalCursor, JournalRead, PoolBackend, Recovered,
    ReservationInfo, ScannedEntry, StagingArea,
};
pub use error::{Error, Result};
pub use local::{
    statvfs, LocalBackend, CONFIG_FILE, JOURNAL_FILE, LOCK_FILE, RESERVATIONS_DIR, STAGING_DIR,
};
pub use lock::{lock_file, FileLock, LockMode, Wait};
pub use name::{validate_name, MAX_NAME_LEN};
pub use pool::{
    allocation_limit, image_file_name, CapacityPolicy, Pool, PoolConfig, PoolDescription,
    PoolState, PoolTxn, Reservation, Staging,
};
pub use record::{
    fsync_dir, write_atomic, Damaged, Entry, EntryKind, ImageSummary, Listed, Record, RecordType,
    TEMP_PREFIX,
};
pub use registry::{PoolListing, PoolRef, PoolSpec, Registry};
