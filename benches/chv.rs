//! Benchmarks of vmvol-chv (numbers go to docs/performance.md):
//!
//! - the config disk of an instance with 23 volume devices (rw, ro and both
//!   overlay kinds): built in-process into a fresh sparse file, and written
//!   durably by `write_config_disk` (temp file, fsync, rename, directory
//!   fsync), against `truncate` + `mkfs.ext4 -d` on the same two files and
//!   image size (no journal, 4 KiB blocks, as hypeman makes it);
//! - the disk plan plus its DiskConfig JSON and `--disk` strings;
//! - attaching an instance with 23 volume devices end to end
//!   (`vmvol::instance::attach`: rules under the pool lock, 4 guest-overlayfs
//!   and 4 block overlays of 10 GiB made and ext4-formatted, records, the
//!   config disk), detach outside the timing.
//!
//! `cargo bench -p vmvol --bench chv` (needs e2fsprogs for the comparison).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use serde_json::Map;
use vmvol::format::{Control, Prealloc, RawImage};

use vmvol::chv::{
    build_config_disk, config_json, config_sh, plan, write_config_disk, ConfigFiles, ImageType,
    InstanceSpec, MountMode, OverlayKind, VolumeDisk,
};

/// 23 volume devices: 5 rw, 6 ro, 4 guest-overlayfs (8 devices), 4 block overlays.
fn spec(dir: &std::path::Path) -> InstanceSpec {
    let mut volumes = Vec::new();
    let mut add = |i: usize, mode: MountMode, image_type: ImageType| {
        volumes.push(VolumeDisk {
            volume: format!("volume-{i}"),
            path: dir.join(format!("v{i}.img")),
            image_type,
            transport: Default::default(),
            mount_path: format!("/mnt/v{i}"),
            mode,
        })
    };
    for i in 0..5 {
        add(i, MountMode::Rw, ImageType::Raw);
    }
    for i in 5..11 {
        add(i, MountMode::Ro, ImageType::Raw);
    }
    for i in 11..15 {
        let overlay_path = dir.join(format!("o{i}.raw"));
        add(
            i,
            MountMode::Overlay(OverlayKind::GuestOverlayfs { overlay_path }),
            ImageType::Raw,
        );
    }
    for i in 15..19 {
        add(i, MountMode::Overlay(OverlayKind::Block), ImageType::Qcow2);
    }
    InstanceSpec {
        rootfs: dir.join("rootfs.raw"),
        rootfs_image_type: ImageType::Raw,
        instance_overlay: dir.join("overlay.raw"),
        instance_overlay_image_type: ImageType::Raw,
        config_disk: dir.join("config.ext4"),
        volumes,
    }
}

fn timed(c: &mut Criterion, id: &str, mut f: impl FnMut() -> Duration) -> Duration {
    let mut mean = Duration::ZERO;
    let mut g = c.benchmark_group("chv");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
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
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn bench_chv(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let p = plan(&spec).unwrap();
    assert_eq!(p.disks.len(), 26);
    let mut extra = Map::new();
    extra.insert(
        "entrypoint".into(),
        serde_json::json!(["/bin/app", "--serve"]),
    );
    extra.insert(
        "env".into(),
        serde_json::json!({"PATH": "/usr/bin:/bin", "MODE": "prod"}),
    );

    let t_plan = timed(c, "plan + DiskConfig JSON + --disk args (26 disks)", || {
        let t = Instant::now();
        let p = plan(&spec).unwrap();
        let j = p.disks_json().unwrap();
        let a = p.disk_args().unwrap();
        std::hint::black_box((j, a));
        t.elapsed()
    });

    let files = ConfigFiles::new(&p, &extra).unwrap();
    let raw = dir.path().join("built.raw");
    let t_build = timed(
        c,
        "config disk build in-process (sparse file, no fsync)",
        || {
            let _ = std::fs::remove_file(&raw);
            let t = Instant::now();
            let img =
                RawImage::create(&raw, files.disk_size(), Prealloc::Off, &Control::new()).unwrap();
            build_config_disk(&img, &files).unwrap();
            drop(img);
            t.elapsed()
        },
    );

    let path = dir.path().join("config.ext4");
    let mut size = 0;
    let t_ours = timed(c, "config disk write_config_disk (durable)", || {
        let _ = std::fs::remove_file(&path);
        let t = Instant::now();
        size = write_config_disk(&path, &p, &extra).unwrap().size;
        t.elapsed()
    });

    // The same content and size with e2fsprogs.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("config.json"), config_json(&p, &extra).unwrap()).unwrap();
    std::fs::write(tree.join("config.sh"), config_sh(&p).unwrap()).unwrap();
    let mk = dir.path().join("mkfs.ext4");
    let tree_s = tree.to_str().unwrap().to_string();
    let mk_s = mk.to_str().unwrap().to_string();
    let t_mkfs = timed(c, "config disk: truncate + mkfs.ext4 -d", || {
        let _ = std::fs::remove_file(&mk);
        let t = Instant::now();
        let st = Command::new("truncate")
            .args(["-s", &size.to_string(), &mk_s])
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-O",
                "^has_journal",
                "-d",
                &tree_s,
                &mk_s,
            ])
            .status()
            .expect("mkfs.ext4 (e2fsprogs) on PATH");
        assert!(st.success());
        t.elapsed()
    });
    println!();
    println!("plan + encodings, 26 disks: {}", ms(t_plan));
    println!(
        "config disk ({} MiB, 23 volume devices): build {} | durable write (temp, fsync, rename, dir fsync) {} | truncate + mkfs.ext4 -d {} ({:.1}x the durable write)",
        size >> 20,
        ms(t_build),
        ms(t_ours),
        ms(t_mkfs),
        t_mkfs.as_secs_f64() / t_ours.as_secs_f64().max(1e-9)
    );
}

