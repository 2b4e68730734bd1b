//! The read path of [`Qcow2Image`]: the lock-free mapping-cache hit, plain
//! reads by `pread` at imago's mapping, and compressed clusters imago cannot
//! read (zstd), which we decompress ourselves.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};

use imago::{FormatAccess, Mapping, ShallowMapping};

use super::codec::{read_compressed_cluster, CompressedDescriptor};
use super::image::{im_err, Guard, Qcow2Image, EXTRA_READERS};
use super::spec::OFLAG_COMPRESSED;
use super::storage::HStore;
use super::tables::l2_entry;
use crate::host::{read_or_zero, reopen_read_only};
use crate::{Error, Result};

impl Qcow2Image {
    /// The lock for a request: shared, or exclusive when a layer uses zstd
    /// (our compressed-cluster reads must not race with writes that free the
    /// compressed cluster).
    pub(super) fn io_guard(&self) -> Guard<'_> {
        if self.zstd {
            Guard::W(self.write_lock())
        } else {
            Guard::R(self.read_lock())
        }
    }

    /// Follow the chain's mappings at guest offset `off` (at most `max`
    /// bytes): the depth reached, what was found and for how long, and the
    /// offset inside that layer.
    fn walk(
        &self,
        top: &FormatAccess<HStore>,
        off: u64,
        max: u64,
    ) -> Result<(usize, Found, u64, u64)> {
        let mut layer = top;
        let mut depth = 0usize;
        let mut loff = off;
        let mut max = max;
        loop {
            let (m, len) = layer
                .get_shallow_mapping(loff, max)
                .map_err(|e| im_err(&self.path, "map", e))?;
            let found = match m {
                ShallowMapping::Indirect {
                    layer: next,
                    offset,
                    ..
                } => {
                    layer = next;
                    loff = offset;
                    max = len;
                    depth += 1;
                    if depth > self.layers.len() {
                        return Err(Error::Corrupt {
                            path: self.path.clone(),
                            reason: "mapping recursed below the backing chain".into(),
                        });
                    }
                    continue;
                }
                ShallowMapping::Special { .. } => Found::Compressed,
                ShallowMapping::Eof { .. } => return Ok((depth, Found::Eof, max, loff)),
                _ => Found::Plain,
            };
            return Ok((depth, found, len, loff));
        }
    }

    /// Read through the chain, decompressing compressed clusters ourselves
    /// (imago reads only zlib ones) and letting imago read everything else.
    pub(super) fn read_mixed(
        &self,
        acc: &FormatAccess<HStore>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let rem = (buf.len() - pos) as u64;
            let at = offset + pos as u64;
            let (depth, found, len, loff) = self.walk(acc, at, rem)?;
            let n = len.min(rem) as usize;
            if n == 0 {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("no mapping progress at offset {at}"),
                });
            }
            let Some(chunk) = buf.get_mut(pos..pos + n) else {
                break;
            };
            match found {
                Found::Eof => chunk.fill(0),
                Found::Plain => self.read_plain(acc, chunk, at)?,
                Found::Compressed => {
                    let n = self.read_compressed(acc, depth, loff, chunk)?;
                    pos += n;
                    continue;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Read guest data, except compressed clusters imago cannot read (see
    /// [`Qcow2Image::read_mixed`]): find each piece's host location, then
    /// read it from the file that holds it with a plain `pread`.
    ///
    /// Locations come from the mapping cache for the top layer's data
    /// clusters (see [`Qcow2Image::read_hit`]), else from imago's mapping
    /// through the chain, looked up when the piece is read under the lock
    /// imago's own read would hold (which the caller holds). This is imago's
    /// read without its generic vectored-I/O layer and, on a cache hit,
    /// without its L1/L2 lookups (and, from `read_at`, without our lock):
    /// together some 300 ns per request, 40% of a 4 KiB `pread` from the
    /// page cache (benches/format.rs, `rand_read_4k`).
    pub(super) fn read_plain(
        &self,
        acc: &FormatAccess<HStore>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let rem = (buf.len() - pos) as u64;
            let within = at % cs;
            if let Some(n) = self.read_hit(buf.get_mut(pos..).unwrap_or_default(), at) {
                pos += n;
                continue;
            }
            let epoch = self.mapcache.epoch();
            let (m, len) = acc
                .get_mapping(at, rem)
                .map_err(|e| im_err(&self.path, "map", e))?;
            let n = len.min(rem) as usize;
            if n == 0 {
                // Only past the virtual size, which callers have ruled out.
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    reason: format!("no mapping progress at offset {at}"),
                });
            }
            let chunk = buf.get_mut(pos..pos + n).unwrap_or_default();
            match m {
                Mapping::Raw {
                    storage,
                    offset: host,
                    writable,
                    ..
                } => {
                    // Only mappings that nothing but operations holding a
                    // `Change` can change (see the mapcache module).
                    if let Some(epoch) =
                        epoch.filter(|_| storage.top && (writable || self.read_only))
                    {
                        // Host clusters of one run are consecutive.
                        let mut g = at - within;
                        let mut h = host.checked_sub(within);
                        while let Some(hc) = h.filter(|_| g < at + n as u64) {
                            self.mapcache.insert(g, hc, epoch);
                            g += cs;
                            h = hc.checked_add(cs);
                        }
                    }
                    read_or_zero(&storage.data, chunk, host)
                        .map_err(|e| Error::io(&self.path, "read", e))?
                }
                Mapping::Zero { .. } | Mapping::Eof { .. } => chunk.fill(0),
                // Compressed clusters (zlib) and whatever else imago reads itself.
                _ => acc
                    .read(&mut *chunk, at)
                    .map_err(|e| im_err(&self.path, "read", e))?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Read the start of `buf` from guest offset `at` through the mapping
    /// cache: the run of cached clusters there that are consecutive on the
    /// host too, with one `pread`. Returns the bytes read, or None (and
    /// `buf` holds garbage) if the cache has nothing there or a change of
    /// mappings began meanwhile (see the `mapcache` module); needs no lock.
    pub(super) fn read_hit(&self, buf: &mut [u8], at: u64) -> Option<usize> {
        let cs = self.cluster_size;
        let epoch = self.mapcache.epoch()?;
        let host = self.mapcache.get(at)?;
        let within = at % cs;
        let start = at - within;
        let stop = at.checked_add(buf.len() as u64)?;
        let mut end = start + cs;
        while end < stop && self.mapcache.get(end) == Some(host + (end - start)) {
            end += cs;
        }
        let n = (stop.min(end) - at) as usize;
        let chunk = buf.get_mut(..n)?;
        // An error is reported by the locked path, which reads this again.
        read_or_zero(self.data_reader()?, chunk, host + within).ok()?;
        self.mapcache.unchanged(epoch).then_some(n)
    }

    /// The top file, for this thread's lock-free reads. Threads take turns
    /// over [`EXTRA_READERS`] + 1 open file descriptions of it: `pread`s
    /// of several threads on one description contend on its reference
    /// count (a shared cache line), which cost two readers on one handle
    /// a quarter of their scaling here (docs/performance.md, issue 8).
    fn data_reader(&self) -> Option<&File> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static TURN: usize = NEXT.fetch_add(1, Ordering::Relaxed));
        let top = &self.top().ok()?.file;
        let turn = TURN.with(|t| *t) % (EXTRA_READERS + 1);
        let Some(slot) = turn.checked_sub(1).and_then(|i| self.readers.get(i)) else {
            return Some(top);
        };
        Some(
            slot.get_or_init(|| reopen_read_only(top))
                .as_ref()
                .unwrap_or(top),
        )
    }

    /// Decompress the cluster of layer `depth` holding layer offset `loff`
    /// and copy from it into `out` (up to the cluster's end); returns the
    /// bytes copied.
    fn read_compressed(
        &self,
        acc: &FormatAccess<HStore>,
        depth: usize,
        loff: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let layer = self
            .layers
            .get(depth)
            .ok_or_else(|| corrupt("compressed cluster below the chain".into()))?;
        let h = layer
            .header
            .as_ref()
            .ok_or_else(|| corrupt("compressed cluster in a raw layer".into()))?;
        if depth == 0 && !self.read_only {
            // Our L2 lookup reads the tables on disk: write imago's cache back first.
            acc.flush().map_err(|e| im_err(&self.path, "flush", e))?;
        }
        let cs = h.cluster_size();
        let within = (loff % cs) as usize;
        let entry = l2_entry(&layer.file, &layer.path, h, loff)?;
        if entry & OFLAG_COMPRESSED == 0 {
            return Err(corrupt(format!(
                "{}: cluster at {loff} is not compressed on disk",
                layer.path.display()
            )));
        }
        let mut cache = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
        let hit = matches!(&*cache, Some((d, e, _)) if *d == depth && *e == entry);
        if !hit {
            let mut data = vec![0u8; cs as usize];
            let d = CompressedDescriptor::decode(entry, h.cluster_bits);
            read_compressed_cluster(&layer.file, &layer.path, d, h.compression, &mut data)?;
            *cache = Some((depth, entry, data));
        }
        let data = match &*cache {
            Some((_, _, d)) => d,
            None => return Err(corrupt("decompression cache empty".into())),
        };
        let src = data.get(within..).unwrap_or_default();
        let n = src.len().min(out.len());
        out.get_mut(..n)
            .unwrap_or_default()
            .copy_from_slice(src.get(..n).unwrap_or_default());
        Ok(n)
    }

    /// Before a write-type request on a chain with zstd layers: rewrite, as
    /// plain data, each cluster the request covers only partly and that maps
    /// to compressed data anywhere in the chain. imago's copy-on-write would
    /// otherwise try to decompress it (it reads only zlib).
    pub(super) fn uncompress_edges(
        &self,
        acc: &FormatAccess<HStore>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if !self.zstd || len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let size = acc.size();
        let end = offset + len;
        let mut edges = vec![offset - offset % cs];
        if !end.is_multiple_of(cs) {
            edges.push(end - end % cs);
        }
        if offset.is_multiple_of(cs) {
            edges.remove(0);
        }
        edges.dedup();
        for start in edges {
            let stop = (start + cs).min(size);
            if stop <= start {
                continue;
            }
            // Any compressed data under this cluster?
            let mut p = start;
            let mut compressed = false;
            while p < stop {
                let (_, found, l, _) = self.walk(acc, p, stop - p)?;
                if matches!(found, Found::Compressed) {
                    compressed = true;
                    break;
                }
                p += l.max(1);
            }
            if compressed {
                let mut data = vec![0u8; (stop - start) as usize];
                self.read_mixed(acc, &mut data, start)?;
                acc.write(&data[..], start)
                    .map_err(|e| im_err(&self.path, "rewrite compressed cluster", e))?;
            }
        }
        Ok(())
    }
}

/// What a chain walk found.
enum Found {
    /// Data, zeros or unallocated: imago reads it.
    Plain,
    /// A compressed cluster.
    Compressed,
    /// Past the end of a backing file: zeros.
    Eof,
}
