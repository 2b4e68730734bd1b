//! populate from a directory tree: every entry read back through debugfs,
//! ext4-view and the kernel; e2fsck -fn clean.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::support::{debugfs, e2fsck_clean, require_loop_mount, require_tool, Mount};
use vmvol_format::{Control, Prealloc, RawImage};
use vmvol_fs::{populate, required_size, MkfsOptions, PopulateOptions, Source};

const M: u64 = 1 << 20;

fn set_times(p: &Path, sec: i64, nsec: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: sec - 100,
            tv_nsec: nsec / 2,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}

fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) == 0 }
}

fn chown(p: &Path, uid: u32, gid: u32) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::lchown(c.as_ptr(), uid, gid) };
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed) * 7) % 253) as u8 + 1)
        .collect()
}

/// Build the source tree; returns whether device nodes could be made (root).
fn make_tree(root: &Path) -> bool {
    std::fs::create_dir_all(root.join("etc/deep/er/est")).unwrap();
    std::fs::create_dir(root.join("big")).unwrap();
    for (name, len) in [
        ("empty", 0),
        ("one", 1),
        ("b4095", 4095),
        ("b4096", 4096),
        ("b4097", 4097),
        ("m1", M as usize + 3),
    ] {
        std::fs::write(root.join("etc").join(name), pattern(len, len as u8)).unwrap();
    }
    // A large file (several extents past 128 MiB would be slow; 9 MiB is one run).
    std::fs::write(root.join("big/nine"), pattern(9 * M as usize, 9)).unwrap();
    // Sparse: data islands in a 64 MiB file.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("big/sparse")).unwrap();
        f.set_len(64 * M).unwrap();
        f.write_all_at(&pattern(5000, 1), 0).unwrap();
        f.write_all_at(&pattern(8192, 2), 20 * M).unwrap();
        f.write_all_at(&pattern(10, 3), 64 * M - 10).unwrap();
    }
    // Fragmented: 40 islands → more extents than fit in the inode (extent tree).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("big/frag")).unwrap();
        for i in 0..40u64 {
            f.write_all_at(&pattern(4096, i as u8), i * 65536).unwrap();
        }
    }
    // A directory spanning many blocks.
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..3000 {
        std::fs::write(
            root.join(format!("many/file-with-a-longish-name-{i:05}")),
            format!("{i}"),
        )
        .unwrap();
    }
    std::fs::write(root.join("etc/deep/er/est/leaf"), b"leaf").unwrap();
    std::os::unix::fs::symlink("one", root.join("etc/short")).unwrap();
    let long_target = "x/".repeat(150) + "target";
    std::os::unix::fs::symlink(&long_target, root.join("etc/long")).unwrap();
    std::os::unix::fs::symlink("/dangling/absolute", root.join("dangling")).unwrap();
    std::fs::write(root.join("hard1"), b"hard linked").unwrap();
    std::fs::hard_link(root.join("hard1"), root.join("etc/hard2")).unwrap();
    std::fs::hard_link(root.join("hard1"), root.join("big/hard3")).unwrap();
    std::fs::set_permissions(
        root.join("etc/one"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("etc/b4095"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("etc/deep"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    chown(&root.join("etc/b4096"), 1000, 2000);
    chown(&root.join("etc/short"), 70000, 80000);
    set_times(&root.join("etc/b4097"), 1_600_000_000, 123_456_789);
    set_times(&root.join("etc/long"), 1_500_000_000, 42);
    let c = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    let dev = mknod(&root.join("null"), libc::S_IFCHR | 0o666, 1, 3)
        && mknod(&root.join("bigdev"), libc::S_IFBLK | 0o660, 300, 70000);
    set_times(&root.join("etc"), 1_400_000_000, 999_999_999);
    dev
}

/// Every path below `root`, relative, with its metadata.
fn walk(root: &Path) -> BTreeMap<PathBuf, std::fs::Metadata> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.insert(r, md);
        }
    }
    out
}

