//! `mkfs`: make an ext4 filesystem on a block image.

use serde::{Deserialize, Serialize};
use vmvol_format::{BlockIo, Control};

use crate::build::{discard_on_error, Builder, Finished};
use crate::Result;

/// Journal choice for [`mkfs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Journal {
    /// A journal sized as `mke2fs` sizes it (4 MiB .. 1 GiB with the filesystem size).
    #[default]
    Default,
    /// No journal (read-only images, scratch volumes).
    None,
    /// A journal of this many filesystem blocks (at least 1024).
    Blocks(u32),
}

/// Options of [`mkfs`]; the defaults make what `mke2fs -t ext4` makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MkfsOptions {
    /// Block size in bytes: 1024, 2048 or 4096 (default).
    pub block_size: u32,
    /// Bytes of filesystem per inode (default 16384).
    pub inode_ratio: u32,
    /// Percentage of blocks reserved for root (default 5.0).
    pub reserved_percent: f64,
    /// Volume label, at most 16 bytes.
    pub label: String,
    /// Filesystem UUID; random when `None`.
    pub uuid: Option<uuid::Uuid>,
    /// Directory hash seed; random when `None`.
    pub hash_seed: Option<uuid::Uuid>,
    /// Owner of the root directory.
    pub root_uid: u32,
    /// Group of the root directory.
    pub root_gid: u32,
    /// The journal.
    pub journal: Journal,
    /// Creation time in seconds since the epoch; now when `None`.
    pub timestamp: Option<i64>,
    /// On a device not known to read zeros, leave inode tables unzeroed for
    /// the kernel's lazy init instead of zeroing them now (default `false`).
    /// On a device that reads zeros (fresh sparse raw, fresh qcow2) nothing is
    /// written either way.
    pub lazy_itable_init: bool,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            block_size: 4096,
            inode_ratio: 16384,
            reserved_percent: 5.0,
            label: String::new(),
            uuid: None,
            hash_seed: None,
            root_uid: 0,
            root_gid: 0,
            journal: Journal::Default,
            timestamp: None,
            lazy_itable_init: false,
        }
    }
}

/// What [`mkfs`] made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MkfsReport {
    /// Filesystem UUID.
    pub uuid: uuid::Uuid,
    /// Block size in bytes.
    pub block_size: u32,
    /// Blocks in the filesystem (may be a little less than the device holds,
    /// as mke2fs drops a last group too small for its metadata).
    pub blocks_count: u64,
    /// Block groups.
    pub groups: u32,
    /// Inodes in the filesystem.
    pub inodes_count: u64,
    /// Inodes per group.
    pub inodes_per_group: u32,
    /// Journal size in blocks (0: no journal).
    pub journal_blocks: u64,
    /// Group-descriptor blocks reserved for growing (`resize_inode`).
    pub reserved_gdt_blocks: u32,
    /// Free blocks after formatting (or populating).
    pub free_blocks: u64,
    /// Free inodes after formatting (or populating).
    pub free_inodes: u64,
    /// Bytes of metadata written to the device.
    pub metadata_bytes_written: u64,
    /// Bytes of file data written (populate only).
    pub data_bytes_written: u64,
    /// Bytes of inode tables and journal not written because the device
    /// already reads zeros there.
    pub bytes_skipped: u64,
}

impl MkfsReport {
    pub(crate) fn from_finished(f: &Finished) -> Self {
        let g = &f.geometry;
        MkfsReport {
            uuid: f.uuid,
            block_size: g.block_size,
            blocks_count: g.blocks_count,
            groups: g.groups,
            inodes_count: g.inodes_count(),
            inodes_per_group: g.inodes_per_group,
            journal_blocks: f.journal_blocks,
            reserved_gdt_blocks: g.reserved_gdt,
            free_blocks: f.free_blocks,
            free_inodes: f.free_inodes,
            metadata_bytes_written: f.metadata_written,
            data_bytes_written: f.data_written,
            bytes_skipped: f.skipped,
        }
    }
}

/// Make an empty ext4 filesystem over the whole of `dev` (root directory and
/// `lost+found`), as `mke2fs -t ext4` would.
///
/// Only metadata that must exist is written: where `dev` reports
/// [`BlockIo::known_zero`], inode tables and the journal body are not written.
/// The primary superblock is written last, after a flush.
///
/// Invalid options are refused before anything is written; any later error
/// discards the whole device (it reads as zeros afterwards).
pub fn mkfs(dev: &dyn BlockIo, opts: &MkfsOptions) -> Result<MkfsReport> {
    mkfs_with_control(dev, opts, &Control::new())
}

/// Like [`mkfs`], reporting progress to `control` (bytes of the filesystem
/// whose metadata is written, of its size) and stopping with
/// [`Error::Cancelled`](crate::Error::Cancelled) when it is cancelled. A
/// cancel, like any error after the options were checked, discards the whole
/// device: it reads as zeros afterwards, no half-made filesystem is left.
pub fn mkfs_with_control(
    dev: &dyn BlockIo,
    opts: &MkfsOptions,
    control: &Control,
) -> Result<MkfsReport> {
    discard_on_error(dev, opts, || {
        let b = Builder::new(dev, opts, control, "mkfs")?;
        let f = b.finish()?;
        Ok(MkfsReport::from_finished(&f))
    })
}
