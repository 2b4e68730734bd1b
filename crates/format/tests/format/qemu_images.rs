//! Interop: images made by qemu-img (compressed zlib/zstd, 512 B and 2 MiB
//! clusters, a 3-deep chain, an internal snapshot) read correctly through
//! vmvol, and writing to them keeps `qemu-img check` clean and snapshots
//! intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use crate::support::*;
use vmvol_format::{BackingPolicy, BlockIo, Image, OpenOptions};

const MIB: usize = 1 << 20;

/// A raw source with data, zeros and holes, 8 MiB.
fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; 8 * MIB];
    // Compressible text-like data, random data and zero runs.
    for (i, chunk) in data.chunks_mut(256 << 10).enumerate() {
        match i % 4 {
            0 => chunk.copy_from_slice(&pattern(i as u64, chunk.len())),
            1 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"vmvol compressible "[j % 19];
                }
            }
            2 => {}
            _ => chunk[..1000].copy_from_slice(&pattern(i as u64 + 50, 1000)),
        }
    }
    let p = dir.join("src.raw");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn opts(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir]))
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    // Read in odd-sized pieces to cross cluster boundaries.
    let mut off = 0usize;
    let mut step = 12_345usize;
    while off < buf.len() {
        let n = step.min(buf.len() - off);
        img.read_at(&mut buf[off..off + n], off as u64).unwrap();
        off += n;
        step = step * 7 % 300_001 + 1;
    }
    buf
}

/// Partial and whole-cluster overwrites, zeroes and discards over whatever the
/// image holds (compressed clusters included); returns the new model.
fn scribble(img: &Image, mut model: Vec<u8>) -> Vec<u8> {
    let size = model.len() as u64;
    let writes: &[(u64, usize)] = &[
        (100, 5000),
        (65536, 65536),
        (300_000, 200_000),
        (size - 7000, 7000),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = pattern(900 + i as u64, len);
        img.write_at(&d, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    img.write_zeroes(1_000_000, 70_000).unwrap();
    model[1_000_000..1_070_000].fill(0);
    img.discard(2_000_000, 300_000).unwrap();
    model[2_000_000..2_300_000].fill(0);
    img.flush().unwrap();
    model
}

/// Read, compare, scribble, then let qemu-img check and compare.
fn roundtrip(dir: &Path, img_path: &Path, want: &[u8]) {
    let img = Image::open(img_path, &opts(dir)).unwrap();
    assert!(
        read_all(&img) == want,
        "{} reads differently",
        img_path.display()
    );
    let model = scribble(&img, want.to_vec());
    assert!(read_all(&img) == model);
    drop(img);
    assert_check_clean(img_path);
    let m = dir.join("model.raw");
    std::fs::write(&m, &model).unwrap();
    assert_compare(img_path, "qcow2", &m);
}

#[test]
fn zlib_compressed_image() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    let img = dir.path().join("z.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    roundtrip(dir.path(), &img, &data);
}

#[test]
fn zstd_compressed_image() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    let img = dir.path().join("zs.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    roundtrip(dir.path(), &img, &data);
}

#[test]
fn small_and_large_clusters() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    for cs in ["512", "2M"] {
        let img = dir.path().join(format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        roundtrip(dir.path(), &img, &data);
    }
}

#[test]
fn three_deep_chain() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = source(dir.path());
    let d = dir.path();
    // base.raw <- l1.qcow2 <- l2.qcow2 (in a subdirectory, relative name) <- top.qcow2
    std::fs::rename(&src, d.join("base.raw")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        d.join("l1.qcow2").to_str().unwrap(),
    ]);
    qemu_io(
        "qcow2",
        &d.join("l1.qcow2"),
        &["write -P 0x11 1M 300k", "write -z 3M 64k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "../l1.qcow2",
        "-F",
        "qcow2",
        d.join("sub/l2.qcow2").to_str().unwrap(),
    ]);
    qemu_io(
        "qcow2",
        &d.join("sub/l2.qcow2"),
        &["write -P 0x22 1100k 10k", "discard 0 64k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sub/l2.qcow2",
        "-F",
        "qcow2",
        d.join("top.qcow2").to_str().unwrap(),
    ]);
    qemu_io("qcow2", &d.join("top.qcow2"), &["write -P 0x33 5M 1k"]);
    let flat = d.join("flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        d.join("top.qcow2").to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let want = std::fs::read(&flat).unwrap();
    let img = Image::open(&d.join("top.qcow2"), &opts(d)).unwrap();
    assert_eq!(img.as_qcow2().unwrap().backing_chain().len(), 3);
    drop(img);
    roundtrip(d, &d.join("top.qcow2"), &want);
    // The backing files were not touched.
    assert_check_clean(&d.join("l1.qcow2"));
    assert_check_clean(&d.join("sub/l2.qcow2"));
}

#[test]
fn internal_snapshot_survives_writes() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    let img = dir.path().join("s.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "snap1", img.to_str().unwrap()]);
    // After the snapshot, qemu changes a little so the active layer differs.
    qemu_io("qcow2", &img, &["write -P 0x44 4M 64k"]);
    let mut active = data.clone();
    active[4 * MIB..4 * MIB + 65536].fill(0x44);
    roundtrip(dir.path(), &img, &active);
    let list =
        String::from_utf8(qemu_img(&["snapshot", "-l", img.to_str().unwrap()]).stdout).unwrap();
    assert!(list.contains("snap1"), "snapshot list lost snap1: {list}");
    let snap = dir.path().join("snap.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=snap1",
        "-O",
        "raw",
        img.to_str().unwrap(),
        snap.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&snap).unwrap() == data,
        "snapshot data changed"
    );
}

