//! Cancel leaves nothing: `populate` (tree and tar) and `mkfs` stopped by a
//! `Control` cancel flag set from their own progress callback, midway, return
//! `Error::Cancelled` and leave the device reading as zeros — even where it
//! held other bytes before.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vmvol_format::{BlockIo, Control, Prealloc, RawImage};
use vmvol_fs::{
    mkfs_with_control, populate, populate_tar, Error, Journal, MkfsOptions, PopulateOptions, Source,
};

const MIB: u64 = 1 << 20;

/// A control whose progress callback sets its cancel flag once `done`
/// reaches `at`; the counter records how many reports arrived.
fn cancel_at(at: u64) -> (Control, Arc<AtomicU64>, Arc<AtomicBool>) {
    let flag = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let (f, c) = (flag.clone(), calls.clone());
    let control = Control::new()
        .with_progress(move |done, _total| {
            c.fetch_add(1, Ordering::Relaxed);
            if done >= at {
                f.store(true, Ordering::Relaxed);
            }
        })
        .with_cancel(flag.clone());
    (control, calls, flag)
}

/// A raw image of `size` bytes filled with non-zero junk, so that "reads as
/// zeros" afterwards proves the device was discarded.
fn junk_image(path: &Path, size: u64) -> RawImage {
    let img = RawImage::create(path, size, Prealloc::Off, &Control::new()).unwrap();
    let junk: Vec<u8> = (0..MIB).map(|i| (i * 7 + 1) as u8 | 1).collect();
    for off in (0..size).step_by(MIB as usize) {
        img.write_at(&junk, off).unwrap();
    }
    img
}

fn assert_all_zero(img: &RawImage) {
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..img.size()).step_by(MIB as usize) {
        img.read_at(&mut buf, off).unwrap();
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            panic!("byte {} is not zero after cancel", off + i as u64);
        }
    }
}

fn small_opts() -> PopulateOptions {
    let mut o = PopulateOptions::default();
    o.mkfs.journal = Journal::None;
    o
}

#[test]
fn populate_tree_cancelled_midway_leaves_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("f{i:02}")), vec![i as u8 + 1; 256 * 1024]).unwrap();
    }
    let img = junk_image(&dir.path().join("vol.raw"), 64 * MIB);
    // Cancel once 2 MiB of the 10 MiB of file data are copied.
    let (control, calls, flag) = cancel_at(2 * MIB);
    let err = populate(&img, &Source::Dir(src), &small_opts(), &control).unwrap_err();
    assert!(matches!(err, Error::Cancelled { op: "populate" }), "{err}");
    assert!(flag.load(Ordering::Relaxed));
    assert!(
        calls.load(Ordering::Relaxed) > 8,
        "cancelled midway, not at once"
    );
    assert_all_zero(&img);
}

#[test]
fn populate_tar_cancelled_midway_leaves_zeros() {
    let mut builder = tar::Builder::new(Vec::new());
    for i in 0..40u8 {
        let data = vec![i + 1; 256 * 1024];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut h, format!("d/f{i:02}"), &data[..])
            .unwrap();
    }
    let archive = builder.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = junk_image(&dir.path().join("vol.raw"), 64 * MIB);
    let (control, calls, _) = cancel_at(2 * MIB);
    let err = populate_tar(&img, &archive[..], &small_opts(), &control).unwrap_err();
    assert!(matches!(err, Error::Cancelled { op: "populate" }), "{err}");
    assert!(
        calls.load(Ordering::Relaxed) > 8,
        "cancelled midway, not at once"
    );
    assert_all_zero(&img);
    // The same archive without a cancel succeeds: the cancel made the difference.
    let r = populate_tar(&img, &archive[..], &small_opts(), &Control::new()).unwrap();
    assert_eq!(r.files, 40);
}

#[test]
fn mkfs_cancelled_midway_leaves_zeros() {
    let dir = tempfile::tempdir().unwrap();
    // 1 KiB blocks: 16 groups, progress reported at each; cancel at the 9th.
    let size = 128 * MIB;
    let img = junk_image(&dir.path().join("vol.raw"), size);
    let (control, calls, _) = cancel_at(size / 2);
    let opts = MkfsOptions {
        block_size: 1024,
        ..MkfsOptions::default()
    };
    let err = mkfs_with_control(&img, &opts, &control).unwrap_err();
    assert!(matches!(err, Error::Cancelled { op: "mkfs" }), "{err}");
    assert!(calls.load(Ordering::Relaxed) >= 9, "cancelled midway");
    assert_all_zero(&img);
    // Not cancelled: the same call makes a filesystem.
    let r = mkfs_with_control(&img, &opts, &Control::new()).unwrap();
    assert_eq!(r.groups, 16);
    assert!(vmvol_fs::free_map(&img).is_ok());
}
