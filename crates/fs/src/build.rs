//! The filesystem writer shared by `mkfs` and `populate`: lays out groups,
//! allocates blocks and inodes, and writes all metadata with checksums.

use std::collections::BTreeMap;

use vmvol_format::{BlockIo, Control};

use crate::ext4::bitmap::set_bits;
use crate::ext4::csum::{self, crc32c};
use crate::ext4::features::{
    COMPAT_HAS_JOURNAL, COMPAT_RESIZE_INODE, WRITER_COMPAT, WRITER_INCOMPAT, WRITER_RO_COMPAT,
};
use crate::ext4::field::{get32, put16, put32, put32be, put8, put_bytes};
use crate::ext4::group::{
    self as grp_desc, DescCsum, BG_BLOCK_UNINIT, BG_INODE_UNINIT, BG_INODE_ZEROED,
};
use crate::ext4::records::{self as disk, Inode, Times};
use crate::ext4::superblock::{self as sb, *};
use crate::layout::{
    default_journal_blocks, has_super, Geometry, Used, FIRST_INO, FLEX_GROUPS, INODE_SIZE,
    MAX_EXTENT_LEN, SUPER_BACKUPS,
};
use crate::mkfs::{Journal, MkfsOptions};
use crate::{Error, Result};

const ROOT_INO: u32 = 2;
const RESIZE_INO: u32 = 7;
const JOURNAL_INO: u32 = 8;
const LPF_INO: u32 = 11;

/// Largest batch of coalesced metadata writes.
const BATCH_LIMIT: usize = 8 << 20;

/// A directory being built: its parent and entries (name, inode, file type).
pub(crate) struct DirBuild {
    pub parent: u32,
    pub entries: Vec<(Vec<u8>, u32, u8)>,
    /// Minimum number of blocks (lost+found is preallocated).
    pub min_blocks: u64,
}

/// Coalescing writer: small metadata writes sorted and merged into large ones.
struct Batch {
    items: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    written: u64,
}

impl Batch {
    fn push(&mut self, dev: &dyn BlockIo, offset: u64, data: Vec<u8>) -> Result<()> {
        self.bytes += data.len();
        self.items.push((offset, data));
        if self.bytes >= BATCH_LIMIT {
            self.flush(dev)?;
        }
        Ok(())
    }

    fn flush(&mut self, dev: &dyn BlockIo) -> Result<()> {
        let mut items = std::mem::take(&mut self.items);
        self.bytes = 0;
        items.sort_by_key(|(o, _)| *o);
        let mut i = 0;
        while i < items.len() {
            // The run of items that are contiguous on disk, written at once.
            let start = items.get(i).map(|x| x.0).unwrap_or(0);
            let mut end = start;
            let mut j = i;
            while let Some((o, d)) = items.get(j) {
                if *o != end || (end - start) as usize >= BATCH_LIMIT {
                    break;
                }
                end += d.len() as u64;
                j += 1;
            }
            if j == i + 1 {
                if let Some((o, d)) = items.get(i) {
                    dev.write_at(d, *o)
                        .map_err(|e| Error::block("write metadata", e))?;
                }
            } else {
                let mut buf = Vec::with_capacity((end - start) as usize);
                for (_, d) in items.get(i..j).unwrap_or_default() {
                    buf.extend_from_slice(d);
                }
                dev.write_at(&buf, start)
                    .map_err(|e| Error::block("write metadata", e))?;
            }
            self.written += end - start;
            i = j.max(i + 1);
        }
        Ok(())
    }
}

/// The filesystem under construction.
pub(crate) struct Builder<'a> {
    dev: &'a dyn BlockIo,
    control: &'a Control,
    /// The operation, for [`Error::Cancelled`].
    op: &'static str,
    pub g: Geometry,
    opts: MkfsOptions,
    pub used: Used,
    bb: Vec<u64>,
    ib: Vec<u64>,
    it: Vec<u64>,
    itable_zeroed: Vec<bool>,
    pub inodes: BTreeMap<u32, Inode>,
    pub dirs: BTreeMap<u32, DirBuild>,
    next_ino: u32,
    cursor: u64,
    pub uuid: uuid::Uuid,
    seed: u32,
    pub now: i64,
    journal: Vec<(u64, u64)>,
    journal_blocks: u64,
    resize_dind: u64,
    batch: Batch,
    /// Bytes of file data written by populate.
    pub data_written: u64,
    /// Bytes not written because the device already reads zeros there.
    pub skipped: u64,
}

impl<'a> Builder<'a> {
    /// Lay out a fresh filesystem on `dev` (nothing written yet except zeroing
    /// of inode tables on devices that are not known to read zeros).
    pub fn new(
        dev: &'a dyn BlockIo,
        opts: &MkfsOptions,
        control: &'a Control,
        op: &'static str,
    ) -> Result<Self> {
        let g = check_options(dev, opts)?;
        let journal_blocks = match opts.journal {
            Journal::None => 0,
            Journal::Default => default_journal_blocks(g.blocks_count).unwrap_or(0),
            Journal::Blocks(n) => u64::from(n),
        };
        let uuid = opts.uuid.unwrap_or_else(uuid::Uuid::new_v4);
        let seed = csum::fs_seed(uuid.as_bytes());
        let now = opts.timestamp.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        let groups = g.groups as usize;
        let mut b = Builder {
            dev,
            control,
            op,
            opts: opts.clone(),
            used: Used::default(),
            bb: vec![0; groups],
            ib: vec![0; groups],
            it: vec![0; groups],
            itable_zeroed: vec![false; groups],
            inodes: BTreeMap::new(),
            dirs: BTreeMap::new(),
            next_ino: FIRST_INO + 1,
            cursor: 0,
            uuid,
            seed,
            now,
            journal: Vec::new(),
            journal_blocks,
            resize_dind: 0,
            batch: Batch {
                items: Vec::new(),
                bytes: 0,
                written: 0,
            },
            data_written: 0,
            skipped: 0,
            g,
        };
        b.layout()?;
        b.make_root()?;
        Ok(b)
    }

