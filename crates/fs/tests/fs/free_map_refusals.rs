//! Free-space map refusals and robustness: journals needing recovery, unknown
//! features, checksum mismatches and random corruption of the superblock, the
//! group descriptors and the bitmaps are refused with the right error and
//! never panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::OnceLock;

use crate::support::{require_tool, run_cmd as run};
use proptest::prelude::*;
use vmvol_format::{BlockIo, RawImage};
use vmvol_fs::{free_map, Error, FreeMap};

/// An image in memory, so each proptest case corrupts its own copy cheaply.
struct Mem(Vec<u8>);

impl BlockIo for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vmvol_format::Result<()> {
        let out_of_range = || vmvol_format::Error::OutOfRange {
            path: "mem".into(),
            op: "read",
            offset,
            len: buf.len() as u64,
            size: self.0.len() as u64,
        };
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(out_of_range)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> vmvol_format::Result<()> {
        Err(vmvol_format::Error::ReadOnly {
            path: "mem".into(),
            op: "write",
        })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> vmvol_format::Result<()> {
        self.write_at(&[], 0)
    }
    fn discard(&self, _: u64, _: u64) -> vmvol_format::Result<()> {
        self.write_at(&[], 0)
    }
    fn flush(&self) -> vmvol_format::Result<()> {
        Ok(())
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// ext4's raw CRC32C continuation.
fn ext4_crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Recompute the superblock checksum (metadata_csum) of an image in memory.
fn fix_sb_csum(img: &mut [u8]) {
    let sb = &mut img[1024..2048];
    let c = ext4_crc(!0, &sb[..0x3FC]);
    sb[0x3FC..].copy_from_slice(&c.to_le_bytes());
}

/// Recompute every group descriptor checksum (metadata_csum, non-meta_bg
/// table right after the superblock) from the current superblock fields.
fn fix_desc_csums(img: &mut [u8]) {
    let sb = img[1024..2048].to_vec();
    let bs = 1024usize << le32(&sb, 0x18).min(6);
    let fdb = le32(&sb, 0x14) as usize;
    let bpg = le32(&sb, 0x20).max(1) as usize;
    let blocks = le32(&sb, 0x4) as usize;
    let groups = blocks.saturating_sub(fdb).div_ceil(bpg).min(1 << 16);
    let is64 = le32(&sb, 0x60) & 0x80 != 0;
    let ds = if is64 { le16(&sb, 0xFE) as usize } else { 32 };
    if !(32..=1024).contains(&ds) {
        return;
    }
    let seed = ext4_crc(!0, &sb[0x68..0x78]);
    let gdt = (1024 / bs + 1) * bs;
    for g in 0..groups {
        let off = gdt + g * ds;
        let Some(d) = img.get_mut(off..off + ds) else {
            return;
        };
        let c = ext4_crc(seed, &(g as u32).to_le_bytes());
        let c = ext4_crc(c, &d[..0x1E]);
        let c = ext4_crc(c, &[0, 0]);
        let c = ext4_crc(c, &d[0x20..]);
        d[0x1E..0x20].copy_from_slice(&(c as u16).to_le_bytes());
    }
}

fn mkfs_bytes(size: u64, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(args)
        .arg(&path));
    std::fs::read(&path).unwrap()
}

/// 8 MiB, 1 KiB blocks, 8 groups of 1024 blocks with flex_bg: most groups
/// BLOCK_UNINIT, metadata of all groups in group 0.
fn base_csum() -> &'static Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| mkfs_bytes(8 << 20, &["-b", "1024", "-g", "1024", "-N", "512"]))
}

/// The same without any checksum, so corruption reaches the deeper checks.
fn base_plain() -> &'static Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        mkfs_bytes(
            8 << 20,
            &[
                "-b",
                "1024",
                "-g",
                "1024",
                "-N",
                "512",
                "-O",
                "^metadata_csum,^uninit_bg",
            ],
        )
    })
}

fn map_of(img: &[u8]) -> Result<FreeMap, Error> {
    free_map(&Mem(img.to_vec()))
}

fn set_incompat(img: &mut [u8], bits: u32) {
    let v = le32(&img[1024..], 0x60) | bits;
    img[1024 + 0x60..1024 + 0x64].copy_from_slice(&v.to_le_bytes());
    fix_sb_csum(img);
}

