//! L1/L2 tables and refcount blocks: decoding entries, and the one L1 -> L2
//! lookup every reader of on-disk tables uses.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::codec::CompressedDescriptor;
use super::header::Qcow2Header;
use super::spec::*;
use crate::host::read_upto;
use crate::{Error, Result};

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
            let d = CompressedDescriptor::decode(raw, cluster_bits);
            return L2Entry::Compressed {
                offset: d.offset,
                size: d.size,
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

/// Decode a refcount block of `2^order`-bit entries.
pub(crate) fn decode_refcounts(buf: &[u8], order: u32) -> Vec<u64> {
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

/// Encode refcounts of `2^order` bits into one refcount block of `block_len`
/// bytes (the inverse of [`decode_refcounts`]; values are truncated to the width).
pub(crate) fn encode_refcounts(counts: &[u64], order: u32, block_len: usize) -> Vec<u8> {
    let bits = 1usize << order.min(6);
    let mut out = vec![0u8; block_len];
    for (i, &v) in counts.iter().enumerate() {
        if bits < 8 {
            let per = 8 / bits;
            let mask = ((1u16 << bits) - 1) as u8;
            if let Some(b) = out.get_mut(i / per) {
                *b |= (v as u8 & mask) << ((i % per) * bits);
            }
        } else {
            let w = bits / 8;
            let be = v.to_be_bytes();
            if let (Some(dst), Some(src)) = (out.get_mut(i * w..(i + 1) * w), be.get(8 - w..)) {
                dst.copy_from_slice(src);
            }
        }
    }
    out
}

/// Where guest offset `guest` sits in the tables of an image with header
/// `h`: (L1 index, L2 index).
pub(crate) fn table_indices(h: &Qcow2Header, guest: u64) -> (u64, u64) {
    let cluster = guest >> h.cluster_bits;
    let per_l2 = h.cluster_size() / 8;
    (cluster / per_l2, cluster % per_l2)
}

/// Host offset of the L2 table behind L1 entry `l1_index` of `file` (at
/// `path`), read from disk; `None` if the entry is beyond the table or unset.
pub(crate) fn l2_table_offset(
    file: &File,
    path: &Path,
    h: &Qcow2Header,
    l1_index: u64,
) -> Result<Option<u64>> {
    if l1_index >= u64::from(h.l1_size) {
        return Ok(None);
    }
    let mut e = [0u8; 8];
    read_upto(file, &mut e, h.l1_table_offset + l1_index * 8)
        .map_err(|err| Error::io(path, "read L1", err))?;
    let off = u64::from_be_bytes(e) & L1E_OFFSET_MASK;
    Ok((off != 0).then_some(off))
}

/// The raw L2 entry for guest offset `guest`, read from disk (0 where no L2
/// table covers it).
pub(crate) fn l2_entry(file: &File, path: &Path, h: &Qcow2Header, guest: u64) -> Result<u64> {
    let (l1_index, l2_index) = table_indices(h, guest);
    let Some(l2) = l2_table_offset(file, path, h, l1_index)? else {
        return Ok(0);
    };
    let mut e = [0u8; 8];
    read_upto(file, &mut e, l2 + l2_index * 8).map_err(|err| Error::io(path, "read L2", err))?;
    Ok(u64::from_be_bytes(e))
}

/// Decode the raw bytes of an L1 or L2 table.
pub(crate) fn decode_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8).map(|c| be64(c, 0)).collect()
}
