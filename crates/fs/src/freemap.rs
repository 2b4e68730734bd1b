//! Free-space map of an ext2/ext3/ext4 filesystem on a block image.
//!
//! The map is read from the filesystem's own metadata: the superblock at byte
//! 1024, the group descriptor table and one block bitmap per group. Groups
//! flagged `BLOCK_UNINIT` have no bitmap on disk; their used blocks are
//! computed the way the kernel's `ext4_init_block_bitmap` does (superblock
//! backup, group descriptor table and reserved GDT blocks, and the group's
//! own bitmaps and inode table when they live inside it), widened the way
//! e2fsprogs' `mark_uninit_bg_group_blocks` does (any group's bitmaps and
//! inode table found in that group are used too).
//!
//! Because callers discard what the map reports free (image compaction), the
//! reader errs on the side of "used": every group's known metadata is marked
//! used even where a bitmap claims otherwise, every checksum the filesystem
//! carries is verified, and anything inconsistent is refused with
//! [`Error::Corrupt`] rather than guessed around. Every count in the headers
//! is checked against the device size before it drives a loop or an
//! allocation, and memory grows only with metadata actually read.

use serde::{Deserialize, Serialize};
use vmvol_format::{BlockIo, ByteRange};

use crate::ext4::bitmap::{for_each_clear_run, set_bits};
use crate::ext4::csum::{crc32c as ext4_crc32c, fs_seed};
use crate::ext4::features::*;
use crate::ext4::field::{get16 as le16, get32 as le32, get8};
use crate::ext4::group::*;
use crate::ext4::superblock::{self, *};
use crate::{Error, Result};

/// Largest run of consecutive bitmap blocks read with one request.
const BITMAP_BATCH_BYTES: u64 = 256 * 1024;

/// What a scan learned about the filesystem, apart from the ranges themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSummary {
    /// Filesystem block size in bytes.
    pub block_size: u32,
    /// Allocation unit in bytes: the block size, or the cluster size with
    /// `bigalloc`. Every free range is a whole number of these (except where
    /// the filesystem ends inside a cluster).
    pub cluster_size: u32,
    /// Bytes the filesystem spans (block count × block size).
    pub fs_bytes: u64,
    /// Size of the device in bytes. Bytes past `fs_bytes` belong to no
    /// filesystem structure but are not reported as free.
    pub device_bytes: u64,
    /// Number of block groups.
    pub group_count: u64,
    /// Total of all free ranges in bytes.
    pub free_bytes: u64,
    /// Number of free ranges (after merging adjacent ones).
    pub range_count: u64,
}

/// The byte ranges of a device that its ext2/ext3/ext4 filesystem does not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeMap {
    /// Filesystem block size in bytes.
    pub block_size: u32,
    /// Allocation unit in bytes (block size, or cluster size with `bigalloc`).
    pub cluster_size: u32,
    /// Bytes the filesystem spans (block count × block size).
    pub fs_bytes: u64,
    /// Size of the device in bytes.
    pub device_bytes: u64,
    /// Number of block groups.
    pub group_count: u64,
    /// Total of all free ranges in bytes.
    pub free_bytes: u64,
    /// Free ranges, sorted by offset, non-overlapping, adjacent ones merged.
    pub ranges: Vec<ByteRange>,
}

impl FreeMap {
    /// Whether the byte range `offset..offset+len` lies entirely in free space.
    pub fn is_free(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        // The last range starting at or before `offset`.
        let idx = self.ranges.partition_point(|r| r.offset <= offset);
        match idx.checked_sub(1).and_then(|i| self.ranges.get(i)) {
            Some(r) => end <= r.end(),
            None => false,
        }
    }
}

