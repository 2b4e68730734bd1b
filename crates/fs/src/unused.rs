//! The ext4-aware input of image compaction: which byte ranges of a device
//! hold no live data, so `vmvol_format::compact` may drop them.

use vmvol_format::{BlockIo, ByteRange};

use crate::{free_map, Error, Result};

/// The byte ranges of `dev` that its ext2/ext3/ext4 filesystem does not use,
/// for `vmvol_format::compact` (`CompactOptions::unused_ranges`): sorted,
/// non-overlapping, adjacent ones merged, all inside the filesystem.
///
/// `Ok(None)` means the device holds no ext filesystem at all (no superblock
/// magic at byte 1024, or too small for one): compact then keeps everything.
///
/// Everything else that stops the free map is an error, never `None`,
/// because a caller that asked for filesystem-aware compaction must learn
/// that it did not happen, and because guessing would discard live data:
/// - [`Error::Corrupt`]: a checksum mismatch or inconsistent metadata;
/// - [`Error::NeedsRecovery`]: the journal needs replaying, or the
///   filesystem is mounted (or was not cleanly unmounted) or has errors
///   recorded, so its bitmaps may lag behind its files;
/// - [`Error::Unsupported`]: an ext filesystem with a feature whose
///   allocation rules we do not know;
/// - [`Error::Block`]: the device could not be read.
///
/// A caller that wants "compact anyway" treats an error like `None` (keep
/// every byte), which is always safe.
///
/// ```
/// use vmvol_format::{Control, Prealloc, RawImage};
/// use vmvol_fs::{mkfs, unused_ranges, MkfsOptions};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("vol.raw");
/// let img = RawImage::create(&path, 64 << 20, Prealloc::Off, &Control::new())?;
/// assert_eq!(unused_ranges(&img)?, None); // zeros: no filesystem
/// mkfs(&img, &MkfsOptions::default())?;
/// let ranges = unused_ranges(&img)?.expect("ext4");
/// assert!(ranges.iter().map(|r| r.len).sum::<u64>() > 32 << 20);
/// assert!(ranges.iter().all(|r| r.offset >= 4096)); // the superblock stays
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn unused_ranges(dev: &dyn BlockIo) -> Result<Option<Vec<ByteRange>>> {
    match free_map(dev) {
        Ok(map) => Ok(Some(map.ranges)),
        Err(Error::NotExt4 { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
