//! Our own qcow2 metadata code: a reader for the header (with extensions),
//! L1/L2 tables, refcount structures and the snapshot table, with limits
//! against hostile input; and [`Qcow2Writer`], which lays out a fresh v3
//! image sequentially (data and L2 tables, then L1, refcounts and header),
//! optionally with compressed clusters.
//!
//! imago does the guest I/O; this module exists for what imago does not do:
//! check/repair (we must see every table as it is on disk), compressed
//! writes and fast fresh layouts for convert and compaction.
//! The format is QEMU's `docs/interop/qcow2.txt`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Format, Result, QCOW2_MAGIC};

/// Offset bits of an L1 entry.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry.
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a refcount table entry.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1 and L2 entries.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of an L2 entry.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// "Reads as zeros" flag of a standard L2 entry (v3).
pub(crate) const OFLAG_ZERO: u64 = 1;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types.
pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// QEMU's limits, which we share so that we refuse what QEMU refuses and
/// never allocate tables out of proportion to the file.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
const MAX_SNAPSHOT_EXTRA: u32 = 1024;

/// Compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (QEMU ≥ 5.1; sets the compression-type incompatible bit).
    #[default]
    Zstd,
    /// zlib (deflate), readable by every qcow2 reader.
    Zlib,
}

impl Compression {
    /// The name `qemu-img info` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Zlib => "zlib",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "zlib" => Ok(Compression::Zlib),
            other => Err(format!(
                "unknown compression {other:?} (expected zstd or zlib)"
            )),
        }
    }
}

/// A parsed qcow2 header, extensions included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 = none; anything else is encryption (refused for data access).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression: Compression,
    /// Backing file name as recorded.
    pub backing_file: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// Types of all header extensions present.
    pub extensions: Vec<u32>,
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether the image has persistent dirty bitmaps.
    pub fn has_bitmaps(&self) -> bool {
        self.extensions.contains(&EXT_BITMAPS)
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }
}

/// One decoded L2 entry (standard, not extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum L2Entry {
    /// Not allocated: reads from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros, no host cluster.
    Zero,
    /// Reads as zeros, with a preallocated host cluster at `offset`.
    ZeroAllocated {
        /// Host offset (should be cluster aligned).
        offset: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Data in the host cluster at `offset`.
    Normal {
        /// Host offset (should be cluster aligned).
        offset: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Compressed data of `size` bytes at host byte `offset` (size rounded
    /// up to the 512-byte sector the data ends in, as the format records it).
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Bytes from `offset` to the end of the last sector.
        size: u64,
        /// COPIED flag (must be clear for compressed clusters).
        copied: bool,
    },
}

impl L2Entry {
    /// Decode a raw (host-endian) L2 entry of an image with `cluster_bits`.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        // Valid images have 9..=21; clamping keeps the shifts below in range.
        let cluster_bits = cluster_bits.clamp(9, 21);
        let copied = raw & OFLAG_COPIED != 0;
        if raw & OFLAG_COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8) offset bits, then the count of
            // additional 512-byte sectors up to bit 61.
            let csize_shift = 62u32.saturating_sub(cluster_bits.saturating_sub(8));
            let offset_mask = (1u64 << csize_shift) - 1;
            let csize_mask = (1u64 << (cluster_bits.saturating_sub(8))) - 1;
            let offset = raw & offset_mask;
            let sectors = ((raw >> csize_shift) & csize_mask) + 1;
            let size = (sectors * 512).saturating_sub(offset & 511);
            return L2Entry::Compressed {
                offset,
                size,
                copied,
            };
        }
        let offset = raw & L2E_OFFSET_MASK;
        let zero = raw & OFLAG_ZERO != 0;
        match (offset, zero) {
            (0, true) => L2Entry::Zero,
            (0, false) => L2Entry::Unallocated,
            (o, true) => L2Entry::ZeroAllocated { offset: o, copied },
            (o, false) => L2Entry::Normal { offset: o, copied },
        }
    }
}

/// One internal snapshot, as far as refcounts are concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Snapshot ID string.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Host offset of its L1 table.
    pub l1_table_offset: u64,
    /// Entries in its L1 table.
    pub l1_size: u32,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time, if recorded.
    pub disk_size: Option<u64>,
}

/// Read access to the metadata of one qcow2 file.
#[derive(Debug)]
pub struct Qcow2Meta {
    path: PathBuf,
    file: File,
    file_len: u64,
    header: Qcow2Header,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        path: path.to_path_buf(),
        format: "qcow2",
        reason: reason.into(),
    }
}

/// Big-endian u32 at `at`; 0 where `b` is too short (callers bound-check first).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

/// Big-endian u64 at `at`; 0 where `b` is too short (callers bound-check first).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

