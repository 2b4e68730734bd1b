//! Volumes, templates, snapshots and instances' attachments for vmvol,
//! built on its storage pools.
//!
//! A [`Volumes`] handle over a [`vmvol_pool::Registry`] creates, lists,
//! describes, resizes, clones, compresses and deletes volumes, manages
//! templates and snapshots, and attaches all volumes of an instance in one
//! all-or-nothing call ([`Volumes::attach_instance`], rules in
//! [`attach_conflict`] and [`check_request`]). Every image is reached through the pool's image
//! store ([`vmvol_pool::ImageRef`]), never through a path built here; every
//! change is built in a staging area and committed atomically, and checks
//! that guard a change (name free, not attached, nothing linked) run under
//! the pool's exclusive lock together with the change.
//!
//! ```
//! use vmvol_pool::{CapacityPolicy, PoolSpec, Registry, Wait};
//! use vmvol_volume::{Control, CreateVolume, Format, LinkMode, Prealloc, VolumeSource, Volumes};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = tempfile::tempdir()?;
//! let reg = Registry::open(root.path())?;
//! let spec = PoolSpec { capacity: CapacityPolicy::Quota { bytes: 1 << 30 }, ..PoolSpec::default() };
//! reg.define("default", &spec)?;
//! reg.activate("default", Wait::Block)?;
//! let vols = Volumes::new(reg);
//!
//! // A 64 MiB qcow2 volume born ext4-formatted, a template of it, and a
//! // linked (O(1)) volume made from the template.
//! let blank = VolumeSource::Blank { format: Format::Qcow2, prealloc: Prealloc::Off, ext4: true };
//! let req = CreateVolume { name: "golden".into(), size: Some(64 << 20), source: blank };
//! vols.create_volume("default", &req, &Control::new())?;
//! vols.create_template_from_volume("default", "base", "golden", &Control::new())?;
//! let linked = VolumeSource::Template { name: "base".into(), mode: LinkMode::Linked };
//! let req = CreateVolume { name: "web".into(), size: None, source: linked };
//! vols.create_volume("default", &req, &Control::new())?;
//!
//! let d = vols.describe_volume("default", "web")?;
//! assert_eq!(d.backing[0].name, "base");
//! assert!(d.filesystem.is_some_and(|f| f.free > 0));
//! // The template is needed: deleting it is refused, naming the volume.
//! let e = vols.delete_template("default", "base").unwrap_err();
//! assert_eq!(e.kind(), vmvol_volume::ErrorKind::HasDependents);
//!
//! // Instance vm-1 gets "web" read-write; nobody else may join it.
//! let web = vmvol_volume::AttachVolume {
//!     pool: None, volume_id: "web".into(), mount_path: "/srv".into(), readonly: false,
//!     overlay: false, overlay_size: None, overlay_kind: Default::default(),
//! };
//! let req = vmvol_volume::AttachRequest {
//!     instance: "vm-1".into(), volumes: vec![web.clone()], vmm: Default::default(),
//! };
//! let vm = vols.attach_instance(&req, &mut |_| Ok(()))?;
//! assert_eq!(vm.disks.len(), 1);
//! let again = vmvol_volume::AttachRequest { instance: "vm-2".into(), ..req };
//! let e = vols.attach_instance(&again, &mut |_| Ok(())).unwrap_err();
//! assert_eq!(e.kind(), vmvol_volume::ErrorKind::InUse);
//! vols.detach_instance("vm-1")?;
//! # Ok(())
//! # }
//! ```

mod attach;
mod create;
mod error;
mod instance;
mod manage;
mod query;
mod record;
mod recover;
mod size;
mod snapshot;
mod template;
mod volumes;

pub use attach::{
    attach_conflict, check_mount_path, check_request, AttachRequest, AttachVolume, OverlayKind,
    DEFAULT_POOL, MAX_VOLUME_DEVICES, RESERVED_MOUNT_DIRS,
};
pub use create::{CreateVolume, VolumeSource};
pub use instance::{
    Detached, InstanceDescription, InstanceDisk, InstanceRecord, InstanceRow, InstanceState,
    InstanceVolume, OverlayImage, PrepareHook, INSTANCE_RECORDS,
};
pub use manage::{Compressed, NewSize, OnlineResize, ResizeDiskRequest, Resized};
pub use query::{ChainLink, FsUsage, ListFilter, SortKey, VolumeDescription, VolumeRow};
pub use size::parse_size;
pub use vmvol_format::{Compression, Control, Format, Prealloc};
pub use vmvol_pool::{AttachTarget, RbdTarget};
pub use volumes::{Found, Row, Rows, Volumes};

pub use error::{Error, ErrorKind, Result};
pub use record::{
    now_rfc3339, rfc3339, validate_name, AttachMode, Attachment, BaseLink, LinkMode, PendingResize,
    Provenance, SnapshotRecord, TemplateRecord, TemplateSource, VolumeRecord, MAX_NAME_LEN,
};
