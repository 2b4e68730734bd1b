//! [`Qcow2Writer`]: lays out a fresh v3 image sequentially (data and L2
//! tables, then L1, refcounts and header), optionally with compressed
//! clusters compressed in parallel; used by convert and compaction.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::{ClusterCompressor, CompressedDescriptor};
use super::header::Compression;
use super::spec::*;
use crate::{BackingRef, Error, Result};

/// What [`Qcow2Writer`] should make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2WriterOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512, as QEMU
    /// only sees whole sectors).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Compression type recorded in the header (used by compressed clusters).
    pub compression: Compression,
    /// Backing file name as it should be recorded, and its format.
    pub backing: Option<BackingRef>,
}

/// Counters of what a [`Qcow2Writer`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStats {
    /// Guest clusters stored uncompressed.
    pub data_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters recorded as zero (no host space).
    pub zero_clusters: u64,
    /// Final file length in bytes.
    pub file_len: u64,
}

/// Writes a fresh qcow2 v3 image sequentially.
///
/// Guest clusters must be given in increasing order. Host space is handed
/// out by appending: data clusters, compressed data (packed byte by byte
/// into shared host clusters as QEMU does; a partly filled cluster stays open
/// for the next compressed clusters even when normal clusters are appended
/// meanwhile) and each L2 table as soon as its range is complete.
/// [`Qcow2Writer::finish`] appends the L1 table, refcount blocks and table,
/// and writes the header last. Memory: one L2 table, the L1 table, a 1 MiB
/// write buffer and two bytes per host cluster.
#[derive(Debug)]
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    /// Bytes appended but not yet written, starting at host offset `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    opts: Qcow2WriterOptions,
    cluster_bits: u32,
    cs: u64,
    /// End of the allocated host space (always cluster aligned).
    pos: u64,
    /// Host cluster partly filled with compressed data: (offset, bytes used).
    open: Option<(u64, u64)>,
    refcounts: Vec<u16>,
    l1: Vec<u64>,
    cur_l2: Option<(usize, Vec<u64>)>,
    last_guest: Option<u64>,
    guest_clusters: u64,
    stats: WriterStats,
}

/// Flush the append buffer at this size.
const WRITE_BUF: usize = 1 << 20;