impl Qcow2Meta {
    /// Open `path` and parse its header. `writable` opens the file for
    /// writing too (used by repair).
    pub fn open(path: &Path, writable: bool) -> Result<Qcow2Meta> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let header = parse_header(path, &file, file_len)?;
        Ok(Qcow2Meta {
            path: path.to_path_buf(),
            file,
            file_len,
            header,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the file in bytes (at open time).
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Refuse images whose data we cannot interpret (encryption, external
    /// data file, extended L2, unknown incompatible bits).
    pub fn require_plain(&self) -> Result<()> {
        let h = &self.header;
        let unsupported = |f: &str| Error::Unsupported {
            path: self.path.clone(),
            feature: f.to_string(),
        };
        if h.crypt_method != 0 || h.extensions.contains(&EXT_CRYPTO) {
            return Err(unsupported("encrypted qcow2 image"));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0
            || h.extensions.contains(&EXT_DATA_FILE)
        {
            return Err(unsupported("external data file"));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = h.incompatible_features & !known;
        if unknown != 0 {
            return Err(unsupported(&format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        Ok(())
    }

    /// Read `len` bytes at `offset`, refusing ranges beyond the end of file.
    pub(crate) fn read_bytes(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| invalid(&self.path, format!("{what} offset overflows")))?;
        if end > self.file_len {
            return Err(invalid(
                &self.path,
                format!(
                    "{what} at {offset:#x} ({len} bytes) extends beyond the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        let n =
            usize::try_from(len).map_err(|_| invalid(&self.path, format!("{what} too large")))?;
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io(&self.path, "read metadata", e))?;
        Ok(buf)
    }

    /// Read an L1 table of `entries` entries at `offset` (active or a
    /// snapshot's), refusing tables beyond QEMU's limit or the file.
    pub fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = u64::from(entries) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(invalid(
                &self.path,
                format!("L1 table of {entries} entries exceeds the 32 MiB limit"),
            ));
        }
        if !offset.is_multiple_of(8) {
            return Err(invalid(
                &self.path,
                format!("L1 table offset {offset:#x} unaligned"),
            ));
        }
        let buf = self.read_bytes(offset, bytes, "L1 table")?;
        Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// The active L1 table.
    pub fn active_l1(&self) -> Result<Vec<u64>> {
        self.read_l1(self.header.l1_table_offset, self.header.l1_size)
    }

    /// Read the raw entries of the L2 table at `offset`.
    pub fn read_l2(&self, offset: u64) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(invalid(
                &self.path,
                format!("L2 table offset {offset:#x} unaligned"),
            ));
        }
        let buf = self.read_bytes(offset, cs, "L2 table")?;
        Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// The refcount table's raw entries.
    pub fn refcount_table(&self) -> Result<Vec<u64>> {
        let h = &self.header;
        let bytes = u64::from(h.refcount_table_clusters) * self.cluster_size();
        if bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                &self.path,
                format!(
                    "refcount table of {} clusters exceeds the 8 MiB limit",
                    h.refcount_table_clusters
                ),
            ));
        }
        if !h.refcount_table_offset.is_multiple_of(self.cluster_size()) {
            return Err(invalid(
                &self.path,
                format!(
                    "refcount table offset {:#x} unaligned",
                    h.refcount_table_offset
                ),
            ));
        }
        let buf = self.read_bytes(h.refcount_table_offset, bytes, "refcount table")?;
        Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Refcount entries per refcount block.
    pub fn refcounts_per_block(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    /// Read and decode the refcount block at `offset`.
    pub fn read_refcount_block(&self, offset: u64) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(invalid(
                &self.path,
                format!("refcount block offset {offset:#x} unaligned"),
            ));
        }
        let buf = self.read_bytes(offset, cs, "refcount block")?;
        Ok(decode_refcounts(&buf, self.header.refcount_order))
    }

    /// Write one refcount entry (used by leak repair).
    pub(crate) fn write_refcount(&self, block_offset: u64, index: u64, value: u64) -> Result<()> {
        let order = self.header.refcount_order;
        let bits = 1u64 << order;
        if bits < 64 && value >> bits != 0 {
            return Err(invalid(
                &self.path,
                format!("refcount {value} does not fit {bits} bits"),
            ));
        }
        let bit = index * bits;
        let byte = block_offset + bit / 8;
        let width = bits.div_ceil(8);
        let mut cur = self.read_bytes(byte, width, "refcount block")?;
        if bits < 8 {
            let shift = (bit % 8) as u32;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            if let Some(b) = cur.get_mut(0) {
                *b = (*b & !mask) | (((value as u8) << shift) & mask);
            }
        } else {
            let be = value.to_be_bytes();
            let start = 8 - width as usize;
            if let Some(src) = be.get(start..) {
                cur.copy_from_slice(src);
            }
        }
        self.file
            .write_all_at(&cur, byte)
            .map_err(|e| Error::io(&self.path, "write refcount", e))
    }

    /// Flush the file to stable storage.
    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    /// Parse the snapshot table. Returns the snapshots and the table's size in bytes.
    pub fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, u64)> {
        let h = &self.header;
        if h.nb_snapshots == 0 {
            return Ok((Vec::new(), 0));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                &self.path,
                format!(
                    "{} snapshots exceed the limit of {MAX_SNAPSHOTS}",
                    h.nb_snapshots
                ),
            ));
        }
        if !h.snapshots_offset.is_multiple_of(self.cluster_size()) {
            return Err(invalid(
                &self.path,
                format!("snapshot table offset {:#x} unaligned", h.snapshots_offset),
            ));
        }
        let mut pos = h.snapshots_offset;
        let mut out = Vec::new();
        for i in 0..h.nb_snapshots {
            let fixed = self.read_bytes(pos, 40, "snapshot table entry")?;
            let l1_table_offset = be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            let id_len = u64::from(be16(&fixed, 12));
            let name_len = u64::from(be16(&fixed, 14));
            let vm_state_size32 = be32(&fixed, 32);
            let extra_len = be32(&fixed, 36);
            if extra_len > MAX_SNAPSHOT_EXTRA {
                return Err(invalid(
                    &self.path,
                    format!("snapshot {i} has {extra_len} bytes of extra data (limit {MAX_SNAPSHOT_EXTRA})"),
                ));
            }
            let var_len = u64::from(extra_len) + id_len + name_len;
            let var = self.read_bytes(pos + 40, var_len, "snapshot table entry")?;
            let extra_len = extra_len as usize;
            let extra = var.get(..extra_len).unwrap_or(&[]);
            let vm_state_size = if extra.len() >= 8 {
                be64(extra, 0)
            } else {
                u64::from(vm_state_size32)
            };
            let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
            let id_end = extra_len + id_len as usize;
            let id =
                String::from_utf8_lossy(var.get(extra_len..id_end).unwrap_or(&[])).into_owned();
            let name = String::from_utf8_lossy(var.get(id_end..).unwrap_or(&[])).into_owned();
            out.push(SnapshotEntry {
                id,
                name,
                l1_table_offset,
                l1_size,
                vm_state_size,
                disk_size,
            });
            pos = (pos + 40 + var_len).next_multiple_of(8);
            if pos - h.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(invalid(&self.path, "snapshot table exceeds 64 MiB"));
            }
        }
        Ok((out, pos - h.snapshots_offset))
    }

    /// Read the guest cluster described by `entry` into `buf` (one cluster
    /// long). Returns `false` (and leaves `buf` untouched) if the entry has no
    /// data of its own (unallocated or zero).
    pub fn read_cluster(&self, entry: L2Entry, buf: &mut [u8]) -> Result<bool> {
        let cs = self.cluster_size();
        match entry {
            L2Entry::Unallocated | L2Entry::Zero | L2Entry::ZeroAllocated { .. } => Ok(false),
            L2Entry::Normal { offset, .. } => {
                if !offset.is_multiple_of(cs)
                    || offset.saturating_add(cs) > self.file_len.next_multiple_of(cs)
                {
                    return Err(Error::Corrupt {
                        path: self.path.clone(),
                        reason: format!(
                            "data cluster offset {offset:#x} unaligned or beyond end of file"
                        ),
                    });
                }
                read_full_or_zero(&self.file, buf, offset)
                    .map_err(|e| Error::io(&self.path, "read data cluster", e))?;
                Ok(true)
            }
            L2Entry::Compressed { offset, size, .. } => {
                // The recorded size ends at a sector boundary, which may be
                // past the end of the file for the last compressed cluster.
                let avail = self.file_len.saturating_sub(offset).min(size);
                if avail == 0 || size > 2 * cs + 512 {
                    return Err(Error::Corrupt {
                        path: self.path.clone(),
                        reason: format!("compressed cluster at {offset:#x} beyond end of file"),
                    });
                }
                let data = self.read_bytes(offset, avail, "compressed cluster")?;
                decompress_cluster(self.header.compression, &data, buf).map_err(|reason| {
                    Error::Corrupt {
                        path: self.path.clone(),
                        reason: format!("compressed cluster at {offset:#x}: {reason}"),
                    }
                })?;
                Ok(true)
            }
        }
    }
}

/// Read `buf.len()` bytes at `offset`; bytes past EOF read as zero (the last
/// cluster of an image may be partly beyond the end of the file).
fn read_full_or_zero(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn decode_refcounts(buf: &[u8], order: u32) -> Vec<u64> {
    let bits = 1usize << order;
    match bits {
        1 | 2 | 4 => {
            let per = 8 / bits;
            let mask = (1u8 << bits) - 1;
            buf.iter()
                .flat_map(|&b| (0..per).map(move |k| u64::from((b >> (k * bits)) & mask)))
                .collect()
        }
        8 => buf.iter().map(|&b| u64::from(b)).collect(),
        16 => buf.chunks_exact(2).map(|c| u64::from(be16(c, 0))).collect(),
        32 => buf.chunks_exact(4).map(|c| u64::from(be32(c, 0))).collect(),
        _ => buf.chunks_exact(8).map(|c| be64(c, 0)).collect(),
    }
}

fn parse_header(path: &Path, file: &File, file_len: u64) -> Result<Qcow2Header> {
    let mut first = vec![0u8; 104];
    if file_len < 72 {
        return Err(invalid(
            path,
            format!("truncated header: file is {file_len} bytes"),
        ));
    }
    let n = (file_len.min(104)) as usize;
    if let Some(dst) = first.get_mut(..n) {
        file.read_exact_at(dst, 0)
            .map_err(|e| Error::io(path, "read header", e))?;
    }
    if first.get(0..4) != Some(&QCOW2_MAGIC[..]) {
        return Err(invalid(path, "bad magic"));
    }
    let version = be32(&first, 4);
    if version != 2 && version != 3 {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: format!("qcow2 version {version}"),
        });
    }
    let cluster_bits = be32(&first, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(
            path,
            format!("cluster_bits {cluster_bits} outside 9..=21"),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let mut h = Qcow2Header {
        version,
        cluster_bits,
        size: be64(&first, 24),
        crypt_method: be32(&first, 32),
        l1_size: be32(&first, 36),
        l1_table_offset: be64(&first, 40),
        refcount_table_offset: be64(&first, 48),
        refcount_table_clusters: be32(&first, 56),
        nb_snapshots: be32(&first, 60),
        snapshots_offset: be64(&first, 64),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 72,
        compression: Compression::Zlib,
        backing_file: None,
        backing_format: None,
        extensions: Vec::new(),
    };
    if version == 3 {
        if file_len < 104 {
            return Err(invalid(
                path,
                format!("truncated v3 header: file is {file_len} bytes"),
            ));
        }
        h.incompatible_features = be64(&first, 72);
        h.compatible_features = be64(&first, 80);
        h.autoclear_features = be64(&first, 88);
        h.refcount_order = be32(&first, 96);
        h.header_length = be32(&first, 100);
        if h.refcount_order > 6 {
            return Err(invalid(
                path,
                format!("refcount_order {} > 6", h.refcount_order),
            ));
        }
        if h.header_length < 104 || u64::from(h.header_length) > cs {
            return Err(invalid(
                path,
                format!("header length {} outside 104..={cs}", h.header_length),
            ));
        }
    }
    let backing_off = be64(&first, 8);
    let backing_len = be32(&first, 16);
    // Extensions live between the header and the backing name (or the end of
    // cluster 0); everything we read is inside the first cluster.
    let ext_end = if backing_off != 0 {
        backing_off.min(cs)
    } else {
        cs
    };
    let ext_end = ext_end.min(file_len);
    let hl = u64::from(h.header_length);
    let area = if ext_end > hl {
        let mut a = vec![0u8; ext_end as usize];
        file.read_exact_at(&mut a, 0)
            .map_err(|e| Error::io(path, "read header extensions", e))?;
        a
    } else {
        Vec::new()
    };
    if version == 3 && h.header_length >= 105 {
        match area.get(104).copied().unwrap_or(0) {
            0 => h.compression = Compression::Zlib,
            1 => h.compression = Compression::Zstd,
            t => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    feature: format!("compression type {t}"),
                })
            }
        }
    }
    let mut pos = hl as usize;
    while pos + 8 <= area.len() {
        let ty = be32(&area, pos);
        let len = be32(&area, pos + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let data_start = pos + 8;
        let Some(data) = area.get(data_start..data_start.saturating_add(len)) else {
            return Err(invalid(
                path,
                format!("header extension {ty:#x} overruns the first cluster"),
            ));
        };
        if ty == EXT_BACKING_FORMAT {
            h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
        }
        h.extensions.push(ty);
        pos = data_start + len.next_multiple_of(8);
    }
    let _ = EXT_FEATURE_TABLE;
    if backing_off != 0 {
        if backing_len > 1023 || backing_off.saturating_add(u64::from(backing_len)) > cs {
            return Err(invalid(
                path,
                "backing file name too long or outside the first cluster",
            ));
        }
        let mut name = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut name, backing_off)
            .map_err(|e| Error::io(path, "read backing file name", e))?;
        h.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
    }
    Ok(h)
}

