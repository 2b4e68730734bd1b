//! Benchmarks of the format layer (criterion; numbers go to docs/performance.md).
//!
//! - qcow2 (on imago) against a raw file with plain pwrite/pread, on a 1 GiB
//!   image with 64 KiB clusters in the page cache: sequential 64 KiB write
//!   and read, random 4 KiB read and overwrite, allocating random 4 KiB writes;
//! - convert of a 2 GiB image with ~1 GiB allocated against `qemu-img convert`
//!   (whole process timed), same source and target formats;
//! - compressed compaction (zstd, all cores) against `qemu-img convert -c` (zlib).
//!
//! The convert and compaction fixtures are built only when one of those
//! benchmarks runs (criterion's filter decides), so `-- io_1GiB` starts at
//! once. When they are built under `cargo bench`, the peak RSS of a convert
//! (ours, in a child process, and qemu-img's) is first measured with
//! `/usr/bin/time -v` and printed, with the compaction output sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, SamplingMode, Throughput};
use vmvol_format::{
    compact, convert, BackingPolicy, BlockIo, CompactOptions, Compression, Control, ConvertOptions,
    Format, OpenOptions, Qcow2CreateOptions, Qcow2Image,
};

const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 64 << 10;

struct Fixtures {
    dir: tempfile::TempDir,
    /// 2 GiB raw, 1 MiB of data every 2 MiB.
    raw2g: PathBuf,
    /// The same as qcow2 (made by qemu-img).
    qcow2g: PathBuf,
    /// 256 MiB qcow2 of real files (compaction source).
    compact_src: PathBuf,
    /// 256 MiB qcow2 of synthetic data (second compaction source).
    compact_synth: PathBuf,
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
/// Whether to print the memory and size report when the fixtures are built.
static REPORT: AtomicBool = AtomicBool::new(false);
static REPORTED: Once = Once::new();

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn noise(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        let v = xorshift(&mut x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// Log-like text: compressible, but not trivially.
fn text(seed: u64, buf: &mut [u8]) {
    const WORDS: [&str; 16] = [
        "kernel:", "eth0", "link", "up", "volume", "attached", "INFO", "WARN", "block", "device",
        "vda1", "mounted", "ext4", "journal", "commit", "interval",
    ];
    let mut x = seed | 1;
    let mut pos = 0;
    while pos < buf.len() {
        let r = xorshift(&mut x);
        let w = if r.is_multiple_of(5) {
            format!("{} ", r % 100_000)
        } else {
            format!("{} ", WORDS[(r >> 8) as usize % WORDS.len()])
        };
        let w = if r.is_multiple_of(11) {
            format!("{w}\n")
        } else {
            w
        };
        let n = w.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&w.as_bytes()[..n]);
        pos += n;
    }
}

fn qemu(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// The convert/compaction fixtures, built on first use; the first use also
/// prints the memory and size report when it is wanted.
fn fixtures() -> &'static Fixtures {
    let fx = FIXTURES.get_or_init(build_fixtures);
    REPORTED.call_once(|| {
        if REPORT.load(Ordering::Relaxed) {
            report_memory_and_sizes(fx);
        }
    });
    fx
}

fn build_fixtures() -> Fixtures {
    let dir = tempfile::Builder::new()
        .prefix("vmvol-bench")
        .tempdir_in(std::env::var_os("VMVOL_BENCH_DIR").unwrap_or_else(|| "/tmp".into()))
        .unwrap();
    let raw2g = dir.path().join("src2g.raw");
    let f = File::create(&raw2g).unwrap();
    f.set_len(2 * GIB).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..1024u64 {
        noise(i + 1, &mut buf);
        f.write_all_at(&buf, i * (2 << 20)).unwrap();
    }
    f.sync_all().unwrap();
    let qcow2g = dir.path().join("src2g.qcow2");
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw2g.to_str().unwrap(),
        qcow2g.to_str().unwrap(),
    ]);

