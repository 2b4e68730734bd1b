//! populate from tar archives (plain, gzip, GNU tar with sparse files) and a
//! hostile corpus, each refused with its reason and nothing left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::support::{debugfs, e2fsck_clean, require_loop_mount, require_tool, run, Mount};
use vmvol_format::{Control, Prealloc, RawImage};
use vmvol_fs::{
    populate, populate_tar, required_size, Error, PopulateLimits, PopulateOptions, Source,
};

const M: u64 = 1 << 20;

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_650_000_000);
    h
}

/// A well-formed archive exercising every entry type.
fn good_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0, 0o750);
    b.append_data(&mut h, "./", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    b.append_data(&mut h, "usr/", &[][..]).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
    let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
    b.append_data(&mut h, "usr/data.bin", &data[..]).unwrap();
    // Parent directories implied by the path only.
    let mut h = header(tar::EntryType::Regular, 5, 0o755);
    b.append_data(&mut h, "implied/dir/chain/tool", &b"#!sh\n"[..])
        .unwrap();
    let long = format!("{}/{}", "n".repeat(200), "f".repeat(200));
    let mut h = header(tar::EntryType::Regular, 3, 0o600);
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "usr/link", "data.bin").unwrap();
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "usr/longlink", "t/".repeat(100))
        .unwrap();
    let mut h = header(tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut h, "hard", "usr/data.bin").unwrap();
    let mut h = header(tar::EntryType::Char, 0, 0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(5).unwrap();
    b.append_data(&mut h, "dev/zero", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0, 0o600);
    b.append_data(&mut h, "dev/fifo", &[][..]).unwrap();
    let zeros = vec![0u8; 3 * M as usize];
    let mut h = header(tar::EntryType::Regular, zeros.len() as u64, 0o644);
    b.append_data(&mut h, "zeros", &zeros[..]).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn image(dir: &Path, name: &str, size: u64) -> (std::path::PathBuf, RawImage) {
    let p = dir.join(name);
    let img = RawImage::create(&p, size, Prealloc::Off, &Control::new()).unwrap();
    (p, img)
}

#[test]
fn plain_and_gzip_tar() {
    if !require_tool("e2fsck") || !require_tool("debugfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = good_tar();
    for (name, bytes) in [("plain", tar.clone()), ("gz", gzip(&tar))] {
        let tar_path = dir.path().join(format!("{name}.tar"));
        std::fs::write(&tar_path, &bytes).unwrap();
        let opts = PopulateOptions::default();
        let size = required_size(&Source::Tar(tar_path.clone()), &opts).unwrap();
        let (p, img) = image(dir.path(), &format!("{name}.raw"), size);
        let r = populate(&img, &Source::Tar(tar_path), &opts, &Control::new()).unwrap();
        drop(img);
        assert_eq!(
            (r.files, r.symlinks, r.hard_links, r.specials),
            (4, 2, 1, 2),
            "{r:?}"
        );
        e2fsck_clean(&p);
        let fs = ext4_view::Ext4::load_from_path(&p).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
        assert!(fs.read("/usr/data.bin").unwrap() == data);
        assert!(fs.read("/hard").unwrap() == data);
        assert_eq!(fs.read("/implied/dir/chain/tool").unwrap(), b"#!sh\n");
        let long = format!("/{}/{}", "n".repeat(200), "f".repeat(200));
        assert_eq!(fs.read(long.as_str()).unwrap(), b"abc");
        assert_eq!(fs.read_link("/usr/link").unwrap().as_ref(), b"data.bin");
        assert_eq!(
            fs.read_link("/usr/longlink").unwrap().as_ref(),
            "t/".repeat(100).as_bytes()
        );
        let md = fs.metadata("/usr/data.bin").unwrap();
        assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o644, 1000, 100));
        assert_eq!(md.modified().seconds(), 1_650_000_000);
        assert_eq!(fs.metadata("/").unwrap().mode() & 0o7777, 0o750);
        assert_eq!(fs.metadata("/implied/dir").unwrap().mode() & 0o7777, 0o755);
        assert!(fs
            .symlink_metadata("/dev/zero")
            .unwrap()
            .file_type()
            .is_char_dev());
        assert!(fs
            .symlink_metadata("/dev/fifo")
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(fs.read("/zeros").unwrap().len(), 3 * M as usize);
        let stat = String::from_utf8_lossy(&debugfs(&p, "stat /usr/data.bin")).into_owned();
        assert!(stat.contains("Links: 2"), "{stat}");
        let stat = String::from_utf8_lossy(&debugfs(&p, "stat /zeros")).into_owned();
        assert!(
            stat.contains("Blockcount: 0"),
            "all-zero file must be a hole: {stat}"
        );
        if require_loop_mount() {
            let m = Mount::new(&p, true);
            let k = std::fs::metadata(m.dir.join("dev/zero")).unwrap();
            assert_eq!(k.rdev(), libc::makedev(1, 5));
            assert_eq!(std::fs::read(m.dir.join("usr/link")).unwrap(), data);
            assert_eq!(std::fs::metadata(m.dir.join("hard")).unwrap().nlink(), 2);
        }
    }
}

/// An archive made by GNU tar from a real tree, sparse file included.
#[test]
fn gnu_tar_with_sparse_file() {
    if !require_tool("e2fsck")
        || std::process::Command::new("tar")
            .arg("--version")
            .output()
            .is_err()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("a/sparse")).unwrap();
        f.set_len(100 * M).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 100 * M - 4).unwrap();
    }
    std::fs::write(src.join("a/b/c"), b"content").unwrap();
    let tar_path = dir.path().join("t.tar.gz");
    run(
        "tar",
        &[
            "-C",
            src.to_str().unwrap(),
            "-czSf",
            tar_path.to_str().unwrap(),
            ".",
        ],
    );
    let (p, img) = image(dir.path(), "t.raw", 64 * M);
    let f = std::fs::File::open(&tar_path).unwrap();
    populate_tar(&img, f, &PopulateOptions::default(), &Control::new()).unwrap();
    drop(img);
    e2fsck_clean(&p);
    let fs = ext4_view::Ext4::load_from_path(&p).unwrap();
    let sparse = fs.read("/a/sparse").unwrap();
    assert_eq!(sparse.len(), 100 * M as usize);
    assert_eq!(&sparse[..4], b"head");
    assert_eq!(&sparse[sparse.len() - 4..], b"tail");
    assert_eq!(fs.read("/a/b/c").unwrap(), b"content");
    // 100 MiB logical in a 64 MiB filesystem: only the data blocks are mapped.
    let stat = String::from_utf8_lossy(&debugfs(&p, "stat /a/sparse")).into_owned();
    assert!(stat.contains("Blockcount: 16"), "{stat}");
}

