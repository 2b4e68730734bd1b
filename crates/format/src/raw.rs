//! Raw images: a plain file whose bytes are the disk's bytes.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::host::{self, Falloc};
use crate::map::{merge_extents, MapExtent};
use crate::{BlockIo, Control, Error, Result};

/// How a raw image's space is reserved on the host when it is created or grown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prealloc {
    /// Sparse: nothing is allocated until written.
    #[default]
    Off,
    /// Reserve the blocks with `fallocate` (fast; blocks read as zeros).
    Falloc,
    /// Write zeros over the whole range (slow; works on every filesystem).
    Full,
}

/// Chunk size for preallocation and zero-filling fallbacks: progress and
/// cancellation are checked once per chunk.
const CHUNK: u64 = 8 << 20;

/// A raw disk image.
///
/// I/O goes straight to the file with `pread`/`pwrite`, so any number of threads
/// may share one handle. Discard punches holes; write-zeroes uses
/// `FALLOC_FL_ZERO_RANGE`; the allocation map comes from `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    /// Virtual size; changes only through [`RawImage::grow`].
    size: AtomicU64,
    read_only: bool,
    /// Serialises growers so two concurrent grows cannot interleave.
    grow_lock: Mutex<()>,
}

impl RawImage {
    /// Create a new raw image of `size` bytes at `path` (which must not exist).
    ///
    /// `prealloc` chooses sparse, `fallocate`d or zero-written space; progress is
    /// reported to `ctl` while preallocating, and cancelling through `ctl` removes
    /// the half-made file and returns [`Error::Cancelled`].
    pub fn create(path: &Path, size: u64, prealloc: Prealloc, ctl: &Control) -> Result<RawImage> {
        let file = create_new(path)?;
        let img = RawImage {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(0),
            read_only: false,
            grow_lock: Mutex::new(()),
        };
        match img.extend(0, size, prealloc, ctl, "create") {
            Ok(()) => Ok(img),
            Err(e) => {
                drop(img);
                // Leave nothing behind: the caller asked for a file of `size`
                // bytes and did not get it.
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Open an existing raw image; its virtual size is the file's length.
    pub fn open(path: &Path, read_only: bool) -> Result<RawImage> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: "not a regular file or block device".into(),
            });
        }
        let size = if meta.is_file() {
            meta.len()
        } else {
            host::block_device_size(&file)
                .map_err(|e| Error::io(path, "get block device size", e))?
        };
        if !read_only && meta.is_file() {
            // Outputs of a killed convert/compact of this image.
            host::remove_dead_temps(path)
                .map_err(|e| Error::io(path, "remove dead temporary files", e))?;
        }
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            read_only,
            grow_lock: Mutex::new(()),
        })
    }

    /// The file this image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grow the image to `new_size` bytes; the new part reads as zeros and is
    /// allocated according to `prealloc`. Shrinking is refused with
    /// [`Error::Shrink`]; growing to the current size does nothing.
    pub fn grow(&self, new_size: u64, prealloc: Prealloc) -> Result<()> {
        self.grow_with(new_size, prealloc, &Control::new())
    }

    /// [`RawImage::grow`] with progress and cancellation (for `Full`
    /// preallocation of a large range). A cancelled grow restores the old size.
    pub fn grow_with(&self, new_size: u64, prealloc: Prealloc, ctl: &Control) -> Result<()> {
        self.writable("grow")?;
        let _g = self
            .grow_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cur = self.size();
        if !Error::check_grow(&self.path, cur, new_size)? {
            return Ok(());
        }
        match self.extend(cur, new_size, prealloc, ctl, "grow") {
            Ok(()) => Ok(()),
            Err(e) => {
                // Undo a partial grow so the size stays what the caller last saw.
                let _ = self.file.set_len(cur);
                self.size.store(cur, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Extend the file from `from` to `to` bytes with the given preallocation.
    fn extend(
        &self,
        from: u64,
        to: u64,
        prealloc: Prealloc,
        ctl: &Control,
        op: &'static str,
    ) -> Result<()> {
        let total = to - from;
        match prealloc {
            Prealloc::Off => {
                ctl.check(&self.path, op)?;
                self.file
                    .set_len(to)
                    .map_err(|e| Error::io(&self.path, "set length", e))?;
                ctl.report(total, total);
            }
            Prealloc::Falloc => {
                let mut off = from;
                while off < to {
                    ctl.check(&self.path, op)?;
                    let n = (to - off).min(CHUNK);
                    host::fallocate(&self.file, Falloc::Allocate, off, n)
                        .map_err(|e| Error::io(&self.path, "fallocate", e))?;
                    off += n;
                    ctl.report(off - from, total);
                }
                // fallocate leaves the length at the end of the last range; make it exact.
                self.file
                    .set_len(to)
                    .map_err(|e| Error::io(&self.path, "set length", e))?;
            }
            Prealloc::Full => {
                let zeros = vec![0u8; CHUNK as usize];
                let mut off = from;
                while off < to {
                    ctl.check(&self.path, op)?;
                    let n = (to - off).min(CHUNK);
                    let buf = zeros.get(..n as usize).unwrap_or(&zeros);
                    self.file
                        .write_all_at(buf, off)
                        .map_err(|e| Error::io(&self.path, "write zeros", e))?;
                    off += n;
                    ctl.report(off - from, total);
                }
            }
        }
        self.size.store(to, Ordering::Release);
        Ok(())
    }

    /// The allocation map of `[offset, offset+len)` as `qemu-img map` reports it:
    /// data extents and holes, all at depth 0 and present, offsets equal to the
    /// guest offsets.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let end = self.check_range("map", offset, len)?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (data, run) = host::extent_at(&self.file, pos, end)
                .map_err(|e| Error::io(&self.path, "seek data", e))?;
            out.push(MapExtent {
                start: pos,
                length: run,
                depth: 0,
                present: true,
                zero: !data,
                data,
                compressed: false,
                offset: Some(pos),
            });
            pos += run;
        }
        Ok(merge_extents(out))
    }

    /// Bytes the file occupies on the host (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64> {
        host::allocated_bytes(&self.file).map_err(|e| Error::io(&self.path, "stat", e))
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly {
                path: self.path.clone(),
                op,
            })
        } else {
            Ok(())
        }
    }

    /// Validate a request against the size; returns its end.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<u64> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(end),
            _ => Err(Error::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size,
            }),
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = (end - off).min(CHUNK) as usize;
            let buf = zeros.get(..n).unwrap_or(&zeros);
            self.file
                .write_all_at(buf, off)
                .map_err(|e| Error::io(&self.path, "write zeros", e))?;
            off += n as u64;
        }
        Ok(())
    }
}

