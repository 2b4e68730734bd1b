//! Every operation end to end through the library, checked with real tools.

use std::io::Write;

use vmvol_pool::AttachTarget;
use vmvol_volume::{
    AttachMode, Compression, Control, CreateVolume, ErrorKind, Format, LinkMode, ListFilter,
    NewSize, Prealloc, Resized, SortKey, VolumeRow, VolumeSource,
};

use crate::support::*;

fn create(env: &Env, name: &str, size: u64, format: Format, prealloc: Prealloc, ext4: bool) {
    env.vols
        .create_volume(
            "default",
            &CreateVolume {
                name: name.into(),
                size: Some(size),
                source: VolumeSource::Blank {
                    format,
                    prealloc,
                    ext4,
                },
            },
            &Control::new(),
        )
        .unwrap();
}

/// Attaches one volume to a new instance through the real attach path.
pub fn attach(env: &Env, pool: &str, name: &str, instance: &str, mode: AttachMode) {
    let req = vmvol_volume::AttachRequest {
        instance: instance.into(),
        volumes: vec![vmvol_volume::AttachVolume {
            pool: Some(pool.into()),
            volume_id: name.into(),
            mount_path: "/data".into(),
            readonly: mode == AttachMode::Ro,
            overlay: false,
            overlay_size: None,
            overlay_kind: vmvol_volume::OverlayKind::GuestOverlayfs,
        }],
        vmm: serde_json::Value::Null,
    };
    env.vols.attach_instance(&req, &mut |_| Ok(())).unwrap();
}