#[test]
fn needs_recovery_set_by_debugfs_is_refused() {
    if !require_tool("mkfs.ext4") || !require_tool("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    std::fs::write(&path, base_csum()).unwrap();
    run(Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&path));
    let img = RawImage::open(&path, true).unwrap();
    let err = free_map(&img).unwrap_err();
    assert!(matches!(err, Error::NeedsRecovery { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("journal") && msg.contains("replay"), "{msg}");
}

#[test]
fn needs_recovery_bit_edited_is_refused() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    let mut img = base_csum().clone();
    assert!(map_of(&img).is_ok());
    set_incompat(&mut img, 0x4);
    let err = map_of(&img).unwrap_err();
    assert!(matches!(err, Error::NeedsRecovery { .. }), "{err}");
}

#[test]
fn unknown_incompat_bit_is_refused_and_named() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    for (bit, name) in [
        (0x4000_0000u32, "unknown bit 30"),
        (0x20, "unknown bit 5"),
        (0x8, "journal_dev"),
        (0x1, "compression"),
    ] {
        let mut img = base_csum().clone();
        set_incompat(&mut img, bit);
        let err = map_of(&img).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    // An unknown read-only-compatible bit is refused as well.
    let mut img = base_csum().clone();
    let v = le32(&img[1024..], 0x64) | 0x8000_0000;
    img[1024 + 0x64..1024 + 0x68].copy_from_slice(&v.to_le_bytes());
    fix_sb_csum(&mut img);
    assert!(matches!(map_of(&img), Err(Error::Unsupported { .. })));
}

#[test]
fn error_and_unclean_states_are_refused() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    // Errors recorded.
    let mut img = base_csum().clone();
    img[1024 + 0x3A] |= 0x2;
    fix_sb_csum(&mut img);
    assert!(matches!(map_of(&img), Err(Error::NeedsRecovery { .. })));
    // No journal and not cleanly unmounted.
    let mut img = base_plain().clone();
    let compat = le32(&img[1024..], 0x5C) & !0x4;
    img[1024 + 0x5C..1024 + 0x60].copy_from_slice(&compat.to_le_bytes());
    assert!(map_of(&img).is_ok());
    img[1024 + 0x3A] &= !0x1;
    let err = map_of(&img).unwrap_err();
    assert!(err.to_string().contains("not cleanly unmounted"), "{err}");
}

#[test]
fn checksum_mismatches_are_corruption() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    let base = base_csum();
    // Superblock byte flipped, checksum left alone.
    let mut img = base.clone();
    img[1024 + 0x10] ^= 1;
    let err = map_of(&img).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }) && err.to_string().contains("superblock checksum"),
        "{err}"
    );
    // Group descriptor 3 byte flipped.
    let mut img = base.clone();
    img[2048 + 3 * 64 + 0xC] ^= 1;
    let err = map_of(&img).unwrap_err();
    assert!(
        err.to_string().contains("group 3 descriptor checksum"),
        "{err}"
    );
    // Group 0's block bitmap byte flipped.
    let bb = le32(&img[2048..], 0) as usize;
    let mut img = base.clone();
    img[bb * 1024 + 100] ^= 0x10;
    let err = map_of(&img).unwrap_err();
    assert!(
        err.to_string().contains("group 0: block bitmap") && err.to_string().contains("checksum"),
        "{err}"
    );
}

#[test]
fn not_ext4_and_truncated_devices() {
    assert!(matches!(
        map_of(&vec![0u8; 1 << 20]),
        Err(Error::NotExt4 { .. })
    ));
    assert!(matches!(map_of(&[0u8; 100]), Err(Error::NotExt4 { .. })));
    if !require_tool("mkfs.ext4") {
        return;
    }
    // A filesystem longer than its device is refused, not read past the end.
    let img = &base_csum()[..6 << 20];
    let err = map_of(img).unwrap_err();
    assert!(err.to_string().contains("device holds only"), "{err}");
}

