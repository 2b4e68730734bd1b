//! `check`: verify a qcow2 image's refcounts against what its metadata
//! actually references, as `qemu-img check` does, and repair leaks.
//!
//! The expected refcount of every host cluster is rebuilt from the header,
//! the active L1/L2 tables (compressed clusters count once for every host
//! cluster their bytes touch), every internal snapshot's L1/L2 tables, the
//! snapshot table, the refcount table and the refcount blocks. A cluster
//! whose stored refcount is higher than its uses is a *leak* (space lost,
//! harmless); lower is a *corruption* (a later write could free or overwrite
//! data still in use). COPIED flags that disagree with the stored refcount
//! and misaligned or out-of-file offsets are corruptions as well.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::qcow2::{rebuild_refcounts, L1E_OFFSET_MASK, OFLAG_COPIED, REFT_OFFSET_MASK};
use crate::qcow2::{L2Entry, Qcow2Meta};
use crate::{detect_format, Error, Format, Result};

/// What [`check`] may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairMode {
    /// Only report.
    #[default]
    None,
    /// Lower refcounts that are higher than the uses found (frees leaked
    /// clusters). Corruptions are never repaired.
    Leaks,
    /// Rebuild all refcounts from the L1/L2 and snapshot tables (new
    /// refcount structures, COPIED flags corrected, dirty bit cleared), like
    /// `qemu-img check -r all`: repairs refcounts that are too low as well.
    All,
}

/// The result of [`check`], with the fields (and JSON names) of
/// `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The file checked.
    pub filename: String,
    /// Its format.
    pub format: Option<Format>,
    /// Whether the format has metadata to check (`false` for raw).
    pub checked: bool,
    /// Metadata that could not be read at all.
    pub check_errors: u64,
    /// Clusters whose stored refcount is higher than their uses.
    pub leaks: u64,
    /// Refcounts lower than uses, bad offsets, wrong COPIED flags.
    pub corruptions: u64,
    /// Leaks repaired in this run (the other counts are after repair).
    pub leaks_fixed: u64,
    /// Corruptions repaired in this run (only [`RepairMode::All`] repairs them).
    pub corruptions_fixed: u64,
    /// End of the last cluster in use (by refcount or by reference).
    pub image_end_offset: Option<u64>,
    /// Guest clusters of the virtual disk.
    pub total_clusters: Option<u64>,
    /// Guest clusters with host data (active image).
    pub allocated_clusters: Option<u64>,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    pub compressed_clusters: Option<u64>,
    /// One line for every problem found, in words.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.leaks == 0 && self.corruptions == 0
    }
}

/// Check the image at `path` (format detected from its magic), repairing
/// what `repair` allows. Raw images have nothing to check: the report says so
/// (`checked: false`) and is clean.
///
/// Images with persistent bitmaps are refused (their clusters would look
/// leaked); so are encrypted images and external data files.
pub fn check(path: &Path, repair: RepairMode) -> Result<CheckReport> {
    let format = detect_format(path)?;
    if format == Format::Raw {
        return Ok(CheckReport {
            filename: path.display().to_string(),
            format: Some(Format::Raw),
            checked: false,
            messages: vec!["raw images have no metadata to check".into()],
            ..CheckReport::default()
        });
    }
    // `-r all` rebuilds the refcounts, then checks as usual.
    if repair == RepairMode::All {
        let before = check(path, RepairMode::None)?;
        if before.is_clean() && !Qcow2Meta::open(path, false)?.header().is_dirty() {
            return Ok(before);
        }
        rebuild_refcounts(path)?;
        let mut after = check(path, RepairMode::None)?;
        after.leaks_fixed = before.leaks;
        after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        let mut messages = before.messages;
        messages.push("Refcounts rebuilt from the L1/L2 and snapshot tables".into());
        messages.append(&mut after.messages);
        after.messages = messages;
        return Ok(after);
    }
    let meta = Qcow2Meta::open(path, repair != RepairMode::None)?;
    meta.require_plain()?;
    if meta.header().has_bitmaps() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: "checking images with persistent dirty bitmaps".into(),
        });
    }
    let mut report = run(&meta, repair)?;
    if report.leaks_fixed > 0 {
        meta.sync()?;
        // Report the state after repair, as qemu-img does.
        let meta = Qcow2Meta::open(path, false)?;
        let fixed = report.leaks_fixed;
        let mut messages = std::mem::take(&mut report.messages);
        report = run(&meta, RepairMode::None)?;
        report.leaks_fixed = fixed;
        messages.append(&mut report.messages);
        report.messages = messages;
    }
    Ok(report)
}