    fn layout(&mut self) -> Result<()> {
        let g = self.g.clone();
        if g.first_data_block > 0 {
            // Block 0 of a 1 KiB-block filesystem lies outside every group.
            self.used.mark(0, g.first_data_block)?;
        }
        for grp in (0..g.groups).filter(|&x| has_super(x)) {
            self.used.mark(g.group_first(grp), g.base_meta(grp))?;
        }
        let itb = u64::from(g.inode_blocks_per_group);
        let mut flex_start = 0u32;
        while flex_start < g.groups {
            self.check_cancel()?;
            let n = FLEX_GROUPS.min(g.groups - flex_start);
            let goal = g.group_first(flex_start);
            let bb = self.alloc_contig(goal, u64::from(n))?;
            let ib = self.alloc_contig(bb + u64::from(n), u64::from(n))?;
            let it = self.alloc_contig(ib + u64::from(n), itb * u64::from(n))?;
            for i in 0..n {
                let grp = (flex_start + i) as usize;
                self.bb[grp] = bb + u64::from(i);
                self.ib[grp] = ib + u64::from(i);
                self.it[grp] = it + u64::from(i) * itb;
            }
            // Inode tables: skip when already zero, else zero (or leave for
            // the kernel's lazy init when asked to).
            let off = it * g.bs();
            let len = itb * u64::from(n) * g.bs();
            let zero = self
                .dev
                .known_zero(off, len)
                .map_err(|e| Error::block("probe inode tables", e))?;
            let zeroed = if zero {
                self.skipped += len;
                true
            } else if self.opts.lazy_itable_init {
                false
            } else {
                self.dev
                    .write_zeroes(off, len)
                    .map_err(|e| Error::block("zero inode tables", e))?;
                true
            };
            for i in 0..n {
                self.itable_zeroed[(flex_start + i) as usize] = zeroed;
            }
            flex_start += n;
        }
        self.cursor = self.it.first().copied().unwrap_or(0) + itb;
        if g.resize_inode {
            self.resize_dind = self.alloc_contig(self.cursor, 1)?;
        }
        if self.journal_blocks > 0 {
            // As mke2fs: the journal starts at the flex group in the middle of the filesystem.
            let mid =
                ((g.blocks_count - g.first_data_block) / 2 / u64::from(g.blocks_per_group)) as u32;
            let mid = if g.groups > FLEX_GROUPS {
                mid & !(FLEX_GROUPS - 1)
            } else {
                mid
            };
            let goal = g.group_first(mid);
            let mut runs = self.alloc_runs(goal, self.journal_blocks)?;
            if runs.is_empty() {
                runs = self.alloc_runs(g.first_data_block, self.journal_blocks)?;
            }
            self.journal = runs;
        }
        Ok(())
    }

    /// `Err(Cancelled)` once the caller asked to cancel.
    pub fn check_cancel(&self) -> Result<()> {
        if self.control.is_cancelled() {
            Err(Error::Cancelled { op: self.op })
        } else {
            Ok(())
        }
    }

    fn alloc_contig(&mut self, goal: u64, n: u64) -> Result<u64> {
        let limit = self.g.blocks_count;
        let (s, _) = self
            .used
            .find_free(goal, n, limit, true)
            .or_else(|| self.used.find_free(self.g.first_data_block, n, limit, true))
            .ok_or_else(|| no_space(n))?;
        self.used.mark(s, n)?;
        Ok(s)
    }

    /// Allocate `n` blocks from `goal` onwards in as few runs as possible.
    fn alloc_runs(&mut self, goal: u64, n: u64) -> Result<Vec<(u64, u64)>> {
        let limit = self.g.blocks_count;
        let mut runs = Vec::new();
        let mut left = n;
        let mut pos = goal;
        let mut wrapped = false;
        while left > 0 {
            match self.used.find_free(pos, left, limit, false) {
                Some((s, l)) => {
                    self.used.mark(s, l)?;
                    runs.push((s, l));
                    left -= l;
                    pos = s + l;
                }
                None if !wrapped => {
                    wrapped = true;
                    pos = self.g.first_data_block;
                }
                // The caller abandons the filesystem on error (populate discards the device).
                None => return Err(no_space(n)),
            }
        }
        Ok(runs)
    }

    /// Allocate `n` data blocks at the allocation cursor.
    pub fn alloc_data(&mut self, n: u64) -> Result<Vec<(u64, u64)>> {
        let runs = self.alloc_runs(self.cursor, n)?;
        if let Some(&(s, l)) = runs.last() {
            self.cursor = s + l;
        }
        Ok(runs)
    }

