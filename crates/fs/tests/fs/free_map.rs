//! Free-space map against e2fsprogs: filesystems made by `mkfs.ext4` (and
//! ext2/ext3) in many layouts must give exactly the free blocks `dumpe2fs`
//! lists; after a kernel mount writes and deletes files, no block of a live
//! file (per `debugfs`) may be reported free.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{require_loop_mount, require_tool, run_cmd as run};
use vmvol_format::{Image, OpenOptions, RawImage};
use vmvol_fs::{free_map, scan_free, ByteRange, Error, FreeMap};

/// A sparse file of `size` bytes formatted by `prog` (mkfs.ext4, mkfs.ext2, ...).
pub(crate) fn mkfs(dir: &Path, prog: &str, size: u64, args: &[&str]) -> PathBuf {
    let path = dir.join("fs.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    run(Command::new(prog)
        .args(["-q", "-F"])
        .args(args)
        .arg(&path)
        .env("MKE2FS_CONFIG", "/etc/mke2fs.conf"));
    path
}

/// Merge `(start, end)` byte ranges.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Free byte ranges as `dumpe2fs` lists them ("Free blocks: a-b, c").
fn dumpe2fs_free(path: &Path) -> Vec<(u64, u64)> {
    let text = run(Command::new("dumpe2fs").arg(path));
    let bs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .expect("block size line")
        .trim()
        .parse()
        .unwrap();
    // With bigalloc, dumpe2fs names each free cluster by its first block, so
    // a run "a-b" ends with the cluster that starts at block b.
    let cluster: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Cluster size:"))
        .map_or(bs, |c| c.trim().parse().unwrap());
    let mut v = Vec::new();
    // The header before "Group 0:" has its own "Free blocks:" line holding
    // the free *count*; read as a block number, it made the count's block
    // "free" whenever that block happened to be in use.
    let groups = text.lines().skip_while(|l| !l.starts_with("Group 0:"));
    for line in groups {
        let Some(list) = line.trim().strip_prefix("Free blocks:") else {
            continue;
        };
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                None => {
                    let a = item.parse::<u64>().unwrap();
                    (a, a)
                }
            };
            v.push((a * bs, b * bs + cluster));
        }
    }
    merge(v)
}

fn ours(path: &Path) -> FreeMap {
    let img = RawImage::open(path, true).unwrap();
    free_map(&img).unwrap()
}

/// Structural invariants every map must have.
fn check_shape(m: &FreeMap) {
    let mut prev_end = 0;
    let mut total = 0;
    for r in &m.ranges {
        assert!(r.len > 0, "empty range {r:?}");
        assert!(
            prev_end == 0 || r.offset > prev_end,
            "ranges unsorted, overlapping or unmerged at {r:?}"
        );
        assert!(r.end() <= m.fs_bytes, "range {r:?} past the filesystem");
        prev_end = r.end();
        total += r.len;
    }
    assert_eq!(total, m.free_bytes);
    assert!(m.fs_bytes <= m.device_bytes);
}

fn as_pairs(m: &FreeMap) -> Vec<(u64, u64)> {
    m.ranges.iter().map(|r| (r.offset, r.end())).collect()
}

/// Our map must equal dumpe2fs's free list exactly.
pub(crate) fn assert_same_as_dumpe2fs(path: &Path) -> FreeMap {
    let m = ours(path);
    check_shape(&m);
    let theirs = dumpe2fs_free(path);
    let mine = as_pairs(&m);
    if mine != theirs {
        let a: BTreeSet<_> = mine.iter().collect();
        let b: BTreeSet<_> = theirs.iter().collect();
        panic!(
            "free map differs from dumpe2fs\n only ours: {:?}\n only dumpe2fs: {:?}",
            a.difference(&b).take(20).collect::<Vec<_>>(),
            b.difference(&a).take(20).collect::<Vec<_>>()
        );
    }
    // e2fsck agrees the filesystem is clean, so dumpe2fs's list is the truth.
    run(Command::new("e2fsck").arg("-fn").arg(path));
    m
}

