//! Qcow2Writer and Qcow2Meta against qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::Path;

use crate::support::*;
use vmvol_format::qcow2::{ClusterCompressor, L2Entry, Qcow2Meta, Qcow2Writer, Qcow2WriterOptions};
use vmvol_format::{BackingRef, Compression, Format};

/// Write `model` (a raw file's bytes) through the writer, cluster by cluster.
fn write_model(
    dst: &Path,
    model: &[u8],
    cs: u64,
    comp: Option<Compression>,
    backing: Option<(String, Format)>,
    zero_hides: bool,
) {
    let f = File::create(dst).unwrap();
    let mut w = Qcow2Writer::new(
        f,
        dst,
        &Qcow2WriterOptions {
            size: model.len() as u64,
            cluster_size: cs,
            compression: comp.unwrap_or(Compression::Zlib),
            backing: backing.map(|(n, f)| BackingRef {
                path: n.into(),
                format: f,
            }),
        },
    )
    .unwrap();
    let mut c = comp.map(|k| ClusterCompressor::new(k, cs as usize));
    for (g, chunk) in model.chunks(cs as usize).enumerate() {
        let g = g as u64;
        if chunk.iter().all(|&b| b == 0) {
            if zero_hides {
                w.write_zero(g).unwrap();
            }
            continue;
        }
        match c.as_mut().and_then(|c| c.compress(chunk)) {
            Some(z) => w.write_compressed(g, &z).unwrap(),
            None => w.write_cluster(g, chunk).unwrap(),
        }
    }
    w.finish().unwrap();
}

fn model(size: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for (off, d) in mixed_writes(size) {
        m[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    m
}

#[test]
fn writer_matches_model_for_cluster_sizes_and_compression() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any cluster size: the last cluster is partial.
    let size = (12u64 << 20) + 1536;
    let m = model(size);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &m).unwrap();
    for cs in [512u64, 64 << 10, 2 << 20] {
        for comp in [None, Some(Compression::Zstd), Some(Compression::Zlib)] {
            let out = dir.path().join(format!("w-{cs}-{comp:?}.qcow2"));
            write_model(&out, &m, cs, comp, None, false);
            assert_qemu_clean(&out);
            assert_same(&raw, &out);
            let info: serde_json::Value =
                serde_json::from_str(&qemu_ok(&["info", "--output=json", out.to_str().unwrap()]))
                    .unwrap();
            assert_eq!(info["cluster-size"], cs);
            assert_eq!(info["virtual-size"], size);
            let want = if comp == Some(Compression::Zstd) {
                "zstd"
            } else {
                "zlib"
            };
            assert_eq!(info["format-specific"]["data"]["compression-type"], want);
            // Our reader agrees with what we wrote.
            let meta = Qcow2Meta::open(&out, false).unwrap();
            assert_eq!(meta.header().size, size);
            let mut compressed = 0;
            for e in meta.active_l1().unwrap() {
                let off = e & 0x00ff_ffff_ffff_fe00;
                if off == 0 {
                    continue;
                }
                for raw in meta.read_l2(off).unwrap() {
                    if let L2Entry::Compressed { .. } =
                        L2Entry::decode(raw, meta.header().cluster_bits)
                    {
                        compressed += 1;
                    }
                }
            }
            assert_eq!(compressed > 0, comp.is_some(), "cs {cs} {comp:?}");
        }
    }
}

#[test]
fn compressed_clusters_are_packed() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 256 clusters of highly compressible, distinct content.
    let cs = 65536u64;
    let mut m = vec![0u8; (256 * cs) as usize];
    for (i, c) in m.chunks_mut(cs as usize).enumerate() {
        c.fill(i as u8 | 1);
    }
    let raw = dir.path().join("m.raw");
    std::fs::write(&raw, &m).unwrap();
    let out = dir.path().join("p.qcow2");
    write_model(&out, &m, cs, Some(Compression::Zstd), None, false);
    assert_qemu_clean(&out);
    assert_same(&raw, &out);
    // Header + a packed data cluster or two + L2 + L1 + refcounts: far below one cluster per guest cluster.
    let len = std::fs::metadata(&out).unwrap().len();
    assert!(len <= 8 * cs, "file is {len} bytes");
}

