//! `qemu-img map` emulation for [`Qcow2Image`]: the same extents, depths,
//! flags, offsets and merging QEMU reports, including its view of
//! metadata-preallocated images (holes inside data clusters show as zero).

use std::os::unix::fs::MetadataExt;

use imago::{FormatAccess, ShallowMapping};

use super::image::{im_err, Layer, Qcow2Image};
use super::spec::*;
use super::storage::HStore;
use super::tables::{decode_refcounts, decode_table, l2_table_offset, table_indices};
use crate::host::{extent_at, read_or_zero, read_upto};
use crate::map::{merge_extents, MapExtent};
use crate::{Error, Format, Result};

impl Qcow2Image {
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
                            let (host_data, run) = extent_at(&l.file, host, end)
                                .map_err(|e| Error::io(&l.path, "seek data", e))?;
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
    let per_block = cs * 8 / (1u64 << h.refcount_order);
    let mut rt = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
    let got = read_upto(&layer.file, &mut rt, h.refcount_table_offset)
        .map_err(|e| Error::io(&layer.path, "read refcount table", e))?;
    rt.truncate(got);
    let mut count = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (i, off) in decode_table(&rt).into_iter().enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let off = off & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        read_or_zero(&layer.file, &mut block, off)
            .map_err(|e| Error::io(&layer.path, "read refcount block", e))?;
        let n = per_block.min(end_cluster - first) as usize;
        let refs = decode_refcounts(&block, h.refcount_order);
        count += refs.iter().take(n).filter(|&&r| r != 0).count() as u64;
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
        let (l1_index, l2_index) = table_indices(h, guest);
        let Some(l2_off) = l2_table_offset(&layer.file, &layer.path, h, l1_index)? else {
            return Ok((None, run));
        };
        let key = (std::ptr::from_ref(layer) as u64, l2_off);
        if self.key != Some(key) {
            let mut buf = vec![0u8; cs as usize];
            read_or_zero(&layer.file, &mut buf, l2_off)
                .map_err(|err| Error::io(&layer.path, "read L2", err))?;
            self.table = decode_table(&buf);
            self.key = Some(key);
        }
        let entry = self.table.get(l2_index as usize).copied().unwrap_or(0);
        let host = entry & L2E_OFFSET_MASK;
        if entry & OFLAG_COMPRESSED != 0 || host == 0 {
            Ok((None, run))
        } else {
            Ok((Some(host + in_cluster), run))
        }
    }
}