    /// Allocate the next inode number.
    pub fn alloc_ino(&mut self) -> Result<u32> {
        let ino = self.next_ino;
        if u64::from(ino) > self.g.inodes_count() {
            return Err(Error::LimitExceeded {
                what: "inode count",
                reason: format!("the filesystem has only {} inodes", self.g.inodes_count()),
            });
        }
        self.next_ino += 1;
        Ok(ino)
    }

    fn make_root(&mut self) -> Result<()> {
        let t = Times::all(self.now);
        let root = Inode::new(
            disk::S_IFDIR | 0o755,
            self.opts.root_uid,
            self.opts.root_gid,
            t,
        );
        self.inodes.insert(ROOT_INO, root);
        self.dirs.insert(
            ROOT_INO,
            DirBuild {
                parent: ROOT_INO,
                entries: Vec::new(),
                min_blocks: 1,
            },
        );
        let lpf = Inode::new(disk::S_IFDIR | 0o700, 0, 0, t);
        self.inodes.insert(LPF_INO, lpf);
        let lpf_blocks = (16384 / self.g.bs()).min(12);
        self.dirs.insert(
            LPF_INO,
            DirBuild {
                parent: ROOT_INO,
                entries: Vec::new(),
                min_blocks: lpf_blocks,
            },
        );
        self.add_entry(ROOT_INO, b"lost+found".to_vec(), LPF_INO, 2)?;
        Ok(())
    }

    /// Add a name to a directory.
    pub fn add_entry(&mut self, dir: u32, name: Vec<u8>, ino: u32, ft: u8) -> Result<()> {
        let d = self
            .dirs
            .get_mut(&dir)
            .ok_or_else(|| Error::corrupt(format!("internal: inode {dir} is not a directory")))?;
        d.entries.push((name, ino, ft));
        Ok(())
    }

    /// Write `data` at filesystem block `block` (through the metadata batch
    /// when small, directly when large).
    pub fn write_blocks(&mut self, block: u64, data: Vec<u8>) -> Result<()> {
        let off = block * self.g.bs();
        if data.len() >= 1 << 20 {
            self.dev
                .write_at(&data, off)
                .map_err(|e| Error::block("write data", e))?;
            self.batch.written += data.len() as u64;
            Ok(())
        } else {
            self.batch.push(self.dev, off, data)
        }
    }

    /// Write file data directly (no batching).
    pub fn write_data(&mut self, block: u64, data: &[u8]) -> Result<()> {
        self.dev
            .write_at(data, block * self.g.bs())
            .map_err(|e| Error::block("write file data", e))?;
        self.data_written += data.len() as u64;
        Ok(())
    }