#[test]
fn writer_records_backing_and_zero_clusters_hide_it() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let base = dir.path().join("base.raw");
    raw_with(&base, size, &[(0, vec![0xee; size as usize])]);
    // Top: first MiB zeros that must hide the base, second MiB data, rest from base.
    let mut top_model = vec![0xeeu8; size as usize];
    top_model[..1 << 20].fill(0);
    top_model[1 << 20..2 << 20].copy_from_slice(&text(3, 1 << 20));
    let f = File::create(dir.path().join("top.qcow2")).unwrap();
    let top = dir.path().join("top.qcow2");
    let mut w = Qcow2Writer::new(
        f,
        &top,
        &Qcow2WriterOptions {
            size,
            cluster_size: 65536,
            compression: Compression::Zlib,
            backing: Some(BackingRef {
                path: "base.raw".into(),
                format: Format::Raw,
            }),
        },
    )
    .unwrap();
    for g in 0..16 {
        w.write_zero(g).unwrap();
    }
    for g in 16..32u64 {
        let s = (g * 65536) as usize;
        w.write_cluster(g, &top_model[s..s + 65536]).unwrap();
    }
    // Out of order is refused.
    assert!(w.write_zero(3).is_err());
    w.finish().unwrap();
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &top_model).unwrap();
    assert_qemu_clean(&top);
    assert_same(&expect, &top);
    let meta = Qcow2Meta::open(&top, false).unwrap();
    assert_eq!(meta.header().backing_file.as_deref(), Some("base.raw"));
    assert_eq!(meta.header().backing_format.as_deref(), Some("raw"));
    let info = qemu_ok(&["info", "--output=json", top.to_str().unwrap()]);
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
}

#[test]
fn meta_reads_qemu_made_image_with_snapshot() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let p = img.to_str().unwrap();
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,refcount_bits=8",
        p,
        "8M",
    ]);
    let io = |cmd: &str| {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, p])
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    io("write -P 0x11 0 64k");
    qemu_ok(&["snapshot", "-c", "snap one", p]);
    io("write -P 0x22 32k 64k");
    let meta = Qcow2Meta::open(&img, false).unwrap();
    let h = meta.header();
    assert_eq!(
        (h.version, h.cluster_bits, h.refcount_order, h.nb_snapshots),
        (3, 12, 3, 1)
    );
    let (snaps, bytes) = meta.snapshots().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "snap one");
    assert_eq!(snaps[0].disk_size, Some(8 << 20));
    assert!(bytes > 40);
    assert_eq!(
        meta.read_l1(snaps[0].l1_table_offset, snaps[0].l1_size)
            .unwrap()
            .len(),
        snaps[0].l1_size as usize
    );
    let rt = meta.refcount_table().unwrap();
    let block = meta.read_refcount_block(rt[0] & !511).unwrap();
    assert_eq!(block.len(), 4096);
    assert_eq!(block[0], 1, "header refcount");
}

/// Random layouts (cluster size, compression, mix of data, compressible,
/// incompressible and zero clusters, zero-flag clusters) all pass
/// `qemu-img check`, our own check, and compare equal to their model.
#[test]
fn writer_random_layouts_pass_qemu_and_our_check() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut x = 0x5eed_u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for case in 0..24u64 {
        let cs = [512u64, 4096, 65536, 1 << 20][(rnd() % 4) as usize];
        let clusters = 8 + rnd() % 96;
        // qcow2 sizes are whole sectors; the last cluster may be partial.
        let size = (clusters * cs - (rnd() % 2) * (rnd() % cs)).next_multiple_of(512);
        let comp = [None, Some(Compression::Zstd), Some(Compression::Zlib)][(rnd() % 3) as usize];
        let mut m = vec![0u8; size as usize];
        for c in m.chunks_mut(cs as usize) {
            match rnd() % 5 {
                0 => {}
                1 => c.copy_from_slice(&noise(rnd(), c.len())),
                2 => c.fill((rnd() % 255 + 1) as u8),
                _ => c.copy_from_slice(&text(rnd(), c.len())),
            }
        }
        let raw = dir.path().join(format!("m{case}.raw"));
        std::fs::write(&raw, &m).unwrap();
        let out = dir.path().join(format!("r{case}.qcow2"));
        write_model(&out, &m, cs, comp, None, rnd() % 2 == 0);
        assert_qemu_clean(&out);
        assert_same(&raw, &out);
        let ours = vmvol_format::check(&out, vmvol_format::RepairMode::None).unwrap();
        assert!(ours.is_clean(), "case {case} cs {cs} {comp:?}: {ours:#?}");
    }
}
