//! [`Qcow2Image`]: create, open (vetting every file of the chain before
//! imago sees it), grow, and block I/O on the `imago` engine.
//!
//! Backing chains are resolved by us under a [`BackingPolicy`] and handed to
//! imago as already-opened files: imago never opens a file by name and never
//! probes a format.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Mapping, StorageOpenOptions};
use serde::{Deserialize, Serialize};

use super::dirty::refuse_inconsistent;
use super::header::{Compression, Qcow2Header};
use super::mapcache::MapCache;
use super::ordering::Ordered;
use super::rebuild::rebuild_refcounts;
use super::spec::*;
use super::storage::HStore;
use super::writer::{write_empty, Qcow2WriterOptions};
use crate::host::{allocated_bytes, remove_dead_temps};
use crate::policy::BackingPolicy;
use crate::raw::create_new;
use crate::{BackingRef, BlockIo, Error, Format, OpenOptions, Result};

/// Options for creating a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes. With a backing file, 0 means "the backing file's size".
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name exactly as it is to be recorded in the image (relative
    /// names are relative to the new image's directory), and its format.
    pub backing: Option<BackingRef>,
}

impl Qcow2CreateOptions {
    /// Options for an image of `size` bytes, 64 KiB clusters, no backing file.
    pub fn new(size: u64) -> Self {
        Qcow2CreateOptions {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
        }
    }

    /// Set the cluster size.
    pub fn cluster_size(mut self, cluster_size: u64) -> Self {
        self.cluster_size = cluster_size;
        self
    }

    /// Record a backing file (name as written into the image) and its format.
    pub fn backing(mut self, name: impl Into<PathBuf>, format: Format) -> Self {
        self.backing = Some(BackingRef {
            path: name.into(),
            format,
        });
        self
    }
}

/// Map an imago error to ours: malformed data is corruption, the rest I/O.
pub(super) fn im_err(path: &Path, op: &'static str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{op}: {e}"),
        }
    } else {
        Error::io(path, op, e)
    }
}

/// One file of an open chain, for allocation maps and info.
#[derive(Debug)]
pub(super) struct Layer {
    /// Path as opened (the top) or as combined from the recorded name.
    pub(super) path: PathBuf,
    pub(super) format: Format,
    /// Our own handle for `SEEK_DATA` and L2 lookups (imago owns another).
    pub(super) file: File,
    /// The header, vetted (`None` for a raw layer).
    pub(super) header: Option<Qcow2Header>,
}

/// A qcow2 image (version 3 created; versions 2 and 3 opened).
///
/// Backed by `imago`. Reads, writes and write-zeroes run concurrently from any
/// number of threads; discard takes an exclusive lock because it may free
/// clusters other requests are using, and grow because it zeroes the new
/// range after publishing the new size. Writes copy-on-write from the backing
/// chain, which was resolved under the caller's [`BackingPolicy`].
#[derive(Debug)]
pub struct Qcow2Image {
    pub(super) path: PathBuf,
    pub(super) access: RwLock<FormatAccess<HStore>>,
    pub(super) read_only: bool,
    pub(super) cluster_size: u64,
    /// `[0]` is this image, then its backing files from the top down.
    pub(super) layers: Vec<Layer>,
    /// Whether some layer uses zstd compression, which imago cannot read:
    /// compressed clusters are then read by us, and every request takes the
    /// exclusive lock (see [`Qcow2Image::read_mixed`]).
    pub(super) zstd: bool,
    /// The last cluster we decompressed: `(layer, L2 entry, bytes)`.
    pub(super) zcache: Mutex<Option<(usize, u64, Vec<u8>)>>,
    /// Mappings of the top layer's data clusters, for reads (see
    /// [`Qcow2Image::read_hit`]); every operation that may change such a
    /// mapping holds a [`crate::mapcache::Change`] while it works.
    pub(super) mapcache: MapCache,
    /// The virtual size, for reads that take no lock (it only grows).
    pub(super) size: AtomicU64,
    /// Write ordering and the dirty bit of a writable image (see
    /// [`super::dirty`]).
    pub(super) order: Option<Arc<Ordered>>,
    /// The dirty bit was set at open.
    pub(super) dirty_at_open: bool,
    /// Opened writable without crash ordering ([`OpenOptions::unordered`]).
    pub(super) unordered: bool,
    /// More open file descriptions of the top file, made on first use, for
    /// the lock-free read path (see [`Qcow2Image::data_reader`]).
    pub(super) readers: [OnceLock<Option<File>>; EXTRA_READERS],
}