    /// Map `runs` of (logical block, physical block, length) into `inode`'s
    /// extent tree, allocating and writing tree blocks as needed. Returns the
    /// number of tree blocks used.
    pub fn map_extents(
        &mut self,
        ino: u32,
        inode: &mut Inode,
        runs: &[(u64, u64, u64)],
    ) -> Result<u64> {
        let mut exts: Vec<(u32, u16, u64)> = Vec::new();
        for &(l, p, n) in runs {
            let mut done = 0;
            while done < n {
                let len = (n - done).min(MAX_EXTENT_LEN);
                let logical = u32::try_from(l + done)
                    .map_err(|_| Error::invalid("file too large for ext4 extents"))?;
                exts.push((logical, len as u16, p + done));
                done += len;
            }
        }
        inode.set_flags(inode.flags() | disk::EXTENTS_FL);
        if exts.len() <= 4 {
            let ib = inode.i_block();
            disk::extent_header(ib, exts.len() as u16, 4, 0);
            for (i, &(l, n, p)) in exts.iter().enumerate() {
                disk::extent_leaf(ib, 12 + 12 * i, l, n, p);
            }
            return Ok(0);
        }
        let bs = self.g.bs() as usize;
        let per_block = (bs - 12) / 12;
        let iseed = disk::inode_seed(self.seed, ino, 0);
        let mut tree_blocks = 0u64;
        // Level 0: leaves; then index levels until the root fits in the inode.
        let mut level: Vec<(u32, u64)> = Vec::new();
        let chunks: Vec<&[(u32, u16, u64)]> = exts.chunks(per_block).collect();
        let leaf_start = self.alloc_meta(chunks.len() as u64)?;
        for (i, chunk) in chunks.iter().enumerate() {
            let mut buf = vec![0u8; bs];
            disk::extent_header(&mut buf, chunk.len() as u16, per_block as u16, 0);
            for (j, &(l, n, p)) in chunk.iter().enumerate() {
                disk::extent_leaf(&mut buf, 12 + 12 * j, l, n, p);
            }
            disk::extent_tail(&mut buf, iseed);
            let blk = leaf_start + i as u64;
            self.write_blocks(blk, buf)?;
            level.push((chunk.first().map(|e| e.0).unwrap_or(0), blk));
            tree_blocks += 1;
        }
        let mut depth = 1u16;
        while level.len() > 4 {
            let chunks: Vec<Vec<(u32, u64)>> =
                level.chunks(per_block).map(|c| c.to_vec()).collect();
            let start = self.alloc_meta(chunks.len() as u64)?;
            let mut next = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let mut buf = vec![0u8; bs];
                disk::extent_header(&mut buf, chunk.len() as u16, per_block as u16, depth);
                for (j, &(l, c)) in chunk.iter().enumerate() {
                    disk::extent_index(&mut buf, 12 + 12 * j, l, c);
                }
                disk::extent_tail(&mut buf, iseed);
                let blk = start + i as u64;
                self.write_blocks(blk, buf)?;
                next.push((chunk.first().map(|e| e.0).unwrap_or(0), blk));
                tree_blocks += 1;
            }
            level = next;
            depth += 1;
        }
        let ib = inode.i_block();
        disk::extent_header(ib, level.len() as u16, 4, depth);
        for (i, &(l, c)) in level.iter().enumerate() {
            disk::extent_index(ib, 12 + 12 * i, l, c);
        }
        Ok(tree_blocks)
    }

    /// Contiguous metadata blocks at the cursor (or anywhere).
    fn alloc_meta(&mut self, n: u64) -> Result<u64> {
        let s = self.alloc_contig(self.cursor, n)?;
        self.cursor = s + n;
        Ok(s)
    }

    fn write_dirs(&mut self) -> Result<()> {
        let bs = self.g.bs() as usize;
        let payload = bs - 12;
        let dirs = std::mem::take(&mut self.dirs);
        for (&ino, d) in &dirs {
            let iseed = disk::inode_seed(self.seed, ino, 0);
            let mut blocks: Vec<Vec<u8>> = Vec::new();
            let mut buf = vec![0u8; bs];
            let mut last_off = 0usize;
            let mut off = 0usize;
            let push = |buf: &mut Vec<u8>,
                        off: &mut usize,
                        last_off: &mut usize,
                        name: &[u8],
                        e_ino: u32,
                        ft: u8,
                        blocks: &mut Vec<Vec<u8>>| {
                let len = disk::dirent_len(name.len());
                if *off + len > payload {
                    put16(buf, *last_off + 4, (payload - *last_off) as u16);
                    disk::dir_tail(buf, iseed);
                    blocks.push(std::mem::replace(buf, vec![0u8; bs]));
                    *off = 0;
                }
                disk::dirent(buf, *off, e_ino, len as u16, name, ft);
                *last_off = *off;
                *off += len;
            };
            push(&mut buf, &mut off, &mut last_off, b".", ino, 2, &mut blocks);
            push(
                &mut buf,
                &mut off,
                &mut last_off,
                b"..",
                d.parent,
                2,
                &mut blocks,
            );
            for (name, e_ino, ft) in &d.entries {
                push(
                    &mut buf,
                    &mut off,
                    &mut last_off,
                    name,
                    *e_ino,
                    *ft,
                    &mut blocks,
                );
            }
            put16(&mut buf, last_off + 4, (payload - last_off) as u16);
            disk::dir_tail(&mut buf, iseed);
            blocks.push(buf);
            while (blocks.len() as u64) < d.min_blocks {
                let mut e = vec![0u8; bs];
                disk::dirent(&mut e, 0, 0, payload as u16, b"", 0);
                disk::dir_tail(&mut e, iseed);
                blocks.push(e);
            }
            let n = blocks.len() as u64;
            let runs = self.alloc_data(n)?;
            let mut logical = 0u64;
            let mut ext = Vec::new();
            let mut it = blocks.into_iter();
            for &(s, l) in &runs {
                let mut data = Vec::with_capacity(l as usize * bs);
                for _ in 0..l {
                    if let Some(b) = it.next() {
                        data.extend_from_slice(&b);
                    }
                }
                self.write_blocks(s, data)?;
                ext.push((logical, s, l));
                logical += l;
            }
            let mut inode = self.inodes.remove(&ino).ok_or_else(|| {
                Error::corrupt(format!("internal: directory inode {ino} missing"))
            })?;
            let tree = self.map_extents(ino, &mut inode, &ext)?;
            inode.set_size(n * bs as u64);
            inode.set_blocks(n + tree, self.g.block_size);
            let subdirs = d.entries.iter().filter(|e| e.2 == 2).count() as u64;
            let links = 2 + subdirs;
            inode.set_links(if links >= 65000 { 1 } else { links as u16 });
            self.inodes.insert(ino, inode);
        }
        Ok(())
    }

    fn write_journal(&mut self) -> Result<()> {
        if self.journal_blocks == 0 {
            return Ok(());
        }
        let bs = self.g.bs();
        let runs = self.journal.clone();
        // Journal body: zero unless already zero.
        for &(s, l) in &runs {
            let (off, len) = (s * bs, l * bs);
            if self
                .dev
                .known_zero(off, len)
                .map_err(|e| Error::block("probe journal", e))?
            {
                self.skipped += len;
            } else {
                self.dev
                    .write_zeroes(off, len)
                    .map_err(|e| Error::block("zero journal", e))?;
            }
        }
        let mut jsb = vec![0u8; bs as usize];
        // jbd2 `journal_superblock_t` (big-endian).
        put32be(&mut jsb, 0x0, 0xC03B_3998); // h_magic
        put32be(&mut jsb, 0x4, 4); // h_blocktype: superblock v2
        put32be(&mut jsb, 0xC, bs as u32); // s_blocksize
        put32be(&mut jsb, 0x10, self.journal_blocks as u32); // s_maxlen
        put32be(&mut jsb, 0x14, 1); // s_first
        put32be(&mut jsb, 0x18, 1); // s_sequence
        put_bytes(&mut jsb, 0x30, self.uuid.as_bytes()); // s_uuid
        put32be(&mut jsb, 0x40, 1); // s_nr_users
        let first = runs.first().map(|r| r.0).unwrap_or(0);
        self.write_blocks(first, jsb)?;
        let mut inode = Inode::new(disk::S_IFREG | 0o600, 0, 0, Times::all(self.now));
        inode.set_links(1);
        let mut ext = Vec::new();
        let mut logical = 0;
        for &(s, l) in &runs {
            ext.push((logical, s, l));
            logical += l;
        }
        let tree = self.map_extents(JOURNAL_INO, &mut inode, &ext)?;
        inode.set_size(self.journal_blocks * bs);
        inode.set_blocks(self.journal_blocks + tree, self.g.block_size);
        self.inodes.insert(JOURNAL_INO, inode);
        Ok(())
    }

    fn write_resize_inode(&mut self) -> Result<()> {
        if !self.g.resize_inode {
            return Ok(());
        }
        let g = self.g.clone();
        let bs = g.bs() as usize;
        let apb = (bs / 4) as u64;
        let backups: Vec<u64> = SUPER_BACKUPS.backup_groups(u64::from(g.groups)).collect();
        let mut dind = vec![0u8; bs];
        let mut count = 1u64;
        // The primary reserved GDT blocks each list their backups; written in
        // chunks through one reused buffer (4 MiB on a large filesystem).
        const CHUNK_BLOCKS: u64 = 64;
        let rsv = u64::from(g.reserved_gdt);
        let first_rsv = g.first_data_block + 1 + g.desc_blocks;
        let mut chunk = vec![0u8; (CHUNK_BLOCKS.min(rsv) as usize) * bs];
        let mut done = 0u64;
        while done < rsv {
            self.check_cancel()?;
            let n = CHUNK_BLOCKS.min(rsv - done);
            let buf = chunk.get_mut(..n as usize * bs).unwrap_or_default();
            buf.fill(0);
            for k in 0..n {
                let rsv_off = done + k;
                let gdt_off = ((g.desc_blocks + rsv_off) % apb) as usize;
                let grp_blk = first_rsv + rsv_off;
                put32(&mut dind, gdt_off * 4, grp_blk as u32);
                count += 1;
                for (i, &b) in backups.iter().enumerate() {
                    let expect = grp_blk + b * u64::from(g.blocks_per_group);
                    put32(buf, k as usize * bs + i * 4, expect as u32);
                    count += 1;
                }
            }
            self.dev
                .write_at(buf, (first_rsv + done) * g.bs())
                .map_err(|e| Error::block("write reserved group descriptors", e))?;
            self.batch.written += buf.len() as u64;
            done += n;
        }
        self.write_blocks(self.resize_dind, dind)?;
        let mut inode = Inode::new(disk::S_IFREG | 0o600, 0, 0, Times::all(self.now));
        inode.set_links(1);
        put32(inode.i_block(), 13 * 4, self.resize_dind as u32);
        inode.set_size((apb * apb + apb + 12) * g.bs());
        inode.set_blocks(count, g.block_size);
        self.inodes.insert(RESIZE_INO, inode);
        Ok(())
    }

    /// Write everything and the superblocks last. Consumes the builder.
    pub fn finish(mut self) -> Result<Finished> {
        self.write_dirs()?;
        self.write_journal()?;
        self.write_resize_inode()?;
        // Inode 1 (bad blocks) carries the creation times, as mke2fs writes it.
        let mut bad = Inode::new(0, 0, 0, Times::all(self.now));
        bad.0[disk::I_EXTRA_ISIZE..].fill(0);
        self.inodes.insert(1, bad);
        let g = self.g.clone();
        let bs = g.bs() as usize;
        let ipg = g.inodes_per_group;
        let last = g.groups - 1;

        // Per-group inode usage.
        let mut gstats: BTreeMap<u32, (u32, u32, u32)> = BTreeMap::new(); // group -> (used, max idx+1, dirs)
        for (&ino, inode) in &self.inodes {
            let grp = (ino - 1) / ipg;
            let idx = (ino - 1) % ipg;
            let e = gstats.entry(grp).or_insert((0, 0, 0));
            e.1 = e.1.max(idx + 1);
            if inode.mode() & 0o170000 == disk::S_IFDIR {
                e.2 += 1;
            }
        }
        // Reserved inodes 1..=10 count as used in group 0.
        if let Some(e) = gstats.get_mut(&0) {
            e.1 = e.1.max(FIRST_INO - 1);
        }
        let used_inos: BTreeMap<u32, ()> = self
            .inodes
            .keys()
            .map(|&k| (k, ()))
            .chain((1..FIRST_INO).map(|k| (k, ())))
            .collect();
        for &ino in used_inos.keys() {
            let grp = (ino - 1) / ipg;
            if let Some(e) = gstats.get_mut(&grp) {
                e.0 += 1;
            }
        }

        // Inode tables: every block holding a used inode.
        let ipb = (bs / INODE_SIZE as usize) as u32;
        let inodes = std::mem::take(&mut self.inodes);
        let mut cur_blk: Option<(u64, Vec<u8>)> = None;
        for (&ino, inode) in &inodes {
            let grp = (ino - 1) / ipg;
            let idx = (ino - 1) % ipg;
            let blk = self.it[grp as usize] + u64::from(idx / ipb);
            let mut ibuf = inode.clone();
            ibuf.finish(self.seed, ino);
            if cur_blk.as_ref().map(|c| c.0) != Some(blk) {
                if let Some((b, data)) = cur_blk.take() {
                    self.write_blocks(b, data)?;
                }
                cur_blk = Some((blk, vec![0u8; bs]));
            }
            if let Some((_, data)) = cur_blk.as_mut() {
                put_bytes(data, ((idx % ipb) * INODE_SIZE) as usize, &ibuf.0);
            }
        }
        if let Some((b, data)) = cur_blk.take() {
            self.write_blocks(b, data)?;
        }

        // Group descriptors and bitmaps.
        const DESC: usize = grp_desc::DESC_SIZE_64;
        let desc_csum = DescCsum::Crc32c { seed: self.seed };
        let mut gdt = vec![0u8; (g.desc_blocks as usize) * bs];
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        let mut dirs_total = 0u64;
        let fs_bytes = g.blocks_count * g.bs();
        for grp in 0..g.groups {
            self.control.report(g.group_first(grp) * g.bs(), fs_bytes);
            self.check_cancel()?;
            let gs = g.group_first(grp);
            let glen = g.group_len(grp);
            let mut used_count = 0u64;
            for (s, e) in self.used.ranges_in(gs, gs + glen) {
                used_count += e - s;
            }
            let free = glen - used_count;
            free_blocks_total += free;
            let mut flags = 0u16;
            let block_uninit = grp != last && used_count == g.base_meta(grp);
            let mut bb_csum = 0u32;
            if block_uninit {
                flags |= BG_BLOCK_UNINIT;
            } else {
                let mut bm = vec![0u8; bs];
                for (s, e) in self.used.ranges_in(gs, gs + glen) {
                    set_bits(&mut bm, s - gs, e - gs);
                }
                set_bits(&mut bm, glen, bs as u64 * 8);
                bb_csum = crc32c(self.seed, &bm[..(g.blocks_per_group / 8) as usize]);
                self.write_blocks(self.bb[grp as usize], bm)?;
            }
            let (iused, imax, idirs) = gstats.get(&grp).copied().unwrap_or((0, 0, 0));
            let mut ib_csum = 0u32;
            if imax == 0 {
                flags |= BG_INODE_UNINIT;
            } else {
                let mut bm = vec![0u8; bs];
                for &ino in used_inos
                    .range(grp * ipg + 1..=(grp + 1) * ipg)
                    .map(|(k, _)| k)
                {
                    let idx = u64::from((ino - 1) % ipg);
                    set_bits(&mut bm, idx, idx + 1);
                }
                set_bits(&mut bm, u64::from(ipg), bs as u64 * 8);
                ib_csum = crc32c(self.seed, &bm[..(ipg / 8) as usize]);
                self.write_blocks(self.ib[grp as usize], bm)?;
            }
            if self.itable_zeroed[grp as usize] {
                flags |= BG_INODE_ZEROED;
            }
            let free_inodes = ipg - iused;
            free_inodes_total += u64::from(free_inodes);
            dirs_total += u64::from(idirs);
            let off = grp as usize * DESC;
            let d = &mut gdt[off..off + DESC];
            let (bb, ib, it) = (
                self.bb[grp as usize],
                self.ib[grp as usize],
                self.it[grp as usize],
            );
            put32(d, grp_desc::BG_BLOCK_BITMAP_LO, bb as u32);
            put32(d, grp_desc::BG_INODE_BITMAP_LO, ib as u32);
            put32(d, grp_desc::BG_INODE_TABLE_LO, it as u32);
            put16(d, grp_desc::BG_FREE_BLOCKS_COUNT_LO, free as u16);
            put16(d, grp_desc::BG_FREE_INODES_COUNT_LO, free_inodes as u16);
            put16(d, grp_desc::BG_USED_DIRS_COUNT_LO, idirs as u16);
            put16(d, grp_desc::BG_FLAGS, flags);
            put16(d, grp_desc::BG_BLOCK_BITMAP_CSUM_LO, bb_csum as u16);
            put16(d, grp_desc::BG_INODE_BITMAP_CSUM_LO, ib_csum as u16);
            put16(d, grp_desc::BG_ITABLE_UNUSED_LO, (ipg - imax) as u16);
            put32(d, grp_desc::BG_BLOCK_BITMAP_HI, (bb >> 32) as u32);
            put32(d, grp_desc::BG_INODE_BITMAP_HI, (ib >> 32) as u32);
            put32(d, grp_desc::BG_INODE_TABLE_HI, (it >> 32) as u32);
            put16(d, grp_desc::BG_FREE_BLOCKS_COUNT_HI, (free >> 16) as u16);
            put16(
                d,
                grp_desc::BG_FREE_INODES_COUNT_HI,
                (free_inodes >> 16) as u16,
            );
            put16(d, grp_desc::BG_USED_DIRS_COUNT_HI, (idirs >> 16) as u16);
            put16(
                d,
                grp_desc::BG_ITABLE_UNUSED_HI,
                ((ipg - imax) >> 16) as u16,
            );
            put16(d, grp_desc::BG_BLOCK_BITMAP_CSUM_HI, (bb_csum >> 16) as u16);
            put16(d, grp_desc::BG_INODE_BITMAP_CSUM_HI, (ib_csum >> 16) as u16);
            let c = desc_csum.compute(grp, d).unwrap_or(0);
            put16(d, grp_desc::BG_CHECKSUM, c);
        }
        let _ = dirs_total;
        self.batch.flush(self.dev)?;

        // Superblock and descriptor copies: backups first, primary last.
        let sb = self.superblock(&inodes, free_blocks_total, free_inodes_total);
        for grp in (1..g.groups).filter(|&x| has_super(x)) {
            self.check_cancel()?;
            let start = g.group_first(grp);
            let mut copy = sb.clone();
            put16(&mut copy, S_BLOCK_GROUP_NR, grp as u16);
            sb::set_checksum(&mut copy);
            let mut blk = vec![0u8; bs];
            // A backup superblock sits at the start of its group's first block.
            put_bytes(&mut blk, 0, &copy);
            self.dev
                .write_at(&blk, start * g.bs())
                .map_err(|e| Error::block("write backup superblock", e))?;
            self.dev
                .write_at(&gdt, (start + 1) * g.bs())
                .map_err(|e| Error::block("write backup group descriptors", e))?;
            self.batch.written += (blk.len() + gdt.len()) as u64;
        }
        self.dev
            .write_at(&gdt, (g.first_data_block + 1) * g.bs())
            .map_err(|e| Error::block("write group descriptors", e))?;
        // Boot sector area before the superblock: zero unless already zero.
        if !self
            .dev
            .known_zero(0, 1024)
            .map_err(|e| Error::block("probe boot sector", e))?
        {
            self.dev
                .write_at(&[0u8; 1024], 0)
                .map_err(|e| Error::block("zero boot sector", e))?;
        }
        // One flush at the end: a crash before it leaves a device the caller
        // formats again anyway; the primary superblock is still written last.
        let mut primary = sb;
        sb::set_checksum(&mut primary);
        self.dev
            .write_at(&primary, 1024)
            .map_err(|e| Error::block("write superblock", e))?;
        self.dev.flush().map_err(|e| Error::block("flush", e))?;
        self.batch.written += (gdt.len() + primary.len()) as u64;
        Ok(Finished {
            geometry: g,
            journal_blocks: self.journal_blocks,
            uuid: self.uuid,
            free_blocks: free_blocks_total,
            free_inodes: free_inodes_total,
            metadata_written: self.batch.written,
            data_written: self.data_written,
            skipped: self.skipped,
        })
    }

    fn superblock(
        &self,
        inodes: &BTreeMap<u32, Inode>,
        free_blocks: u64,
        free_inodes: u64,
    ) -> Vec<u8> {
        let g = &self.g;
        let mut s = vec![0u8; sb::LEN];
        let r_blocks = (g.blocks_count as f64 * self.opts.reserved_percent / 100.0) as u64;
        put32(&mut s, S_INODES_COUNT, g.inodes_count() as u32);
        put32(&mut s, S_BLOCKS_COUNT_LO, g.blocks_count as u32);
        put32(&mut s, S_R_BLOCKS_COUNT_LO, r_blocks as u32);
        put32(&mut s, S_FREE_BLOCKS_COUNT_LO, free_blocks as u32);
        put32(&mut s, S_FREE_INODES_COUNT, free_inodes as u32);
        put32(&mut s, S_FIRST_DATA_BLOCK, g.first_data_block as u32);
        put32(&mut s, S_LOG_BLOCK_SIZE, g.log_block());
        put32(&mut s, S_LOG_CLUSTER_SIZE, g.log_block());
        put32(&mut s, S_BLOCKS_PER_GROUP, g.blocks_per_group);
        put32(&mut s, S_CLUSTERS_PER_GROUP, g.blocks_per_group);
        put32(&mut s, S_INODES_PER_GROUP, g.inodes_per_group);
        put32(&mut s, S_WTIME, self.now as u32);
        // -1: no mount-count-triggered checks (mke2fs default).
        put16(&mut s, S_MAX_MNT_COUNT, 0xFFFF);
        put16(&mut s, S_MAGIC, sb::MAGIC);
        put16(&mut s, S_STATE, STATE_VALID);
        put16(&mut s, S_ERRORS, 1); // continue
        put32(&mut s, S_LASTCHECK, self.now as u32);
        put32(&mut s, S_REV_LEVEL, 1); // dynamic
        put32(&mut s, S_FIRST_INO, FIRST_INO);
        put16(&mut s, S_INODE_SIZE, INODE_SIZE as u16);
        let journal = self.journal_blocks > 0;
        let mut compat = WRITER_COMPAT;
        if journal {
            compat |= COMPAT_HAS_JOURNAL;
        }
        if g.resize_inode {
            compat |= COMPAT_RESIZE_INODE;
        }
        put32(&mut s, S_FEATURE_COMPAT, compat);
        put32(&mut s, S_FEATURE_INCOMPAT, WRITER_INCOMPAT);
        put32(&mut s, S_FEATURE_RO_COMPAT, WRITER_RO_COMPAT);
        put_bytes(&mut s, S_UUID, self.uuid.as_bytes());
        put_bytes(&mut s, S_VOLUME_NAME, self.opts.label.as_bytes());
        put16(&mut s, S_RESERVED_GDT_BLOCKS, g.reserved_gdt as u16);
        if journal {
            put32(&mut s, S_JOURNAL_INUM, JOURNAL_INO);
        }
        let hash_seed = self.opts.hash_seed.unwrap_or_else(uuid::Uuid::new_v4);
        put_bytes(&mut s, S_HASH_SEED, hash_seed.as_bytes());
        put8(&mut s, S_DEF_HASH_VERSION, HASH_HALF_MD4);
        put16(&mut s, S_DESC_SIZE, grp_desc::DESC_SIZE_64 as u16);
        put32(&mut s, S_DEFAULT_MOUNT_OPTS, DEFM_XATTR_USER | DEFM_ACL);
        put32(&mut s, S_MKFS_TIME, self.now as u32);
        if journal {
            put8(&mut s, S_JNL_BACKUP_TYPE, JNL_BACKUP_BLOCKS);
            if let Some(ji) = inodes.get(&JOURNAL_INO) {
                put_bytes(&mut s, S_JNL_BLOCKS, disk::i_block_of(&ji.0));
                put32(&mut s, S_JNL_BLOCKS + 60, get32(&ji.0, disk::I_SIZE_HIGH));
                put32(&mut s, S_JNL_BLOCKS + 64, get32(&ji.0, disk::I_SIZE_LO));
            }
        }
        put32(&mut s, S_BLOCKS_COUNT_HI, (g.blocks_count >> 32) as u32);
        put32(&mut s, S_R_BLOCKS_COUNT_HI, (r_blocks >> 32) as u32);
        put32(&mut s, S_FREE_BLOCKS_HI, (free_blocks >> 32) as u32);
        put16(&mut s, S_MIN_EXTRA_ISIZE, disk::EXTRA_ISIZE);
        put16(&mut s, S_WANT_EXTRA_ISIZE, disk::EXTRA_ISIZE);
        put32(&mut s, S_FLAGS, FLAGS_SIGNED_HASH);
        put8(
            &mut s,
            S_LOG_GROUPS_PER_FLEX,
            FLEX_GROUPS.trailing_zeros() as u8,
        );
        put8(&mut s, S_CHECKSUM_TYPE, CHECKSUM_CRC32C);
        // High bytes of the timestamps (dates past 2038).
        let hi = (self.now >> 32) as u8;
        put8(&mut s, S_WTIME_HI, hi);
        put8(&mut s, S_MKFS_TIME_HI, hi);
        put8(&mut s, S_LASTCHECK_HI, hi);
        s
    }
}

