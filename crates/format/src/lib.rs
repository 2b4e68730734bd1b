//! Raw and qcow2 disk images for vmvol.
//!
//! This is the bottom layer of vmvol: the [`BlockIo`] trait that every layer
//! above does its I/O through, raw and qcow2 images that implement it, backing
//! chains opened under a security policy, and the image operations an operator
//! knows from `qemu-img`: create, info, map, check, grow, convert and compact.
//!
//! qcow2 I/O runs on the `imago` crate (sync feature), kept behind our own
//! types; check/repair, compressed writes and fresh image layouts are ours.

mod check;
mod compact;
mod control;
mod convert;
mod error;
pub mod host;
mod image;
mod info;
mod io;
mod map;
mod policy;
mod probe;
pub mod qcow2;
mod range;
mod raw;

pub use check::{check, CheckReport, RepairMode};
pub use compact::{compact, CompactOptions, CompactReport};
pub use control::{Control, ProgressFn};
pub use convert::{convert, BackingMode, ConvertOptions, ConvertReport, CopyMethod};
pub use error::{Error, Result};
pub use image::{Image, OpenOptions};
pub use info::{info, ChainEntry, ImageInfo};
pub use io::BlockIo;
pub use map::MapExtent;
pub use policy::{BackingPolicy, BackingRef, DEFAULT_MAX_DEPTH};
pub use probe::{detect_format, virtual_size, Format};
pub use qcow2::{Compression, Qcow2CreateOptions, Qcow2Image};
pub use range::ByteRange;
pub use raw::{Prealloc, RawImage};
