//! check() agrees with `qemu-img check` on clean, leaky and corrupt images.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::support::*;
use vmvol_format::qcow2::{L2Entry, Qcow2Meta};
use vmvol_format::{check, RepairMode};

/// Our report and qemu-img's agree on every count qemu-img reports.
fn assert_agrees(img: &Path) -> vmvol_format::CheckReport {
    let ours = check(img, RepairMode::None).unwrap();
    let js = serde_json::to_value(&ours).unwrap();
    let q = qemu_check(img);
    for key in [
        "check-errors",
        "leaks",
        "corruptions",
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
    ] {
        let theirs = q.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        let mine = js.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(
            mine,
            theirs,
            "{key} of {}: ours {ours:#?} qemu {q:#}",
            img.display()
        );
    }
    ours
}

fn put_be(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Host offset of the L2 entry of guest cluster `g` and its raw value.
fn l2_entry(img: &Path, g: u64) -> (u64, u64) {
    let m = Qcow2Meta::open(img, false).unwrap();
    let per = m.cluster_size() / 8;
    let l1 = m.active_l1().unwrap();
    let l2_off = l1[(g / per) as usize] & 0x00ff_ffff_ffff_fe00;
    let t = m.read_l2(l2_off).unwrap();
    (l2_off + (g % per) * 8, t[(g % per) as usize])
}

/// Byte offset of the 16-bit refcount entry of host cluster `c`.
fn refcount_entry(img: &Path, c: u64) -> u64 {
    let m = Qcow2Meta::open(img, false).unwrap();
    let per = m.refcounts_per_block();
    let rt = m.refcount_table().unwrap();
    (rt[(c / per) as usize] & !511) + (c % per) * 2
}

fn written_image(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        img.to_str().unwrap(),
        "16M",
    ]);
    qemu_io("qcow2", &img, &["write -P 0x11 0 256k"]);
    qemu_io("qcow2", &img, &["write -P 0x22 1M 64k"]);
    qemu_io("qcow2", &img, &["write -z 2M 128k"]);
    qemu_io("qcow2", &img, &["write -P 0x33 8M 4k"]);
    img
}

#[test]
fn agrees_on_clean_images() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let empty = dir.join("empty.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", empty.to_str().unwrap(), "1G"]);
    let mut imgs = vec![empty];
    imgs.push(written_image(dir, "w.qcow2", "cluster_size=65536"));
    imgs.push(written_image(dir, "small.qcow2", "cluster_size=512"));
    imgs.push(written_image(dir, "big.qcow2", "cluster_size=2M"));
    imgs.push(written_image(dir, "rc1.qcow2", "refcount_bits=1"));
    imgs.push(written_image(dir, "rc64.qcow2", "refcount_bits=64"));
    imgs.push(written_image(dir, "v2.qcow2", "compat=0.10"));
    let snap = written_image(dir, "snap.qcow2", "cluster_size=65536");
    qemu_ok(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    qemu_io("qcow2", &snap, &["write -P 0x44 0 128k"]);
    qemu_ok(&["snapshot", "-c", "s2", snap.to_str().unwrap()]);
    qemu_io("qcow2", &snap, &["write -P 0x55 64k 128k"]);
    imgs.push(snap);
    let raw = dir.join("src.raw");
    raw_with(&raw, 8 << 20, &mixed_writes(8 << 20));
    for (name, extra) in [
        ("zlib.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        let out = dir.join(name);
        qemu_ok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            extra,
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        imgs.push(out);
    }
    for img in &imgs {
        let r = assert_agrees(img);
        assert!(r.is_clean(), "{}: {r:#?}", img.display());
        assert!(r.checked);
    }
}

#[test]
fn raw_has_nothing_to_check() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("a.raw");
    raw_with(&raw, 1 << 20, &[(0, vec![1; 100])]);
    let r = check(&raw, RepairMode::Leaks).unwrap();
    assert!(!r.checked && r.is_clean());
    assert_eq!(r.format, Some(vmvol_format::Format::Raw));
    assert!(r.messages[0].contains("nothing") || r.messages[0].contains("no metadata"));
}

#[test]
fn leaks_are_found_and_repaired() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = written_image(d.path(), "leak.qcow2", "cluster_size=65536");
    let before = d.path().join("before.raw");
    // Leak 1: drop the L2 entry of guest cluster 16 (1 MiB): its data cluster
    // keeps refcount 1 but nothing uses it.
    let (at, _) = l2_entry(&img, 16);
    put_be(&img, at, &0u64.to_be_bytes());
    qemu_ok(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        before.to_str().unwrap(),
    ]);
    // Leak 2: an unused cluster past everything, given refcount 1.
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    put_be(&img, refcount_entry(&img, len / 65536), &1u16.to_be_bytes());
    let r = assert_agrees(&img);
    assert_eq!((r.leaks, r.corruptions), (2, 0), "{r:#?}");
    let (rc, _, _) = qemu_img_status(&["check", img.to_str().unwrap()]);
    assert_eq!(rc, 3, "qemu-img says leaks");

    let fixed = check(&img, RepairMode::Leaks).unwrap();
    assert_eq!(fixed.leaks_fixed, 2);
    assert!(fixed.is_clean(), "{fixed:#?}");
    assert_qemu_clean(&img);
    assert_same(&before, &img);
}

