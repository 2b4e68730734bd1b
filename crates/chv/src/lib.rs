//! Cloud Hypervisor encoding of an instance's volumes.
//!
//! Given the volumes an instance attaches ([`VolumeDisk`]; [`volume_disks`]
//! makes them from an instance the volume layer attached after checking the
//! rules), vmvol-chv lays out
//! the disks in `/dev/vdX` order ([`plan`]): `/dev/vda` rootfs (read-only),
//! `/dev/vdb` the instance overlay, `/dev/vdc` the config disk (read-only),
//! then the volumes in request order. It encodes them as Cloud Hypervisor
//! v53.0 [`DiskConfig`] JSON and `--disk` arguments, writes the config disk
//! ([`write_config_disk`]: ext4 made in-process with `/config.json` and
//! `/config.sh`), ships the guest's mount script ([`MOUNT_SCRIPT`]), and
//! builds `vm.resize-disk` bodies ([`ResizeDisk`]).
//!
//! ```
//! use vmvol_chv::{plan, ImageType, InstanceSpec, MountMode, VolumeDisk};
//!
//! let spec = InstanceSpec {
//!     rootfs: "/img/rootfs.raw".into(),
//!     rootfs_image_type: ImageType::Raw,
//!     instance_overlay: "/inst/i1/overlay.raw".into(),
//!     instance_overlay_image_type: ImageType::Raw,
//!     config_disk: "/inst/i1/config.ext4".into(),
//!     volumes: vec![VolumeDisk {
//!         volume: "data".into(),
//!         path: "/vol/data.raw".into(),
//!         image_type: ImageType::Raw,
//!         transport: Default::default(),
//!         mount_path: "/data".into(),
//!         mode: MountMode::Rw,
//!     }],
//! };
//! let p = plan(&spec)?;
//! assert_eq!(p.volume_mounts[0].device, "/dev/vdd");
//! assert_eq!(
//!     p.disk_args()?[4],
//!     "path=/vol/data.raw,id=vdd,serial=vdd-data,image_type=raw"
//! );
//! # Ok::<(), vmvol_chv::Error>(())
//! ```

mod attached;
mod config;
mod configdisk;
mod error;
pub mod export;
mod guest;
mod instance;
mod sys;
pub mod vm;

pub use attached::{instance_exports, instance_spec, volume_disks};
pub use config::{
    cli_quote, disk_args, DiskConfig, ImageType, LockGranularity, RateLimiterConfig, ResizeDisk,
    TokenBucket, VirtQueueAffinity, MAX_SERIAL_BYTES,
};
pub use configdisk::{
    build_config_disk, config_json, config_sh, sh_quote, write_config_disk, ConfigDiskEntry,
    ConfigDiskReport, ConfigFiles, MIN_CONFIG_DISK_BYTES, RESERVED_KEYS,
};
pub use error::{Error, Result};
pub use guest::MOUNT_SCRIPT;
pub use instance::{
    plan, DiskRole, DiskTransport, InstancePlan, InstanceSpec, MountMode, OverlayKind, PlannedDisk,
    VolumeDisk, VolumeMount, MAX_VOLUME_DEVICES,
};
