//! mkfs against the real tools: e2fsck -fn clean over a size × block size ×
//! journal matrix on raw and qcow2, dumpe2fs features, kernel mount, resize2fs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use crate::support::{e2fsck_clean, features, require_loop_mount, require_tool, run, Mount};
use vmvol_format::{
    BlockIo, Control, OpenOptions, Prealloc, Qcow2CreateOptions, Qcow2Image, RawImage,
};
use vmvol_fs::{mkfs, Error, Journal, MkfsOptions};

const K: u64 = 1024;
const M: u64 = K * K;
const G: u64 = M * K;
const T: u64 = G * K;

const FEATURES: &[&str] = &[
    "ext_attr",
    "resize_inode",
    "dir_index",
    "filetype",
    "extent",
    "64bit",
    "flex_bg",
    "sparse_super",
    "large_file",
    "huge_file",
    "dir_nlink",
    "extra_isize",
    "metadata_csum",
];

fn tools() -> bool {
    require_tool("e2fsck") && require_tool("dumpe2fs")
}

fn opts(bs: u32, journal: bool) -> MkfsOptions {
    MkfsOptions {
        block_size: bs,
        journal: if journal {
            Journal::Default
        } else {
            Journal::None
        },
        label: "vmvol-test".into(),
        ..Default::default()
    }
}

/// mkfs a sparse raw image, e2fsck it, check features and host allocation.
fn raw_case(dir: &Path, size: u64, bs: u32, journal: bool) {
    let p = dir.join(format!("{size}-{bs}-{journal}.raw"));
    let img = RawImage::create(&p, size, Prealloc::Off, &Control::new()).unwrap();
    let t = Instant::now();
    let r = mkfs(&img, &opts(bs, journal)).unwrap();
    let took = t.elapsed();
    drop(img);
    let alloc = std::fs::metadata(&p).unwrap().blocks() * 512;
    eprintln!("{size} bs={bs} journal={journal}: mkfs {took:?}, {alloc} bytes allocated, {r:?}");
    assert_eq!(r.block_size, bs);
    assert!(r.blocks_count <= size / u64::from(bs));
    assert_eq!(r.journal_blocks > 0, journal);
    // Only metadata that must exist is allocated (a host block is 4 KiB, so a
    // smaller fs block written alone costs a whole host block).
    let bound = r.metadata_bytes_written * (4096 / u64::from(bs)) + 256 * K;
    assert!(alloc <= bound, "{alloc} > {bound}");
    e2fsck_clean(&p);
    let f = features(&p);
    for feat in FEATURES {
        if *feat == "resize_inode" && r.reserved_gdt_blocks == 0 {
            continue;
        }
        assert!(
            f.split_whitespace().any(|w| w == *feat),
            "{feat} missing: {f}"
        );
    }
    assert_eq!(
        f.split_whitespace().any(|w| w == "has_journal"),
        journal,
        "{f}"
    );
    let h = run("dumpe2fs", &["-h", p.to_str().unwrap()]);
    assert!(h.contains("Filesystem volume name:   vmvol-test"), "{h}");
    assert!(
        h.contains(&format!("Filesystem UUID:          {}", r.uuid)),
        "{h}"
    );
    assert!(h.contains("Inode size:\t          256"), "{h}");
    assert!(
        h.contains(&format!("Block size:               {bs}")),
        "{h}"
    );
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn matrix_small() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, bs, j) in [
        (16 * M, 1024, true),
        (16 * M, 4096, true),
        (16 * M, 2048, false),
        (64 * M, 2048, true),
        (64 * M, 4096, false),
        (64 * M, 1024, false),
        (G, 4096, true),
        (G, 1024, true),
        (G, 2048, false),
        (G + 5 * M + 123, 4096, true),
    ] {
        raw_case(dir.path(), size, bs, j);
    }
}

#[test]
fn matrix_large() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, bs, j) in [
        (10 * G, 4096, true),
        (10 * G, 2048, false),
        (100 * G, 4096, true),
        (100 * G, 1024, false),
        (T, 4096, true),
    ] {
        raw_case(dir.path(), size, bs, j);
    }
}

