//! Refcount rebuild: recount every host cluster from what the metadata
//! references and write fresh refcount structures, as `qemu-img check -r all`
//! does for a dirty (lazy-refcounts) image.
//!
//! Used by a read-write open that finds the dirty bit set and by
//! [`crate::check`] with [`crate::RepairMode::All`]. The old refcount table
//! and blocks are never read: after a crash they may hold anything. The new
//! ones are appended after the last referenced cluster, made durable, and only
//! then does one header write (reftable pointer and the dirty bit cleared, in
//! one sector) switch to them. A crash during a rebuild leaves the old pointer
//! and the dirty bit, so the next open rebuilds again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::meta::Qcow2Meta;
use super::spec::{
    be64, put32, put64, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_REFTABLE_BYTES,
    OFLAG_COMPRESSED, OFLAG_COPIED,
};
use super::tables::{encode_refcounts, L2Entry};
use crate::{Error, Result};

/// Most host clusters a rebuild will count (2^28: 16 TiB at 64 KiB clusters,
/// 1 GiB of counters), the same bound as `check`.
const MAX_CLUSTERS: u64 = 1 << 28;

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rebuilt {
    /// Host clusters in use after the rebuild (metadata and data).
    pub clusters_in_use: u64,
    /// L1/L2 entries whose COPIED flag was corrected.
    pub copied_fixed: u64,
    /// Refcount blocks written.
    pub refblocks: u64,
}

/// References to every host cluster, counted from the metadata.
struct Refs {
    cs: u64,
    counts: Vec<u32>,
}

impl Refs {
    fn add(&mut self, path: &Path, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset.saturating_add(len) - 1) / self.cs;
        if last >= MAX_CLUSTERS {
            return Err(corrupt(
                path,
                format!("{what} at {offset:#x} lies beyond any sane file size"),
            ));
        }
        if self.counts.len() as u64 <= last {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            if let Some(n) = self.counts.get_mut(c as usize) {
                *n = n.saturating_add(1);
            }
        }
        Ok(())
    }

    fn get(&self, cluster: u64) -> u32 {
        usize::try_from(cluster)
            .ok()
            .and_then(|i| self.counts.get(i).copied())
            .unwrap_or(0)
    }
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("refcount rebuild: {reason}"),
    }
}

/// Count the references of one L1 table and its L2 tables. With `fix`
/// (the active table, after all counting is done), also collect the COPIED
/// corrections: `(host offset of the entry, corrected entry)`.
fn count_l1(
    meta: &Qcow2Meta,
    refs: &mut Refs,
    l1_offset: u64,
    l1_size: u32,
    what: &str,
) -> Result<()> {
    let path = meta.path();
    let cs = refs.cs;
    refs.add(
        path,
        l1_offset,
        u64::from(l1_size) * 8,
        &format!("{what} L1 table"),
    )?;
    let l1 = meta.read_l1(l1_offset, l1_size)?;
    let bits = meta.header().cluster_bits;
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            return Err(corrupt(
                path,
                format!("{what} L2 table {i} at {l2:#x} unaligned"),
            ));
        }
        refs.add(path, l2, cs, &format!("{what} L2 table {i}"))?;
        for raw in meta.read_l2(l2)? {
            match L2Entry::decode(raw, bits) {
                L2Entry::Unallocated | L2Entry::Zero => {}
                L2Entry::Compressed { offset, size, .. } => {
                    refs.add(path, offset, size, "compressed cluster")?
                }
                L2Entry::Normal { offset, .. } | L2Entry::ZeroAllocated { offset, .. } => {
                    if !offset.is_multiple_of(cs) {
                        return Err(corrupt(
                            path,
                            format!("{what} L2 table {i}: data cluster {offset:#x} unaligned"),
                        ));
                    }
                    refs.add(path, offset, cs, "data cluster")?
                }
            }
        }
    }
    Ok(())
}

/// Count every reference of the image except its refcount structures.
fn count_all(meta: &Qcow2Meta) -> Result<Refs> {
    let h = meta.header();
    let cs = h.cluster_size();
    let mut refs = Refs {
        cs,
        counts: vec![0; meta.file_len().div_ceil(cs).min(MAX_CLUSTERS) as usize],
    };
    let path = meta.path();
    refs.add(path, 0, cs, "header")?;
    count_l1(meta, &mut refs, h.l1_table_offset, h.l1_size, "active")?;
    let (snaps, table_bytes) = meta.snapshots()?;
    for s in &snaps {
        count_l1(
            meta,
            &mut refs,
            s.l1_table_offset,
            s.l1_size,
            &format!("snapshot {:?}", s.name),
        )?;
    }
    refs.add(path, h.snapshots_offset, table_bytes, "snapshot table")?;
    Ok(refs)
}

