//! BlockIo over librbd next to `rbd bench --io-threads 1` on the same image
//! of a throwaway single-node cluster (scripts/ceph-cluster.sh, memstore):
//! 4 KiB random reads and writes at one thread, 64 KiB sequential reads and
//! writes. Needs `--features rbd` and the Ceph packages; numbers go to
//! docs/performance.md. Run: `cargo bench -p vmvol --features rbd --bench rbd`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use vmvol::pool::RbdSpec;
use vmvol::rbd::Connection;
use vmvol::BlockIo;

const SIZE: u64 = 256 << 20;

struct Cluster {
    dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

impl Cluster {
    fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    fn run(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .env("CEPH_CONF", self.conf())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn start() -> Cluster {
    let dir = std::env::temp_dir().join(format!("vmvol-bench-ceph-{}", std::process::id()));
    let st = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "cluster start failed");
    let c = Cluster { dir };
    c.run("ceph", &["osd", "pool", "create", "bench", "8"]);
    c.run("rbd", &["pool", "init", "bench"]);
    c
}

/// `rbd bench` at one thread on `image`: (ops/s, bytes/s).
fn rbd_bench(c: &Cluster, image: &str, io_type: &str, size: &str, pattern: &str) -> (f64, f64) {
    let out = c.run(
        "rbd",
        &[
            "bench",
            "--io-type",
            io_type,
            "--io-size",
            size,
            "--io-threads",
            "1",
            "--io-total",
            "64M",
            "--io-pattern",
            pattern,
            image,
        ],
    );
    // Last line: "elapsed: 3   ops: 16384   ops/sec: 5123.4   bytes/sec: 20 MiB/s"
    let last = out.lines().rev().find(|l| l.contains("ops/sec")).unwrap();
    let field = |name: &str| -> f64 {
        let rest = last.split(name).nth(1).unwrap().trim();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let ops = field("ops/sec:");
    let bytes = ops * if size == "4K" { 4096.0 } else { 65536.0 };
    (ops, bytes)
}

fn bench(cr: &mut Criterion) {
    let c = start();
    let spec = RbdSpec {
        conf: c.conf(),
        id: "admin".into(),
        pool: "bench".into(),
        namespace: String::new(),
    };
    let conn = Connection::connect(&spec).unwrap();
    conn.create_image("b", SIZE).unwrap();
    let io = conn.open_image("b", true).unwrap();
    // Fill it, so reads read data.
    let fill = vec![0x5au8; 4 << 20];
    for off in (0..SIZE).step_by(fill.len()) {
        io.write_at(&fill, off).unwrap();
    }
    io.flush().unwrap();
    // The reference before and after ours: the machine's load drifts.
    reference(&c, "before");
    let mut g = cr.benchmark_group("rbd");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut next = move |blocks: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % blocks) * 4096
    };
    let small = vec![0xa5u8; 4096];
    let mut rbuf = vec![0u8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4k-randwrite", |b| {
        b.iter(|| io.write_at(black_box(&small), next(SIZE / 4096)).unwrap())
    });
    g.bench_function("4k-randread", |b| {
        b.iter(|| io.read_at(black_box(&mut rbuf), next(SIZE / 4096)).unwrap())
    });
    let big = vec![0x3cu8; 65536];
    let mut bbuf = vec![0u8; 65536];
    let mut pos = 0u64;
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("64k-seqwrite", |b| {
        b.iter(|| {
            io.write_at(black_box(&big), pos).unwrap();
            pos = (pos + 65536) % SIZE;
        })
    });
    let mut pos = 0u64;
    g.bench_function("64k-seqread", |b| {
        b.iter(|| {
            io.read_at(black_box(&mut bbuf), pos).unwrap();
            pos = (pos + 65536) % SIZE;
        })
    });
    g.finish();
    drop(io);
    reference(&c, "after");
}

/// `rbd bench` on the same image, same thread count, each case.
fn reference(c: &Cluster, when: &str) {
    for (t, s, p) in [
        ("write", "4K", "rand"),
        ("read", "4K", "rand"),
        ("write", "64K", "seq"),
        ("read", "64K", "seq"),
    ] {
        let (ops, bytes) = rbd_bench(c, "bench/b", t, s, p);
        println!(
            "rbd bench --io-threads 1 {s} {p} {t} ({when}): {ops:.0} ops/s, {:.1} MiB/s, {:.1} µs/op",
            bytes / f64::from(1 << 20),
            1e6 / ops
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    if Command::new("sh")
        .args(["-c", "command -v ceph-mon && command -v rbd"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("skipping the rbd bench: the Ceph packages are not installed");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