/// Read the free-space map of the ext2/ext3/ext4 filesystem on `dev`.
///
/// Errors: [`Error::NotExt4`] when there is no ext superblock,
/// [`Error::NeedsRecovery`] when the journal holds unreplayed transactions
/// (or a journal-less filesystem was not cleanly unmounted or has errors
/// recorded), [`Error::Unsupported`] for an unknown incompatible (or
/// read-only-compatible) feature, naming the bit, [`Error::Corrupt`] for
/// checksum mismatches and inconsistent metadata, [`Error::Block`] for I/O.
///
/// Memory use is proportional to the number of free ranges; see
/// [`scan_free`] for a streaming variant.
///
/// ```
/// use vmvol_format::{Control, Prealloc, RawImage};
/// use vmvol_fs::{free_map, mkfs, MkfsOptions};
///
/// let dir = tempfile::tempdir()?;
/// let img = RawImage::create(&dir.path().join("vol.raw"), 256 << 20, Prealloc::Off, &Control::new())?;
/// mkfs(&img, &MkfsOptions::default())?;
/// let map = free_map(&img)?;
/// assert_eq!(map.block_size, 4096);
/// // A fresh filesystem is mostly free; its superblock (byte 1024) is not.
/// assert!(map.free_bytes > 200 << 20);
/// assert!(!map.is_free(1024, 1024));
/// for r in &map.ranges {
///     assert_eq!(r.offset % 4096, 0);
/// }
/// println!("{}", serde_json::to_string(&map)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn free_map(dev: &dyn BlockIo) -> Result<FreeMap> {
    let mut ranges = Vec::new();
    let summary = scan_free(dev, &mut |r| {
        ranges.push(r);
        Ok(())
    })?;
    Ok(FreeMap {
        block_size: summary.block_size,
        cluster_size: summary.cluster_size,
        fs_bytes: summary.fs_bytes,
        device_bytes: summary.device_bytes,
        group_count: summary.group_count,
        free_bytes: summary.free_bytes,
        ranges,
    })
}

/// Like [`free_map`], but hands each free range to `visit` as soon as it is
/// known (in increasing offset order, adjacent ranges already merged) instead
/// of collecting them, so a badly fragmented multi-terabyte filesystem costs
/// no memory. An error from `visit` stops the scan and is returned.
pub fn scan_free(
    dev: &dyn BlockIo,
    visit: &mut dyn FnMut(ByteRange) -> Result<()>,
) -> Result<FreeSummary> {
    let geo = Geometry::read(dev)?;
    // Two passes over the descriptor table instead of holding it: the first
    // collects where every group's metadata lies, the second reads bitmaps.
    let meta = metadata_extents(dev, &geo)?;
    let mut out = RangeSink {
        visit,
        pending: None,
        free_bytes: 0,
        range_count: 0,
    };
    scan_groups(dev, &geo, &meta, &mut out)?;
    out.finish()?;
    Ok(FreeSummary {
        block_size: u32::try_from(geo.block_size).unwrap_or(u32::MAX),
        cluster_size: u32::try_from(geo.cluster_size()).unwrap_or(u32::MAX),
        fs_bytes: geo.fs_bytes,
        device_bytes: geo.device_bytes,
        group_count: geo.group_count,
        free_bytes: out.free_bytes,
        range_count: out.range_count,
    })
}

/// Everything about the filesystem's layout the scan needs, validated.
#[derive(Debug)]
struct Geometry {
    block_size: u64,
    /// log2 of blocks per cluster (0 without bigalloc).
    cluster_bits: u32,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    itb_per_group: u64,
    group_count: u64,
    desc_size: usize,
    desc_per_block: u64,
    reserved_gdt: u64,
    meta_bg: bool,
    /// Descriptor blocks kept right after the superblock (all of them
    /// without `meta_bg`); later ones live in their meta group.
    first_meta_bg: u64,
    super_backups: SuperBackups,
    is_64bit: bool,
    csum: DescCsum,
    mmp_block: Option<u64>,
    fs_bytes: u64,
    device_bytes: u64,
}

impl Geometry {
    fn read(dev: &dyn BlockIo) -> Result<Self> {
        let device_bytes = dev.size();
        if device_bytes < superblock::OFFSET + superblock::LEN as u64 {
            return Err(Error::NotExt4 {
                reason: format!("device of {device_bytes} bytes is too small to hold a superblock"),
            });
        }
        let mut sb = [0u8; superblock::LEN];
        dev.read_at(&mut sb, superblock::OFFSET)
            .map_err(|e| Error::block("read superblock", e))?;
        Self::parse(&sb, device_bytes)
    }

