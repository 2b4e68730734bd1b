//! Benchmarks of the volume layer (criterion; numbers go to docs/performance.md):
//! - linked create from a 1 TiB template, and a snapshot of a 1 TiB qcow2
//!   volume (targets ≤ 10 ms each, independent of size);
//! - a 100 GiB ext4 qcow2 volume, record fsync included (≤ 50 ms, host
//!   bytes ≤ 16 MiB, printed);
//! - full clone of a 2 GiB qcow2 volume with 1 GiB allocated, beside
//!   `qemu-img convert -t writeback` of the same file;
//! - 10,000 volumes: filtered list (< 20 ms) and describe (< 2 ms);
//! - the disk's floor: one bare crash-safe record write, in the same run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, BatchSize, Criterion};
use vmvol::format::{Control, Format, Prealloc};
use vmvol::pool::{write_atomic, AttachTarget, CapacityPolicy, PoolSpec, Record, Registry, Wait};
use vmvol::volume::{
    CreateVolume, LinkMode, ListFilter, Provenance, VolumeRecord, VolumeSource, Volumes,
};

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn registry() -> (tempfile::TempDir, Volumes) {
    let t = tempfile::tempdir_in(
        std::env::var_os("VMVOL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()),
    )
    .unwrap();
    let reg = Registry::open(t.path().join("reg")).unwrap();
    let spec = PoolSpec {
        capacity: CapacityPolicy::Quota { bytes: 1 << 60 },
        ..PoolSpec::default()
    };
    reg.define("default", &spec).unwrap();
    reg.activate("default", Wait::Block).unwrap();
    (t, Volumes::new(reg))
}

fn blank(vols: &Volumes, name: &str, size: u64, ext4: bool) {
    vols.create_volume(
        "default",
        &CreateVolume {
            name: name.into(),
            size: Some(size),
            source: VolumeSource::Blank {
                format: Format::Qcow2,
                prealloc: Prealloc::Off,
                ext4,
            },
        },
        &Control::new(),
    )
    .unwrap();
}

fn file_of(vols: &Volumes, name: &str) -> std::path::PathBuf {
    match vols.describe_volume("default", name).unwrap().path {
        AttachTarget::File { path, .. } => path,
        _ => unreachable!("local pool"),
    }
}

fn bench_o1(c: &mut Criterion) {
    let (_t, vols) = registry();
    blank(&vols, "golden", TIB, false);
    vols.create_template_from_volume("default", "tpl", "golden", &Control::new())
        .unwrap();
    let mut g = c.benchmark_group("volume_1tib");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0u64;
    g.bench_function("create_linked_from_template", |b| {
        b.iter(|| {
            i += 1;
            vols.create_volume(
                "default",
                &CreateVolume {
                    name: format!("l{i}"),
                    size: None,
                    source: VolumeSource::Template {
                        name: "tpl".into(),
                        mode: LinkMode::Linked,
                    },
                },
                &Control::new(),
            )
            .unwrap()
        })
    });
    let mut j = 0u64;
    g.bench_function("snapshot_qcow2", |b| {
        b.iter_batched(
            || {
                j += 1;
                blank(&vols, &format!("s{j}"), TIB, false);
                j
            },
            |j| {
                vols.create_snapshot(
                    "default",
                    &format!("snap{j}"),
                    &format!("s{j}"),
                    &Control::new(),
                )
                .unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    let mut k = 0u64;
    g.bench_function("create_100gib_ext4_qcow2", |b| {
        b.iter(|| {
            k += 1;
            blank(&vols, &format!("e{k}"), 100 * GIB, true)
        })
    });
    // The disk's floor in the same run: one crash-safe record write (temp
    // file, fsync, rename, directory fsync); a commit does about three.
    let rec = t_dir(&vols).join("floor.json");
    g.bench_function("bare_write_atomic_floor", |b| {
        b.iter(|| write_atomic(&rec, b"{}\n").unwrap())
    });
    g.finish();
    // Absent when a filter skipped that bench.
    if let Ok(d) = vols.describe_volume("default", "e1") {
        eprintln!(
            "100 GiB ext4 qcow2 volume: host bytes {} ({:.2} MiB)",
            d.allocation,
            d.allocation as f64 / MIB as f64
        );
    }
}

/// A scratch directory on the pool's filesystem.
fn t_dir(vols: &Volumes) -> std::path::PathBuf {
    vols.pool("default").unwrap().location().to_path_buf()
}

fn bench_clone(c: &mut Criterion) {
    let (t, vols) = registry();
    blank(&vols, "src", 2 * GIB, false);
    // 1 GiB allocated: 1 MiB of data every 2 MiB.
    {
        let path = file_of(&vols, "src");
        let st = Command::new("qemu-io")
            .arg("-f")
            .arg("qcow2")
            .args((0..1024u64).flat_map(|i| {
                [
                    "-c".to_string(),
                    format!("write -P {} {}M 1M", i % 250 + 1, i * 2),
                ]
            }))
            .arg(&path)
            .output()
            .unwrap();
        assert!(st.status.success());
    }
    let src = file_of(&vols, "src");
    let mut g = c.benchmark_group("volume_clone_2gib_1gib_allocated");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let mut i = 0u64;
    g.bench_function("vmvol_clone", |b| {
        b.iter(|| {
            i += 1;
            let name = format!("c{i}");
            vols.clone_volume("default", "src", &name, None, &Control::new())
                .unwrap();
            vols.delete_volume("default", &name).unwrap();
        })
    });
    let dst = t.path().join("qemu-copy.qcow2");
    g.bench_function("qemu_img_convert_writeback", |b| {
        b.iter(|| {
            let st = Command::new("qemu-img")
                .args(["convert", "-t", "writeback", "-O", "qcow2"])
                .arg(&src)
                .arg(&dst)
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::remove_file(&dst).unwrap();
        })
    });
    g.finish();
}

fn bench_10k(c: &mut Criterion) {
    let (t, vols) = registry();
    let reg = Registry::open(t.path().join("reg")).unwrap();
    let dir = reg
        .get("default")
        .unwrap()
        .backend
        .local_path()
        .unwrap()
        .join("volumes");
    // Lay the entries down directly (what 10,000 creates leave behind,
    // without 10,000 fsyncs of setup time).
    for i in 0..10_000u32 {
        let id = uuid_like(i);
        let d = dir.join(&id);
        std::fs::create_dir(&d).unwrap();
        let r = VolumeRecord {
            name: format!("vol-{i:05}"),
            created: "2026-12-02T00:00:00Z".into(),
            format: Format::Raw,
            size: GIB,
            prealloc: Prealloc::Off,
            ext4: false,
            provenance: Provenance::Blank,
            base: None,
            attachments: Vec::new(),
        };
        std::fs::write(d.join("volume.json"), Record::new(r).to_bytes(&d).unwrap()).unwrap();
        std::fs::File::create(d.join("data.raw"))
            .unwrap()
            .set_len(GIB)
            .unwrap();
    }
    vols.forget_pools();
    vols.pool("default").unwrap();
    let mut g = c.benchmark_group("volume_10k");
    g.sample_size(30);
    let filter = ListFilter {
        pool: Some("default".into()),
        name: Some("VOL-0012".into()),
        ..ListFilter::default()
    };
    g.bench_function("list_filtered", |b| {
        b.iter(|| {
            let l = vols.list_volumes(&filter).unwrap();
            assert_eq!(l.len(), 10);
            black_box(l)
        })
    });
    g.bench_function("describe", |b| {
        b.iter(|| black_box(vols.describe_volume("default", "vol-04242").unwrap()))
    });
    g.finish();
}

fn uuid_like(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

criterion_group!(benches, bench_o1, bench_clone, bench_10k);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