    // Synthetic: 10% random, 10% zeros, 80% log-like text.
    let craw = dir.path().join("synth.raw");
    let f = File::create(&craw).unwrap();
    let mut c = vec![0u8; CLUSTER as usize];
    for g in 0..(256 << 20) / CLUSTER {
        match g % 10 {
            0 => noise(g + 7, &mut c),
            1 => c.fill(0),
            _ => text(g + 3, &mut c),
        }
        f.write_all_at(&c, g * CLUSTER).unwrap();
    }
    drop(f);
    let compact_synth = dir.path().join("synth.qcow2");
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        craw.to_str().unwrap(),
        compact_synth.to_str().unwrap(),
    ]);
    std::fs::remove_file(&craw).unwrap();
    // Real content, as a root disk holds it: the first 256 MiB of a tar
    // of this machine's /usr/lib, /usr/bin and /usr/share/doc.
    let uraw = dir.path().join("usr.raw");
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar cf - /usr/lib/x86_64-linux-gnu /usr/bin /usr/share/doc 2>/dev/null | head -c {} > {}",
            256 << 20,
            uraw.display()
        ))
        .status()
        .unwrap();
    assert!(tar.success());
    let f = std::fs::OpenOptions::new().write(true).open(&uraw).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let compact_src = dir.path().join("usr.qcow2");
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        uraw.to_str().unwrap(),
        compact_src.to_str().unwrap(),
    ]);
    std::fs::remove_file(&uraw).unwrap();
    Fixtures {
        dir,
        raw2g,
        qcow2g,
        compact_src,
        compact_synth,
    }
}

fn open_opts(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]))
}

/// A 1 GiB raw file and qcow2 image, both fully written (so reads and
/// overwrites hit allocated space).
struct IoImages {
    _dir: tempfile::TempDir,
    raw: File,
    qcow2: Qcow2Image,
}

fn io_images() -> IoImages {
    let dir = tempfile::tempdir().unwrap();
    let rp = dir.path().join("io.raw");
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rp)
        .unwrap();
    raw.set_len(GIB).unwrap();
    let qp = dir.path().join("io.qcow2");
    Qcow2Image::create(&qp, &Qcow2CreateOptions::new(GIB)).unwrap();
    let qcow2 = Qcow2Image::open(&qp, &open_opts(dir.path())).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    noise(42, &mut buf);
    for i in 0..GIB / (1 << 20) {
        raw.write_all_at(&buf, i << 20).unwrap();
        qcow2.write_at(&buf, i << 20).unwrap();
    }
    // Start clean: no page may be under writeback while we measure.
    raw.sync_all().unwrap();
    qcow2.flush().unwrap();
    Command::new("sync").status().unwrap();
    IoImages {
        _dir: dir,
        raw,
        qcow2,
    }
}