    fn parse(sb: &[u8; superblock::LEN], device_bytes: u64) -> Result<Self> {
        let magic = le16(sb, S_MAGIC);
        if magic != superblock::MAGIC {
            return Err(Error::NotExt4 {
                reason: format!("superblock magic is 0x{magic:04x}, not 0xef53"),
            });
        }
        let rev = le32(sb, S_REV_LEVEL);
        // Revision 0 (the original ext2) has no feature words and 128-byte inodes.
        let (compat, incompat, ro_compat) = if rev == 0 {
            (0, 0, 0)
        } else {
            (
                le32(sb, S_FEATURE_COMPAT),
                le32(sb, S_FEATURE_INCOMPAT),
                le32(sb, S_FEATURE_RO_COMPAT),
            )
        };

        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let kind = get8(sb, S_CHECKSUM_TYPE);
            if kind != CHECKSUM_CRC32C {
                return Err(Error::corrupt(format!(
                    "superblock: metadata_csum with unknown checksum type {kind} (only 1, crc32c, exists)"
                )));
            }
            let stored = superblock::stored_checksum(sb);
            let computed = superblock::checksum(sb);
            if stored != computed {
                return Err(Error::corrupt(format!(
                    "superblock checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"
                )));
            }
        }

        // Feature checks come after the checksum so that a flipped bit in a
        // checksummed superblock is reported as corruption, not as a feature.
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(Error::NeedsRecovery {
                reason: "the journal holds transactions not yet written to the filesystem \
                         (needs_recovery is set): mount it once or run e2fsck to replay the \
                         journal, then retry"
                    .into(),
            });
        }
        let refused = incompat & !INCOMPAT_SUPPORTED;
        if refused != 0 {
            return Err(Error::Unsupported {
                reason: format!(
                    "incompatible feature(s) not supported: {}",
                    incompat_names(refused)
                ),
            });
        }
        let unknown_ro = ro_compat & !RO_COMPAT_KNOWN;
        if unknown_ro != 0 {
            return Err(Error::Unsupported {
                reason: format!(
                    "unknown read-only-compatible feature bits 0x{unknown_ro:x}: they may change \
                     what a block bitmap means"
                ),
            });
        }
        let state = le16(sb, S_STATE);
        if state & STATE_ERROR != 0 {
            return Err(Error::NeedsRecovery {
                reason: format!(
                    "the superblock records filesystem errors (state 0x{state:x}): run e2fsck first"
                ),
            });
        }
        // Without a journal, a filesystem that is mounted or crashed is marked
        // not valid, and its bitmaps may lag behind its files.
        if compat & COMPAT_HAS_JOURNAL == 0 && state & STATE_VALID == 0 {
            return Err(Error::NeedsRecovery {
                reason: format!(
                    "the filesystem has no journal and was not cleanly unmounted (state 0x{state:x}): \
                     unmount it or run e2fsck first"
                ),
            });
        }

        let log_block = le32(sb, S_LOG_BLOCK_SIZE);
        if log_block > 6 {
            return Err(Error::corrupt(format!(
                "superblock: block size 2^(10+{log_block}) is beyond the 64 KiB maximum"
            )));
        }
        let block_size = 1024u64 << log_block;
        let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
        let cluster_bits = if bigalloc {
            let log_cluster = le32(sb, S_LOG_CLUSTER_SIZE);
            match log_cluster.checked_sub(log_block) {
                Some(bits) if bits <= 16 => bits,
                _ => {
                    return Err(Error::corrupt(format!(
                        "superblock: cluster size 2^(10+{log_cluster}) is not between the block \
                         size and 2^16 blocks"
                    )))
                }
            }
        } else {
            0
        };

        let bits_per_bitmap = block_size * 8;
        let blocks_per_group = u64::from(le32(sb, S_BLOCKS_PER_GROUP));
        let clusters_per_group = if bigalloc {
            u64::from(le32(sb, S_CLUSTERS_PER_GROUP))
        } else {
            blocks_per_group
        };
        if clusters_per_group < 8
            || clusters_per_group > bits_per_bitmap
            || clusters_per_group % 8 != 0
            || clusters_per_group << cluster_bits != blocks_per_group
        {
            return Err(Error::corrupt(format!(
                "superblock: {blocks_per_group} blocks / {clusters_per_group} clusters per group \
                 do not fit a {block_size}-byte bitmap"
            )));
        }

        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(le32(sb, S_BLOCKS_COUNT_LO));
        if is_64bit {
            blocks_count |= u64::from(le32(sb, S_BLOCKS_COUNT_HI)) << 32;
        }
        let first_data_block = u64::from(le32(sb, S_FIRST_DATA_BLOCK));
        // The superblock sits in block 1 of a 1 KiB-block filesystem and in
        // block 0 otherwise; group 0 starts there (bigalloc always starts at 0).
        let expected_fdb = u64::from(block_size == 1024 && !bigalloc);
        if first_data_block != expected_fdb {
            return Err(Error::corrupt(format!(
                "superblock: first data block {first_data_block}, expected {expected_fdb} for \
                 {block_size}-byte blocks"
            )));
        }
        if blocks_count <= first_data_block {
            return Err(Error::corrupt(format!(
                "superblock: block count {blocks_count} leaves no block group"
            )));
        }
        let fs_bytes = blocks_count.checked_mul(block_size).ok_or_else(|| {
            Error::corrupt(format!(
                "superblock: {blocks_count} blocks of {block_size} bytes overflow"
            ))
        })?;
        if fs_bytes > device_bytes {
            return Err(Error::corrupt(format!(
                "filesystem spans {fs_bytes} bytes ({blocks_count} blocks of {block_size}) but \
                 the device holds only {device_bytes} bytes"
            )));
        }
        // Bounded by the device size checked just above.
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        // Group numbers are 32-bit on disk (checksums) and in the kernel.
        if group_count > u64::from(u32::MAX) {
            return Err(Error::corrupt(format!(
                "superblock: {group_count} block groups exceed the 2^32 the format can number"
            )));
        }

        let inodes_per_group = u64::from(le32(sb, S_INODES_PER_GROUP));
        if inodes_per_group == 0 || inodes_per_group > bits_per_bitmap {
            return Err(Error::corrupt(format!(
                "superblock: {inodes_per_group} inodes per group do not fit a {block_size}-byte bitmap"
            )));
        }
        let inodes_count = u64::from(le32(sb, S_INODES_COUNT));
        if group_count.checked_mul(inodes_per_group) != Some(inodes_count) {
            return Err(Error::corrupt(format!(
                "superblock: {inodes_count} inodes is not {group_count} groups × {inodes_per_group}"
            )));
        }
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(sb, S_INODE_SIZE))
        };
        if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "superblock: inode size {inode_size} is not a power of two between 128 and the \
                 block size {block_size}"
            )));
        }
        // Both factors are bounded (≤ 2^19 and ≤ 2^16), no overflow.
        let itb_per_group = (inodes_per_group * inode_size).div_ceil(block_size);

        let desc_size = if is_64bit {
            let size = le16(sb, S_DESC_SIZE);
            if !(64..=1024).contains(&size) || !size.is_power_of_two() {
                return Err(Error::corrupt(format!(
                    "superblock: 64bit group descriptor size {size} is not a power of two in 64..=1024"
                )));
            }
            usize::from(size)
        } else {
            32
        };
        let desc_per_block = block_size / desc_size as u64;
        let gdb_count = group_count.div_ceil(desc_per_block);
        let meta_bg = incompat & INCOMPAT_META_BG != 0;
        let first_meta_bg = if meta_bg {
            let first = u64::from(le32(sb, S_FIRST_META_BG));
            if first > gdb_count {
                return Err(Error::corrupt(format!(
                    "superblock: first meta block group {first} beyond the {gdb_count} descriptor blocks"
                )));
            }
            first
        } else {
            gdb_count
        };
        let reserved_gdt = u64::from(le16(sb, S_RESERVED_GDT_BLOCKS));
        // Group 0 must hold the superblock and the (non-meta_bg) table.
        let group0_meta = 1 + first_meta_bg + reserved_gdt;
        if group0_meta >= blocks_per_group.min(blocks_count - first_data_block) {
            return Err(Error::corrupt(format!(
                "superblock: {first_meta_bg} descriptor blocks and {reserved_gdt} reserved ones do \
                 not fit in block group 0"
            )));
        }

        let super_backups = if compat & COMPAT_SPARSE_SUPER2 != 0 {
            SuperBackups::Sparse2([
                u64::from(le32(sb, S_BACKUP_BGS)),
                u64::from(le32(sb, S_BACKUP_BGS + 4)),
            ])
        } else if ro_compat & RO_COMPAT_SPARSE_SUPER != 0 {
            SuperBackups::Sparse
        } else {
            SuperBackups::All
        };

        let mut uuid = [0u8; 16];
        if let Some(src) = sb.get(S_UUID..S_UUID + 16) {
            uuid.copy_from_slice(src);
        }
        let csum = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(sb, S_CHECKSUM_SEED)
            } else {
                fs_seed(&uuid)
            };
            DescCsum::Crc32c { seed }
        } else if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            DescCsum::Crc16 { uuid, is_64bit }
        } else {
            DescCsum::None
        };

        let mmp_block = if incompat & INCOMPAT_MMP != 0 {
            let block =
                u64::from(le32(sb, S_MMP_BLOCK)) | (u64::from(le32(sb, S_MMP_BLOCK + 4)) << 32);
            (first_data_block..blocks_count)
                .contains(&block)
                .then_some(block)
        } else {
            None
        };

        Ok(Geometry {
            block_size,
            cluster_bits,
            blocks_count,
            first_data_block,
            blocks_per_group,
            clusters_per_group,
            itb_per_group,
            group_count,
            desc_size,
            desc_per_block,
            reserved_gdt,
            meta_bg,
            first_meta_bg,
            super_backups,
            is_64bit,
            csum,
            mmp_block,
            fs_bytes,
            device_bytes,
        })
    }

    fn cluster_size(&self) -> u64 {
        self.block_size << self.cluster_bits
    }

    /// First block of group `g` (`ext4_group_first_block_no`).
    fn group_first_block(&self, g: u64) -> u64 {
        // g < group_count, so this is below blocks_count.
        g * self.blocks_per_group + self.first_data_block
    }

    /// Blocks in group `g` (the last group may be partial).
    fn blocks_in_group(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }

    /// Whether group `g` holds a superblock backup (`ext4_bg_has_super`).
    fn has_super(&self, g: u64) -> bool {
        self.super_backups.has_super(g)
    }

    /// Blocks at the start of group `g` used by the superblock copy and the
    /// descriptor table copy (`ext4_num_base_meta_clusters`, in blocks).
    fn base_meta_blocks(&self, g: u64) -> u64 {
        let sup = u64::from(self.has_super(g));
        if !self.meta_bg || g < self.first_meta_bg.saturating_mul(self.desc_per_block) {
            if sup == 1 {
                sup + self.first_meta_bg + self.reserved_gdt
            } else {
                0
            }
        } else {
            // meta_bg: the first, second and last group of each meta group
            // hold a copy of that meta group's one descriptor block.
            let first = g - g % self.desc_per_block;
            let last = first + self.desc_per_block - 1;
            sup + u64::from(g == first || g == first + 1 || g == last)
        }
    }

    /// Block holding descriptor block `i` (`descriptor_loc`).
    fn descriptor_block(&self, i: u64) -> u64 {
        let sb_block = u64::from(self.block_size == 1024);
        if !self.meta_bg || i < self.first_meta_bg {
            return sb_block + 1 + i;
        }
        let g = i * self.desc_per_block;
        let mut has_super = u64::from(self.has_super(g));
        if self.block_size == 1024 && i == 0 && self.first_data_block == 0 {
            has_super += 1;
        }
        self.group_first_block(g) + has_super
    }
}

