//! Property tests: random sequences of writes, write-zeroes, discards, grows and
//! reopenings on raw and qcow2 images (alone, over a raw parent, over a qcow2
//! parent) agree byte-for-byte with a `Vec<u8>` model, and qemu-img agrees too
//! (`check` clean, `compare` equal to the model written out as raw).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use crate::support::*;
use proptest::prelude::*;
use vmvol_format::{
    BackingPolicy, BlockIo, Control, Error, Format, Image, OpenOptions, Prealloc,
    Qcow2CreateOptions, Qcow2Image, RawImage,
};

const MIB: u64 = 1 << 20;
const BASE: u64 = 4 * MIB;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Grow { by: u64 },
    Reopen,
}

#[derive(Debug, Clone, Copy)]
enum Setup {
    Raw,
    Qcow2 {
        cluster: u64,
    },
    OverRaw {
        cluster: u64,
    },
    OverQcow2 {
        cluster: u64,
    },
    /// Over a qcow2 parent whose clusters are zstd-compressed.
    OverZstd {
        cluster: u64,
    },
}

/// Offsets/lengths as fractions of the current size, so they stay in range
/// after grows; a mix of cluster-aligned and odd values.
fn op_strategy() -> impl Strategy<Value = Op> {
    let span = (0u64..1_000_000, 1u64..300_000, any::<bool>());
    prop_oneof![
        5 => (span.clone(), any::<u64>()).prop_map(|((o, l, a), seed)| {
            let (o, l) = if a { (o & !4095, (l & !4095).max(4096)) } else { (o, l) };
            Op::Write { off: o, len: l, seed }
        }),
        2 => span.clone().prop_map(|(o, l, a)| {
            let (o, l) = if a { (o & !65535, (l & !65535).max(65536)) } else { (o, l) };
            Op::Zero { off: o, len: l }
        }),
        2 => span.prop_map(|(o, l, a)| {
            let (o, l) = if a { (o & !65535, (l & !65535).max(65536)) } else { (o, l) };
            Op::Discard { off: o, len: l }
        }),
        1 => (1u64..(2 * MIB)).prop_map(|by| Op::Grow { by }),
        1 => Just(Op::Reopen),
    ]
}

/// Scale a (offset, length) drawn for a 1,000,000-unit space onto `size`.
fn place(off: u64, len: u64, size: u64) -> (u64, u64) {
    let o = off * size / 1_000_000;
    let o = o.min(size - 1);
    let l = len.min(size - o).max(1);
    (o, l)
}

struct Case {
    dir: tempfile::TempDir,
    top: PathBuf,
    setup: Setup,
}

impl Case {
    fn opts(&self) -> OpenOptions {
        OpenOptions::new().policy(BackingPolicy::within([self.dir.path()]))
    }

    fn open(&self) -> Image {
        Image::open(&self.top, &self.opts()).unwrap()
    }
}

/// Build the image(s) for `setup`; returns the case and the initial model.
fn build(setup: Setup) -> (Case, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; BASE as usize];
    let top = match setup {
        Setup::Raw => {
            let p = dir.path().join("top.raw");
            RawImage::create(&p, BASE, Prealloc::Off, &Control::new()).unwrap();
            p
        }
        Setup::Qcow2 { cluster } => {
            let p = dir.path().join("top.qcow2");
            Qcow2Image::create(&p, &Qcow2CreateOptions::new(BASE).cluster_size(cluster)).unwrap();
            p
        }
        Setup::OverRaw { cluster } | Setup::OverQcow2 { cluster } | Setup::OverZstd { cluster } => {
            // A parent with data in some places and holes in others.
            let raw = dir.path().join("parent.raw");
            std::fs::write(&raw, vec![0u8; BASE as usize]).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
            use std::os::unix::fs::FileExt;
            for (i, off) in [0u64, 300_000, MIB + 7, 3 * MIB].iter().enumerate() {
                let mut d = pattern(i as u64 + 100, 200_000);
                // Half compressible, so compressed parents hold compressed clusters.
                for (j, b) in d[100_000..].iter_mut().enumerate() {
                    *b = b"vmvol parent "[j % 13];
                }
                f.write_all_at(&d, *off).unwrap();
                model[*off as usize..*off as usize + d.len()].copy_from_slice(&d);
            }
            drop(f);
            let (name, fmt) = if let Setup::OverZstd { .. } = setup {
                let q = dir.path().join("parent.qcow2");
                qemu_img(&[
                    "convert",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4096,compression_type=zstd",
                    raw.to_str().unwrap(),
                    q.to_str().unwrap(),
                ]);
                assert!(qemu_compressed_clusters(&q) > 0);
                std::fs::remove_file(&raw).unwrap();
                ("parent.qcow2", Format::Qcow2)
            } else if matches!(setup, Setup::OverQcow2 { .. }) {
                let q = dir.path().join("parent.qcow2");
                qemu_img(&[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    raw.to_str().unwrap(),
                    q.to_str().unwrap(),
                ]);
                std::fs::remove_file(&raw).unwrap();
                ("parent.qcow2", Format::Qcow2)
            } else {
                ("parent.raw", Format::Raw)
            };
            let p = dir.path().join("top.qcow2");
            Qcow2Image::create(
                &p,
                &Qcow2CreateOptions::new(0)
                    .cluster_size(cluster)
                    .backing(name, fmt),
            )
            .unwrap();
            p
        }
    };
    (Case { dir, top, setup }, model)
}

