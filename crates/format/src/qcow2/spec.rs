//! Numbers from QEMU's qcow2 specification (`docs/interop/qcow2.txt`) and
//! QEMU's own limits, which we share so that we refuse what QEMU refuses.

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest qcow2 cluster size (512 B).
pub const MIN_CLUSTER_SIZE: u64 = 512;
/// Largest qcow2 cluster size (2 MiB).
pub const MAX_CLUSTER_SIZE: u64 = 2 << 20;
/// Default qcow2 cluster size (64 KiB), as `qemu-img create` uses.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// Largest virtual size we accept (4 EiB; QEMU allows a little under 8 EiB but
/// no real image comes close, and the margin keeps offset arithmetic safe).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

/// Offset bits of an L1 entry.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry.
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a refcount table entry.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1 and L2 entries.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of an L2 entry.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// "Reads as zeros" flag of a standard L2 entry (v3).
pub(crate) const OFLAG_ZERO: u64 = 1;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Byte 79 holds the low byte of the big-endian incompatible-features field
/// at 72 (the dirty bit 0 and the zstd bit 3).
pub(crate) const INCOMPAT_LOW_BYTE: u64 = 79;
/// Compatible feature bits.
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Bytes of one feature name table entry.
pub(crate) const FEATURE_ENTRY_LEN: usize = 48;
/// Longest backing file name QEMU writes.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

/// Length of the version 3 header we write (with the compression type byte).
pub(crate) const HEADER_LEN_V3: u32 = 112;

/// QEMU's table limits: never allocate tables out of proportion to the file.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
pub(crate) const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
pub(crate) const MAX_SNAPSHOT_EXTRA: u32 = 1024;

/// Big-endian u16 at `at`; 0 where `b` is too short (callers bound-check first).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

/// Big-endian u32 at `at`; 0 where `b` is too short (callers bound-check first).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

/// Big-endian u64 at `at`; 0 where `b` is too short (callers bound-check first).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Store a big-endian u32 at `at` (ignored where `b` is too short).
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(d) = b.get_mut(at..at + 4) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}

/// Store a big-endian u64 at `at` (ignored where `b` is too short).
pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    if let Some(d) = b.get_mut(at..at + 8) {
        d.copy_from_slice(&v.to_be_bytes());
    }
}