/// Validate options against the device without writing anything.
pub(crate) fn check_options(dev: &dyn BlockIo, opts: &MkfsOptions) -> Result<Geometry> {
    if dev.is_read_only() {
        return Err(Error::invalid("the image is open read-only"));
    }
    if opts.label.len() > 16 {
        return Err(Error::invalid(format!(
            "label {:?} is longer than 16 bytes",
            opts.label
        )));
    }
    if !(0.0..=50.0).contains(&opts.reserved_percent) {
        return Err(Error::invalid(format!(
            "reserved blocks percentage {} is not between 0 and 50",
            opts.reserved_percent
        )));
    }
    let g = Geometry::compute(dev.size(), opts.block_size, opts.inode_ratio)?;
    match opts.journal {
        Journal::None => {}
        Journal::Default => {
            if default_journal_blocks(g.blocks_count).is_none() {
                return Err(Error::invalid(
                    "filesystem too small for a journal (fewer than 2048 blocks)",
                ));
            }
        }
        Journal::Blocks(n) => {
            if n < 1024 || u64::from(n) > g.blocks_count / 2 || n > 10_240_000 {
                return Err(Error::invalid(format!(
                    "journal of {n} blocks: must be at least 1024 blocks and at most half the filesystem"
                )));
            }
        }
    }
    Ok(g)
}

/// Run `f` (which writes a filesystem over the whole of `dev`) after
/// checking `opts`; on any error, cancel included, discard the whole device
/// so that it reads as zeros and no half-written filesystem is left.
pub(crate) fn discard_on_error<T>(
    dev: &dyn BlockIo,
    opts: &MkfsOptions,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    check_options(dev, opts)?;
    match f() {
        Ok(r) => Ok(r),
        Err(e) => {
            // Best effort: the error that stopped us is the one to report.
            let _ = dev.discard(0, dev.size());
            let _ = dev.flush();
            Err(e)
        }
    }
}

/// Result of [`Builder::finish`].
pub(crate) struct Finished {
    pub geometry: Geometry,
    pub journal_blocks: u64,
    pub uuid: uuid::Uuid,
    pub free_blocks: u64,
    pub free_inodes: u64,
    pub metadata_written: u64,
    pub data_written: u64,
    pub skipped: u64,
}

fn no_space(n: u64) -> Error {
    Error::LimitExceeded {
        what: "filesystem size",
        reason: format!("no room for {n} more blocks"),
    }
}
