//! `unused_ranges`, the ext4-aware input of image compaction: `None` exactly
//! when there is no ext filesystem; the free map when there is a readable
//! one; an error (never `None`) when there is one we must not trust.

use vmvol_format::{BlockIo, Control, Prealloc, RawImage};
use vmvol_fs::{free_map, mkfs, unused_ranges, Error, MkfsOptions};

const MIB: u64 = 1 << 20;

fn image(dir: &tempfile::TempDir, size: u64) -> RawImage {
    RawImage::create(
        &dir.path().join("vol.raw"),
        size,
        Prealloc::Off,
        &Control::new(),
    )
    .unwrap()
}

/// Rewrite the primary superblock through `edit`, keeping its checksum valid
/// when `fix_csum` (ext4's checksum is the raw CRC32C: the standard one inverted).
fn edit_superblock(img: &RawImage, fix_csum: bool, edit: impl FnOnce(&mut [u8])) {
    let mut sb = vec![0u8; 1024];
    img.read_at(&mut sb, 1024).unwrap();
    edit(&mut sb);
    if fix_csum {
        let c = !crc32c::crc32c(&sb[..0x3FC]);
        sb[0x3FC..].copy_from_slice(&c.to_le_bytes());
    }
    img.write_at(&sb, 1024).unwrap();
}

#[test]
fn no_filesystem_is_none() {
    let dir = tempfile::tempdir().unwrap();
    // All zeros.
    let img = image(&dir, 16 * MIB);
    assert_eq!(unused_ranges(&img).unwrap(), None);
    // Junk without the magic.
    let junk: Vec<u8> = (0..MIB).map(|i| (i * 13 + 5) as u8).collect();
    img.write_at(&junk, 0).unwrap();
    assert_eq!(unused_ranges(&img).unwrap(), None);
    // Too small to hold a superblock.
    let d2 = tempfile::tempdir().unwrap();
    let tiny = image(&d2, 1536);
    assert_eq!(unused_ranges(&tiny).unwrap(), None);
}

#[test]
fn readable_ext4_gives_its_free_map() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 256 * MIB);
    mkfs(&img, &MkfsOptions::default()).unwrap();
    let ranges = unused_ranges(&img).unwrap().expect("an ext4 filesystem");
    assert_eq!(ranges, free_map(&img).unwrap().ranges);
    assert!(ranges.iter().map(|r| r.len).sum::<u64>() > 200 * MIB);
    // Sorted, disjoint, never touching the superblock.
    for w in ranges.windows(2) {
        assert!(w[0].end() < w[1].offset);
    }
    assert!(ranges.iter().all(|r| r.offset >= 4096 && r.len > 0));
}

#[test]
fn checksum_mismatch_is_an_error_not_none() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 64 * MIB);
    mkfs(&img, &MkfsOptions::default()).unwrap();
    // One flipped bit in the free-blocks count, checksum left stale.
    edit_superblock(&img, false, |sb| sb[0xC] ^= 1);
    let err = unused_ranges(&img).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn needs_recovery_and_unknown_features_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 64 * MIB);
    mkfs(&img, &MkfsOptions::default()).unwrap();
    // needs_recovery (incompat 0x4): the bitmaps may lag the journal.
    edit_superblock(&img, true, |sb| sb[0x60] |= 0x4);
    let err = unused_ranges(&img).unwrap_err();
    assert!(matches!(err, Error::NeedsRecovery { .. }), "{err}");
    edit_superblock(&img, true, |sb| sb[0x60] &= !0x4);
    assert!(unused_ranges(&img).unwrap().is_some());
    // An unknown incompatible feature (bit 30).
    edit_superblock(&img, true, |sb| sb[0x63] |= 0x40);
    let err = unused_ranges(&img).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}