/// Open file descriptions of the top file besides its own, for readers on
/// other threads.
pub(super) const EXTRA_READERS: usize = 3;

/// A clean close writes everything back and clears the dirty bit (on error
/// it stays set, and the next read-write open rebuilds the refcounts).
impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.unordered {
            // No ordering, no dirty bit: write imago's caches back so the
            // file is whole; making it durable is the owner's job.
            let _ = self.read_lock().flush();
            return;
        }
        if let Some(order) = &self.order {
            if order.is_marked() {
                let acc = self.read_lock();
                if acc.flush().is_ok() && acc.sync().is_ok() {
                    let _ = order.unmark();
                }
            }
        }
    }
}

impl Qcow2Image {
    /// Create a new qcow2 image at `path` (which must not exist).
    ///
    /// The image is version 3 with 16-bit refcounts. A backing file name is
    /// recorded as given, with its format; with `size == 0` the size is taken
    /// from the backing file's header. The size is rounded up to a multiple of
    /// 512 bytes, as `qemu-img create` does. Open the result with [`Qcow2Image::open`].
    pub fn create(path: &Path, opts: &Qcow2CreateOptions) -> Result<()> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: format!("cluster size {cs} is not a power of two from 512 B to 2 MiB"),
            });
        }
        let mut size = opts.size;
        if let Some(BackingRef {
            path: name,
            format: fmt,
        }) = &opts.backing
        {
            if name.as_os_str().is_empty() || name.as_os_str().len() > MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument {
                    path: path.to_path_buf(),
                    reason: "backing file name must have 1 to 1023 bytes".into(),
                });
            }
            if size == 0 {
                let rec = name.as_path();
                let full = if rec.is_absolute() {
                    rec.to_path_buf()
                } else {
                    path.parent()
                        .map(|p| p.join(rec))
                        .unwrap_or_else(|| rec.to_path_buf())
                };
                size = crate::virtual_size(&full, *fmt)?;
            }
        }
        // QEMU only knows whole 512-byte sectors; round up as `qemu-img create` does.
        let size = size.div_ceil(512).saturating_mul(512);
        if size == 0 || size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: format!("virtual size {size} out of range"),
            });
        }
        let file = create_new(path)?;
        let wopts = Qcow2WriterOptions {
            size,
            cluster_size: cs,
            compression: Compression::Zlib,
            backing: opts.backing.clone(),
        };
        if let Err(e) = write_empty(&file, path, &wopts) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(())
    }

    /// Open a qcow2 image, read-only or read-write per `opts`, with its backing
    /// chain resolved under `opts.policy`. `opts.format` is ignored.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2Image> {
        let writable = !opts.read_only;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let mut header = Qcow2Header::read(path, &file)?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        header.vet(path, file_len)?;
        header.check_openable(path)?;
        // A dirty image (a crash, or QEMU's lazy refcounts) gets its
        // refcounts rebuilt before imago allocates from them; a clean one
        // with refcounts too low was damaged elsewhere and is refused.
        let dirty_at_open = header.is_dirty();
        if writable && dirty_at_open {
            rebuild_refcounts(path)?;
            header = Qcow2Header::read(path, &file)?;
            let file_len = file
                .metadata()
                .map_err(|e| Error::io(path, "stat", e))?
                .len();
            header.vet(path, file_len)?;
        }
        if writable {
            header.check_refcount_table(path, &file)?;
            if !dirty_at_open {
                refuse_inconsistent(path)?;
            }
            // Outputs of a killed convert/compact of this image.
            remove_dead_temps(path)
                .map_err(|e| Error::io(path, "remove dead temporary files", e))?;
        }
        let canonical =
            std::fs::canonicalize(path).map_err(|e| Error::io(path, "canonicalize", e))?;
        let mut chain = vec![canonical];
        let mut layers = vec![Layer {
            path: path.to_path_buf(),
            format: Format::Qcow2,
            file: file
                .try_clone()
                .map_err(|e| Error::io(path, "duplicate descriptor", e))?,
            header: Some(header.clone()),
        }];
        let backing = open_backing(path, &header, &opts.policy, &mut chain, &mut layers)?;
        let unordered = writable && opts.unordered;
        let order = if writable && !unordered {
            Some(Arc::new(
                Ordered::new(&file, &header).map_err(|e| Error::io(path, "open", e))?,
            ))
        } else {
            None
        };
        let mut st = HStore::new(
            file,
            StorageOpenOptions::new().write(writable).filename(path),
            &header,
            true,
        )
        .map_err(|e| Error::io(path, "open", e))?;
        st.order = order.clone();
        let mut q =
            Qcow2::<HStore>::open_image(st, writable).map_err(|e| im_err(path, "open", e))?;
        q.set_data_file(None);
        q.set_backing(backing);
        let zstd = layers.iter().any(|l| {
            l.header
                .as_ref()
                .is_some_and(|h| h.compression == Compression::Zstd)
        });
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            access: RwLock::new(FormatAccess::new(q)),
            read_only: !writable,
            cluster_size: header.cluster_size(),
            layers,
            zstd,
            zcache: Mutex::new(None),
            mapcache: MapCache::new(header.size, header.cluster_bits),
            size: AtomicU64::new(header.size),
            order,
            dirty_at_open,
            unordered,
            readers: Default::default(),
        })
    }

    /// The ordering layer, for the power-loss tests.
    #[cfg(test)]
    pub(crate) fn crash_order(&self) -> Option<&Arc<Ordered>> {
        self.order.as_ref()
    }

    /// Whether the image's dirty bit was set when it was opened: refcounts
    /// may lag behind (a crash, or QEMU's lazy refcounts). A read-only open
    /// reads such an image as is; a read-write open has rebuilt them.
    pub fn was_dirty(&self) -> bool {
        self.dirty_at_open
    }

    /// The file this image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The backing chain below this image: for each backing file from the top
    /// down, its path (as combined from the recorded name) and format.
    pub fn backing_chain(&self) -> Vec<BackingRef> {
        self.layers
            .iter()
            .skip(1)
            .map(|l| BackingRef {
                path: l.path.clone(),
                format: l.format,
            })
            .collect()
    }

    /// Bytes the image file occupies on the host (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64> {
        allocated_bytes(&self.top()?.file).map_err(|e| Error::io(&self.path, "stat", e))
    }

    /// Grow the virtual size to `new_size` bytes, a multiple of 512 (the L1
    /// table grows as needed). The new part reads as zeros even where a longer
    /// backing file has data. Shrinking is refused with [`Error::Shrink`].
    pub fn grow(&self, new_size: u64) -> Result<()> {
        self.writable("grow")?;
        // Exclusive: once resize_grow publishes the new size, a request could
        // write into [cur, new) and the zeroing below would erase it.
        let acc = self.write_lock();
        let cur = acc.size();
        if !Error::check_grow(&self.path, cur, new_size)? {
            return Ok(());
        }
        if new_size > MAX_VIRTUAL_SIZE || !new_size.is_multiple_of(512) {
            // QEMU only knows whole 512-byte sectors and refuses other sizes.
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!(
                    "virtual size {new_size} is not a multiple of 512 bytes up to 2^62"
                ),
            });
        }
        // Nothing in the new range was readable (or cached) before; for form's sake.
        let _change = self.mapcache.change(cur, new_size - cur);
        acc.resize_grow(new_size, imago::format::PreallocateMode::None)
            .map_err(|e| im_err(&self.path, "grow", e))?;
        // A longer backing file would show through the new range: hide it.
        if let Some(bsize) = self.backing_size() {
            let end = bsize.min(new_size);
            if end > cur {
                self.uncompress_edges(&acc, cur, end - cur)?;
                let len = self.zero_partial_tail(&acc, cur, end - cur, "zero grown range")?;
                if len > 0 {
                    acc.write_zeroes(cur, len)
                        .map_err(|e| im_err(&self.path, "zero grown range", e))?;
                }
            }
        }
        self.size.store(new_size, Ordering::SeqCst);
        Ok(())
    }

    /// Zero the part of `[offset, offset + len)` that lies in the image's
    /// partial last cluster, when the range ends inside that cluster, by
    /// writing zero bytes; returns the length left for imago's zeroing,
    /// which starts at `offset`.
    ///
    /// imago 0.2.6 rounds a zeroing range's end up to the cluster and clamps
    /// it to the virtual size; when the image is smaller than one cluster and
    /// bytes after the range are not zero it steps that end back one cluster
    /// and underflows (fuzz finding F1, docs/testing.md). Writing this tail
    /// ourselves keeps imago's zeroing to whole clusters inside the image.
    pub(super) fn zero_partial_tail(
        &self,
        acc: &FormatAccess<HStore>,
        offset: u64,
        len: u64,
        op: &'static str,
    ) -> Result<u64> {
        let size = acc.size();
        let end = offset.saturating_add(len);
        let last = size - size % self.cluster_size;
        if last == size || end <= last || end >= size {
            return Ok(len);
        }
        let start = offset.max(last);
        // Less than one cluster (at most 2 MiB).
        let zeros = vec![0u8; (end - start) as usize];
        acc.write(&zeros, start)
            .map_err(|e| im_err(&self.path, op, e))?;
        Ok(start - offset)
    }

    /// Virtual size of the backing file, if any.
    fn backing_size(&self) -> Option<u64> {
        let l = self.layers.get(1)?;
        match &l.header {
            Some(h) => Some(h.size),
            None => l.file.metadata().ok().map(|m| m.len()),
        }
    }

    pub(super) fn top(&self) -> Result<&Layer> {
        self.layers.first().ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            reason: "no layers".into(),
        })
    }

    pub(super) fn read_lock(&self) -> RwLockReadGuard<'_, FormatAccess<HStore>> {
        // A panic while holding the lock cannot leave imago's state torn in a way
        // we could repair; carrying on is what every other handle would do.
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write_lock(&self) -> RwLockWriteGuard<'_, FormatAccess<HStore>> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly {
                path: self.path.clone(),
                op,
            })
        } else {
            Ok(())
        }
    }

    pub(super) fn check_range(
        &self,
        size: u64,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size,
            }),
        }
    }
}