/// Decompress one compressed cluster (`data` may carry trailing sector
/// padding) into `out`, which must be filled exactly.
pub(crate) fn decompress_cluster(
    kind: Compression,
    data: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        Compression::Zlib => {
            // Raw deflate (no zlib header), as QEMU writes it.
            let mut d = flate2::Decompress::new(false);
            let st = d
                .decompress(data, out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("zlib: {e}"))?;
            let _ = st;
            if d.total_out() as usize != out.len() {
                return Err(format!(
                    "zlib: decompressed {} bytes, expected {}",
                    d.total_out(),
                    out.len()
                ));
            }
            Ok(())
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut input = InBuffer::around(data);
            let mut output = OutBuffer::around(out);
            loop {
                let before_in = input.pos();
                let before_out = output.pos();
                let hint = dec
                    .run(&mut input, &mut output)
                    .map_err(|e| format!("zstd: {e}"))?;
                if output.pos() == output.capacity() || hint == 0 {
                    break;
                }
                if input.pos() == before_in && output.pos() == before_out {
                    break;
                }
            }
            if output.pos() != output.capacity() {
                return Err(format!(
                    "zstd: decompressed {} bytes, expected {}",
                    output.pos(),
                    output.capacity()
                ));
            }
            Ok(())
        }
    }
}