fn bench_io(c: &mut Criterion) {
    // Built by the first I/O benchmark that runs, not when none does.
    let imgs_cell = OnceLock::new();
    let imgs = || imgs_cell.get_or_init(io_images);
    let mut g = c.benchmark_group("io_1GiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    let block = vec![0x5au8; 64 << 10];
    g.throughput(Throughput::Bytes(64 << 10));
    let mut off = 0u64;
    g.bench_function("seq_write_64k/raw", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            imgs.raw.write_all_at(&block, off).unwrap();
            off = (off + (64 << 10)) % GIB;
        })
    });
    let mut off = 0u64;
    g.bench_function("seq_write_64k/qcow2", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            imgs.qcow2.write_at(&block, off).unwrap();
            off = (off + (64 << 10)) % GIB;
        })
    });
    let mut rbuf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    g.bench_function("seq_read_64k/raw", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            imgs.raw.read_exact_at(&mut rbuf, off).unwrap();
            black_box(&rbuf);
            off = (off + (64 << 10)) % GIB;
        })
    });
    let mut off = 0u64;
    g.bench_function("seq_read_64k/qcow2", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            imgs.qcow2.read_at(&mut rbuf, off).unwrap();
            black_box(&rbuf);
            off = (off + (64 << 10)) % GIB;
        })
    });

    g.throughput(Throughput::Elements(1));
    let small = vec![0xa5u8; 4096];
    let mut sbuf = vec![0u8; 4096];
    let pages = GIB / 4096;
    let mut x = 99u64;
    g.bench_function("rand_read_4k/raw", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            let o = (xorshift(&mut x) % pages) * 4096;
            imgs.raw.read_exact_at(&mut sbuf, o).unwrap();
            black_box(&sbuf);
        })
    });
    g.bench_function("rand_read_4k/qcow2", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            let o = (xorshift(&mut x) % pages) * 4096;
            imgs.qcow2.read_at(&mut sbuf, o).unwrap();
            black_box(&sbuf);
        })
    });
    // Two threads reading at random through one shared handle, as a VMM
    // drives one disk from several queues: the time per read of both
    // together (scaling = single-thread time / this).
    for kind in ["raw", "qcow2"] {
        g.bench_function(BenchmarkId::new("rand_read_4k_2threads", kind), |b| {
            let imgs = imgs();
            settle();
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2u64 {
                        s.spawn(move || {
                            let mut x = 1234 + t;
                            let mut buf = vec![0u8; 4096];
                            for _ in 0..iters.div_ceil(2) {
                                let o = (xorshift(&mut x) % pages) * 4096;
                                if kind == "raw" {
                                    imgs.raw.read_exact_at(&mut buf, o).unwrap();
                                } else {
                                    imgs.qcow2.read_at(&mut buf, o).unwrap();
                                }
                                black_box(&buf);
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.bench_function("rand_overwrite_4k/raw", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            let o = (xorshift(&mut x) % pages) * 4096;
            imgs.raw.write_all_at(&small, o).unwrap();
        })
    });
    g.bench_function("rand_overwrite_4k/qcow2", |b| {
        let imgs = imgs();
        settle();
        b.iter(|| {
            let o = (xorshift(&mut x) % pages) * 4096;
            imgs.qcow2.write_at(&small, o).unwrap();
        })
    });

    // Allocating writes: every write lands in a cluster nothing was written
    // to yet, in random order; fresh images are made outside the timing.
    for kind in ["raw", "qcow2"] {
        g.bench_function(BenchmarkId::new("alloc_rand_write_4k", kind), |b| {
            b.iter_custom(|iters| alloc_writes(kind, iters, &small))
        });
    }
    g.finish();
}

/// Write back dirty pages before a measurement, so that writeback of an
/// earlier benchmark's data does not land in this one.
fn settle() {
    let _ = Command::new("sync").status();
}

fn alloc_writes(kind: &str, iters: u64, data: &[u8]) -> Duration {
    let clusters = GIB / CLUSTER;
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut seed = 7u64;
    while left > 0 {
        let n = left.min(clusters);
        let dir = tempfile::tempdir().unwrap();
        let mut order: Vec<u64> = (0..clusters).collect();
        for i in (1..order.len()).rev() {
            let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let sub = |s: &mut u64| (xorshift(s) % (CLUSTER / 4096)) * 4096;
        if kind == "raw" {
            let f = File::create(dir.path().join("a.raw")).unwrap();
            f.set_len(GIB).unwrap();
            let t = Instant::now();
            for &c in order.iter().take(n as usize) {
                f.write_all_at(data, c * CLUSTER + sub(&mut seed)).unwrap();
            }
            total += t.elapsed();
        } else {
            let p = dir.path().join("a.qcow2");
            Qcow2Image::create(&p, &Qcow2CreateOptions::new(GIB)).unwrap();
            let img = Qcow2Image::open(&p, &open_opts(dir.path())).unwrap();
            let t = Instant::now();
            for &c in order.iter().take(n as usize) {
                img.write_at(data, c * CLUSTER + sub(&mut seed)).unwrap();
            }
            total += t.elapsed();
        }
        left -= n;
    }
    total
}

fn run_qemu_convert(args: &[&str]) -> Duration {
    let t = Instant::now();
    qemu(args);
    t.elapsed()
}

/// Where convert benchmarks write (inside the fixtures' directory).
fn convert_dst(fx: &Fixtures) -> PathBuf {
    fx.dir.path().join("out.img")
}

fn bench_convert(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert_2GiB_1GiB_allocated");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(GIB));
    type Src = fn(&'static Fixtures) -> &'static PathBuf;
    let raw: Src = |fx| &fx.raw2g;
    let qcow2: Src = |fx| &fx.qcow2g;
    let cases = [
        ("raw_to_raw", raw, Format::Raw, Format::Raw),
        ("raw_to_qcow2", raw, Format::Raw, Format::Qcow2),
        ("qcow2_to_qcow2", qcow2, Format::Qcow2, Format::Qcow2),
        ("qcow2_to_raw", qcow2, Format::Qcow2, Format::Raw),
    ];
    for (name, src, sf, df) in cases {
        g.bench_function(BenchmarkId::new(name, "vmvol"), |b| {
            let fx = fixtures();
            let (src, dst) = (src(fx), convert_dst(fx));
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_file(&dst);
                    // qemu-img convert does not flush (cache=unsafe): compare like with like.
                    let opts = ConvertOptions {
                        format: df,
                        durable: false,
                        ..ConvertOptions::default()
                    };
                    let t = Instant::now();
                    convert(
                        src,
                        &open_opts(fx.dir.path()).format(sf),
                        &dst,
                        &opts,
                        &Control::new(),
                    )
                    .unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new(name, "qemu-img"), |b| {
            let fx = fixtures();
            let (src, dst) = (src(fx), convert_dst(fx));
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_file(&dst);
                    total += run_qemu_convert(&[
                        "convert",
                        "-f",
                        sf.as_str(),
                        "-O",
                        df.as_str(),
                        src.to_str().unwrap(),
                        dst.to_str().unwrap(),
                    ]);
                }
                total
            })
        });
    }
    // Durable copies: ours fsyncs before the rename, qemu-img flushes with -t writeback.
    g.bench_function(BenchmarkId::new("qcow2_to_qcow2_fsync", "vmvol"), |b| {
        let fx = fixtures();
        let dst = convert_dst(fx);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&dst);
                let t = Instant::now();
                convert(
                    &fx.qcow2g,
                    &open_opts(fx.dir.path()),
                    &dst,
                    &ConvertOptions::default(),
                    &Control::new(),
                )
                .unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("qcow2_to_qcow2_fsync", "qemu-img"), |b| {
        let fx = fixtures();
        let dst = convert_dst(fx);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&dst);
                total += run_qemu_convert(&[
                    "convert",
                    "-t",
                    "writeback",
                    "-O",
                    "qcow2",
                    fx.qcow2g.to_str().unwrap(),
                    dst.to_str().unwrap(),
                ]);
            }
            total
        })
    });
    if let Some(fx) = FIXTURES.get() {
        let _ = std::fs::remove_file(convert_dst(fx));
    }
    g.finish();
}