fn run_case(setup: Setup, ops: &[Op]) {
    let (case, mut model) = build(setup);
    let mut img = Some(case.open());
    for op in ops {
        let i = img.as_ref().unwrap();
        let size = i.size();
        assert_eq!(size, model.len() as u64);
        match *op {
            Op::Write { off, len, seed } => {
                let (o, l) = place(off, len, size);
                let d = pattern(seed, l as usize);
                i.write_at(&d, o).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&d);
            }
            Op::Zero { off, len } => {
                let (o, l) = place(off, len, size);
                i.write_zeroes(o, l).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                let (o, l) = place(off, len, size);
                i.discard(o, l).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Grow { by } => {
                // qcow2 sizes are whole 512-byte sectors (QEMU refuses others).
                let by = if matches!(setup, Setup::Raw) {
                    by
                } else {
                    (by & !511).max(512)
                };
                i.grow(size + by).unwrap();
                model.resize((size + by) as usize, 0);
            }
            Op::Reopen => {
                i.flush().unwrap();
                // Close before reopening, as a restarted process would.
                drop(img.take());
                img = Some(case.open());
            }
        }
        // Spot-check a window around the start of the image after each op.
        let i = img.as_ref().unwrap();
        let mut buf = vec![0u8; 8192];
        i.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &model[..8192], "after {op:?}");
    }
    let i = img.take().unwrap();
    let mut all = vec![0u8; model.len()];
    i.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "image content differs from the model ({setup:?})"
    );
    // A read past the end is refused, not short.
    let mut one = [0u8; 1];
    assert!(matches!(
        i.read_at(&mut one, model.len() as u64),
        Err(Error::OutOfRange { .. })
    ));
    i.flush().unwrap();
    drop(i);

    // The allocation map agrees with qemu-img's on whatever the ops left.
    let ro = Image::open(&case.top, &case.opts().read_only(true)).unwrap();
    let ours = serde_json::to_value(ro.map(0, ro.size()).unwrap()).unwrap();
    drop(ro);
    let mut theirs = qemu_json(&["map", case.top.to_str().unwrap()]);
    // qemu rounds a raw file's size up to whole sectors; we report its bytes.
    let end = model.len() as u64;
    let arr = theirs.as_array_mut().unwrap();
    arr.retain(|e| e["start"].as_u64().unwrap() < end);
    if let Some(last) = arr.last_mut() {
        let start = last["start"].as_u64().unwrap();
        let len = last["length"].as_u64().unwrap();
        last["length"] = len.min(end - start).into();
    }
    assert_map_eq(&ours, &theirs, &format!("{setup:?}"));

    let model_path = case.dir.path().join("model.raw");
    std::fs::write(&model_path, &model).unwrap();
    match case.setup {
        Setup::Raw => assert_compare(&case.top, "raw", &model_path),
        _ => {
            assert_check_clean(&case.top);
            assert_compare(&case.top, "qcow2", &model_path);
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 32,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

fn cluster() -> impl Strategy<Value = u64> {
    prop_oneof![Just(512u64), Just(4096), Just(65536), Just(2 * MIB)]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn raw_matches_model(ops in prop::collection::vec(op_strategy(), 1..24)) {
        if !require_tool("qemu-img") { return Ok(()); }
        run_case(Setup::Raw, &ops);
    }

    #[test]
    fn qcow2_matches_model(c in cluster(), ops in prop::collection::vec(op_strategy(), 1..24)) {
        if !require_tool("qemu-img") { return Ok(()); }
        run_case(Setup::Qcow2 { cluster: c }, &ops);
    }

    #[test]
    fn qcow2_over_raw_matches_model(c in cluster(), ops in prop::collection::vec(op_strategy(), 1..24)) {
        if !require_tool("qemu-img") { return Ok(()); }
        run_case(Setup::OverRaw { cluster: c }, &ops);
    }

    #[test]
    fn qcow2_over_zstd_qcow2_matches_model(c in cluster(), ops in prop::collection::vec(op_strategy(), 1..24)) {
        if !require_tool("qemu-img") { return Ok(()); }
        run_case(Setup::OverZstd { cluster: c }, &ops);
    }

    #[test]
    fn qcow2_over_qcow2_matches_model(c in cluster(), ops in prop::collection::vec(op_strategy(), 1..24)) {
        if !require_tool("qemu-img") { return Ok(()); }
        run_case(Setup::OverQcow2 { cluster: c }, &ops);
    }
}

/// Growing past a longer backing file: the grown range reads as zeros, not as
/// the backing file's old bytes.
#[test]
fn grow_hides_longer_backing_file() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    std::fs::write(&raw, pattern(9, (8 * MIB) as usize)).unwrap();
    let top = dir.path().join("top.qcow2");
    Qcow2Image::create(
        &top,
        &Qcow2CreateOptions::new(2 * MIB + 1024).backing("big.raw", Format::Raw),
    )
    .unwrap();
    let opts = OpenOptions::new().policy(BackingPolicy::within([dir.path()]));
    let img = Qcow2Image::open(&top, &opts).unwrap();
    img.grow(6 * MIB).unwrap();
    let mut buf = vec![1u8; (6 * MIB) as usize];
    img.read_at(&mut buf, 0).unwrap();
    let want = pattern(9, (8 * MIB) as usize);
    assert_eq!(
        &buf[..(2 * MIB + 1024) as usize],
        &want[..(2 * MIB + 1024) as usize]
    );
    assert!(buf[(2 * MIB + 1024) as usize..].iter().all(|&b| b == 0));
    drop(img);
    assert_check_clean(&top);
}

/// Shrinking is refused with both sizes named; raw and qcow2.
#[test]
fn shrink_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("a.raw");
    let raw = RawImage::create(&r, MIB, Prealloc::Off, &Control::new()).unwrap();
    let e = raw.grow(4096, Prealloc::Off).unwrap_err();
    assert!(matches!(e, Error::Shrink { current, requested: 4096, .. } if current == MIB));
    assert!(e.to_string().contains("1048576") && e.to_string().contains("4096"));
    let q = dir.path().join("a.qcow2");
    Qcow2Image::create(&q, &Qcow2CreateOptions::new(MIB)).unwrap();
    let img = Qcow2Image::open(&q, &OpenOptions::new()).unwrap();
    assert!(matches!(img.grow(512), Err(Error::Shrink { .. })));
    assert!(matches!(
        img.grow(MIB + 1),
        Err(Error::InvalidArgument { .. })
    ));
    drop(img);
    // Odd sizes are rounded up to whole sectors at creation, as qemu-img does.
    let odd = dir.path().join("odd.qcow2");
    Qcow2Image::create(&odd, &Qcow2CreateOptions::new(1000)).unwrap();
    let img = Qcow2Image::open(&odd, &OpenOptions::new()).unwrap();
    assert_eq!(img.size(), 1024);
}