/// A reusable per-thread compressor for clusters.
pub struct ClusterCompressor {
    kind: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zlib: Option<flate2::Compress>,
    out: Vec<u8>,
    /// Largest useful compressed size (less than a cluster).
    limit: usize,
    /// Cluster size; shorter input is padded with zeros to it.
    cluster_size: usize,
    padded: Vec<u8>,
}

impl std::fmt::Debug for ClusterCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCompressor")
            .field("kind", &self.kind)
            .finish()
    }
}

impl ClusterCompressor {
    /// A compressor for clusters of `cluster_size` bytes.
    pub fn new(kind: Compression, cluster_size: usize) -> ClusterCompressor {
        ClusterCompressor {
            kind,
            // Level 3 is QEMU's (zstd's default).
            zstd: match kind {
                Compression::Zstd => zstd::bulk::Compressor::new(3).ok(),
                Compression::Zlib => None,
            },
            // QEMU inflates with a 4 KiB window (windowBits -12), so we must
            // deflate with one too.
            zlib: match kind {
                Compression::Zlib => Some(flate2::Compress::new_with_window_bits(
                    flate2::Compression::default(),
                    false,
                    12,
                )),
                Compression::Zstd => None,
            },
            // Room for deflate's worst case: zlib-rs misbehaves when a
            // stored block does not fit the output, so never let it run out.
            out: vec![0u8; cluster_size + cluster_size / 8 + 1024],
            limit: cluster_size.saturating_sub(1),
            cluster_size,
            padded: Vec::new(),
        }
    }

