//! convert(): content identical to the source per qemu-img, sparse, chains
//! flattened or kept, compressed, cancellable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::*;
use vmvol_format::qcow2::Qcow2Meta;
use vmvol_format::{
    convert, BackingMode, BackingPolicy, Compression, Control, ConvertOptions, CopyMethod, Error,
    Format, OpenOptions,
};

fn opts_in(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]))
}

fn co(format: Format) -> ConvertOptions {
    ConvertOptions {
        format,
        ..ConvertOptions::default()
    }
}

/// A 3-deep chain made by qemu-img: raw base, qcow2 middle, qcow2 top.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    raw_with(&base, 16 << 20, &mixed_writes(16 << 20));
    let mid = dir.join("mid.qcow2");
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
        mid.to_str().unwrap(),
    ]);
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let io = |img: &Path, cmd: &str| {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    io(&mid, "write -P 0x61 1M 192k");
    io(&mid, "write -z 3M 1M");
    io(&top, "write -P 0x62 1100k 64k");
    io(&top, "write -z 0 128k");
    io(&top, "write -P 0x63 15M 1M");
    top
}

#[test]
fn raw_qcow2_roundtrip_identical_and_sparse() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = dir.join("src.raw");
    let size = (32u64 << 20) + 4096;
    raw_with(&raw, size, &mixed_writes(size));
    let q = dir.join("a.qcow2");
    let r = convert(&raw, &opts_in(dir), &q, &co(Format::Qcow2), &Control::new()).unwrap();
    assert_eq!(r.method, CopyMethod::Stream);
    assert_eq!(r.virtual_size, size);
    assert_qemu_clean(&q);
    assert_same(&raw, &q);
    // Written-zero clusters were not stored: fewer clusters than qemu-img's own map of data.
    let meta = Qcow2Meta::open(&q, false).unwrap();
    assert_eq!(meta.header().size, size);
    let back = dir.join("back.raw");
    let r2 = convert(&q, &opts_in(dir), &back, &co(Format::Raw), &Control::new()).unwrap();
    assert_eq!(r2.format, Format::Raw);
    assert_same(&raw, &back);
    assert_eq!(std::fs::metadata(&back).unwrap().len(), size);
    assert!(allocated(&back) < size / 2, "output stays sparse");
    // 512 B and 2 MiB clusters too.
    for cs in [512u64, 2 << 20] {
        let out = dir.join(format!("cs{cs}.qcow2"));
        let o = ConvertOptions {
            cluster_size: cs,
            ..co(Format::Qcow2)
        };
        convert(&raw, &opts_in(dir), &out, &o, &Control::new()).unwrap();
        assert_qemu_clean(&out);
        assert_same(&raw, &out);
    }
}

#[test]
fn raw_to_raw_keeps_holes_and_refuses_existing() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = dir.join("src.raw");
    raw_with(
        &raw,
        64 << 20,
        &[(1 << 20, noise(1, 300_000)), (40 << 20, text(2, 5000))],
    );
    let out = dir.join("copy.raw");
    let r = convert(&raw, &opts_in(dir), &out, &co(Format::Raw), &Control::new()).unwrap();
    assert!(
        matches!(r.method, CopyMethod::Reflink | CopyMethod::CopyFileRange),
        "{r:?}"
    );
    assert_same(&raw, &out);
    assert!(allocated(&out) < 4 << 20, "holes kept: {}", allocated(&out));
    let e = convert(&raw, &opts_in(dir), &out, &co(Format::Raw), &Control::new()).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }), "{e}");
    // Non-sparse output is fully allocated.
    let full = dir.join("full.raw");
    let o = ConvertOptions {
        sparse: false,
        ..co(Format::Raw)
    };
    convert(&raw, &opts_in(dir), &full, &o, &Control::new()).unwrap();
    assert_same(&raw, &full);
    assert!(allocated(&full) >= 64 << 20);
}

#[test]
fn chain_flattened_to_qcow2_and_raw() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let top = chain(dir);
    for (name, f) in [("flat.qcow2", Format::Qcow2), ("flat.raw", Format::Raw)] {
        let out = dir.join(name);
        let r = convert(&top, &opts_in(dir), &out, &co(f), &Control::new()).unwrap();
        assert_eq!(r.backing_file, None);
        assert_same(&top, &out);
        if f == Format::Qcow2 {
            assert_qemu_clean(&out);
            assert_eq!(
                Qcow2Meta::open(&out, false).unwrap().header().backing_file,
                None
            );
        }
    }
}

