//! An image of either format behind one type.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::map::MapExtent;
use crate::policy::BackingPolicy;
use crate::qcow2::Qcow2Image;
use crate::raw::{Prealloc, RawImage};
use crate::{detect_format, BlockIo, Format, Result};

/// How to open an image.
///
/// The default opens read-write, detects the format from the magic, and
/// refuses every backing file (no allowed roots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOptions {
    /// Open without write access; every write-type call fails with
    /// [`crate::Error::ReadOnly`].
    pub read_only: bool,
    /// Which backing files the image's chain may use.
    pub policy: BackingPolicy,
    /// The format, if known; `None` detects it from the file's magic (for the
    /// top image only; backing formats must be recorded).
    pub format: Option<Format>,
    /// Write without crash ordering (qcow2): no dirty bit and none of the
    /// flushes that order tables before the pointers to them, so a crash
    /// may leave the image inconsistent. Only for images that are discarded
    /// on a crash (e.g. built in a pool's staging area) and made durable as
    /// a whole (`fsync`) before they are used. Writes back imago's caches on
    /// drop; without effect on raw images and read-only opens.
    #[serde(default)]
    pub unordered: bool,
}

impl OpenOptions {
    /// Read-write, format detected, no backing files allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set read-only mode.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Set the backing policy.
    pub fn policy(mut self, policy: BackingPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Set the format instead of detecting it.
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }

    /// Set unordered mode (see [`OpenOptions::unordered`]).
    pub fn unordered(mut self, unordered: bool) -> Self {
        self.unordered = unordered;
        self
    }
}

/// An open image of either format.
///
/// Implements [`BlockIo`] by forwarding to the raw or qcow2 handle; `Send +
/// Sync`, so it can be shared by I/O threads.
#[derive(Debug)]
pub enum Image {
    /// A raw image.
    Raw(RawImage),
    /// A qcow2 image.
    Qcow2(Qcow2Image),
}

impl Image {
    /// Open the image at `path` per `opts` (format given or detected).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let format = match opts.format {
            Some(f) => f,
            None => detect_format(path)?,
        };
        Ok(match format {
            Format::Raw => Image::Raw(RawImage::open(path, opts.read_only)?),
            Format::Qcow2 => Image::Qcow2(Qcow2Image::open(path, opts)?),
        })
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The file the image was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Image::Raw(i) => i.path(),
            Image::Qcow2(i) => i.path(),
        }
    }

    /// Grow the virtual size to `new_size` bytes; the new part reads as zeros.
    /// Raw images grow sparsely (use [`RawImage::grow`] to preallocate).
    /// Shrinking is refused with [`crate::Error::Shrink`].
    pub fn grow(&self, new_size: u64) -> Result<()> {
        match self {
            Image::Raw(i) => i.grow(new_size, Prealloc::Off),
            Image::Qcow2(i) => i.grow(new_size),
        }
    }

    /// The allocation map of `[offset, offset+len)` as `qemu-img map
    /// --output=json` reports it.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        match self {
            Image::Raw(i) => i.map(offset, len),
            Image::Qcow2(i) => i.map(offset, len),
        }
    }

    /// Bytes the image file (not its backing files) occupies on the host.
    pub fn allocated_bytes(&self) -> Result<u64> {
        match self {
            Image::Raw(i) => i.allocated_bytes(),
            Image::Qcow2(i) => i.allocated_bytes(),
        }
    }

    /// The raw handle, if this is a raw image.
    pub fn as_raw(&self) -> Option<&RawImage> {
        match self {
            Image::Raw(i) => Some(i),
            Image::Qcow2(_) => None,
        }
    }

    /// The qcow2 handle, if this is a qcow2 image.
    pub fn as_qcow2(&self) -> Option<&Qcow2Image> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(i) => Some(i),
        }
    }
}

macro_rules! each {
    ($s:expr, $i:ident => $e:expr) => {
        match $s {
            Image::Raw($i) => $e,
            Image::Qcow2($i) => $e,
        }
    };
}

impl BlockIo for Image {
    fn size(&self) -> u64 {
        each!(self, i => i.size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        each!(self, i => i.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        each!(self, i => i.write_at(buf, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        each!(self, i => i.write_zeroes(offset, len))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        each!(self, i => i.discard(offset, len))
    }
    fn flush(&self) -> Result<()> {
        each!(self, i => i.flush())
    }
    fn known_zero(&self, offset: u64, len: u64) -> Result<bool> {
        each!(self, i => i.known_zero(offset, len))
    }
    fn is_read_only(&self) -> bool {
        each!(self, i => i.is_read_only())
    }
}