fn compact_copy(fx: &Fixtures, src: &Path) -> PathBuf {
    let p = fx.dir.path().join("compact-work.qcow2");
    let _ = std::fs::remove_file(&p);
    std::fs::copy(src, &p).unwrap();
    p
}

fn bench_compact(c: &mut Criterion) {
    let mut g = c.benchmark_group("compressed_compaction_256MiB");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(256 << 20));
    g.bench_function("vmvol_compact_zstd_all_cores", |b| {
        let fx = fixtures();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let p = compact_copy(fx, &fx.compact_src);
                let opts = CompactOptions {
                    compression: Some(Compression::Zstd),
                    threads: 0,
                    unused_ranges: vec![],
                };
                let t = Instant::now();
                compact(&p, &opts, &Control::new()).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("qemu-img_convert_-c_zlib", |b| {
        let fx = fixtures();
        let out = fx.dir.path().join("qemu-c.qcow2");
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&out);
                total += run_qemu_convert(&[
                    "convert",
                    "-c",
                    "-f",
                    "qcow2",
                    "-O",
                    "qcow2",
                    fx.compact_src.to_str().unwrap(),
                    out.to_str().unwrap(),
                ]);
            }
            total
        })
    });
    g.finish();
}

/// Peak RSS in KiB of a command, from `/usr/bin/time -v`.
fn peak_rss(cmd: &mut Command) -> Option<u64> {
    let o = cmd.output().ok()?;
    if !o.status.success() {
        eprintln!("command failed: {o:?}");
        return None;
    }
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .find(|l| l.contains("Maximum resident set size"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse().ok())
}

fn report_memory_and_sizes(fx: &Fixtures) {
    let exe = std::env::current_exe().unwrap();
    let dst = fx.dir.path().join("rss.img");
    let cases = [
        ("qcow2->qcow2", &fx.qcow2g, "qcow2", "qcow2", ""),
        ("raw->qcow2", &fx.raw2g, "raw", "qcow2", ""),
        ("qcow2->raw", &fx.qcow2g, "qcow2", "raw", ""),
        (
            "raw->qcow2 compressed zstd",
            &fx.raw2g,
            "raw",
            "qcow2",
            "zstd",
        ),
    ];
    for (name, src, sf, df, comp) in cases {
        let _ = std::fs::remove_file(&dst);
        let ours = peak_rss(Command::new("/usr/bin/time").arg("-v").arg(&exe).env(
            "VMVOL_BENCH_CHILD",
            format!("{}|{}|{sf}|{df}|{comp}", src.display(), dst.display()),
        ));
        let _ = std::fs::remove_file(&dst);
        let mut args = vec!["-v", "qemu-img", "convert", "-f", sf, "-O", df];
        if !comp.is_empty() {
            args.extend(["-c", "-o", "compression_type=zstd"]);
        }
        let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
        args.extend([s, d]);
        let theirs = peak_rss(Command::new("/usr/bin/time").args(&args));
        eprintln!(
            "peak RSS convert 2 GiB ({name}): vmvol {} KiB, qemu-img {} KiB",
            ours.map_or("?".into(), |v| v.to_string()),
            theirs.map_or("?".into(), |v| v.to_string())
        );
    }
    let _ = std::fs::remove_file(&dst);
    // Compaction output sizes.
    for (label, src) in [
        ("real files", &fx.compact_src),
        ("synthetic", &fx.compact_synth),
    ] {
        compaction_sizes(fx, label, src);
    }
}

fn compaction_sizes(fx: &Fixtures, label: &str, src: &Path) {
    let p = compact_copy(fx, src);
    let t = Instant::now();
    let r = compact(
        &p,
        &CompactOptions {
            compression: Some(Compression::Zstd),
            threads: 0,
            unused_ranges: vec![],
        },
        &Control::new(),
    )
    .unwrap();
    let ours_t = t.elapsed();
    let ours_len = std::fs::metadata(&p).unwrap().len();
    let out = fx.dir.path().join("qemu-c.qcow2");
    let _ = std::fs::remove_file(&out);
    let qt = run_qemu_convert(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let q_len = std::fs::metadata(&out).unwrap().len();
    eprintln!(
        "compaction 256 MiB ({label}): vmvol zstd {ours_len} bytes in {ours_t:?} (allocated {} -> {}), qemu-img -c zlib {q_len} bytes in {qt:?}; size ratio {:.3}",
        r.bytes_before,
        r.bytes_after,
        ours_len as f64 / q_len as f64
    );
}

/// Child mode: one convert, so its peak RSS can be measured alone.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (src, dst) = (Path::new(parts[0]), Path::new(parts[1]));
    let sf: Format = parts[2].parse().unwrap();
    let df: Format = parts[3].parse().unwrap();
    let compress = (!parts[4].is_empty()).then(|| parts[4].parse::<Compression>().unwrap());
    let dir = src.parent().unwrap();
    convert(
        src,
        &open_opts(dir).format(sf),
        dst,
        &ConvertOptions {
            format: df,
            compress,
            ..ConvertOptions::default()
        },
        &Control::new(),
    )
    .unwrap();
}

criterion_group!(benches, bench_io, bench_convert, bench_compact);

fn main() {
    if let Ok(spec) = std::env::var("VMVOL_BENCH_CHILD") {
        child(&spec);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs benches once in test mode: skip the extra report there.
    let report = args.iter().any(|a| a == "--bench")
        && std::env::var_os("VMVOL_BENCH_SKIP_REPORT").is_none();
    REPORT.store(report, Ordering::Relaxed);
    benches();
    Criterion::default().configure_from_args().final_summary();
    if let Some(fx) = FIXTURES.get() {
        let _ = std::fs::remove_dir_all(fx.dir.path());
    }
}