/// One mkfs layout compared with dumpe2fs.
fn layout(prog: &str, size: u64, args: &[&str]) -> FreeMap {
    let dir = tempfile::tempdir().unwrap();
    let path = mkfs(dir.path(), prog, size, args);
    assert_same_as_dumpe2fs(&path)
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

macro_rules! layout_tests {
    ($($name:ident: $prog:expr, $size:expr, [$($arg:expr),*];)*) => {$(
        #[test]
        fn $name() {
            if !require_tool($prog) || !require_tool("dumpe2fs") || !require_tool("e2fsck") {
                return;
            }
            let m = layout($prog, $size, &[$($arg),*]);
            assert!(m.free_bytes > 0);
        }
    )*};
}

layout_tests! {
    ext4_1k_small: "mkfs.ext4", 64 * MIB, ["-b", "1024"];
    ext4_1k_small_no_flex_bg: "mkfs.ext4", 64 * MIB, ["-b", "1024", "-O", "^flex_bg"];
    ext4_2k_small: "mkfs.ext4", 48 * MIB, ["-b", "2048"];
    ext4_4k_small: "mkfs.ext4", 64 * MIB, ["-b", "4096"];
    ext4_4k_small_no_flex_bg: "mkfs.ext4", 200 * MIB, ["-b", "4096", "-O", "^flex_bg"];
    ext4_4k_3g: "mkfs.ext4", 3 * GIB, ["-b", "4096"];
    ext4_4k_3g_no_flex_bg: "mkfs.ext4", 3 * GIB, ["-b", "4096", "-O", "^flex_bg"];
    ext4_4k_1t_sparse: "mkfs.ext4", 1 << 40, ["-b", "4096", "-J", "size=4"];
    ext4_1k_2g: "mkfs.ext4", 2 * GIB, ["-b", "1024"];
    ext4_1k_2g_no_flex_bg: "mkfs.ext4", 2 * GIB, ["-b", "1024", "-O", "^flex_bg"];
    ext4_4k_odd_size_partial_last_group: "mkfs.ext4", 300 * MIB + 12 * 4096, ["-b", "4096"];
    ext4_1k_odd_size_partial_last_group: "mkfs.ext4", 70 * MIB + 5 * 1024, ["-b", "1024"];
    ext4_small_groups_flex_spill: "mkfs.ext4", 64 * MIB, ["-b", "1024", "-g", "1024", "-G", "64"];
    ext4_32bit_descriptors: "mkfs.ext4", 256 * MIB, ["-O", "^64bit"];
    ext4_gdt_csum_crc16: "mkfs.ext4", 256 * MIB, ["-O", "^metadata_csum,uninit_bg"];
    ext4_gdt_csum_crc16_64bit_1k: "mkfs.ext4", 128 * MIB, ["-b", "1024", "-O", "^metadata_csum,uninit_bg"];
    ext4_no_checksums_at_all: "mkfs.ext4", 128 * MIB, ["-O", "^metadata_csum,^uninit_bg"];
    ext4_meta_bg: "mkfs.ext4", GIB, ["-b", "1024", "-O", "meta_bg,^resize_inode"];
    ext4_meta_bg_4k: "mkfs.ext4", 3 * GIB, ["-O", "meta_bg,^resize_inode", "-g", "2048"];
    ext4_sparse_super2: "mkfs.ext4", GIB, ["-O", "sparse_super2"];
    ext4_sparse_super2_one_backup: "mkfs.ext4", GIB, ["-O", "sparse_super2", "-E", "num_backup_sb=1"];
    ext4_no_sparse_super: "mkfs.ext4", 512 * MIB, ["-O", "^sparse_super,^resize_inode"];
    ext4_csum_seed: "mkfs.ext4", 128 * MIB, ["-O", "metadata_csum_seed"];
    ext4_mmp: "mkfs.ext4", 128 * MIB, ["-O", "mmp"];
    ext4_bigalloc: "mkfs.ext4", GIB, ["-O", "bigalloc", "-C", "65536"];
    ext4_bigalloc_multi_group: "mkfs.ext4", 3 * GIB, ["-O", "bigalloc", "-C", "16384"];
    ext4_bigalloc_1k_blocks: "mkfs.ext4", 600 * MIB, ["-b", "1024", "-O", "bigalloc", "-C", "4096"];
    ext4_orphan_file_quota: "mkfs.ext4", 256 * MIB, ["-O", "orphan_file,quota"];
    ext4_huge_inode_count: "mkfs.ext4", 512 * MIB, ["-N", "200000"];
    ext4_inline_data_large_inodes: "mkfs.ext4", 128 * MIB, ["-O", "inline_data", "-I", "1024"];
    ext4_no_journal: "mkfs.ext4", 256 * MIB, ["-O", "^has_journal"];
    ext3: "mkfs.ext3", 256 * MIB, [];
    ext2: "mkfs.ext2", 256 * MIB, [];
    ext2_1k: "mkfs.ext2", 64 * MIB, ["-b", "1024"];
    ext2_revision_0: "mkfs.ext2", 32 * MIB, ["-r", "0"];
}

/// The streaming scan and the collected map agree, and the map serialises.
#[test]
fn scan_free_streams_the_same_ranges() {
    if !require_tool("mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = mkfs(dir.path(), "mkfs.ext4", 128 * MIB, &["-b", "1024"]);
    let img = RawImage::open(&path, true).unwrap();
    let m = free_map(&img).unwrap();
    let mut streamed: Vec<ByteRange> = Vec::new();
    let summary = scan_free(&img, &mut |r| {
        streamed.push(r);
        Ok(())
    })
    .unwrap();
    assert_eq!(streamed, m.ranges);
    assert_eq!(summary.free_bytes, m.free_bytes);
    assert_eq!(summary.range_count, m.ranges.len() as u64);
    assert_eq!(m.block_size, 1024);
    assert_eq!(m.fs_bytes, 128 * MIB);
    let json = serde_json::to_string(&m).unwrap();
    let back: FreeMap = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
    // An error from the visitor stops the scan and comes back unchanged.
    let err = scan_free(&img, &mut |_| Err(Error::Cancelled { op: "test visitor" })).unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err}");
}

/// A qcow2 image read through the qcow2 layer gives the same map as its raw source.
#[test]
fn qcow2_image_gives_same_map_as_raw() {
    if !require_tool("mkfs.ext4") || !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = mkfs(dir.path(), "mkfs.ext4", 512 * MIB, &[]);
    let qcow = dir.path().join("fs.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let img = Image::open(&qcow, &OpenOptions::new().read_only(true)).unwrap();
    let m = free_map(&img).unwrap();
    assert_eq!(m, ours(&raw));
    assert_eq!(as_pairs(&m), dumpe2fs_free(&raw));
}

/// Block numbers `debugfs -R 'blocks PATH'` lists for a file.
fn debugfs_blocks(img: &Path, file: &str) -> Vec<u64> {
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("blocks {file}"))
        .arg(img));
    out.split_whitespace().map(|s| s.parse().unwrap()).collect()
}