/// The parts of one group descriptor the scan uses.
#[derive(Debug, Clone, Copy)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
    block_bitmap_csum: u32,
}

/// Reads group descriptors one table block at a time, verified, so memory
/// never depends on the group count a header claims.
struct DescReader {
    buf: Vec<u8>,
    /// Which table block `descs` holds.
    block_idx: Option<u64>,
    /// Parsed descriptors of that block (groups `block_idx * desc_per_block ..`).
    descs: Vec<Desc>,
}

impl DescReader {
    fn new(geo: &Geometry) -> Result<Self> {
        let bs = usize::try_from(geo.block_size)
            .map_err(|_| Error::corrupt("block size does not fit in memory"))?;
        Ok(DescReader {
            buf: vec![0u8; bs],
            block_idx: None,
            descs: Vec::new(),
        })
    }

    /// The descriptors of the table block holding group `g`, and `g`'s
    /// index among them.
    fn block_of(&mut self, dev: &dyn BlockIo, geo: &Geometry, g: u64) -> Result<(&[Desc], usize)> {
        let i = g / geo.desc_per_block;
        if self.block_idx != Some(i) {
            self.block_idx = None;
            self.descs.clear();
            let block = geo.descriptor_block(i);
            if block >= geo.blocks_count {
                return Err(Error::corrupt(format!(
                    "group descriptor block {i} would be at block {block}, past the end ({})",
                    geo.blocks_count
                )));
            }
            dev.read_at(&mut self.buf, block * geo.block_size)
                .map_err(|e| Error::block("read group descriptors", e))?;
            for (j, raw) in self.buf.chunks_exact(geo.desc_size).enumerate() {
                let group = i * geo.desc_per_block + j as u64;
                if group >= geo.group_count {
                    break;
                }
                self.descs.push(parse_desc(geo, group, raw)?);
            }
            self.block_idx = Some(i);
        }
        // g % desc_per_block < descs.len() because g < group_count.
        Ok((&self.descs, (g % geo.desc_per_block) as usize))
    }
}

