//! `info` and `map` agree with `qemu-img info/map --output=json` on the same
//! images (made by us and by qemu-img).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use crate::support::*;
use vmvol_format::{
    info, BackingPolicy, BlockIo, Control, Format, Image, OpenOptions, Prealloc,
    Qcow2CreateOptions, Qcow2Image, RawImage,
};

const MIB: u64 = 1 << 20;

fn opts(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir]))
}

/// Our map and info against qemu-img's, for the image at `p`.
fn agree(dir: &Path, p: &Path) {
    let ps = p.to_str().unwrap();
    let img = Image::open(p, &opts(dir).read_only(true)).unwrap();
    let ours = serde_json::to_value(img.map(0, img.size()).unwrap()).unwrap();
    let theirs = qemu_json(&["map", ps]);
    assert_map_eq(&ours, &theirs, ps);
    // A sub-range: the same extents clipped.
    let (a, b) = (img.size() / 3 + 1234, img.size() / 2);
    let sub = img.map(a, b - a).unwrap();
    assert_eq!(sub.first().unwrap().start, a);
    assert_eq!(sub.iter().map(|e| e.length).sum::<u64>(), b - a);
    drop(img);

    let i = info(p, &opts(dir)).unwrap();
    let q = qemu_json(&["info", ps]);
    assert_eq!(i.format.as_str(), q["format"].as_str().unwrap());
    assert_eq!(i.virtual_size, q["virtual-size"].as_u64().unwrap());
    assert_eq!(
        i.actual_size,
        q["actual-size"].as_u64().unwrap(),
        "actual size of {ps}"
    );
    assert_eq!(i.dirty, q["dirty-flag"].as_bool().unwrap());
    assert_eq!(i.cluster_size, q["cluster-size"].as_u64());
    assert_eq!(
        i.backing_filename.as_deref(),
        q["backing-filename"].as_str()
    );
    assert_eq!(
        i.backing_format.map(|f| f.as_str()),
        q["backing-filename-format"].as_str()
    );
    assert_eq!(
        i.full_backing_filename.as_deref(),
        q["full-backing-filename"].as_str()
    );
    let data = &q["format-specific"]["data"];
    assert_eq!(
        i.compression_type.as_deref(),
        data["compression-type"].as_str()
    );
    if i.format == Format::Qcow2 {
        assert_eq!(i.corrupt, data["corrupt"].as_bool().unwrap());
        assert_eq!(i.lazy_refcounts, data["lazy-refcounts"].as_bool().unwrap());
        assert_eq!(
            i.refcount_bits.map(u64::from),
            data["refcount-bits"].as_u64()
        );
    }
    // Our JSON uses qemu's key names.
    let j = serde_json::to_value(&i).unwrap();
    assert_eq!(j["virtual-size"], q["virtual-size"]);
    assert_eq!(j["dirty-flag"], q["dirty-flag"]);
    // Chain formats and sizes, top down, against --backing-chain.
    let chain = qemu_json(&["info", "--backing-chain", ps]);
    let chain = chain.as_array().unwrap();
    assert_eq!(i.chain.len() + 1, chain.len());
    for (e, q) in i.chain.iter().zip(&chain[1..]) {
        assert_eq!(e.format.as_str(), q["format"].as_str().unwrap());
        assert_eq!(e.virtual_size, q["virtual-size"].as_u64().unwrap());
        assert_eq!(e.filename, q["filename"].as_str().unwrap());
    }
}

fn raw_with_holes(p: &Path, size: u64) -> Vec<u8> {
    let img = RawImage::create(p, size, Prealloc::Off, &Control::new()).unwrap();
    let mut model = vec![0u8; size as usize];
    for (i, off) in [0u64, 200_000, MIB, 3 * MIB + 4096].iter().enumerate() {
        if *off >= size {
            continue;
        }
        let d = pattern(i as u64, (100_000usize).min((size - off) as usize));
        img.write_at(&d, *off).unwrap();
        model[*off as usize..*off as usize + d.len()].copy_from_slice(&d);
    }
    model
}