struct Mounted<'a>(&'a Path);
impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn write_file(path: &Path, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    std::fs::write(path, data).unwrap();
}

/// Files written and deleted through the kernel: no live block is reported
/// free, and the map equals dumpe2fs's list. While mounted the journal is
/// active, so the map is refused.
#[test]
fn kernel_mount_write_delete_no_live_block_free() {
    if !require_tool("mkfs.ext4") || !require_tool("debugfs") || !require_loop_mount() {
        return;
    }
    for args in [&["-b", "4096"][..], &["-b", "1024", "-O", "^flex_bg"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "mkfs.ext4", 256 * MIB, args);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .unwrap();
        if !st.status.success() {
            crate::support::unavailable(&format!(
                "mount -o loop failed: {}",
                String::from_utf8_lossy(&st.stderr)
            ));
            return;
        }
        let guard = Mounted(&mnt);
        std::fs::create_dir(mnt.join("d")).unwrap();
        for i in 0..40u8 {
            write_file(
                &mnt.join(format!("d/f{i}")),
                37_000 * (i as usize % 7 + 1),
                i,
            );
        }
        write_file(&mnt.join("big"), 24 << 20, 99);
        run(&mut Command::new("sync"));
        // While mounted, the on-disk superblock says the journal needs recovery.
        let m = RawImage::open(&img, true).unwrap();
        let err = free_map(&m).unwrap_err();
        assert!(matches!(err, Error::NeedsRecovery { .. }), "{err}");
        drop(m);
        for i in (0..40u8).step_by(3) {
            std::fs::remove_file(mnt.join(format!("d/f{i}"))).unwrap();
        }
        std::fs::remove_file(mnt.join("big")).unwrap();
        for i in 0..10u8 {
            write_file(&mnt.join(format!("g{i}")), 300_000 + 4099 * i as usize, i);
        }
        write_file(&mnt.join("big2"), 12 << 20, 7);
        drop(guard);

        let m = assert_same_as_dumpe2fs(&img);
        let bs = u64::from(m.block_size);
        let mut live: Vec<String> = (0..40u8)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("/d/f{i}"))
            .collect();
        live.extend((0..10).map(|i| format!("/g{i}")));
        live.extend(["/big2", "/d", "/", "/lost+found", "<8>"].map(String::from));
        let mut checked = 0;
        for f in &live {
            let blocks = debugfs_blocks(&img, f);
            assert!(!blocks.is_empty(), "{f} has no blocks");
            for b in blocks {
                assert!(!m.is_free(b * bs, bs), "{f}: block {b} is reported free");
                checked += 1;
            }
        }
        assert!(checked > 3000, "only {checked} blocks checked");
        // The deleted files' space came back.
        assert!(m.free_bytes > 200 * MIB, "free {}", m.free_bytes);
    }
}

