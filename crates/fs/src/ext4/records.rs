//! Records the writer builds: inodes, extent tree blocks and directory
//! blocks, with their `metadata_csum` checksums.

use super::csum::crc32c as crc;
use super::field::{get16, get32, put16, put32, put_bytes};
use crate::layout::INODE_SIZE;

/// ext4 timestamp split into seconds (low 32 bits) and the `_extra` word
/// (epoch bits + nanoseconds).
pub(crate) fn time_parts(sec: i64, nsec: u32) -> (u32, u32) {
    let epoch = ((sec - i64::from(sec as i32)) >> 32) as u32 & 3;
    (sec as u32, (nsec.min(999_999_999) << 2) | epoch)
}

// Inode field offsets (kernel `struct ext4_inode`).
pub(crate) const I_MODE: usize = 0x0;
pub(crate) const I_UID: usize = 0x2;
pub(crate) const I_SIZE_LO: usize = 0x4;
pub(crate) const I_ATIME: usize = 0x8;
pub(crate) const I_CTIME: usize = 0xC;
pub(crate) const I_MTIME: usize = 0x10;
pub(crate) const I_GID: usize = 0x18;
pub(crate) const I_LINKS_COUNT: usize = 0x1A;
pub(crate) const I_BLOCKS_LO: usize = 0x1C;
pub(crate) const I_FLAGS: usize = 0x20;
pub(crate) const I_BLOCK: usize = 0x28;
/// Size of `i_block` (15 words).
pub(crate) const I_BLOCK_LEN: usize = 60;
pub(crate) const I_GENERATION: usize = 0x64;
pub(crate) const I_SIZE_HIGH: usize = 0x6C;
pub(crate) const I_BLOCKS_HIGH: usize = 0x74;
pub(crate) const I_UID_HIGH: usize = 0x78;
pub(crate) const I_GID_HIGH: usize = 0x7A;
pub(crate) const I_CHECKSUM_LO: usize = 0x7C;
/// Start of the extra (large inode) fields.
pub(crate) const I_EXTRA_ISIZE: usize = 0x80;
pub(crate) const I_CHECKSUM_HI: usize = 0x82;
pub(crate) const I_CTIME_EXTRA: usize = 0x84;
pub(crate) const I_MTIME_EXTRA: usize = 0x88;
pub(crate) const I_ATIME_EXTRA: usize = 0x8C;
pub(crate) const I_CRTIME: usize = 0x90;
pub(crate) const I_CRTIME_EXTRA: usize = 0x94;
/// `i_extra_isize` vmvol writes (and `s_min/want_extra_isize`): all extra fields.
pub(crate) const EXTRA_ISIZE: u16 = 32;

/// The `i_block` area of a raw inode.
pub(crate) fn i_block_of(raw: &[u8]) -> &[u8] {
    raw.get(I_BLOCK..I_BLOCK + I_BLOCK_LEN).unwrap_or_default()
}

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFSOCK: u16 = 0o140000;
pub(crate) const EXTENTS_FL: u32 = 0x80000;
pub(crate) const HUGE_FILE_FL: u32 = 0x40000;

/// Directory-entry file type for an inode mode.
pub(crate) fn ftype(mode: u16) -> u8 {
    match mode & 0o170000 {
        S_IFREG => 1,
        S_IFDIR => 2,
        S_IFCHR => 3,
        S_IFBLK => 4,
        S_IFIFO => 5,
        S_IFSOCK => 6,
        S_IFLNK => 7,
        _ => 0,
    }
}

/// One 256-byte inode being built.
#[derive(Clone)]
pub(crate) struct Inode(pub [u8; INODE_SIZE as usize]);

/// Timestamps of an inode: (seconds, nanoseconds) for atime, ctime, mtime, crtime.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Times {
    pub atime: (i64, u32),
    pub ctime: (i64, u32),
    pub mtime: (i64, u32),
    pub crtime: (i64, u32),
}

impl Times {
    pub fn all(sec: i64) -> Self {
        Times {
            atime: (sec, 0),
            ctime: (sec, 0),
            mtime: (sec, 0),
            crtime: (sec, 0),
        }
    }
}

impl Inode {
    pub fn new(mode: u16, uid: u32, gid: u32, times: Times) -> Self {
        let mut b = [0u8; INODE_SIZE as usize];
        put16(&mut b, I_MODE, mode);
        put16(&mut b, I_UID, uid as u16);
        put16(&mut b, I_UID_HIGH, (uid >> 16) as u16);
        put16(&mut b, I_GID, gid as u16);
        put16(&mut b, I_GID_HIGH, (gid >> 16) as u16);
        put16(&mut b, I_EXTRA_ISIZE, EXTRA_ISIZE);
        let mut i = Inode(b);
        i.set_times(times);
        i
    }

    pub fn set_times(&mut self, t: Times) {
        let b = &mut self.0;
        let (s, x) = time_parts(t.atime.0, t.atime.1);
        put32(b, I_ATIME, s);
        put32(b, I_ATIME_EXTRA, x);
        let (s, x) = time_parts(t.ctime.0, t.ctime.1);
        put32(b, I_CTIME, s);
        put32(b, I_CTIME_EXTRA, x);
        let (s, x) = time_parts(t.mtime.0, t.mtime.1);
        put32(b, I_MTIME, s);
        put32(b, I_MTIME_EXTRA, x);
        let (s, x) = time_parts(t.crtime.0, t.crtime.1);
        put32(b, I_CRTIME, s);
        put32(b, I_CRTIME_EXTRA, x);
    }

