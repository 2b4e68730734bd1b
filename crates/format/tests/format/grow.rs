//! `qcow2::grow_file`: the one-header-write grow of a closed image, the cases
//! that must take the general path, and a SIGKILL campaign on the fast path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    assert_check_clean, assert_compare, pattern, qemu_check, qemu_json, require_tool,
};
use vmvol_format::qcow2::{grow_file, Qcow2Header};
use vmvol_format::{BackingPolicy, BlockIo, Format, OpenOptions, Qcow2CreateOptions, Qcow2Image};

fn policy(dir: &Path) -> BackingPolicy {
    BackingPolicy::within([dir.to_path_buf()])
}

fn header(path: &Path) -> Qcow2Header {
    Qcow2Header::read(path, &std::fs::File::open(path).unwrap()).unwrap()
}

/// A qcow2 image of `size` bytes with `data` written at 0, closed; and the
/// raw file holding the same bytes.
fn image_with(dir: &Path, name: &str, size: u64, cs: u64, data: &[u8]) -> (PathBuf, PathBuf) {
    let path = dir.join(format!("{name}.qcow2"));
    Qcow2Image::create(&path, &Qcow2CreateOptions::new(size).cluster_size(cs)).unwrap();
    let img = Qcow2Image::open(&path, &OpenOptions::new().policy(policy(dir))).unwrap();
    img.write_at(data, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(size)
        .unwrap();
    (path, raw)
}

fn set_raw_len(raw: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn assert_virtual_size(path: &Path, size: u64) {
    let info = qemu_json(&["info", "-f", "qcow2", path.to_str().unwrap()]);
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
    assert_eq!(
        info["format-specific"]["data"]["corrupt"].as_bool(),
        Some(false)
    );
}

/// The fast path changes bytes 24..40 of the file and nothing else.
#[test]
fn header_only_grow_rewrites_size_and_l1_size() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(7, 3 << 20);
    let (path, raw) = image_with(dir.path(), "a", 8 << 20, 64 << 10, &data);
    let before = std::fs::read(&path).unwrap();
    // 2 GiB + 512: five L1 entries of 512 MiB, all inside the L1's one cluster.
    let new_size = (2 << 30) + 512;
    grow_file(&path, new_size, &policy(dir.path())).unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(before.len(), after.len(), "the fast path allocates nothing");
    let diff: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(diff.iter().all(|&i| (24..40).contains(&i)), "{diff:?}");
    let h = header(&path);
    assert_eq!((h.size, h.l1_size), (new_size, 5));
    assert!(!h.is_dirty());
    assert_check_clean(&path);
    assert_virtual_size(&path, new_size);
    set_raw_len(&raw, new_size);
    assert_compare(&path, "qcow2", &raw);
    // Same size again is a no-op, smaller is refused.
    grow_file(&path, new_size, &policy(dir.path())).unwrap();
    assert!(matches!(
        grow_file(&path, 1 << 20, &policy(dir.path())),
        Err(vmvol_format::Error::Shrink { .. })
    ));
    assert!(grow_file(&path, new_size + 100, &policy(dir.path())).is_err());
    assert_eq!(header(&path).size, new_size);
}

/// A backing file no longer than the image cannot show through: fast path.
#[test]
fn header_only_grow_over_short_backing() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = pattern(3, 2 << 20);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let path = dir.path().join("top.qcow2");
    Qcow2Image::create(
        &path,
        &Qcow2CreateOptions::new(4 << 20).backing("base.raw", Format::Raw),
    )
    .unwrap();
    let before = std::fs::read(&path).unwrap();
    grow_file(&path, 64 << 20, &policy(dir.path())).unwrap();
    assert_eq!(std::fs::read(&path).unwrap().len(), before.len());
    assert!(!header(&path).is_dirty());
    assert_check_clean(&path);
    assert_virtual_size(&path, 64 << 20);
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, &base).unwrap();
    set_raw_len(&raw, 64 << 20);
    assert_compare(&path, "qcow2", &raw);
}