/// Group 4 of a 64 MiB filesystem with flex groups of 4 holds the bitmaps
/// and inode tables of groups 4-7. Marked BLOCK_UNINIT by hand, its synthesised
/// bitmap must still keep all of them used (the kernel alone would only keep
/// group 4's own); dumpe2fs agrees because groups 5-7 are uninitialised too.
#[test]
fn uninit_group_holding_other_groups_metadata() {
    if !require_tool("mkfs.ext4") || !require_tool("dumpe2fs") {
        return;
    }
    let mut img = mkfs_bytes(
        64 << 20,
        &[
            "-b",
            "1024",
            "-g",
            "1024",
            "-G",
            "4",
            "-N",
            "2048",
            "-O",
            "^has_journal",
        ],
    );
    let gdt = 2048;
    let desc = |img: &[u8], g: usize| img[gdt + g * 64..gdt + (g + 1) * 64].to_vec();
    let d4 = desc(&img, 4);
    let flags = le16(&d4, 0x12);
    assert_eq!(flags & 2, 0, "mke2fs left group 4 initialised");
    // Group 4's bitmap must show only metadata (so flagging it uninit is honest).
    let start4 = 1 + 4 * 1024;
    let meta: Vec<(u64, u64)> = (4..8)
        .flat_map(|g| {
            let d = desc(&img, g);
            let it = u64::from(le32(&d, 8));
            [
                (u64::from(le32(&d, 0)), 1),
                (u64::from(le32(&d, 4)), 1),
                (it, 2048 * 256 / 1024 / 64),
            ]
        })
        .collect();
    for &(b, n) in &meta {
        let inside = start4..start4 + 1024;
        assert!(
            inside.contains(&b) && inside.contains(&(b + n - 1)),
            "metadata {b}+{n} not in group 4"
        );
    }
    img[gdt + 4 * 64 + 0x12..gdt + 4 * 64 + 0x14].copy_from_slice(&(flags | 2).to_le_bytes());
    fix_desc_csums(&mut img);
    let m = map_of(&img).unwrap();
    for (b, n) in meta {
        assert!(
            !m.is_free(b * 1024, n * 1024),
            "metadata at {b}+{n} reported free"
        );
    }
    // And dumpe2fs (e2fsprogs marks every uninit group's own metadata) agrees.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    std::fs::write(&path, &img).unwrap();
    let text = run(Command::new("dumpe2fs").arg(&path));
    assert!(text.contains("Group 4: (Blocks 4097-5120) csum"));
    let free4: Vec<&str> = text
        .split("Group 4:")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Free blocks:"))
        .take(1)
        .collect();
    let expected: Vec<String> = m
        .ranges
        .iter()
        .filter(|r| r.offset >= 4097 * 1024 && r.offset < 5121 * 1024)
        .map(|r| {
            let a = r.offset / 1024;
            let b = (r.end() / 1024).min(5121) - 1;
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    assert_eq!(free4[0].trim(), expected.join(", "));
}

/// Where to corrupt.
#[derive(Debug, Clone)]
enum Target {
    /// Superblock bytes, then (maybe) a fixed checksum.
    Superblock,
    /// Group descriptor table bytes.
    Descriptors,
    /// Block bitmap bytes (anywhere in the bitmap blocks).
    Bitmaps,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Superblock),
        Just(Target::Descriptors),
        Just(Target::Bitmaps)
    ]
}

/// Apply `edits` (offset within the region, value) to a copy of `base`.
fn corrupt(base: &[u8], t: &Target, edits: &[(usize, u8)], fix: bool) -> Vec<u8> {
    let mut img = base.to_vec();
    let (start, len) = match t {
        Target::Superblock => (1024, 1024),
        // 8 descriptors of 64 bytes; the rest of the block is padding.
        Target::Descriptors => (2048, 512),
        // Bitmaps of all 8 groups sit at blocks 259.. (flex_bg) or in each group.
        Target::Bitmaps => (259 * 1024, 16 * 1024),
    };
    for &(off, val) in edits {
        // Values biased towards extremes, which make the worst counts.
        img[start + off % len] = val;
    }
    if fix {
        fix_sb_csum(&mut img);
        fix_desc_csums(&mut img);
    }
    img
}

