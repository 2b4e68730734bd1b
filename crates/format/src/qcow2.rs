//! qcow2 images on the `imago` engine, behind our own types.
//!
//! Every qcow2 file is vetted by [`VettedHeader::read`] before imago sees it,
//! so hostile headers get specific errors and never make us allocate tables out
//! of proportion to the file. Backing chains are resolved by us under a
//! [`BackingPolicy`] and handed to imago as already-opened files: imago never
//! opens a file by name and never probes a format.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::file::File as ImFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatCreateBuilder, Mapping, ShallowMapping, StorageOpenOptions};
use serde::{Deserialize, Serialize};

use crate::map::{merge_extents, MapExtent};
use crate::mapcache::MapCache;
use crate::policy::BackingPolicy;
use crate::qcow2meta::{
    be32, be64, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    INCOMPAT_EXTL2, L2E_OFFSET_MASK, MAX_L1_BYTES, MAX_REFTABLE_BYTES, OFLAG_COMPRESSED,
};
use crate::raw::{create_new, host_extent};
use crate::{BlockIo, Error, Format, OpenOptions, Result, QCOW2_MAGIC};

/// Smallest qcow2 cluster size (512 B).
pub const MIN_CLUSTER_SIZE: u64 = 512;
/// Largest qcow2 cluster size (2 MiB).
pub const MAX_CLUSTER_SIZE: u64 = 2 << 20;
/// Default qcow2 cluster size (64 KiB), as `qemu-img create` uses.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// Largest virtual size we accept (4 EiB; QEMU allows a little under 8 EiB but
/// no real image comes close, and the margin keeps offset arithmetic safe).
const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
const L2_COMPRESSED: u64 = OFLAG_COMPRESSED;
/// Mask of the host offset in L1 and L2 entries.
const OFFSET_MASK: u64 = L2E_OFFSET_MASK;

/// Options for creating a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes. With a backing file, 0 means "the backing file's size".
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name exactly as it is to be recorded in the image (relative
    /// names are relative to the new image's directory), and its format.
    pub backing: Option<(String, Format)>,
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
    pub fn backing(mut self, name: impl Into<String>, format: Format) -> Self {
        self.backing = Some((name.into(), format));
        self
    }
}