/// Groups added by `resize2fs` offline (grown image), then by the kernel's
/// online resize (through a mount), map exactly as dumpe2fs lists them.
#[test]
fn grown_by_resize2fs_offline_and_online() {
    if !require_tool("mkfs.ext4") || !require_tool("resize2fs") || !require_tool("dumpe2fs") {
        return;
    }
    for args in [&["-b", "4096"][..], &["-b", "1024"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "mkfs.ext4", 200 * MIB, args);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(900 * MIB)
            .unwrap();
        run(Command::new("resize2fs").arg(&img));
        let m = assert_same_as_dumpe2fs(&img);
        // resize2fs may leave off a last group too small for its metadata.
        assert!(
            m.fs_bytes > 800 * MIB && m.fs_bytes <= 900 * MIB,
            "{}",
            m.fs_bytes
        );

        if !require_loop_mount() {
            continue;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(2 * GIB + 7 * MIB)
            .unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .unwrap();
        if !out.status.success() {
            crate::support::unavailable(&format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        let loopdev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let _detach = Detach(loopdev.clone());
        run(Command::new("mount").arg(&loopdev).arg(&mnt));
        let guard = Mounted(&mnt);
        write_file(&mnt.join("before"), 5 << 20, 1);
        let resized = Command::new("resize2fs").arg(&loopdev).output().unwrap();
        let online = resized.status.success();
        if !online {
            // Containers often lack CAP_SYS_RESOURCE, which EXT4_IOC_RESIZE_FS needs.
            crate::support::host_forbids(&format!(
                "online resize2fs refused: {}",
                String::from_utf8_lossy(&resized.stderr).trim()
            ));
        }
        write_file(&mnt.join("after"), 9 << 20, 2);
        drop(guard);
        drop(_detach);
        let m = assert_same_as_dumpe2fs(&img);
        if online {
            assert!(m.fs_bytes > 2 * GIB - 4 * MIB, "not grown: {}", m.fs_bytes);
        }
        let bs = u64::from(m.block_size);
        for f in ["/before", "/after"] {
            for b in debugfs_blocks(&img, f) {
                assert!(!m.is_free(b * bs, bs), "{f}: block {b} reported free");
            }
        }
    }
}

/// Filesystems made by our own `mkfs` map exactly as dumpe2fs lists them,
/// and the free total equals the free block count mkfs reported.
#[test]
fn our_mkfs_output_matches_dumpe2fs() {
    if !require_tool("dumpe2fs") || !require_tool("e2fsck") {
        return;
    }
    use vmvol_fs::{mkfs as make_fs, Journal, MkfsOptions};
    let cases: &[(u64, u32, Journal)] = &[
        (64 * MIB, 4096, Journal::Default),
        (64 * MIB, 1024, Journal::Default),
        (300 * MIB + 8192, 2048, Journal::None),
        (3 * GIB, 4096, Journal::Default),
        (5 * GIB, 1024, Journal::None),
    ];
    for &(size, block_size, journal) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ours.img");
        let img = RawImage::create(
            &path,
            size,
            vmvol_format::Prealloc::Off,
            &vmvol_format::Control::new(),
        )
        .unwrap();
        let opts = MkfsOptions {
            block_size,
            journal,
            ..MkfsOptions::default()
        };
        let report = make_fs(&img, &opts).unwrap();
        drop(img);
        let m = assert_same_as_dumpe2fs(&path);
        assert_eq!(m.block_size, block_size);
        assert_eq!(
            m.free_bytes,
            report.free_blocks * u64::from(block_size),
            "{size} bytes, {block_size}-byte blocks, {journal:?}"
        );
    }
}

/// A filesystem smaller than its device: the map covers the filesystem only.
#[test]
fn filesystem_smaller_than_device() {
    if !require_tool("mkfs.ext4") || !require_tool("dumpe2fs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&path)
        .arg("100M"));
    let m = assert_same_as_dumpe2fs(&path);
    assert_eq!(m.fs_bytes, 100 * MIB);
    assert_eq!(m.device_bytes, 300 * MIB);
    assert!(m.ranges.last().unwrap().end() <= 100 * MIB);
}

/// Our mkfs on a fresh qcow2 image: the map read through the qcow2 layer
/// equals dumpe2fs's list for the image converted to raw.
#[test]
fn our_mkfs_on_qcow2_matches_dumpe2fs() {
    if !require_tool("dumpe2fs") || !require_tool("qemu-img") {
        return;
    }
    use vmvol_format::{Qcow2CreateOptions, Qcow2Image};
    use vmvol_fs::{mkfs as make_fs, MkfsOptions};
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("ours.qcow2");
    Qcow2Image::create(&qcow, &Qcow2CreateOptions::new(2 * GIB)).unwrap();
    let img = Image::open(&qcow, &OpenOptions::new()).unwrap();
    make_fs(&img, &MkfsOptions::default()).unwrap();
    let m = free_map(&img).unwrap();
    drop(img);
    let raw = dir.path().join("ours.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&qcow)
        .arg(&raw));
    assert_eq!(m, assert_same_as_dumpe2fs(&raw));
}
