//! Superblock layout (kernel `struct ext4_super_block`): where it lives,
//! its field offsets, and its checksum.

use super::csum::crc32c;
use super::field::{get32, put32};

/// Byte offset of the primary superblock on the device.
pub(crate) const OFFSET: u64 = 1024;
/// Size of the superblock structure in bytes.
pub(crate) const LEN: usize = 1024;
/// `s_magic`.
pub(crate) const MAGIC: u16 = 0xEF53;

// Field offsets.
pub(crate) const S_INODES_COUNT: usize = 0x0;
pub(crate) const S_BLOCKS_COUNT_LO: usize = 0x4;
pub(crate) const S_R_BLOCKS_COUNT_LO: usize = 0x8;
pub(crate) const S_FREE_BLOCKS_COUNT_LO: usize = 0xC;
pub(crate) const S_FREE_INODES_COUNT: usize = 0x10;
pub(crate) const S_FIRST_DATA_BLOCK: usize = 0x14;
pub(crate) const S_LOG_BLOCK_SIZE: usize = 0x18;
pub(crate) const S_LOG_CLUSTER_SIZE: usize = 0x1C;
pub(crate) const S_BLOCKS_PER_GROUP: usize = 0x20;
pub(crate) const S_CLUSTERS_PER_GROUP: usize = 0x24;
pub(crate) const S_INODES_PER_GROUP: usize = 0x28;
pub(crate) const S_WTIME: usize = 0x30;
pub(crate) const S_MAX_MNT_COUNT: usize = 0x36;
pub(crate) const S_MAGIC: usize = 0x38;
pub(crate) const S_STATE: usize = 0x3A;
pub(crate) const S_ERRORS: usize = 0x3C;
pub(crate) const S_LASTCHECK: usize = 0x40;
pub(crate) const S_REV_LEVEL: usize = 0x4C;
pub(crate) const S_FIRST_INO: usize = 0x54;
pub(crate) const S_INODE_SIZE: usize = 0x58;
pub(crate) const S_BLOCK_GROUP_NR: usize = 0x5A;
pub(crate) const S_FEATURE_COMPAT: usize = 0x5C;
pub(crate) const S_FEATURE_INCOMPAT: usize = 0x60;
pub(crate) const S_FEATURE_RO_COMPAT: usize = 0x64;
pub(crate) const S_UUID: usize = 0x68;
pub(crate) const S_VOLUME_NAME: usize = 0x78;
pub(crate) const S_RESERVED_GDT_BLOCKS: usize = 0xCE;
pub(crate) const S_JOURNAL_INUM: usize = 0xE0;
pub(crate) const S_HASH_SEED: usize = 0xEC;
pub(crate) const S_DEF_HASH_VERSION: usize = 0xFC;
pub(crate) const S_JNL_BACKUP_TYPE: usize = 0xFD;
pub(crate) const S_DESC_SIZE: usize = 0xFE;
pub(crate) const S_DEFAULT_MOUNT_OPTS: usize = 0x100;
pub(crate) const S_FIRST_META_BG: usize = 0x104;
pub(crate) const S_MKFS_TIME: usize = 0x108;
/// `s_jnl_blocks[17]`: the journal inode's `i_block` (15 words), then its
/// size high and low words.
pub(crate) const S_JNL_BLOCKS: usize = 0x10C;
pub(crate) const S_BLOCKS_COUNT_HI: usize = 0x150;
pub(crate) const S_R_BLOCKS_COUNT_HI: usize = 0x154;
pub(crate) const S_FREE_BLOCKS_HI: usize = 0x158;
pub(crate) const S_MIN_EXTRA_ISIZE: usize = 0x15C;
pub(crate) const S_WANT_EXTRA_ISIZE: usize = 0x15E;
pub(crate) const S_FLAGS: usize = 0x160;
pub(crate) const S_MMP_BLOCK: usize = 0x168;
pub(crate) const S_LOG_GROUPS_PER_FLEX: usize = 0x174;
pub(crate) const S_CHECKSUM_TYPE: usize = 0x175;
/// `s_backup_bgs[2]`: the two backup groups of `sparse_super2`.
pub(crate) const S_BACKUP_BGS: usize = 0x24C;
pub(crate) const S_CHECKSUM_SEED: usize = 0x270;
pub(crate) const S_WTIME_HI: usize = 0x274;
pub(crate) const S_MKFS_TIME_HI: usize = 0x276;
pub(crate) const S_LASTCHECK_HI: usize = 0x277;
pub(crate) const S_CHECKSUM: usize = 0x3FC;

/// `s_state`: cleanly unmounted.
pub(crate) const STATE_VALID: u16 = 0x1;
/// `s_state`: errors detected.
pub(crate) const STATE_ERROR: u16 = 0x2;
/// `s_checksum_type`: the only one that exists, CRC32C.
pub(crate) const CHECKSUM_CRC32C: u8 = 1;
/// `s_def_hash_version`: half MD4.
pub(crate) const HASH_HALF_MD4: u8 = 1;
/// `s_jnl_backup_type`: `s_jnl_blocks` holds a copy of the journal inode's blocks.
pub(crate) const JNL_BACKUP_BLOCKS: u8 = 1;
/// `s_flags`: directory hashes use signed chars.
pub(crate) const FLAGS_SIGNED_HASH: u32 = 0x1;
/// `s_default_mount_opts`: `user_xattr`.
pub(crate) const DEFM_XATTR_USER: u32 = 0x4;
/// `s_default_mount_opts`: `acl`.
pub(crate) const DEFM_ACL: u32 = 0x8;

/// The `metadata_csum` checksum of a superblock buffer.
pub(crate) fn checksum(sb: &[u8]) -> u32 {
    crc32c(!0, sb.get(..S_CHECKSUM).unwrap_or_default())
}

/// Store the checksum of `sb` in `s_checksum`.
pub(crate) fn set_checksum(sb: &mut [u8]) {
    let c = checksum(sb);
    put32(sb, S_CHECKSUM, c);
}

/// The checksum stored in `sb`.
pub(crate) fn stored_checksum(sb: &[u8]) -> u32 {
    get32(sb, S_CHECKSUM)
}