/// The parts of a qcow2 header vmvol looks at, vetted for sanity.
#[derive(Debug, Clone)]
pub(crate) struct VettedHeader {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_order: u32,
    pub rt_offset: u64,
    pub rt_clusters: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub nb_snapshots: u32,
    /// 0 = zlib, 1 = zstd.
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl VettedHeader {
    /// Read and vet the header of the qcow2 file `file` (at `path`).
    ///
    /// Refuses (with [`Error::InvalidImage`]) bad magic, truncated headers, bad
    /// cluster sizes and tables out of proportion to the file; refuses (with
    /// [`Error::Unsupported`]) encryption, external data files, extended L2
    /// entries and unknown incompatible features. Reads at most one cluster.
    pub fn read(path: &Path, file: &File) -> Result<VettedHeader> {
        let invalid = |reason: String| Error::InvalidImage {
            path: path.to_path_buf(),
            format: "qcow2",
            reason,
        };
        let unsupported = |feature: String| Error::Unsupported {
            path: path.to_path_buf(),
            feature,
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let mut first = [0u8; 104];
        let got = read_upto(file, &mut first, 0).map_err(|e| Error::io(path, "read header", e))?;
        if got < 4 || first.get(0..4) != Some(&QCOW2_MAGIC[..]) {
            return Err(invalid("bad magic (not a qcow2 file)".into()));
        }
        if got < 72 {
            return Err(invalid(format!(
                "truncated header: file has only {got} bytes"
            )));
        }
        let version = be32(&first, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        if version == 3 && got < 104 {
            return Err(invalid(format!(
                "truncated version 3 header: file has only {got} bytes"
            )));
        }
        let backing_offset = be64(&first, 8);
        let backing_len = be32(&first, 16);
        let cluster_bits = be32(&first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster size 2^{cluster_bits} outside 512 B..2 MiB"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(&first, 24);
        if size > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!("virtual size {size} is absurd")));
        }
        let crypt = be32(&first, 32);
        if crypt != 0 {
            return Err(unsupported(format!("encryption (method {crypt})")));
        }
        let l1_size = be32(&first, 36);
        let l1_offset = be64(&first, 40);
        let rt_offset = be64(&first, 48);
        let rt_clusters = be32(&first, 56);
        let nb_snapshots = be32(&first, 60);
        let snapshots_offset = be64(&first, 64);

        let (incompatible, compatible, refcount_order, header_len) = if version == 3 {
            (
                be64(&first, 72),
                be64(&first, 80),
                be32(&first, 96),
                be32(&first, 100),
            )
        } else {
            (0, 0, 4, 72)
        };
        if version == 3 && !(104..=cluster_size).contains(&u64::from(header_len)) {
            return Err(invalid(format!("header length {header_len} out of range")));
        }
        if refcount_order > 6 {
            return Err(invalid(format!("refcount order {refcount_order} > 6")));
        }
        // Incompatible features: each refused with what it is.
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file".into()));
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)".into()));
        }
        let unknown = incompatible & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION);
        if unknown != 0 {
            return Err(unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }

        // Tables must fit in the file (QEMU writes them out at creation), and
        // stay within QEMU's own limits; checked before anything is allocated.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "L1 table of {l1_size} entries exceeds the 32 MiB limit"
            )));
        }
        if !l1_offset.is_multiple_of(cluster_size) {
            return Err(invalid(format!("L1 table offset {l1_offset:#x} unaligned")));
        }
        if l1_size > 0
            && l1_offset
                .checked_add(l1_bytes)
                .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "L1 table ({l1_size} entries at {l1_offset:#x}) extends past the end of the file ({file_len} bytes)"
            )));
        }
        // Entries needed to map the virtual size.
        let per_l2 = cluster_size / 8;
        let l1_needed = size.div_ceil(cluster_size).div_ceil(per_l2);
        if u64::from(l1_size) < l1_needed {
            return Err(invalid(format!(
                "L1 table of {l1_size} entries is too small for virtual size {size} (needs {l1_needed})"
            )));
        }
        if rt_clusters == 0 {
            return Err(invalid("no refcount table".into()));
        }
        let rt_bytes = u64::from(rt_clusters) * cluster_size;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount table of {rt_clusters} clusters exceeds the 8 MiB limit"
            )));
        }
        if !rt_offset.is_multiple_of(cluster_size)
            || rt_offset
                .checked_add(rt_bytes)
                .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "refcount table ({rt_clusters} clusters at {rt_offset:#x}) lies outside the file ({file_len} bytes)"
            )));
        }
        if nb_snapshots > 65536 {
            return Err(invalid(format!("{nb_snapshots} snapshots is absurd")));
        }
        if nb_snapshots > 0
            && (!snapshots_offset.is_multiple_of(cluster_size) || snapshots_offset >= file_len)
        {
            return Err(invalid(format!(
                "snapshot table offset {snapshots_offset:#x} is invalid"
            )));
        }

        // The rest of the first cluster: compression type, extensions, backing name.
        let region_len = cluster_size.min(file_len);
        let mut region = vec![0u8; region_len as usize];
        let got = read_upto(file, &mut region, 0).map_err(|e| Error::io(path, "read header", e))?;
        region.truncate(got);

        let compression_type = if version == 3 && header_len > 104 {
            region.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        if incompatible & INCOMPAT_COMPRESSION != 0 && compression_type == 0 {
            return Err(invalid(
                "compression type bit set but compression type is zlib".into(),
            ));
        }
        if compression_type > 1 {
            return Err(unsupported(format!("compression type {compression_type}")));
        }

        let mut backing_format = None;
        let mut pos = header_len as usize;
        let mut count = 0;
        loop {
            count += 1;
            let Some(hdr) = region.get(pos..pos + 8) else {
                return Err(invalid(
                    "header extensions run past the first cluster".into(),
                ));
            };
            let ty = be32(hdr, 0);
            let len = be32(hdr, 4) as usize;
            pos += 8;
            let Some(data) = region.get(pos..pos.saturating_add(len)) else {
                return Err(invalid(format!(
                    "header extension {ty:#x} of {len} bytes runs past the first cluster"
                )));
            };
            match ty {
                EXT_END => break,
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| invalid("backing format is not UTF-8".into()))?;
                    backing_format = Some(s.to_string());
                }
                EXT_CRYPTO => return Err(unsupported("encryption (LUKS header)".into())),
                EXT_DATA_FILE => return Err(unsupported("external data file".into())),
                // Entries are 48 bytes; imago indexes into a short last entry.
                EXT_FEATURE_TABLE if !len.is_multiple_of(48) => {
                    return Err(invalid(format!(
                        "feature name table of {len} bytes is not a whole number of entries"
                    )));
                }
                EXT_FEATURE_TABLE | EXT_BITMAPS => {}
                _ => {}
            }
            pos = pos.saturating_add(len.next_multiple_of(8));
            if count > 1024 {
                return Err(invalid("too many header extensions".into()));
            }
        }

        let backing_file = if backing_offset != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(invalid(format!(
                    "backing file name length {backing_len} out of range"
                )));
            }
            let start = usize::try_from(backing_offset)
                .map_err(|_| invalid("backing file name offset out of range".into()))?;
            let Some(name) = region.get(start..start.saturating_add(backing_len as usize)) else {
                return Err(invalid(
                    "backing file name lies outside the first cluster".into(),
                ));
            };
            Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid("backing file name is not UTF-8".into()))?,
            )
        } else {
            None
        };

        Ok(VettedHeader {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_offset,
            refcount_order,
            rt_offset,
            rt_clusters,
            incompatible,
            compatible,
            nb_snapshots,
            compression_type,
            backing_file,
            backing_format,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    pub fn compression_name(&self) -> &'static str {
        if self.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
    }

    /// Before a read-write open: the refcount table must make sense, because
    /// imago's allocator trusts it (a missing or out-of-file refcount block
    /// sends it into unbounded recursion). Every entry must be aligned and lie
    /// inside the file, and the block covering the header must exist.
    fn check_refcount_table(&self, path: &Path, file: &File) -> Result<()> {
        let invalid = |reason: String| Error::InvalidImage {
            path: path.to_path_buf(),
            format: "qcow2",
            reason,
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let cs = self.cluster_size();
        let mut rt = vec![0u8; (u64::from(self.rt_clusters) * cs) as usize];
        let got = read_upto(file, &mut rt, self.rt_offset)
            .map_err(|e| Error::io(path, "read refcount table", e))?;
        rt.truncate(got);
        for (i, e) in rt.chunks_exact(8).enumerate() {
            let v = be64(e, 0);
            let off = v & !511;
            if v & 511 != 0
                || !off.is_multiple_of(cs)
                || (off != 0 && off.saturating_add(cs) > file_len)
            {
                return Err(invalid(format!(
                    "refcount table entry {i} ({v:#x}) is not a cluster inside the file"
                )));
            }
            if i == 0 && off == 0 {
                return Err(invalid("no refcount block covers the header".into()));
            }
        }
        Ok(())
    }

    /// Refuse what the header says imago cannot safely open.
    fn check_openable(&self, path: &Path) -> Result<()> {
        // imago knows neither bit; QEMU would allow reading a corrupt image,
        // but nothing in vmvol needs to, and repair is `check`'s job.
        if self.corrupt() {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: "the image is marked corrupt; check and repair it first".into(),
            });
        }
        if self.dirty() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                feature: "dirty bit set (lazy refcounts not written back); repair it first".into(),
            });
        }
        Ok(())
    }
}