/// Resolve, vet and open the backing file named by `header` (of the image at
/// `naming`), recursively; pushes each file onto `chain` and `layers`.
fn open_backing(
    naming: &Path,
    header: &Qcow2Header,
    policy: &BackingPolicy,
    chain: &mut Vec<PathBuf>,
    layers: &mut Vec<Layer>,
) -> Result<Option<FormatAccess<HStore>>> {
    let Some(name) = header.backing_file.as_deref() else {
        return Ok(None);
    };
    let rb = policy.resolve(naming, name, header.backing_format.as_deref(), chain)?;
    chain.push(rb.canonical.clone());
    let ours = rb
        .file
        .try_clone()
        .map_err(|e| Error::io(&rb.canonical, "duplicate descriptor", e))?;
    let opts = StorageOpenOptions::new()
        .write(false)
        .filename(&rb.canonical);
    match rb.format {
        Format::Raw => {
            layers.push(Layer {
                path: rb.combined.clone(),
                format: Format::Raw,
                file: ours,
                header: None,
            });
            let st = HStore::plain(rb.file, opts)
                .map_err(|e| Error::io(&rb.canonical, "open backing file", e))?;
            let raw = Raw::open_image(st, false)
                .map_err(|e| im_err(&rb.canonical, "open backing file", e))?;
            Ok(Some(FormatAccess::new(raw)))
        }
        Format::Qcow2 => {
            let bh = Qcow2Header::read(&rb.canonical, &rb.file)?;
            let blen = rb
                .file
                .metadata()
                .map_err(|e| Error::io(&rb.canonical, "stat", e))?
                .len();
            bh.vet(&rb.canonical, blen)?;
            bh.check_openable(&rb.canonical)?;
            layers.push(Layer {
                path: rb.combined.clone(),
                format: Format::Qcow2,
                file: ours,
                header: Some(bh.clone()),
            });
            let below = open_backing(&rb.combined, &bh, policy, chain, layers)?;
            let st = HStore::new(rb.file, opts, &bh, false)
                .map_err(|e| Error::io(&rb.canonical, "open backing file", e))?;
            let mut q = Qcow2::<HStore>::open_image(st, false)
                .map_err(|e| im_err(&rb.canonical, "open backing file", e))?;
            q.set_data_file(None);
            q.set_backing(below);
            Ok(Some(FormatAccess::new(q)))
        }
    }
}