fn debugfs_field(stat: &str, key: &str) -> String {
    let i = stat
        .find(key)
        .unwrap_or_else(|| panic!("{key} not in {stat}"));
    stat[i + key.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn tree_reads_back_everywhere() {
    if !require_tool("e2fsck") || !require_tool("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let devs = make_tree(&src);
    let opts = PopulateOptions {
        mkfs: MkfsOptions {
            timestamp: Some(1_700_000_000),
            ..Default::default()
        },
        ..Default::default()
    };
    let source = Source::Dir(src.clone());
    let size = required_size(&source, &opts).unwrap();
    assert!(size < 200 * M, "{size}");
    let img_path = dir.path().join("fs.raw");
    let img = RawImage::create(&img_path, size, Prealloc::Off, &Control::new()).unwrap();
    let r = populate(&img, &source, &opts, &Control::new()).unwrap();
    drop(img);
    eprintln!("{r:?}");
    assert_eq!(r.hard_links, 2);
    assert_eq!(r.symlinks, 3);
    e2fsck_clean(&img_path);

    let entries = walk(&src);
    let fs = ext4_view::Ext4::load_from_path(&img_path).unwrap();
    for (rel, md) in &entries {
        let abs = Path::new("/").join(rel);
        let abs_s = abs.to_str().unwrap();
        // ext4-view: type, mode, owner, size, content, link target.
        let v = fs
            .symlink_metadata(abs_s)
            .unwrap_or_else(|e| panic!("{abs_s}: {e}"));
        assert_eq!(
            u32::from(v.mode()) & 0o7777,
            md.mode() & 0o7777,
            "{abs_s} mode"
        );
        assert_eq!((v.uid(), v.gid()), (md.uid(), md.gid()), "{abs_s} owner");
        assert_eq!(v.modified().seconds(), md.mtime(), "{abs_s} mtime");
        assert_eq!(
            v.modified().nanoseconds(),
            md.mtime_nsec() as u32,
            "{abs_s} mtime nsec"
        );
        if md.is_file() {
            assert_eq!(v.len(), md.len(), "{abs_s} size");
            assert!(
                fs.read(abs_s).unwrap() == std::fs::read(src.join(rel)).unwrap(),
                "{abs_s} bytes"
            );
        } else if md.file_type().is_symlink() {
            assert_eq!(
                fs.read_link(abs_s).unwrap().as_ref(),
                std::fs::read_link(src.join(rel))
                    .unwrap()
                    .as_os_str()
                    .as_bytes(),
                "{abs_s} target"
            );
        }
        // debugfs: link count and type for a sample (one process per entry is slow).
        let name = rel.to_str().unwrap();
        if !name.starts_with("many/") || name.ends_with("00") {
            let stat = String::from_utf8_lossy(&debugfs(&img_path, &format!("stat \"/{name}\"")))
                .into_owned();
            let links: u64 = debugfs_field(&stat, "Links:").parse().unwrap();
            assert_eq!(links, md.nlink(), "{name} links");
            let mode = u32::from_str_radix(&debugfs_field(&stat, "Mode:"), 8).unwrap();
            assert_eq!(mode, md.mode() & 0o7777, "{name} mode");
            assert_eq!(
                debugfs_field(&stat, "User:").parse::<u32>().unwrap(),
                md.uid()
            );
            if md.is_file() && md.len() < 2 * M {
                let cat = debugfs(&img_path, &format!("cat \"/{name}\""));
                assert!(
                    cat == std::fs::read(src.join(rel)).unwrap(),
                    "{name} debugfs cat"
                );
            }
        }
    }
    // Holes stay holes: the sparse file maps only its data islands.
    let blocks = String::from_utf8_lossy(&debugfs(&img_path, "blocks /big/sparse")).into_owned();
    assert_eq!(blocks.split_whitespace().count(), 2 + 2 + 1, "{blocks}");

    if require_loop_mount() {
        let m = Mount::new(&img_path, true);
        let mounted = walk(&m.dir);
        let mut expected: Vec<&PathBuf> = entries.keys().collect();
        let mut got: Vec<&PathBuf> = mounted
            .keys()
            .filter(|p| !p.starts_with("lost+found"))
            .collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
        for (rel, md) in &entries {
            let k = &mounted[rel];
            let n = rel.display();
            assert_eq!(k.mode(), md.mode(), "{n}");
            assert_eq!((k.uid(), k.gid()), (md.uid(), md.gid()), "{n}");
            assert_eq!(k.nlink(), md.nlink(), "{n}");
            assert_eq!(
                (k.mtime(), k.mtime_nsec()),
                (md.mtime(), md.mtime_nsec()),
                "{n}"
            );
            if md.file_type().is_block_device() || md.file_type().is_char_device() {
                assert_eq!(k.rdev(), md.rdev(), "{n}");
            }
            if md.is_file() {
                assert_eq!(k.len(), md.len(), "{n}");
                assert!(
                    std::fs::read(m.dir.join(rel)).unwrap()
                        == std::fs::read(src.join(rel)).unwrap(),
                    "{n}"
                );
            }
            if md.file_type().is_symlink() {
                assert_eq!(
                    std::fs::read_link(m.dir.join(rel)).unwrap(),
                    std::fs::read_link(src.join(rel)).unwrap()
                );
            }
        }
        let sparse = &mounted[Path::new("big/sparse")];
        assert!(
            sparse.blocks() * 512 < 64 * 1024,
            "sparse file allocates {}",
            sparse.blocks() * 512
        );
        assert!(devs || !entries.contains_key(Path::new("null")));
    }
    e2fsck_clean(&img_path);
}

#[test]
fn too_small_device_is_refused_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), pattern(20 * M as usize, 5)).unwrap();
    let img_path = dir.path().join("fs.raw");
    let img = RawImage::create(&img_path, 16 * M, Prealloc::Off, &Control::new()).unwrap();
    let e = populate(
        &img,
        &Source::Dir(src),
        &PopulateOptions::default(),
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, vmvol_fs::Error::LimitExceeded { .. }), "{e}");
    drop(img);
    // Nothing half-written: the image reads as zeros (all holes).
    let md = std::fs::metadata(&img_path).unwrap();
    assert_eq!(
        md.blocks(),
        0,
        "image still allocates {} sectors",
        md.blocks()
    );
}