/// Expected refcounts being rebuilt, with the report they feed.
struct Counter<'a> {
    meta: &'a Qcow2Meta,
    cs: u64,
    refs: Vec<u16>,
    report: CheckReport,
}

impl Counter<'_> {
    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(format!("ERROR {msg}"));
    }

    fn check_error(&mut self, msg: String) {
        self.report.check_errors += 1;
        self.report.messages.push(format!("ERROR {msg}"));
    }

    /// Count one use of every cluster touched by `[offset, offset+size)`.
    fn inc(&mut self, offset: u64, size: u64, what: &str) {
        if size == 0 {
            return;
        }
        let file_len = self.meta.file_len();
        let end = offset.saturating_add(size);
        // The last cluster may be partly past EOF; a whole cluster past EOF is not.
        if end.saturating_sub(file_len) >= self.cs {
            self.corrupt(format!(
                "{what} at {offset:#x} ({size} bytes) extends beyond the end of the file by one cluster or more"
            ));
            return;
        }
        let first = offset / self.cs;
        let last = (end - 1) / self.cs;
        for c in first..=last {
            let Ok(i) = usize::try_from(c) else { return };
            if self.refs.len() <= i {
                self.refs.resize(i + 1, 0);
            }
            if let Some(r) = self.refs.get_mut(i) {
                *r = r.saturating_add(1);
            }
        }
    }

    fn count(&self, cluster: u64) -> u16 {
        usize::try_from(cluster)
            .ok()
            .and_then(|i| self.refs.get(i).copied())
            .unwrap_or(0)
    }

    /// Count an L1 table and everything it references.
    fn l1(&mut self, offset: u64, entries: u32, active: bool, what: &str) {
        let bytes = u64::from(entries) * 8;
        self.inc(offset, bytes, &format!("{what} L1 table"));
        let l1 = match self.meta.read_l1(offset, entries) {
            Ok(t) => t,
            Err(e) => {
                self.check_error(format!("cannot read {what} L1 table: {e}"));
                return;
            }
        };
        let cluster_bits = self.meta.header().cluster_bits;
        for (i, e) in l1.iter().enumerate() {
            if *e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.corrupt(format!("{what} L1 entry {i} has reserved bits set: {e:#x}"));
            }
            let l2_off = e & L1E_OFFSET_MASK;
            self.inc(l2_off, self.cs, &format!("{what} L2 table {i}"));
            if !l2_off.is_multiple_of(self.cs) {
                self.corrupt(format!(
                    "{what} L2 table {i} offset {l2_off:#x} is not cluster aligned"
                ));
            }
            let l2 = self.read_l2_lenient(l2_off);
            // Fragmentation is counted per L2 table, as qemu-img does.
            let mut next_contiguous = 0u64;
            for (j, raw) in l2.iter().enumerate() {
                let entry = L2Entry::decode(*raw, cluster_bits);
                if !matches!(entry, L2Entry::Compressed { .. }) && raw & L2E_STD_RESERVED_MASK != 0
                {
                    self.corrupt(format!(
                        "{what} L2 table {i} entry {j} has reserved bits set: {raw:#x}"
                    ));
                }
                match entry {
                    L2Entry::Unallocated | L2Entry::Zero => {}
                    L2Entry::Compressed {
                        offset,
                        size,
                        copied,
                    } => {
                        if copied {
                            self.corrupt(format!(
                                "{what} L2 table {i} entry {j}: compressed cluster has the COPIED flag"
                            ));
                        }
                        self.inc(offset, size, "compressed cluster");
                        if active {
                            bump(&mut self.report.allocated_clusters);
                            bump(&mut self.report.compressed_clusters);
                            // Compressed clusters count as fragmented, as in qemu-img.
                            bump(&mut self.report.fragmented_clusters);
                        }
                    }
                    L2Entry::Normal { offset, .. } | L2Entry::ZeroAllocated { offset, .. } => {
                        if !offset.is_multiple_of(self.cs) {
                            self.corrupt(format!(
                                "{what} L2 table {i} entry {j}: data cluster offset {offset:#x} is not cluster aligned"
                            ));
                        }
                        if active {
                            bump(&mut self.report.allocated_clusters);
                            if next_contiguous != 0 && offset != next_contiguous {
                                bump(&mut self.report.fragmented_clusters);
                            }
                            next_contiguous = offset.saturating_add(self.cs);
                        }
                        self.inc(offset, self.cs, "data cluster");
                    }
                }
            }
        }
    }

    /// An L2 table as qemu-img reads it: bytes past the end of the file read
    /// as zeros.
    fn read_l2_lenient(&mut self, offset: u64) -> Vec<u64> {
        let avail = self.meta.file_len().saturating_sub(offset).min(self.cs);
        let mut bytes = if avail == 0 {
            Vec::new()
        } else {
            match self.meta.read_bytes(offset, avail, "L2 table") {
                Ok(b) => b,
                Err(e) => {
                    self.check_error(format!("cannot read L2 table at {offset:#x}: {e}"));
                    Vec::new()
                }
            }
        };
        bytes.resize(self.cs as usize, 0);
        bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect()
    }
}