/// A held engine lock, shared or exclusive.
pub(super) enum Guard<'a> {
    R(RwLockReadGuard<'a, FormatAccess<HStore>>),
    W(RwLockWriteGuard<'a, FormatAccess<HStore>>),
}

impl std::ops::Deref for Guard<'_> {
    type Target = FormatAccess<HStore>;
    fn deref(&self) -> &Self::Target {
        match self {
            Guard::R(g) => g,
            Guard::W(g) => g,
        }
    }
}

impl BlockIo for Qcow2Image {
    fn size(&self) -> u64 {
        self.read_lock().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // First without a lock, from the mapping cache (zstd images take the
        // exclusive lock for every request: see `io_guard`).
        let len = buf.len() as u64;
        if !self.zstd
            && len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.size.load(Ordering::SeqCst))
        {
            let mut pos = 0;
            while let Some(n) =
                self.read_hit(buf.get_mut(pos..).unwrap_or_default(), offset + pos as u64)
            {
                pos += n;
                if pos == buf.len() {
                    return Ok(());
                }
            }
        }
        let acc = self.io_guard();
        self.check_range(acc.size(), "read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.zstd {
            return self.read_mixed(&acc, buf, offset);
        }
        self.read_plain(&acc, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable("write")?;
        let acc = self.io_guard();
        self.check_range(acc.size(), "write", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.uncompress_edges(&acc, offset, buf.len() as u64)?;
        acc.write(buf, offset)
            .map_err(|e| im_err(&self.path, "write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("write zeroes")?;
        let acc = self.io_guard();
        self.check_range(acc.size(), "write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Data clusters become zero clusters (keeping their allocation).
        let _change = self.mapcache.change(offset, len);
        self.uncompress_edges(&acc, offset, len)?;
        let len = self.zero_partial_tail(&acc, offset, len, "write zeroes")?;
        if len == 0 {
            return Ok(());
        }
        acc.write_zeroes(offset, len)
            .map_err(|e| im_err(&self.path, "write zeroes", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard")?;
        let mut acc = self.write_lock();
        self.check_range(acc.size(), "discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Data clusters are freed (and may be reused for other data).
        let _change = self.mapcache.change(offset, len);
        self.uncompress_edges(&acc, offset, len)?;
        let len = self.zero_partial_tail(&acc, offset, len, "discard")?;
        if len == 0 {
            return Ok(());
        }
        match acc.discard_to_zero(offset, len) {
            Ok(()) => Ok(()),
            // Version 2 images cannot discard safely; zeroing keeps the contract.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => acc
                .write_zeroes(offset, len)
                .map_err(|e| im_err(&self.path, "discard", e)),
            Err(e) => Err(im_err(&self.path, "discard", e)),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let acc = self.read_lock();
        acc.flush().map_err(|e| im_err(&self.path, "flush", e))?;
        acc.sync().map_err(|e| im_err(&self.path, "sync", e))
    }

    fn known_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let acc = self.read_lock();
        self.check_range(acc.size(), "query allocation", offset, len)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (m, l) = acc
                .get_mapping(pos, end - pos)
                .map_err(|e| im_err(&self.path, "map", e))?;
            match m {
                Mapping::Zero { .. } if l > 0 => pos += l,
                Mapping::Eof { .. } => return Ok(true),
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const CS: u64 = DEFAULT_CLUSTER_SIZE;

    fn new_image(dir: &Path, size: u64) -> (PathBuf, Qcow2Image) {
        let p = dir.join("t.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(size)).unwrap();
        let img = Qcow2Image::open(&p, &open_opts(dir)).unwrap();
        (p, img)
    }

    fn open_opts(dir: &Path) -> OpenOptions {
        OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]))
    }

    /// `len` bytes of 64-bit words naming guest cluster `cluster` and a version.
    fn stamp(cluster: u64, version: u64, len: u64) -> Vec<u8> {
        (0..len / 8)
            .flat_map(|_| (cluster << 32 | version).to_le_bytes())
            .collect()
    }

    /// grow over a longer backing file zeroes the new range after publishing
    /// the new size; a write into that range by another thread meanwhile
    /// must not be erased (grow must exclude every other request).
    #[test]
    fn grow_does_not_erase_concurrent_writes_into_the_new_range() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xaau8; 8 << 20]).unwrap();
        let mut lost = 0;
        for round in 0..40u64 {
            let p = dir.path().join(format!("o{round}.qcow2"));
            Qcow2Image::create(
                &p,
                &Qcow2CreateOptions::new(1 << 20).backing("base.raw", Format::Raw),
            )
            .unwrap();
            let img = Arc::new(Qcow2Image::open(&p, &open_opts(dir.path())).unwrap());
            let at = (1 << 20) + (round % 7) * CS;
            let data = stamp(at / CS, round + 1, 4096);
            let writer = {
                let (img, data) = (img.clone(), data.clone());
                std::thread::spawn(move || loop {
                    // Write as soon as the new size is visible.
                    if img.size() > at {
                        img.write_at(&data, at).unwrap();
                        return;
                    }
                    std::hint::spin_loop();
                })
            };
            img.grow(8 << 20).unwrap();
            writer.join().unwrap();
            let mut buf = vec![0u8; 4096];
            img.read_at(&mut buf, at).unwrap();
            if buf != data {
                lost += 1;
            }
        }
        assert_eq!(lost, 0, "grow erased {lost} of 40 completed writes");
    }

    /// Unordered mode: no ordering layer, no dirty bit while writing, and
    /// a drop without flush still leaves a consistent image (caches
    /// written back), which reads back in ordered mode.
    #[test]
    fn unordered_writes_skip_ordering_and_drop_leaves_a_whole_image() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(8 << 30)).unwrap();
        let img = Qcow2Image::open(&p, &open_opts(dir.path()).unordered(true)).unwrap();
        assert!(img.crash_order().is_none());
        // One write per L2 table (512 MiB of guest space each).
        for i in 0..16u64 {
            img.write_at(&stamp(i, 1, 4096), i * (512 << 20)).unwrap();
        }
        let mut b = [0u8; 1];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut b, INCOMPAT_LOW_BYTE)
            .unwrap();
        assert_eq!(b[0] & INCOMPAT_DIRTY as u8, 0, "unordered: no dirty bit");
        drop(img);
        let r = crate::check(&p, crate::RepairMode::None).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
        let img = Qcow2Image::open(&p, &open_opts(dir.path())).unwrap();
        assert!(img.crash_order().is_some(), "ordered unless asked");
        let mut buf = vec![0u8; 4096];
        for i in 0..16u64 {
            img.read_at(&mut buf, i * (512 << 20)).unwrap();
            assert_eq!(buf, stamp(i, 1, 4096), "write {i}");
        }
    }

    /// Threads read through their own open file descriptions of the top
    /// file: same bytes, separate descriptions (not dups of one).
    #[test]
    fn readers_on_other_threads_use_their_own_descriptions() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = new_image(dir.path(), 8 << 20);
        img.write_at(&stamp(1, 1, CS), CS).unwrap();
        let img = Arc::new(img);
        // Threads take turns (other tests' threads too): until every slot
        // was handed out.
        for _ in 0..64 {
            if img.readers.iter().all(|r| r.get().is_some()) {
                break;
            }
            let img = img.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                for _ in 0..3 {
                    img.read_at(&mut buf, CS).unwrap();
                    assert_eq!(buf, stamp(1, 1, 4096));
                }
            })
            .join()
            .unwrap();
        }
        let top = img.top().unwrap().file.metadata().unwrap();
        let made: Vec<_> = img
            .readers
            .iter()
            .filter_map(|r| r.get()?.as_ref())
            .collect();
        assert_eq!(made.len(), EXTRA_READERS, "every reader slot was used");
        for f in made {
            let m = f.metadata().unwrap();
            assert_eq!((m.dev(), m.ino()), (top.dev(), top.ino()));
        }
    }

    #[test]
    fn cached_mappings_follow_zeroing_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = new_image(dir.path(), 8 << 20);
        let mut buf = vec![0u8; 4096];
        img.write_at(&stamp(3, 1, CS), 3 * CS).unwrap();
        img.read_at(&mut buf, 3 * CS).unwrap();
        assert_eq!(buf, stamp(3, 1, 4096));
        assert!(
            img.mapcache.get(3 * CS).is_some(),
            "reads cache COPIED data clusters"
        );

        // Zeroing keeps the allocation, but the old data must not show.
        img.write_zeroes(3 * CS, CS).unwrap();
        assert!(img.mapcache.get(3 * CS).is_none());
        img.read_at(&mut buf, 3 * CS + 8192).unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        // Written again, cached again; then discarded (freed) and the space
        // reused by another cluster: the discarded one reads as zeros.
        img.write_at(&stamp(3, 2, CS), 3 * CS).unwrap();
        img.read_at(&mut buf, 3 * CS).unwrap();
        assert_eq!(buf, stamp(3, 2, 4096));
        img.discard(3 * CS, CS).unwrap();
        assert!(img.mapcache.get(3 * CS).is_none());
        img.write_at(&stamp(5, 1, CS), 5 * CS).unwrap();
        img.read_at(&mut buf, 3 * CS).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.read_at(&mut buf, 5 * CS).unwrap();
        assert_eq!(buf, stamp(5, 1, 4096));

        // Grow: the new range reads as zeros, old data stays.
        img.grow(16 << 20).unwrap();
        img.read_at(&mut buf, (16 << 20) - 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.read_at(&mut buf, 5 * CS).unwrap();
        assert_eq!(buf, stamp(5, 1, 4096));
    }

    /// Writers allocate, zero and discard (freeing host clusters that are
    /// then reused) while readers read: a read must never return data of
    /// another guest cluster, which a stale cached mapping would.
    #[test]
    fn concurrent_readers_never_see_other_clusters() {
        const CLUSTERS: u64 = 16;
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = new_image(dir.path(), CLUSTERS * CS);
        let img = Arc::new(img);
        let done = Arc::new(AtomicBool::new(false));
        let rng = |seed: u64| {
            let mut x = seed | 1;
            move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            }
        };
        let readers: Vec<_> = (0..2u64)
            .map(|t| {
                let (img, done) = (img.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut next = rng(t + 11);
                    let mut buf = vec![0u8; 4096];
                    let mut reads = 0u64;
                    while !done.load(Ordering::Relaxed) || reads < 1000 {
                        let off = next(CLUSTERS * CS / 4096) * 4096;
                        img.read_at(&mut buf, off).unwrap();
                        for w in buf.chunks_exact(8) {
                            let v = u64::from_le_bytes(w.try_into().unwrap());
                            assert!(
                                v == 0 || v >> 32 == off / CS,
                                "read at {off:#x} returned data of cluster {}",
                                v >> 32
                            );
                        }
                        reads += 1;
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    let mut next = rng(t + 101);
                    for i in 0..1500u64 {
                        let c = next(CLUSTERS);
                        match next(4) {
                            0 => img.write_zeroes(c * CS, CS).unwrap(),
                            1 => img.discard(c * CS, CS).unwrap(),
                            2 => {
                                let at = c * CS + next(CS / 4096) * 4096;
                                img.write_at(&stamp(c, i, 4096), at).unwrap();
                            }
                            _ => img.write_at(&stamp(c, i, CS), c * CS).unwrap(),
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }
}
