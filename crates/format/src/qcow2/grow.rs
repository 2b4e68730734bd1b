//! Growing a qcow2 image that nobody has open: [`grow_file`].
//!
//! The general grow ([`Qcow2Image::grow`]) may relocate the L1 table and
//! allocate clusters; it is crash-safe through the dirty bit, so a killed
//! grow leaves a dirty image that the next read-write open repairs. Most
//! grows need none of that: the new L1 entries fit in the clusters the L1
//! table already occupies, and then rewriting the header's `size` and
//! `l1_size` (bytes 24..40, one write inside the first sector) is the whole
//! grow, and a crash leaves the old or the new header, clean.
//!
//! Why only on a closed image: imago caches the header and the L1 table of
//! an open image, and offers no way to update them; a header rewritten
//! under an open [`Qcow2Image`] would be overwritten or contradicted by it.
//! An open image therefore always takes the general path.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Qcow2Header;
use super::image::Qcow2Image;
use super::spec::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use crate::policy::BackingPolicy;
use crate::{BlockIo, Error, Format, OpenOptions, Result};

/// Byte offset of the header's `size` field; `crypt_method` and `l1_size`
/// follow, so 16 bytes from here hold everything a grow changes.
const SIZE_FIELD: u64 = 24;

/// Grow the closed qcow2 image at `path` to `new_size` bytes (a multiple of
/// 512); the new part reads as zeros. Shrinking is refused with
/// [`Error::Shrink`].
///
/// When the new L1 entries fit in the clusters the L1 table occupies and
/// read zero, and no backing file (resolved under `policy`) is longer than
/// the current size, the grow is one 16-byte header write plus `fdatasync`:
/// a crash leaves the old or the new size, never a dirty image. Otherwise
/// the image is opened read-write under `policy` and grown by
/// [`Qcow2Image::grow`], flushed and closed.
///
/// The caller must hold the image exclusively: no [`Qcow2Image`] may be open
/// on it anywhere (it would keep the old size and L1 table in memory).
pub fn grow_file(path: &Path, new_size: u64, policy: &BackingPolicy) -> Result<()> {
    if grow_header_only(path, new_size, policy)? {
        return Ok(());
    }
    let opts = OpenOptions::new()
        .policy(policy.clone())
        .format(Format::Qcow2);
    let img = Qcow2Image::open(path, &opts)?;
    img.grow(new_size)?;
    img.flush()?;
    // Dropping closes cleanly: the dirty bit is cleared.
    drop(img);
    Ok(())
}

/// The one-write grow; `Ok(false)` when it does not apply (the caller takes
/// the general path, which reports any problem with the image itself).
fn grow_header_only(path: &Path, new_size: u64, policy: &BackingPolicy) -> Result<bool> {
    let op = "grow qcow2 header";
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, op, e))?;
    let Ok(h) = Qcow2Header::read(path, &file) else {
        return Ok(false);
    };
    let file_len = file.metadata().map_err(|e| Error::io(path, op, e))?.len();
    if h.vet(path, file_len).is_err() || h.check_openable(path).is_err() {
        return Ok(false);
    }
    if !Error::check_grow(path, h.size, new_size)? {
        return Ok(true);
    }
    if new_size > MAX_VIRTUAL_SIZE || !new_size.is_multiple_of(512) {
        return Err(Error::InvalidArgument {
            path: path.to_path_buf(),
            reason: format!("virtual size {new_size} is not a multiple of 512 bytes up to 2^62"),
        });
    }
    // A dirty image needs its refcounts rebuilt (the read-write open does
    // it); snapshots and bitmaps have their own size-dependent state.
    if h.is_dirty() || h.nb_snapshots != 0 || h.has_bitmaps() || h.require_plain(path).is_err() {
        return Ok(false);
    }
    let cs = h.cluster_size();
    let old_l1 = u64::from(h.l1_size);
    if old_l1 == 0 || h.l1_table_offset == 0 || !h.l1_table_offset.is_multiple_of(cs) {
        return Ok(false);
    }
    // Bytes mapped by one L1 entry: one L2 table of cs/8 entries.
    let per_l1 = cs * (cs / 8);
    let new_l1 = new_size.div_ceil(per_l1).max(old_l1);
    let capacity = (old_l1 * 8).div_ceil(cs) * cs / 8;
    let Ok(new_l1_field) = u32::try_from(new_l1) else {
        return Ok(false);
    };
    if new_l1 > capacity || new_l1 * 8 > MAX_L1_BYTES {
        return Ok(false);
    }
    if new_l1 > old_l1 {
        // The entries coming into use must be empty (at most one cluster).
        let mut tail = vec![0u8; ((new_l1 - old_l1) * 8) as usize];
        if file
            .read_exact_at(&mut tail, h.l1_table_offset + old_l1 * 8)
            .is_err()
            || tail.iter().any(|&b| b != 0)
        {
            return Ok(false);
        }
    }
    if backing_size(path, &h, policy)?.is_some_and(|b| b > h.size) {
        // A longer backing file would show through: the new range needs zeroing.
        return Ok(false);
    }
    let mut patch = [0u8; 16];
    patch[..8].copy_from_slice(&new_size.to_be_bytes());
    patch[8..12].copy_from_slice(&h.crypt_method.to_be_bytes());
    patch[12..].copy_from_slice(&new_l1_field.to_be_bytes());
    file.write_all_at(&patch, SIZE_FIELD)
        .map_err(|e| Error::io(path, op, e))?;
    file.sync_data().map_err(|e| Error::io(path, op, e))?;
    Ok(true)
}

/// Virtual size of the backing file `h` names, resolved under `policy` as an
/// open would (a refused backing file is an error, as it would be there).
fn backing_size(path: &Path, h: &Qcow2Header, policy: &BackingPolicy) -> Result<Option<u64>> {
    let Some(name) = h.backing_file.as_deref() else {
        return Ok(None);
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, "canonicalize", e))?;
    let rb = policy.resolve(path, name, h.backing_format.as_deref(), &[canonical])?;
    Ok(Some(match rb.format {
        Format::Raw => rb
            .file
            .metadata()
            .map_err(|e| Error::io(&rb.canonical, "stat", e))?
            .len(),
        Format::Qcow2 => Qcow2Header::read(&rb.canonical, &rb.file)?.size,
    }))
}
