//! vmvol: persistent block volumes for virtual machines.
//!
//! The facade crate: one dependency for embedders, re-exporting every layer
//! under one name.
//!
//! | module | crate | what it owns |
//! |---|---|---|
//! | `format` | `vmvol-format` | the [`BlockIo`] trait; raw and qcow2 images; backing chains; info, map, check, grow, convert, compact |
//! | `fs` | `vmvol-fs` | ext4 written in pure Rust: mkfs, populate, free-space map |
//! | `pool` | `vmvol-pool` | storage pools: layout, capacity, reservations, records, locks |
//! | `chv` | `vmvol-chv` | Cloud Hypervisor disks (`DiskConfig`, `--disk`), the config disk, the guest mount script |
//! | `volume` | `vmvol-volume` | volumes, templates, snapshots: create, delete, list, describe, resize, clone, compress; instances' attachments |
//! | [`instance`] | `vmvol-chv` (`vm`) | instances end to end: attach with the config disk, show the Cloud Hypervisor disks, resize a volume (online through its RBD export), detach |
//! | `rbd` (feature `rbd`) | `vmvol-rbd` | pools on Ceph RBD: `rbd::register()` lets every registry define and open them |
//!
//! A new 64 MiB qcow2 volume, born ext4-formatted without loop devices:
//!
//! ```
//! use vmvol::format::{BackingPolicy, BlockIo, Image, OpenOptions, Qcow2CreateOptions, Qcow2Image};
//! use vmvol::fs::{mkfs, MkfsOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("data.qcow2");
//! Qcow2Image::create(&path, &Qcow2CreateOptions::new(64 << 20))?;
//! let img = Image::open(&path, &OpenOptions::new().read_only(false).policy(BackingPolicy::image_dir(&path)))?;
//! let report = mkfs(&img, &MkfsOptions { label: "data".into(), ..MkfsOptions::default() })?;
//! img.flush()?;
//! assert_eq!(report.block_size, 4096);
//! // Only metadata was written: the qcow2 file stays small.
//! assert!(img.allocated_bytes()? < 8 << 20);
//! # Ok(())
//! # }
//! ```
//!
//! Embedders that also depend on `imago` directly must not enable its
//! default `async` feature: vmvol uses its `sync` feature and the two exclude
//! each other.

pub use vmvol_chv as chv;
/// Instances end to end: attach with the config disk, show, detach
/// (`vmvol-chv`'s `vm` module).
pub use vmvol_chv::vm as instance;
pub use vmvol_format as format;
pub use vmvol_fs as fs;
pub use vmvol_pool as pool;
#[cfg(feature = "rbd")]
pub use vmvol_rbd as rbd;
pub use vmvol_volume as volume;

pub use vmvol_format::{BlockIo, Format, Image, OpenOptions};