/// Raw preallocation: falloc and full allocate the whole file; cancelling
/// removes it; progress reaches the total.
#[test]
fn raw_prealloc_and_cancel() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    for (name, mode) in [("f.raw", Prealloc::Falloc), ("u.raw", Prealloc::Full)] {
        let p = dir.path().join(name);
        let last = Arc::new(AtomicU64::new(0));
        let l2 = last.clone();
        let ctl = Control::new().with_progress(move |d, _t| l2.store(d, Ordering::SeqCst));
        let img = RawImage::create(&p, 20 * MIB, mode, &ctl).unwrap();
        assert_eq!(last.load(Ordering::SeqCst), 20 * MIB);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 20 * MIB);
        assert!(m.blocks() * 512 >= 20 * MIB, "{name} not allocated");
        assert!(!img.known_zero(0, 4096).unwrap() || mode == Prealloc::Falloc);
    }
    let sparse = dir.path().join("s.raw");
    let img = RawImage::create(&sparse, 20 * MIB, Prealloc::Off, &Control::new()).unwrap();
    assert!(img.known_zero(0, 20 * MIB).unwrap());
    img.write_at(b"x", 5 * MIB).unwrap();
    assert!(!img.known_zero(0, 20 * MIB).unwrap());
    assert!(img.known_zero(0, 4 * MIB).unwrap());

    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    let ctl = Control::new()
        .with_cancel(flag.clone())
        .with_progress(move |d, _| {
            if d >= 16 * MIB {
                f2.store(true, Ordering::SeqCst)
            }
        });
    let c = dir.path().join("c.raw");
    let e = RawImage::create(&c, 64 * MIB, Prealloc::Full, &ctl).unwrap_err();
    assert!(matches!(e, Error::Cancelled { .. }));
    assert!(!c.exists(), "cancelled create left a file");
    // Creating over an existing file is refused.
    assert!(matches!(
        RawImage::create(&sparse, MIB, Prealloc::Off, &Control::new()),
        Err(Error::Exists { .. })
    ));
}

/// Read-only handles refuse every write-type call.
#[test]
fn read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.qcow2");
    Qcow2Image::create(&q, &Qcow2CreateOptions::new(MIB)).unwrap();
    let r = dir.path().join("a.raw");
    RawImage::create(&r, MIB, Prealloc::Off, &Control::new()).unwrap();
    for p in [&q, &r] {
        let img = Image::open(p, &OpenOptions::new().read_only(true)).unwrap();
        assert!(img.is_read_only());
        assert!(matches!(img.write_at(b"a", 0), Err(Error::ReadOnly { .. })));
        assert!(matches!(
            img.write_zeroes(0, 1),
            Err(Error::ReadOnly { .. })
        ));
        assert!(matches!(img.discard(0, 1), Err(Error::ReadOnly { .. })));
        assert!(matches!(img.grow(2 * MIB), Err(Error::ReadOnly { .. })));
        let mut b = [1u8; 10];
        img.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0u8; 10]);
    }
}

#[allow(dead_code)]
fn _unused(_: &Path) {}