    /// Compress one cluster (a short one is padded with zeros to the
    /// cluster size). Returns `None` when it does not shrink below a cluster
    /// (QEMU then stores it uncompressed, and so do we).
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() > self.cluster_size {
            return None;
        }
        if data.len() < self.cluster_size {
            // A reader inflates a whole cluster: the short last cluster of an
            // image is compressed padded with zeros.
            let mut padded = std::mem::take(&mut self.padded);
            padded.clear();
            padded.extend_from_slice(data);
            padded.resize(self.cluster_size, 0);
            let r = self.compress(&padded);
            self.padded = padded;
            return r;
        }
        match self.kind {
            Compression::Zstd => {
                let c = self.zstd.as_mut()?;
                let out = self.out.get_mut(..self.limit)?;
                let n = c.compress_to_buffer(data, out).ok()?;
                self.out.get(..n).map(|s| s.to_vec())
            }
            Compression::Zlib => {
                let c = self.zlib.as_mut()?;
                c.reset();
                let st = c
                    .compress(data, &mut self.out, flate2::FlushCompress::Finish)
                    .ok()?;
                if st != flate2::Status::StreamEnd {
                    return None;
                }
                let n = usize::try_from(c.total_out()).ok()?;
                if n > self.limit {
                    return None;
                }
                self.out.get(..n).map(|s| s.to_vec())
            }
        }
    }
}

/// What [`Qcow2Writer`] should make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2WriterOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512, as QEMU
    /// only sees whole sectors).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Compression type recorded in the header (used by compressed clusters).
    pub compression: Compression,
    /// Backing file name as it should be recorded, and its format.
    pub backing: Option<(String, Format)>,
}

/// Counters of what a [`Qcow2Writer`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStats {
    /// Guest clusters stored uncompressed.
    pub data_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters recorded as zero (no host space).
    pub zero_clusters: u64,
    /// Final file length in bytes.
    pub file_len: u64,
}

const HEADER_LEN_V3: u32 = 112;

/// Writes a fresh qcow2 v3 image sequentially.
///
/// Guest clusters must be given in increasing order. Host space is handed
/// out by appending: data clusters, compressed data (packed byte by byte
/// into shared host clusters as QEMU does; a partly filled cluster stays open
/// for the next compressed clusters even when normal clusters are appended
/// meanwhile) and each L2 table as soon as its range is complete.
/// [`Qcow2Writer::finish`] appends the L1 table, refcount blocks and table,
/// and writes the header last. Memory: one L2 table, the L1 table, a 1 MiB
/// write buffer and two bytes per host cluster.
#[derive(Debug)]
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    /// Bytes appended but not yet written, starting at host offset `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    opts: Qcow2WriterOptions,
    cluster_bits: u32,
    cs: u64,
    /// End of the allocated host space (always cluster aligned).
    pos: u64,
    /// Host cluster partly filled with compressed data: (offset, bytes used).
    open: Option<(u64, u64)>,
    refcounts: Vec<u16>,
    l1: Vec<u64>,
    cur_l2: Option<(usize, Vec<u64>)>,
    last_guest: Option<u64>,
    guest_clusters: u64,
    stats: WriterStats,
}

/// Flush the append buffer at this size.
const WRITE_BUF: usize = 1 << 20;

