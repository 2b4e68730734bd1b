//! Read access to every piece of qcow2 metadata as it is on disk, with
//! limits against hostile input: for `check`/repair and compaction, which
//! must see tables imago would hide or refuse. The header is parsed but not
//! vetted ([`Qcow2Header::vet`] is for opening), so broken images can be
//! inspected.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::{read_compressed_cluster, CompressedDescriptor};
use super::header::Qcow2Header;
use super::spec::*;
use super::tables::{decode_refcounts, decode_table, L2Entry};
use crate::host::read_or_zero;
use crate::{Error, Result};

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
        let header = Qcow2Header::read(path, &file)?;
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
        self.header.require_plain(&self.path)
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
        Ok(decode_table(&buf))
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
        Ok(decode_table(&buf))
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
        Ok(decode_table(&buf))
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
                read_or_zero(&self.file, buf, offset)
                    .map_err(|e| Error::io(&self.path, "read data cluster", e))?;
                Ok(true)
            }
            L2Entry::Compressed { offset, size, .. } => {
                let d = CompressedDescriptor { offset, size };
                read_compressed_cluster(&self.file, &self.path, d, self.header.compression, buf)?;
                Ok(true)
            }
        }
    }
}