/// 16 TiB needs a host filesystem that holds a 16 TiB sparse file (tmpfs does;
/// ext4's limit is 16 TiB - 4 KiB).
#[test]
fn sixteen_tib() {
    if !tools() {
        return;
    }
    for base in ["/dev/shm", "/tmp"] {
        let Ok(dir) = tempfile::tempdir_in(base) else {
            continue;
        };
        let p = dir.path().join("probe");
        let f = std::fs::File::create(&p).unwrap();
        if f.set_len(16 * T).is_err() {
            continue;
        }
        drop(f);
        std::fs::remove_file(&p).unwrap();
        let t = Instant::now();
        let p = dir.path().join("big.raw");
        let img = RawImage::create(&p, 16 * T, Prealloc::Off, &Control::new()).unwrap();
        let r = mkfs(&img, &opts(4096, true)).unwrap();
        eprintln!("16 TiB mkfs {:?}: {r:?}", t.elapsed());
        assert_eq!(r.groups, 131072);
        assert_eq!(r.blocks_count, 1 << 32);
        drop(img);
        e2fsck_clean(&p);
        return;
    }
    eprintln!("skipping 16 TiB: no host filesystem here holds a 16 TiB sparse file");
}

#[test]
fn qcow2_images() {
    if !tools() || !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, bs, j) in [
        (64 * M, 1024, true),
        (G, 4096, true),
        (100 * G, 4096, true),
        (10 * G, 4096, false),
    ] {
        let q = dir.path().join("v.qcow2");
        let _ = std::fs::remove_file(&q);
        Qcow2Image::create(&q, &Qcow2CreateOptions::new(size)).unwrap();
        let img = Qcow2Image::open(&q, &OpenOptions::new()).unwrap();
        let r = mkfs(&img, &opts(bs, j)).unwrap();
        img.flush().unwrap();
        drop(img);
        let qsize = std::fs::metadata(&q).unwrap().len();
        eprintln!("qcow2 {size} bs={bs} journal={j}: file {qsize} bytes, {r:?}");
        if size == 100 * G {
            assert!(qsize <= 16 * M, "100 GiB qcow2 after mkfs is {qsize} bytes");
        }
        run("qemu-img", &["check", q.to_str().unwrap()]);
        let raw = dir.path().join("v.raw");
        let _ = std::fs::remove_file(&raw);
        crate::support::qcow2_to_raw(&q, &raw);
        e2fsck_clean(&raw);
        assert!(features(&raw).contains("metadata_csum"));
        std::fs::remove_file(&raw).unwrap();
    }
}

/// A device that does not read zeros (old data everywhere): mkfs must zero or
/// flag what it skips, and still be clean.
#[test]
fn dirty_device() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for lazy in [false, true] {
        let p = dir.path().join(format!("dirty-{lazy}.raw"));
        let size = 96 * M;
        let junk: Vec<u8> = (0..M).map(|i| (i * 7 + 13) as u8).collect();
        {
            let img = RawImage::create(&p, size, Prealloc::Off, &Control::new()).unwrap();
            for off in (0..size).step_by(M as usize) {
                img.write_at(&junk, off).unwrap();
            }
        }
        let img = RawImage::open(&p, false).unwrap();
        let o = MkfsOptions {
            lazy_itable_init: lazy,
            ..opts(4096, true)
        };
        let r = mkfs(&img, &o).unwrap();
        assert_eq!(r.bytes_skipped, 0);
        drop(img);
        e2fsck_clean(&p);
        let groups = run("dumpe2fs", &[p.to_str().unwrap()]);
        assert_eq!(groups.contains("ITABLE_ZEROED"), !lazy, "{groups}");
    }
}

