//! Block groups: which groups hold superblock backups (`sparse_super`,
//! `sparse_super2`), the group descriptor layout (kernel
//! `struct ext4_group_desc`) and its checksum.

use super::csum::{crc16, crc32c};

// Group descriptor field offsets.
pub(crate) const BG_BLOCK_BITMAP_LO: usize = 0x0;
pub(crate) const BG_INODE_BITMAP_LO: usize = 0x4;
pub(crate) const BG_INODE_TABLE_LO: usize = 0x8;
pub(crate) const BG_FREE_BLOCKS_COUNT_LO: usize = 0xC;
pub(crate) const BG_FREE_INODES_COUNT_LO: usize = 0xE;
pub(crate) const BG_USED_DIRS_COUNT_LO: usize = 0x10;
pub(crate) const BG_FLAGS: usize = 0x12;
pub(crate) const BG_BLOCK_BITMAP_CSUM_LO: usize = 0x18;
pub(crate) const BG_INODE_BITMAP_CSUM_LO: usize = 0x1A;
pub(crate) const BG_ITABLE_UNUSED_LO: usize = 0x1C;
pub(crate) const BG_CHECKSUM: usize = 0x1E;
pub(crate) const BG_BLOCK_BITMAP_HI: usize = 0x20;
pub(crate) const BG_INODE_BITMAP_HI: usize = 0x24;
pub(crate) const BG_INODE_TABLE_HI: usize = 0x28;
pub(crate) const BG_FREE_BLOCKS_COUNT_HI: usize = 0x2C;
pub(crate) const BG_FREE_INODES_COUNT_HI: usize = 0x2E;
pub(crate) const BG_USED_DIRS_COUNT_HI: usize = 0x30;
pub(crate) const BG_ITABLE_UNUSED_HI: usize = 0x32;
pub(crate) const BG_BLOCK_BITMAP_CSUM_HI: usize = 0x38;
pub(crate) const BG_INODE_BITMAP_CSUM_HI: usize = 0x3A;
/// Descriptors at least this long carry the high half of the block bitmap checksum.
pub(crate) const BG_BLOCK_BITMAP_CSUM_HI_END: usize = 0x3A;
/// Size of a 64bit group descriptor as vmvol writes it.
pub(crate) const DESC_SIZE_64: usize = 64;

/// `bg_flags`: the inode bitmap was never written.
pub(crate) const BG_INODE_UNINIT: u16 = 0x1;
/// `bg_flags`: the block bitmap was never written.
pub(crate) const BG_BLOCK_UNINIT: u16 = 0x2;
/// `bg_flags`: the inode table is zeroed.
pub(crate) const BG_INODE_ZEROED: u16 = 0x4;

/// Which checksum group descriptors carry.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DescCsum {
    /// None (ext2/ext3 without `uninit_bg`): `BLOCK_UNINIT` is ignored.
    None,
    /// `gdt_csum`/`uninit_bg`: CRC16 over UUID, group number and descriptor.
    Crc16 {
        /// The filesystem UUID.
        uuid: [u8; 16],
        /// Whether the checksum also covers the 64bit half of the descriptor.
        is_64bit: bool,
    },
    /// `metadata_csum`: CRC32C from the checksum seed; bitmaps checksummed too.
    Crc32c {
        /// The filesystem checksum seed.
        seed: u32,
    },
}

impl DescCsum {
    /// The checksum of descriptor `raw` of group `g` (`bg_checksum` itself
    /// counts as zero), or `None` when descriptors carry none.
    pub(crate) fn compute(&self, g: u32, raw: &[u8]) -> Option<u16> {
        let le_group = g.to_le_bytes();
        let head = raw.get(..BG_CHECKSUM).unwrap_or_default();
        let tail = raw.get(BG_CHECKSUM + 2..).unwrap_or_default();
        match *self {
            DescCsum::None => None,
            DescCsum::Crc32c { seed } => {
                let c = crc32c(seed, &le_group);
                let c = crc32c(c, head);
                let c = crc32c(c, &[0, 0]);
                Some((crc32c(c, tail) & 0xFFFF) as u16)
            }
            DescCsum::Crc16 { uuid, is_64bit } => {
                let c = crc16(!0, &uuid);
                let c = crc16(c, &le_group);
                let c = crc16(c, head);
                Some(if is_64bit { crc16(c, tail) } else { c })
            }
        }
    }
}

/// Which groups hold a copy of the superblock (and of the descriptor table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SuperBackups {
    /// Without `sparse_super`: every group.
    All,
    /// `sparse_super`: groups 0, 1 and powers of 3, 5 and 7.
    Sparse,
    /// `sparse_super2`: group 0 and the (up to) two groups named in
    /// `s_backup_bgs` (0 there means "none").
    Sparse2([u64; 2]),
}

impl SuperBackups {
    /// Whether group `g` holds a superblock (`ext4_bg_has_super` in the
    /// kernel, `ext2fs_bg_has_super` in e2fsprogs). `sparse_super2` is
    /// checked first: it overrides `sparse_super`, which mke2fs sets too.
    pub(crate) fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        match self {
            SuperBackups::Sparse2(backups) => backups.contains(&g),
            SuperBackups::All => true,
            SuperBackups::Sparse => {
                g == 1
                    || (g % 2 == 1 && (is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)))
            }
        }
    }

    /// Groups below `groups` holding a backup (group 0 excluded), ascending:
    /// the order `ext2fs_list_backups` yields them.
    pub(crate) fn backup_groups(&self, groups: u64) -> impl Iterator<Item = u64> + '_ {
        (1..groups).filter(move |&g| self.has_super(g))
    }
}

/// Whether `n` is a power of `base` (`test_root` in the kernel).
fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let v: Vec<u64> = SuperBackups::Sparse.backup_groups(100).collect();
        assert_eq!(v, vec![1, 3, 5, 7, 9, 25, 27, 49, 81]);
        assert!(SuperBackups::Sparse.has_super(0));
        assert!(SuperBackups::Sparse.has_super(343));
        assert!(!SuperBackups::Sparse.has_super(15));
        assert!(!SuperBackups::Sparse.has_super(2));
        assert!(SuperBackups::All.has_super(2));
    }

    /// The bug the two former copies differed on: with `sparse_super2`, the
    /// powers of 3, 5 and 7 hold no backup; only the named groups do.
    #[test]
    fn sparse_super2_uses_only_named_groups() {
        let s2 = SuperBackups::Sparse2([1, 63]);
        let v: Vec<u64> = s2.backup_groups(64).collect();
        assert_eq!(v, vec![1, 63]);
        assert!(!s2.has_super(3) && !s2.has_super(9));
        let none = SuperBackups::Sparse2([0, 0]);
        assert_eq!(none.backup_groups(64).count(), 0);
        assert!(none.has_super(0));
    }
}