/// Raw header with an arbitrary (unvalidated) name.
fn raw_entry(name: &[u8], kind: tar::EntryType, data: &[u8], link: Option<&[u8]>) -> Vec<u8> {
    let mut h = header(kind, data.len() as u64, 0o644);
    {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn finish(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

#[test]
fn hostile_corpus_refused_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ok = raw_entry(b"fine", tar::EntryType::Regular, b"fine", None);
    let mut truncated = good_tar();
    truncated.truncate(4096 + 512 * 3);
    let many = {
        let mut v = Vec::new();
        for i in 0..50 {
            v.extend(raw_entry(
                format!("f{i}").as_bytes(),
                tar::EntryType::Regular,
                b"x",
                None,
            ));
        }
        finish(v)
    };
    let bomb = {
        // 256 MiB of zeros compresses to a few hundred KiB.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 256 * M, 0o644);
        b.append_data(&mut h, "bomb", std::io::repeat(0).take_n(256 * M))
            .unwrap();
        gzip(&b.into_inner().unwrap())
    };
    let small = PopulateLimits {
        max_total_bytes: 16 * M,
        max_entries: 20,
    };
    let cases: Vec<(&str, Vec<u8>, PopulateLimits, &str, &str)> = vec![
        (
            "traversal",
            finish(
                [
                    ok.clone(),
                    raw_entry(b"a/../../etc/passwd", tar::EntryType::Regular, b"x", None),
                ]
                .concat(),
            ),
            PopulateLimits::default(),
            "a/../../etc/passwd",
            "`..`",
        ),
        (
            "absolute",
            finish(raw_entry(
                b"/etc/passwd",
                tar::EntryType::Regular,
                b"x",
                None,
            )),
            PopulateLimits::default(),
            "/etc/passwd",
            "absolute",
        ),
        (
            "link traversal",
            finish(
                [
                    ok.clone(),
                    raw_entry(b"l", tar::EntryType::Link, b"", Some(b"../outside")),
                ]
                .concat(),
            ),
            PopulateLimits::default(),
            "l",
            "`..`",
        ),
        (
            "missing link target",
            finish(raw_entry(b"l", tar::EntryType::Link, b"", Some(b"nowhere"))),
            PopulateLimits::default(),
            "l",
            "not an earlier entry",
        ),
        (
            "duplicate",
            finish([ok.clone(), ok.clone()].concat()),
            PopulateLimits::default(),
            "fine",
            "duplicate",
        ),
        (
            "file over dir",
            finish(
                [
                    raw_entry(b"d/x", tar::EntryType::Regular, b"x", None),
                    raw_entry(b"d/x/y", tar::EntryType::Regular, b"y", None),
                ]
                .concat(),
            ),
            PopulateLimits::default(),
            "d/x",
            "not one",
        ),
        (
            "truncated",
            truncated,
            PopulateLimits::default(),
            "",
            "truncated",
        ),
        (
            "oversized",
            finish(raw_entry(
                b"big",
                tar::EntryType::Regular,
                &vec![1u8; 17 * M as usize],
                None,
            )),
            small.clone(),
            "big",
            "total bytes",
        ),
        (
            "too many entries",
            many,
            small.clone(),
            "f20",
            "entry count",
        ),
        ("bomb", bomb, small, "bomb", "total bytes"),
    ];
    for (what, bytes, limits, entry, reason) in cases {
        let (p, img) = image(dir.path(), "h.raw", 64 * M);
        let opts = PopulateOptions {
            limits,
            ..Default::default()
        };
        let e = populate_tar(&img, &bytes[..], &opts, &Control::new()).unwrap_err();
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        match &e {
            Error::EntryRefused {
                entry: en,
                reason: r,
            } => {
                assert!(en.contains(entry), "{what}: entry {en:?}");
                assert!(r.contains(reason), "{what}: reason {r:?}");
            }
            Error::LimitExceeded { what: w, reason: r } => {
                assert!(w.contains(reason), "{what}: {w}");
                assert!(r.contains(entry), "{what}: {r}");
            }
            other => panic!("{what}: unexpected error {other:?}"),
        }
        drop(img);
        assert_eq!(
            std::fs::metadata(&p).unwrap().blocks(),
            0,
            "{what}: image not discarded"
        );
        std::fs::remove_file(&p).unwrap();
    }
}

trait TakeN: std::io::Read + Sized {
    fn take_n(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeN for R {}

/// Deep (but legal) nesting is created without recursion trouble.
#[test]
fn deep_nesting_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    // Deeper than ext4-view resolves (1000 components): checked by e2fsck and debugfs.
    let path = "d/".repeat(1500) + "leaf";
    let mut h = header(tar::EntryType::Regular, 4, 0o644);
    b.append_data(&mut h, &path, &b"deep"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let (p, img) = image(dir.path(), "deep.raw", 64 * M);
    let r = populate_tar(&img, &tar[..], &PopulateOptions::default(), &Control::new()).unwrap();
    drop(img);
    assert_eq!(r.directories, 1501);
    if require_tool("e2fsck") && require_tool("debugfs") {
        e2fsck_clean(&p);
        assert_eq!(debugfs(&p, &format!("cat /{path}")), b"deep");
    }
}