/// A cluster shared with an internal snapshot (not COPIED) moves on the next
/// write: a read after that write must see the new data, which a read-side
/// mapping cache holding the shared cluster would not.
#[test]
fn writes_to_snapshot_shared_clusters_read_back() {
    if !require_tool("qemu-img") {
        return;
    }
    const CS: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let opts = OpenOptions::new().policy(BackingPolicy::within([dir.path().to_path_buf()]));
    vmvol_format::Qcow2Image::create(&p, &vmvol_format::Qcow2CreateOptions::new(4 << 20)).unwrap();
    let img = Image::open(&p, &opts).unwrap();
    let old = pattern(1, CS as usize);
    img.write_at(&old, CS).unwrap();
    drop(img);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let img = Image::open(&p, &opts).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, CS).unwrap();
    assert_eq!(buf, old[..4096]);
    let new = pattern(2, 4096);
    img.write_at(&new, CS).unwrap();
    img.read_at(&mut buf, CS).unwrap();
    assert_eq!(
        buf, new,
        "read after a write to a shared cluster shows old data"
    );
    // The rest of the cluster was copied over.
    img.read_at(&mut buf, CS + 4096).unwrap();
    assert_eq!(buf, old[4096..8192]);
    drop(img);
    // Read-only handles see the same.
    let ro = Image::open(&p, &opts.clone().read_only(true)).unwrap();
    ro.read_at(&mut buf, CS).unwrap();
    assert_eq!(buf, new);
    drop(ro);
    assert_qemu_clean(&p);
}