fn write_all(file: &File, path: &Path, buf: &[u8], at: u64, what: &'static str) -> Result<()> {
    file.write_all_at(buf, at)
        .map_err(|e| Error::io(path, what, e))
}

fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_data()
        .map_err(|e| Error::io(path, "fdatasync", e))
}

/// Rebuild the refcounts of the qcow2 image at `path` from its L1/L2 and
/// snapshot tables, fix COPIED flags, and clear the dirty bit.
///
/// Refuses (changing nothing) images whose tables cannot be read or point
/// to unaligned places: that is damage a recount cannot undo.
pub(crate) fn rebuild_refcounts(path: &Path) -> Result<Rebuilt> {
    let meta = Qcow2Meta::open(path, true)?;
    meta.require_plain()?;
    let h = meta.header().clone();
    if h.has_bitmaps() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: "rebuilding refcounts of images with persistent dirty bitmaps".into(),
        });
    }
    let cs = h.cluster_size();
    let mut refs = count_all(&meta)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open for refcount rebuild", e))?;
    let mut out = Rebuilt::default();

    // COPIED must say "refcount is exactly one" in the active tables (a crash
    // after a freed cluster was reused can leave two references to one).
    let l1 = meta.active_l1()?;
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let want = refs.get(l2 / cs) == 1;
        if (e & OFLAG_COPIED != 0) != want {
            let fixed = if want {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            let at = h.l1_table_offset + i as u64 * 8;
            write_all(&file, path, &fixed.to_be_bytes(), at, "fix L1 COPIED flag")?;
            out.copied_fixed += 1;
        }
        let mut table = meta.read_l2(l2)?;
        let mut changed = false;
        for raw in table.iter_mut() {
            if *raw & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let host = *raw & L2E_OFFSET_MASK;
            if host == 0 {
                continue;
            }
            let want = refs.get(host / cs) == 1;
            if (*raw & OFLAG_COPIED != 0) != want {
                *raw = if want {
                    *raw | OFLAG_COPIED
                } else {
                    *raw & !OFLAG_COPIED
                };
                changed = true;
                out.copied_fixed += 1;
            }
        }
        if changed {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            write_all(&file, path, &bytes, l2, "fix L2 COPIED flags")?;
        }
    }

    // New refcount structures after everything referenced (and after the
    // end of the file): `nb` blocks, then a table of `rt` clusters, sized so
    // that the blocks also cover themselves and the table.
    let per_block = cs * 8 / u64::from(h.refcount_bits());
    let used_end = refs
        .counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(1, |i| i as u64 + 1);
    let first = used_end.max(meta.file_len().div_ceil(cs));
    let (mut nb, mut rt) = (1u64, 1u64);
    loop {
        let total = first + nb + rt;
        let nb2 = total.div_ceil(per_block);
        let rt2 = (nb2 * 8).div_ceil(cs);
        if (nb2, rt2) == (nb, rt) {
            break;
        }
        (nb, rt) = (nb2.max(nb), rt2.max(rt));
    }
    if rt * cs > MAX_REFTABLE_BYTES {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: format!("a refcount table of {rt} clusters"),
        });
    }
    refs.add(path, first * cs, (nb + rt) * cs, "new refcount structures")?;
    let max = if h.refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << h.refcount_bits()) - 1
    };
    let mut table = vec![0u8; (rt * cs) as usize];
    for b in 0..nb {
        let start = b * per_block;
        let counts: Vec<u64> = (start..start + per_block)
            .map(|c| u64::from(refs.get(c)).min(max))
            .collect();
        let block = encode_refcounts(&counts, h.refcount_order, cs as usize);
        let at = (first + b) * cs;
        write_all(&file, path, &block, at, "write refcount block")?;
        if let Some(dst) = table.get_mut((b * 8) as usize..(b * 8 + 8) as usize) {
            dst.copy_from_slice(&at.to_be_bytes());
        }
    }
    let rt_at = (first + nb) * cs;
    write_all(&file, path, &table, rt_at, "write refcount table")?;
    sync(&file, path)?;

    // One write inside the first sector switches to the new structures and
    // clears the dirty bit: reftable offset (48), clusters (56), and for v3
    // the incompatible features (72).
    let mut hdr = [0u8; 32];
    file.read_exact_at(&mut hdr, 48)
        .map_err(|e| Error::io(path, "read header", e))?;
    put64(&mut hdr, 0, rt_at);
    put32(&mut hdr, 8, rt as u32);
    let len = if h.version >= 3 {
        let inc = be64(&hdr, 24) & !INCOMPAT_DIRTY;
        put64(&mut hdr, 24, inc);
        32
    } else {
        12
    };
    write_all(&file, path, &hdr[..len], 48, "switch to rebuilt refcounts")?;
    sync(&file, path)?;
    out.clusters_in_use = refs.counts.iter().filter(|&&n| n > 0).count() as u64;
    out.refblocks = nb;
    Ok(out)
}