#[test]
fn kernel_mount_and_resize2fs() {
    if !tools() || !require_tool("resize2fs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for bs in [4096u32, 1024] {
        let p = dir.path().join(format!("m{bs}.raw"));
        let img = RawImage::create(&p, 256 * M, Prealloc::Off, &Control::new()).unwrap();
        mkfs(
            &img,
            &MkfsOptions {
                root_uid: 1234,
                root_gid: 4321,
                ..opts(bs, true)
            },
        )
        .unwrap();
        drop(img);
        if require_loop_mount() {
            let payload: Vec<u8> = (0..3 * M + 17).map(|i| (i % 251) as u8).collect();
            {
                let m = Mount::new(&p, false);
                let md = std::fs::metadata(&m.dir).unwrap();
                assert_eq!((md.uid(), md.gid()), (1234, 4321));
                assert!(m.dir.join("lost+found").is_dir());
                std::fs::create_dir(m.dir.join("d")).unwrap();
                for i in 0..200 {
                    std::fs::write(m.dir.join(format!("d/f{i}")), format!("file {i}")).unwrap();
                }
                std::fs::write(m.dir.join("big"), &payload).unwrap();
                run("sync", &[]);
            }
            {
                let m = Mount::new(&p, true);
                assert_eq!(std::fs::read(m.dir.join("big")).unwrap(), payload);
                assert_eq!(
                    std::fs::read_to_string(m.dir.join("d/f199")).unwrap(),
                    "file 199"
                );
            }
            e2fsck_clean(&p);
            // resize2fs refuses a filesystem mounted since its last check
            // (s_lastcheck < s_mtime: "Please run 'e2fsck -f' first").
            // `-fn` records no check, so mkfs's s_lastcheck stayed, and the
            // test passed only when mkfs and the rw mount fell in the same
            // second. `-fp` records the check; clean, it exits 0.
            run("e2fsck", &["-fp", p.to_str().unwrap()]);
        }
        // Grow the image, then the filesystem.
        let img = RawImage::open(&p, false).unwrap();
        img.grow(3 * G, Prealloc::Off).unwrap();
        drop(img);
        run("resize2fs", &[p.to_str().unwrap()]);
        e2fsck_clean(&p);
        let h = run("dumpe2fs", &["-h", p.to_str().unwrap()]);
        let blocks = 3 * G / u64::from(bs);
        assert!(
            h.contains(&format!("Block count:              {blocks}")),
            "{h}"
        );
        if require_loop_mount() {
            let m = Mount::new(&p, true);
            assert_eq!(
                std::fs::read_to_string(m.dir.join("d/f7")).unwrap(),
                "file 7"
            );
        }
    }
}

#[test]
fn bad_options_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.raw");
    let img = RawImage::create(&p, 64 * M, Prealloc::Off, &Control::new()).unwrap();
    let cases = [
        MkfsOptions {
            block_size: 8192,
            ..Default::default()
        },
        MkfsOptions {
            label: "a label longer than 16".into(),
            ..Default::default()
        },
        MkfsOptions {
            reserved_percent: 60.0,
            ..Default::default()
        },
        MkfsOptions {
            inode_ratio: 100,
            ..Default::default()
        },
        MkfsOptions {
            journal: Journal::Blocks(10),
            ..Default::default()
        },
    ];
    for o in cases {
        let e = mkfs(&img, &o).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    }
    let tiny = dir.path().join("tiny.raw");
    let img = RawImage::create(&tiny, 64 * K, Prealloc::Off, &Control::new()).unwrap();
    assert!(matches!(
        mkfs(&img, &MkfsOptions::default()),
        Err(Error::InvalidArgument { .. })
    ));
    // Read-only handle refused.
    let ro = RawImage::open(&p, true).unwrap();
    assert!(mkfs(&ro, &MkfsOptions::default()).is_err());
}

#[test]
fn ext4_view_reads_fresh_fs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.raw");
    let img = RawImage::create(&p, 32 * M, Prealloc::Off, &Control::new()).unwrap();
    let r = mkfs(
        &img,
        &MkfsOptions {
            label: "view".into(),
            ..Default::default()
        },
    )
    .unwrap();
    drop(img);
    let fs = ext4_view::Ext4::load_from_path(&p).unwrap();
    assert_eq!(fs.label().to_str().unwrap(), "view");
    assert_eq!(fs.uuid().as_bytes(), r.uuid.as_bytes());
    let names: Vec<String> = fs
        .read_dir("/")
        .unwrap()
        .map(|e| e.unwrap().file_name().as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"lost+found".to_string()), "{names:?}");
    assert_eq!(fs.metadata("/lost+found").unwrap().mode() & 0o7777, 0o700);
}