fn parse_desc(geo: &Geometry, g: u64, raw: &[u8]) -> Result<Desc> {
    let stored = le16(raw, BG_CHECKSUM);
    // Group numbers fit in 32 bits (checked when the superblock was parsed).
    let computed = geo.csum.compute(u32::try_from(g).unwrap_or(u32::MAX), raw);
    if let Some(computed) = computed {
        if computed != stored {
            return Err(Error::corrupt(format!(
                "group {g} descriptor checksum mismatch: stored 0x{stored:04x}, computed 0x{computed:04x}"
            )));
        }
    }

    let wide = geo.is_64bit && geo.desc_size >= 64;
    let addr = |lo: usize, hi: usize| {
        let mut v = u64::from(le32(raw, lo));
        if wide {
            v |= u64::from(le32(raw, hi)) << 32;
        }
        v
    };
    let mut block_bitmap_csum = u32::from(le16(raw, BG_BLOCK_BITMAP_CSUM_LO));
    if geo.desc_size >= BG_BLOCK_BITMAP_CSUM_HI_END {
        block_bitmap_csum |= u32::from(le16(raw, BG_BLOCK_BITMAP_CSUM_HI)) << 16;
    }
    let d = Desc {
        block_bitmap: addr(BG_BLOCK_BITMAP_LO, BG_BLOCK_BITMAP_HI),
        inode_bitmap: addr(BG_INODE_BITMAP_LO, BG_INODE_BITMAP_HI),
        inode_table: addr(BG_INODE_TABLE_LO, BG_INODE_TABLE_HI),
        flags: le16(raw, BG_FLAGS),
        block_bitmap_csum,
    };
    let in_fs = |b: u64| (geo.first_data_block..geo.blocks_count).contains(&b);
    let table_end = d.inode_table.checked_add(geo.itb_per_group);
    if !in_fs(d.block_bitmap)
        || !in_fs(d.inode_bitmap)
        || !in_fs(d.inode_table)
        || table_end.is_none_or(|end| end > geo.blocks_count)
    {
        return Err(Error::corrupt(format!(
            "group {g}: block bitmap {}, inode bitmap {} or inode table {} (+{} blocks) lies \
             outside the filesystem's {} blocks",
            d.block_bitmap, d.inode_bitmap, d.inode_table, geo.itb_per_group, geo.blocks_count
        )));
    }
    Ok(d)
}