#[test]
fn blank_volumes_of_every_kind() {
    let env = Env::new();
    create(&env, "sparse", 8 * MIB, Format::Raw, Prealloc::Off, false);
    create(
        &env,
        "falloc",
        8 * MIB,
        Format::Raw,
        Prealloc::Falloc,
        false,
    );
    create(&env, "full", 8 * MIB, Format::Raw, Prealloc::Full, false);
    create(&env, "thin", 64 * MIB, Format::Qcow2, Prealloc::Off, false);
    create(&env, "fs", 64 * MIB, Format::Qcow2, Prealloc::Off, true);
    let sparse = env.vols.describe_volume("default", "sparse").unwrap();
    let full = env.vols.describe_volume("default", "full").unwrap();
    assert!(
        sparse.allocation < MIB,
        "sparse allocates {}",
        sparse.allocation
    );
    assert!(
        full.allocation >= 8 * MIB,
        "full allocates {}",
        full.allocation
    );
    let fs = env.vols.describe_volume("default", "fs").unwrap();
    let usage = fs.filesystem.expect("ext4 usage");
    assert!(usage.free > 0 && usage.used > 0 && usage.used + usage.free == usage.size);
    if require_tool("qemu-img") {
        let raw = to_raw(&env.path("default", "fs"), env.dir.path());
        e2fsck_clean(&raw);
    }
    assert_eq!(fs.capacity, 64 * MIB);
    assert!(matches!(
        fs.path,
        AttachTarget::File {
            format: Format::Qcow2,
            ..
        }
    ));
    let json = serde_json::to_value(&fs).unwrap();
    for k in [
        "name",
        "uuid",
        "pool",
        "path",
        "format",
        "capacity",
        "allocation",
        "backing",
        "attachments",
        "created",
    ] {
        assert!(json.get(k).is_some(), "describe lacks {k}");
    }
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn archive_volume_holds_the_tree_byte_identical() {
    let env = Env::new();
    let src = env.dir.path().join("tree");
    std::fs::create_dir_all(src.join("etc/app")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("etc/app/config"), b"key=value\n").unwrap();
    std::fs::write(src.join("blob.bin"), &big).unwrap();
    let tarball = env.dir.path().join("tree.tar.gz");
    {
        let f = std::fs::File::create(&tarball).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        b.append_dir_all(".", &src).unwrap();
        b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    }
    let v = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "arch".into(),
                size: None,
                source: VolumeSource::Archive {
                    path: tarball.clone(),
                },
            },
            &Control::new(),
        )
        .unwrap();
    assert!(v.record.ext4 && v.record.size >= 16 * MIB);
    let path = env.path("default", "arch");
    qemu_check(&path);
    if require_tool("qemu-img") {
        let raw = to_raw(&path, env.dir.path());
        e2fsck_clean(&raw);
        if require_loop_mount() {
            let m = Mount::new(&raw);
            assert_eq!(std::fs::read(m.dir.join("blob.bin")).unwrap(), big);
            assert_eq!(
                std::fs::read(m.dir.join("etc/app/config")).unwrap(),
                b"key=value\n"
            );
        }
    }
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn linked_volume_reads_template_and_keeps_writes_private() {
    let env = Env::new();
    env.blank("default", "golden", 4 * MIB, Format::Qcow2);
    env.write("default", "golden", 0, b"template bytes");
    env.vols
        .create_template_from_volume("default", "tpl", "golden", &Control::new())
        .unwrap();
    let a = env.linked_or_full("default", "a", "tpl", LinkMode::Linked);
    env.linked_or_full("default", "b", "tpl", LinkMode::Linked);
    assert_eq!(a.record.base.as_ref().unwrap().name, "tpl");
    assert_eq!(env.read("default", "a", 0, 14), b"template bytes");
    env.write("default", "a", 0, b"private!");
    assert_eq!(env.read("default", "b", 0, 14), b"template bytes");
    assert_eq!(env.read("default", "a", 0, 14), b"private! bytes");
    let d = env.vols.describe_volume("default", "b").unwrap();
    assert_eq!(d.backing.len(), 1);
    assert_eq!(
        (d.backing[0].name.as_str(), d.backing[0].format),
        ("tpl", Format::Qcow2)
    );
    let e = env.vols.delete_template("default", "tpl").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HasDependents);
    assert!(
        e.to_string().contains("volume a") && e.to_string().contains("volume b"),
        "{e}"
    );
    // Full copy survives deleting its source.
    let full = env.linked_or_full("default", "full", "tpl", LinkMode::Full);
    assert!(full.record.base.is_none());
    env.vols.delete_volume("default", "a").unwrap();
    env.vols.delete_volume("default", "b").unwrap();
    env.vols.delete_template("default", "tpl").unwrap();
    assert_eq!(env.read("default", "full", 0, 14), b"template bytes");
    qemu_compare(&env.path("default", "full"), &env.path("default", "golden"));
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn snapshots_external_and_raw_with_merge() {
    let env = Env::new();
    env.blank("default", "vm", 4 * MIB, Format::Qcow2);
    env.write("default", "vm", 0, b"one");
    let before = env.dir.path().join("before.qcow2");
    std::fs::copy(env.path("default", "vm"), &before).unwrap();
    let s1 = env
        .vols
        .create_snapshot("default", "s1", "vm", &Control::new())
        .unwrap();
    assert!(!s1.record.pending);
    assert_eq!(env.read("default", "vm", 0, 3), b"one");
    env.write("default", "vm", MIB, b"two");
    env.vols
        .create_snapshot("default", "s2", "vm", &Control::new())
        .unwrap();
    env.write("default", "vm", 2 * MIB, b"three");
    let d = env.vols.describe_volume("default", "vm").unwrap();
    let chain: Vec<_> = d.backing.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(chain, ["s2", "s1"]);
    assert_consistent(&env.root(), "default", true);
    // Restore s1 as a new volume: it holds what the volume held then.
    env.vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "restored".into(),
                size: None,
                source: VolumeSource::Snapshot {
                    name: "s1".into(),
                    mode: LinkMode::Full,
                },
            },
            &Control::new(),
        )
        .unwrap();
    qemu_compare(&env.path("default", "restored"), &before);
    let e = env
        .vols
        .delete_snapshot("default", "s2", false)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HasDependents);
    assert!(e.to_string().contains("volume vm"), "{e}");
    let snapshot_of = env.dir.path().join("now.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            env.path("default", "vm").to_str().unwrap(),
            snapshot_of.to_str().unwrap(),
        ],
    );
    env.vols.delete_snapshot("default", "s2", true).unwrap();
    env.vols.delete_snapshot("default", "s1", true).unwrap();
    qemu_compare(&env.path("default", "vm"), &snapshot_of);
    assert!(env
        .vols
        .describe_volume("default", "vm")
        .unwrap()
        .backing
        .is_empty());
    assert_consistent(&env.root(), "default", true);
    // raw: a full copy; the volume stays raw.
    env.blank("default", "r", 2 * MIB, Format::Raw);
    env.write("default", "r", 4096, b"raw data");
    let rs = env
        .vols
        .create_snapshot("default", "rs", "r", &Control::new())
        .unwrap();
    assert_eq!(rs.record.format, Format::Raw);
    let listed = env.vols.list_snapshots("default", Some("r")).unwrap();
    assert_eq!(listed.len(), 1);
    env.write("default", "r", 4096, b"changed!");
    env.vols.delete_snapshot("default", "rs", false).unwrap();
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn resize_offline_online_and_shrink() {
    let env = Env::new();
    create(&env, "p", 4 * MIB, Format::Raw, Prealloc::Full, false);
    let r = env
        .vols
        .resize_volume("default", "p", NewSize::Grow(4 * MIB))
        .unwrap();
    assert!(
        matches!(r, Resized::Offline { old_size, new_size, .. } if old_size == 4 * MIB && new_size == 8 * MIB)
    );
    let d = env.vols.describe_volume("default", "p").unwrap();
    assert_eq!(d.capacity, 8 * MIB);
    assert!(
        d.allocation >= 8 * MIB,
        "grown preallocated: {}",
        d.allocation
    );
    let e = env
        .vols
        .resize_volume("default", "p", NewSize::To(MIB))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string().contains(&(8 * MIB).to_string()) && e.to_string().contains(&MIB.to_string()),
        "{e}"
    );
    env.blank("default", "q", 4 * MIB, Format::Qcow2);
    env.vols
        .resize_volume("default", "q", NewSize::To(16 * MIB))
        .unwrap();
    qemu_check(&env.path("default", "q"));
    assert_eq!(
        env.vols.describe_volume("default", "q").unwrap().capacity,
        16 * MIB
    );
    // Online: attached read-write.
    attach(&env, "default", "q", "vm-1", AttachMode::Rw);
    let before = std::fs::read(env.path("default", "q")).unwrap();
    let alloc0 = env
        .vols
        .pool("default")
        .unwrap()
        .describe()
        .unwrap()
        .allocation;
    let Resized::Online(on) = env
        .vols
        .resize_volume("default", "q", NewSize::To(32 * MIB))
        .unwrap()
    else {
        panic!("expected online")
    };
    assert_eq!(on.request.desired_size % 512, 0);
    let body = serde_json::to_value(&on.request).unwrap();
    assert_eq!(body["desired_size"], 32 * MIB);
    // The disk id vmvol-chv gives the volume's device in that instance.
    assert_eq!(body["id"], "vdd");
    assert_eq!(on.instance, "vm-1", "the instance that must grow it");
    assert_eq!(
        std::fs::read(env.path("default", "q")).unwrap(),
        before,
        "image touched"
    );
    let alloc1 = env
        .vols
        .pool("default")
        .unwrap()
        .describe()
        .unwrap()
        .allocation;
    assert_eq!(alloc1, alloc0 + 16 * MIB, "space reserved");
    assert_eq!(env.vols.confirm_resize(on).unwrap(), 32 * MIB);
    // qcow2 with a backing file: CHV refuses, so do we.
    env.vols
        .create_template_from_volume("default", "t", "p", &Control::new())
        .unwrap();
    env.linked_or_full("default", "l", "t", LinkMode::Linked);
    attach(&env, "default", "l", "vm-2", AttachMode::Rw);
    let e = env
        .vols
        .resize_volume("default", "l", NewSize::Grow(MIB))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("backing file"), "{e}");
}