/// Online growth, as in a guest: mounted, the loop device grown, `resize2fs`
/// on the mounted filesystem (uses the reserved GDT blocks), then e2fsck.
#[test]
fn online_resize2fs() {
    if !tools() || !require_tool("resize2fs") || !require_loop_mount() {
        return;
    }
    // The kernel's online resize ioctl needs CAP_SYS_RESOURCE (containers often drop it).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let caps = u64::from_str_radix(eff.split_whitespace().nth(1).unwrap(), 16).unwrap();
    if caps & (1 << 24) == 0 {
        crate::support::host_forbids(
            "online resize needs CAP_SYS_RESOURCE (the resize ioctl is refused without it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for bs in [4096u32, 1024] {
        let p = dir.path().join(format!("on{bs}.raw"));
        let img = RawImage::create(&p, 128 * M, Prealloc::Off, &Control::new()).unwrap();
        mkfs(&img, &opts(bs, true)).unwrap();
        {
            let m = Mount::new(&p, false);
            std::fs::write(m.dir.join("keep"), b"kept").unwrap();
            img.grow(2 * G, Prealloc::Off).unwrap();
            let src = run("findmnt", &["-n", "-o", "SOURCE", m.dir.to_str().unwrap()]);
            let loopdev = src.trim().to_string();
            run("losetup", &["-c", &loopdev]);
            run("resize2fs", &[&loopdev]);
            let st = run("df", &["-B1", "--output=size", m.dir.to_str().unwrap()]);
            let size: u64 = st.lines().nth(1).unwrap().trim().parse().unwrap();
            assert!(size > G, "online-grown filesystem is only {size} bytes");
        }
        drop(img);
        e2fsck_clean(&p);
        let h = run("dumpe2fs", &["-h", p.to_str().unwrap()]);
        assert!(
            h.contains(&format!(
                "Block count:              {}",
                2 * G / u64::from(bs)
            )),
            "{h}"
        );
    }
}

/// Parameters away from the defaults: as many inodes as blocks (inode tables
/// spilling over flex groups), no reserved blocks, explicit journal sizes,
/// fixed UUID and times, root owned by a user.
#[test]
fn odd_parameters() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uuid = uuid::Uuid::parse_str("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap();
    let cases = [
        (
            512 * M,
            MkfsOptions {
                inode_ratio: 4096,
                ..opts(4096, true)
            },
        ),
        (
            300 * M,
            MkfsOptions {
                inode_ratio: 1024,
                ..opts(1024, true)
            },
        ),
        (
            3 * G,
            MkfsOptions {
                inode_ratio: 2048,
                journal: Journal::Blocks(70_000),
                ..opts(2048, true)
            },
        ),
        (
            200 * M,
            MkfsOptions {
                reserved_percent: 0.0,
                uuid: Some(uuid),
                timestamp: Some(4_000_000_000),
                root_uid: 1000,
                root_gid: 1000,
                ..opts(4096, true)
            },
        ),
        (
            5 * G,
            MkfsOptions {
                inode_ratio: 1 << 20,
                ..opts(4096, false)
            },
        ),
    ];
    for (i, (size, o)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("odd{i}.raw"));
        let img = RawImage::create(&p, size, Prealloc::Off, &Control::new()).unwrap();
        let r = mkfs(&img, &o).unwrap();
        drop(img);
        eprintln!("case {i}: {r:?}");
        e2fsck_clean(&p);
        let h = run("dumpe2fs", &["-h", p.to_str().unwrap()]);
        if let Journal::Blocks(n) = o.journal {
            assert_eq!(r.journal_blocks, u64::from(n));
            assert!(h.contains(&format!("Total journal blocks:     {n}")), "{h}");
        }
        if o.uuid.is_some() {
            assert!(
                h.contains("Filesystem UUID:          0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
                "{h}"
            );
            assert!(h.contains("Reserved block count:     0"), "{h}");
        }
        std::fs::remove_file(&p).unwrap();
    }
}