fn check_invariants(m: &FreeMap) {
    let mut prev = 0u64;
    let mut total = 0u64;
    for r in &m.ranges {
        assert!(r.len > 0);
        assert!(prev == 0 || r.offset > prev, "unsorted/unmerged at {r:?}");
        assert!(r.end() <= m.fs_bytes && m.fs_bytes <= m.device_bytes);
        prev = r.end();
        total += r.len;
    }
    assert_eq!(total, m.free_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random corruption never panics; an accepted map is well formed; and
    /// with checksummed metadata, corruption that is not re-checksummed is
    /// always refused.
    #[test]
    fn corruption_never_panics(
        t in target(),
        edits in prop::collection::vec(
            (any::<usize>(), prop_oneof![Just(0u8), Just(0xFF), Just(1), Just(0x80), any::<u8>()]),
            1..24,
        ),
        plain in any::<bool>(),
        fix in any::<bool>(),
    ) {
        if !require_tool("mkfs.ext4") {
            return Ok(());
        }
        let base = if plain { base_plain() } else { base_csum() };
        let img = corrupt(base, &t, &edits, fix && !plain);
        let changed = img != *base;
        match map_of(&img) {
            Ok(m) => {
                check_invariants(&m);
                // Clearing metadata_csum itself (read-only-compatible feature
                // word) legitimately turns checksums off.
                let feature_word = matches!(t, Target::Superblock)
                    && edits.iter().any(|(o, _)| (0x64..0x68).contains(&(o % 1024)));
                if !plain && !fix && changed && !feature_word {
                    // Only bitmap bytes past the checksummed part, or
                    // superblock/descriptor bytes the checksums do not cover,
                    // can pass; none of those exist in the regions we hit
                    // except bitmap blocks of uninitialised groups.
                    prop_assert!(matches!(t, Target::Bitmaps), "unchecksummed change accepted");
                }
            }
            Err(e) => {
                // Every refusal names what is wrong.
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// Corrupting bitmap bytes (checksums fixed or absent) may change what
    /// is free, but never frees the filesystem's own metadata.
    #[test]
    fn bitmap_corruption_never_frees_metadata(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..64),
        plain in any::<bool>(),
    ) {
        if !require_tool("mkfs.ext4") {
            return Ok(());
        }
        let base = if plain { base_plain() } else { base_csum() };
        let mut img = corrupt(base, &Target::Bitmaps, &edits, false);
        if !plain {
            fix_bitmap_csums(&mut img);
        }
        let m = map_of(&img).unwrap();
        check_invariants(&m);
        // Superblock, descriptors, reserved GDT, bitmaps, inode tables of
        // all 8 groups, which flex_bg put in group 0: blocks 1..=402.
        prop_assert!(!m.ranges.iter().any(|r| r.offset < 403 * 1024));
    }
}

/// Recompute block bitmap checksums (metadata_csum) of the 8-group image.
fn fix_bitmap_csums(img: &mut [u8]) {
    let sb = img[1024..2048].to_vec();
    let seed = ext4_crc(!0, &sb[0x68..0x78]);
    let cpg = le32(&sb, 0x20) as usize;
    for g in 0..8 {
        let d = 2048 + g * 64;
        if le16(img, d + 0x12) & 2 != 0 {
            continue;
        }
        let bb = le32(img, d) as usize;
        let c = ext4_crc(seed, &img[bb * 1024..bb * 1024 + cpg / 8]);
        img[d + 0x18..d + 0x1A].copy_from_slice(&(c as u16).to_le_bytes());
        img[d + 0x38..d + 0x3A].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    }
    fix_desc_csums(img);
}

/// Sanity check of the helpers: the untouched images map cleanly and
/// re-checksumming an unchanged image changes nothing.
#[test]
fn helpers_are_faithful() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    let mut img = base_csum().clone();
    fix_sb_csum(&mut img);
    fix_desc_csums(&mut img);
    fix_bitmap_csums(&mut img);
    assert!(img == *base_csum());
    let m = map_of(&img).unwrap();
    assert!(m.free_bytes > 4 << 20);
    assert!(map_of(base_plain()).is_ok());
}

/// A hand-made superblock on a 64 GiB sparse device declaring the smallest
/// groups the format allows (8 blocks: 2 Mi groups, meta_bg so the table is
/// spread over the device, all descriptors zero): the scan must finish in
/// bounded time and memory (it streams the table) with a well-formed map.
#[test]
fn huge_group_count_streams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.img");
    let size: u64 = 64 << 30;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let blocks = (size / 4096) as u32;
    let groups = blocks / 8;
    let mut sb = [0u8; 1024];
    let put32 = |sb: &mut [u8; 1024], off: usize, v: u32| {
        sb[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    put32(&mut sb, 0x0, groups * 8); // inodes
    put32(&mut sb, 0x4, blocks);
    put32(&mut sb, 0x18, 2); // 4 KiB blocks
    put32(&mut sb, 0x1C, 2);
    put32(&mut sb, 0x20, 8); // blocks per group
    put32(&mut sb, 0x24, 8);
    put32(&mut sb, 0x28, 8); // inodes per group
    sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
    sb[0x3A] = 1; // clean
    put32(&mut sb, 0x4C, 1); // dynamic revision
    sb[0x58..0x5A].copy_from_slice(&256u16.to_le_bytes());
    put32(&mut sb, 0x60, 0x10 | 0x2); // meta_bg, filetype
    put32(&mut sb, 0x64, 0x1); // sparse_super
    std::os::unix::fs::FileExt::write_all_at(&f, &sb, 1024).unwrap();
    drop(f);

    let img = RawImage::open(&path, true).unwrap();
    let t = std::time::Instant::now();
    let mut count = 0u64;
    let mut last_end = 0u64;
    let summary = vmvol_fs::scan_free(&img, &mut |r| {
        assert!(r.offset > last_end || last_end == 0);
        last_end = r.end();
        count += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(summary.group_count, u64::from(groups));
    assert_eq!(summary.range_count, count);
    assert!(summary.free_bytes < size);
    // Block 0 (superblock, all descriptors' bitmaps and inode tables) is used.
    assert!(last_end <= size);
    eprintln!(
        "{} groups scanned in {:?}, {count} ranges",
        groups,
        t.elapsed()
    );
    assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());
}