fn bump(v: &mut Option<u64>) {
    *v = Some(v.unwrap_or(0) + 1);
}

/// Most host clusters [`check`] will count (2^28: 16 TiB at 64 KiB clusters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// Reserved bits of an L1 entry.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Stored refcounts, read block by block through the refcount table.
struct Stored<'a> {
    meta: &'a Qcow2Meta,
    table: Vec<u64>,
    per_block: u64,
    cached: Option<(u64, Option<Vec<u64>>)>,
}

impl Stored<'_> {
    /// The stored refcount of `cluster`, `Err` if its block is unreadable.
    fn get(&mut self, cluster: u64) -> std::result::Result<u64, String> {
        let bi = cluster / self.per_block;
        let Some(entry) = usize::try_from(bi).ok().and_then(|i| self.table.get(i)) else {
            return Ok(0);
        };
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if self.cached.as_ref().map(|(b, _)| *b) != Some(bi) {
            let block = self.meta.read_refcount_block(off).ok();
            self.cached = Some((bi, block));
        }
        match &self.cached {
            Some((_, Some(block))) => Ok(block
                .get((cluster % self.per_block) as usize)
                .copied()
                .unwrap_or(0)),
            _ => Err(format!("cannot read refcount block {bi} at {off:#x}")),
        }
    }

    fn block_offset(&self, cluster: u64) -> Option<u64> {
        let bi = usize::try_from(cluster / self.per_block).ok()?;
        let off = self.table.get(bi)? & REFT_OFFSET_MASK;
        (off != 0).then_some(off)
    }
}