#[test]
fn raw_image() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.raw");
    raw_with_holes(&p, 4 * MIB);
    let img = RawImage::open(&p, false).unwrap();
    img.discard(3 * MIB, 8192).unwrap();
    img.write_zeroes(0, 4096).unwrap();
    drop(img);
    agree(dir.path(), &p);
}

#[test]
fn qcow2_made_by_us() {
    if !require_tool("qemu-img") {
        return;
    }
    for cluster in [512u64, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(8 * MIB).cluster_size(cluster)).unwrap();
        let img = Qcow2Image::open(&p, &OpenOptions::new()).unwrap();
        img.write_at(&pattern(1, 300_000), 10_000).unwrap();
        img.write_at(&pattern(2, 70_000), 2 * MIB).unwrap();
        // Zeroes over allocated clusters keep their allocation (offsets shown).
        img.write_zeroes(2 * MIB, 65536).unwrap();
        img.write_zeroes(5 * MIB, 3 * 65536).unwrap();
        img.discard(65536, 65536).unwrap();
        img.write_at(b"tail", 8 * MIB - 4).unwrap();
        drop(img);
        agree(dir.path(), &p);
    }
}

#[test]
fn chains_made_by_qemu() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_with_holes(&d.join("base.raw"), 3 * MIB);
    let s = |p: &str| -> String { d.join(p).to_str().unwrap().to_string() };
    // Over a shorter raw parent: the part past the parent's end is depth 0.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s("mid.qcow2"),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &d.join("mid.qcow2"),
        &[
            "write -P 1 0 64k",
            "write -z 1M 128k",
            "write -P 2 2M 4k",
            "write -P 3 4M 64k",
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &s("top.qcow2"),
    ]);
    qemu_io(
        "qcow2",
        &d.join("top.qcow2"),
        &["write -P 5 100k 8k", "write -z 4M 4k"],
    );
    for p in ["base.raw", "mid.qcow2", "top.qcow2"] {
        agree(d, &d.join(p));
    }
    // Compressed clusters.
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &s("top.qcow2"),
        &s("c.qcow2"),
    ]);
    agree(d, &d.join("c.qcow2"));
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        &s("top.qcow2"),
        &s("zs.qcow2"),
    ]);
    agree(d, &d.join("zs.qcow2"));
    assert_eq!(
        info(&d.join("zs.qcow2"), &opts(d))
            .unwrap()
            .compression_type
            .as_deref(),
        Some("zstd")
    );
    // Through a subdirectory with a relative backing name.
    std::fs::create_dir(d.join("sub")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../top.qcow2",
        "-F",
        "qcow2",
        &s("sub/s.qcow2"),
    ]);
    agree(d, &d.join("sub/s.qcow2"));
}

#[test]
fn qcow2_over_our_own_chain() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_with_holes(&d.join("base.raw"), 4 * MIB);
    Qcow2Image::create(
        &d.join("m.qcow2"),
        &Qcow2CreateOptions::new(0).backing("base.raw", Format::Raw),
    )
    .unwrap();
    let m = Qcow2Image::open(&d.join("m.qcow2"), &opts(d)).unwrap();
    m.write_at(&pattern(7, 5000), 150_000).unwrap();
    m.write_zeroes(MIB, 65536).unwrap();
    m.discard(2 * MIB, 65536).unwrap();
    drop(m);
    Qcow2Image::create(
        &d.join("t.qcow2"),
        &Qcow2CreateOptions::new(0)
            .cluster_size(4096)
            .backing("m.qcow2", Format::Qcow2),
    )
    .unwrap();
    let t = Qcow2Image::open(&d.join("t.qcow2"), &opts(d)).unwrap();
    t.write_at(&pattern(8, 10_000), 3 * MIB).unwrap();
    t.grow(6 * MIB).unwrap();
    t.write_at(b"x", 5 * MIB).unwrap();
    drop(t);
    for p in ["m.qcow2", "t.qcow2"] {
        agree(d, &d.join(p));
        assert_check_clean(&d.join(p));
    }
}

#[allow(dead_code)]
fn _p(_: PathBuf) {}