/// Read guest data stored in `file` at `offset`, as imago's own reads do:
/// past the end of the file reads as zeros. (The header byte [`HStore`] hides
/// from imago is read as it is on disk, as QEMU reads it, should a corrupt
/// image map a data cluster onto the header.)
fn read_data(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let got = read_upto(file, buf, offset)?;
    if got < buf.len() {
        buf.get_mut(got..).unwrap_or_default().fill(0);
    }
    Ok(())
}

/// Read as much of `buf` as the file holds at `offset`; returns the byte count.
fn read_upto(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or_default();
        match file.read_at(rest, offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Map an imago error to ours: malformed data is corruption, the rest I/O.
fn im_err(path: &Path, op: &'static str, e: std::io::Error) -> Error {
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
struct Layer {
    /// Path as opened (the top) or as combined from the recorded name.
    path: PathBuf,
    format: Format,
    /// Our own handle for `SEEK_DATA` and L2 lookups (imago owns another).
    file: File,
    header: Option<VettedHeader>,
}

/// A qcow2 image (version 3 created; versions 2 and 3 opened).
///
/// Backed by `imago`. Reads, writes and write-zeroes run concurrently from any
/// number of threads; discard takes an exclusive lock because it may free
/// clusters other requests are using. Writes copy-on-write from the backing
/// chain, which was resolved under the caller's [`BackingPolicy`].
#[derive(Debug)]
pub struct Qcow2Image {
    path: PathBuf,
    access: RwLock<FormatAccess<HStore>>,
    read_only: bool,
    cluster_size: u64,
    /// `[0]` is this image, then its backing files from the top down.
    layers: Vec<Layer>,
    /// Whether some layer uses zstd compression, which imago cannot read:
    /// compressed clusters are then read by us, and every request takes the
    /// exclusive lock (see [`Qcow2Image::read_mixed`]).
    zstd: bool,
    /// The last cluster we decompressed: `(layer, L2 entry, bytes)`.
    zcache: Mutex<Option<(usize, u64, Vec<u8>)>>,
    /// Mappings of the top layer's data clusters, for reads (see
    /// [`Qcow2Image::read_hit`]); every operation that may change such a
    /// mapping holds a [`crate::mapcache::Change`] while it works.
    mapcache: MapCache,
    /// The virtual size, for reads that take no lock (it only grows).
    size: AtomicU64,
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
        if let Some((name, fmt)) = &opts.backing {
            if name.is_empty() || name.len() > 1023 {
                return Err(Error::InvalidArgument {
                    path: path.to_path_buf(),
                    reason: "backing file name must have 1 to 1023 bytes".into(),
                });
            }
            if size == 0 {
                let rec = Path::new(name);
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
        let result = (|| {
            let st =
                ImFile::from_open_file(file, StorageOpenOptions::new().write(true).filename(path))?;
            let mut b = Qcow2::<ImFile>::create_builder(st)
                .size(size)
                .cluster_size(cs as usize);
            if let Some((name, fmt)) = &opts.backing {
                b = b.backing(name.clone(), fmt.as_str().to_string());
            }
            b.create()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(im_err(path, "create qcow2", e));
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
        let header = VettedHeader::read(path, &file)?;
        header.check_openable(path)?;
        if writable {
            header.check_refcount_table(path, &file)?;
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
        let st = HStore::new(
            file,
            StorageOpenOptions::new().write(writable).filename(path),
            &header,
            true,
        )
        .map_err(|e| Error::io(path, "open", e))?;
        let mut q =
            Qcow2::<HStore>::open_image(st, writable).map_err(|e| im_err(path, "open", e))?;
        q.set_data_file(None);
        q.set_backing(backing);
        let zstd = layers
            .iter()
            .any(|l| l.header.as_ref().is_some_and(|h| h.compression_type != 0));
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
        })
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
    pub fn backing_chain(&self) -> Vec<(PathBuf, Format)> {
        self.layers
            .iter()
            .skip(1)
            .map(|l| (l.path.clone(), l.format))
            .collect()
    }

    /// Bytes the image file occupies on the host (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let top = self.top()?;
        let m = top
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?;
        Ok(m.blocks().saturating_mul(512))
    }

    /// Grow the virtual size to `new_size` bytes, a multiple of 512 (the L1
    /// table grows as needed). The new part reads as zeros even where a longer
    /// backing file has data. Shrinking is refused with [`Error::Shrink`].
    pub fn grow(&self, new_size: u64) -> Result<()> {
        self.writable("grow")?;
        let acc = self.io_guard();
        let cur = acc.size();
        if new_size < cur {
            return Err(Error::Shrink {
                path: self.path.clone(),
                current: cur,
                requested: new_size,
            });
        }
        if new_size == cur {
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
                acc.write_zeroes(cur, end - cur)
                    .map_err(|e| im_err(&self.path, "zero grown range", e))?;
            }
        }
        self.size.store(new_size, Ordering::SeqCst);
        Ok(())
    }

    /// Virtual size of the backing file, if any.
    fn backing_size(&self) -> Option<u64> {
        let l = self.layers.get(1)?;
        match &l.header {
            Some(h) => Some(h.size),
            None => l.file.metadata().ok().map(|m| m.len()),
        }
    }

    /// The allocation map of `[offset, offset+len)`, extent by extent as
    /// `qemu-img map --output=json` reports it (same depths, flags, offsets and
    /// merging).
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let acc = self.read_lock();
        let size = acc.size();
        let end = match offset.checked_add(len) {
            Some(e) if e <= size => e,
            _ => {
                return Err(Error::OutOfRange {
                    path: self.path.clone(),
                    op: "map",
                    offset,
                    len,
                    size,
                })
            }
        };
        if !self.read_only {
            // Zero-cluster offsets are read from the L2 tables on disk.
            acc.flush().map_err(|e| im_err(&self.path, "flush", e))?;
        }
        let mut l2cache = L2Cache::default();
        let prealloc = self
            .layers
            .iter()
            .map(metadata_preallocated)
            .collect::<Result<Vec<bool>>>()?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let before = out.len();
            self.map_one(&acc, pos, end - pos, &mut out, &mut l2cache, &prealloc)?;
            let advanced: u64 = out
                .get(before..)
                .unwrap_or_default()
                .iter()
                .map(|e| e.length)
                .sum();
            if advanced == 0 {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("no mapping progress at offset {pos}"),
                });
            }
            pos += advanced;
        }
        Ok(merge_extents(out))
    }

    /// Map the extent starting at guest offset `pos` (at most `max` bytes),
    /// pushing one or more extents.
    fn map_one(
        &self,
        top: &FormatAccess<HStore>,
        pos: u64,
        max: u64,
        out: &mut Vec<MapExtent>,
        l2cache: &mut L2Cache,
        prealloc: &[bool],
    ) -> Result<()> {
        let mut layer = top;
        let mut depth: u32 = 0;
        let mut loff = pos;
        let mut max = max;
        loop {
            let (m, len) = layer
                .get_shallow_mapping(loff, max)
                .map_err(|e| im_err(&self.path, "map", e))?;
            let info = self.layers.get(depth as usize);
            let ext = |length, present, zero, data, compressed, offset| MapExtent {
                start: pos,
                length,
                depth,
                present,
                zero,
                data,
                compressed,
                offset,
            };
            match m {
                ShallowMapping::Raw { offset: host, .. } => {
                    match info {
                        Some(l)
                            if l.format == Format::Raw
                                || prealloc.get(depth as usize).copied().unwrap_or(false) =>
                        {
                            // qemu asks the file itself: holes in a raw file read as zeros.
                            let end = host.saturating_add(len);
                            let (host_data, run) = host_extent(&l.file, &l.path, host, end)?;
                            // A qcow2 data cluster stays data; a hole in it adds "zero".
                            let data = host_data || l.format == Format::Qcow2;
                            out.push(ext(run, true, !host_data, data, false, Some(host)));
                        }
                        _ => out.push(ext(len, true, false, true, false, Some(host))),
                    }
                    return Ok(());
                }
                ShallowMapping::Zero { explicit: true, .. } => {
                    let Some(l) = info else {
                        out.push(ext(len, true, true, false, false, None));
                        return Ok(());
                    };
                    // Preallocated zero clusters keep a host offset, which qemu reports.
                    let mut p = 0;
                    while p < len {
                        let (host, run) = l2cache.zero_offset(l, loff + p, len - p)?;
                        let mut e = ext(run, true, true, false, false, host);
                        e.start = pos + p;
                        out.push(e);
                        p += run;
                    }
                    return Ok(());
                }
                ShallowMapping::Zero {
                    explicit: false, ..
                } => {
                    out.push(ext(len, false, true, false, false, None));
                    return Ok(());
                }
                ShallowMapping::Eof { .. } => {
                    // Beyond the end of a backing file: unallocated zeros of the layer above.
                    if depth == 0 {
                        return Ok(());
                    }
                    out.push(MapExtent {
                        start: pos,
                        length: max,
                        depth: depth - 1,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: None,
                    });
                    return Ok(());
                }
                ShallowMapping::Special { .. } => {
                    out.push(ext(len, true, false, true, true, None));
                    return Ok(());
                }
                ShallowMapping::Indirect {
                    layer: next,
                    offset: noff,
                    ..
                } => {
                    layer = next;
                    loff = noff;
                    max = len;
                    depth += 1;
                    if depth as usize > self.layers.len() {
                        return Err(Error::Corrupt {
                            path: self.path.clone(),
                            reason: "mapping recursed below the backing chain".into(),
                        });
                    }
                }
                _ => {
                    return Err(Error::Corrupt {
                        path: self.path.clone(),
                        reason: "unknown mapping kind".into(),
                    })
                }
            }
        }
    }

    fn top(&self) -> Result<&Layer> {
        self.layers.first().ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            reason: "no layers".into(),
        })
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, FormatAccess<HStore>> {
        // A panic while holding the lock cannot leave imago's state torn in a way
        // we could repair; carrying on is what every other handle would do.
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, FormatAccess<HStore>> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
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

    fn check_range(&self, size: u64, op: &'static str, offset: u64, len: u64) -> Result<()> {
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
    header: &VettedHeader,
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
            let bh = VettedHeader::read(&rb.canonical, &rb.file)?;
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

/// Whether QEMU would treat the qcow2 `layer` as metadata-preallocated: far
/// more clusters have a refcount than the file has blocks on the host. QEMU
/// then asks the host file about holes inside data clusters, and `map` must do
/// the same to agree with it (imago punches holes when zeroing the unwritten
/// part of a new cluster, which makes this common for images we write).
fn metadata_preallocated(layer: &Layer) -> Result<bool> {
    let Some(h) = &layer.header else {
        return Ok(false);
    };
    let meta = layer
        .file
        .metadata()
        .map_err(|e| Error::io(&layer.path, "stat", e))?;
    let cs = h.cluster_size();
    let real_clusters = meta.blocks().saturating_mul(512) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = meta.len().div_ceil(cs);
    let bits = 1u64 << h.refcount_order;
    let per_block = cs * 8 / bits;
    let mut rt = vec![0u8; (u64::from(h.rt_clusters) * cs) as usize];
    let got = read_upto(&layer.file, &mut rt, h.rt_offset)
        .map_err(|e| Error::io(&layer.path, "read refcount table", e))?;
    rt.truncate(got);
    let mut count = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let off = be64(e, 0) & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        block.fill(0);
        read_upto(&layer.file, &mut block, off)
            .map_err(|e| Error::io(&layer.path, "read refcount block", e))?;
        let n = per_block.min(end_cluster - first);
        for j in 0..n {
            let bit = j * bits;
            let nonzero = if bits < 8 {
                let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
                (byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8 != 0
            } else {
                let at = (bit / 8) as usize;
                block
                    .get(at..at + (bits / 8) as usize)
                    .is_some_and(|b| b.iter().any(|&x| x != 0))
            };
            if nonzero {
                count += 1;
                if count >= threshold {
                    break;
                }
            }
        }
    }
    Ok(count >= threshold)
}

/// One L2 table cached while mapping, to find preallocated zero clusters' offsets.
#[derive(Default)]
struct L2Cache {
    key: Option<(u64, u64)>,
    table: Vec<u64>,
}

impl L2Cache {
    /// Host offset of the zero cluster at guest offset `guest` in `layer` (None
    /// if it has none), and how far (≤ `max`) that answer holds: to the end of
    /// the cluster.
    fn zero_offset(&mut self, layer: &Layer, guest: u64, max: u64) -> Result<(Option<u64>, u64)> {
        let Some(h) = &layer.header else {
            return Ok((None, max));
        };
        let cs = h.cluster_size();
        let in_cluster = guest % cs;
        let run = (cs - in_cluster).min(max);
        let per_l2 = cs / 8;
        let cluster = guest / cs;
        let l1_index = cluster / per_l2;
        let l2_index = cluster % per_l2;
        if l1_index >= u64::from(h.l1_size) {
            return Ok((None, run));
        }
        let mut e = [0u8; 8];
        let l1_at = h.l1_offset + l1_index * 8;
        read_upto(&layer.file, &mut e, l1_at)
            .map_err(|err| Error::io(&layer.path, "read L1", err))?;
        let l2_off = u64::from_be_bytes(e) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok((None, run));
        }
        let key = (std::ptr::from_ref(layer) as u64, l2_off);
        if self.key != Some(key) {
            let mut buf = vec![0u8; cs as usize];
            read_upto(&layer.file, &mut buf, l2_off)
                .map_err(|err| Error::io(&layer.path, "read L2", err))?;
            self.table = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
            self.key = Some(key);
        }
        let entry = self.table.get(l2_index as usize).copied().unwrap_or(0);
        let host = entry & OFFSET_MASK;
        if entry & L2_COMPRESSED != 0 || host == 0 {
            Ok((None, run))
        } else {
            Ok((Some(host + in_cluster), run))
        }
    }
}

impl Qcow2Image {
    /// The lock for a request: shared, or exclusive when a layer uses zstd
    /// (our compressed-cluster reads must not race with writes that free the
    /// compressed cluster).
    fn io_guard(&self) -> Guard<'_> {
        if self.zstd {
            Guard::W(self.write_lock())
        } else {
            Guard::R(self.read_lock())
        }
    }

    /// Follow the chain's mappings at guest offset `off` (at most `max`
    /// bytes): the depth reached, what was found and for how long, and the
    /// offset inside that layer.
    fn walk(
        &self,
        top: &FormatAccess<HStore>,
        off: u64,
        max: u64,
    ) -> Result<(usize, Found, u64, u64)> {
        let mut layer = top;
        let mut depth = 0usize;
        let mut loff = off;
        let mut max = max;
        loop {
            let (m, len) = layer
                .get_shallow_mapping(loff, max)
                .map_err(|e| im_err(&self.path, "map", e))?;
            let found = match m {
                ShallowMapping::Indirect {
                    layer: next,
                    offset,
                    ..
                } => {
                    layer = next;
                    loff = offset;
                    max = len;
                    depth += 1;
                    if depth > self.layers.len() {
                        return Err(Error::Corrupt {
                            path: self.path.clone(),
                            reason: "mapping recursed below the backing chain".into(),
                        });
                    }
                    continue;
                }
                ShallowMapping::Special { .. } => Found::Compressed,
                ShallowMapping::Eof { .. } => return Ok((depth, Found::Eof, max, loff)),
                _ => Found::Plain,
            };
            return Ok((depth, found, len, loff));
        }
    }

    /// Read through the chain, decompressing compressed clusters ourselves
    /// (imago reads only zlib ones) and letting imago read everything else.
    fn read_mixed(&self, acc: &FormatAccess<HStore>, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let rem = (buf.len() - pos) as u64;
            let at = offset + pos as u64;
            let (depth, found, len, loff) = self.walk(acc, at, rem)?;
            let n = len.min(rem) as usize;
            if n == 0 {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("no mapping progress at offset {at}"),
                });
            }
            let Some(chunk) = buf.get_mut(pos..pos + n) else {
                break;
            };
            match found {
                Found::Eof => chunk.fill(0),
                Found::Plain => self.read_plain(acc, chunk, at)?,
                Found::Compressed => {
                    let n = self.read_compressed(acc, depth, loff, chunk)?;
                    pos += n;
                    continue;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Read guest data, except compressed clusters imago cannot read (see
    /// [`Qcow2Image::read_mixed`]): find each piece's host location, then
    /// read it from the file that holds it with a plain `pread`.
    ///
    /// Locations come from the mapping cache for the top layer's data
    /// clusters (see [`Qcow2Image::read_hit`]), else from imago's mapping
    /// through the chain, looked up when the piece is read under the lock
    /// imago's own read would hold (which the caller holds). This is imago's
    /// read without its generic vectored-I/O layer and, on a cache hit,
    /// without its L1/L2 lookups (and, from `read_at`, without our lock):
    /// together some 300 ns per request, 40% of a 4 KiB `pread` from the
    /// page cache (benches/format.rs, `rand_read_4k`).
    fn read_plain(&self, acc: &FormatAccess<HStore>, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let rem = (buf.len() - pos) as u64;
            let within = at % cs;
            if let Some(n) = self.read_hit(buf.get_mut(pos..).unwrap_or_default(), at) {
                pos += n;
                continue;
            }
            let epoch = self.mapcache.epoch();
            let (m, len) = acc
                .get_mapping(at, rem)
                .map_err(|e| im_err(&self.path, "map", e))?;
            let n = len.min(rem) as usize;
            if n == 0 {
                // Only past the virtual size, which callers have ruled out.
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("no mapping progress at offset {at}"),
                });
            }
            let chunk = buf.get_mut(pos..pos + n).unwrap_or_default();
            match m {
                Mapping::Raw {
                    storage,
                    offset: host,
                    writable,
                    ..
                } => {
                    // Only mappings that nothing but operations holding a
                    // `Change` can change (see the mapcache module).
                    if let Some(epoch) =
                        epoch.filter(|_| storage.top && (writable || self.read_only))
                    {
                        // Host clusters of one run are consecutive.
                        let mut g = at - within;
                        let mut h = host.checked_sub(within);
                        while let Some(hc) = h.filter(|_| g < at + n as u64) {
                            self.mapcache.insert(g, hc, epoch);
                            g += cs;
                            h = hc.checked_add(cs);
                        }
                    }
                    read_data(&storage.data, chunk, host)
                        .map_err(|e| Error::io(&self.path, "read", e))?
                }
                Mapping::Zero { .. } | Mapping::Eof { .. } => chunk.fill(0),
                // Compressed clusters (zlib) and whatever else imago reads itself.
                _ => acc
                    .read(&mut *chunk, at)
                    .map_err(|e| im_err(&self.path, "read", e))?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Read the start of `buf` from guest offset `at` through the mapping
    /// cache: the run of cached clusters there that are consecutive on the
    /// host too, with one `pread`. Returns the bytes read, or None (and
    /// `buf` holds garbage) if the cache has nothing there or a change of
    /// mappings began meanwhile (see the `mapcache` module); needs no lock.
    fn read_hit(&self, buf: &mut [u8], at: u64) -> Option<usize> {
        let cs = self.cluster_size;
        let epoch = self.mapcache.epoch()?;
        let host = self.mapcache.get(at)?;
        let within = at % cs;
        let start = at - within;
        let stop = at.checked_add(buf.len() as u64)?;
        let mut end = start + cs;
        while end < stop && self.mapcache.get(end) == Some(host + (end - start)) {
            end += cs;
        }
        let n = (stop.min(end) - at) as usize;
        let chunk = buf.get_mut(..n)?;
        // An error is reported by the locked path, which reads this again.
        read_data(&self.top().ok()?.file, chunk, host + within).ok()?;
        self.mapcache.unchanged(epoch).then_some(n)
    }

    /// Decompress the cluster of layer `depth` holding layer offset `loff`
    /// and copy from it into `out` (up to the cluster's end); returns the
    /// bytes copied.
    fn read_compressed(
        &self,
        acc: &FormatAccess<HStore>,
        depth: usize,
        loff: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let layer = self
            .layers
            .get(depth)
            .ok_or_else(|| corrupt("compressed cluster below the chain".into()))?;
        let h = layer
            .header
            .as_ref()
            .ok_or_else(|| corrupt("compressed cluster in a raw layer".into()))?;
        if depth == 0 && !self.read_only {
            // Our L2 lookup reads the tables on disk: write imago's cache back first.
            acc.flush().map_err(|e| im_err(&self.path, "flush", e))?;
        }
        let cs = h.cluster_size();
        let within = (loff % cs) as usize;
        let entry = l2_entry(layer, h, loff)?;
        if entry & L2_COMPRESSED == 0 {
            return Err(corrupt(format!(
                "{}: cluster at {loff} is not compressed on disk",
                layer.path.display()
            )));
        }
        let mut cache = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
        let hit = matches!(&*cache, Some((d, e, _)) if *d == depth && *e == entry);
        if !hit {
            let data = decompress_cluster(layer, h, entry)?;
            *cache = Some((depth, entry, data));
        }
        let data = match &*cache {
            Some((_, _, d)) => d,
            None => return Err(corrupt("decompression cache empty".into())),
        };
        let src = data.get(within..).unwrap_or_default();
        let n = src.len().min(out.len());
        out.get_mut(..n)
            .unwrap_or_default()
            .copy_from_slice(src.get(..n).unwrap_or_default());
        Ok(n)
    }

    /// Before a write-type request on a chain with zstd layers: rewrite, as
    /// plain data, each cluster the request covers only partly and that maps
    /// to compressed data anywhere in the chain. imago's copy-on-write would
    /// otherwise try to decompress it (it reads only zlib).
    fn uncompress_edges(&self, acc: &FormatAccess<HStore>, offset: u64, len: u64) -> Result<()> {
        if !self.zstd || len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let size = acc.size();
        let end = offset + len;
        let mut edges = vec![offset - offset % cs];
        if !end.is_multiple_of(cs) {
            edges.push(end - end % cs);
        }
        if offset.is_multiple_of(cs) {
            edges.remove(0);
        }
        edges.dedup();
        for start in edges {
            let stop = (start + cs).min(size);
            if stop <= start {
                continue;
            }
            // Any compressed data under this cluster?
            let mut p = start;
            let mut compressed = false;
            while p < stop {
                let (_, found, l, _) = self.walk(acc, p, stop - p)?;
                if matches!(found, Found::Compressed) {
                    compressed = true;
                    break;
                }
                p += l.max(1);
            }
            if compressed {
                let mut data = vec![0u8; (stop - start) as usize];
                self.read_mixed(acc, &mut data, start)?;
                acc.write(&data[..], start)
                    .map_err(|e| im_err(&self.path, "rewrite compressed cluster", e))?;
            }
        }
        Ok(())
    }
}

/// What a chain walk found.
enum Found {
    /// Data, zeros or unallocated: imago reads it.
    Plain,
    /// A compressed cluster.
    Compressed,
    /// Past the end of a backing file: zeros.
    Eof,
}

/// A held engine lock, shared or exclusive.
enum Guard<'a> {
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

/// The raw L2 entry for layer offset `guest` of a qcow2 layer, read from disk.
fn l2_entry(layer: &Layer, h: &VettedHeader, guest: u64) -> Result<u64> {
    let cs = h.cluster_size();
    let cluster = guest / cs;
    let per_l2 = cs / 8;
    let l1_index = cluster / per_l2;
    if l1_index >= u64::from(h.l1_size) {
        return Ok(0);
    }
    let mut e = [0u8; 8];
    read_upto(&layer.file, &mut e, h.l1_offset + l1_index * 8)
        .map_err(|err| Error::io(&layer.path, "read L1", err))?;
    let l2 = u64::from_be_bytes(e) & OFFSET_MASK;
    if l2 == 0 {
        return Ok(0);
    }
    let mut e = [0u8; 8];
    read_upto(&layer.file, &mut e, l2 + (cluster % per_l2) * 8)
        .map_err(|err| Error::io(&layer.path, "read L2", err))?;
    Ok(u64::from_be_bytes(e))
}

/// Read and decompress the compressed cluster described by L2 `entry`.
fn decompress_cluster(layer: &Layer, h: &VettedHeader, entry: u64) -> Result<Vec<u8>> {
    let cs = h.cluster_size();
    // Compressed descriptor: host offset in the low x bits, then the count of
    // additional 512-byte sectors (qcow2 spec, "Compressed Clusters Descriptor").
    let x = 62 - (h.cluster_bits - 8);
    let host = entry & ((1u64 << x) - 1);
    let sectors = (entry >> x) & ((1u64 << (h.cluster_bits - 8)) - 1);
    let csize = ((sectors + 1) * 512).saturating_sub(host & 511);
    let mut comp = vec![0u8; csize as usize];
    let got = read_upto(&layer.file, &mut comp, host)
        .map_err(|e| Error::io(&layer.path, "read compressed cluster", e))?;
    comp.truncate(got);
    let mut out = vec![0u8; cs as usize];
    let bad = |what: String| Error::Corrupt {
        path: layer.path.clone(),
        reason: format!("compressed cluster at {host:#x}: {what}"),
    };
    if h.compression_type == 1 {
        // A zstd frame, possibly followed by padding up to the sector end.
        use std::io::Read;
        let mut dec = zstd::stream::read::Decoder::with_buffer(&comp[..])
            .map_err(|e| bad(format!("zstd: {e}")))?
            .single_frame();
        dec.read_exact(&mut out)
            .map_err(|e| bad(format!("zstd: {e}")))?;
    } else {
        // Raw deflate without a zlib header, as QEMU writes it.
        let mut d = flate2::Decompress::new(false);
        d.decompress(&comp, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|e| bad(format!("deflate: {e}")))?;
        if d.total_out() != cs {
            return Err(bad(format!("deflate gave {} of {cs} bytes", d.total_out())));
        }
    }
    Ok(out)
}

/// The storage object we hand imago: an imago file plus one fix-up. QEMU
/// marks zstd images with incompatible feature bit 3, which imago refuses;
/// for such images the bit is hidden from imago's header reads and restored
/// on its header writes, and we read the zstd clusters ourselves.
///
/// It also keeps a descriptor of its own for data reads: guest reads take the
/// mapping from imago and read the data with a plain `pread` (see
/// [`Qcow2Image::read_plain`]).
#[derive(Debug)]
pub(crate) struct HStore {
    inner: ImFile,
    hide_zstd: bool,
    data: File,
    /// Whether this is the top image's file (whose mappings we cache).
    top: bool,
}

/// Byte 79 holds bit 3 of the big-endian incompatible-features field at 72.
const ZSTD_BIT_BYTE: u64 = 79;

impl HStore {
    fn new(
        file: File,
        opts: StorageOpenOptions,
        h: &VettedHeader,
        top: bool,
    ) -> std::io::Result<Self> {
        Ok(HStore {
            data: file.try_clone()?,
            inner: ImFile::from_open_file(file, opts)?,
            hide_zstd: h.incompatible & INCOMPAT_COMPRESSION != 0,
            top,
        })
    }

    fn plain(file: File, opts: StorageOpenOptions) -> std::io::Result<Self> {
        Ok(HStore {
            data: file.try_clone()?,
            inner: ImFile::from_open_file(file, opts)?,
            hide_zstd: false,
            top: false,
        })
    }

    fn touches_bit(&self, offset: u64, len: u64) -> bool {
        self.hide_zstd && offset <= ZSTD_BIT_BYTE && offset.saturating_add(len) > ZSTD_BIT_BYTE
    }
}

impl std::fmt::Display for HStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl imago::Storage for HStore {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }
    fn req_align(&self) -> usize {
        self.inner.req_align()
    }
    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }
    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> std::io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }
    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }
    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        if !self.touches_bit(offset, bufv.len()) {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        let mut tmp = vec![0u8; bufv.len() as usize];
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe {
            self.inner
                .pure_readv(IoVectorMut::from(&mut tmp[..]), offset)?
        };
        if let Some(b) = tmp.get_mut((ZSTD_BIT_BYTE - offset) as usize) {
            *b &= !(INCOMPAT_COMPRESSION as u8);
        }
        bufv.copy_from_slice(&tmp);
        Ok(())
    }
    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        if !self.touches_bit(offset, bufv.len()) {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { self.inner.pure_writev(bufv, offset) };
        }
        let mut tmp = vec![0u8; bufv.len() as usize];
        bufv.copy_into_slice(&mut tmp);
        if let Some(b) = tmp.get_mut((ZSTD_BIT_BYTE - offset) as usize) {
            *b |= INCOMPAT_COMPRESSION as u8;
        }
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe { self.inner.pure_writev(IoVector::from(&tmp[..]), offset) }
    }
    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }
    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }
    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn settle_writes(&self) -> std::io::Result<()> {
        self.inner.settle_writes()
    }
    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.invalidate_cache() }
    }
    fn get_storage_helper(&self) -> &imago::storage::drivers::CommonStorageHelper {
        self.inner.get_storage_helper()
    }
    fn resize(
        &self,
        new_size: u64,
        prealloc_mode: imago::storage::PreallocateMode,
    ) -> std::io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
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

    /// A cluster shared with an internal snapshot (not COPIED) moves on the
    /// next write: it must not be cached, or reads would see the old data.
    #[test]
    fn shared_clusters_are_not_cached() {
        if std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu-img not installed: skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (p, img) = new_image(dir.path(), 4 << 20);
        img.write_at(&stamp(1, 1, CS), CS).unwrap();
        drop(img);
        let st = std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let img = Qcow2Image::open(&p, &open_opts(dir.path())).unwrap();
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, CS).unwrap();
        assert_eq!(buf, stamp(1, 1, 4096));
        assert!(img.mapcache.get(CS).is_none());
        img.write_at(&stamp(1, 2, 4096), CS).unwrap();
        img.read_at(&mut buf, CS).unwrap();
        assert_eq!(buf, stamp(1, 2, 4096));
        // The copy is COPIED and cached; the rest of it was copied over.
        img.read_at(&mut buf, CS + 4096).unwrap();
        assert_eq!(buf, stamp(1, 1, 4096));
        assert!(img.mapcache.get(CS).is_some());

        // Read-only handles cache shared clusters too: nothing moves them.
        drop(img);
        let ro = Qcow2Image::open(&p, &open_opts(dir.path()).read_only(true)).unwrap();
        ro.read_at(&mut buf, CS).unwrap();
        assert_eq!(buf, stamp(1, 2, 4096));
        assert!(ro.mapcache.get(CS).is_some());
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
