//! Filesystem geometry (as `mke2fs` computes it) and the block-range allocator.

use std::collections::BTreeMap;

use crate::ext4::group::SuperBackups;
use crate::{Error, Result};

/// Inode size in bytes (the only one vmvol writes).
pub(crate) const INODE_SIZE: u32 = 256;
/// First non-reserved inode.
pub(crate) const FIRST_INO: u32 = 11;
/// Groups per flex group (`mke2fs` default).
pub(crate) const FLEX_GROUPS: u32 = 16;
/// Largest initialised extent length in blocks.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;

/// Geometry of a filesystem to be made.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub block_size: u32,
    pub first_data_block: u64,
    pub blocks_count: u64,
    pub blocks_per_group: u32,
    pub groups: u32,
    pub inodes_per_group: u32,
    pub inode_blocks_per_group: u32,
    pub desc_blocks: u64,
    pub reserved_gdt: u32,
    pub resize_inode: bool,
}

/// `ext2fs_default_journal_size`: journal blocks for a filesystem of `blocks` blocks.
pub(crate) fn default_journal_blocks(blocks: u64) -> Option<u64> {
    Some(match blocks {
        0..2048 => return None,
        2048..32768 => 1024,
        32768..262144 => 4096,
        262144..524288 => 8192,
        524288..4194304 => 16384,
        4194304..8388608 => 32768,
        8388608..16777216 => 65536,
        16777216..33554432 => 131072,
        _ => 262144,
    })
}

/// Superblock backups of the filesystems vmvol writes (`sparse_super`, as
/// `mke2fs -t ext4` by default).
pub(crate) const SUPER_BACKUPS: SuperBackups = SuperBackups::Sparse;

/// Whether group `g` of a filesystem vmvol writes holds a superblock backup.
pub(crate) fn has_super(g: u32) -> bool {
    SUPER_BACKUPS.has_super(u64::from(g))
}

impl Geometry {
    /// Compute the geometry for a device of `size` bytes.
    pub fn compute(size: u64, block_size: u32, inode_ratio: u32) -> Result<Self> {
        if !matches!(block_size, 1024 | 2048 | 4096) {
            return Err(Error::invalid(format!(
                "block size {block_size} is not 1024, 2048 or 4096"
            )));
        }
        if inode_ratio < block_size || inode_ratio > 64 * 1024 * 1024 {
            return Err(Error::invalid(format!(
                "inode ratio {inode_ratio} must be between the block size {block_size} and 64 MiB"
            )));
        }
        let bs = u64::from(block_size);
        let first = u64::from(block_size == 1024);
        let bpg = 8 * bs;
        let mut blocks = size / bs;
        if blocks >= 1 << 36 {
            return Err(Error::invalid(format!(
                "size {size} is too large: at most 2^36 blocks are supported"
            )));
        }
        let descs_per_block = bs / 64;
        let ipb = bs / u64::from(INODE_SIZE);
        loop {
            if blocks < first + 64 {
                return Err(Error::invalid(format!(
                    "size {size} is too small for an ext4 filesystem with {block_size}-byte blocks"
                )));
            }
            let groups = (blocks - first).div_ceil(bpg);
            let desc_blocks = groups.div_ceil(descs_per_block);
            let mut resize_inode = blocks <= u64::from(u32::MAX);
            let mut rsv = 0u64;
            if resize_inode {
                let max_blocks = if blocks < u64::from(u32::MAX) / 1024 {
                    blocks * 1024
                } else {
                    u64::from(u32::MAX)
                };
                let rsv_groups = (max_blocks - first).div_ceil(bpg);
                rsv = rsv_groups
                    .div_ceil(descs_per_block)
                    .saturating_sub(desc_blocks)
                    .min(bs / 4);
                if rsv == 0 {
                    resize_inode = false;
                }
            }
            let inodes = (u128::from(blocks) * u128::from(bs) / u128::from(inode_ratio))
                .min(u128::from(u32::MAX)) as u64;
            let step = ipb.max(8);
            let mut ipg = inodes.div_ceil(groups).max(16).div_ceil(step) * step;
            let max_ipg = bpg.min(65536 - ipb);
            ipg = ipg.min(max_ipg / step * step);
            while ipg * groups > u64::from(u32::MAX) {
                ipg -= step;
            }
            let itb = ipg * u64::from(INODE_SIZE) / bs;
            if 1 + desc_blocks + rsv + 64 > bpg {
                return Err(Error::invalid(format!(
                    "size {size} needs {groups} block groups, too many for {block_size}-byte blocks: use larger blocks"
                )));
            }
            if 3 + itb + rsv + desc_blocks > bpg {
                return Err(Error::invalid(format!(
                    "inode ratio {inode_ratio} asks for more inodes than fit in a group"
                )));
            }
            let last = (groups - 1) as u32;
            let mut overhead = 2 + itb;
            if has_super(last) {
                overhead += 1 + desc_blocks + rsv;
            }
            let rem = (blocks - first) % bpg;
            if groups == 1 && rem != 0 && rem < overhead {
                return Err(Error::invalid(format!("size {size} is too small")));
            }
            if rem != 0 && rem < overhead + 50 {
                blocks -= rem;
                continue;
            }
            let groups = u32::try_from(groups)
                .map_err(|_| Error::invalid(format!("size {size}: too many block groups")))?;
            return Ok(Geometry {
                block_size,
                first_data_block: first,
                blocks_count: blocks,
                blocks_per_group: bpg as u32,
                groups,
                inodes_per_group: ipg as u32,
                inode_blocks_per_group: itb as u32,
                desc_blocks,
                reserved_gdt: rsv as u32,
                resize_inode,
            });
        }
    }