#[test]
fn refcount_too_high_on_used_cluster() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = written_image(d.path(), "hi.qcow2", "cluster_size=65536");
    let (_, e) = l2_entry(&img, 0);
    let host = (e & 0x00ff_ffff_ffff_fe00) / 65536;
    put_be(&img, refcount_entry(&img, host), &2u16.to_be_bytes());
    // A leak and a COPIED-flag corruption, as qemu-img counts them.
    let r = assert_agrees(&img);
    assert_eq!((r.leaks, r.corruptions), (1, 1), "{r:#?}");
    let fixed = check(&img, RepairMode::Leaks).unwrap();
    assert!(fixed.is_clean(), "{fixed:#?}");
    assert_qemu_clean(&img);
}

#[test]
fn corruptions_agree_with_qemu() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Refcount of a used data cluster dropped to zero.
    let img = written_image(d.path(), "c1.qcow2", "cluster_size=65536");
    let (_, e) = l2_entry(&img, 1);
    let host = (e & 0x00ff_ffff_ffff_fe00) / 65536;
    put_be(&img, refcount_entry(&img, host), &0u16.to_be_bytes());
    let r = assert_agrees(&img);
    assert!(r.corruptions >= 1 && r.leaks == 0, "{r:#?}");
    assert_eq!(qemu_img_status(&["check", img.to_str().unwrap()]).0, 2);
    // Repairing leaks does not touch corruptions.
    let r2 = check(&img, RepairMode::Leaks).unwrap();
    assert_eq!(r2.corruptions, r.corruptions);

    // Two L2 entries pointing at the same data cluster.
    let img = written_image(d.path(), "c2.qcow2", "cluster_size=65536");
    let (_, e0) = l2_entry(&img, 0);
    let (at, _) = l2_entry(&img, 2);
    put_be(&img, at, &e0.to_be_bytes());
    let r = assert_agrees(&img);
    assert!(r.corruptions >= 1, "{r:#?}");

    // A misaligned data cluster offset and one far beyond the end of the file.
    let img = written_image(d.path(), "c3.qcow2", "cluster_size=65536");
    let (at, e) = l2_entry(&img, 3);
    put_be(&img, at, &(e + 4096).to_be_bytes());
    let (at, _) = l2_entry(&img, 128);
    put_be(&img, at, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let r = assert_agrees(&img);
    assert!(r.corruptions >= 2, "{r:#?}");
}

#[test]
fn compressed_cluster_refcounts_agree_after_damage() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    raw_with(&raw, 4 << 20, &mixed_writes(4 << 20));
    let img = d.path().join("z.qcow2");
    qemu_ok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // Drop one compressed cluster's L2 entry: the host clusters it shared may
    // stay in use by neighbours, so only some refcounts become leaks.
    let m = Qcow2Meta::open(&img, false).unwrap();
    let mut target = None;
    for g in 0..64 {
        let (at, e) = l2_entry(&img, g);
        if matches!(
            L2Entry::decode(e, m.header().cluster_bits),
            L2Entry::Compressed { .. }
        ) {
            target = Some(at);
            break;
        }
    }
    put_be(&img, target.unwrap(), &0u64.to_be_bytes());
    let r = assert_agrees(&img);
    assert!(r.leaks >= 1 && r.corruptions == 0, "{r:#?}");
    let fixed = check(&img, RepairMode::Leaks).unwrap();
    assert!(fixed.is_clean(), "{fixed:#?}");
    assert_qemu_clean(&img);
}

#[test]
fn hostile_metadata_never_panics() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = written_image(d.path(), "h.qcow2", "cluster_size=4096");
    qemu_ok(&["snapshot", "-c", "s", img.to_str().unwrap()]);
    let pristine = std::fs::read(&img).unwrap();
    let m = Qcow2Meta::open(&img, false).unwrap();
    let h = m.header().clone();
    // Interesting places: header, L1, first L2, refcount table/block, snapshot table.
    let l1 = m.active_l1().unwrap();
    let l2 = l1[0] & 0x00ff_ffff_ffff_fe00;
    let rt = m.refcount_table().unwrap();
    let spots = [
        0u64,
        h.l1_table_offset,
        l2,
        h.refcount_table_offset,
        rt[0] & !511,
        h.snapshots_offset,
    ];
    let bad = d.path().join("bad.qcow2");
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..400 {
        let mut b = pristine.clone();
        for _ in 0..(1 + rnd() % 4) {
            let spot = spots[(rnd() % spots.len() as u64) as usize];
            let off = (spot + rnd() % 128) as usize;
            if off < b.len() {
                b[off] = match rnd() % 4 {
                    0 => 0xff,
                    1 => 0,
                    2 => b[off] ^ (1 << (rnd() % 8)),
                    _ => rnd() as u8,
                };
            }
        }
        std::fs::write(&bad, &b).unwrap();
        let _ = check(&bad, RepairMode::None);
        let _ = check(&bad, RepairMode::Leaks);
    }
    // Specific hostile headers: giant L1 / refcount table / snapshot count, truncation.
    for (off, val) in [(36u64, u32::MAX), (56, u32::MAX), (60, u32::MAX)] {
        let mut b = pristine.clone();
        b[off as usize..off as usize + 4].copy_from_slice(&val.to_be_bytes());
        std::fs::write(&bad, &b).unwrap();
        let r = check(&bad, RepairMode::None);
        match r {
            Err(_) => {}
            Ok(r) => assert!(r.check_errors > 0 || r.corruptions > 0, "{r:#?}"),
        }
    }
    std::fs::write(&bad, &pristine[..50]).unwrap();
    assert!(check(&bad, RepairMode::None).is_err());
}
