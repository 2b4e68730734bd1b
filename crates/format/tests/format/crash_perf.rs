//! Timings for the crash-safety notes in docs/performance.md (issue 9).
//! Not a correctness test: run on purpose, in release,
//! `cargo test --release -p vmvol-format --test format crash_perf -- --ignored --nocapture`.
//! (Kept as an ignored test rather than a criterion case: it compares flush
//! latencies of qcow2 against raw over a cold 1 GiB file, which criterion's
//! repeated short samples would not reproduce.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmvol_format::{BackingPolicy, BlockIo, OpenOptions, Qcow2CreateOptions, Qcow2Image};

const GIB: u64 = 1 << 30;

fn opts(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]))
}

fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut v: Vec<u64> = (0..n).collect();
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Per-op time of 4 KiB writes, each into a cluster nothing was written to
/// (64 KiB clusters, random order), with a flush every `flush_every` writes;
/// returns (per write incl. flushes, mean flush).
fn alloc_rand(qcow2: bool, n: u64, flush_every: u64) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let buf = vec![0x5au8; 4096];
    let order = shuffled(GIB / 65536, 7);
    let _ = Command::new("sync").status();
    let mut flush = Duration::ZERO;
    let mut flushes = 0u32;
    let t = Instant::now();
    if qcow2 {
        let p = dir.path().join("a.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(GIB)).unwrap();
        let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
        let t = Instant::now();
        for (i, &c) in order.iter().take(n as usize).enumerate() {
            img.write_at(&buf, c * 65536 + (c % 16) * 4096).unwrap();
            if flush_every > 0 && (i as u64 + 1).is_multiple_of(flush_every) {
                let f = Instant::now();
                img.flush().unwrap();
                flush += f.elapsed();
                flushes += 1;
            }
        }
        let el = t.elapsed();
        return (el / n as u32, flush / flushes.max(1));
    }
    let f = File::create(dir.path().join("a.raw")).unwrap();
    f.set_len(GIB).unwrap();
    for (i, &c) in order.iter().take(n as usize).enumerate() {
        f.write_all_at(&buf, c * 65536 + (c % 16) * 4096).unwrap();
        if flush_every > 0 && (i as u64 + 1).is_multiple_of(flush_every) {
            let s = Instant::now();
            f.sync_data().unwrap();
            flush += s.elapsed();
            flushes += 1;
        }
    }
    (t.elapsed() / n as u32, flush / flushes.max(1))
}

/// Per-op time of sequential 64 KiB writes over 256 MiB of a fresh image.
fn seq_64k(qcow2: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let buf = vec![0xa5u8; 65536];
    let n = 4096u64;
    let _ = Command::new("sync").status();
    if qcow2 {
        let p = dir.path().join("s.qcow2");
        Qcow2Image::create(&p, &Qcow2CreateOptions::new(GIB)).unwrap();
        let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
        let t = Instant::now();
        for i in 0..n {
            img.write_at(&buf, i * 65536).unwrap();
        }
        return t.elapsed() / n as u32;
    }
    let f = File::create(dir.path().join("s.raw")).unwrap();
    f.set_len(GIB).unwrap();
    let t = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, i * 65536).unwrap();
    }
    t.elapsed() / n as u32
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "timing run for docs/performance.md"]
fn crash_perf() {
    for round in 0..3 {
        let raw = alloc_rand(false, 8192, 0).0;
        let q = alloc_rand(true, 8192, 0).0;
        let (rawf, rawfl) = alloc_rand(false, 4096, 64);
        let (qf, qfl) = alloc_rand(true, 4096, 64);
        let sraw = seq_64k(false);
        let sq = seq_64k(true);
        println!(
            "round {round}: alloc_rand_4k raw {raw:?} qcow2 {q:?} ({:.2}x); with flush/64: raw {rawf:?} (flush {rawfl:?}) qcow2 {qf:?} (flush {qfl:?}); seq_64k raw {sraw:?} qcow2 {sq:?} ({:.2}x)",
            raw.as_secs_f64() / q.as_secs_f64(),
            sraw.as_secs_f64() / sq.as_secs_f64()
        );
    }
    let _ = median(vec![1]);

    // Repair on open: 100 GiB virtual, 10 GiB allocated (metadata
    // preallocation, so the file stays sparse), dirty bit set.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success());
    ok(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&p)
        .arg("10G"));
    ok(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&p)
        .arg("100G"));
    let t = Instant::now();
    drop(Qcow2Image::open(&p, &opts(dir.path())).unwrap());
    println!(
        "clean read-write open (with the consistency check): {:?}",
        t.elapsed()
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    f.write_all_at(&[b[0] | 1], 79).unwrap();
    drop(f);
    let t = Instant::now();
    let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
    println!(
        "dirty read-write open (refcount rebuild): {:?}",
        t.elapsed()
    );
    drop(img);
}