impl Qcow2Writer {
    /// Start writing an image into `file` (empty, opened for writing);
    /// `path` is used in error messages.
    pub fn new(file: File, path: &Path, opts: &Qcow2WriterOptions) -> Result<Qcow2Writer> {
        let cs = opts.cluster_size;
        let bad = |reason: String| Error::InvalidArgument {
            path: path.to_path_buf(),
            reason,
        };
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(bad(format!(
                "cluster size {cs} is not a power of two between 512 and 2097152"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        // QEMU sees qcow2 sizes in whole 512-byte sectors (rounding down), so
        // round up as `qemu-img create` does: the tail reads as zeros.
        let mut opts = opts.clone();
        opts.size = opts.size.next_multiple_of(512);
        let opts = &opts;
        let guest_clusters = opts.size.div_ceil(cs);
        let l2_entries = cs / 8;
        let l1_size = guest_clusters.div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(bad(format!(
                "size {} needs an L1 table beyond 32 MiB at cluster size {cs}",
                opts.size
            )));
        }
        if let Some(b) = &opts.backing {
            let name = b.path.as_os_str().as_bytes();
            if name.len() > MAX_BACKING_NAME as usize || header_bytes(opts).len() as u64 > cs {
                return Err(bad(format!(
                    "backing file name of {} bytes does not fit the header cluster",
                    name.len()
                )));
            }
        }
        Ok(Qcow2Writer {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(WRITE_BUF + cs as usize),
            buf_start: cs,
            opts: opts.clone(),
            cluster_bits,
            cs,
            pos: cs,
            open: None,
            refcounts: vec![1],
            l1: vec![0; l1_size as usize],
            cur_l2: None,
            last_guest: None,
            guest_clusters,
            stats: WriterStats::default(),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Bytes of host space allocated so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.buf_start)
                .map_err(|e| Error::io(&self.path, "write", e))?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Append `data` at `pos`, padded with zeros to whole clusters, and
    /// count one reference to every cluster it occupies. Returns its offset.
    fn append(&mut self, data: &[u8]) -> Result<u64> {
        let off = self.pos;
        let len = (data.len() as u64).next_multiple_of(self.cs).max(self.cs);
        if data.len() >= WRITE_BUF / 4 {
            // Large runs go straight to the file, without a copy.
            self.flush_buf()?;
            self.file
                .write_all_at(data, off)
                .map_err(|e| Error::io(&self.path, "write", e))?;
            self.buf_start = off + data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        let pad = (off + len) - (self.buf_start + self.buf.len() as u64);
        self.buf.resize(self.buf.len() + pad as usize, 0);
        self.pos = off + len;
        for c in (off >> self.cluster_bits)..(self.pos >> self.cluster_bits) {
            self.add_ref(c)?;
        }
        if self.buf.len() >= WRITE_BUF {
            self.flush_buf()?;
        }
        Ok(off)
    }

    /// Overwrite already allocated bytes at `off` (in the buffer if still
    /// buffered, else in the file).
    fn patch(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let end = off + data.len() as u64;
        if off < self.buf_start {
            let n = (self.buf_start.min(end) - off) as usize;
            let (head, _) = data.split_at(n);
            self.file
                .write_all_at(head, off)
                .map_err(|e| Error::io(&self.path, "write", e))?;
        }
        if end > self.buf_start {
            let from = self.buf_start.max(off);
            let src = data.get((from - off) as usize..).unwrap_or_default();
            let at = (from - self.buf_start) as usize;
            if let Some(dst) = self.buf.get_mut(at..at + src.len()) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn add_ref(&mut self, cluster: u64) -> Result<()> {
        let idx = usize::try_from(cluster).map_err(|_| Error::InvalidArgument {
            path: self.path.clone(),
            reason: "image too large".into(),
        })?;
        if self.refcounts.len() <= idx {
            self.refcounts.resize(idx + 1, 0);
        }
        if let Some(r) = self.refcounts.get_mut(idx) {
            *r = r.saturating_add(1);
        }
        Ok(())
    }

    fn refcount(&self, cluster: u64) -> u16 {
        self.refcounts.get(cluster as usize).copied().unwrap_or(0)
    }

    fn slot(&mut self, guest: u64) -> Result<&mut u64> {
        if guest >= self.guest_clusters {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                op: "write cluster",
                offset: guest << self.cluster_bits,
                len: self.cs,
                size: self.opts.size,
            });
        }
        if self.last_guest.is_some_and(|l| guest <= l) {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("cluster {guest} written out of order"),
            });
        }
        self.last_guest = Some(guest);
        let per = self.cs / 8;
        let l1i = (guest / per) as usize;
        if self.cur_l2.as_ref().is_some_and(|(i, _)| *i != l1i) {
            self.flush_l2()?;
        }
        if self.cur_l2.is_none() {
            self.cur_l2 = Some((l1i, vec![0u64; per as usize]));
        }
        let j = (guest % per) as usize;
        let path = self.path.clone();
        self.cur_l2
            .as_mut()
            .and_then(|(_, t)| t.get_mut(j))
            .ok_or_else(|| Error::InvalidArgument {
                path,
                reason: "L2 index out of range".into(),
            })
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((l1i, table)) = self.cur_l2.take() {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            let off = self.append(&bytes)?;
            if let Some(e) = self.l1.get_mut(l1i) {
                *e = off | OFLAG_COPIED;
            }
        }
        Ok(())
    }

    /// Store guest cluster `guest` uncompressed. `data` is at most one
    /// cluster; a short last cluster is padded with zeros.
    pub fn write_cluster(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.write_run(guest, data)
    }

    /// Store consecutive guest clusters from `first` uncompressed, in
    /// consecutive host clusters: `data` holds whole clusters, except that
    /// the last one may be short.
    pub fn write_run(&mut self, first: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let n = (data.len() as u64).div_ceil(self.cs);
        // Check every slot first so that a refused run leaves no trace.
        let last = first
            .checked_add(n - 1)
            .ok_or_else(|| Error::InvalidArgument {
                path: self.path.clone(),
                reason: "cluster index overflows".into(),
            })?;
        if last >= self.guest_clusters {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                op: "write cluster",
                offset: first << self.cluster_bits,
                len: data.len() as u64,
                size: self.opts.size,
            });
        }
        if self.last_guest.is_some_and(|l| first <= l) {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("cluster {first} written out of order"),
            });
        }
        // L2 tables are appended when their range is complete, so a run must
        // not straddle one: split it at L2 boundaries.
        let per = self.cs / 8;
        let mut g = first;
        let mut rest = data;
        while !rest.is_empty() {
            let in_table = per - g % per;
            let take = (in_table * self.cs).min(rest.len() as u64) as usize;
            let (part, tail) = rest.split_at(take);
            self.slot(g)?;
            let off = self.append(part)?;
            let k = (part.len() as u64).div_ceil(self.cs);
            for i in 0..k {
                *self.slot_mut(g + i) = (off + i * self.cs) | OFLAG_COPIED;
            }
            self.last_guest = Some(g + k - 1);
            self.stats.data_clusters += k;
            g += k;
            rest = tail;
        }
        Ok(())
    }

    /// The L2 entry of `guest`, in the current table (which `slot` created).
    fn slot_mut(&mut self, guest: u64) -> &mut u64 {
        let per = self.cs / 8;
        let j = (guest % per) as usize;
        match self.cur_l2.as_mut().and_then(|(_, t)| t.get_mut(j)) {
            Some(e) => e,
            None => {
                // Unreachable by construction; keep a harmless sink.
                self.stats.file_len = 0;
                &mut self.stats.file_len
            }
        }
    }

    /// Store guest cluster `guest` as already-compressed bytes (from
    /// [`ClusterCompressor::compress`] with the writer's compression type).
    pub fn write_compressed(&mut self, guest: u64, compressed: &[u8]) -> Result<()> {
        let len = compressed.len() as u64;
        if len == 0 || len >= self.cs {
            return Err(Error::InvalidArgument {
                path: self.path.clone(),
                reason: format!("compressed cluster of {len} bytes"),
            });
        }
        self.slot(guest)?;
        let cs = self.cs;
        // Refcounts are 16 bits wide: never let one host cluster be shared by
        // more compressed clusters than that.
        if let Some((h, _)) = self.open {
            if self.refcount(h >> self.cluster_bits) >= u16::MAX - 1 {
                self.open = None;
            }
        }
        let off = match self.open {
            Some((h, used)) if used + len <= cs => {
                self.patch(h + used, compressed)?;
                self.add_ref(h >> self.cluster_bits)?;
                self.open = (used + len < cs).then_some((h, used + len));
                h + used
            }
            Some((h, used)) if h + cs == self.pos => {
                // The open cluster is the last one: continue into new clusters.
                let (head, tail) = compressed.split_at((cs - used) as usize);
                self.patch(h + used, head)?;
                self.add_ref(h >> self.cluster_bits)?;
                let t = self.append(tail)?;
                let tail_len = tail.len() as u64;
                let last = t + (tail_len - 1) / cs * cs;
                self.open = (!tail_len.is_multiple_of(cs)).then_some((last, tail_len % cs));
                h + used
            }
            _ => {
                let t = self.append(compressed)?;
                let last = t + (len - 1) / cs * cs;
                self.open = (!len.is_multiple_of(cs)).then_some((last, len % cs));
                t
            }
        };
        let entry = CompressedDescriptor::encode(off, len, self.cluster_bits);
        *self.slot_mut(guest) = entry;
        self.stats.compressed_clusters += 1;
        Ok(())
    }

    /// Record guest cluster `guest` as reading zeros (no host space; hides a
    /// backing file's data).
    pub fn write_zero(&mut self, guest: u64) -> Result<()> {
        *self.slot(guest)? = OFLAG_ZERO;
        self.stats.zero_clusters += 1;
        Ok(())
    }

    /// Write the remaining metadata and the header, and fsync the file.
    pub fn finish(self) -> Result<(File, WriterStats)> {
        self.finish_with(true)
    }

    /// [`Qcow2Writer::finish`], with the fsync optional.
    pub fn finish_with(mut self, sync: bool) -> Result<(File, WriterStats)> {
        self.flush_l2()?;
        let cs = self.cs;
        // L1 table.
        let l1_offset = if self.l1.is_empty() {
            0
        } else {
            let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.append(&bytes)?
        };
        // Refcount blocks and table must cover themselves: iterate to a fixed point.
        let used = self.pos >> self.cluster_bits;
        let per_block = cs / 2;
        let (mut rb, mut rt) = (0u64, 0u64);
        loop {
            let total = used + rb + rt;
            let nrb = total.div_ceil(per_block);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if nrb == rb && nrt == rt {
                break;
            }
            rb = nrb;
            rt = nrt;
        }
        let rb_start = used;
        for c in rb_start..rb_start + rb + rt {
            self.add_ref(c)?;
        }
        let mut table = vec![0u8; (rt * cs) as usize];
        for b in 0..rb {
            let mut block = vec![0u8; cs as usize];
            for (k, chunk) in block.chunks_exact_mut(2).enumerate() {
                let idx = (b * per_block) as usize + k;
                if let Some(&r) = self.refcounts.get(idx) {
                    chunk.copy_from_slice(&r.to_be_bytes());
                }
            }
            let at = (b * 8) as usize;
            if let Some(dst) = table.get_mut(at..at + 8) {
                dst.copy_from_slice(&((rb_start + b) * cs).to_be_bytes());
            }
            // Refcounts of these clusters were counted above already.
            self.buf.extend_from_slice(&block);
            self.pos += cs;
            if self.buf.len() >= WRITE_BUF {
                self.flush_buf()?;
            }
        }
        let rt_offset = self.pos;
        self.buf.extend_from_slice(&table);
        self.pos += rt * cs;
        self.flush_buf()?;
        let file_len = self.pos;
        // Header last: until here the file is not a valid image.
        let mut hdr = header_bytes(&self.opts);
        put64(&mut hdr, 40, l1_offset);
        put32(&mut hdr, 36, self.l1.len() as u32);
        put64(&mut hdr, 48, rt_offset);
        put32(&mut hdr, 56, rt as u32);
        self.file
            .write_all_at(&hdr, 0)
            .map_err(|e| Error::io(&self.path, "write header", e))?;
        self.file
            .set_len(file_len)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.path, "fsync", e))?;
        }
        self.stats.file_len = file_len;
        Ok((self.file, self.stats))
    }
}

