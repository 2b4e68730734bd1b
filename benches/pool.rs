//! Benchmarks of the pool layer (criterion; numbers go to docs/performance.md).
//!
//! A pool of 10,000 volumes (record + sparse raw image each):
//! - open, including recovery and the rescan of every entry (target < 1 s);
//! - list with a filter that keeps 1 % of the entries (target < 20 ms);
//! - reserve + record rewrite (fsync'ed temp file, rename, directory fsync)
//!   and release (target < 2 ms), next to the bare crash-safe write alone
//!   (the floor this disk sets: two fsyncs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use serde::{Deserialize, Serialize};
use vmvol::pool::{
    write_atomic, CapacityPolicy, EntryKind, Pool, PoolSpec, Record, RecordType, Registry, Wait,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Vol {
    name: String,
    format: String,
    attached_to: Option<String>,
    backing: Option<String>,
    size: u64,
    tag: u64,
}

impl RecordType for Vol {
    const SCHEMA_VERSION: u32 = 1;
}

const N: usize = 10_000;

fn make_pool() -> (tempfile::TempDir, Pool) {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(t.path().join("root")).unwrap();
    let spec = PoolSpec {
        capacity: CapacityPolicy::Quota { bytes: 1 << 60 },
        ..PoolSpec::default()
    };
    let cfg = reg.define("bench", &spec).unwrap();
    reg.activate("bench", Wait::Block).unwrap();
    // Lay the entries down directly (what 10,000 commits would leave
    // behind, without 10,000 fsyncs of setup time).
    for i in 0..N {
        let id = format!("vol-{i:05}");
        let dir = cfg.backend.local_path().unwrap().join("volumes").join(&id);
        std::fs::create_dir(&dir).unwrap();
        let v = Vol {
            name: format!("web-{i}"),
            format: "raw".into(),
            attached_to: (i % 3 == 0).then(|| format!("vm-{i}")),
            backing: None,
            size: 1 << 30,
            tag: i as u64,
        };
        let bytes = Record::new(v).to_bytes(&dir).unwrap();
        std::fs::write(dir.join("volume.json"), bytes).unwrap();
        std::fs::File::create(dir.join("data.raw"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
    }
    let pool = reg.open_pool("bench", Wait::Block).unwrap();
    (t, pool)
}

fn bench_pool(c: &mut Criterion) {
    let (_t, pool) = make_pool();
    let dir = pool.location().to_path_buf();
    let mut g = c.benchmark_group("pool_10k");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("open_with_rescan", |b| {
        b.iter(|| black_box(Pool::open(&dir, Wait::Block).unwrap()))
    });
    g.sample_size(30);
    g.bench_function("list_filter_1pct", |b| {
        b.iter(|| {
            let l = pool
                .list::<Vol>(EntryKind::Volume, |_, v| v.tag % 100 == 7)
                .unwrap();
            assert_eq!(l.len(), N / 100);
            black_box(l)
        })
    });
    let mut tag = 0u64;
    g.bench_function("reserve_write_release", |b| {
        b.iter(|| {
            tag += 1;
            let r = pool.reserve(1 << 20, "bench").unwrap();
            let v = Vol {
                name: "web-1".into(),
                format: "raw".into(),
                attached_to: None,
                backing: None,
                size: 1 << 30,
                tag,
            };
            pool.write_record(EntryKind::Volume, "vol-00001", &v)
                .unwrap();
            drop(r);
        })
    });
    // The floor set by the disk: the same crash-safe record write alone
    // (temp file, fsync, rename, directory fsync), no pool logic.
    let rec = dir.join("volumes/vol-00002/volume.json");
    let body = std::fs::read(&rec).unwrap();
    g.bench_function("bare_write_atomic_floor", |b| {
        b.iter(|| write_atomic(&rec, &body).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_pool);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