/// Every group's bitmaps and inode table (and the MMP block), as sorted,
/// merged block ranges `start..end`. With `flex_bg` these cluster in a few
/// groups, so the list stays short; it is merged as it grows, so its size
/// follows the distinct metadata actually found, not the group count.
fn metadata_extents(dev: &dyn BlockIo, geo: &Geometry) -> Result<Vec<(u64, u64)>> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    let mut merged_len = 0usize;
    if let Some(b) = geo.mmp_block {
        v.push((b, b + 1));
    }
    let mut reader = DescReader::new(geo)?;
    let mut g = 0u64;
    while g < geo.group_count {
        let (descs, first) = reader.block_of(dev, geo, g)?;
        let here = descs.get(first..).unwrap_or_default();
        if here.is_empty() {
            // Cannot happen (see block_of), but never loop forever.
            return Err(Error::corrupt(format!("group {g}: descriptor missing")));
        }
        for d in here {
            v.push((d.block_bitmap, d.block_bitmap + 1));
            v.push((d.inode_bitmap, d.inode_bitmap + 1));
            v.push((d.inode_table, d.inode_table + geo.itb_per_group));
        }
        g += here.len() as u64;
        if v.len() > merged_len.saturating_mul(2).max(4096) {
            merge_extents(&mut v);
            merged_len = v.len();
        }
    }
    merge_extents(&mut v);
    Ok(v)
}