/// One guest cluster on its way into a [`Qcow2Writer`].
#[derive(Debug)]
pub(crate) enum Item {
    /// Reads as zeros (zero flag, no host space).
    Zero(u64),
    /// Data to store, compressed if the batch is compressed.
    Data(u64, Vec<u8>),
}

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| <[u8; 16]>::try_from(c).is_ok_and(|a| u128::from_ne_bytes(a) == 0))
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Write `items` (in increasing guest order) into `w`, compressing the data
/// clusters in parallel on `compressors.len()` threads when any are given.
/// The output order is kept.
pub(crate) fn write_items(
    w: &mut Qcow2Writer,
    items: &mut Vec<Item>,
    compressors: &mut [ClusterCompressor],
) -> Result<()> {
    if compressors.is_empty() {
        for it in items.drain(..) {
            match it {
                Item::Zero(g) => w.write_zero(g)?,
                Item::Data(g, d) => w.write_cluster(g, &d)?,
            }
        }
        return Ok(());
    }
    let n = items.len();
    let per = n.div_ceil(compressors.len()).max(1);
    let mut results: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .zip(compressors.iter_mut())
            .map(|(chunk, comp)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|it| match it {
                            Item::Zero(_) => None,
                            Item::Data(_, d) => comp.compress(d),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(mut r) => results.append(&mut r),
                // A panicking compressor must not take the process down.
                Err(_) => results.clear(),
            }
        }
    });
    if results.len() != n {
        return Err(Error::InvalidArgument {
            path: w.path.clone(),
            reason: "compression worker failed".into(),
        });
    }
    for (it, c) in items.drain(..).zip(results) {
        match (it, c) {
            (Item::Zero(g), _) => w.write_zero(g)?,
            (Item::Data(g, _), Some(z)) => w.write_compressed(g, &z)?,
            (Item::Data(g, d), None) => w.write_cluster(g, &d)?,
        }
    }
    Ok(())
}

