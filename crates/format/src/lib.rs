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
mod probe;
pub use probe::{detect_format, virtual_size, Format, QCOW2_MAGIC};
