//! `compact`: rewrite a qcow2 image with only its allocated non-zero
//! clusters, optionally compressed on all cores, and atomically replace it.
//!
//! The image keeps its backing file and its own clusters only (no
//! flattening). Byte ranges the caller declares unused (free space of the
//! file system inside, say) are dropped: they become unallocated, or zero
//! clusters when there is a backing file, so its data does not show through.
//! Images with internal snapshots or persistent bitmaps are refused: a fresh
//! layout would have to rewrite every snapshot's tables, and the point of
//! compaction (giving space back) is defeated by snapshots holding the old
//! clusters anyway.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::convert::{commit_output, new_output, qcow2_output};
use crate::host;
use crate::qcow2::{
    is_zero, thread_count, write_items, ClusterCompressor, Item, L2Entry, Qcow2Meta,
    Qcow2WriterOptions, L1E_OFFSET_MASK,
};
use crate::{ByteRange, Compression, Control, Error, Result};

/// Options of [`compact`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactOptions {
    /// Compress the clusters kept (zstd is the default choice; zlib for old
    /// readers). `None` stores them uncompressed.
    pub compression: Option<Compression>,
    /// Compression threads; 0 = all cores.
    pub threads: usize,
    /// Guest byte ranges whose content does not matter; afterwards they
    /// read as zeros.
    pub unused_ranges: Vec<ByteRange>,
}

/// What [`compact`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReport {
    /// Host bytes the image occupied before.
    pub bytes_before: u64,
    /// Host bytes it occupies after.
    pub bytes_after: u64,
    /// Clusters stored uncompressed.
    pub data_clusters: u64,
    /// Clusters stored compressed.
    pub compressed_clusters: u64,
    /// Clusters recorded as zero (hiding the backing file).
    pub zero_clusters: u64,
    /// Allocated clusters dropped because they held only zeros or were unused.
    pub dropped_clusters: u64,
}

/// Sorted, merged `[start, end)` ranges.
fn merge_ranges(ranges: &[ByteRange]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.len > 0)
        .map(|r| (r.offset, r.end()))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Rewrite the qcow2 image at `path` compactly and replace it atomically