    pub fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }

    pub fn group_first(&self, g: u32) -> u64 {
        self.first_data_block + u64::from(g) * u64::from(self.blocks_per_group)
    }

    /// Blocks in group `g` (the last one may be short).
    pub fn group_len(&self, g: u32) -> u64 {
        let start = self.group_first(g);
        (self.blocks_count - start).min(u64::from(self.blocks_per_group))
    }

    /// Superblock + descriptors + reserved descriptors at the start of group `g`.
    pub fn base_meta(&self, g: u32) -> u64 {
        if has_super(g) {
            1 + self.desc_blocks + u64::from(self.reserved_gdt)
        } else {
            0
        }
    }

    pub fn inodes_count(&self) -> u64 {
        u64::from(self.inodes_per_group) * u64::from(self.groups)
    }

    pub fn log_block(&self) -> u32 {
        self.block_size.trailing_zeros() - 10
    }
}

/// Used block ranges, kept merged: start -> end (exclusive).
#[derive(Debug, Default)]
pub(crate) struct Used {
    map: BTreeMap<u64, u64>,
    pub total: u64,
}

impl Used {
    /// Mark `[start, start+len)` used. Overlap is an internal error.
    pub fn mark(&mut self, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = start + len;
        if let Some((&s, &e)) = self.map.range(..end).next_back() {
            if e > start {
                return Err(Error::corrupt(format!(
                    "internal: blocks {start}..{end} overlap used {s}..{e}"
                )));
            }
        }
        let mut new_start = start;
        let mut new_end = end;
        if let Some((&s, &e)) = self.map.range(..start + 1).next_back() {
            if e == start {
                new_start = s;
                self.map.remove(&s);
            }
        }
        if let Some(&e) = self.map.get(&end) {
            new_end = e;
            self.map.remove(&end);
        }
        self.map.insert(new_start, new_end);
        self.total += len;
        Ok(())
    }

    /// First free run at or after `goal` below `limit`, at most `want` long
    /// (exactly `want` if `contiguous`).
    pub fn find_free(
        &self,
        goal: u64,
        want: u64,
        limit: u64,
        contiguous: bool,
    ) -> Option<(u64, u64)> {
        let mut pos = goal;
        if let Some((_, &e)) = self.map.range(..pos + 1).next_back() {
            if e > pos {
                pos = e;
            }
        }
        loop {
            if pos >= limit {
                return None;
            }
            let next_used = self
                .map
                .range(pos..)
                .next()
                .map(|(&s, &e)| (s, e))
                .unwrap_or((limit, limit));
            let free_end = next_used.0.min(limit);
            let avail = free_end - pos;
            if avail > 0 && (!contiguous || avail >= want) {
                return Some((pos, avail.min(want)));
            }
            pos = next_used.1;
        }
    }

    /// Used ranges intersecting `[start, end)`, clipped.
    pub fn ranges_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self
            .map
            .range(..start + 1)
            .next_back()
            .filter(|(_, &e)| e > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.map
            .range(first..end)
            .map(move |(&s, &e)| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn geometry_matches_mke2fs_1g() {
        let g = Geometry::compute(1 << 30, 4096, 16384).unwrap();
        assert_eq!(g.groups, 8);
        assert_eq!(g.inodes_per_group, 8192);
        assert_eq!(g.reserved_gdt, 127);
        assert_eq!(default_journal_blocks(g.blocks_count), Some(8192));
    }

    #[test]
    fn used_merge_and_find() {
        let mut u = Used::default();
        u.mark(10, 5).unwrap();
        u.mark(15, 5).unwrap();
        u.mark(30, 10).unwrap();
        assert!(u.mark(12, 1).is_err());
        assert_eq!(u.find_free(0, 100, 1000, false), Some((0, 10)));
        assert_eq!(u.find_free(12, 10, 1000, true), Some((20, 10)));
        assert_eq!(u.find_free(12, 11, 1000, true), Some((40, 11)));
        assert_eq!(u.find_free(995, 10, 1000, true), None);
        assert_eq!(u.find_free(12, 10, 1000, false), Some((20, 10)));
        assert_eq!(
            u.ranges_in(12, 35).collect::<Vec<_>>(),
            vec![(12, 20), (30, 35)]
        );
        assert_eq!(u.total, 20);
    }
}