/// Sort and merge overlapping or touching block ranges in place.
fn merge_extents(v: &mut Vec<(u64, u64)>) {
    v.sort_unstable();
    let mut out = 0usize;
    for i in 0..v.len() {
        let Some(&(s, e)) = v.get(i) else { break };
        match out.checked_sub(1).and_then(|o| v.get_mut(o)) {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => {
                if let Some(slot) = v.get_mut(out) {
                    *slot = (s, e);
                }
                out += 1;
            }
        }
    }
    v.truncate(out);
}

/// Collects free clusters into merged byte ranges and hands them on.
struct RangeSink<'a> {
    visit: &'a mut dyn FnMut(ByteRange) -> Result<()>,
    pending: Option<ByteRange>,
    free_bytes: u64,
    range_count: u64,
}

impl RangeSink<'_> {
    fn add(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.free_bytes = self.free_bytes.saturating_add(len);
        if let Some(p) = &mut self.pending {
            if p.end() == offset {
                p.len += len;
                return Ok(());
            }
        }
        if let Some(p) = self.pending.replace(ByteRange { offset, len }) {
            self.range_count += 1;
            (self.visit)(p)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            self.range_count += 1;
            (self.visit)(p)?;
        }
        Ok(())
    }
}

/// Bitmap blocks read ahead in one request (consecutive groups' bitmaps
/// are usually consecutive blocks with `flex_bg`).
struct BitmapCache {
    first_block: u64,
    blocks: u64,
    buf: Vec<u8>,
}

impl BitmapCache {
    /// The bitmap block `block` of group `g`, reading ahead when not cached.
    fn get(
        &mut self,
        dev: &dyn BlockIo,
        geo: &Geometry,
        descs: &[Desc],
        g: usize,
        block: u64,
    ) -> Result<&[u8]> {
        let bs = geo.block_size;
        if !(self.first_block..self.first_block + self.blocks).contains(&block) {
            let max = (BITMAP_BATCH_BYTES / bs).max(1);
            let mut n = 1u64;
            while n < max {
                let next = descs.get(g + n as usize);
                match next {
                    Some(d)
                        if d.block_bitmap == block + n
                            && !block_uninit(geo, d)
                            && block + n < geo.blocks_count =>
                    {
                        n += 1
                    }
                    _ => break,
                }
            }
            // n * bs ≤ BITMAP_BATCH_BYTES (or one block), fits in memory.
            self.buf.resize((n * bs) as usize, 0);
            dev.read_at(&mut self.buf, block * bs)
                .map_err(|e| Error::block("read block bitmap", e))?;
            self.first_block = block;
            self.blocks = n;
        }
        let start = ((block - self.first_block) * bs) as usize;
        self.buf
            .get(start..start + bs as usize)
            .ok_or_else(|| Error::corrupt("block bitmap cache out of step"))
    }
}