fn run(meta: &Qcow2Meta, repair: RepairMode) -> Result<CheckReport> {
    let h = meta.header().clone();
    let cs = h.cluster_size();
    let nb_clusters = meta.file_len().div_ceil(cs);
    // One counter per host cluster (as qemu-img does), so refuse files whose
    // length would make that table absurd (a sparse file of many TiB).
    if nb_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Unsupported {
            path: meta.path().to_path_buf(),
            feature: format!(
                "checking a file of {} host clusters (limit {MAX_CHECK_CLUSTERS})",
                nb_clusters
            ),
        });
    }
    let mut c = Counter {
        meta,
        cs,
        refs: vec![0; usize::try_from(nb_clusters).unwrap_or(0)],
        report: CheckReport {
            filename: meta.path().display().to_string(),
            format: Some(Format::Qcow2),
            checked: true,
            total_clusters: Some(h.size.div_ceil(cs)),
            ..CheckReport::default()
        },
    };
    if h.size > 0 {
        c.report.allocated_clusters = Some(0);
        c.report.fragmented_clusters = Some(0);
        c.report.compressed_clusters = Some(0);
    }
    c.inc(0, cs, "header");
    c.l1(h.l1_table_offset, h.l1_size, true, "active");
    match meta.snapshots() {
        Ok((snaps, table_bytes)) => {
            for s in &snaps {
                c.l1(
                    s.l1_table_offset,
                    s.l1_size,
                    false,
                    &format!("snapshot {:?}", s.name),
                );
            }
            c.inc(h.snapshots_offset, table_bytes, "snapshot table");
        }
        Err(e) => c.check_error(format!("cannot read snapshot table: {e}")),
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    c.inc(h.refcount_table_offset, rt_bytes, "refcount table");
    let table = match meta.refcount_table() {
        Ok(t) => t,
        Err(e) => {
            c.check_error(format!("cannot read refcount table: {e}"));
            Vec::new()
        }
    };
    for (i, e) in table.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if e & REFT_RESERVED_MASK != 0 {
            c.corrupt(format!("refcount table entry {i} has reserved bits set"));
            continue;
        }
        if !off.is_multiple_of(cs) {
            c.corrupt(format!(
                "refcount block {i} offset {off:#x} is not cluster aligned"
            ));
            continue;
        }
        if off / cs >= nb_clusters {
            c.corrupt(format!(
                "refcount block {i} at {off:#x} is beyond the end of the file"
            ));
            continue;
        }
        if off == 0 {
            continue;
        }
        c.inc(off, cs, "refcount block");
        let n = c.count(off / cs);
        if n != 1 {
            c.corrupt(format!(
                "refcount block {i} at {off:#x} is referenced {n} times"
            ));
        }
    }

    let mut stored = Stored {
        meta,
        table,
        per_block: meta.refcounts_per_block(),
        cached: None,
    };
    let mut highest: Option<u64> = None;
    let upto = nb_clusters.max(c.refs.len() as u64);
    for i in 0..upto {
        let expected = u64::from(c.count(i));
        let on_disk = match stored.get(i) {
            Ok(r) => r,
            Err(msg) => {
                c.check_error(format!("cluster {i}: {msg}"));
                continue;
            }
        };
        if on_disk > 0 || expected > 0 {
            highest = Some(i);
        }
        if on_disk == expected {
            continue;
        }
        if on_disk > expected {
            if repair == RepairMode::Leaks {
                if let Some(block) = stored.block_offset(i) {
                    meta.write_refcount(block, i % stored.per_block, expected)?;
                    stored.cached = None;
                    c.report.leaks_fixed += 1;
                    c.report.messages.push(format!(
                        "Repairing cluster {i} refcount={on_disk} reference={expected}"
                    ));
                    continue;
                }
            }
            c.report.leaks += 1;
            c.report.messages.push(format!(
                "Leaked cluster {i} refcount={on_disk} reference={expected}"
            ));
        } else {
            c.corrupt(format!(
                "cluster {i} refcount={on_disk} reference={expected}"
            ));
        }
    }
    c.report.image_end_offset = Some(highest.map_or(0, |h| (h + 1) * cs));

    // COPIED flags of the active tables must say "refcount is exactly one".
    if let Ok(l1) = meta.active_l1() {
        for (i, e) in l1.iter().enumerate() {
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let Ok(r) = stored.get(l2_off / cs) else {
                continue;
            };
            let copied = e & OFLAG_COPIED != 0;
            if (r == 1) != copied {
                c.corrupt(format!(
                    "OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount={r}"
                ));
            }
            let Ok(l2) = meta.read_l2(l2_off) else {
                continue;
            };
            for raw in l2 {
                let (offset, copied) = match L2Entry::decode(raw, h.cluster_bits) {
                    L2Entry::Normal { offset, copied }
                    | L2Entry::ZeroAllocated { offset, copied } => (offset, copied),
                    _ => continue,
                };
                let Ok(r) = stored.get(offset / cs) else {
                    continue;
                };
                if (r == 1) != copied {
                    c.corrupt(format!(
                        "OFLAG_COPIED data cluster: l2_entry={raw:#x} refcount={r}"
                    ));
                }
            }
        }
    }
    Ok(c.report)
}