/// 512-byte clusters: one L1 cluster maps 2 MiB, so growing 1 MiB → 5 MiB
/// must move the L1 table (general path); still clean and intact.
#[test]
fn grow_needing_new_l1_clusters_takes_general_path() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(11, 1 << 20);
    let (path, raw) = image_with(dir.path(), "small", 1 << 20, 512, &data);
    let old = header(&path);
    grow_file(&path, 5 << 20, &policy(dir.path())).unwrap();
    let h = header(&path);
    assert_eq!(h.size, 5 << 20);
    assert!(h.l1_size >= 160, "{}", h.l1_size);
    assert_ne!(h.l1_table_offset, old.l1_table_offset, "L1 relocated");
    assert!(!h.is_dirty(), "closed cleanly");
    assert_check_clean(&path);
    assert_virtual_size(&path, 5 << 20);
    set_raw_len(&raw, 5 << 20);
    assert_compare(&path, "qcow2", &raw);
}

/// A backing file longer than the image would show through the new range
/// after a header-only grow: the general path zeroes it.
#[test]
fn grow_over_longer_backing_takes_general_path() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = pattern(5, 8 << 20);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let path = dir.path().join("top.qcow2");
    Qcow2Image::create(
        &path,
        &Qcow2CreateOptions::new(3 << 20).backing("base.raw", Format::Raw),
    )
    .unwrap();
    grow_file(&path, 8 << 20, &policy(dir.path())).unwrap();
    assert!(!header(&path).is_dirty());
    assert_check_clean(&path);
    assert_virtual_size(&path, 8 << 20);
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, &base[..3 << 20]).unwrap();
    set_raw_len(&raw, 8 << 20);
    assert_compare(&path, "qcow2", &raw);
}

const STEP: u64 = 512 << 10;

/// The child of the kill campaign: grows the image by `STEP` until killed,
/// reporting each completed grow.
#[test]
fn grow_child() {
    let Ok(path) = std::env::var("VMVOL_GROW_CHILD") else {
        return; // only a child process runs this
    };
    let path = PathBuf::from(path);
    let dir = path.parent().unwrap().to_path_buf();
    println!("ready");
    loop {
        let size = header(&path).size;
        grow_file(&path, size + STEP, &policy(&dir)).unwrap();
        println!("grew {}", size + STEP);
    }
}

/// SIGKILL at random points of repeated fast-path grows: the image is never
/// dirty, `qemu-img check` finds it clean, its size is the last reported or
/// the next, and its data reads back.
#[test]
fn sigkill_during_header_only_grow() {
    if !require_tool("qemu-img") {
        return;
    }
    let kills: usize = std::env::var("VMVOL_GROW_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let start = 4u64 << 20;
    let data = pattern(13, 1 << 20);
    let (path, _) = image_with(dir.path(), "k", start, 64 << 10, &data);
    let mut seed = 0x9e37_79b9_u64;
    let mut mid_grow = 0;
    for _ in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut ch = Command::new(std::env::current_exe().unwrap())
            .args([
                "grow::grow_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VMVOL_GROW_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(ch.stdout.take().unwrap()).lines();
        let first = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.ends_with("ready") || l.starts_with("test result"));
        if !first.as_deref().is_some_and(|l| l.ends_with("ready")) {
            let _ = ch.kill();
            let mut err = String::new();
            ch.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("child did not start: {first:?} {err}");
        }
        let before = header(&path).size;
        // Let it run 0..15 ms, then kill it wherever it is.
        let until = Instant::now() + Duration::from_micros(seed % 15_000);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        ch.kill().unwrap();
        ch.wait().unwrap();
        let reported = lines
            .map_while(|l| l.ok())
            .filter_map(|l| l.strip_prefix("grew ").and_then(|s| s.parse::<u64>().ok()))
            .last()
            .unwrap_or(before);
        let h = header(&path);
        assert!(!h.is_dirty(), "dirty after kill");
        assert!(
            h.size == reported || h.size == reported + STEP,
            "size {} after last reported {reported}",
            h.size
        );
        assert_eq!((h.size - start) % STEP, 0);
        if h.size != reported {
            mid_grow += 1;
        }
        let v = qemu_check(&path);
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(
            (n("corruptions"), n("leaks"), n("check-errors")),
            (0, 0, 0),
            "{v}"
        );
        let img = Qcow2Image::open(
            &path,
            &OpenOptions::new()
                .read_only(true)
                .policy(policy(dir.path())),
        )
        .unwrap();
        let mut got = vec![0u8; data.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == data, "data changed");
        let mut tail = vec![0u8; 4096];
        img.read_at(&mut tail, h.size - 4096).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
    }
    assert!(header(&path).size > start, "the child never grew the image");
    assert_virtual_size(&path, header(&path).size);
    eprintln!("{kills} kills, {mid_grow} between a grow's write and its report");
}