impl Qcow2Writer {
    /// Start writing an image into `file` (empty, opened for writing);
    /// `path` is used in error messages.
    pub fn new(file: File, path: &Path, opts: &Qcow2WriterOptions) -> Result<Qcow2Writer> {
        let cs = opts.cluster_size;
        let bad = |reason: String| Error::InvalidArgument {
            path: path.to_path_buf(),
            reason,
        };
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(bad(format!(
                "cluster size {cs} is not a power of two between 512 and 2097152"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        // QEMU sees qcow2 sizes in whole 512-byte sectors (rounding down), so
        // round up as `qemu-img create` does: the tail reads as zeros.
        let mut opts = opts.clone();
        opts.size = opts.size.next_multiple_of(512);
        let opts = &opts;
        let guest_clusters = opts.size.div_ceil(cs);
        let l2_entries = cs / 8;
        let l1_size = guest_clusters.div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(bad(format!(
                "size {} needs an L1 table beyond 32 MiB at cluster size {cs}",
                opts.size
            )));
        }
        if let Some((name, _)) = &opts.backing {
            if name.len() > 1023 || header_bytes(opts).len() as u64 > cs {
                return Err(bad(format!(
                    "backing file name of {} bytes does not fit the header cluster",
                    name.len()
                )));
            }
        }
        Ok(Qcow2Writer {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(WRITE_BUF + cs as usize),
            buf_start: cs,
            opts: opts.clone(),
            cluster_bits,
            cs,
            pos: cs,
            open: None,
            refcounts: vec![1],
            l1: vec![0; l1_size as usize],
            cur_l2: None,
            last_guest: None,
            guest_clusters,
            stats: WriterStats::default(),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Bytes of host space allocated so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.buf_start)
                .map_err(|e| Error::io(&self.path, "write", e))?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Append `data` at `pos`, padded with zeros to whole clusters, and
    /// count one reference to every cluster it occupies. Returns its offset.
    fn append(&mut self, data: &[u8]) -> Result<u64> {
        let off = self.pos;
        let len = (data.len() as u64).next_multiple_of(self.cs).max(self.cs);
        if data.len() >= WRITE_BUF / 4 {
            // Large runs go straight to the file, without a copy.
            self.flush_buf()?;
            self.file
                .write_all_at(data, off)
                .map_err(|e| Error::io(&self.path, "write", e))?;
            self.buf_start = off + data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        let pad = (off + len) - (self.buf_start + self.buf.len() as u64);
        self.buf.resize(self.buf.len() + pad as usize, 0);
        self.pos = off + len;
        for c in (off >> self.cluster_bits)..(self.pos >> self.cluster_bits) {
            self.add_ref(c)?;
        }
        if self.buf.len() >= WRITE_BUF {
            self.flush_buf()?;
        }
        Ok(off)
    }

    /// Overwrite already allocated bytes at `off` (in the buffer if still
    /// buffered, else in the file).
    fn patch(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let end = off + data.len() as u64;
        if off < self.buf_start {
            let n = (self.buf_start.min(end) - off) as usize;
            let (head, _) = data.split_at(n);
            self.file
                .write_all_at(head, off)
                .map_err(|e| Error::io(&self.path, "write", e))?;
        }
        if end > self.buf_start {
            let from = self.buf_start.max(off);
            let src = data.get((from - off) as usize..).unwrap_or_default();
            let at = (from - self.buf_start) as usize;
            if let Some(dst) = self.buf.get_mut(at..at + src.len()) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn add_ref(&mut self, cluster: u64) -> Result<()> {
        let idx = usize::try_from(cluster).map_err(|_| Error::InvalidArgument {
            path: self.path.clone(),
            reason: "image too large".into(),
        })?;
        if self.refcounts.len() <= idx {
            self.refcounts.resize(idx + 1, 0);
        }
        if let Some(r) = self.refcounts.get_mut(idx) {
            *r = r.saturating_add(1);
        }
        Ok(())
    }

    fn refcount(&self, cluster: u64) -> u16 {
        self.refcounts.get(cluster as usize).copied().unwrap_or(0)
    }

    fn slot(&mut self, guest: u64) -> Result<&mut u64> {
        if guest >= self.guest_clusters {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                op: "write cluster",
                offset: guest << self.cluster_bits,
                len: self.cs,
                size: self.opts.size,
            });
        }
        if self.last_guest.is_some_and(|l| guest <= l) {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("cluster {guest} written out of order"),
            });
        }
        self.last_guest = Some(guest);
        let per = self.cs / 8;
        let l1i = (guest / per) as usize;
        if self.cur_l2.as_ref().is_some_and(|(i, _)| *i != l1i) {
            self.flush_l2()?;
        }
        if self.cur_l2.is_none() {
            self.cur_l2 = Some((l1i, vec![0u64; per as usize]));
        }
        let j = (guest % per) as usize;
        let path = self.path.clone();
        self.cur_l2
            .as_mut()
            .and_then(|(_, t)| t.get_mut(j))
            .ok_or_else(|| Error::InvalidArgument {
                path,
                reason: "L2 index out of range".into(),
            })
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((l1i, table)) = self.cur_l2.take() {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            let off = self.append(&bytes)?;
            if let Some(e) = self.l1.get_mut(l1i) {
                *e = off | OFLAG_COPIED;
            }
        }
        Ok(())
    }

    /// Store guest cluster `guest` uncompressed. `data` is at most one
    /// cluster; a short last cluster is padded with zeros.
    pub fn write_cluster(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.write_run(guest, data)
    }

    /// Store consecutive guest clusters from `first` uncompressed, in
    /// consecutive host clusters: `data` holds whole clusters, except that
    /// the last one may be short.
    pub fn write_run(&mut self, first: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let n = (data.len() as u64).div_ceil(self.cs);
        // Check every slot first so that a refused run leaves no trace.
        let last = first
            .checked_add(n - 1)
            .ok_or_else(|| Error::InvalidArgument {
                path: self.path.clone(),
                reason: "cluster index overflows".into(),
            })?;
        if last >= self.guest_clusters {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                op: "write cluster",
                offset: first << self.cluster_bits,
                len: data.len() as u64,
                size: self.opts.size,
            });
        }
        if self.last_guest.is_some_and(|l| first <= l) {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("cluster {first} written out of order"),
            });
        }
        // L2 tables are appended when their range is complete, so a run must
        // not straddle one: split it at L2 boundaries.
        let per = self.cs / 8;
        let mut g = first;
        let mut rest = data;
        while !rest.is_empty() {
            let in_table = per - g % per;
            let take = (in_table * self.cs).min(rest.len() as u64) as usize;
            let (part, tail) = rest.split_at(take);
            self.slot(g)?;
            let off = self.append(part)?;
            let k = (part.len() as u64).div_ceil(self.cs);
            for i in 0..k {
                *self.slot_mut(g + i) = (off + i * self.cs) | OFLAG_COPIED;
            }
            self.last_guest = Some(g + k - 1);
            self.stats.data_clusters += k;
            g += k;
            rest = tail;
        }
        Ok(())
    }

    /// The L2 entry of `guest`, in the current table (which `slot` created).
    fn slot_mut(&mut self, guest: u64) -> &mut u64 {
        let per = self.cs / 8;
        let j = (guest % per) as usize;
        match self.cur_l2.as_mut().and_then(|(_, t)| t.get_mut(j)) {
            Some(e) => e,
            None => {
                // Unreachable by construction; keep a harmless sink.
                self.stats.file_len = 0;
                &mut self.stats.file_len
            }
        }
    }

    /// Store guest cluster `guest` as already-compressed bytes (from
    /// [`ClusterCompressor::compress`] with the writer's compression type).
    pub fn write_compressed(&mut self, guest: u64, compressed: &[u8]) -> Result<()> {
        let len = compressed.len() as u64;
        if len == 0 || len >= self.cs {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("compressed cluster of {len} bytes"),
            });
        }
        self.slot(guest)?;
        let cs = self.cs;
        // Refcounts are 16 bits wide: never let one host cluster be shared by
        // more compressed clusters than that.
        if let Some((h, _)) = self.open {
            if self.refcount(h >> self.cluster_bits) >= u16::MAX - 1 {
                self.open = None;
            }
        }
        let off = match self.open {
            Some((h, used)) if used + len <= cs => {
                self.patch(h + used, compressed)?;
                self.add_ref(h >> self.cluster_bits)?;
                self.open = (used + len < cs).then_some((h, used + len));
                h + used
            }
            Some((h, used)) if h + cs == self.pos => {
                // The open cluster is the last one: continue into new clusters.
                let (head, tail) = compressed.split_at((cs - used) as usize);
                self.patch(h + used, head)?;
                self.add_ref(h >> self.cluster_bits)?;
                let t = self.append(tail)?;
                let tail_len = tail.len() as u64;
                let last = t + (tail_len - 1) / cs * cs;
                self.open = (!tail_len.is_multiple_of(cs)).then_some((last, tail_len % cs));
                h + used
            }
            _ => {
                let t = self.append(compressed)?;
                let last = t + (len - 1) / cs * cs;
                self.open = (!len.is_multiple_of(cs)).then_some((last, len % cs));
                t
            }
        };
        let sectors = ((off + len - 1) >> 9) - (off >> 9);
        let csize_shift = 62 - (self.cluster_bits - 8);
        let entry = off | OFLAG_COMPRESSED | (sectors << csize_shift);
        *self.slot_mut(guest) = entry;
        self.stats.compressed_clusters += 1;
        Ok(())
    }

    /// Record guest cluster `guest` as reading zeros (no host space; hides a
    /// backing file's data).
    pub fn write_zero(&mut self, guest: u64) -> Result<()> {
        *self.slot(guest)? = OFLAG_ZERO;
        self.stats.zero_clusters += 1;
        Ok(())
    }

    /// Write the remaining metadata and the header, and fsync the file.
    pub fn finish(self) -> Result<(File, WriterStats)> {
        self.finish_with(true)
    }

    /// [`Qcow2Writer::finish`], with the fsync optional.
    pub fn finish_with(mut self, sync: bool) -> Result<(File, WriterStats)> {
        self.flush_l2()?;
        let cs = self.cs;
        // L1 table.
        let l1_offset = if self.l1.is_empty() {
            0
        } else {
            let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.append(&bytes)?
        };
        // Refcount blocks and table must cover themselves: iterate to a fixed point.
        let used = self.pos >> self.cluster_bits;
        let per_block = cs / 2;
        let (mut rb, mut rt) = (0u64, 0u64);
        loop {
            let total = used + rb + rt;
            let nrb = total.div_ceil(per_block);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if nrb == rb && nrt == rt {
                break;
            }
            rb = nrb;
            rt = nrt;
        }
        let rb_start = used;
        for c in rb_start..rb_start + rb + rt {
            self.add_ref(c)?;
        }
        let mut table = vec![0u8; (rt * cs) as usize];
        for b in 0..rb {
            let mut block = vec![0u8; cs as usize];
            for (k, chunk) in block.chunks_exact_mut(2).enumerate() {
                let idx = (b * per_block) as usize + k;
                if let Some(&r) = self.refcounts.get(idx) {
                    chunk.copy_from_slice(&r.to_be_bytes());
                }
            }
            let at = (b * 8) as usize;
            if let Some(dst) = table.get_mut(at..at + 8) {
                dst.copy_from_slice(&((rb_start + b) * cs).to_be_bytes());
            }
            // Refcounts of these clusters were counted above already.
            self.buf.extend_from_slice(&block);
            self.pos += cs;
            if self.buf.len() >= WRITE_BUF {
                self.flush_buf()?;
            }
        }
        let rt_offset = self.pos;
        self.buf.extend_from_slice(&table);
        self.pos += rt * cs;
        self.flush_buf()?;
        let file_len = self.pos;
        // Header last: until here the file is not a valid image.
        let mut hdr = header_bytes(&self.opts);
        put64(&mut hdr, 40, l1_offset);
        put32(&mut hdr, 36, self.l1.len() as u32);
        put64(&mut hdr, 48, rt_offset);
        put32(&mut hdr, 56, rt as u32);
        self.file
            .write_all_at(&hdr, 0)
            .map_err(|e| Error::io(&self.path, "write header", e))?;
        self.file
            .set_len(file_len)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.path, "fsync", e))?;
        }
        self.stats.file_len = file_len;
        Ok((self.file, self.stats))
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(d) = b.get_mut(at..at + 4) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    if let Some(d) = b.get_mut(at..at + 8) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}

