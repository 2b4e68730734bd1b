//! Compressed clusters: the descriptor in an L2 entry, and the one
//! decompressor and compressor of cluster data (zlib as raw deflate with a
//! 4 KiB window, zstd frames), as QEMU writes and reads them.

use std::fs::File;
use std::path::Path;

use super::header::Compression;
use super::spec::OFLAG_COMPRESSED;
use crate::host::read_upto;
use crate::{Error, Result};

/// Where a compressed cluster's bytes lie (qcow2 spec, "Compressed Clusters
/// Descriptor"): host offset in the low `62 - (cluster_bits - 8)` bits, then
/// the count of additional 512-byte sectors up to bit 61.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompressedDescriptor {
    /// Host byte offset of the compressed data.
    pub offset: u64,
    /// Bytes from `offset` to the end of the last sector the data touches.
    pub size: u64,
}

impl CompressedDescriptor {
    /// Decode the descriptor of raw L2 entry `raw` (flags are ignored).
    pub fn decode(raw: u64, cluster_bits: u32) -> CompressedDescriptor {
        // Valid images have 9..=21; clamping keeps the shifts in range.
        let sector_bits = cluster_bits.clamp(9, 21) - 8;
        let shift = 62 - sector_bits;
        let offset = raw & ((1u64 << shift) - 1);
        let sectors = ((raw >> shift) & ((1u64 << sector_bits) - 1)) + 1;
        CompressedDescriptor {
            offset,
            size: (sectors * 512).saturating_sub(offset & 511),
        }
    }

    /// The L2 entry (compressed flag included) for `len` bytes at `offset`.
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let sectors = ((offset + len.max(1) - 1) >> 9) - (offset >> 9);
        offset | OFLAG_COMPRESSED | (sectors << (62 - (cluster_bits - 8)))
    }
}

/// Read the compressed cluster described by `d` from `file` (at `path`) and
/// decompress it into `out` (one cluster). The recorded size ends at a sector
/// boundary, which may lie past the end of the file for the last cluster.
pub(crate) fn read_compressed_cluster(
    file: &File,
    path: &Path,
    d: CompressedDescriptor,
    kind: Compression,
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("compressed cluster at {:#x}: {reason}", d.offset),
    };
    if d.size > 2 * out.len() as u64 + 512 {
        return Err(corrupt(format!("size {} is absurd", d.size)));
    }
    let mut data = vec![0u8; d.size as usize];
    let got = read_upto(file, &mut data, d.offset)
        .map_err(|e| Error::io(path, "read compressed cluster", e))?;
    if got == 0 {
        return Err(corrupt("beyond end of file".into()));
    }
    data.truncate(got);
    decompress_cluster(kind, &data, out).map_err(corrupt)
}

/// Decompress one compressed cluster (`data` may carry trailing sector
/// padding) into `out`, which must be filled exactly.
pub(crate) fn decompress_cluster(
    kind: Compression,
    data: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    match kind {
        Compression::Zlib => {
            // Raw deflate (no zlib header), as QEMU writes it.
            let mut d = flate2::Decompress::new(false);
            let st = d
                .decompress(data, out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("zlib: {e}"))?;
            let _ = st;
            if d.total_out() as usize != out.len() {
                return Err(format!(
                    "zlib: decompressed {} bytes, expected {}",
                    d.total_out(),
                    out.len()
                ));
            }
            Ok(())
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut input = InBuffer::around(data);
            let mut output = OutBuffer::around(out);
            loop {
                let before_in = input.pos();
                let before_out = output.pos();
                let hint = dec
                    .run(&mut input, &mut output)
                    .map_err(|e| format!("zstd: {e}"))?;
                if output.pos() == output.capacity() || hint == 0 {
                    break;
                }
                if input.pos() == before_in && output.pos() == before_out {
                    break;
                }
            }
            if output.pos() != output.capacity() {
                return Err(format!(
                    "zstd: decompressed {} bytes, expected {}",
                    output.pos(),
                    output.capacity()
                ));
            }
            Ok(())
        }
    }
}

/// A reusable per-thread compressor for clusters.
pub struct ClusterCompressor {
    kind: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zlib: Option<flate2::Compress>,
    out: Vec<u8>,
    /// Largest useful compressed size (less than a cluster).
    limit: usize,
    /// Cluster size; shorter input is padded with zeros to it.
    cluster_size: usize,
    padded: Vec<u8>,
}

impl std::fmt::Debug for ClusterCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCompressor")
            .field("kind", &self.kind)
            .finish()
    }
}

impl ClusterCompressor {
    /// A compressor for clusters of `cluster_size` bytes.
    pub fn new(kind: Compression, cluster_size: usize) -> ClusterCompressor {
        ClusterCompressor {
            kind,
            // Level 3 is QEMU's (zstd's default).
            zstd: match kind {
                Compression::Zstd => zstd::bulk::Compressor::new(3).ok(),
                Compression::Zlib => None,
            },
            // QEMU inflates with a 4 KiB window (windowBits -12), so we must
            // deflate with one too.
            zlib: match kind {
                Compression::Zlib => Some(flate2::Compress::new_with_window_bits(
                    flate2::Compression::default(),
                    false,
                    12,
                )),
                Compression::Zstd => None,
            },
            // Room for deflate's worst case: zlib-rs misbehaves when a
            // stored block does not fit the output, so never let it run out.
            out: vec![0u8; cluster_size + cluster_size / 8 + 1024],
            limit: cluster_size.saturating_sub(1),
            cluster_size,
            padded: Vec::new(),
        }
    }

    /// Compress one cluster (a short one is padded with zeros to the
    /// cluster size). Returns `None` when it does not shrink below a cluster
    /// (QEMU then stores it uncompressed, and so do we).
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() > self.cluster_size {
            return None;
        }
        if data.len() < self.cluster_size {
            // A reader inflates a whole cluster: the short last cluster of an
            // image is compressed padded with zeros.
            let mut padded = std::mem::take(&mut self.padded);
            padded.clear();
            padded.extend_from_slice(data);
            padded.resize(self.cluster_size, 0);
            let r = self.compress(&padded);
            self.padded = padded;
            return r;
        }
        match self.kind {
            Compression::Zstd => {
                let c = self.zstd.as_mut()?;
                let out = self.out.get_mut(..self.limit)?;
                let n = c.compress_to_buffer(data, out).ok()?;
                self.out.get(..n).map(|s| s.to_vec())
            }
            Compression::Zlib => {
                let c = self.zlib.as_mut()?;
                c.reset();
                let st = c
                    .compress(data, &mut self.out, flate2::FlushCompress::Finish)
                    .ok()?;
                if st != flate2::Status::StreamEnd {
                    return None;
                }
                let n = usize::try_from(c.total_out()).ok()?;
                if n > self.limit {
                    return None;
                }
                self.out.get(..n).map(|s| s.to_vec())
            }
        }
    }
}