    pub fn mode(&self) -> u16 {
        get16(&self.0, I_MODE)
    }

    pub fn set_size(&mut self, size: u64) {
        put32(&mut self.0, I_SIZE_LO, size as u32);
        put32(&mut self.0, I_SIZE_HIGH, (size >> 32) as u32);
    }

    pub fn links(&self) -> u16 {
        get16(&self.0, I_LINKS_COUNT)
    }

    pub fn set_links(&mut self, n: u16) {
        put16(&mut self.0, I_LINKS_COUNT, n);
    }

    /// Set `i_blocks` from a count of filesystem blocks.
    pub fn set_blocks(&mut self, fs_blocks: u64, block_size: u32) {
        let sectors = fs_blocks * u64::from(block_size / 512);
        if sectors >= 1 << 48 {
            // huge_file: count in filesystem blocks instead of sectors.
            self.set_flags(self.flags() | HUGE_FILE_FL);
            put32(&mut self.0, I_BLOCKS_LO, fs_blocks as u32);
            put16(&mut self.0, I_BLOCKS_HIGH, (fs_blocks >> 32) as u16);
        } else {
            put32(&mut self.0, I_BLOCKS_LO, sectors as u32);
            put16(&mut self.0, I_BLOCKS_HIGH, (sectors >> 32) as u16);
        }
    }

    pub fn flags(&self) -> u32 {
        get32(&self.0, I_FLAGS)
    }

    pub fn set_flags(&mut self, f: u32) {
        put32(&mut self.0, I_FLAGS, f);
    }

    /// The 60-byte `i_block` area.
    pub fn i_block(&mut self) -> &mut [u8] {
        &mut self.0[I_BLOCK..I_BLOCK + I_BLOCK_LEN]
    }

    /// Fill in `i_checksum_lo/hi` for inode number `ino`.
    pub fn finish(&mut self, seed: u32, ino: u32) {
        put16(&mut self.0, I_CHECKSUM_LO, 0);
        put16(&mut self.0, I_CHECKSUM_HI, 0);
        let gen = get32(&self.0, I_GENERATION);
        let mut c = crc(seed, &ino.to_le_bytes());
        c = crc(c, &gen.to_le_bytes());
        c = crc(c, &self.0);
        put16(&mut self.0, I_CHECKSUM_LO, c as u16);
        // i_checksum_hi exists only when the extra fields reach it.
        if get16(&self.0, I_EXTRA_ISIZE) >= 4 {
            put16(&mut self.0, I_CHECKSUM_HI, (c >> 16) as u16);
        }
    }
}

/// Per-inode checksum seed (for extent and directory blocks).
pub(crate) fn inode_seed(seed: u32, ino: u32, gen: u32) -> u32 {
    crc(crc(seed, &ino.to_le_bytes()), &gen.to_le_bytes())
}

/// Write an extent header.
pub(crate) fn extent_header(buf: &mut [u8], entries: u16, max: u16, depth: u16) {
    put16(buf, 0, 0xF30A);
    put16(buf, 2, entries);
    put16(buf, 4, max);
    put16(buf, 6, depth);
    put32(buf, 8, 0);
}

/// Write a leaf extent at `off`.
pub(crate) fn extent_leaf(buf: &mut [u8], off: usize, logical: u32, len: u16, phys: u64) {
    put32(buf, off, logical);
    put16(buf, off + 4, len);
    put16(buf, off + 6, (phys >> 32) as u16);
    put32(buf, off + 8, phys as u32);
}

/// Write an extent index entry at `off`.
pub(crate) fn extent_index(buf: &mut [u8], off: usize, logical: u32, child: u64) {
    put32(buf, off, logical);
    put32(buf, off + 4, child as u32);
    put16(buf, off + 8, (child >> 32) as u16);
    put16(buf, off + 10, 0);
}

/// Length of a directory entry with a name of `name_len` bytes.
pub(crate) fn dirent_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Write a directory entry at `off` with record length `rec_len`.
pub(crate) fn dirent(buf: &mut [u8], off: usize, ino: u32, rec_len: u16, name: &[u8], ft: u8) {
    put32(buf, off, ino);
    put16(buf, off + 4, rec_len);
    if let Some(b) = buf.get_mut(off + 6) {
        *b = name.len() as u8;
    }
    if let Some(b) = buf.get_mut(off + 7) {
        *b = ft;
    }
    put_bytes(buf, off + 8, name);
}

/// Write the checksum tail of a directory leaf block.
pub(crate) fn dir_tail(buf: &mut [u8], iseed: u32) {
    let bs = buf.len();
    let t = bs - 12;
    put32(buf, t, 0);
    put16(buf, t + 4, 12);
    if let Some(b) = buf.get_mut(t + 6) {
        *b = 0;
    }
    if let Some(b) = buf.get_mut(t + 7) {
        *b = 0xDE;
    }
    let c = crc(iseed, buf.get(..t).unwrap_or_default());
    put32(buf, t + 8, c);
}

/// Write the checksum tail of an extent tree block.
pub(crate) fn extent_tail(buf: &mut [u8], iseed: u32) {
    let max = usize::from(get16(buf, 4));
    let t = 12 + 12 * max;
    let c = crc(iseed, buf.get(..t).unwrap_or_default());
    put32(buf, t, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_extra_epoch() {
        assert_eq!(time_parts(0, 5), (0, 20));
        // 2038-01-19T03:14:08Z is 2^31: epoch bit 1.
        assert_eq!(time_parts(1 << 31, 0), (1 << 31, 1));
        assert_eq!(time_parts(-1, 0), (u32::MAX, 0));
    }
}