#[test]
fn cancel_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"a").unwrap();
    let img_path = dir.path().join("fs.raw");
    let img = RawImage::create(&img_path, 64 * M, Prealloc::Off, &Control::new()).unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ctl = Control::new().with_cancel(flag);
    let e = populate(&img, &Source::Dir(src), &PopulateOptions::default(), &ctl).unwrap_err();
    assert!(matches!(e, vmvol_fs::Error::Cancelled { .. }), "{e}");
    drop(img);
    assert_eq!(std::fs::metadata(&img_path).unwrap().blocks(), 0);
}

/// 1 KiB blocks on qcow2: a file fragmented enough for a two-level extent
/// tree, a directory of many blocks; checked through qemu-img convert + e2fsck.
#[test]
fn qcow2_one_kib_blocks_deep_extent_tree() {
    if !require_tool("e2fsck") || !require_tool("qemu-img") {
        return;
    }
    use vmvol_format::{BlockIo, OpenOptions, Qcow2CreateOptions, Qcow2Image};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    {
        use std::os::unix::fs::FileExt;
        // 400 one-block islands: 400 extents > 4 leaves of 84 -> depth 2.
        let f = std::fs::File::create(src.join("frag")).unwrap();
        for i in 0..400u64 {
            f.write_all_at(&pattern(1024, i as u8), i * 8192).unwrap();
        }
    }
    for i in 0..500 {
        std::fs::write(src.join(format!("n{i:04}")), [i as u8; 3]).unwrap();
    }
    let opts = PopulateOptions {
        mkfs: MkfsOptions {
            block_size: 1024,
            ..Default::default()
        },
        ..Default::default()
    };
    let q = dir.path().join("v.qcow2");
    Qcow2Image::create(&q, &Qcow2CreateOptions::new(64 * M)).unwrap();
    let img = Qcow2Image::open(&q, &OpenOptions::new()).unwrap();
    let r = populate(&img, &Source::Dir(src.clone()), &opts, &Control::new()).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_eq!(r.files, 501);
    let raw = dir.path().join("v.raw");
    crate::support::qcow2_to_raw(&q, &raw);
    e2fsck_clean(&raw);
    let stat = String::from_utf8_lossy(&debugfs(&raw, "ex /frag")).into_owned();
    assert!(
        stat.lines()
            .any(|l| l.trim_start().starts_with("0/ 2") || l.contains(" 0/ 2 ")),
        "expected a depth-2 tree: {stat}"
    );
    let fs = ext4_view::Ext4::load_from_path(&raw).unwrap();
    assert!(fs.read("/frag").unwrap() == std::fs::read(src.join("frag")).unwrap());
    assert_eq!(fs.read("/n0499").unwrap(), vec![499u32 as u8; 3]);
}

#[test]
fn invalid_options_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let img_path = dir.path().join("fs.raw");
    let img = RawImage::create(&img_path, 64 * M, Prealloc::Off, &Control::new()).unwrap();
    vmvol_format::BlockIo::write_at(&img, b"precious", 5 * M).unwrap();
    let opts = PopulateOptions {
        mkfs: MkfsOptions {
            label: "x".repeat(17),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = populate(&img, &Source::Dir(src.clone()), &opts, &Control::new()).unwrap_err();
    assert!(matches!(e, vmvol_fs::Error::InvalidArgument { .. }), "{e}");
    let e = populate(
        &img,
        &Source::Dir(src.join("missing")),
        &PopulateOptions::default(),
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, vmvol_fs::Error::Io { .. }), "{e}");
    let mut buf = [0u8; 8];
    vmvol_format::BlockIo::read_at(&img, &mut buf, 5 * M).unwrap();
    assert_eq!(&buf, b"precious");
}
