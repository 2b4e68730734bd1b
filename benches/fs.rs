//! Benchmarks of the ext4 writer (`vmvol-fs`) beside `mke2fs`, one run each
//! (numbers go to docs/performance.md):
//!
//! - format a 100 GiB sparse raw volume: create + mkfs in-process against
//!   `truncate` + `mkfs.ext4 -q` (whole processes); wall time and allocated
//!   host bytes of both;
//! - format a 100 GiB qcow2 volume: create + mkfs; file size;
//! - populate from a tree of 10,000 small files and 200 MiB of large files
//!   against `mkfs.ext4 -d` on the same tree and image size.
//!
//! `cargo bench -p vmvol --bench fs` (the machine's tools must be installed:
//! e2fsprogs, coreutils). Criterion times each side; the sizes and ratios
//! are printed once after the timings.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};

use vmvol_format::{
    BlockIo, Control, OpenOptions, Prealloc, Qcow2CreateOptions, Qcow2Image, RawImage,
};
use vmvol_fs::{mkfs, populate, required_size, MkfsOptions, PopulateOptions, Source};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn sh(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?}");
}

/// Criterion timing where each iteration's setup (removing the last output)
/// stays outside the measurement; returns the mean per iteration.
fn timed(c: &mut Criterion, group: &str, id: &str, mut f: impl FnMut() -> Duration) -> Duration {
    let mut mean = Duration::ZERO;
    let mut g = c.benchmark_group(group);
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let total: Duration = (0..iters).map(|_| f()).sum();
            mean = total / u32::try_from(iters.max(1)).unwrap_or(u32::MAX);
            total
        })
    });
    g.finish();
    mean
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn bench_fs(c: &mut Criterion) {
    let mut summary = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // 1. 100 GiB sparse raw.
    let ours = d.join("ours.raw");
    let theirs = d.join("mke2fs.raw");
    let t_ours = timed(c, "format_100g_raw", "vmvol", || {
        let _ = std::fs::remove_file(&ours);
        let t = Instant::now();
        let img = RawImage::create(&ours, 100 * GIB, Prealloc::Off, &Control::new()).unwrap();
        mkfs(&img, &MkfsOptions::default()).unwrap();
        t.elapsed()
    });
    let t_theirs = timed(c, "format_100g_raw", "truncate+mkfs.ext4", || {
        let _ = std::fs::remove_file(&theirs);
        let t = Instant::now();
        sh("truncate", &["-s", "100G", theirs.to_str().unwrap()]);
        sh("mkfs.ext4", &["-q", "-F", theirs.to_str().unwrap()]);
        t.elapsed()
    });
    let (a_ours, a_theirs) = (allocated(&ours), allocated(&theirs));
    summary.push(format!(
        "format 100 GiB raw: vmvol {} vs truncate+mkfs.ext4 {} (ratio {:.3})",
        ms(t_ours),
        ms(t_theirs),
        t_ours.as_secs_f64() / t_theirs.as_secs_f64()
    ));
    summary.push(format!("  allocated host bytes: vmvol {a_ours} ({:.2} MiB) vs mke2fs {a_theirs} ({:.2} MiB) (ratio {:.4})", a_ours as f64 / MIB as f64, a_theirs as f64 / MIB as f64, a_ours as f64 / a_theirs as f64));
    std::fs::remove_file(&ours).unwrap();
    std::fs::remove_file(&theirs).unwrap();

    // 2. 100 GiB qcow2.
    let q = d.join("v.qcow2");
    let t_q = timed(c, "format_100g_qcow2", "vmvol", || {
        let _ = std::fs::remove_file(&q);
        let t = Instant::now();
        Qcow2Image::create(&q, &Qcow2CreateOptions::new(100 * GIB)).unwrap();
        let img = Qcow2Image::open(&q, &OpenOptions::new()).unwrap();
        mkfs(&img, &MkfsOptions::default()).unwrap();
        img.flush().unwrap();
        t.elapsed()
    });
    let qsize = std::fs::metadata(&q).unwrap().len();
    summary.push(format!(
        "format 100 GiB qcow2: vmvol {} ; file size {qsize} bytes ({:.2} MiB)",
        ms(t_q),
        qsize as f64 / MIB as f64
    ));
    std::fs::remove_file(&q).unwrap();

    // 3. populate: 10,000 small files + 200 MiB of large files.
    let tree = d.join("tree");
    for i in 0..10_000u64 {
        let sub = tree.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(
            sub.join(format!("f{i:05}")),
            pattern(512 + (i as usize * 37) % 8192, i),
        )
        .unwrap();
    }
    std::fs::create_dir_all(tree.join("large")).unwrap();
    for i in 0..4u64 {
        std::fs::write(
            tree.join(format!("large/l{i}")),
            pattern(50 * MIB as usize, 1000 + i),
        )
        .unwrap();
    }
    let opts = PopulateOptions::default();
    let source = Source::Dir(tree.clone());
    let size = required_size(&source, &opts).unwrap();
    let pop = d.join("pop.raw");
    let mk = d.join("mkd.raw");
    let t_pop = timed(c, "populate_10k_files_200m", "vmvol", || {
        let _ = std::fs::remove_file(&pop);
        let t = Instant::now();
        let img = RawImage::create(&pop, size, Prealloc::Off, &Control::new()).unwrap();
        populate(&img, &source, &opts, &Control::new()).unwrap();
        t.elapsed()
    });
    let t_mk = timed(c, "populate_10k_files_200m", "mkfs.ext4 -d", || {
        let _ = std::fs::remove_file(&mk);
        let t = Instant::now();
        sh("truncate", &["-s", &size.to_string(), mk.to_str().unwrap()]);
        sh(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-d",
                tree.to_str().unwrap(),
                mk.to_str().unwrap(),
            ],
        );
        t.elapsed()
    });
    summary.push(format!(
        "populate 10,000 small files + 200 MiB ({} MiB image): vmvol {} vs mkfs.ext4 -d {} (ratio {:.3})",
        size / MIB,
        ms(t_pop),
        ms(t_mk),
        t_pop.as_secs_f64() / t_mk.as_secs_f64()
    ));
    let fsck = Command::new("e2fsck")
        .args(["-fn", pop.to_str().unwrap()])
        .output()
        .unwrap();
    summary.push(format!(
        "  e2fsck -fn of our image: {}",
        if fsck.status.success() {
            "clean"
        } else {
            "NOT CLEAN"
        }
    ));
    println!();
    for line in summary {
        println!("{line}");
    }
}

criterion_group!(benches, bench_fs);

fn main() {
    // `cargo test --benches` runs bench binaries without --bench: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fs bench: run with `cargo bench -p vmvol --bench fs`");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