/// Worker count for "0 = all cores".
pub(crate) fn thread_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Header, extensions and backing name (everything in cluster 0), with the
/// table offsets still zero.
fn header_bytes(opts: &Qcow2WriterOptions) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN_V3 as usize];
    h[0..4].copy_from_slice(&QCOW2_MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, opts.cluster_size.trailing_zeros());
    put64(&mut h, 24, opts.size);
    let incompat = match opts.compression {
        Compression::Zstd => INCOMPAT_COMPRESSION,
        Compression::Zlib => 0,
    };
    put64(&mut h, 72, incompat);
    put32(&mut h, 96, 4);
    put32(&mut h, 100, HEADER_LEN_V3);
    h[104] = match opts.compression {
        Compression::Zstd => 1,
        Compression::Zlib => 0,
    };
    if let Some(b) = &opts.backing {
        let f = b.format.as_str().as_bytes();
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(f.len() as u32).to_be_bytes());
        h.extend_from_slice(f);
        h.resize(h.len().next_multiple_of(8), 0);
    }
    h.extend_from_slice(&[0u8; 8]); // end of extensions
    if let Some(b) = &opts.backing {
        let name = b.path.as_os_str().as_bytes();
        let off = h.len() as u64;
        put64(&mut h, 8, off);
        put32(&mut h, 16, name.len() as u32);
        h.extend_from_slice(name);
    }
    h
}