/// New images place their first data cluster 2 MiB-aligned on the host (the
/// page cache then uses large folios for it), and qemu-img finds the layout
/// clean and maps it the same way. (With 512 B clusters a refcount block
/// covers only 128 KiB of the file, so imago interleaves new ones with the
/// data; the first data cluster is still at 2 MiB.)
#[test]
fn new_images_place_data_2mib_aligned() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let p = dir.path().join(format!("a{cs}.qcow2"));
        vmvol_format::Qcow2Image::create(
            &p,
            &vmvol_format::Qcow2CreateOptions::new(64 << 20).cluster_size(cs),
        )
        .unwrap();
        let img = Image::open(&p, &OpenOptions::new()).unwrap();
        img.write_at(&pattern(cs, 3 << 20), 0).unwrap();
        img.flush().unwrap();
        let map = img.map(0, 3 << 20).unwrap();
        let first = map.first().unwrap();
        assert!(first.data, "{cs}: {map:?}");
        // (2 MiB clusters are aligned anyway; the metadata fills the first four.)
        let at = if cs < 2 << 20 { 2 << 20 } else { 5 * cs };
        assert_eq!(first.offset, Some(at), "cluster size {cs}: {map:?}");
        // Data stays contiguous: no L2 table interleaved (a refcount block of
        // 512 B clusters covers only 128 KiB: imago adds them as it goes).
        let run = if cs == 512 { 128 << 10 } else { 3 << 20 };
        assert!(first.length >= run, "cluster size {cs}: {map:?}");
        drop(img);
        if require_tool("qemu-img") {
            assert_qemu_clean(&p);
            let theirs = qemu_json(&["map", p.to_str().unwrap()]);
            assert_eq!(theirs[0]["offset"], at, "{theirs}");
        }
    }
}

/// Fuzz finding F1 (docs/testing.md): zeroing or discarding the start of an
/// image smaller than one cluster, with data after the range, underflowed in
/// imago's `soft_ensure_zero`. The range must read as zeros and the data
/// after it must stay, by `qemu-img compare`, with `qemu-img check` clean;
/// also for the grow path and an image whose last cluster is partial.
#[test]
fn zeroing_in_an_image_smaller_than_a_cluster_f1() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = OpenOptions::new().policy(BackingPolicy::within([d.to_path_buf()]));
    // (image size, data at, zeroing op, range)
    let cases: [(&str, u64, u64, &str, u64, u64); 5] = [
        ("40K", 40 << 10, 20 << 10, "zero", 0, 8192),
        ("40K", 40 << 10, 20 << 10, "discard", 0, 8192),
        ("40K", 40 << 10, 20 << 10, "zero", 4096, 20 << 10),
        ("40K", 40 << 10, 20 << 10, "zero", 22 << 10, 4096),
        ("100K", 100 << 10, 90 << 10, "zero", 70 << 10, 12 << 10),
    ];
    for (i, &(size_s, size, data_at, op, off, len)) in cases.iter().enumerate() {
        let img = d.join(format!("r{i}.qcow2"));
        let img_s = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", img_s, size_s]);
        qemu_io("qcow2", &img, &[&format!("write -P 0xaa {data_at} 4k")]);
        let mut want = vec![0u8; size as usize];
        want[data_at as usize..data_at as usize + 4096].fill(0xaa);
        {
            let im = Image::open(&img, &o).unwrap();
            match op {
                "zero" => im.write_zeroes(off, len).unwrap(),
                _ => im.discard(off, len).unwrap(),
            }
            im.flush().unwrap();
        }
        want[off as usize..(off + len) as usize].fill(0);
        let raw = d.join(format!("r{i}.raw"));
        std::fs::write(&raw, &want).unwrap();
        assert_compare(&img, "qcow2", &raw);
        assert_qemu_clean(&img);
    }

    // Growing over a longer backing file zeroes the grown range, whose end
    // may lie in a partial cluster with backing data after it.
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x77u8; 48 << 10]).unwrap();
    let img = d.join("g.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        img.to_str().unwrap(),
        "8K",
    ]);
    {
        let im = Image::open(&img, &o).unwrap();
        im.grow(40 << 10).unwrap();
        im.flush().unwrap();
    }
    let mut want = vec![0u8; 40 << 10];
    want[..8 << 10].fill(0x77);
    let raw = d.join("g.raw");
    std::fs::write(&raw, &want).unwrap();
    assert_compare(&img, "qcow2", &raw);
    assert_qemu_clean(&img);

    // The fuzzer's own inputs, through the fuzz body (panicked before the fix).
    let regressions =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/qcow2_open_read");
    for name in [
        "crash-45dafe3279279a37b15bb2510b0452d77fdea5d2",
        "write-zeroes-image-smaller-than-cluster",
    ] {
        let input = std::fs::read(regressions.join(name)).unwrap();
        crate::fuzz_body::open_and_read(&input);
    }
}
