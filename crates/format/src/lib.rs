//! Raw and qcow2 disk images for vmvol.
//!
//! This is the bottom layer of vmvol: the [`BlockIo`] trait that every layer
//! above does its I/O through, raw and qcow2 images that implement it, backing
//! chains opened under a security policy, and the image operations an operator
//! knows from `qemu-img`: create, info, map, check, grow, convert and compact.
//!
//! qcow2 I/O runs on the `imago` crate (sync feature), kept behind our own
//! types; check/repair, compressed writes and fresh image layouts are ours.

mod control;
mod error;
mod io;

pub use control::{Control, ProgressFn};
pub use error::{Error, Result};
pub use io::BlockIo;
mod range;
pub use range::ByteRange;
mod probe;
pub use probe::{detect_format, virtual_size, Format, QCOW2_MAGIC};
mod qcow2meta;
pub use qcow2meta::{
    ClusterCompressor, Compression, L2Entry, Qcow2Header, Qcow2Meta, Qcow2Writer,
    Qcow2WriterOptions, SnapshotEntry, WriterStats,
};
mod image;
mod info;
mod map;
mod mapcache;
mod policy;
mod qcow2;
mod raw;
pub use image::{Image, OpenOptions};
pub use info::{info, ChainEntry, ImageInfo};
pub use map::MapExtent;
pub use policy::{BackingPolicy, DEFAULT_MAX_DEPTH};
pub use qcow2::{
    Qcow2CreateOptions, Qcow2Image, DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE,
};
pub use raw::{Prealloc, RawImage};
mod check;
pub use check::{check, CheckReport, RepairMode};
mod compact;
mod convert;
pub use compact::{compact, CompactOptions, CompactReport};
pub use convert::{convert, BackingMode, ConvertOptions, ConvertReport, CopyMethod};