/// One guest cluster on its way into a [`Qcow2Writer`].
#[derive(Debug)]
pub(crate) enum Item {
    /// Reads as zeros (zero flag, no host space).
    Zero(u64),
    /// Data to store, compressed if the batch is compressed.
    Data(u64, Vec<u8>),
}

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| <[u8; 16]>::try_from(c).is_ok_and(|a| u128::from_ne_bytes(a) == 0))
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Write `items` (in increasing guest order) into `w`, compressing the data
/// clusters in parallel on `compressors.len()` threads when any are given.
/// The output order is kept.
pub(crate) fn write_items(
    w: &mut Qcow2Writer,
    items: &mut Vec<Item>,
    compressors: &mut [ClusterCompressor],
) -> Result<()> {
    if compressors.is_empty() {
        for it in items.drain(..) {
            match it {
                Item::Zero(g) => w.write_zero(g)?,
                Item::Data(g, d) => w.write_cluster(g, &d)?,
            }
        }
        return Ok(());
    }
    let n = items.len();
    let per = n.div_ceil(compressors.len()).max(1);
    let mut results: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .zip(compressors.iter_mut())
            .map(|(chunk, comp)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|it| match it {
                            Item::Zero(_) => None,
                            Item::Data(_, d) => comp.compress(d),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(mut r) => results.append(&mut r),
                // A panicking compressor must not take the process down.
                Err(_) => results.clear(),
            }
        }
    });
    if results.len() != n {
        return Err(Error::InvalidArgument {
            path: w.path.clone(),
            reason: "compression worker failed".into(),
        });
    }
    for (it, c) in items.drain(..).zip(results) {
        match (it, c) {
            (Item::Zero(g), _) => w.write_zero(g)?,
            (Item::Data(g, _), Some(z)) => w.write_compressed(g, &z)?,
            (Item::Data(g, d), None) => w.write_cluster(g, &d)?,
        }
    }
    Ok(())
}