impl BlockIo for RawImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            match self.file.read_at(rest, offset + done as u64) {
                // Past the end of a file that shrank under us: reads as zeros.
                Ok(0) => {
                    rest.fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, "read", e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable("write")?;
        self.check_range("write", offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("write zeroes")?;
        self.check_range("write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if host::fallocate(&self.file, Falloc::ZeroRange, offset, len).is_ok() {
            return Ok(());
        }
        // Not every filesystem knows ZERO_RANGE; a punched hole reads as zeros too.
        if host::fallocate(&self.file, Falloc::PunchHole, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard")?;
        self.check_range("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match host::fallocate(&self.file, Falloc::PunchHole, offset, len) {
            Ok(()) => Ok(()),
            // Discarded data must read as zeros, so write them where holes are impossible.
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    fn known_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let end = self.check_range("query allocation", offset, len)?;
        if len == 0 {
            return Ok(true);
        }
        let (data, run) = host::extent_at(&self.file, offset, end)
            .map_err(|e| Error::io(&self.path, "seek data", e))?;
        Ok(!data && offset + run >= end)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Create `path` for reading and writing, failing with [`Error::Exists`] if
/// anything is there already (images are never overwritten by a create).
pub(crate) fn create_new(path: &Path) -> Result<File> {
    host::create_new(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, "create", e)
        }
    })
}
