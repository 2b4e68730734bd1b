//! The qcow2 header: ONE parser ([`Qcow2Header::read`]) that every reader
//! uses (open, info, check, compact, probing), and a strict vetting step
//! ([`Qcow2Header::vet`]) that opening for I/O adds and `check` skips, so it
//! can look at images too broken to open.
//!
//! The parser refuses only what no reader can interpret: bad magic, an
//! unknown version, cluster sizes outside 512 B..2 MiB, header lengths and
//! extensions that overrun the first cluster, short feature-table entries,
//! and backing names or formats that are not UTF-8 (a lossy name could name
//! another file). Extensions are walked as QEMU walks them: up to the backing
//! file name, or the end of the first cluster.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::spec::*;
use crate::host::read_upto;
use crate::{BackingRef, Error, Format, Result};

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
    /// Whether the extension list ends with an end marker (QEMU always
    /// writes one; opening for I/O requires it).
    pub extensions_end: bool,
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

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        path: path.to_path_buf(),
        format: "qcow2",
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, feature: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        feature: feature.into(),
    }
}

impl Qcow2Header {
    /// Whether lazy refcounts are enabled (compatible feature bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Read and parse the header of the qcow2 file `file` (at `path`),
    /// extensions and backing name included. Reads at most one cluster.
    pub fn read(path: &Path, file: &File) -> Result<Qcow2Header> {
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let mut first = [0u8; 104];
        let got = read_upto(file, &mut first, 0).map_err(|e| Error::io(path, "read header", e))?;
        if got < 4 || first.get(0..4) != Some(&QCOW2_MAGIC[..]) {
            return Err(invalid(path, "bad magic (not a qcow2 file)"));
        }
        if got < 72 {
            return Err(invalid(
                path,
                format!("truncated header: file has only {got} bytes"),
            ));
        }
        let version = be32(&first, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow2 version {version}")));
        }
        if version == 3 && got < 104 {
            return Err(invalid(
                path,
                format!("truncated version 3 header: file has only {got} bytes"),
            ));
        }
        let cluster_bits = be32(&first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!("cluster size 2^{cluster_bits} outside 512 B..2 MiB"),
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
            extensions_end: false,
        };
        if version == 3 {
            h.incompatible_features = be64(&first, 72);
            h.compatible_features = be64(&first, 80);
            h.autoclear_features = be64(&first, 88);
            h.refcount_order = be32(&first, 96);
            h.header_length = be32(&first, 100);
            if !(104..=cs).contains(&u64::from(h.header_length)) {
                return Err(invalid(
                    path,
                    format!("header length {} out of range", h.header_length),
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                path,
                format!("refcount order {} > 6", h.refcount_order),
            ));
        }
        // Everything else lives in the first cluster.
        let mut region = vec![0u8; cs.min(file_len) as usize];
        let got = read_upto(file, &mut region, 0).map_err(|e| Error::io(path, "read header", e))?;
        region.truncate(got);
        if version == 3 && h.header_length > 104 {
            h.compression = match region.get(104).copied().unwrap_or(0) {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => return Err(unsupported(path, format!("compression type {t}"))),
            };
        }
        let backing_off = be64(&first, 8);
        let backing_len = be32(&first, 16);
        // QEMU's walk: extensions end where the backing name starts, or at
        // the end of the first cluster.
        let ext_end = if backing_off != 0 {
            backing_off.min(cs)
        } else {
            cs
        } as usize;
        let mut pos = h.header_length as usize;
        while pos + 8 <= ext_end {
            let Some(hdr) = region.get(pos..pos + 8) else {
                return Err(invalid(
                    path,
                    "header extensions run past the end of the file",
                ));
            };
            let ty = be32(hdr, 0);
            let len = be32(hdr, 4) as usize;
            if ty == EXT_END {
                h.extensions_end = true;
                break;
            }
            let start = pos + 8;
            let data = region
                .get(start..start.saturating_add(len))
                .filter(|_| start.saturating_add(len) <= ext_end)
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!(
                            "header extension {ty:#x} of {len} bytes runs past the first cluster"
                        ),
                    )
                })?;
            match ty {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| invalid(path, "backing format is not UTF-8"))?;
                    h.backing_format = Some(s.to_string());
                }
                // A short last entry would be read past its end by imago.
                EXT_FEATURE_TABLE if !len.is_multiple_of(FEATURE_ENTRY_LEN) => {
                    return Err(invalid(
                        path,
                        format!(
                            "feature name table of {len} bytes is not a whole number of entries"
                        ),
                    ));
                }
                _ => {}
            }
            h.extensions.push(ty);
            if h.extensions.len() > 1024 {
                return Err(invalid(path, "too many header extensions"));
            }
            pos = start.saturating_add(len.next_multiple_of(8));
        }
        if backing_off != 0 {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(invalid(
                    path,
                    format!("backing file name length {backing_len} out of range"),
                ));
            }
            let name = usize::try_from(backing_off)
                .ok()
                .and_then(|s| region.get(s..s.saturating_add(backing_len as usize)))
                .filter(|_| backing_off + u64::from(backing_len) <= cs)
                .ok_or_else(|| invalid(path, "backing file name lies outside the first cluster"))?;
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid(path, "backing file name is not UTF-8"))?,
            );
        }
        Ok(h)
    }

    /// The backing file as recorded: its name and format. A name without a
    /// recorded format is refused (probing is the policy's business, see
    /// [`crate::BackingPolicy`]), as is a format vmvol does not know.
    pub fn backing(&self, path: &Path) -> Result<Option<BackingRef>> {
        let Some(name) = self.backing_file.clone() else {
            return Ok(None);
        };
        let refuse = |reason: String| Error::BackingRefused {
            path: path.to_path_buf(),
            backing: name.clone(),
            reason,
        };
        let format = match self.backing_format.as_deref() {
            Some(f) => f.parse::<Format>().map_err(refuse)?,
            None => return Err(refuse("no backing format recorded".into())),
        };
        Ok(Some(BackingRef {
            path: name.into(),
            format,
        }))
    }

    /// Refuse features whose data vmvol cannot interpret: encryption,
    /// external data files, extended L2 entries, unknown incompatible bits.
    pub fn require_plain(&self, path: &Path) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(unsupported(
                path,
                format!("encryption (method {})", self.crypt_method),
            ));
        }
        if self.extensions.contains(&EXT_CRYPTO) {
            return Err(unsupported(path, "encryption (LUKS header)"));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0
            || self.extensions.contains(&EXT_DATA_FILE)
        {
            return Err(unsupported(path, "external data file"));
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(path, "extended L2 entries (subclusters)"));
        }
        let unknown = self.incompatible_features
            & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION);
        if unknown != 0 {
            return Err(unsupported(
                path,
                format!("unknown incompatible feature bits {unknown:#x}"),
            ));
        }
        Ok(())
    }

    /// The strict step before an image is opened for I/O: plain features
    /// only, a terminated extension list, and tables that fit the file and
    /// QEMU's limits (checked before anything is allocated for them).
    pub fn vet(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(invalid(
                path,
                format!("virtual size {} is absurd", self.size),
            ));
        }
        self.require_plain(path)?;
        if self.incompatible_features & INCOMPAT_COMPRESSION != 0
            && self.compression == Compression::Zlib
        {
            return Err(invalid(
                path,
                "compression type bit set but compression type is zlib",
            ));
        }
        if !self.extensions_end {
            return Err(invalid(path, "header extensions have no end marker"));
        }
        let (l1_size, l1_offset) = (self.l1_size, self.l1_table_offset);
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("L1 table of {l1_size} entries exceeds the 32 MiB limit"),
            ));
        }
        if !l1_offset.is_multiple_of(cs) {
            return Err(invalid(
                path,
                format!("L1 table offset {l1_offset:#x} unaligned"),
            ));
        }
        if l1_size > 0
            && l1_offset
                .checked_add(l1_bytes)
                .is_none_or(|end| end > file_len)
        {
            return Err(invalid(path, format!(
                "L1 table ({l1_size} entries at {l1_offset:#x}) extends past the end of the file ({file_len} bytes)"
            )));
        }
        let l1_needed = self.size.div_ceil(cs).div_ceil(cs / 8);
        if u64::from(l1_size) < l1_needed {
            return Err(invalid(path, format!(
                "L1 table of {l1_size} entries is too small for virtual size {} (needs {l1_needed})",
                self.size
            )));
        }
        let (rt_clusters, rt_offset) = (self.refcount_table_clusters, self.refcount_table_offset);
        if rt_clusters == 0 {
            return Err(invalid(path, "no refcount table"));
        }
        let rt_bytes = u64::from(rt_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                path,
                format!("refcount table of {rt_clusters} clusters exceeds the 8 MiB limit"),
            ));
        }
        if !rt_offset.is_multiple_of(cs)
            || rt_offset
                .checked_add(rt_bytes)
                .is_none_or(|end| end > file_len)
        {
            return Err(invalid(path, format!(
                "refcount table ({rt_clusters} clusters at {rt_offset:#x}) lies outside the file ({file_len} bytes)"
            )));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                format!("{} snapshots is absurd", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0
            && (!self.snapshots_offset.is_multiple_of(cs) || self.snapshots_offset >= file_len)
        {
            return Err(invalid(
                path,
                format!(
                    "snapshot table offset {:#x} is invalid",
                    self.snapshots_offset
                ),
            ));
        }
        Ok(())
    }

    /// Refuse what the header says imago cannot safely open: the corrupt bit
    /// (repair is `check`'s job). A dirty image is read as is, and its
    /// refcounts are rebuilt before a read-write open (see `Qcow2Image::open`).
    pub(crate) fn check_openable(&self, path: &Path) -> Result<()> {
        if self.is_corrupt() {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: "the image is marked corrupt; check and repair it first".into(),
            });
        }
        Ok(())
    }

    /// Before a read-write open: the refcount table must make sense, because
    /// imago's allocator trusts it (a missing or out-of-file refcount block
    /// sends it into unbounded recursion). Every entry must be aligned and lie
    /// inside the file, and the block covering the header must exist.
    pub(crate) fn check_refcount_table(&self, path: &Path, file: &File) -> Result<()> {
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        let cs = self.cluster_size();
        let mut rt = vec![0u8; (u64::from(self.refcount_table_clusters) * cs) as usize];
        let got = read_upto(file, &mut rt, self.refcount_table_offset)
            .map_err(|e| Error::io(path, "read refcount table", e))?;
        rt.truncate(got);
        for (i, e) in rt.chunks_exact(8).enumerate() {
            let v = be64(e, 0);
            let off = v & REFT_OFFSET_MASK;
            if v & 511 != 0
                || !off.is_multiple_of(cs)
                || (off != 0 && off.saturating_add(cs) > file_len)
            {
                return Err(invalid(
                    path,
                    format!("refcount table entry {i} ({v:#x}) is not a cluster inside the file"),
                ));
            }
            if i == 0 && off == 0 {
                return Err(invalid(path, "no refcount block covers the header"));
            }
        }
        Ok(())
    }
}
