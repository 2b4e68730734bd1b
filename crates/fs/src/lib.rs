//! ext4 written in pure Rust on any vmvol block image.
//!
//! [`mkfs`] makes an empty filesystem the way `mke2fs -t ext4` does (extents,
//! 64bit, flex_bg, metadata_csum, a journal sized as mke2fs sizes it, reserved
//! descriptor blocks so `resize2fs` can grow it), writing only the metadata
//! that must exist: on an image that reads zeros where nothing was written
//! (a fresh sparse raw file or qcow2), inode tables and the journal body are
//! left unwritten. [`populate`] makes a filesystem holding a directory tree or
//! a tar archive (untrusted: see [`PopulateLimits`]).
//!
//! ```
//! use vmvol_format::{Control, Prealloc, RawImage};
//! use vmvol_fs::{mkfs, MkfsOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("vol.raw");
//! let img = RawImage::create(&path, 64 << 20, Prealloc::Off, &Control::new())?;
//! let report = mkfs(&img, &MkfsOptions { label: "data".into(), ..Default::default() })?;
//! assert_eq!(report.block_size, 4096);
//! assert_eq!(report.blocks_count, 16384);
//! // Almost nothing was written: the 64 MiB volume allocates well under 1 MiB.
//! assert!(report.metadata_bytes_written < 1 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod build;
mod error;
mod ext4;
mod freemap;
mod layout;
mod mkfs;
mod populate;
mod unused;

pub use error::{Error, Result};
pub use freemap::{free_map, scan_free, FreeMap, FreeSummary};
pub use mkfs::{mkfs, mkfs_with_control, Journal, MkfsOptions, MkfsReport};
pub use populate::{
    populate, populate_tar, required_size, PopulateLimits, PopulateOptions, PopulateReport, Source,
};
pub use unused::unused_ranges;
pub use vmvol_format::ByteRange;