#[test]
fn clone_same_and_cross_pool() {
    let env = Env::new();
    create(&env, "src", 8 * MIB, Format::Qcow2, Prealloc::Off, true);
    env.write("default", "src", 5 * MIB, b"payload");
    let c = env
        .vols
        .clone_volume("default", "src", "copy", None, &Control::new())
        .unwrap();
    assert!(c.record.ext4);
    let x = env
        .vols
        .clone_volume("default", "src", "away", Some("other"), &Control::new())
        .unwrap();
    assert_eq!(x.pool, "other");
    qemu_compare(&env.path("default", "src"), &env.path("default", "copy"));
    qemu_compare(&env.path("default", "src"), &env.path("other", "away"));
    env.vols.delete_volume("default", "src").unwrap();
    assert_eq!(env.read("other", "away", 5 * MIB, 7), b"payload");
    attach(&env, "default", "copy", "vm-9", AttachMode::Rw);
    let e = env
        .vols
        .clone_volume("default", "copy", "nope", None, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert!(e.to_string().contains("vm-9"));
    assert_consistent(&env.root(), "default", true);
    assert_consistent(&env.root(), "other", true);
}

#[test]
fn compress_drops_unused_and_zero_clusters() {
    let env = Env::new();
    create(&env, "c", 64 * MIB, Format::Qcow2, Prealloc::Off, true);
    // Fill some clusters with zeros and data.
    env.write("default", "c", 40 * MIB, &vec![0u8; 4 * MIB as usize]);
    env.write("default", "c", 50 * MIB, &vec![0x5au8; 256 << 10]);
    let path = env.path("default", "c");
    let before = env.dir.path().join("before.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            before.to_str().unwrap(),
        ],
    );
    let r = env
        .vols
        .compress_volume("default", "c", Some(Compression::Zstd), &Control::new())
        .unwrap();
    assert!(r.bytes_after < r.bytes_before, "{r:?}");
    qemu_check(&path);
    // ext4 blocks (unused ones aside) are unchanged: e2fsck stays clean.
    let raw = to_raw(&path, env.dir.path());
    e2fsck_clean(&raw);
    create(&env, "r", MIB, Format::Raw, Prealloc::Off, false);
    let e = env
        .vols
        .compress_volume("default", "r", None, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("raw"), "{e}");
    attach(&env, "default", "c", "vm-3", AttachMode::Ro);
    let e = env
        .vols
        .compress_volume("default", "c", None, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    let e = env.vols.delete_volume("default", "c").unwrap_err();
    assert!(
        e.kind() == ErrorKind::InUse && e.to_string().contains("vm-3"),
        "{e}"
    );
    let e = env
        .vols
        .create_snapshot("default", "s", "c", &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn list_filters_sorts_and_shows_damaged() {
    let env = Env::new();
    env.blank("default", "Web-01", MIB, Format::Raw);
    env.blank("default", "web-02", 2 * MIB, Format::Qcow2);
    env.blank("default", "db", 3 * MIB, Format::Qcow2);
    env.blank("other", "WEBX", MIB, Format::Qcow2);
    attach(&env, "default", "db", "vm", AttachMode::Rw);
    let names = |f: &ListFilter| -> Vec<String> {
        env.vols
            .list_volumes(f)
            .unwrap()
            .into_iter()
            .map(|r| match r {
                VolumeRow::Ok { name, .. } => name,
                VolumeRow::Damaged { uuid, .. } => format!("damaged:{uuid}"),
            })
            .collect()
    };
    let all = ListFilter::default();
    assert_eq!(names(&all), ["WEBX", "Web-01", "db", "web-02"]);
    let web = ListFilter {
        name: Some("WeB".into()),
        ..ListFilter::default()
    };
    assert_eq!(names(&web), ["WEBX", "Web-01", "web-02"]);
    let f = ListFilter {
        pool: Some("default".into()),
        format: Some(Format::Qcow2),
        ..ListFilter::default()
    };
    assert_eq!(names(&f), ["db", "web-02"]);
    let f = ListFilter {
        attached: Some(true),
        ..ListFilter::default()
    };
    assert_eq!(names(&f), ["db"]);
    let f = ListFilter {
        attached: Some(false),
        sort: SortKey::Size,
        pool: Some("default".into()),
        ..ListFilter::default()
    };
    assert_eq!(names(&f), ["Web-01", "web-02"]);
    // Damage a record: it is listed with its reason.
    let d = env.vols.describe_volume("default", "web-02").unwrap();
    let p = env.vols.pool("default").unwrap();
    let rec = p
        .location()
        .join("volumes")
        .join(&d.uuid)
        .join("volume.json");
    std::fs::write(&rec, b"{not json").unwrap();
    p.rescan_entry(vmvol_pool::EntryKind::Volume, &d.uuid)
        .unwrap();
    let rows = env
        .vols
        .list_volumes(&ListFilter {
            name: Some("zzz".into()),
            ..ListFilter::default()
        })
        .unwrap();
    assert!(
        matches!(&rows[..], [VolumeRow::Damaged { reason, .. }] if reason.contains("JSON")),
        "{rows:?}"
    );
}

#[test]
fn templates_import_vetted_and_flattened() {
    let env = Env::new();
    if !require_tool("qemu-img") {
        return;
    }
    let dir = env.dir.path();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![7u8; 2 * MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &["-c", "write -P 9 0 64k", top.to_str().unwrap()],
    );
    let t = env
        .vols
        .import_template("default", "imp", &top, &Control::new())
        .unwrap();
    assert_eq!(t.record.format, Format::Qcow2);
    let tpl = env.vols.describe_template("default", "imp").unwrap();
    assert_eq!(tpl.id, t.id);
    env.linked_or_full("default", "v", "imp", LinkMode::Linked);
    qemu_compare(&env.path("default", "v"), &top);
    assert_eq!(env.vols.list_templates("default").unwrap().len(), 1);
    assert_consistent(&env.root(), "default", true);
}
