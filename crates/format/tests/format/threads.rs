//! Four threads writing and reading disjoint regions through one shared handle
//! end with exactly the model's bytes and a clean `qemu-img check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use crate::support::*;
use vmvol_format::{
    BackingPolicy, BlockIo, Control, Format, Image, OpenOptions, Prealloc, Qcow2CreateOptions,
    Qcow2Image, RawImage,
};

const SIZE: u64 = 16 << 20;
const THREADS: u64 = 4;
const OPS: u64 = 400;

/// Run the workload on `img`; returns the expected content.
fn hammer(img: Arc<Image>, initial: Vec<u8>) -> Vec<u8> {
    // Region boundaries deliberately off cluster boundaries so threads share
    // clusters at the edges (allocation races inside the engine).
    let bounds: Vec<u64> = (0..=THREADS)
        .map(|i| {
            if i == THREADS {
                SIZE
            } else {
                i * SIZE / THREADS + if i > 0 { 1000 } else { 0 }
            }
        })
        .collect();
    let initial = Arc::new(initial);
    let handles: Vec<_> = (0..THREADS as usize)
        .map(|t| {
            let img = img.clone();
            let (lo, hi) = (bounds[t], bounds[t + 1]);
            let initial = initial.clone();
            std::thread::spawn(move || {
                let mut model = initial[lo as usize..hi as usize].to_vec();
                let mut rng = pattern(t as u64 + 77, (OPS * 24) as usize);
                let mut next = |n: u64| {
                    let b: [u8; 8] = rng[..8].try_into().unwrap();
                    rng.rotate_left(8);
                    u64::from_le_bytes(b) % n
                };
                let span = hi - lo;
                for i in 0..OPS {
                    let off = next(span);
                    let len = (next(70_000) + 1).min(span - off);
                    match i % 10 {
                        0 => {
                            img.write_zeroes(lo + off, len).unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        1 if t == 0 => {
                            // Discard takes the engine's exclusive lock: mix it in.
                            img.discard(lo + off, len).unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        _ => {
                            let d = pattern(t as u64 * 1_000_000 + i, len as usize);
                            img.write_at(&d, lo + off).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&d);
                        }
                    }
                    // Read back a random window of our own region.
                    let roff = next(span);
                    let rlen = (next(50_000) + 1).min(span - roff);
                    let mut buf = vec![0u8; rlen as usize];
                    img.read_at(&mut buf, lo + roff).unwrap();
                    assert_eq!(
                        buf,
                        model[roff as usize..(roff + rlen) as usize],
                        "thread {t} op {i}"
                    );
                }
                (lo, model)
            })
        })
        .collect();
    let mut want = initial.to_vec();
    for h in handles {
        let (lo, m) = h.join().unwrap();
        want[lo as usize..lo as usize + m.len()].copy_from_slice(&m);
    }
    let mut all = vec![0u8; SIZE as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == want, "shared-handle content differs from the model");
    img.flush().unwrap();
    want
}

fn finish(img: Arc<Image>, path: &Path, fmt: &str, want: &[u8], dir: &Path) {
    drop(Arc::try_unwrap(img).unwrap());
    if fmt == "qcow2" {
        assert_check_clean(path);
    }
    let m = dir.join("model.raw");
    std::fs::write(&m, want).unwrap();
    assert_compare(path, fmt, &m);
}

#[test]
fn four_threads_one_qcow2_handle() {
    if !require_tool("qemu-img") {
        return;
    }
    for cluster in [4096u64, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(SIZE).cluster_size(cluster)).unwrap();
        let img = Arc::new(Image::open(&p, &OpenOptions::new()).unwrap());
        let want = hammer(img.clone(), vec![0u8; SIZE as usize]);
        finish(img, &p, "qcow2", &want, dir.path());
    }
}

#[test]
fn four_threads_one_qcow2_handle_over_raw_parent() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base.raw");
    let base = pattern(5, SIZE as usize);
    std::fs::write(&parent, &base).unwrap();
    let p = dir.path().join("t.qcow2");
    Qcow2Image::create(
        &p,
        &Qcow2CreateOptions::new(SIZE).backing("base.raw", Format::Raw),
    )
    .unwrap();
    let opts = OpenOptions::new().policy(BackingPolicy::within([dir.path()]));
    let img = Arc::new(Image::open(&p, &opts).unwrap());
    let want = hammer(img.clone(), base);
    finish(img, &p, "qcow2", &want, dir.path());
}

/// The parent's clusters are zstd-compressed: requests then serialise on the
/// engine's exclusive lock, and the result must still be exact.
#[test]
fn four_threads_one_qcow2_handle_over_zstd_parent() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let mut base = pattern(6, SIZE as usize);
    for chunk in base.chunks_mut(131072).step_by(2) {
        chunk.fill(b'v');
    }
    std::fs::write(&raw, &base).unwrap();
    let parent = dir.path().join("base.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        raw.to_str().unwrap(),
        parent.to_str().unwrap(),
    ]);
    let p = dir.path().join("t.qcow2");
    Qcow2Image::create(
        &p,
        &Qcow2CreateOptions::new(SIZE).backing("base.qcow2", Format::Qcow2),
    )
    .unwrap();
    let opts = OpenOptions::new().policy(BackingPolicy::within([dir.path()]));
    let img = Arc::new(Image::open(&p, &opts).unwrap());
    let want = hammer(img.clone(), base);
    finish(img, &p, "qcow2", &want, dir.path());
}

#[test]
fn four_threads_one_raw_handle() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.raw");
    drop(RawImage::create(&p, SIZE, Prealloc::Off, &Control::new()).unwrap());
    let img = Arc::new(Image::open(&p, &OpenOptions::new()).unwrap());
    let want = hammer(img.clone(), vec![0u8; SIZE as usize]);
    finish(img, &p, "raw", &want, dir.path());
}