/// Host alignment of the first data cluster of a new image. Data written at
/// 2 MiB-aligned host offsets lands in large page-cache folios; at QEMU's
/// layout (data from 0x50000) random 4 KiB reads measured 10-25 % slower
/// than the same reads from an aligned file (docs/performance.md).
const DATA_ALIGN: u64 = 2 << 20;

/// Write a new, empty image into `file` (empty, opened for writing), laid
/// out so that the first data cluster imago allocates is 2 MiB-aligned:
/// header, L1 table, refcount table, refcount blocks, then as many
/// (empty, preallocated) L2 tables as fit before the 2 MiB mark, and the
/// refcount table stretched to fill the rest. imago allocates first-fit, so
/// data then starts at the mark, and an image of up to 14 GiB (64 KiB
/// clusters) never interleaves L2 tables with its data.
pub(crate) fn write_empty(file: &File, path: &Path, opts: &Qcow2WriterOptions) -> Result<()> {
    let cs = opts.cluster_size;
    let bad = |reason: String| Error::InvalidArgument {
        path: path.to_path_buf(),
        reason,
    };
    let guest_clusters = opts.size.div_ceil(cs);
    let l1_size = guest_clusters.div_ceil(cs / 8);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(bad(format!(
            "size {} needs an L1 table beyond 32 MiB at cluster size {cs}",
            opts.size
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // 16-bit refcounts: cs / 2 entries per refcount block.
    let blocks_for = |clusters: u64| clusters.div_ceil(cs / 2);
    let step = DATA_ALIGN.max(cs) / cs;
    let mut total = step;
    while 1 + l1_clusters + blocks_for(total + 1) + 1 > total {
        total += step;
    }
    // One cluster past the mark too: that is the first data cluster.
    let rb = blocks_for(total + 1);
    let l2 = l1_size.min(total - 1 - l1_clusters - rb - 1);
    let rt = total - 1 - l1_clusters - rb - l2;
    if rt * cs > MAX_REFTABLE_BYTES || rt * cs / 8 < rb {
        return Err(bad(format!(
            "no layout for size {} at cluster size {cs}",
            opts.size
        )));
    }
    let l1_at = cs;
    let rt_at = l1_at + l1_clusters * cs;
    let rb_at = rt_at + rt * cs;
    let l2_at = rb_at + rb * cs;

    let mut hdr = header_bytes(opts);
    if hdr.len() as u64 > cs {
        return Err(bad(format!(
            "backing file name does not fit the header cluster of {cs} bytes"
        )));
    }
    put64(&mut hdr, 40, l1_at);
    put32(&mut hdr, 36, l1_size as u32);
    put64(&mut hdr, 48, rt_at);
    put32(&mut hdr, 56, rt as u32);
    let l1: Vec<u8> = (0..l1_size)
        .flat_map(|i| {
            let e = if i < l2 {
                (l2_at + i * cs) | OFLAG_COPIED
            } else {
                0
            };
            e.to_be_bytes()
        })
        .collect();
    let table: Vec<u8> = (0..rb)
        .flat_map(|k| (rb_at + k * cs).to_be_bytes())
        .collect();
    // Every cluster up to the mark is in use: refcount 1.
    let refs: Vec<u8> = (0..total).flat_map(|_| 1u16.to_be_bytes()).collect();
    let io = |e| Error::io(path, "write new image", e);
    file.set_len(total * cs).map_err(io)?;
    file.write_all_at(&l1, l1_at).map_err(io)?;
    file.write_all_at(&table, rt_at).map_err(io)?;
    file.write_all_at(&refs, rb_at).map_err(io)?;
    // The header last: until it is written the file is no image.
    file.write_all_at(&hdr, 0).map_err(io)
}