/// Whether group `d`'s block bitmap is uninitialised. The flag counts only
/// when the descriptors are checksummed, as in the kernel and e2fsprogs.
fn block_uninit(geo: &Geometry, d: &Desc) -> bool {
    !matches!(geo.csum, DescCsum::None) && d.flags & BG_BLOCK_UNINIT != 0
}

fn scan_groups(
    dev: &dyn BlockIo,
    geo: &Geometry,
    meta: &[(u64, u64)],
    out: &mut RangeSink<'_>,
) -> Result<()> {
    let bs = geo.block_size;
    let cluster_bytes = geo.cluster_size();
    // Only the bytes that hold this geometry's bits are touched, so the work
    // per group follows the group's size, not the block size.
    let nbytes = (geo.clusters_per_group / 8) as usize;
    let mut bitmap = vec![0u8; nbytes];
    let mut cache = BitmapCache {
        first_block: 0,
        blocks: 0,
        buf: Vec::new(),
    };
    let mut reader = DescReader::new(geo)?;
    let mut meta_idx = 0usize;
    for g in 0..geo.group_count {
        let (descs, gi) = reader.block_of(dev, geo, g)?;
        let d = *descs
            .get(gi)
            .ok_or_else(|| Error::corrupt(format!("group {g}: descriptor missing")))?;
        let start = geo.group_first_block(g);
        let nblocks = geo.blocks_in_group(g);
        let end = start + nblocks;
        let nclusters = nblocks.div_ceil(1 << geo.cluster_bits);

        if block_uninit(geo, &d) {
            bitmap.fill(0);
        } else {
            let raw = cache.get(dev, geo, descs, gi, d.block_bitmap)?;
            let raw = raw
                .get(..nbytes)
                .ok_or_else(|| Error::corrupt("block bitmap shorter than a group"))?;
            if let DescCsum::Crc32c { seed } = geo.csum {
                let mut computed = ext4_crc32c(seed, raw);
                if geo.desc_size < BG_BLOCK_BITMAP_CSUM_HI_END {
                    computed &= 0xFFFF;
                }
                if computed != d.block_bitmap_csum {
                    return Err(Error::corrupt(format!(
                        "group {g}: block bitmap (block {}) checksum mismatch: stored 0x{:08x}, \
                         computed 0x{computed:08x}",
                        d.block_bitmap, d.block_bitmap_csum
                    )));
                }
            }
            bitmap.copy_from_slice(raw);
        }

        // Superblock and descriptor table copies at the start of the group.
        let base = geo.base_meta_blocks(g).min(nblocks);
        set_bits(&mut bitmap, 0, base.div_ceil(1 << geo.cluster_bits));
        // Any group's bitmaps and inode tables inside this group.
        while meta.get(meta_idx).is_some_and(|m| m.1 <= start) {
            meta_idx += 1;
        }
        for &(ms, me) in meta.get(meta_idx..).unwrap_or_default() {
            if ms >= end {
                break;
            }
            let from = (ms.max(start) - start) >> geo.cluster_bits;
            let to = (me.min(end) - start).div_ceil(1 << geo.cluster_bits);
            set_bits(&mut bitmap, from, to);
        }

        for_each_clear_run(&bitmap, nclusters, |first, count| {
            let off = (start + (first << geo.cluster_bits)) * bs;
            let len = (count * cluster_bytes).min(geo.fs_bytes - off);
            out.add(off, len)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn is_free_lookup() {
        let m = FreeMap {
            block_size: 4096,
            cluster_size: 4096,
            fs_bytes: 1 << 20,
            device_bytes: 1 << 20,
            group_count: 1,
            free_bytes: 8192,
            ranges: vec![
                ByteRange {
                    offset: 4096,
                    len: 4096,
                },
                ByteRange {
                    offset: 16384,
                    len: 4096,
                },
            ],
        };
        assert!(m.is_free(4096, 4096));
        assert!(m.is_free(5000, 100));
        assert!(!m.is_free(4000, 200));
        assert!(!m.is_free(8192, 1));
        assert!(m.is_free(16384, 4096));
        assert!(!m.is_free(16384, 4097));
        assert!(!m.is_free(0, 1));
    }
}