/// A pool with 19 volumes of 1 GiB (ext4) and the instance's other disks.
fn attach_setup(dir: &std::path::Path) -> (vmvol::volume::Volumes, vmvol::instance::VmDisks) {
    use vmvol::pool::{CapacityPolicy, PoolSpec, Registry, Wait};
    use vmvol::volume::{CreateVolume, Format, VolumeSource, Volumes};
    let reg = Registry::open(dir.join("reg")).unwrap();
    let spec = PoolSpec {
        capacity: CapacityPolicy::Quota { bytes: 1 << 40 },
        ..PoolSpec::default()
    };
    reg.define("default", &spec).unwrap();
    reg.activate("default", Wait::Block).unwrap();
    let vols = Volumes::new(reg);
    for i in 0..19 {
        let req = CreateVolume {
            name: format!("v{i}"),
            size: Some(1 << 30),
            source: VolumeSource::Blank {
                format: Format::Qcow2,
                prealloc: Prealloc::Off,
                ext4: true,
            },
        };
        vols.create_volume("default", &req, &Control::new())
            .unwrap();
    }
    for f in ["rootfs.raw", "overlay.raw"] {
        RawImage::create(&dir.join(f), 16 << 20, Prealloc::Off, &Control::new()).unwrap();
    }
    let disks = vmvol::instance::VmDisks {
        rootfs: dir.join("rootfs.raw"),
        rootfs_image_type: ImageType::Raw,
        instance_overlay: dir.join("overlay.raw"),
        instance_overlay_image_type: ImageType::Raw,
        config_extra: Map::new(),
    };
    (vols, disks)
}

/// 23 volume devices: 5 rw, 6 ro, 4 guest-overlayfs (8 devices), 4 block,
/// overlays of 10 GiB.
fn attach_request() -> Vec<vmvol::volume::AttachVolume> {
    use vmvol::volume::{AttachVolume, OverlayKind as Kind};
    (0..19)
        .map(|i| AttachVolume {
            pool: None,
            volume_id: format!("v{i}"),
            mount_path: format!("/mnt/v{i}"),
            readonly: i >= 5,
            overlay: i >= 11,
            overlay_size: (i >= 11).then_some(10 << 30),
            overlay_kind: if i >= 15 {
                Kind::Block
            } else {
                Kind::GuestOverlayfs
            },
        })
        .collect()
}

fn bench_attach(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (vols, disks) = attach_setup(dir.path());
    let req = attach_request();
    let mut n = 0u64;
    let t_attach = timed(
        c,
        "attach an instance with 23 volume devices (8 overlays of 10 GiB, config disk)",
        || {
            n += 1;
            let id = format!("i-{n}");
            let t = Instant::now();
            let vm = vmvol::instance::attach(&vols, &id, req.clone(), &disks).unwrap();
            let took = t.elapsed();
            assert_eq!(vm.plan.disks.len(), 26);
            vmvol::instance::detach(&vols, &id).unwrap();
            took
        },
    );
    let t_detach = timed(c, "detach that instance", || {
        n += 1;
        let id = format!("i-{n}");
        vmvol::instance::attach(&vols, &id, req.clone(), &disks).unwrap();
        let t = Instant::now();
        vmvol::instance::detach(&vols, &id).unwrap();
        t.elapsed()
    });
    println!();
    println!(
        "attach, 23 volume devices (8 overlays of 10 GiB formatted, config disk): {} | detach: {}",
        ms(t_attach),
        ms(t_detach)
    );
}

criterion_group!(benches, bench_chv, bench_attach);

fn main() {
    // `cargo test --benches` runs bench binaries without --bench: stay quick then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("chv bench: run with `cargo bench -p vmvol --bench chv`");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