/// Worker count for "0 = all cores".
pub(crate) fn thread_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Header, extensions and backing name (everything in cluster 0), with the
/// table offsets still zero.
fn header_bytes(opts: &Qcow2WriterOptions) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN_V3 as usize];
    h[0..4].copy_from_slice(&QCOW2_MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, opts.cluster_size.trailing_zeros());
    put64(&mut h, 24, opts.size);
    let incompat = match opts.compression {
        Compression::Zstd => INCOMPAT_COMPRESSION,
        Compression::Zlib => 0,
    };
    put64(&mut h, 72, incompat);
    put32(&mut h, 96, 4);
    put32(&mut h, 100, HEADER_LEN_V3);
    h[104] = match opts.compression {
        Compression::Zstd => 1,
        Compression::Zlib => 0,
    };
    if let Some((_, fmt)) = &opts.backing {
        let f = fmt.as_str().as_bytes();
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(f.len() as u32).to_be_bytes());
        h.extend_from_slice(f);
        h.resize(h.len().next_multiple_of(8), 0);
    }
    h.extend_from_slice(&[0u8; 8]); // end of extensions
    if let Some((name, _)) = &opts.backing {
        let off = h.len() as u64;
        put64(&mut h, 8, off);
        put32(&mut h, 16, name.len() as u32);
        h.extend_from_slice(name.as_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn compressed_entry_roundtrip() {
        for bits in [9u32, 16, 21] {
            let off = 0x1_2345u64 << 4 | 3;
            let len = 700u64.min((1 << bits) - 1);
            let sectors = ((off + len - 1) >> 9) - (off >> 9);
            let raw = off | OFLAG_COMPRESSED | (sectors << (62 - (bits - 8)));
            match L2Entry::decode(raw, bits) {
                L2Entry::Compressed { offset, size, .. } => {
                    assert_eq!(offset, off);
                    assert!(size >= len && size < len + 512);
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn compress_roundtrip() {
        for kind in [Compression::Zstd, Compression::Zlib] {
            let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
            let mut c = ClusterCompressor::new(kind, 65536);
            let z = c.compress(&data).unwrap();
            let mut padded = z.clone();
            padded.resize(z.len().next_multiple_of(512), 0xaa);
            let mut out = vec![0u8; 65536];
            decompress_cluster(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            let mut x = 0x1234_5678_u64;
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            assert!(c.compress(&noise).is_none());
            // A short last cluster is compressed padded to a whole cluster.
            let z = c.compress(&data[..1000]).unwrap();
            decompress_cluster(kind, &z, &mut out).unwrap();
            assert_eq!(&out[..1000], &data[..1000]);
            assert!(out[1000..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn refcount_decode_orders() {
        assert_eq!(decode_refcounts(&[0b1011_0001], 0)[..4], [1, 0, 0, 0]);
        assert_eq!(decode_refcounts(&[0b1011_0001], 1), vec![1, 0, 3, 2]);
        assert_eq!(decode_refcounts(&[0x12, 0x34], 4), vec![0x1234]);
    }
}
