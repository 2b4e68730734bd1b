//! compact(): content kept, unused ranges dropped, smaller, atomic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::support::*;
use vmvol_format::qcow2::Qcow2Meta;
use vmvol_format::{compact, ByteRange, CompactOptions, Compression, Control, Error};

/// A qcow2 image with data, written zeros, overwritten-by-zero data and
/// discarded clusters (space that compaction can give back).
fn wasteful(dir: &Path, name: &str) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    raw_with(&raw, 32 << 20, &mixed_writes(32 << 20));
    let img = dir.join(name);
    qemu_ok(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // Allocated clusters holding zeros.
    qemu_io("qcow2", &img, &["write -P 0 20M 2M"]);
    qemu_io("qcow2", &img, &["write -P 0x5a 24M 1M"]);
    img
}

fn snapshot_raw(img: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    qemu_ok(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

#[test]
fn compaction_keeps_content_and_shrinks() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for (i, comp) in [None, Some(Compression::Zstd), Some(Compression::Zlib)]
        .into_iter()
        .enumerate()
    {
        let img = wasteful(dir, &format!("w{i}.qcow2"));
        let before = dir.join(format!("before{i}.raw"));
        snapshot_raw(&img, &before);
        let opts = CompactOptions {
            compression: comp,
            threads: 2,
            unused_ranges: vec![],
        };
        let r = compact(&img, &opts, &Control::new()).unwrap();
        assert!(r.bytes_after < r.bytes_before, "{r:?}");
        assert_eq!(r.bytes_after, allocated(&img));
        assert_qemu_clean(&img);
        assert_same(&before, &img);
        if let Some(k) = comp {
            assert!(r.compressed_clusters > 0);
            let info = qemu_ok(&["info", "--output=json", img.to_str().unwrap()]);
            assert!(
                info.contains(&format!("\"compression-type\": \"{k}\"")),
                "{info}"
            );
        }
        // No temporary file left next to it.
        let extra: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vmvol-tmp"))
            .collect();
        assert!(extra.is_empty(), "{extra:?}");
    }
}

#[test]
fn unused_ranges_read_as_zero() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = wasteful(dir, "u.qcow2");
    let before = dir.join("before.raw");
    snapshot_raw(&img, &before);
    // Cluster-aligned ranges plus one ragged range.
    let ranges = vec![
        (0u64, 2 << 20),
        (5 << 20, 1 << 20),
        ((9 << 20) + 1000, 70_000),
    ];
    let r = compact(
        &img,
        &CompactOptions {
            compression: Some(Compression::Zstd),
            threads: 0,
            unused_ranges: ranges.iter().map(|&(o, l)| ByteRange::new(o, l)).collect(),
        },
        &Control::new(),
    )
    .unwrap();
    assert!(r.dropped_clusters > 0);
    assert_qemu_clean(&img);
    let mut expect = std::fs::read(&before).unwrap();
    for (o, l) in &ranges {
        expect[*o as usize..(*o + *l) as usize].fill(0);
    }
    let exp = dir.join("expect.raw");
    std::fs::write(&exp, &expect).unwrap();
    assert_same(&exp, &img);
}

#[test]
fn backing_kept_and_unused_ranges_hide_it() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let base = dir.join("base.raw");
    raw_with(&base, 8 << 20, &[(0, vec![0xbb; 8 << 20])]);
    let top = dir.join("top.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    qemu_io("qcow2", &top, &["write -P 0x11 1M 1M"]);
    qemu_io("qcow2", &top, &["write -P 0 3M 64k"]); // zeros that hide the base
    let before = dir.join("before.raw");
    snapshot_raw(&top, &before);
    let ranges = [(6u64 << 20, 1 << 20)];
    compact(
        &top,
        &CompactOptions {
            unused_ranges: ranges.iter().map(|&(o, l)| ByteRange::new(o, l)).collect(),
            ..CompactOptions::default()
        },
        &Control::new(),
    )
    .unwrap();
    assert_qemu_clean(&top);
    let m = Qcow2Meta::open(&top, false).unwrap();
    assert_eq!(m.header().backing_file.as_deref(), Some("base.raw"));
    assert_eq!(m.header().backing_format.as_deref(), Some("raw"));
    let mut expect = std::fs::read(&before).unwrap();
    expect[6 << 20..7 << 20].fill(0);
    let exp = dir.join("expect.raw");
    std::fs::write(&exp, &expect).unwrap();
    assert_same(&exp, &top);
    // Only the top's own clusters: 1 MiB data, the rest zero clusters or from the base.
    let map: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["map", "--output=json", top.to_str().unwrap()])).unwrap();
    let own: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, 1 << 20, "{map:#}");
}

#[test]
fn refuses_snapshots_and_raw_and_cancel_keeps_original() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = wasteful(dir, "s.qcow2");
    qemu_ok(&["snapshot", "-c", "keep", img.to_str().unwrap()]);
    let e = compact(&img, &CompactOptions::default(), &Control::new()).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("snapshot"),
        "{e}"
    );

    let raw = dir.join("r.raw");
    raw_with(&raw, 1 << 20, &[]);
    assert!(compact(&raw, &CompactOptions::default(), &Control::new()).is_err());

    let img = wasteful(dir, "c.qcow2");
    let orig = std::fs::read(&img).unwrap();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let e = compact(
        &img,
        &CompactOptions::default(),
        &Control::new().with_cancel(flag),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), orig);
    let extra: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vmvol-tmp"))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
}

/// An overlay whose backing format is recorded as "file" (QEMU's protocol
/// driver; `open` reads it as raw) is compacted like one recorded as "raw".
#[test]
fn backing_format_file_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let base = dir.join("base.raw");
    raw_with(&base, 4 << 20, &[(0, text(3, 4 << 20))]);
    let top = dir.join("top.qcow2");
    vmvol_format::Qcow2Image::create(
        &top,
        &vmvol_format::Qcow2CreateOptions::new(4 << 20)
            .backing("base.raw", vmvol_format::Format::Raw),
    )
    .unwrap();
    // Rewrite the backing format extension from "raw" to "file".
    let mut bytes = std::fs::read(&top).unwrap();
    let ext = bytes
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .unwrap();
    assert_eq!(&bytes[ext + 4..ext + 11], &[0, 0, 0, 3, b'r', b'a', b'w']);
    bytes[ext + 7] = 4;
    bytes[ext + 8..ext + 12].copy_from_slice(b"file");
    std::fs::write(&top, &bytes).unwrap();
    let opts = vmvol_format::OpenOptions::new()
        .policy(vmvol_format::BackingPolicy::within([dir.to_path_buf()]));
    {
        use vmvol_format::BlockIo;
        let img = vmvol_format::Image::open(&top, &opts).unwrap();
        img.write_at(&text(4, 65536), 1 << 20).unwrap();
    }
    compact(&top, &CompactOptions::default(), &Control::new()).unwrap();
    let h = Qcow2Meta::open(&top, false).unwrap().header().clone();
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    let img = vmvol_format::Image::open(&top, &opts.read_only(true)).unwrap();
    let mut buf = vec![0u8; 65536];
    use vmvol_format::BlockIo;
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, text(3, 4 << 20)[..65536]);
    img.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, text(4, 65536));
}