/// (temporary file in the same directory, fsync, rename, fsync directory).
/// Cancellation through `control` leaves the original untouched.
pub fn compact(path: &Path, opts: &CompactOptions, control: &Control) -> Result<CompactReport> {
    let meta = Qcow2Meta::open(path, false)?;
    meta.require_plain()?;
    let h = meta.header().clone();
    let refuse = |feature: &str| Error::Unsupported {
        path: path.to_path_buf(),
        feature: feature.to_string(),
    };
    if h.nb_snapshots > 0 {
        return Err(refuse(
            "compacting an image with internal snapshots (delete them first: a fresh layout would drop them)",
        ));
    }
    if h.has_bitmaps() {
        return Err(refuse("compacting an image with persistent bitmaps"));
    }
    if h.is_corrupt() {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: "the corrupt bit is set; run check first".into(),
        });
    }
    let backing = h.backing(path)?;
    let has_backing = backing.is_some();
    let orig = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let bytes_before = host::allocated_bytes(&orig).map_err(|e| Error::io(path, "stat", e))?;
    let mode = orig
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .permissions()
        .mode()
        & 0o7777;
    drop(orig);

    let cs = h.cluster_size();
    let size = h.size;
    let unused = merge_ranges(&opts.unused_ranges);
    let temp = new_output(path)?;
    let mut w = qcow2_output(
        &temp,
        &Qcow2WriterOptions {
            size,
            cluster_size: cs,
            compression: opts.compression.unwrap_or(Compression::Zlib),
            backing,
        },
    )?;
    let mut compressors: Vec<ClusterCompressor> = match opts.compression {
        Some(k) => (0..thread_count(opts.threads))
            .map(|_| ClusterCompressor::new(k, cs as usize))
            .collect(),
        None => Vec::new(),
    };
    let l1 = meta.active_l1()?;
    let per_l2 = cs / 8;
    let guest_clusters = size.div_ceil(cs);
    let mut report = CompactReport {
        bytes_before,
        ..CompactReport::default()
    };
    let mut items: Vec<Item> = Vec::new();
    let mut pending = 0u64;
    let mut ui = 0usize; // first unused range that may still matter
    for (i, e) in l1.iter().enumerate() {
        let base = i as u64 * per_l2;
        if base >= guest_clusters {
            break;
        }
        let l2_off = e & L1E_OFFSET_MASK;
        let l2 = if l2_off == 0 {
            None
        } else {
            Some(meta.read_l2(l2_off)?)
        };
        let n = per_l2.min(guest_clusters - base);
        // Nothing allocated here, and nothing to hide: skip the whole table.
        if l2.is_none() && (!has_backing || unused.is_empty()) {
            continue;
        }
        for j in 0..n {
            let g = base + j;
            let raw = l2
                .as_ref()
                .and_then(|t| t.get(j as usize).copied())
                .unwrap_or(0);
            let entry = L2Entry::decode(raw, h.cluster_bits);
            let start = g * cs;
            let end = (start + cs).min(size);
            while unused.get(ui).is_some_and(|r| r.1 <= start) {
                ui += 1;
            }
            let fully_unused = unused.get(ui).is_some_and(|r| r.0 <= start && r.1 >= end);
            let allocated = !matches!(entry, L2Entry::Unallocated);
            if fully_unused {
                if allocated && !matches!(entry, L2Entry::Zero) {
                    report.dropped_clusters += 1;
                }
                if has_backing {
                    items.push(Item::Zero(g));
                }
                continue;
            }
            match entry {
                L2Entry::Unallocated => {}
                L2Entry::Zero | L2Entry::ZeroAllocated { .. } => {
                    if matches!(entry, L2Entry::ZeroAllocated { .. }) {
                        report.dropped_clusters += 1;
                    }
                    if has_backing {
                        items.push(Item::Zero(g));
                    }
                }
                L2Entry::Normal { .. } | L2Entry::Compressed { .. } => {
                    let mut buf = vec![0u8; cs as usize];
                    meta.read_cluster(entry, &mut buf)?;
                    buf.truncate((end - start) as usize);
                    // Zero the parts of the cluster declared unused.
                    let mut k = ui;
                    while let Some(&(rs, re)) = unused.get(k) {
                        if rs >= end {
                            break;
                        }
                        let a = rs.max(start) - start;
                        let b = re.min(end) - start;
                        if let Some(s) = buf.get_mut(a as usize..b as usize) {
                            s.fill(0);
                        }
                        k += 1;
                    }
                    if is_zero(&buf) {
                        report.dropped_clusters += 1;
                        if has_backing {
                            items.push(Item::Zero(g));
                        }
                    } else {
                        items.push(Item::Data(g, buf));
                        pending += cs;
                    }
                }
            }
            if pending >= 16 << 20 || items.len() >= 65536 {
                control.check(path, "compact")?;
                write_items(&mut w, &mut items, &mut compressors)?;
                pending = 0;
                control.report(g * cs, size);
            }
        }
    }
    control.check(path, "compact")?;
    write_items(&mut w, &mut items, &mut compressors)?;
    let (_, stats) = w.finish()?;
    control.check(path, "compact")?;
    report.data_clusters = stats.data_clusters;
    report.compressed_clusters = stats.compressed_clusters;
    report.zero_clusters = stats.zero_clusters;
    // Always durable: it replaces a file that was.
    report.bytes_after = commit_output(temp, path, mode, true, true)?;
    control.report(size, size);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;
    use crate::ByteRange;

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(&[
                ByteRange::new(10, 5),
                ByteRange::new(0, 4),
                ByteRange::new(12, 10),
                ByteRange::new(30, 0),
                ByteRange::new(4, 1)
            ]),
            vec![(0, 5), (10, 22)]
        );
    }
}
