//! A [`BlockIo`] over an open librbd image, so the format, filesystem and
//! volume code works on RBD images unchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmvol_format::BlockIo;

use crate::error::{Error, Result};
use crate::ffi::{Errno, Image, IoCtx};

/// An open RBD image as a [`BlockIo`]. The size is read once at open (and
/// after our own resizes), like a file's length for the raw format.
#[derive(Debug)]
pub struct RbdImage {
    img: Image,
    name: PathBuf,
    size: std::sync::atomic::AtomicU64,
    writable: bool,
}

fn fmt_err(path: &Path, op: &'static str, e: Errno) -> vmvol_format::Error {
    vmvol_format::Error::Io {
        path: path.to_path_buf(),
        op,
        source: e.io(),
    }
}

impl RbdImage {
    /// Opens image `image` of `io`; `label` names it in messages.
    pub(crate) fn open(
        io: &Arc<IoCtx>,
        image: &str,
        label: PathBuf,
        writable: bool,
    ) -> Result<RbdImage> {
        let img = Image::open(io, image, !writable).map_err(|e| Error::Ceph {
            object: label.clone(),
            op: "open image",
            source: e.io(),
        })?;
        RbdImage::wrap(img, label, writable)
    }

    /// Opens snapshot `snap` of the image of RBD id `id` (read-only).
    pub(crate) fn open_snapshot(
        io: &Arc<IoCtx>,
        id: &str,
        snap: &str,
        label: PathBuf,
    ) -> Result<RbdImage> {
        let img = Image::open_by_id(io, id, Some(snap), true).map_err(|e| Error::Ceph {
            object: label.clone(),
            op: "open snapshot",
            source: e.io(),
        })?;
        RbdImage::wrap(img, label, false)
    }

    fn wrap(img: Image, label: PathBuf, writable: bool) -> Result<RbdImage> {
        let size = img.size().map_err(|e| Error::Ceph {
            object: label.clone(),
            op: "read image size",
            source: e.io(),
        })?;
        Ok(RbdImage {
            img,
            name: label,
            size: size.into(),
            writable,
        })
    }

    /// The image's name in messages (`rbd:POOL[/NS]/IMAGE`).
    pub fn label(&self) -> &Path {
        &self.name
    }

    pub(crate) fn raw(&self) -> &Image {
        &self.img
    }

    /// Resizes the image (grow or shrink: the caller decides what is allowed).
    pub fn resize(&self, size: u64) -> vmvol_format::Result<()> {
        self.check("resize", 0, 0)?;
        self.img
            .resize(size)
            .map_err(|e| fmt_err(&self.name, "resize", e))?;
        self.size.store(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Deallocates zero-filled runs of at least `sparse_size` bytes
    /// (RBD's `sparsify`), returning their space to the cluster.
    pub fn sparsify(&self, sparse_size: usize) -> vmvol_format::Result<()> {
        self.check("sparsify", 0, 0)?;
        self.img
            .sparsify(sparse_size)
            .map_err(|e| fmt_err(&self.name, "sparsify", e))
    }

    /// Bytes of objects that hold data of this image itself (object
    /// granularity; a clone's unwritten parts count nothing).
    pub fn allocated(&self) -> vmvol_format::Result<u64> {
        let size = self.size();
        let ext = self
            .img
            .extents(0, size, false, true)
            .map_err(|e| fmt_err(&self.name, "list allocated extents", e))?;
        Ok(ext
            .iter()
            .filter(|e| e.2)
            .fold(0u64, |a, e| a.saturating_add(e.1)))
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> vmvol_format::Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(vmvol_format::Error::OutOfRange {
                path: self.name.clone(),
                op,
                offset,
                len,
                size,
            });
        }
        if op != "read" && op != "known zero" && !self.writable {
            return Err(vmvol_format::Error::ReadOnly {
                path: self.name.clone(),
                op,
            });
        }
        Ok(())
    }
}

/// Largest single librbd request; bigger ones are split (librbd takes
/// `size_t` lengths but large requests only add latency and memory).
const CHUNK: usize = 64 << 20;

impl BlockIo for RbdImage {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vmvol_format::Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        let mut off = offset;
        for c in buf.chunks_mut(CHUNK) {
            self.img
                .read(c, off)
                .map_err(|e| fmt_err(&self.name, "read", e))?;
            off += c.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> vmvol_format::Result<()> {
        self.check("write", offset, buf.len() as u64)?;
        let mut off = offset;
        for c in buf.chunks(CHUNK) {
            self.img
                .write(c, off)
                .map_err(|e| fmt_err(&self.name, "write", e))?;
            off += c.len() as u64;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> vmvol_format::Result<()> {
        self.check("write zeroes", offset, len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64);
            self.img
                .write_zeroes(offset + done, n)
                .map_err(|e| fmt_err(&self.name, "write zeroes", e))?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> vmvol_format::Result<()> {
        // Not rbd_discard: with `rbd skip partial discard` (the default) it
        // leaves data in partially covered objects, and the contract is
        // "reads as zeros". write_zeroes deallocates whole objects itself.
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> vmvol_format::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.img
            .flush()
            .map_err(|e| fmt_err(&self.name, "flush", e))
    }

    fn known_zero(&self, offset: u64, len: u64) -> vmvol_format::Result<bool> {
        self.check("known zero", offset, len)?;
        if len == 0 {
            return Ok(true);
        }
        // Parent data counts: a clone shows its parent where it has nothing.
        let ext = self
            .img
            .extents(offset, len, true, false)
            .map_err(|e| fmt_err(&self.name, "list extents", e))?;
        Ok(!ext.iter().any(|e| e.2))
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
}
