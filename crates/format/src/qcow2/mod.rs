//! qcow2, by concern: the format's numbers ([`spec`](self) constants), the
//! header (one parser plus the vetting that opening adds), growing a closed
//! image ([`grow_file`]), L1/L2 and refcount
//! tables, the codec of compressed clusters, the storage adaptor handed to
//! imago with its write ordering, the image and its read path, crash safety
//! (the dirty bit and the refcount rebuild), `qemu-img map` emulation, metadata
//! access for check/repair, and the writer of fresh layouts.
//!
//! The product API ([`crate::Qcow2Image`], [`crate::Qcow2CreateOptions`])
//! is re-exported at the crate root; this module is the advanced API for
//! tools that look at or build qcow2 files themselves.

mod codec;
mod dirty;
mod grow;
mod header;
mod image;
mod mapcache;
mod meta;
mod ordering;
#[cfg(test)]
mod power_loss_tests;
mod qemu_map;
mod read;
mod rebuild;
mod spec;
mod storage;
mod tables;
mod writer;

pub use codec::ClusterCompressor;
pub use grow::grow_file;
pub use header::{Compression, Qcow2Header};
pub use image::{Qcow2CreateOptions, Qcow2Image};
pub use meta::{Qcow2Meta, SnapshotEntry};
pub use spec::{DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE, QCOW2_MAGIC};
pub use tables::L2Entry;
pub use writer::{Qcow2Writer, Qcow2WriterOptions, WriterStats};

pub(crate) use rebuild::rebuild_refcounts;
pub(crate) use spec::{L1E_OFFSET_MASK, OFLAG_COPIED, REFT_OFFSET_MASK};
pub(crate) use writer::{is_zero, thread_count, write_items, Item};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::codec::{decompress_cluster, ClusterCompressor};
    use super::spec::OFLAG_COMPRESSED;
    use super::tables::{decode_refcounts, L2Entry};
    use super::Compression;

    #[test]
    fn compressed_entry_roundtrip() {
        for bits in [9u32, 16, 21] {
            let off = 0x1_2345u64 << 4 | 3;
            let len = 700u64.min((1 << bits) - 1);
            let sectors = ((off + len - 1) >> 9) - (off >> 9);
            let raw = off | OFLAG_COMPRESSED | (sectors << (62 - (bits - 8)));
            match L2Entry::decode(raw, bits) {
                L2Entry::Compressed { offset, size, .. } => {
                    assert_eq!(offset, off);
                    assert!(size >= len && size < len + 512);
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn compress_roundtrip() {
        for kind in [Compression::Zstd, Compression::Zlib] {
            let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
            let mut c = ClusterCompressor::new(kind, 65536);
            let z = c.compress(&data).unwrap();
            let mut padded = z.clone();
            padded.resize(z.len().next_multiple_of(512), 0xaa);
            let mut out = vec![0u8; 65536];
            decompress_cluster(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            let mut x = 0x1234_5678_u64;
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            assert!(c.compress(&noise).is_none());
            // A short last cluster is compressed padded to a whole cluster.
            let z = c.compress(&data[..1000]).unwrap();
            decompress_cluster(kind, &z, &mut out).unwrap();
            assert_eq!(&out[..1000], &data[..1000]);
            assert!(out[1000..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn refcount_decode_orders() {
        assert_eq!(decode_refcounts(&[0b1011_0001], 0)[..4], [1, 0, 0, 0]);
        assert_eq!(decode_refcounts(&[0b1011_0001], 1), vec![1, 0, 3, 2]);
        assert_eq!(decode_refcounts(&[0x12, 0x34], 4), vec![0x1234]);
    }
}