#[test]
fn chain_kept_copies_only_top_clusters() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let top = chain(dir);
    let out = dir.join("kept.qcow2");
    let o = ConvertOptions {
        backing: BackingMode::Keep,
        ..co(Format::Qcow2)
    };
    let r = convert(&top, &opts_in(dir), &out, &o, &Control::new()).unwrap();
    assert_eq!(r.backing_file.as_deref(), Some("mid.qcow2"));
    assert_qemu_clean(&out);
    assert_same(&top, &out);
    let info = qemu_ok(&["info", "--output=json", out.to_str().unwrap()]);
    assert!(
        info.contains("\"backing-filename\": \"mid.qcow2\""),
        "{info}"
    );
    // Only the top image's clusters are in the output: its data (1100k..1164k
    // spans two 64k clusters, 15M..16M is 16) and the zeroed 128k at 0 as zero clusters.
    let map: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["map", "--output=json", out.to_str().unwrap()])).unwrap();
    let own_data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own_data, (2 + 16) * 65536, "{map:#}");
    // Into another directory the backing is recorded by absolute path.
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let out2 = sub.join("kept2.qcow2");
    let r = convert(&top, &opts_in(dir), &out2, &o, &Control::new()).unwrap();
    let b = r.backing_file.unwrap();
    assert!(
        Path::new(&b).is_absolute() && b.ends_with("mid.qcow2"),
        "{b}"
    );
    assert_same(&top, &out2);
    // Keeping a backing file in raw output is refused.
    let e = convert(
        &top,
        &opts_in(dir),
        &dir.join("x.raw"),
        &ConvertOptions {
            backing: BackingMode::Keep,
            ..co(Format::Raw)
        },
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
}

#[test]
fn compressed_output_zstd_and_zlib() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = dir.join("src.raw");
    raw_with(&raw, 24 << 20, &mixed_writes(24 << 20));
    let plain = dir.join("plain.qcow2");
    convert(
        &raw,
        &opts_in(dir),
        &plain,
        &co(Format::Qcow2),
        &Control::new(),
    )
    .unwrap();
    for (k, name) in [(Compression::Zstd, "zstd"), (Compression::Zlib, "zlib")] {
        let out = dir.join(format!("{name}.qcow2"));
        let o = ConvertOptions {
            compress: Some(k),
            threads: 2,
            ..co(Format::Qcow2)
        };
        convert(&raw, &opts_in(dir), &out, &o, &Control::new()).unwrap();
        assert_qemu_clean(&out);
        assert_same(&raw, &out);
        let info = qemu_ok(&["info", "--output=json", out.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"compression-type\": \"{name}\"")),
            "{info}"
        );
        let ours = std::fs::metadata(&out).unwrap().len();
        assert!(
            ours < std::fs::metadata(&plain).unwrap().len(),
            "{name} smaller than plain"
        );
    }
}

#[test]
fn cancelled_convert_leaves_nothing() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = dir.join("src.raw");
    // Dense enough to need many progress steps.
    let size = 96u64 << 20;
    raw_with(&raw, size, &[(0, text(9, size as usize))]);
    // A qcow2 copy of the source, to cancel the qcow2 -> raw stream as well.
    let qsrc = dir.join("src.qcow2");
    convert(
        &raw,
        &opts_in(dir),
        &qsrc,
        &co(Format::Qcow2),
        &Control::new(),
    )
    .unwrap();
    for (name, f, src) in [
        ("c.qcow2", Format::Qcow2, &raw),
        ("c.raw", Format::Raw, &raw),
        ("c2.raw", Format::Raw, &qsrc),
    ] {
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c2 = calls.clone();
        let ctl = Control::new()
            .with_cancel(flag)
            .with_progress(move |done, total| {
                c2.fetch_add(1, Ordering::Relaxed);
                if done > 0 && done < total {
                    f2.store(true, Ordering::Relaxed);
                }
            });
        let out = dir.join(name);
        // Source opened as qcow2 for the raw case would be wrong; the source is raw either way.
        let o = if f == Format::Raw {
            // Force the streaming path (raw source, qcow2 intermediate is not needed):
            // cancel works for copy_file_range too.
            co(Format::Raw)
        } else {
            co(Format::Qcow2)
        };
        let e = convert(src, &opts_in(dir), &out, &o, &ctl).unwrap_err();
        assert!(matches!(e, Error::Cancelled { .. }), "{name}: {e}");
        assert!(calls.load(Ordering::Relaxed) >= 1);
        assert!(!out.exists(), "{name} left behind");
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "src.raw" && n != "src.qcow2")
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}

#[test]
fn odd_sizes_convert_and_compact() {
    if !require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Neither a multiple of 512 nor of the cluster size.
    let raw = dir.join("odd.raw");
    let size = (3u64 << 20) + 70_001;
    raw_with(&raw, size, &[(0, text(5, size as usize))]);
    for (name, comp) in [
        ("odd.qcow2", None),
        ("oddz.qcow2", Some(Compression::Zstd)),
        ("oddl.qcow2", Some(Compression::Zlib)),
    ] {
        let out = dir.join(name);
        let o = ConvertOptions {
            compress: comp,
            ..co(Format::Qcow2)
        };
        convert(&raw, &opts_in(dir), &out, &o, &Control::new()).unwrap();
        assert_qemu_clean(&out);
        assert_same(&raw, &out);
        let back = dir.join(format!("{name}.raw"));
        convert(
            &out,
            &opts_in(dir),
            &back,
            &co(Format::Raw),
            &Control::new(),
        )
        .unwrap();
        assert_same(&raw, &back);
        let c = vmvol_format::compact(
            &out,
            &vmvol_format::CompactOptions {
                compression: Some(Compression::Zstd),
                ..Default::default()
            },
            &Control::new(),
        )
        .unwrap();
        assert!(c.compressed_clusters > 0);
        assert_qemu_clean(&out);
        assert_same(&raw, &out);
    }
}
